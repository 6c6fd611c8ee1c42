"""The public Python API (``polish3d.api``, re-exported by ``polish3d``) on a tiny simulation.

One simulated tilt series (box 32, 7 tilts, 128² images, 10 particles) is made once per module;
the array layer (:func:`polish3d.refine_tilt_series`) and the file layer (:func:`polish3d.align`)
are run on it and scored against the truth.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

import polish3d
from polish3d import api
from polish3d.score import project_particles

TINY = dict(
    n_tomograms=1,
    n_particles=10,
    n_unlisted=0,
    box_px=32,
    image_size_px=128,
    tilt_min_deg=-30.0,
    tilt_max_deg=30.0,
    tilt_step_deg=10.0,
    tomo_thickness_px=48,
    pixel_size_ang=16.0,
    particle_diameter_ang=300.0,
    seed=1,
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return polish3d.simulate(tmp_path_factory.mktemp("api") / "sim", **TINY)


@pytest.fixture(scope="module")
def refined(sim):
    data = polish3d.read_optimisation_set(sim.optimisation_set)
    name = data.names[0]
    events = []
    res = polish3d.refine_tilt_series(
        data.tilt_series[name], data.particles[name], data.stack(name), data.half_maps(),
        box=32, r=8, mask=data.mask(), fsc=data.fsc(), outer=2,
        progress=lambda event, **k: events.append(event),
    )
    return data, res, events


def _rms(ts, parts, ts_true, parts_true) -> float:
    d = project_particles(ts, parts) - project_particles(ts_true, parts_true)
    return float(np.sqrt(np.mean(np.sum(d**2, -1))))


def test_public_names():
    for name in polish3d.__all__:
        assert getattr(polish3d, name) is not None, name
    # the functions keep their names even though submodules of the same names exist
    assert polish3d.align is api.align
    assert polish3d.simulate is api.simulate
    assert polish3d.score is api.score
    assert polish3d.align_fiducials is polish3d.fiducials.align_fiducials
    score_module = importlib.import_module("polish3d.score")  # importing the submodule …
    assert score_module is not api.score and polish3d.score is api.score  # … keeps the function
    assert polish3d.AlignConfig(box=32).r == 20.0
    assert polish3d.RefineConfig.build(32, r=8).tomogram == polish3d.AlignConfig(box=32, r=8.0)


def test_import_is_light_and_the_cli_limits_blas_before_numpy_loads():
    code = ("import os, sys, polish3d\n"
            "assert 'numpy' not in sys.modules and 'jax' not in sys.modules, 'import polish3d is heavy'\n"
            "assert 'OPENBLAS_NUM_THREADS' not in os.environ, 'import polish3d sets thread limits'\n"
            "import polish3d.cli\n"
            "assert os.environ['OPENBLAS_NUM_THREADS'] == '1'\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_simulate(sim):
    assert sim.optimisation_set.is_file() and sim.truth_optimisation_set.is_file()
    ts = sim.tilt_series[0]
    assert ts.n_tilts == 7 and ts.image_size_px == (128, 128)
    assert sim.particles[ts.name].n_particles == 10


def test_simulate_rejects_unknown_option(tmp_path):
    with pytest.raises(TypeError, match="n_particle"):
        polish3d.simulate(tmp_path, n_particle=3)


def test_read_optimisation_set(sim):
    data = polish3d.read_optimisation_set(sim.optimisation_set)
    assert data.names == ["TS_01"]
    ts, parts = data.tilt_series["TS_01"], data.particles["TS_01"]
    assert ts.projections.shape == (7, 4, 4)
    assert parts.positions_px.shape == (10, 3) and parts.rotations.shape == (10, 3, 3)
    assert data.stack("TS_01").shape == (7, 128, 128)
    h1, h2 = data.half_maps()
    assert h1.shape == h2.shape == (32, 32, 32) and data.mask().shape == (32, 32, 32)
    idx, fsc = data.fsc()
    assert len(idx) == len(fsc) and fsc[0] == pytest.approx(1.0, abs=1e-3)
    # the records are what the simulator wrote (nominal geometry)
    np.testing.assert_allclose(ts.projections, sim.tilt_series[0].projections, atol=1e-4)


def test_read_optimisation_set_missing_file(tmp_path):
    with pytest.raises(polish3d.InputError, match="nope.star"):
        polish3d.read_optimisation_set(tmp_path / "nope.star")


def test_refine_tilt_series_arrays(sim, refined, tmp_path):
    data, res, events = refined
    assert isinstance(res, polish3d.TomogramResult)
    assert res.projections.shape == (7, 4, 4) and res.positions_px.shape == (10, 3)
    assert res.status in ("converged", "not_converged")
    assert len(res.metrics["outer"]) >= 1 and np.isfinite(res.metrics["displacement_rms_px"])
    assert "outer" in events and "coarse_shift" in events
    # the refined geometry projects the particles closer to the truth than the input
    name = data.names[0]
    ts_true = sim.truth_tilt_series[0]
    parts_true = sim.truth_particles[name]
    ts_in, parts_in = data.tilt_series[name], data.particles[name]
    before = _rms(ts_in, parts_in, ts_true, parts_true)
    after = _rms(ts_in.replace(projections=res.projections),
                 parts_in.replace(positions_px=res.positions_px), ts_true, parts_true)
    assert after < 0.8 * before, (before, after)


def test_refine_tilt_series_checks_inputs(refined):
    data, _, _ = refined
    ts, parts = data.tilt_series["TS_01"], data.particles["TS_01"]
    halves = data.half_maps()
    with pytest.raises(polish3d.InputError, match="stack"):
        polish3d.refine_tilt_series(ts, parts, np.zeros((6, 128, 128), np.float32), halves, box=32, r=8)
    with pytest.raises(polish3d.InputError, match="larger than the box"):
        polish3d.refine_tilt_series(ts, parts, data.stack("TS_01"), halves, box=16, r=4)
    with pytest.raises(TypeError, match="unknown option"):
        polish3d.refine_tilt_series(ts, parts, data.stack("TS_01"), halves, box=32, r=8, rr=3)


def test_align_files(sim, refined, tmp_path):
    out = polish3d.align(sim.optimisation_set, tmp_path / "aligned", box=32, r=8, outer=2)
    assert isinstance(out, polish3d.AlignOutcome)
    assert out.status in ("ok", "not_converged")
    assert out.optimisation_set == tmp_path / "aligned" / "optimisation_set.star"
    for f in ("tomograms.star", "particles.star", "tilt_series/TS_01.star", "metrics.json"):
        assert (tmp_path / "aligned" / f).is_file(), f
    assert not (tmp_path / "aligned" / "RELION_JOB_EXIT_SUCCESS").exists()
    assert set(out.results) == {"TS_01"} and out.skipped == []
    assert out.results["TS_01"].status in ("converged", "not_converged")
    before = polish3d.score(sim.optimisation_set, sim.truth_optimisation_set)
    after = polish3d.score(out.optimisation_set, sim.truth_optimisation_set)
    assert after.rms_px < 0.8 * before.rms_px
    # the array layer and the file layer give the same geometry
    _, res, _ = refined
    # (identical up to float32 rounding amplified by the optimiser: well below 0.01 px)
    np.testing.assert_allclose(out.results["TS_01"].projections, res.projections, atol=1e-2)


def test_align_with_inputs_and_resume(sim, tmp_path):
    data = polish3d.read_optimisation_set(sim.optimisation_set)
    inputs = polish3d.AlignInputs(
        p=str(data.files.particles_file), t=str(data.files.tomograms_file),
        ref1=str(data.files.ref1), ref2=str(data.files.ref2),
    )
    first = polish3d.align(inputs, tmp_path / "a", box=32, r=8, outer=1, shift_only=True)
    assert first.results["TS_01"].positions_px is None  # shift-only: positions unchanged
    again = polish3d.align(inputs, tmp_path / "a", box=32, r=8, outer=1, shift_only=True,
                           only_do_unfinished=True)
    assert again.skipped == ["TS_01"]


def test_align_options_are_validated(sim, tmp_path):
    with pytest.raises(TypeError, match="unknown option"):
        polish3d.align(sim.optimisation_set, tmp_path, box=32, radius=8)
    with pytest.raises(polish3d.InputError, match="even"):
        polish3d.align(sim.optimisation_set, tmp_path, box=33)
    with pytest.raises(polish3d.InputError, match="shift_only"):
        polish3d.align(sim.optimisation_set, tmp_path, box=32, r=8, shift_only=True, motion=True)
    with pytest.raises(polish3d.InputError, match="r 20"):
        polish3d.align(sim.optimisation_set, tmp_path, box=32)  # --r 20 does not fit in box 32


def test_config_argument_and_keywords_build_the_same_run(sim, tmp_path):
    config = polish3d.RefineConfig(polish3d.AlignConfig(box=32, r=8, outer=1, shift_only=True))
    assert config == polish3d.RefineConfig.build(32, r=8, outer=1, shift_only=True)
    with pytest.raises(TypeError, match="given with a RefineConfig"):
        polish3d.align(sim.optimisation_set, tmp_path, config, outer=2)
    with pytest.raises(TypeError, match="box"):
        polish3d.align(sim.optimisation_set, tmp_path, r=8)


def test_score_identity_and_result(sim):
    s = polish3d.score(sim.truth_optimisation_set, sim.truth_optimisation_set)
    assert isinstance(s, polish3d.ScoreResult) and s.status == "ok"
    assert s.rms_px == 0.0 and s.median_px == 0.0
    assert s.overall["n"] == 10 * 7
    assert "TS_01" in s.table() and set(s.as_dict()) >= {"overall", "tomograms"}


def test_set_device():
    assert polish3d.set_device("cpu") == "cpu"
    with pytest.raises(polish3d.InputError, match="expected"):
        polish3d.set_device("metal")
    with pytest.raises(polish3d.InputError):
        polish3d.set_device("tpu")  # no TPU here (and JAX is already running on the CPU)
    assert polish3d.set_device("cpu") == "cpu"


def test_align_fiducials_reexport():
    from polish3d.fiducials import simulate_bead_tracks

    tracks, truth = simulate_bead_tracks(n_beads=12, n_tilts=9, noise_px=0.1, seed=3,
                                         image_size_px=(512, 512), tomo_size_px=(512, 512, 128))
    res = polish3d.align_fiducials(tracks, truth["nominal_tilt_deg"], truth["tilt_axis_deg"], (512, 512),
                                   tomo_size_px=(512, 512, 128))
    assert isinstance(res, polish3d.FiducialResult)
    assert res.projections.shape == (9, 4, 4) and res.sigma_px < 0.5
