"""The stages of one tomogram's refinement (driven by :func:`polish3d.refine.tomogram.refine_tomogram`).

Each stage takes the run's constants (:class:`TomogramProblem`) and the current geometry
(:class:`RefineState`) and updates the state in place:

1. :func:`coarse_shift_search`: per-tilt 2D shifts from CC maps summed over particles;
2. :func:`outer_passes`: CC windows at the current geometry, then L-BFGS on them (the first pass
   coarse-to-fine on low-passed windows), repeated while the predictions move;
3. :func:`rescue` (inside the first outer pass): a 3D search for particles left behind;
4. :func:`exact_passes`: L-BFGS on the exact CC's local expansion (no window grid);
5. :func:`summarise`: the result record and the metrics, from the input and the final geometry.

Every prediction of where a particle lands goes through :func:`predict`
(:func:`polish3d.refine.forward.predict_host`, the objective's formula).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from polish3d import geometry
from polish3d.model import ParticleData, TiltSeriesData, TomogramResult
from polish3d.refine import ccmaps, deformation, forward, likelihood, optimise, stage2
from polish3d.refine import validate as validate_mod
from polish3d.refine.ccmaps import PairGeometry

__all__ = [
    "RefineState", "TomogramProblem", "coarse_shift_search", "exact_passes", "outer_passes",
    "predict", "rescue", "summarise", "validate", "visible_boxes",
]


@dataclasses.dataclass(frozen=True)
class TomogramProblem:
    """What stays fixed during one tomogram's refinement.

    Attributes:
        ts, particles, stack, config: the inputs (``config`` an ``AlignConfig``).
        const: the CC constants of the box; coarse_const / coarse_box_px: those of the per-tilt
            shift search's box (``None`` when the search is off).
        half_width_px: half-width of the CC windows (pixels); n_pad: padded particle count;
        chunk: particles per CC-stage call.
        frame_ok: ``(F,)`` tilts inside the dose-rank range of the cost.
        plugins: the model plug-ins (motion, deformation) by parameter name.
        options: the static stage-2 options; free: the optimised parameter blocks.
        report: progress callback ``report(event, **figures)``.
    """

    ts: TiltSeriesData
    particles: ParticleData
    stack: object
    config: object
    const: ccmaps.CCInputs
    coarse_const: ccmaps.CCInputs | None
    coarse_box_px: int
    half_width_px: int
    n_pad: int
    chunk: int
    frame_ok: np.ndarray
    plugins: dict
    options: optimise.StageOptions
    free: tuple[str, ...]
    report: Callable[..., None]


@dataclasses.dataclass
class RefineState:
    """The geometry being refined (float64) and what the stages record.

    Attributes:
        projections: ``(F, 4, 4)`` projection matrices (pixels).
        positions_px: ``(N, 3)`` particle positions (tomogram pixels).
        plugin_params: the plug-ins' parameters (float32), by parameter name.
        metrics: the per-tomogram metrics being filled (``metrics["outer"]``: one record per pass).
        per_tilt_cc_first, per_tilt_cc_last: mean CC at the window centres per tilt, first and
            last window pass.
    """

    projections: np.ndarray
    positions_px: np.ndarray
    plugin_params: dict
    metrics: dict
    per_tilt_cc_first: list | None = None
    per_tilt_cc_last: list = dataclasses.field(default_factory=list)

    def copy(self) -> RefineState:
        """An independent copy of the geometry (the metrics are shared)."""
        return dataclasses.replace(
            self, projections=self.projections.copy(), positions_px=self.positions_px.copy(),
            plugin_params=dict(self.plugin_params),
        )


def visible_boxes(u: np.ndarray, image_size_px, box: int) -> np.ndarray:
    """``(...)`` true where a ``box``-pixel box centred at ``u (..., 2)`` lies inside the image."""
    w, h = image_size_px
    half = box / 2.0
    return (
        (u[..., 0] > half) & (u[..., 0] < w - half) & (u[..., 1] > half) & (u[..., 1] < h - half)
    )


def offsets(problem: TomogramProblem, state: RefineState) -> np.ndarray:
    """Per-tilt 3D offsets ``(N, F, 3)`` px: the motion model's trajectories, or the input's."""
    motion = problem.plugins.get("motion")
    if motion is not None:
        return motion.trajectories(state.plugin_params["motion"])
    if problem.particles.trajectories_px is not None:
        return np.asarray(problem.particles.trajectories_px, np.float64)
    return np.zeros((problem.particles.n_particles, problem.ts.n_tilts, 3))


def predict(problem: TomogramProblem, state: RefineState) -> PairGeometry:
    """Where every particle lands at the state's geometry (the forward model) and which pairs
    are used: box inside the image, tilt in the dose range, box not mostly masked."""
    p, ts, box = state.projections, problem.ts, problem.config.box
    deform = problem.plugins.get("deformation")
    points = state.positions_px[:, None, :] + offsets(problem, state)
    coeffs = None if deform is None else deform.coefficients(state.plugin_params["deformation"])
    u, depth = forward.predict_host(p, points, None if deform is None else deform.static, coeffs)
    centre = np.broadcast_to(geometry.tomogram_centre_px(ts.tomo_size_px), (1, ts.n_tilts, 3))
    centre_depth = forward.predict_host(p, centre)[1][0]
    rot = np.einsum("fij,njk->nfik", p[:, :3, :3], problem.particles.rotations)
    vis = visible_boxes(u, ts.image_size_px, box) & problem.frame_ok[None, :]
    if hasattr(problem.stack, "usable"):  # io.stacks.StackView: leave out boxes mostly in masked pixels
        vis &= problem.stack.usable(u, box)
    return PairGeometry(u, rot, depth, centre_depth, problem.particles.half_set, vis)


# ----------------------------------------------------------------------------------------------
# 1. per-tilt shift search
# ----------------------------------------------------------------------------------------------


def coarse_shift_search(problem: TomogramProblem, state: RefineState) -> np.ndarray:
    """Per-tilt 2D shifts ``(F, 2)`` px, added to the state's projections.

    The full CC maps (box ``coarse_box_px``) of the ``config.coarse_particles`` particles nearest
    the centre axis (an in-plane rotation error moves the others' peaks off: ±50 px at the edge
    of a 4096² image for 1.4°) are summed per tilt; a tilt's shift is the sub-pixel peak of its
    sum, applied where it stands ``config.coarse_min_z`` robust standard deviations above the
    map's median (0 for tilts outside the dose range, and with ``const_s``)."""
    t0 = time.perf_counter()
    cfg, f = problem.config, problem.ts.n_tilts
    centre = geometry.tomogram_centre_px(problem.ts.tomo_size_px)[:2]
    off_axis = np.linalg.norm(state.positions_px[:, :2] - centre, axis=1)
    sub = np.sort(np.argsort(off_axis, kind="stable")[: cfg.coarse_particles])
    total = ccmaps.cc_tilt_sums(
        problem.stack, predict(problem, state).subset(sub), problem.coarse_const,
        box=problem.coarse_box_px, chunk=problem.chunk,
    )
    shifts = np.stack([_parabolic_peak(total[j]) for j in range(f)])
    # accept a tilt's shift only where the summed CC has a clear peak (robust z-score)
    flat = total.reshape(f, -1)
    med, sigma = _median_and_robust_sigma(flat, axis=1)
    weak = (flat.max(axis=1) - med) / np.maximum(sigma, 1e-30) < cfg.coarse_min_z
    shifts[weak] = 0.0
    state.metrics["coarse_rejected_tilts"] = np.flatnonzero(weak).tolist()
    shifts[~problem.frame_ok] = 0.0
    if cfg.const_s:
        shifts[:] = 0.0
    state.projections[:, :2, 3] += shifts
    problem.report("coarse_shift", max_shift_px=float(np.abs(shifts).max()), seconds=time.perf_counter() - t0)
    state.metrics["coarse_shifts_px"] = shifts.tolist()
    return shifts


