"""GP motion model (``polish3d.refine.motion``): basis, offsets, prior, gradient, recovery."""

import dataclasses

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from polish3d import geometry
from polish3d.model import ParticleData, TiltSeriesData, TomogramResult
from polish3d.refine import motion, optimise, stage2
from polish3d.refine.tomogram import AlignConfig

PX = 10.0


def _tilt_series(f=21, seed=0, image=(512, 512), tomo=(512, 512, 128)):
    rng = np.random.default_rng(seed)
    tilts = np.linspace(-60, 60, f)
    p = geometry.projection_from_euler(
        rng.normal(0, 0.3, f), tilts, 85 + rng.normal(0, 0.3, f), rng.normal(0, 20, f),
        rng.normal(0, 20, f), pixel_size_ang=PX, image_size_px=image, tomo_size_px=tomo,
    )
    # dose-symmetric order: 0°, then ±3°, … (ranks differ from file order)
    order = np.argsort(np.abs(tilts) + 1e-3 * (tilts < 0), kind="stable")
    pre = np.empty(f)
    pre[order] = 3.0 * np.arange(f)
    return TiltSeriesData(
        name="TS_01", pixel_size_ang=PX, tomo_size_px=tomo, image_size_px=image, projections=p,
        fractional_dose_e_per_ang2=3.0, pre_exposure_e_per_ang2=pre,
    )


def _particles(x, traj=None):
    n = x.shape[0]
    return ParticleData(
        names=[f"TS_01/{i + 1}" for i in range(n)], positions_px=x,
        rotations=np.repeat(np.eye(3)[None], n, 0), half_set=np.ones(n, int), trajectories_px=traj,
    )


def _plugin(x, ts, cfg=None, n_pad=None, traj=None, **align_kw):
    cfg = cfg or motion.MotionConfig(s_vel=2.0, s_div=100.0)
    n_pad = n_pad or stage2.pad_to_bucket(x.shape[0])
    return motion.build_plugin(cfg, ts, _particles(x, traj), AlignConfig(box=64, **align_kw), n_pad)


def _positions(n, seed=0):
    return np.random.default_rng(seed).uniform([100, 100, 40], [412, 412, 88], size=(n, 3))


# ------------------------------------------------------------------------------------------------
# basis


@pytest.mark.parametrize("sq_exp", [False, True])
def test_basis_reproduces_kernel(sq_exp):
    x = _positions(30)
    b, s, lam = motion.gp_basis(x, 0.7, 150.0, sq_exp=sq_exp)
    k = motion.kernel_matrix(x, x, 0.7, 150.0, sq_exp)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    expected = 0.49 * (np.exp(-(d**2) / 150.0**2) if sq_exp else np.exp(-d / 150.0))
    assert np.allclose(k, expected)
    assert np.allclose(b @ b.T, k, atol=1e-9)
    assert np.all(s == 0)
    assert np.all(np.diff(lam) <= 1e-12) and lam.min() >= motion.EIG_EPS


def test_max_ed_truncates_like_relion():
    x = _positions(30)
    b, s, lam = motion.gp_basis(x, 0.7, 150.0, max_ed=5)
    full, _, lam_full = motion.gp_basis(x, 0.7, 150.0)
    assert b.shape == (30, 5) and np.all(s == 0)
    assert np.allclose(lam, lam_full[:5])
    assert np.allclose(b @ b.T, full[:, :5] @ full[:, :5].T, atol=1e-9)


def test_duplicate_positions_drop_null_modes():
    x = np.repeat(_positions(5), 2, axis=0)
    b, _, lam = motion.gp_basis(x, 1.0, 100.0)
    assert b.shape[1] == 5  # RELION: eigenvalues below 1e-10 are dropped
    assert np.allclose(b @ b.T, motion.kernel_matrix(x, x, 1.0, 100.0), atol=1e-8)


def test_low_rank_plus_diagonal():
    x = _positions(300, seed=2)
    b, s, lam = motion.gp_basis(x, 0.5, 400.0, low_rank=24)
    k = motion.kernel_matrix(x, x, 0.5, 400.0)
    w = np.linalg.eigvalsh(k)[::-1]
    assert b.shape == (300, 24)
    assert np.allclose(lam[:8], w[:8], rtol=1e-6)  # randomized top eigenvalues are accurate
    approx = b @ b.T + np.diag(s**2)
    assert np.allclose(np.diag(approx), np.diag(k))  # marginal variances exact
    assert np.abs(approx - k).max() < 0.1 * 0.25


