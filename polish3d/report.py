"""``polish3d report <o>``: one self-contained HTML page (``<o>/report.html``) about an align run.

Everything comes from what ``polish3d align`` left in ``<o>``: ``metrics.json``,
``tomograms.star`` + ``tilt_series/*.star``, ``particles.star``, ``motion.star`` (with
``--motion``), ``note.txt`` and ``polish3d.log``. The *input* geometry (for the per-tilt
changes and the particle displacements) is located through ``metrics["inputs"]`` if present,
else through the ``--i/--t/--p/--mot`` flags in ``note.txt``; without it those plots say
"not computed" and the rest still renders. Plots are PNGs embedded as base64; nothing else
is read or written, inputs are never modified, the page is written atomically. The plots are
drawn by :mod:`polish3d.report_figures`.

**Keys of metrics.json read here** (all optional except ``tomograms``; a section whose data is
absent says "not computed"):

* ``seconds``: float, the run's wall time; ``skipped``, ``not_refined``: lists of names.
* ``inputs``: ``{"tomograms": path, "particles": path, "trajectories": path | null,
  "project_dir": path}`` (absolute paths; preferred over ``note.txt``).
* ``tomograms[name]``: ``n_particles``, ``n_tilts``, ``seconds``, ``displacement_rms_px``,
  ``displacement_max_px``, ``per_tilt_displacement_rms_px`` (F), ``per_tilt_cc_first``/
  ``per_tilt_cc_last`` (F), ``coarse_rejected_tilts`` (rows), ``rescued_particles``,
  ``motion`` and ``deformation`` (dicts as written by the refiners; ``deformation.notes``),
  ``flags``: list of strings or ``{"message": str, ...}`` (shown as warnings), and
  ``validation`` (held-out validation; all keys optional but ``tilts`` and ``verdict``):
  ``{"verdict": "improved" | "rolled_back" | "reference_mismatch" | "no_signal" | "off",
  "tilts": [{"row": int, "cc_input": float, "cc_refined": float, "z": float,
  "signal_z": float, "verdict": "improved" | "kept" | "rolled_back" | "no_signal"}],
  "rolled_back_tilts": [row], "no_signal_tilts": [row], "weak_particles": [index],
  "messages": [str]}`` (verdicts may also be written with spaces: ``"rolled back"``).
  The messages are the suggested actions: shown at the top of the page and per tomogram.
* ``fsc`` (whole run) and ``tomograms[name]["fsc"]`` (optional, same shape):
  ``{"shell": [int], "frequency_per_ang": [float] (optional, 1/Å), "before": [float],
  "after": [float], "resolution_before_ang": float, "resolution_after_ang": float}``.

Per-tilt rows are file rows (0-based) of the tilt-series STAR tables; ``null`` stands for NaN.
"""

from __future__ import annotations

import html
import json
import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from polish3d.errors import InputError
from polish3d.report_figures import (
    fig_deformation,
    fig_displacements,
    fig_fsc,
    fig_geometry,
    fig_per_tilt,
    fig_trajectories,
    fig_validation,
    verdict_key,
)

__all__ = ["build_report", "gather", "register_cli", "write_report"]

log = logging.getLogger("polish3d")

ANGLE_NAMES = ("rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot")
NOT_COMPUTED = "not computed"


@dataclass
class TomoData:
    """What the report shows about one tomogram (arrays ``None`` when not available)."""

    name: str
    metrics: dict
    pixel_size_ang: float = 0.0
    tilt_deg: np.ndarray | None = None  # (F,) tilt angle per file row
    d_shift_px: np.ndarray | None = None  # (F, 2) refined − input
    d_angle_deg: np.ndarray | None = None  # (F, 3) XTilt, YTilt, ZRot
    disp3d_px: np.ndarray | None = None  # (N,) |X_out − X_in|
    disp2d_px: np.ndarray | None = None  # (N·F,) reprojected displacement
    positions_px: np.ndarray | None = None  # (N, 3)
    trajectories_px: np.ndarray | None = None  # (N, F, 3)
    dose_order: np.ndarray | None = None
    deformation: object = None
    image_size_px: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)


@dataclass
class RunData:
    """Everything gathered from an align output folder."""

    out_dir: Path
    metrics: dict
    tomograms: list[TomoData]
    inputs: str  # where the input geometry came from, or why it is missing
    log_warnings: list[str]
    command: str


