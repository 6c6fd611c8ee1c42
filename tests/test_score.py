"""Scoring: zero for identical sets, gauge invariance, deformation models."""

import numpy as np
import pytest

from polish3d import geometry as geo
from polish3d.io import relion
from polish3d.model import Deformation
from polish3d.score import evaluate_deformation, rigid_align, score
from polish3d.simulate import SimulationConfig, simulate

CFG = SimulationConfig(
    n_tomograms=2,
    n_particles=6,
    n_unlisted=0,
    tilt_min_deg=-20.0,
    tilt_max_deg=20.0,
    tilt_step_deg=10.0,
    pixel_size_ang=12.0,
    box_px=32,
    image_size_px=(128, 128),
    tomo_thickness_px=40,
    particle_diameter_ang=180.0,
    seed=11,
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("score")
    return simulate(CFG, out), out


def _rot(ax, ay, az):
    return geo.rot_z(az) @ geo.rot_y(ay) @ geo.rot_x(ax)


def test_rigid_motion_of_truth_is_invisible(sim, tmp_path):
    res, out = sim
    g = np.eye(4)
    g[:3, :3] = _rot(3.0, -2.0, 5.0)
    g[:3, 3] = [4.0, -7.0, 2.5]
    ts_new = [
        ts.replace(projections=ts.projections @ np.linalg.inv(g)) for ts in res.truth_tilt_series
    ]
    parts = {
        k: p.replace(positions_px=p.positions_px @ g[:3, :3].T + g[:3, 3])
        for k, p in res.truth_particles.items()
    }
    opt = relion.write_new_optimisation_set(tmp_path / "moved", ts_new, parts)
    s = score(opt, out / "truth/optimisation_set.star")
    assert s["overall"]["max"] < 1e-3
    # angle errors are measured after rigid alignment: ~0 as well
    assert s["angle_error_deg"]["max"] < 1e-3 and s["position_error_px"]["max"] < 1e-3


def test_per_tilt_shift_error_is_measured(sim, tmp_path):
    res, out = sim
    ts_new = []
    for ts in res.truth_tilt_series:
        p = ts.projections.copy()
        p[2, 0, 3] += 1.5  # tilt row 2 shifted by 1.5 px in x
        ts_new.append(ts.replace(projections=p))
    opt = relion.write_new_optimisation_set(tmp_path / "shifted", ts_new, res.truth_particles)
    s = score(opt, out / "truth/optimisation_set.star")
    t = s["tomograms"]["TS_01"]
    np.testing.assert_allclose(t["per_tilt_rms"], [0, 0, 1.5, 0, 0], atol=1e-3)
    assert t["n_matched"] == 6 and t["n_missing"] == 0


def test_missing_particles_are_counted(sim, tmp_path):
    res, out = sim
    parts = {
        k: p.replace(
            names=p.names[:4],
            positions_px=p.positions_px[:4],
            rotations=p.rotations[:4],
            half_set=p.half_set[:4],
        )
        for k, p in res.truth_particles.items()
    }
    opt = relion.write_new_optimisation_set(tmp_path / "fewer", res.truth_tilt_series, parts)
    s = score(opt, out / "truth/optimisation_set.star")
    assert s["tomograms"]["TS_02"]["n_matched"] == 4
    assert s["tomograms"]["TS_02"]["n_missing"] == 2
    assert s["overall"]["max"] < 1e-6


def test_rigid_align():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3)) * 50
    r = _rot(10.0, 20.0, -30.0)
    y = x @ r.T + np.array([1.0, 2.0, 3.0])
    r2, t2 = rigid_align(x, y)
    np.testing.assert_allclose(r2, r, atol=1e-9)
    np.testing.assert_allclose(t2, [1, 2, 3], atol=1e-9)


def test_spline_deformation_interpolates_nodes():
    gw, gh, w, h = 3, 4, 300, 240
    rng = np.random.default_rng(1)
    c = rng.normal(size=(2, gh, gw, 4))
    d = Deformation("spline", (gw, gh), c.reshape(1, -1))
    nodes = np.array(
        [[ix * w / (gw - 1), iy * h / (gh - 1)] for iy in range(gh - 1) for ix in range(gw - 1)]
    )
    got = evaluate_deformation(d, (w, h), nodes, 0)
    expect = np.array(
        [[c[k, iy, ix, 0] for k in range(2)] for iy in range(gh - 1) for ix in range(gw - 1)]
    )
    np.testing.assert_allclose(got, expect, atol=1e-9)
    # x-slope (per grid cell) at a node: finite difference
    p = np.array([[150.0, 80.0]])
    e = 1e-4
    fd = (
        evaluate_deformation(d, (w, h), p + [e, 0], 0)
        - evaluate_deformation(d, (w, h), p - [e, 0], 0)
    ) / (2 * e)
    np.testing.assert_allclose(fd[0] * (w / (gw - 1)), c[:, 1, 1, 1], atol=1e-4)


def test_linear_and_fourier_deformation():
    lin = Deformation("linear", (3, 3), np.array([[0.01, 0.02, -0.03]]))
    out = evaluate_deformation(lin, (200, 100), np.array([[150.0, 20.0]]), 0)
    np.testing.assert_allclose(out, [[0.5, 1.0 + 0.9]])
    four = Deformation("Fourier", (3, 3), np.arange(12, dtype=float)[None] * 0.1)
    z = evaluate_deformation(four, (200, 100), np.zeros((1, 2)), 0)
    # at the origin only the cosine (real) parts remain: Σ re per dim
    np.testing.assert_allclose(z, [[0.0 + 0.2 + 0.4, 0.6 + 0.8 + 1.0]])


def test_json_safe_gives_strict_json():
    import json

    from polish3d.io.jsonsafe import json_safe

    value = {1: np.array([1.0, np.nan]), "b": (np.float32(2.5), float("inf")), "c": np.int64(3)}
    out = json_safe(value)
    assert out == {"1": [1.0, None], "b": [2.5, None], "c": 3}
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize("model, grid", [("spline", (3, 4)), ("Fourier", (3, 3)), ("linear", (3, 3))])
def test_deformation_matches_an_independent_numpy_spelling(model, grid):
    """The forward model's deformation fields (JAX, what runs) against tests/_helpers' NumPy
    spelling of RELION's layouts, at random points and coefficients of two tilts."""
    from _helpers import reference_deformation

    rng = np.random.default_rng(3)
    n = {"spline": 2 * grid[0] * grid[1] * 4, "linear": 3}.get(model)
    if n is None:
        n = 2 * 2 * len(reference_fourier_freqs(grid))
    coeffs = rng.normal(scale=0.01 if model == "linear" else 1.0, size=(2, n))
    d = Deformation(model, grid, coeffs)
    pts = rng.uniform([0, 0], [300, 240], size=(50, 2))
    for tilt in (0, 1):
        np.testing.assert_allclose(evaluate_deformation(d, (300, 240), pts, tilt),
                                   reference_deformation(d, (300, 240), pts, tilt), atol=1e-9)


def reference_fourier_freqs(grid):
    from _helpers import _fourier_freqs

    return _fourier_freqs(grid)