def _median_and_robust_sigma(a: np.ndarray, axis=None):
    """Median and robust standard deviation (1.4826 × median absolute deviation) along ``axis``."""
    med = np.median(a, axis=axis, keepdims=True)
    sigma = 1.4826 * np.median(np.abs(a - med), axis=axis, keepdims=True)
    return np.squeeze(med, axis), np.squeeze(sigma, axis)


def _parabolic_peak(m: np.ndarray) -> np.ndarray:
    """Sub-pixel peak ``(x, y)`` of a periodic map ``[y, x]`` (zero shift at index 0)."""
    s = m.shape[-1]
    iy, ix = np.unravel_index(np.argmax(m), m.shape)

    def refine(a, b, c):
        den = a - 2 * b + c
        return 0.0 if den >= 0 else 0.5 * (a - c) / den

    dx = refine(m[iy, (ix - 1) % s], m[iy, ix], m[iy, (ix + 1) % s])
    dy = refine(m[(iy - 1) % s, ix], m[iy, ix], m[(iy + 1) % s, ix])
    x = ix + dx
    y = iy + dy
    x = x - s if x > s / 2 else x
    y = y - s if y > s / 2 else y
    return np.array([x, y])


# ----------------------------------------------------------------------------------------------
# 2. outer passes: CC windows, then L-BFGS on them
# ----------------------------------------------------------------------------------------------


