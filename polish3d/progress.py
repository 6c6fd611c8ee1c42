"""Progress of a run over tomograms: a one-line bar on a terminal, plain log lines elsewhere.

The refinement reports through a callback ``progress(event, **figures)``
(:func:`polish3d.refine.tomogram.refine_tomogram`); the events it sends today:

* ``coarse_shift``: ``max_shift_px``, ``seconds``;
* ``iteration``: ``outer`` (pass index from 0), ``iteration``, ``cost``;
* ``outer``: one finished pass: ``outer``, ``cost_initial``, ``cost_final``, ``iterations``,
  ``converged``, ``cc_seconds``, ``lbfgs_seconds``, ``move_rms_px``, ``move_max_px``
  (``exact=True`` for the final exact-CC passes);
* ``rescue``: ``particles``, ``seconds``;
* ``motion``, ``deformation`` and any other event: ``message`` (``warning=True``: a warning).

:class:`Progress` turns them into

* on a terminal (``stream.isatty()`` and not pipeline mode): one line, redrawn in place with
  ``\\r``, e.g. ``[2/5] TS_02 |######--------------| 30% 1:02 ~2:25 left pass 2 it 140 cost
  -1.2e+05`` (tomogram k/N, bar, share of all tomograms, elapsed, estimated time left,
  stage); the log lines of the run still go to ``logging`` (the file log keeps them) and
  scroll above the bar, which is cleared before each one;
* otherwise: the same plain log lines as always (:func:`log_progress`), at most one per pass
  or stage, and one per finished tomogram with the time left.

It never raises: odd or missing figures print as ``?``, a narrow terminal gets a shorter line,
and a stream that fails to write turns the bar off.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from collections.abc import Callable

__all__ = ["Progress", "format_clock", "log_progress"]

log = logging.getLogger("polish3d")

#: bar width limits (characters, with its two ends); the bar takes at most half the room left
#: after the count, name, percentage and times, the stage text the rest
_BAR_MAX, _BAR_MIN = 26, 8


def _num(value, spec: str) -> str:
    """``value`` formatted by ``spec``, or ``?`` when it is missing or not a number."""
    try:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "?"
        return format(value, spec)
    except (TypeError, ValueError):
        return "?"


def format_clock(seconds) -> str:
    """``m:ss`` or ``h:mm:ss`` of a duration in seconds; ``--:--`` when unknown."""
    try:
        s = int(round(float(seconds)))
    except (TypeError, ValueError, OverflowError):
        return "--:--"
    if s < 0:
        return "--:--"
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def log_progress(name: str) -> Callable[..., None]:
    """The plain-log callback ``progress(event, **figures)`` for tomogram ``name``: one INFO
    line per coarse search, pass, rescue and message; iterations at DEBUG level."""

    def report(event, **k):
        try:
            _log_event(event, k)
        except Exception as exc:  # noqa: BLE001 - progress must never stop a refinement
            log.debug("%s: progress event %r not shown (%s)", name, event, exc)

    return report


def _log_event(event: str, k: dict) -> None:
    if event == "coarse_shift":
        log.info("    coarse per-tilt shift search: max |shift| %s px (%s s)",
                 _num(k.get("max_shift_px"), ".2f"), _num(k.get("seconds"), ".1f"))
    elif event == "iteration":
        log.debug("      outer %s  iteration %5s  cost %s", k.get("outer"), k.get("iteration"),
                  _num(k.get("cost"), ".10g"))
    elif event == "outer":
        log.info(
            "    outer %s: cost %s → %s in %s L-BFGS iterations (%s); CC %s s, L-BFGS %s s; "
            "2D moves RMS %s px, max %s px",
            k.get("outer"), _num(k.get("cost_initial"), ".6g"), _num(k.get("cost_final"), ".6g"),
            k.get("iterations", "?"), "converged" if k.get("converged") else "not converged",
            _num(k.get("cc_seconds"), ".1f"), _num(k.get("lbfgs_seconds"), ".1f"),
            _num(k.get("move_rms_px"), ".3f"), _num(k.get("move_max_px"), ".3f"),
        )
    elif event == "rescue":
        log.info("    %s particle(s) left behind: re-searched in 3D (%s s)", k.get("particles", "?"),
                 _num(k.get("seconds"), ".1f"))
    elif event == "validation" and "verdict" in k:
        log.info("    held-out validation: %s; %s tilt(s) rolled back, %s without signal, %s weak "
                 "particle(s) (%s s)", k.get("verdict", "?"), k.get("rolled_back", "?"),
                 k.get("no_signal", "?"), k.get("weak_particles", "?"), _num(k.get("seconds"), ".1f"))
        for message in k.get("messages") or []:
            log.warning("    %s", message)
    elif "message" in k:
        (log.warning if k.get("warning") else log.info)("    %s", k["message"])


def _pass_number(outer) -> str:
    """1-based pass number of the 0-based ``outer`` index (``?`` if it is not an integer)."""
    try:
        return str(int(outer) + 1) if float(outer) == int(outer) else "?"
    except (TypeError, ValueError, OverflowError):
        return "?"


def _stage_text(event: str, k: dict) -> str | None:
    """What the bar says about one event (``None``: nothing new to show)."""
    if event == "coarse_shift":
        return f"coarse shifts: max {_num(k.get('max_shift_px'), '.2f')} px"
    if event == "iteration":
        number = _pass_number(k.get("outer"))
        return f"pass {number} it {k.get('iteration', '?')} cost {_num(k.get('cost'), '.4g')}"
    if event == "outer":
        what = "exact pass" if k.get("exact") else "pass"
        return (f"{what} {_pass_number(k.get('outer'))} done: {_num(k.get('iterations'), 'd')} it, moved "
                f"{_num(k.get('move_rms_px'), '.2f')} px (max {_num(k.get('move_max_px'), '.2f')})")
    if event == "rescue":
        return f"rescue: {_num(k.get('particles'), 'd')} particle(s) re-searched"
    if event == "validation":
        return f"validation: {k.get('verdict', '?')}"
    if event in ("motion", "deformation"):
        return event
    return None


class _ClearBeforeLog(logging.Filter):
    """On a handler writing to the bar's stream: clears the bar before each log record."""

    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress

    def filter(self, record) -> bool:
        self.progress._clear()
        return True