def test_sigmas_scaled_by_dose():
    cfg = motion.MotionConfig(s_vel=0.5, s_div=5000.0)
    assert motion.motion_sigmas_px(cfg, 2.0, 3.0) == pytest.approx((0.75, 7500.0))
    cfg = motion.MotionConfig(s_vel=0.5, s_div=5000.0, abs_params=True)
    assert motion.motion_sigmas_px(cfg, 2.0, 3.0) == pytest.approx((0.25, 2500.0))


# ------------------------------------------------------------------------------------------------
# offsets and prior


def _skew(a):
    return np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])


def _brute_force(pl, c):
    """RELION's formula, loop by loop: X_pk = Σ_{m<k} v_pm, v_pm = Σ_b B[p,b] c_mb (+ s_p e_mp),
    with the least-squares rigid motion of each step removed (the gauge; 6-parameter fit)."""
    n, f = pl.n, pl.f
    nbp = pl.basis.shape[1]
    x = pl.r[:n]
    vel = np.zeros((f - 1, n, 3))
    for m in range(f - 1):
        for p in range(n):
            vel[m, p] = sum(pl.basis[p, b] * c[m, b] for b in range(nbp))
            if pl.static.diagonal:
                vel[m, p] += pl.diag[p] * c[m, nbp + p]
        if pl.static.translation:
            cols = 6 if pl.static.rotation else 3
            a = np.concatenate([np.concatenate([np.eye(3), -_skew(x[p])], 1)[:, :cols] for p in range(n)])
            sol = np.linalg.lstsq(a, vel[m].ravel(), rcond=None)[0]
            vel[m] -= (a @ sol).reshape(n, 3)
    out = np.zeros((n, f, 3))
    for p in range(n):
        for k in range(f):
            pos = np.zeros(3)
            for m in range(k):
                pos += vel[m, p]
            out[p, pl.seq[k]] = pos
    return out + pl.base[:n]


@pytest.mark.parametrize("low_rank", [0, 8])
def test_offsets_equal_brute_force_and_prior(low_rank):
    ts = _tilt_series(f=6)
    x = _positions(12)
    traj_in = np.random.default_rng(5).normal(0, 0.3, (12, 6, 3))
    cfg = motion.MotionConfig(s_vel=2.0, s_div=100.0, low_rank=low_rank)
    pl = _plugin(x, ts, cfg, n_pad=16, traj=traj_in)
    assert pl.static.diagonal == (low_rank > 0)
    c = np.random.default_rng(1).normal(size=pl.init_params().shape)
    if pl.static.diagonal:
        c[:, pl.basis.shape[1] + 12 :] = 0.0  # padded particles' diagonal block (no effect anyway)
    mask = jnp.asarray((np.arange(16) < 12).astype(np.float32))
    data = {**pl.data(ts.projections, x), "particle_mask": mask}
    off, prior = pl.static.offsets_and_prior(jnp.asarray(c, jnp.float32), data)
    off = np.asarray(off)
    ref = _brute_force(pl, c)
    assert off.shape == (16, 6, 3)
    assert np.allclose(off[:12], ref, atol=1e-4)
    assert np.allclose(pl.trajectories(c), ref, atol=1e-9)
    assert np.all(off[12:] == 0)  # padded particles contribute nothing
    assert float(prior) == pytest.approx(np.sum(c**2), rel=1e-5)
    # anchored at the lowest-dose tilt; gauge: zero particle mean and zero net rotation per tilt
    gp = pl.gp_offsets(c)
    assert np.allclose(gp[:, pl.seq[0]], 0)
    assert np.allclose(gp.mean(0), 0, atol=1e-9)
    assert np.allclose(np.cross(pl.r[:12, None], gp).sum(0), 0, atol=1e-7)


@pytest.mark.parametrize(("const", "translation", "rotation"), [
    ({"const_s": True}, False, False), ({"const_a": True}, True, False), ({}, True, True)])
def test_gauge_removal_follows_free_tilt_parameters(const, translation, rotation):
    ts = _tilt_series(f=4)
    pl = _plugin(_positions(10), ts, n_pad=16, **const)
    assert (pl.static.translation, pl.static.rotation) == (translation, rotation)
    c = np.random.default_rng(0).normal(size=pl.init_params().shape)
    assert np.allclose(pl.trajectories(c), _brute_force(pl, c))


