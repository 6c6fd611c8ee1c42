"""``polish3d report``: the HTML page of an align output folder.

The "align outputs" are built from tiny simulated sets: the simulator's ``truth/`` folder is
laid out as an align output (``tomograms.star``, ``tilt_series/``, ``particles.star``,
``motion.star``; paths relative to the project folder), so the refined − input changes the
report shows are the known simulated errors, checked here against the raw STAR columns.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from polish3d import report
from polish3d.cli import app
from polish3d.io.star import read_star
from polish3d.simulate import SimulationConfig, simulate

PX = 8.0


class _Page(HTMLParser):
    """Plots (``data-plot`` → base64 PNGs), "not computed" notes and the summary table rows."""

    def __init__(self):
        super().__init__()
        self.plots: list[tuple[str, str]] = []
        self.missing: list[str] = []
        self.failed: list[str] = []
        self.verdicts: list[str] = []
        self.rows: list[list[str]] = []
        self._in_summary = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and "data-plot" in a:
            self.plots.append((a["data-plot"], a["src"]))
        if tag == "p" and "data-missing" in a:
            self.missing.append(a["data-missing"])
        if tag == "p" and "data-failed" in a:
            self.failed.append(a["data-failed"])
        if tag == "p" and "data-verdict" in a:
            self.verdicts.append(a["data-verdict"])
        if tag == "table" and a.get("id") == "summary":
            self._in_summary = True
        if self._in_summary and tag == "tr":
            self.rows.append([])
        if self._in_summary and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_summary = False
        if self._cell is not None and tag in ("td", "th"):
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def _sim(folder: Path, **kw) -> Path:
    cfg = SimulationConfig(n_tomograms=2, n_particles=6, n_unlisted=0, tilt_min_deg=-45, tilt_max_deg=45,
                           tilt_step_deg=15, box_px=32, image_size_px=(96, 96), tomo_thickness_px=32,
                           pixel_size_ang=PX, seed=3, **kw)
    simulate(cfg, folder)
    return folder


def _metrics(names, n_tilts, *, extra=None) -> dict:
    rng = np.random.default_rng(1)
    tomos = {}
    for k, name in enumerate(names):
        tomos[name] = {
            "n_particles": 6, "n_tilts": n_tilts, "seconds": 3.25 + k,
            "displacement_rms_px": 1.5 + k, "displacement_max_px": 4.0 + k,
            "per_tilt_displacement_rms_px": rng.uniform(0.5, 2, n_tilts).tolist(),
            "per_tilt_cc_first": [None] + rng.uniform(1, 2, n_tilts - 1).tolist(),  # NaN → null
            "per_tilt_cc_last": rng.uniform(2, 3, n_tilts).tolist(),
        }
    for name, more in (extra or {}).items():
        tomos[name].update(more)
    return {"seconds": 12.5, "tomograms": tomos, "skipped": []}


def _align_output(folder: Path, metrics: dict, command: str | None) -> Path:
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if command:
        (folder / "note.txt").write_text(f"Command:\n\n{command}\n")
    (folder / "polish3d.log").write_text("2026-01-01 00:00:00,000 WARNING   TS_01: something to see\n")
    return folder


_TILT_VERDICT = {3: "rolled_back", 5: "no_signal"}
VALIDATION = {  # the format the held-out validation writes into metrics["tomograms"][name]
    "verdict": "improved",
    "tilts": [{"row": j, "cc_input": 1.0 + 0.1 * j, "cc_refined": 1.2 + 0.1 * j - 0.4 * (j == 3),
               "z": -2.5 if j == 3 else 3.0 + j, "signal_z": 0.4 if j == 5 else 9.0,
               "verdict": _TILT_VERDICT.get(j, "improved" if j % 2 else "kept")} for j in range(7)],
    "rolled_back_tilts": [3], "no_signal_tilts": [5], "weak_particles": [1, 4],
    "messages": ["tilt row 5 has no usable signal: exclude it (e.g. relion_tomo_exclude_tilt_images)",
                 "2 particle(s) never rise above noise: consider removing them"],
}
FSC = {"shell": list(range(17)), "frequency_per_ang": (np.arange(17) / (32 * PX)).tolist(),
       "before": np.exp(-np.arange(17) / 5).tolist(), "after": np.exp(-np.arange(17) / 7).tolist(),
       "resolution_before_ang": 30.1, "resolution_after_ang": 24.6}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``full``: motion, deformation, validation and FSC; ``plain``: none of these;
    ``orphan``: no note.txt (input geometry not locatable)."""
    root = tmp_path_factory.mktemp("report")
    a = _sim(root / "a", s_vel=0.5, deformation_amplitude_px=1.0)
    names = ["TS_01", "TS_02"]
    metrics = _metrics(names, 7, extra={"TS_01": {"validation": VALIDATION, "flags": ["tilt 3: no signal"]}})
    metrics["fsc"] = FSC
    full = _align_output(a / "truth", metrics, "polish3d align --i optimisation_set.star --b 32 --o truth/")
    b = _sim(root / "b")
    command = "polish3d align --i optimisation_set.star --o truth/"
    plain = _align_output(b / "truth", _metrics(names, 7), command)
    orphan = _align_output(b, _metrics(names, 7), None)  # the input set itself, nothing recorded
    digest = _digest(a)
    written = {k: report.write_report(v) for k, v in (("full", full), ("plain", plain), ("orphan", orphan))}
    assert _digest(a) == digest  # nothing but report.html written, inputs untouched
    assert written["full"] == full / "report.html"
    return {"full": full, "plain": plain, "orphan": orphan}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "report.html"}


