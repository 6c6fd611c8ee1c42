"""Held-out validation of a refined tomogram: keep what the data support, roll back the rest.

After the final exact stage every tilt's new geometry is judged on particles that did not fit
it (see ``docs/algorithm.md``, "Held-out validation"):

1. **Two folds** of particles, ``A`` (even indices) and ``B`` (odd). The tilt geometry (and any
   other parameter shared by the particles: motion) is refitted on ``A`` alone, from the refined
   geometry, on the final stage's exact-CC expansion (:mod:`polish3d.refine.likelihood`); then
   ``B``'s positions are refitted with those tilts frozen and ``B``'s CC is read at that point:
   the **held-out CC** of the ``B`` pairs. The same with the folds swapped gives every pair one.
   All of it stays within the expansion's trust radius, so it costs four cheap L-BFGS runs.
2. The **input CC** of every pair: the exact CC at the input prediction (the 0th Taylor
   coefficient of one more CC pass at the input geometry, same constants and whitening).
3. Per tilt: the **improvement** ``z`` (paired t-statistic of held-out − input CC over the
   particles visible in both) and the **signal** ``signal_z`` (the larger t-statistic of the
   held-out and of the input CC against 0, the CC's mean where no particle is, the DC being
   removed by the weights). :func:`decide` turns them into verdicts.

:func:`validate_tomogram` is the one entry point of the refinement; :func:`held_out_cc` and
:func:`decide` are its parts (tested separately).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from polish3d.refine import likelihood, optimise

__all__ = [
    "LOW_RESOLUTION_MESSAGE",
    "MIRROR_MESSAGE",
    "MISMATCH_MESSAGE",
    "mirror_z",
    "half_positions",
    "positions_agree",
    "reference_messages",
    "Thresholds",
    "decide",
    "held_out_cc",
    "t_statistic",
    "validate_tomogram",
]

MIRROR_MESSAGE = (
    "the mirror image of the reference fits these particles better than the reference itself "
    "(t = {t:.1f} over {n} particles): the reference probably has the wrong hand; flip it (e.g. "
    "relion_image_handler --flipZ) and run again"
)
#: a mirror image this many standard errors better than the reference is reported
MIRROR_Z = 3.0
LOW_RESOLUTION_MESSAGE = (
    "frequencies beyond {cut:.0f} Å add little to how the reference fits these particles (t = "
    "{high:.1f} against {low:.1f} below): it matches them only at low resolution; check that it "
    "is the right structure, at the right pixel size"
)
#: below this ratio of the high- to the low-frequency t-statistic the reference is reported
LOW_RESOLUTION_RATIO = 1 / 3

#: particles (evenly spread) whose held-out and input CC judge the tilts
MAX_JUDGED = 256
#: radius (px) of the even/odd-tilt position searches (:func:`half_positions`); the cost grows
#: with its cube, chance agreement within 3 px is ~1 %
HALF_SEARCH_RADIUS_PX = 10

MISMATCH_MESSAGE = (
    "the reference does not match these particles: check the reference map, its pixel size and "
    "handedness"
)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Decision thresholds (t-statistics, i.e. standard errors).

    Attributes:
        signal_z: a tilt whose held-out and input CC both stay below this many standard errors
            above 0 has no signal (keeps its input geometry); a particle likewise (flagged).
        worse_z: a tilt whose held-out CC lies this many standard errors below its input CC is
            rolled back.
        improved_z: a tilt whose held-out CC lies this many standard errors above its input CC
            is ``"improved"`` (else ``"kept"``); the tomogram's total improvement must reach it
            unless the reference is to be blamed.
        mismatch_fraction: the reference is declared not to match when at least this fraction of
            the tilts has no signal.
        search_radius_px: radius (pixels) over which the refinement searched every particle's
            position (the CC window, ``--r``): sets the selection bias of the held-out CC
            (:func:`search_bias`).
    """

    signal_z: float = 3.0
    worse_z: float = 3.5
    improved_z: float = 3.0
    mismatch_fraction: float = 0.5
    search_radius_px: float = 8.0


