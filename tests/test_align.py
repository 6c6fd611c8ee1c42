"""`polish3d align` end to end on tiny simulated data: simulate → align → score (CLI and files)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from polish3d.cli import app
from polish3d.score import score
from polish3d.simulate import SimulationConfig, simulate

TINY = SimulationConfig(
    n_tomograms=1, n_particles=16, n_unlisted=2, image_size_px=(192, 192), tilt_min_deg=-30,
    tilt_max_deg=30, tilt_step_deg=6, tomo_thickness_px=48, pixel_size_ang=16.0, box_px=32,
    shift_err_px=2.0, position_err_px=1.5, seed=3,
)
FLAGS = ["--b", "32", "--r", "8", "--j", "2"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    simulate(TINY, root / "sim")
    return root / "sim"


def _align(project, out, *extra, opt="optimisation_set.star"):
    cwd = os.getcwd()
    os.chdir(project)
    try:
        res = CliRunner().invoke(app, ["align", "--i", opt, *FLAGS, "--o", out, *extra])
        assert res.exit_code == 0, res.output
        return score(f"{out}/optimisation_set.star", "truth/optimisation_set.star"), score(
            opt, "truth/optimisation_set.star"
        )
    finally:
        os.chdir(cwd)


def test_simulate_align_score_improves(project):
    after, before = _align(project, "Polish/job001")
    assert before["overall"]["rms"] > 2.0
    assert after["overall"]["rms"] < 0.3
    assert after["overall"]["p95"] < 0.5
    out = project / "Polish/job001"
    for f in ("optimisation_set.star", "tomograms.star", "particles.star", "note.txt", "metrics.json",
              "polish3d.log", "RELION_OUTPUT_NODES.star", "tilt_series/TS_01.star"):
        assert (out / f).exists(), f
    m = json.loads((out / "metrics.json").read_text())["tomograms"]["TS_01"]
    assert len(m["per_tilt_cc_first"]) == 11 and m["outer"]
    assert not list(out.rglob("*.tmp"))


def test_same_inputs_same_outputs(project):
    _align(project, "Polish/jobA")
    _align(project, "Polish/jobB")
    for f in ("tilt_series/TS_01.star", "particles.star"):
        assert (project / "Polish/jobA" / f).read_text() == (project / "Polish/jobB" / f).read_text()


def test_perfect_input_stays_perfect(tmp_path):
    cfg = SimulationConfig(**{**TINY.__dict__, "snr": 50.0, "n_unlisted": 0})
    sim = tmp_path / "sim"
    simulate(cfg, sim)
    shutil.copy(sim / "truth/optimisation_set.star", sim / "truth_input.star")
    after, before = _align(sim, "Polish/job001", opt="truth_input.star")
    assert before["overall"]["rms"] == 0.0
    assert after["overall"]["rms"] < 0.05


def test_large_tilt_shift_recovered(tmp_path):
    """A whole tilt 12 px off (beyond --r 8) is found by the per-tilt shift search."""
    from polish3d.io.star import read_star, write_star

    sim = tmp_path / "sim"
    simulate(TINY, sim)
    path = sim / "tilt_series/TS_01.star"
    blocks = read_star(path)
    t = blocks["TS_01"].copy()
    t.loc[[2, 7], "rlnTomoXShiftAngst"] += 12.0 * 16.0
    blocks["TS_01"] = t
    write_star(path, blocks)
    after, before = _align(sim, "Polish/job001")
    per_tilt = np.asarray(after["tomograms"]["TS_01"]["per_tilt_rms"]) if "tomograms" in after else None
    assert before["overall"]["max"] > 12.0
    assert after["overall"]["max"] < 1.0, per_tilt


def test_only_do_unfinished_skips(project):
    _align(project, "Polish/jobC")
    cwd = os.getcwd()
    os.chdir(project)
    try:
        res = CliRunner().invoke(app, ["align", "--i", "optimisation_set.star", *FLAGS, "--o", "Polish/jobC",
                                       "--only_do_unfinished"])
    finally:
        os.chdir(cwd)
    assert res.exit_code == 0
    assert "already finished" in (project / "Polish/jobC/polish3d.log").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--b", "0"], "--b"),
        (["--b", "32", "--aniso", "--per_tilt_aniso"], "--per_tilt_aniso"),
        (["--b", "32", "--shift_only", "--motion"], "--shift_only"),
        (["--b", "32", "--r", "20"], "--r"),
    ],
)
def test_bad_flags_exit_2(project, flags, message):
    cwd = os.getcwd()
    os.chdir(project)
    try:
        res = CliRunner().invoke(app, ["align", "--i", "optimisation_set.star", *flags, "--o", "Polish/bad"])
    finally:
        os.chdir(cwd)
    assert res.exit_code == 2
    assert message in res.output


def test_fsc_check_reports_half_map_fsc_before_and_after(project):
    """--fsc_check: the half maps from the refined geometry reach a finer resolution than those
    from the input; metrics.json and the report carry both curves."""
    _align(project, "Fsc/", "--fsc_check")
    metrics = json.loads((project / "Fsc" / "metrics.json").read_text())
    fsc = metrics["fsc"]
    assert len(fsc["before"]) == len(fsc["after"]) == len(fsc["shell"]) == 32 // 2 + 1
    assert np.isfinite(fsc["resolution_before_ang"]) and np.isfinite(fsc["resolution_after_ang"])
    assert fsc["resolution_after_ang"] < fsc["resolution_before_ang"]
    assert np.mean(fsc["after"][2:10]) > np.mean(fsc["before"][2:10])
    html = (project / "Fsc" / "report.html").read_text()
    assert 'alt="Half-map FSC, before and after"' in html or "Half-map FSC, before and after\" src" in html