# ---------------------------------------------------------------------------------------------
# gathering


def _read_metrics(out_dir: Path) -> dict:
    path = out_dir / "metrics.json"
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: not a folder (expected the --o folder of `polish3d align`)")
    for required in ("metrics.json", "tomograms.star"):
        if not (out_dir / required).is_file():
            raise InputError(f"{out_dir}: no {required}; expected the output folder of `polish3d align` "
                             "(metrics.json, tomograms.star, tilt_series/, particles.star)")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("tomograms"), dict):
        raise InputError(f"{path}: expected an object with a 'tomograms' entry (written by polish3d align)")
    return metrics


def _project_dir(out_dir: Path) -> Path | None:
    """The folder the paths in ``<o>/tomograms.star`` are relative to (RELION's project)."""
    from polish3d.io.star import read_star

    table = next(iter(read_star(out_dir / "tomograms.star").values()))
    entries = [str(v) for v in getattr(table, "get", lambda *_: [])("rlnTomoTiltSeriesStarFile", [])]
    if not entries or Path(entries[0]).is_absolute():
        return None
    for base in [*out_dir.resolve().parents, Path.cwd()]:
        if (base / entries[0]).is_file():
            return base
    return None


def _command(out_dir: Path) -> tuple[str, dict[str, str]]:
    """The command line in ``note.txt`` and its ``--flag value`` pairs."""
    note = out_dir / "note.txt"
    lines = note.read_text(errors="replace").splitlines() if note.is_file() else []
    command = next((ln.strip() for ln in lines if ln.strip().startswith("polish3d")), "")
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = []
    return command, {t[2:]: v for t, v in zip(tokens, tokens[1:], strict=False) if t.startswith("--")}


def _input_files(metrics: dict, flags: dict[str, str], project: Path | None):
    """``(tomograms, particles, trajectories, project_dir, description)`` of the run's input,
    or ``None`` and the reason."""
    from polish3d.io import relion

    rec = metrics.get("inputs") or {}
    if rec.get("tomograms") and rec.get("particles"):
        base = Path(rec["project_dir"]) if rec.get("project_dir") else project
        return (Path(rec["tomograms"]), Path(rec["particles"]), rec.get("trajectories"), base,
                "metrics.json (inputs)")
    if not flags:
        return None, "no input recorded (metrics.json has no 'inputs', note.txt no command)"
    for base in dict.fromkeys(b for b in (project, Path.cwd()) if b is not None):
        def find(key, base=base):
            v = flags.get(key)
            return None if not v else (Path(v) if Path(v).is_absolute() else base / v)

        opt = find("i") or find("in_parts")
        opt = relion.read_optimisation_set(opt, project_dir=base) if opt and opt.is_file() else None
        t = find("t") or (opt.tomograms_file if opt else None)
        p = find("p") or (opt.particles_file if opt else None)
        mot = find("mot") or (opt.trajectories_file if opt else None)
        if t and p and Path(t).is_file() and Path(p).is_file():
            return Path(t), Path(p), mot, base, f"the command in note.txt (project folder {base})"
    return None, "input files named in note.txt not found"


def _read_sets(tomograms, particles, trajectories, project):
    from polish3d.io import relion

    tset = relion.read_tomogram_set(tomograms, project_dir=project)
    pset = relion.read_particle_set(particles) if Path(particles).is_file() else None  # --shift_only
    traj = relion.read_trajectories(trajectories) if trajectories and Path(trajectories).is_file() else None
    return tset, pset, traj


def gather(out_dir) -> RunData:
    """Read an align output folder (and the run's input geometry, when it can be found).

    Raises:
        InputError: ``out_dir`` is not the output folder of ``polish3d align``.
    """
    out_dir = Path(out_dir)
    metrics = _read_metrics(out_dir)
    command, flags = _command(out_dir)
    project = _project_dir(out_dir)
    out_sets = _read_sets(out_dir / "tomograms.star", out_dir / "particles.star", out_dir / "motion.star",
                          project)
    in_sets = None
    try:
        found = _input_files(metrics, flags, project)
        where = found[-1]
        in_sets = _read_sets(*found[:4]) if found[0] is not None else None
    except InputError as exc:  # a broken input set must not stop the report
        where = f"input geometry not readable: {exc}"
    if out_sets[1] is None and in_sets is not None:  # --shift_only writes no particles.star
        out_sets = (out_sets[0], in_sets[1], out_sets[2])
    tomos = [_tomo_data(n, m, out_sets, in_sets) for n, m in metrics["tomograms"].items()]
    return RunData(out_dir, metrics, tomos, where, _log_warnings(out_dir), command)