def test_gradient_of_offsets_and_prior():
    jax.config.update("jax_enable_x64", True)
    try:
        ts = _tilt_series(f=5)
        pl = _plugin(_positions(7), ts, motion.MotionConfig(s_vel=2.0, s_div=100.0, low_rank=4), n_pad=8)
        data = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64) if a.dtype == jnp.float32 else a,
            {**pl.data(ts.projections, None), "particle_mask": jnp.asarray((np.arange(8) < 7) * 1.0)},
        )
        w = jnp.asarray(np.random.default_rng(3).normal(size=(8, 5, 3)))
        c = jnp.asarray(np.random.default_rng(4).normal(size=pl.init_params().shape))

        @jax.jit
        def f(c):
            off, prior = pl.static.offsets_and_prior(c, data)
            return jnp.sum(w * off) + jnp.sum(jnp.sin(off)) + prior

        jax.test_util.check_grads(f, (c,), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_finish_anchors_input_at_lowest_dose():
    ts = _tilt_series(f=5)
    x = _positions(6)
    traj_in = np.random.default_rng(0).normal(0, 1.0, (6, 5, 3))
    pl = _plugin(x, ts, n_pad=8, traj=traj_in)
    res = TomogramResult(name="TS_01", projections=ts.projections, positions_px=x.copy())
    c = np.random.default_rng(1).normal(size=pl.init_params().shape)
    before = x[:, None] + pl.trajectories(c)
    pl.finish(c, res)
    j0 = pl.seq[0]
    assert np.allclose(res.trajectories_px[:, j0], 0)
    assert np.allclose(res.positions_px[:, None] + res.trajectories_px, before)  # projections unchanged
    assert res.metrics["motion"]["input_trajectories"]


def test_const_p_disables_motion():
    pl = _plugin(_positions(5), _tilt_series(f=4), n_pad=8, const_p=True)
    assert not pl.free


# ------------------------------------------------------------------------------------------------
# stage-2 recovery with analytic CC peaks


def _gp_truth(pl, x, sig_v, sig_d, seed):
    """True trajectories (N, F, 3) px with velocities ~ N(0, K) per step (as the simulator)."""
    rng = np.random.default_rng(seed)
    k = motion.kernel_matrix(x, x, sig_v, sig_d)
    w, v = np.linalg.eigh(k)
    b = v * np.sqrt(np.clip(w, 0, None))
    vel = np.einsum("pb,mbd->mpd", b, rng.normal(size=(pl.f - 1, x.shape[0], 3)))
    cum = np.concatenate([np.zeros((1, x.shape[0], 3)), np.cumsum(vel, 0)])
    return np.transpose(cum[pl.rank], (1, 0, 2))


def _recovery(with_motion_in_data, use_motion, n=40, f=21, seed=0, r=10, peak=100.0):
    rng = np.random.default_rng(seed)
    ts = _tilt_series(f=f, seed=seed)
    p_true = ts.projections
    x_true = _positions(n, seed)
    cfg = motion.MotionConfig(s_vel=1.5, s_div=500.0)  # σ_v = 3·1.5/10 = 0.45 px/step, σ_d = 150 px
    pl = _plugin(x_true, ts, cfg)
    sig_v, sig_d = pl.sig_v, pl.sig_d
    traj = _gp_truth(pl, x_true, sig_v, sig_d, seed + 1) if with_motion_in_data else np.zeros((n, f, 3))
    e = geometry.projection_to_euler(p_true, pixel_size_ang=PX, image_size_px=ts.image_size_px,
                                     tomo_size_px=ts.tomo_size_px)
    p_nom = geometry.projection_from_euler(
        e["rlnTomoXTilt"] + rng.normal(0, 0.3, f), e["rlnTomoYTilt"] + rng.normal(0, 0.3, f),
        e["rlnTomoZRot"] + rng.normal(0, 0.3, f), e["rlnTomoXShiftAngst"] + PX * rng.normal(0, 2, f),
        e["rlnTomoYShiftAngst"] + PX * rng.normal(0, 2, f), pixel_size_ang=PX,
        image_size_px=ts.image_size_px, tomo_size_px=ts.tomo_size_px,
    )
    x_nom = x_true + rng.normal(0, 1.5, x_true.shape)
    pts_true = x_true[:, None] + traj
    u_true = np.einsum("fij,nfj->nfi", p_true[:, :2, :3], pts_true) + p_true[None, :, :2, 3]
    u0 = geometry.project_points(p_nom, x_nom).transpose(1, 0, 2)
    d = 2 * r + 5
    grid = np.arange(d) - (d - 1) / 2
    off = u_true - u0
    cc = peak * np.exp(-((grid[None, None, None, :] - off[..., 0, None, None]) ** 2
                  + (grid[None, None, :, None] - off[..., 1, None, None]) ** 2) / (2 * 2.0**2))
    n_pad = stage2.pad_to_bucket(n)
    data = stage2.build_data(p_nom, x_nom, u0, cc, np.ones((n, f)), tomo_size_px=ts.tomo_size_px,
                             image_size_px=ts.image_size_px, window_radius_px=r, n_pad=n_pad)
    params = stage2.initial_params(f, n_pad)
    free = ("tilt_angles", "tilt_shifts", "positions")
    options = optimise.StageOptions()
    pl = _plugin(x_nom, ts, cfg, n_pad=n_pad)
    if use_motion:
        data.update(pl.data(p_nom, x_nom))
        params = dataclasses.replace(params, motion=pl.init_params())
        free += ("motion",)
        options = optimise.StageOptions(motion=pl.static)
    params, _ = optimise.minimise(params, data, options, free_keys=free, max_iter=2000)
    delta, dpos = stage2.results_from_params(params, data, options, n)
    p_new, x_new = delta @ p_nom, x_nom + dpos
    t_new = pl.trajectories(params.motion) if use_motion else np.zeros((n, f, 3))
    pts = x_new[:, None] + t_new
    u_new = np.einsum("fij,nfj->nfi", p_new[:, :2, :3], pts) + p_new[None, :, :2, 3]
    err = np.sqrt(np.mean(np.sum((u_new - u_true) ** 2, -1)))
    return err, traj, t_new


def test_recovery_with_motion():
    err_off, traj, _ = _recovery(True, False)
    err_on, _, t_new = _recovery(True, True)
    rms_true = np.sqrt(np.mean(np.sum(traj**2, -1)))
    assert rms_true > 1.0  # a few pixels of motion over the series
    assert err_on < 0.5 * err_off, (err_on, err_off)
    # recovered vs true trajectories, rigid part removed from both (it lives in the tilt parameters)
    r, jinv = motion.rigid_frame(_positions(40, 0))

    def non_rigid(t):
        v = motion.remove_rigid(np.transpose(t, (1, 0, 2)), r, jinv, np.ones(40), True, xp=np)
        return v.ravel()

    assert np.corrcoef(non_rigid(traj), non_rigid(t_new))[0, 1] > 0.8


def test_no_motion_stays_near_zero():
    err_off, _, _ = _recovery(False, False)
    err_on, _, t_new = _recovery(False, True)
    # near zero (the rest is an almost invisible component left by the float32 L-BFGS stop)
    assert np.sqrt(np.mean(np.sum(t_new**2, -1))) < 0.15
    assert err_on < err_off + 0.02


# ------------------------------------------------------------------------------------------------
# end to end: polish3d align --motion on a tiny simulated set with GP motion


def test_align_with_motion_writes_trajectories(tmp_path):
    import plyfile

    from polish3d.config import RefineConfig
    from polish3d.driver import AlignInputs, align
    from polish3d.io import relion
    from polish3d.simulate import SimulationConfig, simulate

    cfg = SimulationConfig(
        n_tomograms=1, n_particles=8, n_unlisted=0, tilt_min_deg=-30.0, tilt_max_deg=30.0,
        tilt_step_deg=10.0, pixel_size_ang=12.0, box_px=32, image_size_px=(128, 128),
        tomo_thickness_px=40, particle_diameter_ang=180.0, s_vel=2.0, s_div=200.0, seed=5,
    )
    sim = simulate(cfg, tmp_path / "sim")
    out = tmp_path / "out"
    res = align(AlignInputs(i=str(sim.optimisation_set)), out,
                RefineConfig(AlignConfig(box=32, r=6, outer=1, blur_px=(0.0,)),
                             motion=motion.MotionConfig(s_vel=2.0, s_div=200.0)))
    r = res.results["TS_01"]
    ts = sim.tilt_series[0]
    assert r.trajectories_px.shape == (8, ts.n_tilts, 3)
    j0 = geometry.dose_order(ts.pre_exposure_e_per_ang2)[0]
    assert np.allclose(r.trajectories_px[:, j0], 0)
    assert "motion" in r.metrics
    traj = relion.read_trajectories(out / "motion.star")
    assert len(traj) == 8
    for s in (1, 8):
        mesh = plyfile.PlyData.read(str(out / "Trajectories" / f"TS_01_x{s}.ply"))
        assert mesh["vertex"].count == 8 * (ts.n_tilts - 1) * 14
    assert (out / "plots" / "TS_01_motion.png").stat().st_size > 0
