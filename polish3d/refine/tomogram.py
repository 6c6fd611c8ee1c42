"""Refinement of one tomogram: outer iterations of (CC stage → geometry stage).

Arrays in, arrays out: :func:`refine_tomogram` takes the typed records of :mod:`polish3d.model`,
the tilt stack (any ``(F, H, W)`` array-like, e.g. a memmap) and the two prepared half maps, and
returns a :class:`~polish3d.model.TomogramResult`. It never prints; progress goes to an optional
callback ``progress(event: str, **figures)``. The stages it runs are in
:mod:`polish3d.refine.stages`; this module holds the options, the preparation of the constants
(references, noise spectra, dose and CTF) and the driver.
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
from polish3d.refine import ccmaps, optimise, stage2, stages

__all__ = [
    "AlignConfig",
    "prepare_references",
    "prepare_tomogram_constants",
    "reference_envelope",
    "refine_tomogram",
    "setup",
]

#: (imported from here by the reconstruction and the alignment's visibility checks)
_visible = stages.visible_boxes


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
        move_tol_px: polish3d: an L-BFGS run on the CC windows also stops once the predicted 2D
            positions moved less than this (RMS over the visible pairs, pixels) in its last 50
            iterations (0: off; :func:`polish3d.refine.optimise.minimise`). What remains is a
            creep along directions the data hardly determine (thousands of iterations with
            ``--deformation``), which the final stage settles.
        exact_move_tol_px: the same for the final stage's L-BFGS runs.
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
        aniso: ``--aniso``: refine one 2×2 image distortion per tilt series (anisotropic
            magnification and skew, ``D = D0 + [[a, s], [s, −a]]`` about the image centre),
            jointly with the 5 DOF per tilt (:mod:`polish3d.refine.objective`).
        per_tilt_aniso: ``--per_tilt_aniso``: one such distortion per tilt.
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
    move_tol_px: float = 0.05
    exact_passes: int = 2
    exact_ftol: float = 1e-10
    exact_radius_px: float = 0.5
    exact_tol_max_px: float = 0.1
    exact_move_tol_px: float = 0.02
    validate: bool = True
    validate_z: tuple[float, float, float] = (3.0, 3.5, 3.0)  # signal, worse, improved
    aniso: bool = False
    per_tilt_aniso: bool = False


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
            f"reference {names[0]} is {half1.shape[0]} px, larger than the box ({box} px); "
            "use a larger box or a smaller reference"
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
def _dose_stack(pre_exposure, pixel_size, bfactor, box: int):
    return jax.vmap(lambda n: imaging.dose_weights(box, pixel_size, n, bfactor))(pre_exposure)


def prepare_tomogram_constants(
    ts: TiltSeriesData, stack, refs_ft, envelope: np.ndarray, config: AlignConfig
) -> ccmaps.CCInputs:
    """The CC-stage constants of one tomogram (weights, dose, CTF parameters, references)."""
    box = config.box
    noise = imaging.noise_spectra(stack, box)
    dose = dose_weight_stack(ts, box, ts.pixel_size_ang)
    weights = ccmaps.frequency_weights(
        noise, envelope, dose, box=box, whiten=config.whiten, per_frame_noise=config.per_frame_noise,
        srp=config.srp, hp=config.hp, cutoff_fract=config.cutoff_fract,
    )
    dose = np.where(weights > 0, dose, 0.0)
    return ccmaps.CCInputs(
        refs=refs_ft, weights=jnp.asarray(weights), dose=jnp.asarray(dose, jnp.float32),
        **ctf_constants(ts, ts.pixel_size_ang),
    )


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

    The stages of :mod:`polish3d.refine.stages` in turn: per-tilt shift search, outer passes
    (CC windows → L-BFGS, with the rescue of lost particles), final passes on the exact CC,
    held-out validation (rollback of what the data do not support), summary.

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
    problem, state = setup(ts, particles, stack, refs_ft, envelope, config, motion, deformation, report)
    start = state.copy()  # the input geometry
    if config.coarse_shift or config.shift_only:
        stages.coarse_shift_search(problem, state)
    stages.outer_passes(problem, state)
    final = stages.exact_passes(problem, state)
    if config.validate:
        stages.validate(problem, start, state, final)
    result = stages.summarise(problem, start, state, t_start)
    if stage2.aniso_mode(config) is not None:
        result.metrics["distortion"] = distortion_metrics(result.projections, ts.image_size_px)
    return result


def distortion_metrics(projections: np.ndarray, image_size_px) -> dict:
    """Per-tilt image distortion of projection matrices (``metrics["distortion"]``): ``aniso``
    ``a`` and ``skew`` ``s`` of ``D = m·I + [[a, s], [s, −a]]`` (unitless), the magnification ``m``
    and the anisotropy ``sqrt(a² + s²)`` in per cent, its largest value over the tilts."""
    d = geometry.split_distortion(projections, image_size_px)[0]
    a, s = 0.5 * (d[:, 0, 0] - d[:, 1, 1]), d[:, 0, 1]
    percent = 100.0 * np.hypot(a, s)
    magnification = 0.5 * (d[:, 0, 0] + d[:, 1, 1])
    return {"aniso": a.tolist(), "skew": s.tolist(), "magnification": magnification.tolist(),
            "aniso_percent": percent.tolist(), "max_aniso_percent": float(percent.max(initial=0.0))}


def setup(ts, particles, stack, refs_ft, envelope, config: AlignConfig, motion, deformation, report):
    """The constants of one tomogram's refinement and its start state (the input geometry).

    Returns:
        ``(stages.TomogramProblem, stages.RefineState)``.
    """
    box, f, n = config.box, ts.n_tilts, particles.n_particles
    rank = np.empty(f, int)
    rank[geometry.dose_order(ts.pre_exposure_e_per_ang2)] = np.arange(f)
    kmax = f - 1 if config.max_frame < 0 else min(config.max_frame, f - 1)
    const = prepare_tomogram_constants(ts, stack, refs_ft, envelope, config)
    cbox = coarse_box(box, config.r)
    coarse_const = None
    if config.coarse_shift or config.shift_only:
        coarse_const = const
        if cbox != box:
            refs_c, env_c = _padded_problem(refs_ft, envelope, box, cbox)
            coarse_config = dataclasses.replace(config, box=cbox)
            coarse_const = prepare_tomogram_constants(ts, stack, refs_c, env_c, coarse_config)
    n_pad = stage2.pad_to_bucket(n)
    plugins = _build_plugins(ts, particles, config, motion, deformation, n_pad, report)
    options = optimise.StageOptions(
        range_reg=config.range_reg,
        fix_gauge_positions=not config.const_p and not config.const_s,
        fix_gauge_angles=not config.const_a and not config.const_p,
        motion=None if "motion" not in plugins else plugins["motion"].static,
        deformation=None if "deformation" not in plugins else plugins["deformation"].static,
    )
    free = []
    if not config.const_a and not config.shift_only:
        free.append("tilt_angles")
    if not config.const_s:
        free.append("tilt_shifts")
    if not config.const_p and not config.shift_only:
        free.append("positions")
    if stage2.aniso_mode(config) is not None and not config.shift_only:
        free.append("aniso")
    free += [k for k, pl in plugins.items() if pl.free]
    problem = stages.TomogramProblem(
        ts=ts, particles=particles, stack=stack, config=config, const=const, coarse_const=coarse_const,
        coarse_box_px=cbox, half_width_px=int(math.ceil(config.r)) + 2, n_pad=n_pad,
        chunk=config.chunk if config.chunk > 0 else (8 if jax.default_backend() == "cpu" else 64),
        frame_ok=(rank >= config.min_frame) & (rank <= kmax), plugins=plugins, options=options,
        free=tuple(free), report=report,
    )
    state = stages.RefineState(
        projections=np.asarray(ts.projections, np.float64).copy(),
        positions_px=np.asarray(particles.positions_px, np.float64).copy(),
        plugin_params={k: pl.init_params() for k, pl in plugins.items()},
        metrics={"outer": [], "n_particles": n, "n_tilts": f},
    )
    return problem, state


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