def _log_warnings(out_dir: Path) -> list[str]:
    path = out_dir / "polish3d.log"
    if not path.is_file():
        return []
    return [ln.split(" WARNING ", 1)[1].strip() for ln in path.read_text(errors="replace").splitlines()
            if " WARNING " in ln]


def _euler(ts) -> np.ndarray:
    """``(F, 5)`` XTilt, YTilt, ZRot (°), X/Y shift (px) of a tilt series' matrices."""
    from polish3d import geometry

    e = geometry.projection_to_euler(ts.projections, pixel_size_ang=ts.pixel_size_ang,
                                     image_size_px=ts.image_size_px, tomo_size_px=ts.tomo_size_px)
    shifts = [e[k] / ts.pixel_size_ang for k in ("rlnTomoXShiftAngst", "rlnTomoYShiftAngst")]
    return np.stack([e[k] for k in ANGLE_NAMES] + shifts, -1)


def _tomo_data(name: str, m: dict, out_sets, in_sets) -> TomoData:
    from polish3d import geometry

    d = TomoData(name=name, metrics=m if isinstance(m, dict) else {})
    tset, pset, traj = out_sets
    if name not in tset.names:
        d.notes.append(f"{name} is not in tomograms.star")
        return d
    ts = tset.tilt_series(name, load_images=False)
    d.pixel_size_ang, d.image_size_px, d.deformation = ts.pixel_size_ang, ts.image_size_px, ts.deformation
    table = tset.tilt_tables[name]
    e_out = _euler(ts)
    nominal = "rlnTomoNominalStageTiltAngle"
    d.tilt_deg = np.asarray(table[nominal], float) if nominal in table else e_out[:, 1]
    d.dose_order = geometry.dose_order(ts.pre_exposure_e_per_ang2)
    parts = pset.for_tomogram(ts, traj, require_half_set=False) if pset is not None else None
    if parts is not None:
        d.positions_px, d.trajectories_px = parts.positions_px, parts.trajectories_px
    if in_sets is None:
        return d
    tin, pin, trin = in_sets
    if name not in tin.names or tin.tilt_series(name, load_images=False).n_tilts != ts.n_tilts:
        d.notes.append("the input tilt series does not match the output (name or tilt count)")
        return d
    ts_in = tin.tilt_series(name, load_images=False)
    delta = e_out - _euler(ts_in)
    delta[:, :3] = (delta[:, :3] + 180.0) % 360.0 - 180.0
    d.d_angle_deg, d.d_shift_px = delta[:, :3], delta[:, 3:]
    if parts is not None:
        _particle_changes(d, ts, parts, ts_in, pin.for_tomogram(ts_in, trin, require_half_set=False))
    return d


def _particle_changes(d: TomoData, ts, parts, ts_in, parts_in) -> None:
    from polish3d.score import project_particles

    index = {n: i for i, n in enumerate(parts_in.names)}
    common = [(i, index[n]) for i, n in enumerate(parts.names) if n in index]
    if not common:
        d.notes.append("no particle of the output is in the input (names differ)")
        return
    a, b = (np.array(v) for v in zip(*common, strict=True))
    d.disp3d_px = np.linalg.norm(parts.positions_px[a] - parts_in.positions_px[b], axis=-1)
    if tuple(ts.image_size_px) != tuple(ts_in.image_size_px):
        d.notes.append("input and output image sizes differ: 2D displacements not computed")
        return
    uv = project_particles(ts, parts)[a] - project_particles(ts_in, parts_in)[b]
    d.disp2d_px = np.linalg.norm(uv, axis=-1).ravel()


