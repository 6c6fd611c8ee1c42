"""Stage 2 alone: CC windows with Gaussian peaks at the true displacements (analytic case)."""

import numpy as np
import pytest

from polish3d import geometry
from polish3d.refine import objective, optimise, stage2


def _problem(seed=0, n=40, f=21, ang_err=0.5, shift_err=3.0, pos_err=2.0, r=10):
    rng = np.random.default_rng(seed)
    tilts = np.linspace(-60, 60, f)
    image, tomo, px = (512, 512), (512, 512, 128), 10.0
    p_true = geometry.projection_from_euler(
        rng.normal(0, 0.3, f),
        tilts,
        85 + rng.normal(0, 0.3, f),
        rng.normal(0, 20, f),
        rng.normal(0, 20, f),
        pixel_size_ang=px,
        image_size_px=image,
        tomo_size_px=tomo,
    )
    x_true = rng.uniform([100, 100, 40], [412, 412, 88], size=(n, 3))
    e = geometry.projection_to_euler(
        p_true, pixel_size_ang=px, image_size_px=image, tomo_size_px=tomo
    )
    p_nom = geometry.projection_from_euler(
        e["rlnTomoXTilt"] + rng.normal(0, ang_err, f),
        e["rlnTomoYTilt"] + rng.normal(0, ang_err, f),
        e["rlnTomoZRot"] + rng.normal(0, ang_err, f),
        e["rlnTomoXShiftAngst"] + px * rng.normal(0, shift_err, f),
        e["rlnTomoYShiftAngst"] + px * rng.normal(0, shift_err, f),
        pixel_size_ang=px,
        image_size_px=image,
        tomo_size_px=tomo,
    )
    x_nom = x_true + rng.normal(0, pos_err, x_true.shape)
    u_true = geometry.project_points(p_true, x_true).transpose(1, 0, 2)
    u0 = geometry.project_points(p_nom, x_nom).transpose(1, 0, 2)
    d = 2 * r + 5
    grid = np.arange(d) - (d - 1) / 2
    off = u_true - u0
    cc = np.exp(
        -(
            (grid[None, None, None, :] - off[..., 0, None, None]) ** 2
            + (grid[None, None, :, None] - off[..., 1, None, None]) ** 2
        )
        / (2 * 2.0**2)
    )
    return dict(
        p_true=p_true,
        x_true=x_true,
        p_nom=p_nom,
        x_nom=x_nom,
        u_true=u_true,
        u0=u0,
        cc=cc,
        image=image,
        tomo=tomo,
        r=r,
    )


def _solve(pr, options=optimise.StageOptions(), free=("tilt_angles", "tilt_shifts", "positions"), **kw):
    n, f = pr["x_nom"].shape[0], pr["p_nom"].shape[0]
    data = stage2.build_data(
        pr["p_nom"],
        pr["x_nom"],
        pr["u0"],
        pr["cc"],
        np.ones((n, f)),
        tomo_size_px=pr["tomo"],
        image_size_px=pr["image"],
        window_radius_px=pr["r"],
        n_pad=stage2.pad_to_bucket(n),
    )
    params = stage2.initial_params(f, data["positions"].shape[0])
    params, info = optimise.minimise(params, data, options, free_keys=free, max_iter=500, **kw)
    delta, dpos = stage2.results_from_params(params, data, options, n)
    p_new = delta @ pr["p_nom"]
    x_new = pr["x_nom"] + dpos
    u_new = geometry.project_points(p_new, x_new).transpose(1, 0, 2)
    return u_new, info, p_new, x_new


def test_recovers_analytic_peaks():
    pr = _problem()
    u_new, info, _, _ = _solve(pr)
    err0 = np.sqrt(np.mean(np.sum((pr["u0"] - pr["u_true"]) ** 2, -1)))
    err = np.sqrt(np.mean(np.sum((u_new - pr["u_true"]) ** 2, -1)))
    assert err0 > 2.0
    assert err < 0.02, (err0, err, info)
    assert info.cost_final < info.cost_initial


def test_stops_when_the_predictions_stop_moving():
    """``move_tol_px``: L-BFGS stops (converged) once the predicted positions moved less than the
    tolerance over ``move_every`` iterations; the answer is that close to the full run's."""
    pr = _problem(seed=1)
    u_full, info_full, _, _ = _solve(pr)
    u_stop, info_stop, _, _ = _solve(pr, move_tol_px=0.01, move_every=5)
    assert info_stop.converged and "moved" in info_stop.message, info_stop
    assert info_stop.iterations < info_full.iterations, (info_stop, info_full)
    assert info_stop.iterations % 5 == 0
    assert np.sqrt(np.mean(np.sum((u_stop - u_full) ** 2, -1))) < 0.02
    u_off, info_off, _, _ = _solve(pr, move_tol_px=0.0, move_every=5)  # off: the full run
    assert info_off.iterations == info_full.iterations
    np.testing.assert_array_equal(u_off, u_full)


def test_perfect_input_stays_perfect():
    pr = _problem(ang_err=0, shift_err=0, pos_err=0)
    pr["p_nom"], pr["x_nom"], pr["u0"] = pr["p_true"], pr["x_true"], pr["u_true"]
    u_new, _, _, _ = _solve(pr)
    assert np.max(np.abs(u_new - pr["u_true"])) < 1e-3


def test_gauge_is_fixed():
    """Mean position change is zero and the tilt rotations have no global-rotation component."""
    pr = _problem(seed=3)
    _, _, p_new, x_new = _solve(pr)
    assert np.allclose((x_new - pr["x_nom"]).mean(0), 0, atol=1e-6)


def test_gradient_matches_finite_differences():
    import jax
    import jax.numpy as jnp
    import jax.test_util

    jax.config.update("jax_enable_x64", True)
    try:
        pr = _problem(n=5, f=5)
        n, f = 5, 5
        data = stage2.build_data(
            pr["p_nom"],
            pr["x_nom"],
            pr["u0"],
            pr["cc"],
            np.ones((n, f)),
            tomo_size_px=pr["tomo"],
            image_size_px=pr["image"],
            window_radius_px=pr["r"],
        )
        data = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), data)
        rng = np.random.default_rng(1)
        params = stage2.Stage2Params(
            tilt_angles=jnp.asarray(rng.normal(0, 0.3, (f, 3))),
            tilt_shifts=jnp.asarray(rng.normal(0, 0.3, (f, 2))),
            positions=jnp.asarray(rng.normal(0, 0.3, (n, 3))),
        )
        opts = optimise.StageOptions(range_reg=0.1)
        jax.test_util.check_grads(
            lambda p: objective.total_cost(p, data, opts),
            (params,),
            order=1,
            modes=("rev",),
            atol=1e-4,
            rtol=1e-4,
        )
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("bucket_n", [(1, 64), (64, 64), (65, 128), (600, 640)])
def test_pad_to_bucket(bucket_n):
    n, expected = bucket_n
    assert stage2.pad_to_bucket(n) == expected
