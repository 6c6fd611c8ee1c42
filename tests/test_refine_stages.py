"""Each stage of the per-tomogram refinement alone, on a tiny simulated tomogram with a known
answer (the simulation's true geometry), and the forward model against an independent formula."""

import dataclasses

import numpy as np
import pytest

from polish3d import geometry
from polish3d.refine import deformation, forward, objective, stage2, stages, tomogram

BOX = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 7-tilt, 16-particle tomogram: its simulation, stack, references and envelope."""
    from _helpers import tiny_refinement_problem

    return tiny_refinement_problem(tmp_path_factory.mktemp("stages"), 16, 192, 10)


def _setup(tiny, ts=None, parts=None, **options):
    sim, stack, refs, env = tiny
    ts = sim.truth_tilt_series[0] if ts is None else ts
    parts = sim.truth_particles["TS_01"] if parts is None else parts
    config = tomogram.AlignConfig(box=BOX, **options)
    return tomogram.setup(ts, parts, stack, refs, env, config, None, None, lambda *a, **k: None)


def _projected(p, x):
    """Independent formula: ``P[:2,:3]·x + P[:2,3]`` for static positions ``(N, 3)``."""
    return np.einsum("fij,nj->nfi", p[:, :2, :3], x) + p[None, :, :2, 3]


def _rms_vs_truth(sim, state):
    truth = _projected(sim.truth_tilt_series[0].projections, sim.truth_particles["TS_01"].positions_px)
    d = _projected(state.projections, state.positions_px) - truth
    return float(np.sqrt(np.mean(np.sum(d * d, -1))))


# ------------------------------------------------------------------------------------------------
# the forward model


def test_forward_model_matches_an_independent_formula():
    """Projection, depth and a linear deformation against NumPy written out; the objective's
    float32 projection (zero parameters) agrees with the host's float64 one."""
    rng = np.random.default_rng(1)
    f, n, size = 5, 7, (300.0, 200.0)
    p = np.tile(np.eye(4), (f, 1, 1))
    p[:, :3, :3] = np.linalg.qr(rng.normal(size=(f, 3, 3)))[0]
    p[:, :3, 3] = rng.normal(0, 50, (f, 3))
    pts = rng.uniform(0, 200, (n, f, 3))
    u, depth = forward.predict_host(p, pts)
    want_u = np.stack([[p[j, :2, :3] @ pts[i, j] + p[j, :2, 3] for j in range(f)] for i in range(n)])
    want_d = np.stack([[p[j, 2, :3] @ pts[i, j] + p[j, 2, 3] for j in range(f)] for i in range(n)])
    np.testing.assert_allclose(u, want_u, rtol=0, atol=1e-9)
    np.testing.assert_allclose(depth, want_d, rtol=0, atol=1e-9)

    model = deformation.DeformationModel("linear", (2, 2), size)
    c = rng.normal(0, 0.01, (f, 3))
    ud, _ = forward.predict_host(p, pts, model, c)
    rx, ry = want_u[..., 0] - size[0] / 2, want_u[..., 1] - size[1] / 2
    want_def = np.stack([c[:, 0] * rx, c[:, 1] * rx + c[:, 2] * ry], -1)
    np.testing.assert_allclose(ud - want_u, want_def, rtol=0, atol=1e-4)  # float32 field

    data = stage2.build_data(p, pts[:, 0], u, np.zeros((n, f, 5, 5)), np.ones((n, f)),
                             tomo_size_px=(200, 200, 100), image_size_px=size, window_radius_px=2)
    u32 = objective.apply_tilt_params(stage2.initial_params(f, n), data, pts, fix_gauge=False)
    np.testing.assert_allclose(np.asarray(u32), want_u, rtol=0, atol=2e-3)