class Progress:
    """Progress over ``total_tomograms`` tomograms (bar on a terminal, else log lines).

    Args:
        total_tomograms: tomograms to refine (skipped ones can be announced with :meth:`skip`).
        stream: where the bar goes (default ``sys.stderr``).
        enabled: draw the bar; ``None``: when ``stream.isatty()`` and not ``pipeline``.
        pipeline: RELION pipeline mode (never a bar).
        columns: terminal width (characters); ``None``: asked from the terminal (80 if unknown).
        min_interval_s: least time between two redraws of the bar (stage changes always redraw).
        clock: monotonic clock (seconds); replaceable in tests.

    Use ``callback = progress.tomogram(name)`` as the refinement's ``progress`` argument, then
    ``progress.done(name, seconds)``; :meth:`close` (or ``with Progress(...)``) ends the line.
    """

    def __init__(self, total_tomograms: int, stream=None, enabled: bool | None = None, *,
                 pipeline: bool = False, columns: int | None = None, min_interval_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        self.total = max(int(total_tomograms), 0)
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            enabled = not pipeline and _isatty(self.stream)
        self.enabled = bool(enabled)
        self.columns = columns
        self.min_interval_s = float(min_interval_s)
        self.clock = clock
        self.started = clock()
        self.finished = 0
        self.skipped = 0
        self.current: str | None = None
        self.number = 0
        self.stage = ""
        self.tomo_started = self.started
        self._busy_seconds = 0.0
        self._shown = 0
        self._last_draw = -math.inf
        self._filter = _ClearBeforeLog(self)
        self._handlers: list[logging.Handler] = []
        if self.enabled:
            self._attach()

    # -- public --------------------------------------------------------------------------------

    def tomogram(self, name: str) -> Callable[..., None]:
        """Start tomogram ``name``; returns its callback ``progress(event, **figures)``."""
        self.current, self.stage = str(name), "starting"
        self.number = min(self.finished + self.skipped + 1, max(self.total, 1))
        self.tomo_started = self.clock()
        self._draw(force=True)
        plain = log_progress(str(name))

        def report(event, **figures):
            plain(event, **figures)  # the log keeps every line (scrolls above the bar)
            if self.enabled:
                try:
                    text = _stage_text(str(event), figures)
                    if text is not None:
                        self.stage = text
                        self._draw(force=event != "iteration")
                except Exception:  # noqa: BLE001 - progress must never stop a refinement
                    self.stage = str(event)

        return report

    def done(self, name: str, seconds: float | None = None) -> None:
        """Tomogram ``name`` finished (``seconds``: its own time, for the log line)."""
        self.finished += 1
        self._busy_seconds = self.clock() - self.started
        if name == self.current:
            self.current = None
        left = self.seconds_left()
        log.info("  tomogram %d / %d finished%s; about %s left", self.finished + self.skipped,
                 self.total, f" ({_num(seconds, '.1f')} s)" if seconds is not None else "",
                 format_clock(left) if left is not None else "?")
        self.stage = f"{name} done"
        self._draw(force=True)

    def skip(self, name: str) -> None:
        """Tomogram ``name`` needs no work (reused or not refinable): counted, not timed."""
        self.skipped += 1
        self._draw(force=True)

    def seconds_left(self) -> float | None:
        """Estimated seconds until every tomogram is done: the mean wall time per finished
        tomogram times those left, less the time the current one has already run; ``None``
        before the first one finishes."""
        if self.finished == 0:
            return None
        remaining = max(self.total - self.finished - self.skipped, 0)
        per_tomogram = self._busy_seconds / self.finished
        running = self.clock() - self.tomo_started if self.current is not None else 0.0
        return max(per_tomogram * remaining - running, 0.0)

    def fraction(self) -> float:
        """Fraction of the tomograms done (the current one counted by its expected time)."""
        if self.total == 0:
            return 1.0
        done = self.finished + self.skipped
        if self.current is not None and self.finished:
            per_tomogram = self._busy_seconds / self.finished
            done += min((self.clock() - self.tomo_started) / max(per_tomogram, 1e-9), 0.95)
        return min(max(done / self.total, 0.0), 1.0)

    def line(self, width: int = 80) -> str:
        """The bar's text for a terminal ``width`` characters wide (at most ``width − 1``):
        count, tomogram, bar, percentage, elapsed and estimated time left, then the stage
        (shortened first; the bar is dropped below ~60 columns)."""
        left = self.seconds_left()
        timing = (f"{format_clock(self.clock() - self.started)} "
                  f"~{format_clock(left) if left is not None else '?'} left")
        shown = self.number if self.current else self.finished + self.skipped
        name = self.current or "tomograms"
        name = name if len(name) <= 24 else name[:23] + "~"
        head = f"[{shown}/{self.total}] {name}"
        frac = self.fraction()
        pct = f"{100.0 * frac:3.0f}%"
        room = width - 1
        bar_width = min(_BAR_MAX, (room - len(head) - len(pct) - len(timing) - 4) // 2)
        if bar_width >= _BAR_MIN:
            fill = int(round(frac * (bar_width - 2)))
            head += " |" + "#" * fill + "-" * (bar_width - 2 - fill) + "|"
        text = f"{head} {pct} {timing} {self.stage}".rstrip()
        if len(text) <= room:
            return text
        cut = text[: max(room, 0)]
        space = cut.rfind(" ")
        return cut[:space] if space > room - 12 else cut  # end at a word when one is near

    def close(self) -> None:
        """End the bar's line (a newline after the last drawing) and detach from logging."""
        if self.enabled and self._shown:
            self._draw(force=True)
            self._write("\n")
            self._shown = 0
        for h in self._handlers:
            h.removeFilter(self._filter)
        self._handlers = []

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- drawing -------------------------------------------------------------------------------

    def _attach(self) -> None:
        """Clear the bar before records that log handlers write to the same stream."""
        for logger in (logging.getLogger(), log):
            for h in logger.handlers:
                if getattr(h, "stream", None) is self.stream and h not in self._handlers:
                    h.addFilter(self._filter)
                    self._handlers.append(h)

    def _width(self) -> int:
        if self.columns is not None:
            return max(int(self.columns), 1)
        try:
            return max(shutil.get_terminal_size((80, 24)).columns, 1)
        except (OSError, ValueError):
            return 80

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not force and now - self._last_draw < self.min_interval_s:
            return
        self._last_draw = now
        try:
            text = self.line(self._width())
        except Exception:  # noqa: BLE001 - progress must never stop a refinement
            text = f"[{self.finished + self.skipped}/{self.total}] {self.current or ''}"
        pad = " " * max(self._shown - len(text), 0)
        if self._write("\r" + text + pad):
            self._shown = len(text)

    def _clear(self) -> None:
        if self.enabled and self._shown:
            self._write("\r" + " " * self._shown + "\r")
            self._shown = 0
            self._last_draw = -math.inf

    def _write(self, text: str) -> bool:
        try:
            self.stream.write(text)
            self.stream.flush()
            return True
        except (OSError, ValueError, UnicodeError):  # closed or broken stream: stop drawing
            self.enabled = False
            return False


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False
