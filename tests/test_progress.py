"""Progress reporting: the bar on a (fake) terminal, log lines elsewhere, never an exception."""

from __future__ import annotations

import io
import logging

import pytest

from polish3d.progress import Progress, format_clock, log_progress


class FakeTTY(io.StringIO):
    """A terminal stand-in: a text stream that says it is a TTY."""

    def isatty(self):
        return True


class Clock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


OUTER = {"outer": 0, "cost_initial": -10.0, "cost_final": -12.5, "iterations": 37, "converged": True,
         "cc_seconds": 1.5, "lbfgs_seconds": 0.5, "move_rms_px": 0.412, "move_max_px": 1.3}


def _last_frame(text: str) -> str:
    """What a terminal shows last on the current line: the text after the last ``\\r``."""
    return text.rsplit("\r", 1)[-1]


def test_bar_shows_tomogram_stage_and_time_left():
    stream, clock = FakeTTY(), Clock()
    p = Progress(3, stream=stream, columns=120, clock=clock, min_interval_s=0.0)
    assert p.enabled
    cb = p.tomogram("TS_01")
    cb("coarse_shift", max_shift_px=3.25, seconds=0.4)
    assert "[1/3] TS_01" in _last_frame(stream.getvalue())
    assert "coarse shifts: max 3.25 px" in stream.getvalue()
    clock.now += 5
    cb("iteration", outer=1, iteration=140, cost=-12345.6)
    frame = _last_frame(stream.getvalue())
    assert "pass 2 it 140 cost -1.235e+04" in frame and "0:05" in frame and "~? left" in frame
    cb("outer", **OUTER)
    assert "pass 1 done: 37 it, moved 0.41 px (max 1.30)" in _last_frame(stream.getvalue())
    clock.now += 55  # the first tomogram took 60 s
    p.done("TS_01", 60.0)
    assert p.seconds_left() == pytest.approx(120.0)  # two more at 60 s each
    cb = p.tomogram("TS_02")
    clock.now += 30
    cb("iteration", outer=0, iteration=3, cost=1.0)
    frame = _last_frame(stream.getvalue())
    assert "[2/3] TS_02" in frame and "1:30 ~1:30 left" in frame  # 90 s elapsed, 120 − 30 s left
    assert "|" in frame and "#" in frame and " 50%" in frame  # 1 done + half of the second
    assert all(len(line) <= 119 for line in stream.getvalue().split("\r"))
    p.close()
    assert stream.getvalue().endswith("\n")


def test_bar_is_redrawn_in_place_and_cleared_before_log_lines():
    stream, clock = FakeTTY(), Clock()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    old = logging.getLogger("polish3d").level
    logging.getLogger("polish3d").setLevel(logging.INFO)
    try:
        with Progress(1, stream=stream, columns=100, clock=clock, min_interval_s=0.0) as p:
            cb = p.tomogram("TS_01")
            cb("iteration", outer=0, iteration=1, cost=5.0)
            cb("outer", **OUTER)  # a log line: the bar is cleared first, then redrawn
            cb("motion", message="motion: sigma 0.5")
        text = stream.getvalue()
    finally:
        root.removeHandler(handler)
        logging.getLogger("polish3d").setLevel(old)
    assert "\n" not in text.split("outer 0: cost")[0].rsplit("\r", 1)[-1]  # log line starts clean
    lines = text.split("\n")
    outer_line = next(ln for ln in lines if "outer 0: cost -10 → -12.5 in 37 L-BFGS" in ln)
    assert "[1/1]" not in _last_frame(outer_line)  # no bar text glued to the log line
    assert any("motion: sigma 0.5" in ln and "TS_01" not in _last_frame(ln) for ln in lines)
    assert handler.filters == []  # detached on close