def outer_passes(problem: TomogramProblem, state: RefineState) -> None:
    """Up to ``config.outer`` passes of (CC windows at the current geometry → L-BFGS on them).

    The first pass runs L-BFGS coarse to fine (``config.blur_px``) and then :func:`rescue`;
    later passes recompute only the windows whose pairs drifted (see :func:`_update_windows`).
    Stops once the predictions move less than ``config.tol_rms_px`` / ``tol_max_px``.
    """
    cfg, n, f = problem.config, problem.particles.n_particles, problem.ts.n_tilts
    hw = problem.half_width_px
    schedule = [float(b) for b in cfg.blur_px] or [0.0]
    if schedule[-1] != 0.0:
        schedule.append(0.0)
    # updated in place between L-BFGS runs; the stage-2 data share its memory on a CPU
    store = ccmaps.aligned_zeros((problem.n_pad, f, 2 * hw + 1, 2 * hw + 1))
    prev = None  # (window centres, their visibility) of the previous pass
    for outer in range(1 if cfg.shift_only else max(cfg.outer, 1)):
        geom = predict(problem, state)
        t0 = time.perf_counter()
        windows = _update_windows(problem, geom, prev, store)
        if windows is None:
            break
        u0, vis, redo = prev = windows
        t_cc = time.perf_counter() - t0
        data, params = _stage2_problem(problem, state, u0, store, vis.astype(np.float32))
        cc_centre = store[:n, :, hw, hw]
        state.per_tilt_cc_last = [
            float(cc_centre[vis[:, j], j].mean()) if vis[:, j].any() else 0.0 for j in range(f)
        ]
        if state.per_tilt_cc_first is None:
            state.per_tilt_cc_first = state.per_tilt_cc_last
        # coarse-to-fine on the same CC maps (first pass only): the stage-2 parameters carry over
        params, step = _window_lbfgs(
            problem, state, outer, params, data, int((redo & vis).sum()), t_cc,
            schedule if outer == 0 else [0.0],
        )
        step.update(_adopt(problem, state, params, data, geom.u_px, vis))
        step["mean_cc"] = float(np.mean(cc_centre[vis])) if vis.any() else 0.0
        problem.report("outer", **step)
        rescued = 0
        if outer == 0 and cfg.rescue and "positions" in problem.free and n >= 8:
            rescued = rescue(problem, state, params, data, vis)
        if not rescued and step["move_rms_px"] < cfg.tol_rms_px and step["move_max_px"] < cfg.tol_max_px:
            break