def _png_pixels(src: str) -> np.ndarray:
    import matplotlib.image

    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    raw = base64.b64decode(src[len(prefix):], validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 5000
    return matplotlib.image.imread(io.BytesIO(raw), format="png")


def test_every_plot_present_and_not_blank(runs):
    path = runs["full"] / "report.html"
    page = _parse(path)
    kinds = [k for k, _ in page.plots]
    for kind in ("geometry", "per_tilt", "displacements", "trajectories", "deformation"):
        assert kinds.count(kind) == 2, kind  # one per tomogram
    assert kinds.count("validation") == 1 and kinds.count("fsc") == 1
    for kind, src in page.plots:
        pixels = _png_pixels(src)
        assert pixels.shape[0] > 150 and pixels.shape[1] > 300, kind
        assert pixels[..., :3].std() > 0.05, kind  # not a blank canvas
    assert page.missing == ["validation"]  # TS_02 has none
    text = path.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert "30.1 Å" in text and "24.6 Å" in text  # resolutions at 0.143
    assert "something to see" in text and "tilt 3: no signal" in text
    assert "1 tilt(s) rolled back on held-out data (input geometry kept): rows [3]" in text
    assert "1 tilt(s) without signal on held-out data (input geometry kept): rows [5]" in text


def _colour_pixels(pixels: np.ndarray, hex_colour: str, tol: float = 0.06) -> int:
    """How many pixels of an RGB(A) image are within ``tol`` of ``hex_colour``."""
    rgb = np.array([int(hex_colour[k:k + 2], 16) / 255 for k in (1, 3, 5)])
    return int(np.sum(np.all(np.abs(pixels[..., :3] - rgb) < tol, axis=-1)))


def test_validation_plot_marks_rolled_back_and_no_signal_tilts(runs, monkeypatch):
    from polish3d import report_figures as rf

    page = _parse(runs["full"] / "report.html")
    src = dict(page.plots)["validation"]
    pixels = _png_pixels(src)
    for verdict in ("rolled_back", "no_signal", "improved", "kept"):
        assert _colour_pixels(pixels, rf.COLOURS[verdict]) > 20, verdict  # markers in their colours
    assert page.failed == []
    drawn = []  # the figure itself: two panels, the legend names every verdict and the shading
    monkeypatch.setattr(rf, "_png", lambda fig: drawn.append(fig) or "")
    rf.fig_validation(report.gather(runs["full"]).tomograms[0])
    cc_axes, z_axes = drawn[0].axes
    labels = [t.get_text() for t in cc_axes.get_legend().get_texts()]
    assert "rolled back (input geometry restored)" in labels and "no signal (input geometry kept)" in labels
    assert {"refined: improved", "refined: kept", "refined: rolled back", "refined: no signal",
            "input geometry"} <= set(labels)
    assert z_axes.get_ylabel().startswith("z") and len(z_axes.patches) == 7  # one bar per tilt


def test_suggested_actions_and_weak_particles_are_prominent(runs):
    text = (runs["full"] / "report.html").read_text()
    page = _parse(runs["full"] / "report.html")
    top = text[: text.index('<h2 id="tomo-')]  # before the first tomogram's section
    assert 'id="actions"' in top and "Suggested actions" in top
    for msg in VALIDATION["messages"]:
        assert f"<b>TS_01</b>: {msg.replace(chr(39), '&#x27;')}" in top
    assert page.verdicts == ["improved"]
    assert 'data-weak="2"' in text and "2 weak particle(s)" in text and ": 1, 4</p>" in text


def test_odd_validation_records_still_render(runs):
    run = report.gather(runs["full"])
    run.tomograms[0].metrics["validation"] = {"verdict": "off", "tilts": []}
    run.tomograms[1].metrics["validation"] = {
        "verdict": "reference_mismatch", "messages": "check the reference", "weak_particles": 5,
        "tilts": [{"row": 99, "verdict": "rolled back"}, {"row": None}, {"cc_input": 1.0}, "junk"],
    }
    page = _Page()
    page.feed(report.build_report(run))
    assert page.failed == [] and page.verdicts == ["off", "reference_mismatch"]
    assert [k for k, _ in page.plots].count("validation") == 1  # TS_02: drawn against the row
    assert "validation" in page.missing  # TS_01: turned off
    head, *rows = page.rows
    assert rows[0][7] == "off" and rows[1][7] == "reference mismatch; tilts: 1 rolled back"


def _columns(star: Path, labels) -> np.ndarray:
    table = next(iter(read_star(star).values()))
    return np.stack([table[c].to_numpy(float) for c in labels], -1)


def test_geometry_changes_are_refined_minus_input(runs):
    run = report.gather(runs["full"])
    project = runs["full"].parent
    assert "note.txt" in run.inputs
    for d in run.tomograms:
        labels = ("rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot", "rlnTomoXShiftAngst", "rlnTomoYShiftAngst")
        out = _columns(project / "truth" / "tilt_series" / f"{d.name}.star", labels)
        inp = _columns(project / "tilt_series" / f"{d.name}.star", labels)
        np.testing.assert_allclose(d.d_angle_deg, out[:, :3] - inp[:, :3], atol=1e-6)
        np.testing.assert_allclose(d.d_shift_px, (out[:, 3:] - inp[:, 3:]) / PX, atol=1e-6)
        assert np.abs(d.d_shift_px).max() > 0.5  # the simulated errors are there to be seen
        assert d.disp2d_px.shape == (6 * 7,) and np.all(np.isfinite(d.disp2d_px))
        assert d.trajectories_px.shape == (6, 7, 3) and np.abs(d.trajectories_px).max() > 0


def test_summary_table_one_row_per_tomogram(runs):
    page = _parse(runs["full"] / "report.html")
    head, *rows = page.rows
    assert head[:4] == ["Tomogram", "Particles", "Tilts", "Time (s)"]
    assert [r[0] for r in rows] == ["TS_01", "TS_02"]
    project = runs["full"].parent
    labels = ("rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst")
    for k, r in enumerate(rows):
        name = f"TS_0{k + 1}"
        assert r[1:5] == ["6", "7", f"{3.25 + k:.1f}", f"{1.5 + k:.2f}"]
        assert r[5] == f"{4.0 + k:.2f}"
        # 3D position change: truth − input positions, from the raw columns (origins are zero)
        tables = [read_star(p)["particles"] for p in (project / "truth" / "particles.star",
                                                       project / "particles.star")]
        sel = [t[t["rlnTomoName"] == name].set_index("rlnTomoParticleName") for t in tables]
        assert all(np.all(s[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy() == 0)
                   for s in sel)
        diff = sel[0][list(labels)] - sel[1].loc[sel[0].index, list(labels)]
        rms = np.sqrt(np.mean(np.sum((diff.to_numpy(float) / PX) ** 2, 1)))
        assert r[6] == f"{rms:.2f}" and rms > 0.5
    assert rows[0][7] == "improved; tilts: 1 rolled back, 1 no signal" and rows[1][7] == "not computed"
    assert rows[0][8].startswith("4: tilt 3: no signal") and rows[1][8] == "none"


def test_absent_data_says_not_computed(runs):
    page = _parse(runs["plain"] / "report.html")
    assert sorted(set(page.missing)) == ["deformation", "fsc", "trajectories", "validation"]
    assert page.missing.count("trajectories") == 2
    assert [k for k, _ in page.plots].count("geometry") == 2
    text = (runs["plain"] / "report.html").read_text()
    assert "not computed: no FSC in metrics.json" in text
    page = _parse(runs["orphan"] / "report.html")
    assert page.missing.count("geometry") == 2 and page.missing.count("displacements") == 2
    assert [k for k, _ in page.plots].count("per_tilt") == 2  # from metrics.json alone
    assert "no input recorded" in (runs["orphan"] / "report.html").read_text()


def test_cli_exit_codes(runs, tmp_path):
    target = runs["plain"] / "report.html"
    target.unlink(missing_ok=True)
    res = CliRunner().invoke(app, ["report", str(runs["plain"])])
    assert res.exit_code == 0, res.output
    assert target.is_file() and str(target) in res.output
    empty = tmp_path / "not_align"
    empty.mkdir()
    res = CliRunner().invoke(app, ["report", str(empty)])
    assert res.exit_code == 2
    assert str(empty) in res.output and "metrics.json" in res.output and "polish3d align" in res.output
    assert not (empty / "report.html").exists()
    (empty / "metrics.json").write_text("{}")
    (empty / "tomograms.star").write_text("data_\n")
    res = CliRunner().invoke(app, ["report", str(empty)])
    assert res.exit_code == 2 and "'tomograms'" in res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "absent")])
    assert res.exit_code == 2 and "not a folder" in res.output