def test_not_a_terminal_gives_log_lines_only(caplog):
    stream = io.StringIO()  # isatty() is False
    clock = Clock()
    p = Progress(2, stream=stream, clock=clock)
    assert not p.enabled
    with caplog.at_level(logging.DEBUG, logger="polish3d"):
        cb = p.tomogram("TS_01")
        cb("coarse_shift", max_shift_px=2.0, seconds=1.25)
        cb("iteration", outer=0, iteration=5, cost=3.0)
        cb("outer", **OUTER)
        cb("rescue", particles=4, seconds=2.0)
        cb("deformation", message="deformation: weak", warning=True)
        clock.now += 10
        p.done("TS_01", 10.0)
    p.close()
    assert stream.getvalue() == ""
    text = caplog.text
    assert "coarse per-tilt shift search: max |shift| 2.00 px (1.2 s)" in text
    assert "outer 0  iteration     5  cost 3" in text
    assert "outer 0: cost -10 → -12.5 in 37 L-BFGS iterations (converged)" in text
    assert "2D moves RMS 0.412 px, max 1.300 px" in text
    assert "4 particle(s) left behind" in text
    assert [r.levelname for r in caplog.records if "deformation: weak" in r.message] == ["WARNING"]
    assert "tomogram 1 / 2 finished (10.0 s); about 0:10 left" in text


def test_pipeline_mode_never_draws_a_bar():
    stream = FakeTTY()
    p = Progress(1, stream=stream, pipeline=True)
    p.tomogram("TS_01")("outer", **OUTER)
    p.done("TS_01", 1.0)
    p.close()
    assert not p.enabled and stream.getvalue() == ""


@pytest.mark.parametrize("columns", [1, 5, 20, 40, 60, 200])
def test_narrow_and_wide_terminals(columns):
    stream, clock = FakeTTY(), Clock()
    p = Progress(12, stream=stream, columns=columns, clock=clock, min_interval_s=0.0)
    cb = p.tomogram("a_very_long_tomogram_name_from_a_real_data_set_01")
    cb("iteration", outer=2, iteration=12345, cost=-1.0e9)
    clock.now += 3
    p.done("a_very_long_tomogram_name_from_a_real_data_set_01", 3.0)
    p.tomogram("TS_02")("outer", **OUTER)
    for frame in stream.getvalue().split("\r"):
        assert len(frame.rstrip("\n")) <= max(columns - 1, 0)
    if columns >= 60:
        assert "|" in _last_frame(stream.getvalue())


def test_odd_figures_never_raise(caplog):
    stream = FakeTTY()
    p = Progress(0, stream=stream, columns=200, min_interval_s=0.0)
    cb = p.tomogram("TS_01")
    with caplog.at_level(logging.DEBUG, logger="polish3d"):
        cb("outer")  # no figures at all
        cb("outer", outer="x", cost_initial=None, cost_final=float("nan"), move_rms_px="?",
           move_max_px=object(), iterations=None, exact=True)
        cb("iteration", outer=None, iteration=None, cost="bad")
        cb("coarse_shift", max_shift_px=float("inf"))
        cb("rescue")
        cb("unknown_event", foo=1)
        cb(None)
        cb("validation", message="tilt 3 rolled back")
    assert "tilt 3 rolled back" in caplog.text
    assert "exact pass ? done: ? it, moved ? px (max ?)" in stream.getvalue()
    p.done("TS_01", None)
    p.done("not started", float("nan"))
    p.skip("TS_09")
    assert 0.0 <= p.fraction() <= 1.0
    p.close()
    log_progress("x")("outer", cost_initial=[1, 2])  # a list where a number belongs


def test_broken_stream_turns_the_bar_off():
    class Broken(FakeTTY):
        def write(self, text):
            raise OSError("terminal went away")

    p = Progress(1, stream=Broken())
    assert p.enabled
    p.tomogram("TS_01")("iteration", outer=0, iteration=1, cost=1.0)
    assert not p.enabled
    p.close()


def test_format_clock():
    assert format_clock(0) == "0:00" and format_clock(59.6) == "1:00" and format_clock(3725) == "1:02:05"
    assert format_clock(None) == "--:--" and format_clock(float("nan")) == "--:--"
    assert format_clock(-3) == "--:--" and format_clock(float("inf")) == "--:--"