def _update_windows(problem: TomogramProblem, geom: PairGeometry, prev, store: np.ndarray):
    """CC windows into ``store`` for the pairs that need new ones.

    First pass (or ``config.full_recompute``): every pair. Later: the pairs whose prediction
    drifted more than ``config.recompute_px`` from their window centre (towards its edge) or
    that became visible; the others keep their windows (their peaks are inside).

    Returns:
        ``(window centres (N, F, 2), visibility (N, F), recomputed pairs (N, F))``, or ``None``
        when no pair needs a new window.
    """
    cfg = problem.config
    if prev is None or cfg.full_recompute:
        redo = np.ones(geom.visible.shape, bool)
        u0, vis0 = geom.u_px, geom.visible
    else:
        u0, vis0 = prev[0].copy(), prev[1].copy()
        drift = np.where(vis0, np.linalg.norm(geom.u_px - u0, axis=-1), 0.0)
        limit = cfg.recompute_px if cfg.recompute_px >= 0 else 0.6 * cfg.r
        redo = (drift > limit) | (geom.visible & ~vis0)
        if not redo.any():
            return None
        u0[redo], vis0[redo] = geom.u_px[redo], geom.visible[redo]
    ccmaps.compute_cc_windows(
        problem.stack, geom, problem.const, box=cfg.box, half_width=problem.half_width_px,
        chunk=problem.chunk, pairs=redo, out=store,
    )
    return u0, vis0, redo


def _window_lbfgs(problem, state, outer: int, params, data, recomputed: int, t_cc: float, schedule):
    """L-BFGS on the CC windows ``data["cc"]`` low-passed by each ``schedule`` entry (px) in turn
    (the low-passed runs only need to bring every pair into its peak's basin: at most 60
    iterations, looser tolerance). Returns the parameters and the last run's record."""
    cfg, cc = problem.config, data["cc"]
    for blur in schedule:
        data["cc"] = cc  # (the previous low-passed copy is freed before the next is made)
        data["cc"] = ccmaps.blur_windows(cc, blur) if blur > 0 else cc
        if problem.options.deformation is not None:  # the shrinkage's scale, once per run
            data["deformation_kappa"] = deformation.shrinkage_scale(data["cc"], data["weight"])

        def cb(it, cost, outer=outer):
            if it < 10 or (it < 100 and it % 10 == 0) or it % 100 == 0:
                problem.report("iteration", outer=outer, iteration=it, cost=cost)

        params, info = optimise.minimise(
            params, data, problem.options, free_keys=problem.free, callback=cb,
            max_iter=cfg.it if blur == 0 else min(cfg.it, 60),
            ftol=1e-10 if blur == 0 else 1e-7, move_tol_px=cfg.move_tol_px,
        )
        step = _pass_record(outer, recomputed, blur, t_cc, info)
        t_cc = 0.0
        state.metrics["outer"].append(step)
    return params, step


def _pass_record(outer: int, recomputed_pairs: int, blur_px: float, cc_seconds: float, info, **extra) -> dict:
    """One entry of ``metrics["outer"]``: a CC pass (or final exact pass) and its L-BFGS run."""
    return {
        "outer": outer,
        "recomputed_pairs": recomputed_pairs,
        "blur_px": blur_px,
        "cost_initial": info.cost_initial,
        "cost_final": info.cost_final,
        "iterations": info.iterations,
        "converged": info.converged,
        "cc_seconds": cc_seconds,
        "lbfgs_seconds": info.seconds,
        "devices": info.devices,
        **extra,
    }