def test_unreadable_input_still_renders(runs, tmp_path):
    import shutil

    project = shutil.copytree(runs["plain"].parent, tmp_path / "project")
    (project / "truth" / "note.txt").write_text("Command:\n\npolish3d align --i particles.star --o truth/\n")
    page = _parse(report.write_report(project / "truth"))
    assert page.missing.count("geometry") == 2 and page.missing.count("displacements") == 2
    assert [k for k, _ in page.plots].count("per_tilt") == 2
    assert "input geometry not readable" in (project / "truth" / "report.html").read_text()


def test_report_of_a_real_align_run(tmp_path, monkeypatch):
    """A tiny real ``align`` run, reported from another working folder: the 2D displacements the
    report computes from the written STAR files equal those the refiner measured internally."""
    from polish3d.config import RefineConfig
    from polish3d.driver import AlignInputs, align
    from polish3d.refine.tomogram import AlignConfig

    project = tmp_path / "project"
    simulate(SimulationConfig(n_tomograms=1, n_particles=6, n_unlisted=0, tilt_min_deg=-45, tilt_max_deg=45,
                              tilt_step_deg=15, box_px=32, image_size_px=(96, 96), tomo_thickness_px=32,
                              pixel_size_ang=PX, seed=5), project)
    monkeypatch.chdir(project)
    command = "polish3d align --i optimisation_set.star --b 32 --r 6 --j 1 --o Polish/job001/"
    align(AlignInputs(i="optimisation_set.star"), "Polish/job001/", RefineConfig(AlignConfig(box=32, r=6.0)),
          command_line=command)
    monkeypatch.chdir(tmp_path)
    out = project / "Polish" / "job001"
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    page = _parse(out / "report.html")
    # (the held-out validation is on by default: its plot is there too)
    assert sorted(k for k, _ in page.plots) == ["displacements", "geometry", "per_tilt", "validation"]
    for _, src in page.plots:
        assert _png_pixels(src)[..., :3].std() > 0.05
    m = json.loads((out / "metrics.json").read_text())["tomograms"]["TS_01"]
    d = report.gather(out).tomograms[0]
    assert np.sqrt(np.mean(d.disp2d_px**2)) == pytest.approx(m["displacement_rms_px"], rel=1e-5)
    assert d.disp2d_px.max() == pytest.approx(m["displacement_max_px"], rel=1e-5)
    assert page.rows[1][:5] == ["TS_01", "6", "7", f"{m['seconds']:.1f}", f"{m['displacement_rms_px']:.2f}"]