# ---------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;line-height:1.4}
body{padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px} h2{border-bottom:2px solid #1f77b4;margin-top:36px}
h3{font-size:1.05em;margin:18px 0 6px} table{border-collapse:collapse;font-size:.92em}
td,th{border:1px solid #ccc;padding:4px 9px;text-align:right} th{background:#eef3f8}
td.text,th:first-child{text-align:left} .meta{color:#555;font-size:.9em} .na{color:#888;font-style:italic}
.warn{color:#a35200} .bad{color:#c62828;font-weight:600} .good{color:#2e7d32;font-weight:600}
code{background:#f4f4f4;padding:1px 4px} img{max-width:100%;display:block;margin:4px 0 10px}
.actions{border-left:5px solid #e69f00;background:#fff8e6;padding:6px 14px;margin:12px 0}
.actions h3{margin-top:4px} .verdict{font-size:1.1em}
"""

_VERDICT_CLASS = {"kept": "good", "improved": "good", "ok": "good", "rolled_back": "bad",
                  "reference_mismatch": "bad", "no_signal": "warn", "off": "na"}
#: what a tomogram's held-out verdict means, for the page
_VERDICT_TEXT = {
    "improved": "the refined geometry fits held-out particles better than the input",
    "rolled_back": "the refined geometry did not improve on held-out particles: input geometry kept",
    "reference_mismatch": "the reference does not match the particles: input geometry kept",
    "no_signal": "no significant signal in the particles: input geometry kept",
    "off": "held-out validation was turned off for this run",
}


def _e(text) -> str:
    return html.escape(str(text))


def _num(v, fmt: str = ".2f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and np.isfinite(v) else "–"


def _rms(v) -> float | None:
    return float(np.sqrt(np.nanmean(v**2))) if v is not None and v.size else None


def _flags(d: TomoData, metrics: dict) -> list[str]:
    """Warnings about one tomogram: recorded flags first, then what the metrics imply."""
    m = d.metrics
    out = [f.get("message", str(f)) if isinstance(f, dict) else str(f) for f in m.get("flags") or []]
    if d.name in (metrics.get("not_refined") or []):
        out.append("not refined: its input geometry was written unchanged")
    if d.name in (metrics.get("skipped") or []):
        out.append("result reused from an earlier run (--only_do_unfinished)")
    if m.get("coarse_rejected_tilts"):
        out.append(f"coarse shift search found no clear peak in tilt rows {m['coarse_rejected_tilts']}")
    if m.get("rescued_particles"):
        out.append(f"{len(m['rescued_particles'])} particle(s) left behind were re-searched in 3D")
    if m.get("non_finite_pixels"):
        out.append(f"non-finite pixels in tilts {sorted(m['non_finite_pixels'])} (masked)")
    out += [str(n) for n in (m.get("deformation") or {}).get("notes") or []]
    val = _validation(d)
    for key in ("rolled_back", "no_signal"):
        if val[key]:
            what = "rolled back" if key == "rolled_back" else "without signal"
            out.append(f"{len(val[key])} tilt(s) {what} on held-out data (input geometry kept): "
                       f"rows {val[key]}")
    if val["weak"]:
        out.append(f"{len(val['weak'])} particle(s) whose CC never rises above noise")
    return out + d.notes


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


def _validation(d: TomoData) -> dict:
    """The held-out validation of a tomogram, tolerant of missing keys: ``verdict`` (a key, or
    ``None``), ``rolled_back`` / ``no_signal`` (tilt rows), ``weak`` (particle indices),
    ``messages``. Rows not listed explicitly are taken from the per-tilt verdicts."""
    v = d.metrics.get("validation")
    v = v if isinstance(v, dict) else {}
    tilts = [t for t in v.get("tilts") or [] if isinstance(t, dict)]
    out = {"verdict": verdict_key(v["verdict"]) if v.get("verdict") is not None else None,
           "n_tilts": len(tilts), "weak": _as_list(v.get("weak_particles")),
           "messages": [str(x) for x in _as_list(v.get("messages"))]}
    for key in ("rolled_back", "no_signal"):
        listed = v.get(f"{key}_tilts")
        out[key] = _as_list(listed) if listed is not None else [
            t.get("row") for t in tilts if verdict_key(t.get("verdict")) == key]
    return out


def _verdict(d: TomoData) -> str:
    """The summary cell: the tomogram's verdict, then the tilts whose input geometry stays."""
    val = _validation(d)
    if val["verdict"] is None:
        return f'<span class="na">{NOT_COMPUTED}</span>'
    cls = _VERDICT_CLASS.get(val["verdict"], "warn")
    counts = [f"{len(val[k])} {k.replace('_', ' ')}" for k in ("rolled_back", "no_signal") if val[k]]
    more = f'; <span class="warn">tilts: {", ".join(counts)}</span>' if counts else ""
    return f'<span class="{cls}">{_e(val["verdict"].replace("_", " "))}</span>{more}'


def _validation_html(d: TomoData) -> str:
    """Verdict, weak particles and suggested actions of one tomogram (above its plot)."""
    val = _validation(d)
    if val["verdict"] is None:
        return ""
    meaning = _VERDICT_TEXT.get(val["verdict"], "")
    parts = [f'<p class="verdict" data-verdict="{_e(val["verdict"])}">Held-out verdict: '
             f"{_verdict(d)}{(' – ' + _e(meaning)) if meaning else ''}</p>"]
    if val["weak"]:
        shown = ", ".join(str(i) for i in val["weak"][:30]) + (" …" if len(val["weak"]) > 30 else "")
        parts.append(f'<p class="warn" data-weak="{len(val["weak"])}">{len(val["weak"])} weak particle(s) '
                     f"(CC never above noise; indices in particles.star order of this tomogram): {shown}</p>")
    if val["messages"]:
        parts.append('<div class="actions"><b>Suggested actions</b><ul>'
                     + "".join(f"<li>{_e(msg)}</li>" for msg in val["messages"]) + "</ul></div>")
    return "\n".join(parts)


def _actions_html(run: RunData) -> str:
    """Every tomogram's suggested actions in one box at the top of the page ("" if none)."""
    items = [f"<li><b>{_e(d.name)}</b>: {_e(msg)}</li>" for d in run.tomograms
             for msg in _validation(d)["messages"]]
    if not items:
        return ""
    return f'<div class="actions" id="actions"><h3>Suggested actions</h3><ul>{"".join(items)}</ul></div>'


def _summary_table(run: RunData) -> str:
    head = ("Tomogram", "Particles", "Tilts", "Time (s)", "2D displacement RMS (px)",
            "2D displacement max (px)", "3D position change RMS (px)", "Held-out verdict", "Flags")
    rows = []
    for d in run.tomograms:
        m, flags = d.metrics, _flags(d, run.metrics)
        flag_cell = (f'<span class="warn">{len(flags)}: {_e(flags[0])}'
                     + (" …" if len(flags) > 1 else "") + "</span>") if flags else "none"
        cells = [_e(d.name), _num(m.get("n_particles"), "d"), _num(m.get("n_tilts"), "d"),
                 _num(m.get("seconds"), ".1f"), _num(m.get("displacement_rms_px")),
                 _num(m.get("displacement_max_px")), _num(_rms(d.disp3d_px)), _verdict(d), flag_cell]
        rows.append("<tr>" + "".join(
            f'<td class="text">{c}</td>' if k in (0, 7, 8) else f"<td>{c}</td>" for k, c in enumerate(cells)
        ) + "</tr>")
    return ('<table id="summary"><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
            + "".join(rows) + "</table>")


def _img(b64: str, name: str, alt: str) -> str:
    return f'<img data-plot="{_e(name)}" alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _section(title: str, key: str, draw, reason: str, intro: str = "") -> str:
    """``<h3>``, ``intro`` (HTML) and the plot, or the reason it is absent ("not computed …")."""
    body = f'<p class="na" data-missing="{_e(key)}">{NOT_COMPUTED}: {_e(reason)}</p>'
    if draw is not None:
        try:
            body = _img(draw(), key, title)
        except Exception as exc:  # noqa: BLE001 - one bad plot must not lose the report
            log.warning("report: could not draw %s (%s)", key, exc)
            body = f'<p class="bad" data-failed="{_e(key)}">could not draw this plot: {_e(exc)}</p>'
    return f'<h3>{_e(title)}</h3>\n{intro}\n{body}'


def _tomogram_html(d: TomoData, run: RunData) -> str:
    m, flags, val = d.metrics, _flags(d, run.metrics), _validation(d)
    no_input, tilts = f"the input geometry is not available ({run.inputs})", d.tilt_deg is not None
    traj = d.trajectories_px is not None and d.dose_order is not None and d.trajectories_px.shape[1] > 1
    sections = [  # title, key, can draw, figure, why not
        ("Per-tilt geometry changes", "geometry", d.d_shift_px is not None, fig_geometry, no_input),
        ("Per-tilt displacement and CC", "per_tilt", tilts, fig_per_tilt, "no per-tilt data"),
        ("Particle displacements", "displacements", d.disp3d_px is not None and d.disp2d_px is not None,
         fig_displacements, no_input),
        ("Held-out validation", "validation", tilts and bool(val["n_tilts"]), fig_validation,
         _VERDICT_TEXT["off"] if val["verdict"] == "off" else "no held-out validation in metrics.json"),
        ("FSC of this tomogram's particles", "fsc_tomogram", bool(m.get("fsc")), lambda _: fig_fsc(m["fsc"]),
         None),
        ("Trajectories", "trajectories", traj, fig_trajectories, "no trajectories (align without --motion)"),
        ("Deformation", "deformation", tilts and d.deformation is not None, fig_deformation,
         "no deformation (align without --deformation)"),
    ]
    parts = [f'<h2 id="tomo-{_e(d.name)}">{_e(d.name)}</h2>',
             "<ul>" + "".join(f'<li class="warn">{_e(f)}</li>' for f in flags) + "</ul>" if flags
             else '<p class="meta">No flags.</p>']
    parts += [_section(title, key, (lambda fn=fn: fn(d)) if ok else None, why,
                       _validation_html(d) if key == "validation" else "")
              for title, key, ok, fn, why in sections if ok or why is not None]
    return "\n".join(parts)


def build_report(run: RunData) -> str:
    """The report page of gathered data (a complete, self-contained HTML document)."""
    m = run.metrics
    fsc = m.get("fsc") or {}
    res = "".join(f"<li>{lab}: {_num(fsc.get(k), '.1f')} Å</li>" for k, lab in (
        ("resolution_before_ang", "input geometry"), ("resolution_after_ang", "refined geometry")))
    fsc_html = _section("Half-map FSC, before and after", "fsc", (lambda: fig_fsc(fsc)) if fsc.get("before")
                        and fsc.get("after") else None, "no FSC in metrics.json")
    if fsc.get("before"):
        fsc_html += f"<p>Resolution at FSC = 0.143:</p><ul>{res}</ul>"
    warn = ("<ul>" + "".join(f'<li class="warn">{_e(w)}</li>' for w in run.log_warnings) + "</ul>"
            if run.log_warnings else '<p class="meta">none</p>')
    px = sorted({d.pixel_size_ang for d in run.tomograms if d.pixel_size_ang})
    body = [
        "<h1>polish3d align report</h1>",
        f'<p class="meta">Folder <code>{_e(run.out_dir)}</code>; run time {_num(m.get("seconds"), ".1f")} s; '
        f"pixel size {', '.join(f'{p:g}' for p in px) or '–'} Å/px (px below: tilt-series pixels); "
        f"input geometry from: {_e(run.inputs)}.</p>",
        f'<p class="meta">Command: <code>{_e(run.command or "(not recorded)")}</code></p>',
        "<h2>Summary</h2>", _summary_table(run), _actions_html(run), fsc_html,
        "<h3>Warnings in polish3d.log</h3>", warn,
    ] + [_tomogram_html(d, run) for d in run.tomograms]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>polish3d report: {_e(run.out_dir.name)}</title><style>{CSS}</style></head>\n"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(out_dir) -> Path:
    """Gather ``out_dir`` (an align output folder) and write ``out_dir/report.html`` atomically.

    Raises:
        InputError: ``out_dir`` is not the output folder of ``polish3d align``.
    """
    from polish3d.io.star import atomic_write_text

    run = gather(out_dir)
    return atomic_write_text(Path(out_dir) / "report.html", build_report(run))


def register_cli(app, run) -> None:
    """Add ``polish3d report OUT`` to the typer ``app``."""

    @app.command("report")
    def report_cmd(
        out: Annotated[str, typer.Argument(help="Output folder (--o) of `polish3d align`.")],
    ) -> None:
        """Write OUT/report.html: plots and tables of what an align run changed."""

        def go():
            path = write_report(out)
            typer.echo(f"wrote {path}")

        run(go)