def _stage2_problem(problem: TomogramProblem, state: RefineState, u0, store, weight, **extra):
    """Stage-2 data (current geometry, CC store, input motion, plug-ins) and start point."""
    n, f, n_pad = problem.particles.n_particles, problem.ts.n_tilts, problem.n_pad
    aniso = stage2.aniso_mode(problem.config)  # the image distortion refined, if any
    data = stage2.build_data(
        state.projections, state.positions_px, u0, store, weight, tomo_size_px=problem.ts.tomo_size_px,
        image_size_px=problem.ts.image_size_px, window_radius_px=problem.config.r, n_pad=n_pad,
        aniso=aniso, free=problem.free, **extra,
    )
    if "motion" not in problem.plugins and problem.particles.trajectories_px is not None:
        pad = np.zeros((n_pad - n, f, 3))
        data["offsets"] = jnp.asarray(np.concatenate([offsets(problem, state), pad], 0), jnp.float32)
    for pl in problem.plugins.values():
        data.update(pl.data(state.projections, state.positions_px))
    return data, stage2.initial_params(f, n_pad, aniso=aniso, **state.plugin_params)


def _adopt(problem: TomogramProblem, state: RefineState, params, data, u_before, vis) -> dict:
    """Apply an L-BFGS solution to the state; the move of the predictions from ``u_before``
    over the pairs ``vis`` (RMS and maximum, px)."""
    delta, dpos = stage2.results_from_params(params, data, problem.options, problem.particles.n_particles,
                                             projections=state.projections)
    state.projections = delta @ state.projections
    if "positions" in problem.free:
        state.positions_px = state.positions_px + dpos
    state.plugin_params = {k: getattr(params, k) for k in problem.plugins}
    move = np.linalg.norm(predict(problem, state).u_px - u_before, axis=-1)
    return {
        "move_rms_px": float(np.sqrt(np.mean(move[vis] ** 2))) if vis.any() else 0.0,
        "move_max_px": float(move[vis].max()) if vis.any() else 0.0,
    }


# ----------------------------------------------------------------------------------------------
# 3. rescue of particles left behind
# ----------------------------------------------------------------------------------------------


def rescue(problem: TomogramProblem, state: RefineState, params, data, vis) -> int:
    """Move the particles left behind (their peaks outside their windows) by a 3D search.

    A particle is lost when its mean CC over its pairs ``vis`` at the solution ``params`` lies
    ``config.rescue_z`` robust standard deviations below the median particle's (with at least
    3 visible tilts). Lost particles are searched in full-box CC maps at the state's refined
    tilt geometry (:func:`_rescue_search`). Returns the number of particles moved.
    """
    cfg, n = problem.config, problem.particles.n_particles
    vals = np.asarray(optimise.pair_values_at(params, data, problem.options))[:n]
    w = vis.astype(np.float64)
    score_p = np.sum(vals * w, axis=1) / np.maximum(w.sum(axis=1), 1.0)
    med, sigma = _median_and_robust_sigma(score_p)
    lost = np.flatnonzero((score_p < med - cfg.rescue_z * sigma) & (w.sum(axis=1) >= 3))
    state.metrics.setdefault("rescue_scores", score_p.tolist())
    if lost.size:
        t0 = time.perf_counter()
        # the same predictions the CC windows use (motion, deformation, visibility)
        geom = predict(problem, state).subset(lost)
        positions = state.positions_px.copy()
        positions[lost] += _rescue_search(problem, state.projections, geom)
        state.positions_px = positions
        problem.report("rescue", particles=int(lost.size), seconds=time.perf_counter() - t0)
    state.metrics.setdefault("rescued_particles", []).extend(lost.tolist())
    return int(lost.size)


