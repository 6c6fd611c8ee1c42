"""Refinement of one tomogram: outer iterations of (CC stage → geometry stage).

Arrays in, arrays out: :func:`refine_tomogram` takes the typed records of :mod:`polish3d.model`,
the tilt stack (any ``(F, H, W)`` array-like, e.g. a memmap) and the two prepared half maps, and
returns a :class:`~polish3d.model.TomogramResult`. It never prints; progress goes to an optional
callback ``progress(event: str, **figures)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from polish3d import geometry, imaging
from polish3d.errors import InputError
from polish3d.model import ParticleData, TiltSeriesData, TomogramResult
from polish3d.refine import ccmaps, likelihood, optimise, stage2, validate

__all__ = [
    "AlignConfig",
    "prepare_references",
    "prepare_tomogram_constants",
    "reference_envelope",
    "refine_tomogram",
]


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """Options of one alignment run (plain Python, hashable). Names follow ``relion_tomo_align``.

    Attributes:
        box: ``--b``, box size in tilt-series pixels.
        r: ``--r``, max. 2D position error in pixels (half-width of the CC window).
        const_p, const_a, const_s: freeze positions / per-tilt angles / per-tilt shifts.
        range_reg: ``--range_reg``.
        it: ``--it``, max. L-BFGS iterations per outer iteration.
        whiten: not ``--no_whiten``.
        per_frame_noise, srp, hp, cutoff_fract: frequency-weight options (§2.4).
        min_frame, max_frame: dose-rank range used in the cost (``-1``: last).
        shift_only, shift_only_by_particles: rigid per-tilt 2D shifts only.
        outer: polish3d: number of CC-map computations (the 2nd and later at the refined
            geometry, so rotations enter the predictions and the capture range is not ±r).
        blur_px: polish3d: coarse-to-fine schedule of Gaussian low-passes (px) applied to the
            first CC maps, one L-BFGS run each (ends with 0): widens the capture range.
        coarse_particles: polish3d: particles used by the per-tilt shift search.
        coarse_min_z: polish3d: a tilt's searched shift is applied only if the peak of its summed
            CC stands this many robust standard deviations above the map's median.
        coarse_shift: polish3d: start with a per-tilt shift search over the whole box (capture
            range ± s/2 instead of ± r).
        chunk: particles per CC-stage call (memory bound); 0: automatic (8 on a CPU, where
            small batches stay in cache, 64 on an accelerator).
        rescue: polish3d: after the first outer iteration, particles whose mean CC at the solution
            lies ``rescue_z`` robust standard deviations below the median particle's are searched
            in 3D in full-box CC maps at the refined tilt geometry (particles left behind).
        rescue_z: see ``rescue``.
        full_recompute: polish3d: recompute every CC window in every outer iteration (else only
            the particle–tilt pairs whose predicted position moved more than ``recompute_px``
            from its window centre, or that became visible).
        recompute_px: see ``full_recompute`` (pixels; negative: ``0.6 · r``, a drift after which
            the peak may have left the window's comfortable range).
        tol_rms_px, tol_max_px: stop the outer iterations once the projected positions move less
            than this (RMS and maximum over particles × tilts, pixels) in one outer iteration.
        exact_passes: polish3d: after the outer iterations, up to this many passes of the final
            stage (0: off): every visible pair's exact CC (the trigonometric polynomial the CC
            window samples, i.e. sub-pixel shifts as Fourier phase ramps) is expanded to 4th
            order about the current geometry (:mod:`polish3d.refine.likelihood`) and the
            stage-2 objective is minimised on it instead of on bicubically interpolated windows,
            whose sampling grid biases the optimum towards the window centres (the start). Not
            with ``shift_only``; a 2D deformation is applied but held at its refined value.
        exact_ftol: L-BFGS stopping tolerance of the final stage (relative cost decrease).
        exact_radius_px: displacement (pixels) within which a pass trusts its expansion.
        exact_tol_max_px: another pass (re-expanded at the new geometry) only if a projected
            position moved more than this (pixels) in the last one.
        validate: judge the result on held-out particles and roll back what they do not support
            (:mod:`polish3d.refine.validate`; needs the final stage).
        validate_z: its thresholds in standard errors: no signal below, rolled back at or below
            minus, improved at or above (:class:`polish3d.refine.validate.Thresholds`).
    """

    box: int
    r: float = 20.0
    const_p: bool = False
    const_a: bool = False
    const_s: bool = False
    range_reg: float = 0.0
    it: int = 10000
    whiten: bool = True
    per_frame_noise: bool = False
    srp: float = 0.0
    hp: float = -1.0
    cutoff_fract: float = 0.02
    min_frame: int = 0
    max_frame: int = -1
    shift_only: bool = False
    shift_only_by_particles: bool = False
    outer: int = 3
    blur_px: tuple[float, ...] = (3.0, 1.0, 0.0)
    coarse_particles: int = 128
    coarse_min_z: float = 6.0
    coarse_shift: bool = True
    chunk: int = 0
    rescue: bool = True
    rescue_z: float = 5.0
    full_recompute: bool = False
    recompute_px: float = -1.0
    tol_rms_px: float = 0.05
    tol_max_px: float = 1.0
    exact_passes: int = 2
    exact_ftol: float = 1e-10
    exact_radius_px: float = 0.5
    exact_tol_max_px: float = 0.1
    validate: bool = True  # held-out validation (polish3d.refine.validate)
    validate_z: tuple[float, float, float] = (3.0, 3.5, 3.0)  # its signal, worse, improved thresholds


def prepare_references(half1, half2, box: int, mask=None, *, names=("half map 1", "half map 2", "mask")):
    """Check and prepare the two half maps for the CC stage (RELION §2.3).

    Args:
        half1, half2: ``(s0, s0, s0)`` half maps ``[z, y, x]`` at the tilt-series pixel size.
        box: ``--b``; maps smaller than it are zero-padded, larger ones are an error.
        mask: optional real-space mask of the maps' size, multiplied into both.
        names: how the maps are named in error messages (file names, for example).

    Returns:
        ``refs_ft (2, s, s, s//2+1)`` and ``(spectral_index, fsc)`` of the (masked) half maps,
        the FSC used when no FSC table is given.

    Raises:
        InputError: maps of different or non-cubic shapes, larger than the box, or a mask of
            another size.
    """
    half1 = np.asarray(half1, np.float32)
    half2 = np.asarray(half2, np.float32)
    if half1.shape != half2.shape or half1.ndim != 3 or len(set(half1.shape)) != 1:
        raise InputError(
            f"half maps must be two equal cubes: {names[0]} {half1.shape} vs {names[1]} {half2.shape}"
        )
    if half1.shape[0] > box:
        raise InputError(
            f"reference {names[0]} is {half1.shape[0]} px, larger than the box --b {box}; "
            "use a larger --b or a smaller reference"
        )
    if mask is not None:
        mask = np.asarray(mask, np.float32)
        if mask.shape != half1.shape:
            raise InputError(f"{names[2]} is {mask.shape}, the half maps {half1.shape}")
    refs_ft = jnp.stack([imaging.prepare_reference(h, box, mask) for h in (half1, half2)])
    m = 1.0 if mask is None else mask
    return refs_ft, imaging.fsc_from_half_maps(half1 * m, half2 * m)


_ENVELOPE = jax.jit(
    imaging.fsc_envelope,
    static_argnames=("box", "ref_box", "pixel_size_ang", "freq_cutoff_ang", "width", "use_snr"),
)


def reference_envelope(
    spectral_index, fsc, box: int, pixel_size_ang: float, *, freq_cutoff_ang: float = -1.0,
    width: float = 5.0, use_snr: bool = False,
) -> np.ndarray:
    """``imaging.fsc_envelope`` for a reference padded to ``box`` (compiled once; its eager form
    dispatches ~100 small operations)."""
    return np.asarray(
        _ENVELOPE(
            np.asarray(spectral_index), np.asarray(fsc, np.float32), box=int(box), ref_box=int(box),
            pixel_size_ang=float(pixel_size_ang), freq_cutoff_ang=float(freq_cutoff_ang),
            width=float(width), use_snr=bool(use_snr),
        )
    )


@functools.partial(jax.jit, static_argnames=("box",))
def _tile_power(tiles, box: int):
    """Radially averaged mean unitary periodogram of ``(T, s, s)`` tiles → ``(s//2+1,)``."""
    ft = jnp.fft.rfft2(tiles, norm="ortho")
    return imaging.radial_average(jnp.mean(ft.real**2 + ft.imag**2, axis=0), box)


def noise_spectra(stack, box: int, max_tiles: int = 256) -> np.ndarray:
    """Radial noise power ``(F, s//2+1)`` of every tilt image (RELION's whitening input, §2.4).

    The mean periodogram of ``s × s`` tiles on RELION's 50 %-overlap grid (tiles start at
    multiples of ``s//2`` and lie inside the image). For large images an evenly spread subset of
    at most ``max_tiles`` tiles is used (a 4k × 6k image has ~6000 at box 128; 256 tiles estimate
    each shell of the radial average to about 1–2 %).
    """
    f, h, w = stack.shape
    step = box // 2
    ys = np.arange((h - box) // step + 1) * step
    xs = np.arange((w - box) // step + 1) * step
    corners = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    if len(corners) > max_tiles:
        corners = corners[np.unique(np.linspace(0, len(corners) - 1, max_tiles).astype(int))]
    out = np.empty((f, box // 2 + 1), np.float64)
    for j in range(f):
        img = np.asarray(stack[j], np.float32)
        tiles = np.lib.stride_tricks.sliding_window_view(img, (box, box))[corners[:, 0], corners[:, 1]]
        out[j] = np.asarray(_tile_power(jnp.asarray(tiles), box))
    return out


@functools.partial(jax.jit, static_argnames=("box",))
def _dose_stack(pre_exposure, pixel_size, bfactor, box: int):
    return jax.vmap(lambda n: imaging.dose_weights(box, pixel_size, n, bfactor))(pre_exposure)


def prepare_tomogram_constants(
    ts: TiltSeriesData, stack, refs_ft, envelope: np.ndarray, config: AlignConfig
) -> dict:
    """The CC-stage constants of one tomogram (weights, dose, CTF parameters, references)."""
    box = config.box
    noise = noise_spectra(stack, box)
    dose = dose_weight_stack(ts, box, ts.pixel_size_ang)
    weights = ccmaps.frequency_weights(
        noise, envelope, dose, box=box, whiten=config.whiten, per_frame_noise=config.per_frame_noise,
        srp=config.srp, hp=config.hp, cutoff_fract=config.cutoff_fract,
    )
    dose = np.where(weights > 0, dose, 0.0)
    return {
        "refs": refs_ft,
        "weights": jnp.asarray(weights),
        "dose": jnp.asarray(dose, jnp.float32),
        **ctf_constants(ts, ts.pixel_size_ang),
    }


def dose_weight_stack(ts: TiltSeriesData, box: int, pixel_size_ang: float) -> np.ndarray:
    """Per-tilt dose weights ``(F, box, box//2+1)`` of a box sampled at ``pixel_size_ang``."""
    return np.asarray(
        _dose_stack(
            jnp.asarray(ts.pre_exposure_e_per_ang2, jnp.float32), jnp.float32(pixel_size_ang),
            jnp.float32(ts.bfactor_per_dose_ang2), box,
        )
    )


def ctf_constants(ts: TiltSeriesData, pixel_size_ang: float) -> dict:
    """Per-tilt CTF parameters (float32) of the CC stage and the reconstruction, for boxes sampled
    at ``pixel_size_ang`` (the defocus change with depth stays in tilt-series pixels)."""
    f32 = jnp.float32
    return {
        "defocus_u": jnp.asarray(ts.defocus_u_ang, f32),
        "defocus_v": jnp.asarray(ts.defocus_v_ang, f32),
        "defocus_angle": jnp.asarray(ts.defocus_angle_deg, f32),
        "phase_shift": jnp.asarray(ts.phase_shift_deg, f32),
        "bfactor": jnp.asarray(ts.ctf_bfactor_ang2, f32),
        "ctf_scale": jnp.asarray(ts.ctf_scale, f32),
        "pixel_size": f32(pixel_size_ang),
        "voltage": f32(ts.voltage_kv),
        "cs": f32(ts.cs_mm),
        "q0": f32(ts.amplitude_contrast),
        "hand_slope_px": f32(ts.hand * ts.defocus_slope * ts.pixel_size_ang),
    }


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
        **extra,
    }


def coarse_box(box: int, r: float) -> int:
    """Box of the per-tilt shift search: at least ``4·r`` so shifts up to ~``2r`` are captured."""
    need = int(math.ceil(4.0 * r))
    return max(box, need + need % 2)


def _padded_problem(refs_ft, envelope: np.ndarray, box: int, cbox: int):
    """The prepared half maps and the envelope of box ``box`` carried over to a larger box."""
    cp = imaging.centre_phase_3d(box)
    vols = jnp.fft.irfftn(refs_ft * np.conj(cp), s=(box, box, box), norm="ortho")
    lo = (cbox - box) // 2
    inner = (slice(None),) + (slice(lo, lo + box),) * 3
    padded = jnp.zeros((2, cbox, cbox, cbox), vols.dtype).at[inner].set(vols)
    refs_c = jnp.fft.rfftn(padded, axes=(1, 2, 3), norm="ortho") * imaging.centre_phase_3d(cbox)
    profile = np.asarray(envelope)[0]  # along kx: radius 0..box/2
    radii = np.arange(cbox // 2 + 1) * box / cbox
    prof_c = np.interp(radii, np.arange(profile.size), profile, right=0.0)
    env_c = np.asarray(imaging.radial_expand(prof_c.astype(np.float32), cbox))
    return refs_c.astype(jnp.complex64), env_c


def _median_and_robust_sigma(a: np.ndarray, axis=None):
    """Median and robust standard deviation (1.4826 × median absolute deviation) along ``axis``."""
    med = np.median(a, axis=axis, keepdims=True)
    sigma = 1.4826 * np.median(np.abs(a - med), axis=axis, keepdims=True)
    return np.squeeze(med, axis), np.squeeze(sigma, axis)


def _visible(u: np.ndarray, image_size_px, box: int) -> np.ndarray:
    w, h = image_size_px
    half = box / 2.0
    return (
        (u[..., 0] > half) & (u[..., 0] < w - half) & (u[..., 1] > half) & (u[..., 1] < h - half)
    )


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


def refine_tomogram(
    ts: TiltSeriesData,
    particles: ParticleData,
    stack,
    refs_ft,
    envelope: np.ndarray,
    config: AlignConfig,
    *,
    motion=None,
    deformation=None,
    progress: Callable[..., None] | None = None,
) -> TomogramResult:
    """Refine the per-tilt projections and particle positions of one tomogram.

    Args:
        ts: the tilt series (geometry, CTF, dose).
        particles: its particles (positions, rotations, half sets, optional input motion).
        stack: ``(F, H, W)`` tilt images in file order.
        refs_ft: ``(2, s, s, s//2+1)`` prepared half maps (``imaging.prepare_reference``).
        envelope: ``(s, s//2+1)`` reference frequency envelope.
        config: options.
        motion: motion options (``refine.motion.MotionConfig``) or ``None``.
        deformation: deformation options (``refine.deformation.DeformationConfig``) or ``None``.
        progress: optional callback ``progress(event, **figures)``.

    Returns:
        the refined geometry and per-tomogram metrics.
    """
    t_start = time.perf_counter()
    report = progress or (lambda *a, **k: None)
    box = config.box
    f = ts.n_tilts
    n = particles.n_particles
    seq = geometry.dose_order(ts.pre_exposure_e_per_ang2)
    rank = np.empty(f, int)
    rank[seq] = np.arange(f)
    kmax = f - 1 if config.max_frame < 0 else min(config.max_frame, f - 1)
    frame_ok = (rank >= config.min_frame) & (rank <= kmax)

    const = prepare_tomogram_constants(ts, stack, refs_ft, envelope, config)
    chunk = config.chunk if config.chunk > 0 else (8 if jax.default_backend() == "cpu" else 64)
    p_cur = np.asarray(ts.projections, np.float64).copy()
    x_cur = np.asarray(particles.positions_px, np.float64).copy()
    centre = geometry.tomogram_centre_px(ts.tomo_size_px)
    hw = int(math.ceil(config.r)) + 2
    n_pad = stage2.pad_to_bucket(n)
    plugins = _build_plugins(ts, particles, config, motion, deformation, n_pad, report)
    motion_plugin = plugins.get("motion")
    deform_plugin = plugins.get("deformation")
    plugin_params = {k: pl.init_params() for k, pl in plugins.items()}

    def offsets_now():
        """Per-tilt 3D offsets (N, F, 3): the motion model's current trajectories, or the input's."""
        if motion_plugin is not None:
            return motion_plugin.trajectories(plugin_params["motion"])
        if particles.trajectories_px is not None:
            return np.asarray(particles.trajectories_px, np.float64)
        return np.zeros((n, f, 3))

    def current_geometry(p, x):
        pts = x[:, None, :] + offsets_now()  # (N, F, 3)
        u = np.einsum("fij,nfj->nfi", p[:, :2, :3], pts) + p[None, :, :2, 3]
        if deform_plugin is not None:
            u = deform_plugin.deform(plugin_params["deformation"], u)
        depth = np.einsum("fj,nfj->nf", p[:, 2, :3], pts) + p[None, :, 2, 3]
        cdepth = p[:, 2, :3] @ centre + p[:, 2, 3]
        rot = np.einsum("fij,njk->nfik", p[:, :3, :3], particles.rotations)
        vis = _visible(u, ts.image_size_px, box) & frame_ok[None, :]
        if hasattr(stack, "usable"):  # io.stacks.StackView: leave out boxes mostly in masked pixels
            vis &= stack.usable(u, box)
        return u, depth, cdepth, rot, vis

    u, depth, cdepth, rot, vis = current_geometry(p_cur, x_cur)
    u_input = u
    # --- held-out validation: the input geometry ---
    p_input, x_input, geometry_input = p_cur.copy(), x_cur.copy(), (u, depth, cdepth, rot, vis)
    final_problem = None
    # --- end ---
    metrics: dict = {"outer": [], "n_particles": n, "n_tilts": f}

    if config.coarse_shift or config.shift_only:
        t0 = time.perf_counter()
        sub = np.unique(np.linspace(0, n - 1, min(n, config.coarse_particles)).astype(int))
        cbox = coarse_box(box, config.r)
        if cbox == box:
            const_c = const
        else:
            refs_c, env_c = _padded_problem(refs_ft, envelope, box, cbox)
            const_c = prepare_tomogram_constants(
                ts, stack, refs_c, env_c, dataclasses.replace(config, box=cbox)
            )
        _, total = ccmaps.compute_cc_windows(
            stack, u[sub], rot[sub], depth[sub], cdepth, particles.half_set[sub], vis[sub], const_c,
            box=cbox, half_width=hw, chunk=chunk, want_sum=True,
        )
        shifts = np.stack([_parabolic_peak(total[j]) for j in range(f)])
        # accept a tilt's shift only where the summed CC has a clear peak (robust z-score)
        flat = total.reshape(f, -1)
        med, sigma = _median_and_robust_sigma(flat, axis=1)
        weak = (flat.max(axis=1) - med) / np.maximum(sigma, 1e-30) < config.coarse_min_z
        shifts[weak] = 0.0
        metrics["coarse_rejected_tilts"] = np.flatnonzero(weak).tolist()
        shifts[~frame_ok] = 0.0
        if config.const_s:
            shifts[:] = 0.0
        p_cur[:, :2, 3] += shifts
        report("coarse_shift", max_shift_px=float(np.abs(shifts).max()), seconds=time.perf_counter() - t0)
        metrics["coarse_shifts_px"] = shifts.tolist()

    options = optimise.StageOptions(
        range_reg=config.range_reg,
        fix_gauge_positions=not config.const_p and not config.const_s,
        fix_gauge_angles=not config.const_a and not config.const_p,
        motion=None if motion_plugin is None else motion_plugin.static,
        deformation=None if deform_plugin is None else deform_plugin.static,
    )
    free = []
    if not config.const_a and not config.shift_only:
        free.append("tilt_angles")
    if not config.const_s:
        free.append("tilt_shifts")
    if not config.const_p and not config.shift_only:
        free.append("positions")
    free += [k for k, pl in plugins.items() if pl.free]

    def stage2_problem(u, store, weight, **extra):
        """Stage-2 data (current geometry, CC store, input motion, plug-ins) and start point."""
        data = stage2.build_data(
            p_cur, x_cur, u, store, weight, tomo_size_px=ts.tomo_size_px,
            image_size_px=ts.image_size_px, window_radius_px=config.r, n_pad=n_pad, **extra,
        )
        if motion_plugin is None and particles.trajectories_px is not None:
            data["offsets"] = jnp.asarray(
                np.concatenate([offsets_now(), np.zeros((n_pad - n, f, 3))], 0), jnp.float32
            )
        for pl in plugins.values():
            data.update(pl.data(p_cur, x_cur))
        params = stage2.initial_params(f, n_pad)
        params.update(plugin_params)
        return data, params
    free = tuple(free)

    n_outer = 1 if config.shift_only else max(config.outer, 1)
    schedule = [float(b) for b in config.blur_px] or [0.0]
    if schedule[-1] != 0.0:
        schedule.append(0.0)
    cc_before = None
    per_tilt_cc: list[float] = []
    prev = None  # (window centres, their visibility) of the previous pass
    cc_store = None
    for outer in range(n_outer):
        u, depth, cdepth, rot, vis = current_geometry(p_cur, x_cur)
        t0 = time.perf_counter()
        if prev is None or config.full_recompute:
            redo = np.ones((n, f), bool)
            u0, vis0 = u, vis
        else:
            # recompute the windows of the particle–tilt pairs that drifted towards their
            # window's edge (or became visible); the others keep theirs: their peaks are inside
            u0, vis0 = prev[0].copy(), prev[1].copy()
            drift = np.where(vis0, np.linalg.norm(u - u0, axis=-1), 0.0)
            limit = config.recompute_px if config.recompute_px >= 0 else 0.6 * config.r
            redo = (drift > limit) | (vis & ~vis0)
            if not redo.any():
                break
            u0[redo], vis0[redo] = u[redo], vis[redo]
        # one store for the windows, padded to the particle bucket, updated in place
        if cc_store is None:
            cc_store = np.zeros((n_pad, f, 2 * hw + 1, 2 * hw + 1), np.float32)
        ccmaps.compute_cc_windows(
            stack, u, rot, depth, cdepth, particles.half_set, vis, const, box=box, half_width=hw,
            chunk=chunk, pairs=redo, out=cc_store,
        )
        cc_raw = cc_store[:n]
        prev = (u0, vis0)
        t_cc = time.perf_counter() - t0
        vis = vis0
        weight = vis.astype(np.float32)
        data, params = stage2_problem(u0, cc_store, weight)
        cc_centre = cc_raw[:, :, hw, hw]
        per_tilt_cc = [float(cc_centre[vis[:, j], j].mean()) if vis[:, j].any() else 0.0 for j in range(f)]
        if cc_before is None:
            cc_before = per_tilt_cc
        # coarse-to-fine on the same CC maps (first pass only): the stage-2 parameters carry over
        cc_dev = data["cc"]
        for blur in schedule if outer == 0 else [0.0]:
            data["cc"] = ccmaps.blur_windows(cc_dev, blur) if blur > 0 else cc_dev

            def cb(it, cost, outer=outer):
                if it < 10 or (it < 100 and it % 10 == 0) or it % 100 == 0:
                    report("iteration", outer=outer, iteration=it, cost=cost)

            # the low-passed stages only need to bring every pair into its peak's basin
            params, info = optimise.minimise(
                params, data, options, free_keys=free, callback=cb,
                max_iter=config.it if blur == 0 else min(config.it, 60),
                ftol=1e-10 if blur == 0 else 1e-7,
            )
            step = _pass_record(outer, int((redo & vis0).sum()), blur, t_cc, info)
            t_cc = 0.0
            metrics["outer"].append(step)
        delta, dpos = stage2.results_from_params(params, data, options, n)
        p_new = delta @ p_cur
        x_new = x_cur + dpos if "positions" in free else x_cur
        plugin_params = {k: params[k] for k in plugins}
        u_new = current_geometry(p_new, x_new)[0]
        move = np.linalg.norm(u_new - u, axis=-1)
        vis_any = vis.any()
        step.update(
            move_rms_px=float(np.sqrt(np.mean(move[vis] ** 2))) if vis_any else 0.0,
            move_max_px=float(move[vis].max()) if vis_any else 0.0,
            mean_cc=float(np.mean(cc_centre[vis])) if vis_any else 0.0,
        )
        report("outer", **step)
        p_cur, x_cur = p_new, x_new
        rescued = 0
        if outer == 0 and config.rescue and "positions" in free and n >= 8:
            # particles left behind (their peaks outside their windows): a 3D search in
            # full-box CC maps at the refined tilt geometry
            vals = np.asarray(optimise.pair_values_at(params, data, options))[:n]
            w = vis.astype(np.float64)
            score_p = np.sum(vals * w, axis=1) / np.maximum(w.sum(axis=1), 1.0)
            med, sigma = _median_and_robust_sigma(score_p)
            lost = np.flatnonzero((score_p < med - config.rescue_z * sigma) & (w.sum(axis=1) >= 3))
            metrics.setdefault("rescue_scores", score_p.tolist())
            if lost.size:
                t0 = time.perf_counter()
                x_cur = x_cur.copy()
                # the same predictions the CC windows use (motion, deformation, visibility)
                u_g, depth_g, cdepth_g, rot_g, vis_g = current_geometry(p_cur, x_cur)
                x_cur[lost] += _rescue_search(
                    stack, p_cur, u_g[lost], depth_g[lost], cdepth_g, rot_g[lost], vis_g[lost],
                    particles.half_set[lost], const, box, chunk,
                )
                rescued = int(lost.size)
                report("rescue", particles=rescued, seconds=time.perf_counter() - t0)
            metrics.setdefault("rescued_particles", []).extend(lost.tolist())
        if (
            not rescued
            and step["move_rms_px"] < config.tol_rms_px
            and step["move_max_px"] < config.tol_max_px
        ):
            break

    # final stage: the exact CC (phase ramps, no grid) at the refined geometry
    n_exact = 0 if config.shift_only else max(config.exact_passes, 0)
    n_loops = 1 + max((st["outer"] for st in metrics["outer"]), default=-1)
    # the deformation field stays as refined on the windows: it is smooth over many particles
    # (the grid bias averages out) and its poorly conditioned coefficients would need another
    # ~1000 L-BFGS iterations for no measurable gain (bench_deformation: 0.1543 px either way)
    free_exact = tuple(k for k in free if k != "deformation")
    cc_store = None  # the windows are not needed any more (memory)
    for exact_pass in range(n_exact):
        u, depth, cdepth, rot, vis = current_geometry(p_cur, x_cur)
        t0 = time.perf_counter()
        taylor = likelihood.compute_taylor(
            stack, u, rot, depth, cdepth, particles.half_set, vis, const, box=box, chunk=chunk,
            n_pad=n_pad,
        )
        t_cc = time.perf_counter() - t0
        data, params = stage2_problem(u, taylor, vis.astype(np.float32),
                                      taylor_radius_px=config.exact_radius_px)

        index = n_loops + exact_pass  # numbered after the outer iterations

        def cb_exact(it, cost, index=index):
            if it < 10 or it % 10 == 0:
                report("iteration", outer=index, iteration=it, cost=cost)

        params, info = optimise.minimise(
            params, data, options, free_keys=free_exact, callback=cb_exact, max_iter=config.it,
            ftol=config.exact_ftol,
        )
        delta, dpos = stage2.results_from_params(params, data, options, n)
        p_new = delta @ p_cur
        x_new = x_cur + dpos if "positions" in free else x_cur
        plugin_params = {k: params[k] for k in plugins}
        move = np.linalg.norm(current_geometry(p_new, x_new)[0] - u, axis=-1)
        step = _pass_record(
            index, int(vis.sum()), 0.0, t_cc, info, exact=True,
            move_rms_px=float(np.sqrt(np.mean(move[vis] ** 2))) if vis.any() else 0.0,
            move_max_px=float(move[vis].max()) if vis.any() else 0.0,
        )
        metrics["outer"].append(step)
        report("outer", **step)
        p_cur, x_cur = p_new, x_new
        final_problem = (data, params)  # held-out validation
        del data
        if step["move_max_px"] < config.exact_tol_max_px:
            break

    # --- held-out validation (polish3d.refine.validate) ---
    if config.validate:
        p_cur, x_cur, metrics["validation"] = validate.validate_tomogram(
            stack, particles.half_set, const, geometry_input, final_problem, p_input, x_input,
            p_cur, x_cur, box=box, chunk=chunk, options=options, free_keys=free_exact,
            thresholds=validate.Thresholds(*config.validate_z, search_radius_px=config.r),
            max_iter=config.it, ftol=config.exact_ftol, report=report,
        )
        if metrics["validation"]["verdict"] == "reference_mismatch":  # the input motion/deformation too
            plugin_params = {k: pl.init_params() for k, pl in plugins.items()}
    del final_problem
    # --- end of held-out validation ---
    u_final = current_geometry(p_cur, x_cur)[0]
    disp = np.linalg.norm(u_final - u_input, axis=-1)
    metrics["per_tilt_cc_first"] = cc_before
    metrics["per_tilt_cc_last"] = per_tilt_cc
    metrics["per_tilt_displacement_rms_px"] = [
        float(np.sqrt(np.mean(disp[:, j] ** 2))) for j in range(f)
    ]
    metrics["displacement_rms_px"] = float(np.sqrt(np.mean(disp**2)))
    metrics["displacement_max_px"] = float(disp.max()) if disp.size else 0.0
    result = TomogramResult(
        name=ts.name,
        projections=p_cur,
        positions_px=None if config.shift_only else x_cur,
        trajectories_px=particles.trajectories_px,
        deformation=ts.deformation,
        metrics=metrics,
    )
    for pl in plugins.values():
        pl.finish(plugin_params[pl.key], result)
    metrics["seconds"] = time.perf_counter() - t_start
    return result


def _rescue_search(stack, p, u, depth, cdepth, rot, vis, half_set, const, box, chunk) -> np.ndarray:
    """3D position corrections ``(m, 3)`` (pixels) of lost particles by exhaustive search.

    ``u, depth, rot, vis`` are the lost particles' current predictions (as for the CC windows)
    and ``cdepth`` the tomogram centre's depth per tilt. Full-box CC maps (displacements up to
    ``±(s/2 − 2)``) are computed there; every integer 3D displacement ``δ`` within that range is
    scored by the sum over tilts of the maps at the projected displacement ``P_f[:2,:3]·δ``
    (nearest sample), and the best one is returned (the following outer iteration refines it).
    """
    hw = box // 2 - 2
    win, _ = ccmaps.compute_cc_windows(
        stack, u, rot, depth, cdepth, half_set, vis, const, box=box, half_width=hw, chunk=chunk,
    )
    g = np.arange(-hw, hw + 1, dtype=np.float64)
    grid = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    du = np.einsum("fij,gj->gfi", p[:, :2, :3], grid)  # (G, F, 2)
    ix = np.rint(du[..., 0]).astype(np.int64) + hw
    iy = np.rint(du[..., 1]).astype(np.int64) + hw
    inside = (ix >= 0) & (ix <= 2 * hw) & (iy >= 0) & (iy <= 2 * hw)
    ixc, iyc = np.clip(ix, 0, 2 * hw), np.clip(iy, 0, 2 * hw)
    f_idx = np.broadcast_to(np.arange(p.shape[0])[None, :], ix.shape)
    out = np.zeros((len(u), 3))
    for k in range(len(u)):
        vals = win[k][f_idx, iyc, ixc] * (inside & vis[k][None, :])
        out[k] = grid[np.argmax(vals.sum(axis=1))]
    return out


def _build_plugins(ts, particles, config, motion, deformation, n_pad, report) -> dict:
    """Model plug-ins of the stage-2 objective (motion, deformation), keyed by parameter name.

    A plug-in has: ``key`` (the parameter block name), ``free`` (optimised or held fixed),
    ``static`` (hashable object used inside the jitted objective: ``offsets_and_prior`` for
    motion, ``apply_and_prior`` for deformation), ``init_params()``, ``data(P, X)`` (arrays
    added to the stage-2 data pytree, keys prefixed by the plug-in), host-side evaluation
    (``trajectories(params) -> (N, F, 3)`` px or ``deform(params, u) -> u``) and
    ``finish(params, result)`` which stores the refined model in the ``TomogramResult``.
    """
    plugins = {}
    if motion is not None:
        from polish3d.refine import motion as motion_mod

        plugins["motion"] = motion_mod.build_plugin(motion, ts, particles, config, n_pad, report)
    needs_deformation = deformation is not None or ts.deformation is not None
    if needs_deformation:
        from polish3d.refine import deformation as deformation_mod

        pl = deformation_mod.build_plugin(deformation, ts, config, n_pad, report)
        if pl is not None:
            plugins["deformation"] = pl
    return plugins