def half_positions(windows: np.ndarray, projections: np.ndarray, visible: np.ndarray,
                   radius_px: int) -> np.ndarray:
    """Each particle's best 3D displacement found separately in the even and in the odd tilts.

    A search over every integer displacement ``δ`` (``|δ_i| ≤ radius_px``, tomogram pixels) of the
    sum over one half of the tilts of the particle's CC windows at the projected displacement
    ``P_f[:2,:3]·δ`` (nearest sample; pairs outside a window or not visible count 0).

    Args:
        windows: ``(N, F, 2·h+1, 2·h+1)`` CC windows centred on the predictions (``h ≥ 0``).
        projections: ``(F, 4, 4)`` the geometry of the predictions.
        visible: ``(N, F)`` pairs to use.
        radius_px: search radius (pixels).

    Returns:
        ``(2, N, 3)`` displacements (pixels): from the even rows, from the odd rows.
    """
    h = windows.shape[-1] // 2
    g = np.arange(-radius_px, radius_px + 1, dtype=np.float64)
    grid = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    du = np.einsum("fij,gj->fgi", np.asarray(projections)[:, :2, :3], grid)  # (F, G, 2)
    ix = np.rint(du[..., 0]).astype(np.int32) + h
    iy = np.rint(du[..., 1]).astype(np.int32) + h
    inside = (ix >= 0) & (ix <= 2 * h) & (iy >= 0) & (iy <= 2 * h)
    d2 = (2 * h + 1) ** 2
    f = du.shape[0]
    # one flat gather per particle: window f's sample at (iy, ix), or the trailing 0 outside
    flat = np.where(inside, np.arange(f)[:, None] * d2 + iy * (2 * h + 1) + ix, f * d2).astype(np.int32)
    even = np.arange(f) % 2 == 0
    n = len(windows)
    n_pad = -(-n // 16) * 16  # few compiled shapes
    halves = np.zeros((n_pad, 2, f), np.float32)
    halves[:n] = np.stack([even[None] & visible, ~even[None] & visible], 1)
    samples = np.zeros((n_pad, f * d2 + 1), np.float32)  # the trailing 0: outside a window
    samples[:n, :-1] = np.asarray(windows, np.float32).reshape(n, -1)
    best = np.asarray(_half_search(jnp.asarray(samples), jnp.asarray(halves), jnp.asarray(flat)))[:n]
    return np.moveaxis(grid[best], 1, 0)


@jax.jit
def _half_search(samples, halves, flat):
    """``(N, 2)`` grid index of the maximum of ``halves (N, 2, F) @ samples[flat] (F, G)`` per
    particle, one particle at a time (the gathered ``(F, G)`` block is not stored for all)."""
    return jax.lax.map(lambda a: jnp.argmax(a[1] @ a[0][flat], axis=1), (samples, halves))


def positions_agree(halves: np.ndarray, tolerance_px: float = 3.0) -> np.ndarray:
    """``(N,)`` true where the even- and odd-tilt positions of :func:`half_positions` lie within
    ``tolerance_px`` of each other (3D distance, pixels)."""
    return np.linalg.norm(halves[0] - halves[1], axis=-1) <= tolerance_px


def matches_nothing(agree: np.ndarray, min_fraction: float = 1 / 3, min_count: int = 3) -> bool:
    """The reference matches nothing when few particles' positions found in the even tilts agree
    with those found in the odd tilts: fewer than ``max(min_count, min_fraction·n)``. With fewer
    than ``2·min_count`` particles tested nothing is concluded.

    Where the reference matches, both halves find the particle's peak (every particle agreed in
    ``benchmarks/bench_validation.py`` down to SNR 0.02); where it matches nothing, the two argmax
    positions are maxima of noise over ``(2·r+1)³`` displacements, which agree by chance with
    probability ``(4/3)π·3³ / (2r+1)³`` (10⁻³ for ``r`` = 20) plus the pull of the refined
    position both searches start from (it was selected on the same noise): 1 and 7 of 48
    particles with a random-phase reference.
    """
    agree = np.asarray(agree, bool)
    if agree.size < 2 * min_count:  # too few particles to tell (a tomogram of a handful)
        return False
    return bool(agree.sum() < max(min_count, min_fraction * agree.size))


def mirror_z(refs_ft):
    """The prepared half maps ``(2, s, s, s//2+1)`` (``[half, kz, ky, kx]``, phase origin at the box
    centre) of the mirror image ``z → −z`` about the centre voxel: ``F'(kz) = F(−kz)``."""
    return jnp.roll(jnp.flip(refs_ft, axis=1), 1, axis=1)


def reference_messages(checks: dict) -> list[str]:
    """The warnings the reference checks of the validation stage call for (see
    ``docs/algorithm.md``): a mirror image that fits significantly better, or a fit that
    frequencies above the cut do not improve while those below it do."""
    out = []
    if checks.get("mirror_z", 0.0) >= MIRROR_Z:
        out.append(MIRROR_MESSAGE.format(t=checks["mirror_z"], n=checks["particles"]))
    low, high = checks.get("low_band_z", 0.0), checks.get("high_band_z", 0.0)
    if low >= 3.0 and high < LOW_RESOLUTION_RATIO * low:
        out.append(LOW_RESOLUTION_MESSAGE.format(cut=checks["cut_ang"], high=high, low=low))
    return out


def search_bias(radius_px: float) -> float:
    """Expected maximum (in standard deviations) of a particle's 3D CC score field over a ball
    of ``radius_px``: ``sqrt(2 ln M)`` with ``M = 4/3 π r³`` cells (the whitened CC decorrelates
    over about a pixel). Where the reference matches nothing, the refinement leaves every
    particle at such a maximum: its CC summed over ``F`` tilts is then that many standard
    deviations, ``search_bias / sqrt(F)`` per tilt, above 0 on held-out data too."""
    cells = max(4.0 / 3.0 * np.pi * max(float(radius_px), 1.0) ** 3, 2.0)
    return float(np.sqrt(2.0 * np.log(cells)))


def t_statistic(values: np.ndarray, mask: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean / standard error of ``values`` where ``mask`` along ``axis``, and the counts.

    Fewer than 3 values give 0 (nothing can be concluded); a zero spread gives ``±1e6``·sign.
    """
    w = np.asarray(mask, np.float64)
    v = np.where(mask, np.asarray(values, np.float64), 0.0)
    n = w.sum(axis)
    mean = v.sum(axis) / np.maximum(n, 1.0)
    var = (np.where(mask, v - np.expand_dims(mean, axis), 0.0) ** 2).sum(axis) / np.maximum(n - 1.0, 1.0)
    se = np.sqrt(var / np.maximum(n, 1.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, mean / np.where(se > 0, se, 1.0), np.sign(mean) * 1e6)
    return np.where(n >= 3, t, 0.0), n.astype(int)


def held_out_cc(data: dict, params, options, free_keys: tuple[str, ...], *,
                max_iter: int = 10000, ftol: float = 1e-10) -> np.ndarray:
    """Held-out CC ``(N_pad, F)`` of every pair (0 where the data's weight is 0).

    ``data``/``params``: the final stage's problem (Taylor store) and its solution. Fold ``A``
    (even particle indices) refits every free parameter but the positions of ``B`` (odd
    indices); ``B``'s positions are then refitted with the rest frozen, and ``B``'s CC is
    evaluated; then the reverse. The solution's position changes are moved into the data (so
    the start is the refined geometry whatever the gauge), and the translational gauge is fixed
    on the fold being fitted (``particle_mask``): same options and shapes as the final stage, so
    nothing is compiled again but the positions-only fit.
    """
    start = jax.tree_util.tree_map(jnp.asarray, params)
    mask = np.asarray(data["particle_mask"]) > 0
    pos = np.asarray(start.positions, np.float64)
    if options.fix_gauge_positions:
        pos = pos - pos[mask].mean(0)
    data = {**data, "positions": jnp.asarray(np.asarray(data["positions"], np.float64) + pos * mask[:, None],
                                             jnp.float32)}
    start = dataclasses.replace(start, positions=jnp.zeros_like(start.positions))
    weight = np.asarray(data["weight"], np.float32)
    index = np.arange(mask.size)
    folds = (mask & (index % 2 == 0), mask & (index % 2 == 1))
    particle_keys = tuple(k for k in free_keys if k == "positions")
    out = np.zeros(weight.shape, np.float64)
    for fit, held in (folds, folds[::-1]):
        d_fit = {**data, "weight": jnp.asarray(weight * fit[:, None]),
                 "particle_mask": jnp.asarray(fit, jnp.float32)}
        fitted, _ = optimise.minimise(start, d_fit, options, free_keys=free_keys, max_iter=max_iter,
                                      ftol=ftol)
        d_held = {**data, "weight": jnp.asarray(weight * held[:, None]),
                  "particle_mask": jnp.asarray(held, jnp.float32)}
        if particle_keys:
            fitted, _ = optimise.minimise(fitted, d_held, options, free_keys=particle_keys,
                                          max_iter=max_iter, ftol=ftol)
        vals = np.asarray(optimise.pair_values_at(fitted, d_held, options), np.float64)
        out[held] = vals[held]
    return np.where(weight > 0, out, 0.0)


def decide(held: np.ndarray, cc_input: np.ndarray, visible: np.ndarray,
           thresholds: Thresholds = Thresholds()) -> dict:
    """The verdicts from the pairs' held-out and input CC (pure function of the numbers).

    Args:
        held, cc_input: ``(N, F)`` CC of every pair at the held-out refined geometry and at the
            input geometry.
        visible: ``(N, F)`` pairs visible in both geometries.
        thresholds: see :class:`Thresholds`.

    Returns:
        ``{"z", "signal_z", "cc_input", "cc_refined", "n"}`` per tilt ``(F,)``, ``"tilt_verdict"``
        ``(F,)`` strings (``"improved"``, ``"kept"``, ``"rolled_back"``, ``"no_signal"``),
        ``"rollback"`` ``(F,)`` bool, ``"z_total"`` (t-statistic over particles of the summed
        improvement), ``"z_signal"`` (the same for the held-out CC), ``"mismatch"`` (bool),
        ``"weak_particles"`` (indices) and ``"verdict"`` (``"reference_mismatch"``: at least
        ``mismatch_fraction`` of the tilts without signal, everything rolled back;
        ``"rolled_back"``: some tilts rolled back; ``"improved"``/``"kept"``: none, the total
        improvement significant or not).
    """
    th = thresholds
    vis = np.asarray(visible, bool)
    held = np.asarray(held, np.float64)
    cc_input = np.asarray(cc_input, np.float64)
    z, n = t_statistic(held - cc_input, vis)
    # signal: above 0 (the CC's mean off the particle: the weights remove the DC term) by more
    # than the refined positions' selection bias (the input positions were not searched)
    n_p = vis.sum(1)
    z_max = search_bias(th.search_radius_px)
    allowance = z_max * np.sqrt(n) / np.sqrt(max(float(n_p[n_p > 0].mean()) if n_p.any() else 1.0, 1.0))
    signal = np.maximum(t_statistic(held, vis)[0] - allowance, t_statistic(cc_input, vis)[0])
    count = np.maximum(n, 1)
    mean_in = np.where(vis, cc_input, 0.0).sum(0) / count
    mean_out = np.where(vis, held, 0.0).sum(0) / count
    no_signal = (signal < th.signal_z) & (n >= 3)  # (fewer than 3 particles: no conclusion)
    worse = ~no_signal & (z <= -th.worse_z)
    verdict = np.where(no_signal, "no_signal", np.where(
        worse, "rolled_back", np.where(z >= th.improved_z, "improved", "kept")))
    # tomogram: the summed improvement per particle (particles are independent, tilts within a
    # particle are not), and the share of tilts without signal
    seen = vis.any(1)
    z_total = float(t_statistic(np.where(vis, held - cc_input, 0.0).sum(1), seen)[0])
    z_signal = float(t_statistic(np.where(vis, held, 0.0).sum(1), seen)[0])
    f_total = max(int((n > 0).sum()), 1)
    mismatch = bool(no_signal.sum() >= th.mismatch_fraction * f_total)
    # particles: held-out CC summed over their visible tilts, each tilt scaled by the spread of
    # its CC over the particles (noise and signal: conservative), not above the maximum a
    # search over noise reaches
    var = np.where(vis, (held - mean_out) ** 2, 0.0).sum(0) / np.maximum(n - 1, 1)
    spread = np.sqrt(np.maximum(var, 1e-30))
    z_part = np.where(vis, held / spread, 0.0).sum(1) / np.sqrt(np.maximum(n_p, 1))
    weak = np.flatnonzero((n_p >= 3) & (z_part < z_max))
    if mismatch:
        tomo = "reference_mismatch"
    elif (no_signal | worse).any():
        tomo = "rolled_back"
    else:
        tomo = "improved" if z_total >= th.improved_z else "kept"
    return {
        "z": z, "signal_z": signal, "cc_input": mean_in, "cc_refined": mean_out, "n": n,
        "tilt_verdict": verdict, "rollback": no_signal | worse, "z_total": z_total,
        "mismatch": mismatch, "weak_particles": weak, "verdict": tomo,
        "z_signal": z_signal,
    }


def _messages(d: dict) -> list[str]:
    rows = lambda v: np.flatnonzero(d["tilt_verdict"] == v).tolist()  # noqa: E731
    out = []
    if d["mismatch"]:
        out.append(MISMATCH_MESSAGE + "; the input geometry is kept")
    if rows("no_signal") and not d["mismatch"]:
        out.append(f"tilt rows {rows('no_signal')}: no significant signal on held-out particles; "
                   "they keep their input geometry (consider excluding these tilts)")
    if rows("rolled_back"):
        out.append(f"tilt rows {rows('rolled_back')}: the refined geometry scores worse than the "
                   "input on held-out particles; they keep their input geometry")
    weak = d["weak_particles"].tolist()
    if weak and not d["mismatch"]:
        shown = ", ".join(str(i) for i in weak[:20]) + (", …" if len(weak) > 20 else "")
        out.append(f"{len(weak)} particle(s) whose CC does not rise above noise (indices {shown}): "
                   "consider removing them")
    return out


def off(message: str) -> dict:
    """The ``metrics["validation"]`` record of a run without validation."""
    return {"verdict": "off", "tilts": [], "rolled_back_tilts": [], "no_signal_tilts": [],
            "weak_particles": [], "messages": [message], "seconds": 0.0}


def validate_tomogram(
    stack, const, input_geometry, final_problem: tuple | None,
    p_input: np.ndarray, x_input: np.ndarray, p_refined: np.ndarray, x_refined: np.ndarray, *,
    box: int, chunk: int, options, free_keys: tuple[str, ...], thresholds: Thresholds = Thresholds(),
    max_iter: int = 10000, ftol: float = 1e-10, report=None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Judge the refined geometry on held-out particles and roll back what does not hold.

    Args:
        stack, const, box, chunk: as for the CC passes (:func:`likelihood.compute_taylor`).
        input_geometry: the pairs' predictions at the input geometry
            (:class:`~polish3d.refine.ccmaps.PairGeometry`).
        final_problem: ``(data, params)`` of the last exact pass (its Taylor store and its
            solution), or ``None`` (no exact stage ran: the validation is off).
        p_input, x_input: input projections ``(F, 4, 4)`` and positions ``(N, 3)`` (pixels).
        p_refined, x_refined: the refined ones.
        options, free_keys: the final stage's :class:`optimise.StageOptions` and free blocks.
        thresholds: :class:`Thresholds`.
        max_iter, ftol: L-BFGS limits of the fold fits.
        report: optional progress callback ``report(event, **figures)``.

    Returns:
        the projections and positions to keep, and the ``metrics["validation"]`` record.
    """
    t0 = time.perf_counter()
    if final_problem is None:
        return p_refined, x_refined, off("held-out validation needs the final exact stage "
                                         "(exact_passes ≥ 1, not shift_only): not validated")
    data, params = final_problem
    n = x_refined.shape[0]
    held = held_out_cc(data, params, options, free_keys, max_iter=max_iter, ftol=ftol)[:n]
    # the input CC of up to MAX_JUDGED particles (evenly spread): enough for every tilt's
    # t-statistics, and the CC pass (the order the final stage compiled) stays bounded
    judged = np.unique(np.linspace(0, n - 1, min(n, MAX_JUDGED)).astype(int))
    cc_in = np.zeros((n, held.shape[1]))
    cc_in[judged] = likelihood.compute_taylor(stack, input_geometry.subset(judged), const, box=box,
                                              chunk=chunk)[: judged.size, :, 0]
    visible = input_geometry.visible & (np.asarray(data["weight"])[:n] > 0)
    visible &= np.isin(np.arange(n), judged)[:, None]
    d = decide(held, cc_in, visible, thresholds)
    p_out, x_out = np.array(p_refined, np.float64), np.array(x_refined, np.float64)
    if d["mismatch"]:
        p_out, x_out = np.array(p_input, np.float64), np.array(x_input, np.float64)
    else:
        p_out[d["rollback"]] = p_input[d["rollback"]]
    rows = lambda v: np.flatnonzero(d["tilt_verdict"] == v).tolist()  # noqa: E731
    record = {
        "verdict": d["verdict"],
        "tilts": [
            {"row": j, "cc_input": float(d["cc_input"][j]), "cc_refined": float(d["cc_refined"][j]),
             "z": float(d["z"][j]), "signal_z": float(d["signal_z"][j]),
             "verdict": str(d["tilt_verdict"][j])}
            for j in range(len(d["z"]))
        ],
        "rolled_back_tilts": rows("rolled_back"),
        "no_signal_tilts": rows("no_signal"),
        "weak_particles": d["weak_particles"].tolist(),
        "z_total": d["z_total"], "z_signal": d["z_signal"],
        "messages": _messages(d),
        "seconds": time.perf_counter() - t0,
    }
    if report is not None:
        report("validation", verdict=record["verdict"], rolled_back=len(record["rolled_back_tilts"]),
               no_signal=len(record["no_signal_tilts"]), weak_particles=len(record["weak_particles"]),
               messages=record["messages"], seconds=record["seconds"])
    return p_out, x_out, record