def _rescue_search(problem: TomogramProblem, projections: np.ndarray, geom: PairGeometry) -> np.ndarray:
    """3D position corrections ``(m, 3)`` (pixels) of lost particles by exhaustive search.

    ``geom`` holds the lost particles' current predictions (as for the CC windows). Full-box CC
    maps (displacements up to ``±(s/2 − 2)``) are computed there; every integer 3D displacement
    ``δ`` within that range is scored by the sum over tilts of the maps at the projected
    displacement ``P_f[:2,:3]·δ`` (nearest sample), and the best one is returned (the following
    outer iteration refines it).
    """
    box = problem.config.box
    hw = box // 2 - 2
    win = ccmaps.compute_cc_windows(
        problem.stack, geom, problem.const, box=box, half_width=hw, chunk=problem.chunk,
    )
    g = np.arange(-hw, hw + 1, dtype=np.float64)
    grid = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    du = np.einsum("fij,gj->gfi", projections[:, :2, :3], grid)  # (G, F, 2)
    ix = np.rint(du[..., 0]).astype(np.int64) + hw
    iy = np.rint(du[..., 1]).astype(np.int64) + hw
    inside = (ix >= 0) & (ix <= 2 * hw) & (iy >= 0) & (iy <= 2 * hw)
    ixc, iyc = np.clip(ix, 0, 2 * hw), np.clip(iy, 0, 2 * hw)
    f_idx = np.broadcast_to(np.arange(projections.shape[0])[None, :], ix.shape)
    out = np.zeros((len(geom.u_px), 3))
    for k in range(len(geom.u_px)):
        vals = win[k][f_idx, iyc, ixc] * (inside & geom.visible[k][None, :])
        out[k] = grid[np.argmax(vals.sum(axis=1))]
    return out


# ----------------------------------------------------------------------------------------------
# 4. final stage on the exact CC
# ----------------------------------------------------------------------------------------------


def exact_passes(problem: TomogramProblem, state: RefineState) -> tuple | None:
    """Up to ``config.exact_passes`` passes of L-BFGS on the exact CC's local expansion.

    Every visible pair's exact CC (phase ramps, no window grid) is expanded to 4th order about
    the current prediction (:func:`polish3d.refine.likelihood.compute_taylor`); another pass
    follows only if a prediction moved more than ``config.exact_tol_max_px``. The deformation
    stays as refined on the windows: it is smooth over many particles (the grid bias averages
    out) and its poorly conditioned coefficients would need another ~1000 L-BFGS iterations for
    no measurable gain (bench_deformation: 0.1543 px either way).

    Returns ``(data, params)`` of the last pass (its expansion and solution: what
    :func:`validate` refits on held-out particles), or ``None`` when no pass ran.
    """
    cfg = problem.config
    last = None
    n_exact = 0 if cfg.shift_only else max(cfg.exact_passes, 0)
    n_loops = 1 + max((st["outer"] for st in state.metrics["outer"]), default=-1)
    free_exact = tuple(k for k in problem.free if k != "deformation")
    for exact_pass in range(n_exact):
        geom = predict(problem, state)
        t0 = time.perf_counter()
        taylor = likelihood.compute_taylor(
            problem.stack, geom, problem.const, box=cfg.box, chunk=problem.chunk, n_pad=problem.n_pad,
        )
        t_cc = time.perf_counter() - t0
        data, params = _stage2_problem(
            problem, state, geom.u_px, taylor, geom.visible.astype(np.float32),
            taylor_radius_px=cfg.exact_radius_px,
        )
        index = n_loops + exact_pass  # numbered after the outer iterations

        def cb_exact(it, cost, index=index):
            if it < 10 or it % 10 == 0:
                problem.report("iteration", outer=index, iteration=it, cost=cost)

        params, info = optimise.minimise(
            params, data, problem.options, free_keys=free_exact, callback=cb_exact,
            max_iter=cfg.it, ftol=cfg.exact_ftol, move_tol_px=cfg.exact_move_tol_px,
        )
        moved = _adopt(problem, state, params, data, geom.u_px, geom.visible)
        step = _pass_record(index, int(geom.visible.sum()), 0.0, t_cc, info, exact=True, **moved)
        state.metrics["outer"].append(step)
        problem.report("outer", **step)
        last = (data, params)
        if step["move_max_px"] < cfg.exact_tol_max_px:
            break
    return last