def test_forward_model_matches_the_scoring_projection(tiny):
    """With motion and a stored spline deformation: the forward model equals
    ``score.project_particles`` (NumPy, float64), as the scoring can call it."""
    from polish3d.model import Deformation
    from polish3d.score import project_particles

    sim = tiny[0]
    ts, parts = sim.truth_tilt_series[0], sim.truth_particles["TS_01"]
    rng = np.random.default_rng(2)
    coeffs = rng.normal(0, 0.5, (7, deformation.n_coefficients("spline", (3, 3))))
    ts = dataclasses.replace(ts, deformation=Deformation("spline", (3, 3), coeffs))
    parts = dataclasses.replace(parts, trajectories_px=rng.normal(0, 1.0, (16, 7, 3)))
    points = parts.positions_px[:, None, :] + parts.trajectories_px
    model = deformation.fixed_model(ts.deformation, ts.image_size_px)
    u, _ = forward.predict_host(ts.projections, points, model, ts.deformation.coefficients)
    np.testing.assert_allclose(u, project_particles(ts, parts), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# the stages


def test_predict_at_the_truth_is_the_simulated_projection(tiny):
    sim = tiny[0]
    problem, state = _setup(tiny)
    geom = stages.predict(problem, state)
    want = _projected(sim.truth_tilt_series[0].projections, sim.truth_particles["TS_01"].positions_px)
    np.testing.assert_allclose(geom.u_px, want, atol=1e-9)
    assert geom.visible.shape == (16, 7) and geom.visible.any()
    assert geom.centre_depth_px.shape == (7,)


def test_coarse_shift_search_recovers_known_per_tilt_shifts(tiny):
    """Tilt shifts of up to ±7 px (beyond the window radius 4) are found to a fraction of a pixel."""
    sim = tiny[0]
    truth = sim.truth_tilt_series[0]
    shifts = np.array([[7.0, -3.0], [0.0, 0.0], [-5.0, 6.0], [2.5, 2.5], [0.0, -6.5], [-7.0, 0.0],
                       [4.0, -4.0]])
    p = truth.projections.copy()
    p[:, :2, 3] += shifts
    problem, state = _setup(tiny, ts=dataclasses.replace(truth, projections=p), r=4.0)
    found = stages.coarse_shift_search(problem, state)
    assert state.metrics["coarse_rejected_tilts"] == []
    np.testing.assert_allclose(found, -shifts, atol=0.25)
    np.testing.assert_allclose(state.projections[:, :2, 3], truth.projections[:, :2, 3], atol=0.25)


def test_coarse_shift_search_uses_the_particles_near_the_centre(tiny):
    """With a 4° in-plane rotation error on top of the shifts, the search over the 5 particles
    nearest the tomogram's centre axis finds the shift those particles need to within 2.5 px
    (1.7 px measured); the 5 evenly spread over the list, which the rotation moves by up to
    ~5 px more, gave 4.1 px (the summed peak is smeared)."""
    sim = tiny[0]
    truth = sim.truth_tilt_series[0]
    shifts = np.array([[5.0, -3.0], [0.0, 2.0], [-4.0, 4.0], [2.5, 2.5], [0.0, -4.5], [-5.0, 0.0],
                       [3.0, -3.0]])
    a = np.radians(4.0)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    c = np.array(truth.image_size_px, float) / 2
    p = truth.projections.copy()
    p[:, :2, :3] = rot @ p[:, :2, :3]
    p[:, :2, 3] = p[:, :2, 3] @ rot.T + (c - rot @ c) + shifts
    problem, state = _setup(tiny, ts=dataclasses.replace(truth, projections=p), r=4.0, coarse_particles=5)
    x = state.positions_px[:, :2] - geometry.tomogram_centre_px(truth.tomo_size_px)[:2]
    near = np.argsort(np.linalg.norm(x, axis=1))[:5]
    move = _projected(truth.projections, state.positions_px) - _projected(p, state.positions_px)
    want = move[near].mean(axis=0)  # (F, 2): what the central particles need
    assert np.abs(move - want).max() > 5.0  # the others need much more or less
    found = stages.coarse_shift_search(problem, state)
    assert np.abs(found - want).max() < 2.5


def test_outer_passes_bring_the_nominal_start_close_to_the_truth(tiny):
    sim = tiny[0]
    problem, state = _setup(tiny, ts=sim.tilt_series[0], parts=sim.particles["TS_01"], r=8.0, outer=2,
                            rescue=False)
    before = _rms_vs_truth(sim, state)
    stages.outer_passes(problem, state)
    after = _rms_vs_truth(sim, state)
    assert before > 1.5 and after < 0.5, (before, after)
    assert [st["blur_px"] for st in state.metrics["outer"]][:3] == [3.0, 1.0, 0.0]
    assert state.per_tilt_cc_first is not None and len(state.per_tilt_cc_last) == 7


def test_rescue_finds_a_displaced_particle(tiny):
    """A particle moved 6 px in 3D (its peak outside its ±3 px window) is found again."""
    sim = tiny[0]
    truth = sim.truth_particles["TS_01"]
    x = truth.positions_px.copy()
    x[5] += [6.0, -5.0, 4.0]
    problem, state = _setup(tiny, parts=dataclasses.replace(truth, positions_px=x), r=3.0, rescue_z=3.0)
    geom = stages.predict(problem, state)
    hw = problem.half_width_px
    store = np.zeros((problem.n_pad, 7, 2 * hw + 1, 2 * hw + 1), np.float32)
    u0, vis, _ = stages._update_windows(problem, geom, None, store)
    data, params = stages._stage2_problem(problem, state, u0, store, vis.astype(np.float32))
    assert stages.rescue(problem, state, params, data, vis) == 1
    assert state.metrics["rescued_particles"] == [5]
    assert np.linalg.norm(state.positions_px[5] - truth.positions_px[5]) < 0.5  # an integer move
    np.testing.assert_array_equal(np.delete(state.positions_px, 5, 0), np.delete(x, 5, 0))


def test_exact_stage_moves_a_subpixel_perturbed_start_to_the_truth(tiny):
    """Tilt shifts and positions perturbed by 0.4 px (within the expansion's reach) converge."""
    sim = tiny[0]
    rng = np.random.default_rng(0)
    truth, parts = sim.truth_tilt_series[0], sim.truth_particles["TS_01"]
    p = truth.projections.copy()
    p[:, :2, 3] += rng.normal(0, 0.4, (7, 2))
    start = (dataclasses.replace(truth, projections=p),
             dataclasses.replace(parts, positions_px=parts.positions_px + rng.normal(0, 0.4, (16, 3))))
    problem, state = _setup(tiny, *start, r=4.0, exact_passes=3)
    before = _rms_vs_truth(sim, state)
    stages.exact_passes(problem, state)
    after = _rms_vs_truth(sim, state)
    # ~0.12 px: the data's own optimum (the same from the truth as start), from 0.74 px
    assert after < 0.2 and after < 0.5 * before, (before, after)
    assert all(st["exact"] for st in state.metrics["outer"])


def test_summary_compares_input_and_final_geometry(tiny):
    problem, state = _setup(tiny)
    start = state.copy()
    state.projections[:, 0, 3] += 1.0  # every prediction moves 1 px in x
    res = stages.summarise(problem, start, state, t_start=0.0)
    assert res.metrics["displacement_rms_px"] == pytest.approx(1.0)
    assert res.metrics["per_tilt_displacement_rms_px"] == pytest.approx([1.0] * 7)
    np.testing.assert_array_equal(res.projections, state.projections)
    np.testing.assert_array_equal(res.positions_px, state.positions_px)


def test_typed_pytrees(tiny):
    """The CC constants and the stage-2 parameters are dataclass pytrees; a free block that the
    parameters lack is an error before anything is computed."""
    import jax

    from polish3d.refine import ccmaps, optimise

    problem, _ = _setup(tiny)
    leaves, treedef = jax.tree_util.tree_flatten(problem.const)
    assert len(leaves) == 14 and isinstance(treedef.unflatten(leaves), ccmaps.CCInputs)
    params = stage2.initial_params(7, 64)
    assert params.motion is None and len(jax.tree_util.tree_leaves(params)) == 3
    with pytest.raises(ValueError, match="motion"):
        optimise.minimise(params, {}, optimise.StageOptions(), free_keys=("motion",))
