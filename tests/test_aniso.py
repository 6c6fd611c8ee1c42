"""Image distortion (anisotropic magnification and skew): ``--aniso`` / ``--per_tilt_aniso``.

The forward model against NumPy, the polar decomposition and the STAR round trip, the gauge
directions, the stage-2 update, the simulator's distortion, the flags, and a small simulated set
with 1 % anisotropic magnification per tilt that ``--per_tilt_aniso`` recovers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from polish3d import geometry as geo
from polish3d.cli import app
from polish3d.config import OptionError, RefineConfig
from polish3d.io.relion.tilt_tables import encode_projections, read_projections
from polish3d.io.star import read_star, write_star
from polish3d.refine import forward, optimise, stage2

FRAME = {"pixel_size_ang": 10.0, "image_size_px": (300, 260), "tomo_size_px": (300, 260, 81)}


def _rigid(rng, f: int) -> np.ndarray:
    return geo.projection_from_euler(rng.normal(0, 2, f), np.linspace(-60, 60, f), 85 + rng.normal(0, 1, f),
                                     rng.normal(0, 30, f), rng.normal(0, 30, f), **FRAME)


def _distortions(rng, f: int, percent: float = 2.0) -> np.ndarray:
    a, s = (0.01 * percent * rng.uniform(-1, 1, f) for _ in range(2))
    return 1.03 * geo.distortion_matrix(a, s)  # an isotropic part too (e.g. from `polish3d fiducials`)


def test_forward_model_with_distortion_matches_numpy():
    rng = np.random.default_rng(0)
    f, n = 5, 7
    rigid, d = _rigid(rng, f), _distortions(rng, f)
    points = rng.uniform(0, 250, (n, f, 3))
    u, depth = forward.predict_host(geo.compose_distortion(rigid, d, FRAME["image_size_px"]), points)
    c = np.array([150.0, 130.0])  # (⌊W/2⌋, ⌊H/2⌋)
    for j in range(f):
        for i in range(n):
            x = np.append(points[i, j], 1.0)
            u_rigid = rigid[j, :2] @ x
            np.testing.assert_allclose(u[i, j], c + d[j] @ (u_rigid - c), atol=1e-9)
            np.testing.assert_allclose(depth[i, j], rigid[j, 2] @ x, atol=1e-9)
    # the traceable twin used inside the objective
    with_jax = forward.distort(rigid.astype(np.float32), d.astype(np.float32), c.astype(np.float32))
    np.testing.assert_allclose(np.asarray(with_jax), geo.compose_distortion(rigid, d, FRAME["image_size_px"]),
                               rtol=1e-5, atol=1e-3)


def test_split_is_the_polar_decomposition_and_leaves_rotations_alone():
    rng = np.random.default_rng(1)
    rigid, d = _rigid(rng, 9), _distortions(rng, 9)
    d_back, rigid_back = geo.split_distortion(geo.compose_distortion(rigid, d, FRAME["image_size_px"]),
                                              FRAME["image_size_px"])
    np.testing.assert_allclose(d_back, d, atol=1e-12)
    np.testing.assert_allclose(rigid_back, rigid, atol=1e-10)
    d_id, same = geo.split_distortion(rigid, FRAME["image_size_px"])
    assert np.array_equal(d_id, np.broadcast_to(np.eye(2), d_id.shape)) and np.array_equal(same, rigid)
    # the Euler columns of a distorted matrix are those of its rotation, the shifts those of the
    # projected tomogram centre
    p = geo.compose_distortion(rigid, d, FRAME["image_size_px"])
    e_p, e_r = geo.projection_to_euler(p, **FRAME), geo.projection_to_euler(rigid, **FRAME)
    for key in ("rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot"):
        np.testing.assert_allclose(e_p[key], e_r[key], atol=1e-9)
    centre = np.array([150.0, 130.0, 40.0, 1.0])
    np.testing.assert_allclose(e_p["rlnTomoXShiftAngst"], ((p @ centre)[:, 0] - 150) * 10.0, atol=1e-9)


def test_star_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    rigid, d = _rigid(rng, 6), _distortions(rng, 6)
    p = geo.compose_distortion(rigid, d, FRAME["image_size_px"])
    table = encode_projections(pd.DataFrame({"rlnMicrographPreExposure": np.arange(6.0)}), p, **FRAME)
    assert "rlnTomoProjX" in table.columns  # a distorted matrix is written whole
    write_star(tmp_path / "ts.star", {"TS_01": table})
    back = read_projections(read_star(tmp_path / "ts.star")["TS_01"], "ts.star", **FRAME)
    d_back, rigid_back = geo.split_distortion(back, FRAME["image_size_px"])
    np.testing.assert_allclose(d_back, d, atol=1e-9)
    np.testing.assert_allclose(rigid_back[:, :3, :3], rigid[:, :3, :3], atol=1e-9)
    np.testing.assert_allclose(rigid_back[:, :3, 3], rigid[:, :3, 3], atol=1e-7)


def test_gauge_of_a_single_axis_series():
    """A stretch along the tilt axis is a gauge for one distortion per series; per tilt, the two
    shears that tilt with the beam are too (3 directions)."""
    f, axis_deg = 21, 85.0
    rot = geo.projection_from_euler(np.zeros(f), np.linspace(-60, 60, f), np.full(f, axis_deg), np.zeros(f),
                                    np.zeros(f), **FRAME)[:, :3, :3]
    series = stage2.aniso_gauge_basis(rot, "series")
    assert series.shape == (1, 2)
    # the tomogram y axis (the tilt axis) lies at ZRot + 90° in the image: (a, s) ∝ (cos 2α, sin 2α)
    alpha = np.deg2rad(axis_deg + 90.0)
    assert abs(abs(series[0] @ [np.cos(2 * alpha), np.sin(2 * alpha)]) - 1.0) < 1e-9
    per_tilt = stage2.aniso_gauge_basis(rot, "tilt")
    assert per_tilt.shape == (3, 2 * f)
    assert stage2.aniso_gauge_basis(rot, "tilt", angles_free=False).shape == (1, 2 * f)


def test_stage2_update_keeps_the_distortion():
    rng = np.random.default_rng(3)
    f, n = 7, 16
    p = geo.compose_distortion(_rigid(rng, f), _distortions(rng, f), FRAME["image_size_px"])
    x = rng.uniform(60, 200, (n, 3))
    u0 = forward.predict_host(p, np.broadcast_to(x[:, None], (n, f, 3)))[0]
    kw = dict(tomo_size_px=FRAME["tomo_size_px"], image_size_px=FRAME["image_size_px"], window_radius_px=4.0)
    options = optimise.StageOptions()
    for aniso in (None, "tilt"):
        data = stage2.build_data(p, x, u0, np.zeros((n, f, 9, 9)), np.ones((n, f)), aniso=aniso, **kw)
        params = stage2.initial_params(f, n, aniso=aniso)
        delta, _ = stage2.results_from_params(params, data, options, n, projections=p)
        # (the rigid update is computed in float32, as without distortion: ~1e-5 px in the shifts)
        np.testing.assert_allclose((delta @ p)[:, :, :3], p[:, :, :3], atol=1e-7)
        np.testing.assert_allclose((delta @ p)[:, :, 3], p[:, :, 3], atol=1e-4)
    # a change of (a, s) of tilt 2 off the gauge directions lands in that tilt's distortion exactly
    step = np.zeros((f, 2), np.float32)
    step[2] = (3.0, -2.0)
    basis = np.asarray(data["aniso_gauge"], np.float64)
    flat = step.ravel() - basis.T @ (basis @ step.ravel())
    params = dataclasses.replace(params, aniso=jnp.asarray(step))
    delta, _ = stage2.results_from_params(params, data, options, n, projections=p)
    expected = np.asarray(flat, np.float64).reshape(f, 2) * float(data["aniso_unit"])
    size = FRAME["image_size_px"]
    got = geo.split_distortion(delta @ p, size)[0] - geo.split_distortion(p, size)[0]
    np.testing.assert_allclose(got[:, 0, 0], expected[:, 0], atol=1e-7)
    np.testing.assert_allclose(got[:, 0, 1], expected[:, 1], atol=1e-7)
    np.testing.assert_allclose(got[:, 1, 1], -expected[:, 0], atol=1e-7)


def test_options_and_flags():
    assert RefineConfig.build(32, r=8.0, per_tilt_aniso=True).tomogram.per_tilt_aniso
    with pytest.raises(OptionError, match="tomogram.aniso and tomogram.per_tilt_aniso: give one"):
        RefineConfig.build(32, r=8.0, aniso=True, per_tilt_aniso=True)
    with pytest.raises(OptionError, match="tomogram.shift_only .* tomogram.aniso"):
        RefineConfig.build(32, r=8.0, aniso=True, shift_only=True)
    res = CliRunner().invoke(app, ["align", "--i", "none.star", "--b", "32", "--r", "8", "--aniso",
                                   "--per_tilt_aniso", "--o", "out"])
    assert res.exit_code == 2 and "--aniso and --per_tilt_aniso: give one" in res.output
    res = CliRunner().invoke(app, ["align", "--i", "none.star", "--b", "32", "--r", "8", "--per_tilt_aniso",
                                   "--shift_only", "--o", "out"])
    assert res.exit_code == 2 and "--shift_only refines only per-tilt shifts" in res.output
    assert "--per_tilt_aniso" in res.output


def test_simulator_records_the_distortion(tmp_path):
    from polish3d.simulate import SimulationConfig, check_config, simulate

    with pytest.raises(ValueError, match="--aniso_percent"):
        check_config(SimulationConfig(aniso_percent=-1.0))
    cfg = SimulationConfig(n_tomograms=1, n_particles=4, n_unlisted=0, image_size_px=(128, 128), box_px=32,
                           pixel_size_ang=16.0, tomo_thickness_px=48, tilt_min_deg=-30, tilt_max_deg=30,
                           tilt_step_deg=15, aniso_percent=1.0, series_aniso_percent=0.5, snr=0.0)
    sim = simulate(cfg, tmp_path / "sim")
    truth = np.load(sim.truth_npz)
    d = truth["TS_01/distortion_true"]
    stretch = np.hypot(0.5 * (d[:, 0, 0] - d[:, 1, 1]), d[:, 0, 1])
    assert d.shape == (5, 2, 2) and np.all((stretch > 0.004) & (stretch < 0.016))
    ts_true = sim.truth_tilt_series[0]
    np.testing.assert_allclose(geo.split_distortion(ts_true.projections, cfg.image_size_px)[0], d, atol=1e-12)
    table = read_star(sim.out_dir / "truth" / "tilt_series" / "TS_01.star")["TS_01"]
    assert "rlnTomoProjX" in table.columns  # the truth is written whole: the scorer reads it


@pytest.fixture(scope="module")
def simulated_sets(tmp_path_factory):
    """Two small sets (41 particles, 13 tilts of 192², box 32): 1 % anisotropic magnification per
    tilt, and none; what ``refine_tomogram`` takes for each."""
    from polish3d.io import mrc
    from polish3d.refine import tomogram
    from polish3d.simulate import SimulationConfig, simulate

    out = {}
    for percent in (1.0, 0.0):
        cfg = SimulationConfig(n_tomograms=1, n_particles=40, n_unlisted=2, image_size_px=(192, 192),
                               tilt_min_deg=-60, tilt_max_deg=60, tilt_step_deg=10, tomo_thickness_px=48,
                               pixel_size_ang=16.0, box_px=32, shift_err_px=2.0, position_err_px=1.5, seed=3,
                               aniso_percent=percent)
        sim = simulate(cfg, Path(tmp_path_factory.mktemp("aniso")) / "sim")
        stack = np.asarray(mrc.open_stack(sim.tilt_series[0].image_files[0][0]))
        halves = [np.asarray(mrc.read_map(sim.out_dir / f"reference/half{i}.mrc")[0]) for i in (1, 2)]
        refs, (idx, fsc) = tomogram.prepare_references(*halves, 32)
        env = tomogram.reference_envelope(idx, fsc, 32, cfg.pixel_size_ang)
        out[percent] = (sim, stack, refs, env)
    return out


def _refine(problem, **options):
    from polish3d.refine import tomogram
    from polish3d.score import project_particles

    sim, stack, refs, env = problem
    ts, parts = sim.tilt_series[0], sim.particles["TS_01"]
    config = tomogram.AlignConfig(box=32, r=6.0, **options)
    res = tomogram.refine_tomogram(ts, parts, stack, refs, env, config)
    u = project_particles(ts.replace(projections=res.projections),
                          parts.replace(positions_px=res.positions_px))
    u_true = project_particles(sim.truth_tilt_series[0], sim.truth_particles["TS_01"])
    return res, u, float(np.sqrt(np.mean(np.sum((u - u_true) ** 2, axis=-1))))


def test_per_tilt_aniso_recovers_the_distortion(simulated_sets):
    problem = simulated_sets[1.0]
    sim = problem[0]
    res, _, rms = _refine(problem, per_tilt_aniso=True)
    _, _, rms_rigid = _refine(problem)
    assert rms < 0.15 and rms < 0.4 * rms_rigid, (rms, rms_rigid)  # measured 0.090 and 0.41 px
    # D against the truth, up to the gauge directions (a stretch of the tomogram the data cannot see)
    size, p_true = sim.truth_tilt_series[0].image_size_px, sim.truth_tilt_series[0].projections
    d_est, d_true = (geo.split_distortion(p, size)[0] for p in (res.projections, p_true))

    def a_s(d):
        return np.stack([0.5 * (d[:, 0, 0] - d[:, 1, 1]), d[:, 0, 1]], -1).ravel()

    rigid_true = geo.split_distortion(p_true, size)[1]
    basis = stage2.aniso_gauge_basis(rigid_true[:, :3, :3], "tilt")
    diff = a_s(d_est) - a_s(d_true)
    off_gauge = diff - basis.T @ (basis @ diff)
    # measured: 0.0006 RMS against 0.0071 of the truth
    assert np.sqrt(np.mean(off_gauge**2)) < 0.25 * np.sqrt(np.mean(a_s(d_true) ** 2))
    assert res.metrics["distortion"]["max_aniso_percent"] > 0.5


def test_aniso_on_undistorted_data_changes_little(simulated_sets):
    problem = simulated_sets[0.0]
    _, u_default, rms_default = _refine(problem)
    res, u_aniso, rms_aniso = _refine(problem, aniso=True)
    moved = np.sqrt(np.mean(np.sum((u_aniso - u_default) ** 2, axis=-1)))
    # measured 0.014 px on this small set (520 pairs); benchmarks/bench_aniso.py: < 0.01 px on 200
    # particles × 41 tilts
    assert moved < 0.025, moved
    assert abs(rms_aniso - rms_default) < 0.01
    assert res.metrics["distortion"]["max_aniso_percent"] < 0.3