def validate(problem: TomogramProblem, start: RefineState, state: RefineState, final) -> None:
    """Held-out validation (:mod:`polish3d.refine.validate`): every tilt's refined geometry is
    judged on particles that did not fit it against its input geometry ``start``; tilts without
    signal or scoring worse keep their input geometry, and everything returns to the input when
    the reference matches nothing (independent searches in the even and odd tilts disagree); a
    reference whose mirror image fits better is reported. Writes ``metrics["validation"]``."""
    cfg = problem.config
    free = tuple(k for k in problem.free if k != "deformation")
    state.projections, state.positions_px, record = validate_mod.validate_tomogram(
        problem.stack, problem.const, predict(problem, start), final, start.projections,
        start.positions_px, state.projections, state.positions_px, box=cfg.box, chunk=problem.chunk,
        options=problem.options, free_keys=free, max_iter=cfg.it, ftol=cfg.exact_ftol,
        thresholds=validate_mod.Thresholds(*cfg.validate_z, search_radius_px=cfg.r),
        report=problem.report,
    )
    t0 = time.perf_counter()
    geom = predict(problem, state)  # the validated geometry (rolled-back tilts included)
    agree = _tilt_half_agreement(problem, state, geom)
    record["half_agreement"] = {"particles": int(agree.size), "agreeing": int(agree.sum()),
                                "seconds": time.perf_counter() - t0}
    if validate_mod.matches_nothing(agree) and record["verdict"] != "reference_mismatch":
        state.projections, state.positions_px = start.projections.copy(), start.positions_px.copy()
        record["verdict"] = "reference_mismatch"
        record["messages"] = [validate_mod.MISMATCH_MESSAGE + "; the input geometry is kept "
                              f"(only {int(agree.sum())} of {agree.size} particles are found at the "
                              "same place in the even and in the odd tilts)"]
    if record["verdict"] != "reference_mismatch":
        checks = _reference_checks(problem, geom)
        record["reference_checks"] = checks
        for message in validate_mod.reference_messages(checks):
            record["messages"] = [*record["messages"], message]
            problem.report("validation", message=message, warning=True)
    record["seconds"] = record.get("seconds", 0.0) + time.perf_counter() - t0
    state.metrics["validation"] = record
    if record["verdict"] == "reference_mismatch":  # the input motion and deformation too
        state.plugin_params = dict(start.plugin_params)


def _spread(n: int, count: int) -> np.ndarray:
    """Indices of up to ``count`` of ``n`` particles, evenly spread over the list."""
    return np.unique(np.linspace(0, n - 1, min(n, count)).astype(int))


def _reference_checks(problem: TomogramProblem, geom: PairGeometry, n_max: int = 128) -> dict:
    """How the reference fits at the refined geometry ``geom``, over up to ``n_max`` particles
    (summed exact CC over each particle's visible tilts; t-statistics over particles):

    ``mirror_z``: the mirror image's CC minus the reference's (positive: the mirror fits better,
    although the geometry was fitted to the reference); ``high_band_z`` / ``low_band_z``: the CC
    from frequencies above / below half the weights' support (``cut_ang``, Å).
    """
    cfg = problem.config
    sub = _spread(problem.particles.n_particles, n_max)
    sub = sub[geom.visible[sub].sum(axis=1) >= 3]
    if sub.size < 3:
        return {"particles": int(sub.size)}
    m = sub.size
    # the pairs twice: as they are, and with the particles' z axis reversed — the mirror image
    # z → −z of the reference sliced at R is the reference sliced at R·diag(1, 1, −1): one pass
    g = geom.subset(np.concatenate([sub, sub]))
    g = dataclasses.replace(g, cam_rot=np.concatenate([g.cam_rot[:m], g.cam_rot[m:] * [1.0, 1.0, -1.0]]))
    w = np.asarray(problem.const.weights)
    k_max = likelihood.spectrum_support(w * np.asarray(problem.const.dose), cfg.box)
    cc = likelihood.compute_taylor(problem.stack, g, problem.const, box=cfg.box, chunk=problem.chunk,
                                   order=0, low_radius=0.5 * k_max)[: 2 * m]
    summed = np.where(g.visible[..., None], cc, 0.0).sum(axis=1)  # (2m, 2): over the particles' tilts
    # the reference's CC and its low band from one spectrum per pair; the mirror's
    own, low_cc, mirror = summed[:m, 0], summed[:m, 1], summed[m:, 0]

    def t(values):
        return float(validate_mod.t_statistic(values[:, None], np.ones((values.size, 1), bool))[0][0])

    return {"particles": int(sub.size), "mirror_z": t(mirror - own), "high_band_z": t(own - low_cc),
            "low_band_z": t(low_cc), "cut_ang": float(cfg.box * problem.ts.pixel_size_ang / (0.5 * k_max))}


def _tilt_half_agreement(problem: TomogramProblem, state: RefineState, geom: PairGeometry,
                         n_max: int = 48) -> np.ndarray:
    """``(m,)`` whether each of up to ``n_max`` particles (evenly spread) is found at the same 3D
    place by independent searches in the even and in the odd tilts, at the refined tilt geometry
    (``state``, predicted as ``geom``; :func:`polish3d.refine.validate.half_positions`; search
    radius 10 px, at most ``s/2 − 2``: chance agreement within 3 px ~1 %; a matching particle is
    found at the refined position, the centre of the search)."""
    cfg = problem.config
    sub = _spread(problem.particles.n_particles, n_max)
    sub = sub[geom.visible[sub].sum(axis=1) >= 6]  # both halves need tilts
    if sub.size == 0:
        return np.zeros(0, bool)
    radius = int(min(cfg.box // 2 - 2, validate_mod.HALF_SEARCH_RADIUS_PX))
    # the outer passes' window width when it is wide enough (their compiled CC function serves)
    half_width = problem.half_width_px if problem.half_width_px >= radius else radius
    win = ccmaps.compute_cc_windows(
        problem.stack, geom.subset(sub), problem.const, box=cfg.box, half_width=half_width,
        chunk=problem.chunk,
    )
    halves = validate_mod.half_positions(win, state.projections, geom.visible[sub], radius)
    return validate_mod.positions_agree(halves)


# ----------------------------------------------------------------------------------------------
# 5. summary
# ----------------------------------------------------------------------------------------------


def summarise(
    problem: TomogramProblem, start: RefineState, final: RefineState, t_start: float
) -> TomogramResult:
    """The result record of the refinement from its input geometry ``start`` and its final
    geometry ``final``: displacements of the predictions, per-tilt CC, the plug-ins' models."""
    ts, f = problem.ts, problem.ts.n_tilts
    disp = np.linalg.norm(predict(problem, final).u_px - predict(problem, start).u_px, axis=-1)
    metrics = final.metrics
    metrics["per_tilt_cc_first"] = final.per_tilt_cc_first
    metrics["per_tilt_cc_last"] = final.per_tilt_cc_last
    metrics["per_tilt_displacement_rms_px"] = [float(np.sqrt(np.mean(disp[:, j] ** 2))) for j in range(f)]
    metrics["displacement_rms_px"] = float(np.sqrt(np.mean(disp**2)))
    metrics["displacement_max_px"] = float(disp.max()) if disp.size else 0.0
    result = TomogramResult(
        name=ts.name,
        projections=final.projections,
        positions_px=None if problem.config.shift_only else final.positions_px,
        trajectories_px=problem.particles.trajectories_px,
        deformation=ts.deformation,
        metrics=metrics,
        particle_names=tuple(problem.particles.names),
        status="converged" if all(st.get("converged", True) for st in metrics["outer"][-1:])
        else "not_converged",
    )
    for pl in problem.plugins.values():
        pl.finish(final.plugin_params[pl.key], result)
    metrics["seconds"] = time.perf_counter() - t_start
    return result
