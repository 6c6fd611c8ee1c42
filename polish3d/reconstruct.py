"""Half maps of the particles from their tilt images (``polish3d reconstruct``).

What ``relion_tomo_reconstruct_particle`` does, in JAX, for any optimisation set:

1. **Where.** Every particle ``p`` is projected into every tilt ``j`` with the geometry the
   refinement uses (:func:`polish3d.score.project_particles`: projection ``P_j``, input motion,
   2D deformation). A pair is used when the box fits in the image (RELION's ``isVisible``:
   ``s/2 < u < size − s/2``) and, with ``max_dose``, the tilt's pre-exposure is at most that.
2. **Observation.** The ``s × s`` window around ``u`` (corner ``round(u) − s//2``), minus the mean
   outside radius ``s/2``, times the 5-px soft circle, Fourier transformed with the exact ``u`` at
   the phase origin (:func:`polish3d.refine.ccmaps.observe_windows`, RELION's
   ``extractAt2D_Fourier``). With ``binning = b``: a window of ``round(b·s)`` px, Fourier-cropped
   to ``s``.
3. **Weighting.** ``D = −CTF · dose · Y`` and ``W = (CTF · dose)²`` (dark particles: the sign is
   flipped as RELION's ``flip_value``); the CTF at the particle's depth (static position),
   the dose weights of the tilt. Frequencies of a row beyond the last one whose dose weight
   exceeds ``cutoff_fract`` (and beyond radius ``s/2``) are zero.
4. **Insertion** (RELION's ``backprojectSlice_backward``). With ``A = P_j[:3,:3] · M_p`` (reference
   → camera) and ``B = A⁻ᵀ``, every 3D half-grid frequency ``k`` whose camera coordinates
   ``B·k = (ξ, η, ζ)`` have ``|ζ| < 1`` (and ``|k| ≤`` the tilt's cutoff row length) receives
   ``(1 − |ζ|) · D(ξ, η)`` and ``(1 − |ζ|) · W(ξ, η)``, bilinearly interpolated in the 2D half
   spectrum (Friedel mate for ``ξ < 0``), into the accumulators of its half set
   (``rlnRandomSubset``). Those frequencies are found without scanning the volume: along the
   axis where the plane normal is largest at most four voxels per column lie within
   ``|ζ| < 1``, so each pair touches ``4·M`` candidates, ``M ≈ π(s/2+1)²`` columns (fixed
   shapes, one ``vmap``).
5. **Finish** (RELION's ``griddingCorrect3D_sinc2`` then ``ctfCorrect3D_heuristic`` or
   ``_Wiener``): inverse transform, divide by ``sinc²(r/s)`` (at least 0.01), transform, divide by
   ``max(W, 0.001 · ⟨W⟩_shell)`` (or ``W + 1/SNR`` with ``snr > 0``), zero beyond radius
   ``s/2``, inverse transform; optional central crop; subtract the mean and taper the last
   10 px of the sphere.

Pairs are processed in fixed-size chunks of one compiled function (memory bounded by the chunk
and the ``(s, s, s/2+1)`` accumulators of data and weight per half set, float32); the tilt images
are read from the (memory-mapped) stacks only where a box lies.

The **FSC** of the two half maps is :func:`polish3d.imaging.fsc_from_half_maps` (shells of
``round(|k|)``); the resolution is where it first falls below 0.143, linearly interpolated
between shells: ``box · px / k*`` (Å).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from polish3d import geometry
from polish3d.errors import InputError
from polish3d.model import ParticleData, TiltSeriesData

__all__ = [
    "ReconstructOptions",
    "Reconstruction",
    "backproject_tomogram",
    "finish_map",
    "fsc_resolution_ang",
    "half_map_fsc",
    "reconstruct",
    "register_cli",
    "with_results",
    "write_reconstruction",
]

log = logging.getLogger("polish3d")

#: particle–tilt pairs per compiled call when ``chunk`` is 0 (about 100 MB of temporaries at
#: box 64; scaled by ``(64/s)²`` for other boxes)
_AUTO_PAIRS_AT_64 = 64
#: RELION's ``ctfCorrect3D_heuristic`` weight fraction
HEURISTIC_FRACTION = 0.001


@dataclass(frozen=True)
class ReconstructOptions:
    """Options of a reconstruction (names follow ``relion_tomo_reconstruct_particle``).

    Attributes:
        box: ``--b``, box size in output pixels (even); the map is ``box³``.
        crop: ``--crop``, output size after reconstruction (px, even, ``< box``); ``≤ 0``: none.
        binning: ``--bin``, output pixel size / tilt-series pixel size (≥ 1): windows of
            ``round(binning · box)`` tilt-series pixels are Fourier-cropped to ``box``.
        snr: ``--SNR``; ``> 0``: Wiener offset ``1/SNR``, else RELION's heuristic
            (``max(W, 0.001 · shell mean)``).
        max_dose: ``--max_dose``, use only tilts with pre-exposure ≤ this (e⁻/Å²); ``≤ 0``: all.
        cutoff_fract: ``--cutoff_fract``, ignore frequencies whose dose weight is below this.
        taper_px: ``--taper``, width of the final spherical taper (px).
        chunk: particle–tilt pairs per compiled call; 0: automatic.
    """

    box: int
    crop: int = -1
    binning: float = 1.0
    snr: float = -1.0
    max_dose: float = -1.0
    cutoff_fract: float = 0.01
    taper_px: float = 10.0
    chunk: int = 0

    def __post_init__(self):
        if self.box <= 0 or self.box % 2:
            raise InputError(f"--b {self.box}: the box must be a positive even number of pixels")
        if self.crop > 0 and (self.crop % 2 or self.crop >= self.box):
            raise InputError(f"--crop {self.crop}: must be even and smaller than --b {self.box}")
        if not self.binning >= 1.0:
            raise InputError(f"--bin {self.binning:g}: must be at least 1")
        if self.chunk < 0:
            raise InputError(f"--chunk {self.chunk}: must be 0 (automatic) or positive")
        if not 0.0 <= self.cutoff_fract < 1.0:
            raise InputError(f"--cutoff_fract {self.cutoff_fract:g}: must lie in [0, 1)")

    @property
    def window_px(self) -> int:
        """Extraction window in tilt-series pixels (RELION's ``s02D = (int)(bin · s + 0.5)``)."""
        return int(self.binning * self.box + 0.5)

    @property
    def out_box(self) -> int:
        """Size of the written maps (px)."""
        return self.crop if self.crop > 0 else self.box

    def pairs_per_call(self) -> int:
        """Pairs per compiled insertion call."""
        if self.chunk > 0:
            return self.chunk
        return max(8, int(_AUTO_PAIRS_AT_64 * (64.0 / self.box) ** 2))


@dataclass
class Reconstruction:
    """Two half maps, their merge and FSC.

    Attributes:
        half1, half2, merged: ``(n, n, n)`` maps ``[z, y, x]`` float32, ``n = out_box``
            (half maps of an empty half set are zeros).
        pixel_size_ang: voxel size of the maps (Å).
        fsc: ``(n//2 + 1,)`` FSC of the half maps per shell (``nan`` when a half is empty).
        resolution_ang: resolution at FSC 0.143 (Å; ``nan`` without two halves).
        n_pairs: particle–tilt pairs inserted into half 1 and half 2.
        n_particles: particles of half 1 and half 2 with at least one pair.
        seconds: wall time.
        full: the uncropped half maps / merged map when ``crop`` was used (else empty).
    """

    half1: np.ndarray
    half2: np.ndarray
    merged: np.ndarray
    pixel_size_ang: float
    fsc: np.ndarray
    resolution_ang: float
    n_pairs: tuple[int, int]
    n_particles: tuple[int, int]
    seconds: float = 0.0
    full: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def shells(self) -> np.ndarray:
        """Shell indices ``0 … n//2``."""
        return np.arange(len(self.fsc))

    @property
    def shell_resolution_ang(self) -> np.ndarray:
        """Resolution of each shell, ``n · px / k`` (Å; ``inf`` at ``k = 0``)."""
        k = self.shells.astype(np.float64)
        with np.errstate(divide="ignore"):
            return len(self.half1) * self.pixel_size_ang / k


# ----------------------------------------------------------------------------------------------
# the compiled kernels
# ----------------------------------------------------------------------------------------------


def _row_limits(dose: np.ndarray, cutoff_fract: float) -> np.ndarray:
    """RELION's ``findDoseXRanges``: per tilt and row ``ky`` the number of kept ``kx`` columns.

    ``dose`` ``(F, s, s//2+1)``; the last ``kx ≤ sqrt(s²/4 − ky²)`` with dose weight above
    ``cutoff_fract``, plus one (0: nothing kept). Returns ``(F, s)`` int.
    """
    f, s, sh = dose.shape
    ky = np.fft.fftfreq(s) * s
    xmax = np.sqrt(np.maximum(s * s / 4.0 - ky * ky, 0.0))
    kx = np.arange(sh)
    ok = (dose > cutoff_fract) & (kx[None, None, :] <= xmax[None, :, None])
    last = np.where(ok.any(-1), sh - 1 - np.argmax(ok[..., ::-1], axis=-1), -1)
    return (last + 1).astype(np.int32)


def _column_grid(box: int) -> tuple[np.ndarray, np.ndarray]:
    """The two non-dominant coordinates ``(b, c)`` of the candidate columns: integers
    ``−s/2 … s/2`` (``kx`` reaches ``s/2``; ``ky = kz = s/2`` are filtered out later) within the
    largest radius a tilt can keep, ``s/2 + 1`` (RELION's row limit is the last kept column + 1).
    Two ``(M,)`` float32 arrays."""
    k = np.arange(-(box // 2), box // 2 + 1, dtype=np.float32)
    b, c = np.meshgrid(k, k, indexing="ij")
    keep = b * b + c * c <= (box // 2 + 1) ** 2
    return b[keep], c[keep]


# axis order (dominant, other, other) for a dominant axis 0, 1, 2
_AXES = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1]], np.int32)


def _insert_one(data2d, weight2d, bmat, max_freq, box: int):
    """Candidate voxels of one slice: flat indices ``(n,)`` (``−1``: none) and their values
    ``(n, 3)``: real and imaginary part of the data, weight.

    The candidates are generated in the frame ``(a, b, c)`` of the dominant axis ``a`` of the
    plane normal; the columns of ``bmat``, the voxel bounds and the index strides are permuted
    to it, so no per-candidate axis selection is needed.
    """
    import jax.numpy as jnp

    s, sh = box, box // 2 + 1
    half = s // 2
    n = bmat[2]
    axes = jnp.asarray(_AXES)[jnp.argmax(jnp.abs(n))]
    bp = bmat[:, axes]  # columns in (a, b, c) order
    lower = jnp.asarray([0.0, -half, -half], jnp.float32)[axes]
    upper = jnp.asarray([sh - 1.0, half - 1.0, half - 1.0], jnp.float32)[axes]
    stride = jnp.asarray([1, sh, s * sh], jnp.int32)[axes]
    bb, cc = _column_grid(box)
    t = bp[2, 1] * bb + bp[2, 2] * cc
    lo = jnp.minimum((-1.0 - t) / bp[2, 0], (1.0 - t) / bp[2, 0])
    ca = jnp.ceil(lo)[..., None] + jnp.arange(4, dtype=jnp.float32)  # (M, 4)
    cb, cc_ = bb[..., None], cc[..., None]
    xi = bp[0, 0] * ca + (bp[0, 1] * cb + bp[0, 2] * cc_)
    eta = bp[1, 0] * ca + (bp[1, 1] * cb + bp[1, 2] * cc_)
    zeta = bp[2, 0] * ca + t[..., None]
    ok = (
        (jnp.abs(zeta) < 1.0)
        & (ca >= lower[0]) & (ca <= upper[0])
        & (cb >= lower[1]) & (cb <= upper[1]) & (cc_ >= lower[2]) & (cc_ <= upper[2])
        & (ca * ca + (cb * cb + cc_ * cc_) <= max_freq * max_freq)
        & (jnp.abs(xi) < sh) & (jnp.abs(eta) < half + 1)
    )
    # bilinear sample of the 2D half spectrum (RELION's linearXY_*_FftwHalf_clip): data and
    # weight stacked, one gather per corner
    neg = xi < 0
    xd = jnp.where(neg, -xi, xi)
    yd = jnp.where(neg, -eta, eta)
    yd = jnp.where(yd < 0, yd + s, yd)
    x0f, y0f = jnp.floor(xd), jnp.floor(yd)
    fx, fy = xd - x0f, yd - y0f
    x0 = jnp.minimum(x0f.astype(jnp.int32), sh - 1)
    x1 = jnp.where(x0 + 1 >= sh, sh - 2, x0 + 1)
    y0 = jnp.clip(y0f.astype(jnp.int32), 0, s - 1)
    y1 = (y0 + 1) % s
    img = jnp.stack([data2d.real, data2d.imag, weight2d], axis=-1)  # (s, sh, 3)
    v0 = (1 - fx)[..., None] * img[y0, x0] + fx[..., None] * img[y0, x1]
    v1 = (1 - fx)[..., None] * img[y1, x0] + fx[..., None] * img[y1, x1]
    v = (1 - fy)[..., None] * v0 + fy[..., None] * v1
    tent = jnp.where(ok, 1.0 - jnp.abs(zeta), 0.0)
    sign = jnp.stack([jnp.ones_like(xi), jnp.where(neg, -1.0, 1.0), jnp.ones_like(xi)], -1)
    v = v * sign * tent[..., None]  # Friedel mate: complex conjugate
    ia = ca.astype(jnp.int32)
    ib = jnp.broadcast_to(cb, ca.shape).astype(jnp.int32)
    ic = jnp.broadcast_to(cc_, ca.shape).astype(jnp.int32)
    flat = jnp.mod(ia, s) * stride[0] + jnp.mod(ib, s) * stride[1] + jnp.mod(ic, s) * stride[2]
    flat = jnp.where(ok, flat, -1)
    return flat.reshape(-1), v.reshape(-1, 3)


@functools.cache
def _insert_kernel(box: int, window: int):
    """The jitted insertion of a chunk of pairs into the two half-set accumulators."""
    import jax
    import jax.numpy as jnp

    from polish3d import imaging
    from polish3d.refine.ccmaps import observe_windows

    s, sh = box, box // 2 + 1
    nvox = s * s * sh

    def run(acc, windows, frac, bmat, dz, tilt, half, valid, const):
        y = observe_windows(windows, frac)  # (P, w, w//2+1), exact position at the origin
        if window != box:  # Fourier crop to the output box (binning)
            y = jnp.concatenate([y[:, : s // 2, :sh], y[:, window - s // 2 :, :sh]], axis=1)

        def ctf_one(j, dz_):
            return imaging.ctf_2d(
                box, const["pixel_size"], const["defocus_u"][j] + dz_,
                const["defocus_v"][j] + dz_, const["defocus_angle"][j], const["voltage"],
                const["cs"], const["q0"], const["phase_shift"][j], const["bfactor"][j],
                const["ctf_scale"][j],
            )

        ctf = jax.vmap(ctf_one)(tilt, const["hand_slope_px"] * dz)
        c = -ctf * const["dose"][tilt] * const["rows"][tilt] * valid[:, None, None]
        flat, vals = jax.vmap(_insert_one, in_axes=(0, 0, 0, 0, None))(
            c * y, c * c, bmat, const["max_freq"][tilt], box
        )
        idx = jnp.where(flat >= 0, flat + (half[:, None] - 1) * nvox, 2 * nvox)
        # real-valued scatter (portable to every backend); out-of-range indices are dropped
        return acc.at[idx.reshape(-1)].add(vals.reshape(-1, 3), mode="drop")

    return jax.jit(run, donate_argnums=(0,))


def _tomogram_constants(ts: TiltSeriesData, options: ReconstructOptions) -> dict:
    import jax.numpy as jnp

    from polish3d.refine.tomogram import ctf_constants, dose_weight_stack

    box = options.box
    px = float(ts.pixel_size_ang) * options.binning
    dose = dose_weight_stack(ts, box, px)
    limits = _row_limits(dose, options.cutoff_fract)  # (F, s)
    rows = (np.arange(box // 2 + 1)[None, None, :] < limits[:, :, None]).astype(np.float32)
    return {
        "dose": jnp.asarray(dose, jnp.float32),
        "rows": jnp.asarray(rows),
        "max_freq": jnp.asarray(limits[:, 0], jnp.float32),
        **ctf_constants(ts, px),
    }


def new_accumulators(box: int):
    """Zeroed accumulators ``(2·s·s·(s//2+1), 3)`` float32: real and imaginary part of the data
    and the weight per frequency (half set 1 first, each half in ``[kz, ky, kx]`` order,
    centred phase)."""
    import jax.numpy as jnp

    return jnp.zeros((2 * box * box * (box // 2 + 1), 3), jnp.float32)


def backproject_tomogram(
    ts: TiltSeriesData,
    particles: ParticleData,
    stack,
    options: ReconstructOptions,
    accumulators=None,
):
    """Insert the visible particle–tilt pairs of one tomogram into the half-set accumulators.

    Args:
        ts: the tilt series (projections, CTF, dose).
        particles: its particles (positions px, rotations reference → tomogram, half sets 1/2,
            optional motion).
        stack: ``(F, H, W)`` tilt images in file order (array or memmap).
        options: :class:`ReconstructOptions`.
        accumulators: from :func:`new_accumulators` or a previous call (donated: do not reuse
            the arrays passed in); ``None``: new ones.

    Returns:
        ``(accumulators, pairs per half (2,), particles per half with a pair (2,))``.
    """
    import jax.numpy as jnp

    from polish3d.refine.ccmaps import padded_pair_chunks
    from polish3d.refine.tomogram import _visible
    from polish3d.score import project_particles

    box = options.box
    window = options.window_px
    acc = accumulators if accumulators is not None else new_accumulators(box)
    n, f = particles.n_particles, ts.n_tilts
    if n == 0:
        return acc, np.zeros(2, int), np.zeros(2, int)
    if tuple(np.shape(stack)) != (f, ts.image_size_px[1], ts.image_size_px[0]):
        raise InputError(
            f"{ts.name}: stack is {tuple(np.shape(stack))}, expected (F, H, W) = "
            f"({f}, {ts.image_size_px[1]}, {ts.image_size_px[0]})"
        )
    half_set = np.asarray(particles.half_set, np.int64)
    if np.any((half_set != 1) & (half_set != 2)):
        raise InputError(f"{ts.name}: rlnRandomSubset must be 1 or 2")
    u = project_particles(ts, particles)  # (N, F, 2), the refinement's forward geometry
    vis = _visible(u, ts.image_size_px, box)  # RELION: radius s/2 (output box) in tilt pixels
    if options.max_dose > 0:
        vis &= np.asarray(ts.pre_exposure_e_per_ang2)[None, :] <= options.max_dose
    p = np.asarray(ts.projections, np.float64)
    depth = geometry.projection_depth(p, particles.positions_px).T  # (N, F)
    centre = geometry.projection_depth(p, geometry.tomogram_centre_px(ts.tomo_size_px)[None])[:, 0]
    rel_depth = depth - centre[None, :]
    cam = np.einsum("fij,njk->nfik", p[:, :3, :3], np.asarray(particles.rotations, np.float64))
    bmat = np.transpose(np.linalg.inv(cam), (0, 1, 3, 2))  # A⁻ᵀ: frequency map

    const = _tomogram_constants(ts, options)
    kernel = _insert_kernel(box, window)
    pi, ti = np.nonzero(vis)
    # a power of two ≥ the pairs of this tomogram, at most the chunk (few compilations)
    batch = min(options.pairs_per_call(), 1 << max(3, int(np.ceil(np.log2(max(len(pi), 1))))))
    for p_b, t_b, _, padded, win, frac, valid in padded_pair_chunks(stack, u, pi, ti, batch, window):
        acc = kernel(
            acc, jnp.asarray(win), jnp.asarray(frac, jnp.float32),
            jnp.asarray(padded(bmat[p_b, t_b]), jnp.float32),
            jnp.asarray(padded(rel_depth[p_b, t_b]), jnp.float32),
            jnp.asarray(padded(t_b), jnp.int32), jnp.asarray(padded(half_set[p_b]), jnp.int32),
            jnp.asarray(valid), const,
        )
    pairs = np.array([np.sum(vis[half_set == h]) for h in (1, 2)])
    parts = np.array([np.sum(vis[half_set == h].any(axis=1)) for h in (1, 2)])
    return acc, pairs, parts


# ----------------------------------------------------------------------------------------------
# finishing the maps
# ----------------------------------------------------------------------------------------------


def _sinc2_divisor(box: int) -> np.ndarray:
    """RELION's ``griddingCorrect3D_sinc2`` divisor about voxel ``s//2``: ``sinc²(r/s)``, at
    least 0.01 (0.01 for ``r/s > 1``), 1 at the centre."""
    g = np.arange(box, dtype=np.float64) - box // 2
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) / box
    d = np.sinc(r) ** 2
    d = np.where((d < 1e-2) | (r > 1.0), 1e-2, d)
    return d.astype(np.float32)


def _shell_geometry(box: int):
    """``(r0, frac, r)`` of the 3D half grid ``[kz, ky, kx]`` (RELION's ``fftwHalf_3D_lin``)."""
    k = np.fft.fftfreq(box) * box
    kx = np.arange(box // 2 + 1)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    r0 = np.floor(r).astype(np.int64)
    return r0, r - r0, r


def _heuristic_divisor(weight: np.ndarray, box: int) -> np.ndarray:
    """``max(W, 0.001 · ⟨W⟩(|k|))`` (linear shell average), 0 where ``|k| ≥ s/2`` (RELION's
    ``ctfCorrect3D_heuristic``); ``inf`` marks frequencies to zero."""
    sh = box // 2 + 1
    r0, fr, _ = _shell_geometry(box)
    w = np.asarray(weight, np.float64)
    i0 = r0.ravel()
    i1 = i0 + 1
    f1 = fr.ravel()
    ok0, ok1 = i0 < sh, i1 < sh
    num = np.bincount(i0[ok0], (1 - f1[ok0]) * w.ravel()[ok0], sh) + np.bincount(
        i1[ok1], f1[ok1] * w.ravel()[ok1], sh
    )
    den = np.bincount(i0[ok0], 1 - f1[ok0], sh) + np.bincount(i1[ok1], f1[ok1], sh)
    avg = num / np.maximum(den, 1e-30)
    keep = r0 + 1 < sh
    r0c = np.minimum(r0, sh - 2)
    mean = fr * avg[np.minimum(r0c + 1, sh - 1)] + (1 - fr) * avg[r0c]
    wg = np.maximum(w, HEURISTIC_FRACTION * mean)
    wg = np.where(wg > 0, wg, 1.0)
    return np.where(keep, wg, np.inf)


def finish_map(data_ft, weight, options: ReconstructOptions) -> tuple[np.ndarray, np.ndarray]:
    """One map from its accumulators (RELION's ``reconstruct`` + ``writeOutput``).

    Args:
        data_ft: ``(s, s, s//2+1)`` complex accumulated data (centred phase).
        weight: ``(s, s, s//2+1)`` accumulated ``Σ (CTF · dose)²``.
        options: ``box``, ``snr``, ``crop``, ``taper_px``.

    Returns:
        ``(map, full)``: the map to write ``[z, y, x]`` (cropped when ``crop`` is set, mean
        subtracted, tapered) and the full ``box³`` map before crop and taper.
    """
    from polish3d.imaging import centre_phase_3d, taper_weights

    box = options.box
    d = np.asarray(data_ft, np.complex128) * np.conj(centre_phase_3d(box))
    vol = np.fft.irfftn(d, s=(box,) * 3, axes=(0, 1, 2))
    vol /= _sinc2_divisor(box)
    ft = np.fft.rfftn(vol)
    w = np.asarray(weight, np.float64)
    if options.snr > 0:
        ft /= w + 1.0 / options.snr
    else:
        ft /= _heuristic_divisor(w, box)
    full = np.fft.irfftn(ft, s=(box,) * 3, axes=(0, 1, 2))
    out = full
    if options.crop > 0:
        lo = (box - options.crop) // 2
        out = full[lo : lo + options.crop, lo : lo + options.crop, lo : lo + options.crop]
    t = taper_weights(out.shape[0], options.taper_px).astype(np.float64)
    mean = float(np.sum(t * out) / np.sum(t))
    return (t * (out - mean)).astype(np.float32), full.astype(np.float32)


def fsc_resolution_ang(fsc, box: int, pixel_size_ang: float, threshold: float = 0.143) -> float:
    """Resolution (Å) where the FSC first falls below ``threshold``.

    The crossing shell ``k*`` is interpolated linearly between the last shell at or above the
    threshold and the first below (shell 0 is skipped); ``box · px / k*``. An FSC that never
    falls below gives the Nyquist resolution ``2 · px``; one below from shell 1 on gives
    ``box · px`` (nothing resolved); ``nan`` for a ``nan`` FSC.
    """
    v = np.asarray(fsc, np.float64)
    if v.size < 2 or not np.all(np.isfinite(v[1:])):
        return float("nan")
    below = np.flatnonzero(v[1:] < threshold)
    if below.size == 0:
        return 2.0 * pixel_size_ang
    k = int(below[0]) + 1
    if k == 1:
        return float(box * pixel_size_ang)
    a, b = v[k - 1], v[k]
    ks = (k - 1) + (a - threshold) / (a - b)
    return float(box * pixel_size_ang / ks)


# ----------------------------------------------------------------------------------------------
# optimisation sets
# ----------------------------------------------------------------------------------------------


def _load(source, project_dir=None):
    from polish3d.api import OptimisationSetData, read_optimisation_set

    if isinstance(source, OptimisationSetData):
        return source
    p = Path(source)
    if not p.is_file():
        raise InputError(f"--i {source}: optimisation set not found")
    return read_optimisation_set(p, project_dir=project_dir)


def reconstruct(
    source,
    options: ReconstructOptions | None = None,
    *,
    mask: np.ndarray | None = None,
    project_dir=None,
    **kwargs,
) -> Reconstruction:
    """Reconstruct the two half maps (and their merge) of every particle of an optimisation set.

    Args:
        source: ``optimisation_set.star`` (tilt series, particles, optional motion), or an
            :class:`polish3d.api.OptimisationSetData` — e.g. one whose ``tilt_series`` /
            ``particles`` were replaced by refined geometry (``dataclasses.replace``).
        options: :class:`ReconstructOptions`; or give its fields as keywords (``box=64``,
            ``snr=…``).
        mask: optional real-space mask (``out_box³``) multiplied into both half maps before
            the FSC (the written maps are not masked).
        project_dir: folder relative paths are resolved against (default: the cwd, then next
            to the STAR file naming them).

    Returns:
        :class:`Reconstruction` (maps in output pixels, FSC and resolution at 0.143).

    Raises:
        InputError: bad options, missing files, no particle visible in any tilt.
    """
    t0 = time.perf_counter()
    if options is None:
        options = ReconstructOptions(**kwargs)
    elif kwargs:
        options = dataclasses.replace(options, **kwargs)
    data = _load(source, project_dir)
    acc = new_accumulators(options.box)
    pairs = np.zeros(2, int)
    parts = np.zeros(2, int)
    px = None
    for name, ts in data.tilt_series.items():
        part = data.particles[name]
        if part.n_particles == 0:
            continue
        if px is not None and abs(ts.pixel_size_ang - px) > 1e-6 * px:
            raise InputError(
                f"{name}: rlnTomoTiltSeriesPixelSize {ts.pixel_size_ang:g} differs from "
                f"{px:g} Å of the other tomograms; reconstruct them separately"
            )
        px = ts.pixel_size_ang
        acc, n_pairs, n_parts = backproject_tomogram(ts, part, data.stack(name), options, acc)
        pairs += n_pairs
        parts += n_parts
        log.info(
            "%s: %d particles, %d + %d particle-tilt pairs inserted", name, part.n_particles,
            *n_pairs,
        )
    if px is None or pairs.sum() == 0:
        raise InputError(
            "no particle is visible in any tilt (box --b too large for the images, or no particles)"
        )
    shape = (options.box, options.box, options.box // 2 + 1)
    a = np.asarray(acc).reshape(2, *shape, 3)
    acc_d = a[..., 0] + 1j * a[..., 1].astype(np.complex128)
    acc_w = a[..., 2]
    h1, f1 = finish_map(acc_d[0], acc_w[0], options)
    h2, f2 = finish_map(acc_d[1], acc_w[1], options)
    mg, fm = finish_map(acc_d[0] + acc_d[1], acc_w[0] + acc_w[1], options)
    out_px = px * options.binning
    n_out = options.out_box
    if pairs[0] > 0 and pairs[1] > 0:
        fsc = _fsc(h1, h2, mask, n_out)
        res = fsc_resolution_ang(fsc, n_out, out_px)
    else:
        log.warning("one half set is empty (rlnRandomSubset): no FSC")
        fsc = np.full(n_out // 2 + 1, np.nan)
        res = float("nan")
    full = {"half1": f1, "half2": f2, "merged": fm} if options.crop > 0 else {}
    return Reconstruction(
        half1=h1, half2=h2, merged=mg, pixel_size_ang=float(out_px), fsc=fsc,
        resolution_ang=res, n_pairs=(int(pairs[0]), int(pairs[1])),
        n_particles=(int(parts[0]), int(parts[1])), seconds=time.perf_counter() - t0, full=full,
    )


def _fsc(h1, h2, mask, n: int) -> np.ndarray:
    from polish3d.imaging import fsc_from_half_maps

    if mask is not None:
        mask = np.asarray(mask, np.float32)
        if mask.shape != (n, n, n):
            raise InputError(f"mask is {mask.shape}, the half maps ({n}, {n}, {n})")
        h1, h2 = h1 * mask, h2 * mask
    return fsc_from_half_maps(h1, h2)[1]


def with_results(data, results):
    """``data`` (:class:`polish3d.api.OptimisationSetData`) with the refined geometry of
    ``results`` (``{rlnTomoName: TomogramResult}``, as ``polish3d align`` produces): projections,
    and where not ``None`` positions, trajectories and deformation. Tomograms without a result
    keep their input geometry; ``data`` itself is not modified."""
    tilt_series = dict(data.tilt_series)
    particles = dict(data.particles)
    for name, res in results.items():
        if name not in tilt_series:
            raise InputError(f"tomogram {name!r} of the results is not in {data.files.source}")
        ts = tilt_series[name].replace(projections=np.asarray(res.projections, np.float64))
        if res.deformation is not None:
            ts = ts.replace(deformation=res.deformation)
        part = particles[name]
        if res.positions_px is not None:
            part = part.replace(positions_px=np.asarray(res.positions_px, np.float64))
        if res.trajectories_px is not None:
            part = part.replace(trajectories_px=np.asarray(res.trajectories_px, np.float64))
        tilt_series[name], particles[name] = ts, part
    return dataclasses.replace(data, tilt_series=tilt_series, particles=particles)


def half_map_fsc(
    source, box: int, *, results=None, mask: np.ndarray | None = None, project_dir=None,
    **options,
) -> tuple[np.ndarray, float]:
    """Half-map FSC of the particles of an optimisation set (for before/after reports).

    Reconstructs both half maps exactly as ``polish3d reconstruct`` does and returns the FSC
    per shell (``box//2 + 1`` values, shell ``k`` at ``k / (box · px)`` Å⁻¹) and the resolution
    (Å) at FSC 0.143. With the same ``box`` and options, a better geometry gives a higher FSC.

    Args:
        source: ``optimisation_set.star`` or :class:`polish3d.api.OptimisationSetData` (replace
            its ``tilt_series`` / ``particles`` to score in-memory geometry).
        box: box size (px, even).
        results: optional ``{rlnTomoName: TomogramResult}``: score this refined geometry
            instead of the set's own (see :func:`with_results`).
        mask: optional ``(box, box, box)`` real-space mask applied before the FSC.
        project_dir: see :func:`reconstruct`.
        **options: other :class:`ReconstructOptions` fields (``snr``, ``max_dose``, ``chunk``…).

    Returns:
        ``(fsc, resolution_ang)``.
    """
    if results is not None:
        source = with_results(_load(source, project_dir), results)
    rec = reconstruct(source, ReconstructOptions(box=int(box), **options), mask=mask,
                      project_dir=project_dir)
    return rec.fsc, rec.resolution_ang


def write_reconstruction(rec: Reconstruction, out_dir) -> dict[str, Path]:
    """Write ``half1.mrc``, ``half2.mrc``, ``merged.mrc`` (and ``*_full.mrc`` after ``crop``) and
    ``fsc.star`` (table ``fsc``: ``rlnSpectralIndex``, ``rlnResolution`` Å⁻¹,
    ``rlnAngstromResolution``, ``rlnFourierShellCorrelation``; table ``general``:
    ``rlnFinalResolution`` Å at 0.143), all atomically, pixel size in the MRC headers.

    Returns:
        ``{name: path}`` of the files written.
    """
    import pandas as pd

    from polish3d.io import write_map
    from polish3d.io.star import write_star

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    px = rec.pixel_size_ang
    paths = {}
    for tag in ("half1", "half2", "merged"):
        paths[tag] = write_map(out / f"{tag}.mrc", getattr(rec, tag), px)
    for tag, vol in rec.full.items():
        paths[tag + "_full"] = write_map(out / f"{tag}_full.mrc", vol, px)
    k = rec.shells
    n = len(rec.half1)
    with np.errstate(divide="ignore"):
        res = np.where(k > 0, n * px / np.maximum(k, 1), 999.0)
    general = {
        "rlnFinalResolution": float(rec.resolution_ang),
        "rlnPixelSize": float(px),
        "rlnImageSize": int(n),
    }
    paths["fsc"] = write_star(
        out / "fsc.star",
        {
            "general": general,
            "fsc": pd.DataFrame(
                {
                    "rlnSpectralIndex": k.astype(int),
                    "rlnResolution": k / (n * px),
                    "rlnAngstromResolution": res,
                    "rlnFourierShellCorrelation": np.asarray(rec.fsc, np.float64),
                }
            ),
        },
    )
    return paths


def format_fsc_table(rec: Reconstruction) -> str:
    """The FSC per shell as a short text table, then the resolution line."""
    lines = [f"{'shell':>5} {'1/A':>9} {'A':>8} {'FSC':>7}"]
    n = len(rec.half1)
    for k, v in zip(rec.shells, rec.fsc, strict=True):
        res = n * rec.pixel_size_ang / k if k else float("inf")
        lines.append(f"{k:>5d} {k / (n * rec.pixel_size_ang):>9.5f} {res:>8.2f} {v:>7.4f}")
    lines.append(
        f"resolution at FSC 0.143: {rec.resolution_ang:.2f} A  ({rec.n_pairs[0]} + "
        f"{rec.n_pairs[1]} particle-tilt pairs, {rec.seconds:.1f} s)"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def register_cli(app, run) -> None:
    """Add ``polish3d reconstruct`` to the typer ``app``; ``run(fn)`` maps errors to exit codes."""
    @app.command("reconstruct")
    def reconstruct_cmd(
        i: Annotated[str, typer.Option("--i", help="Optimisation set (optimisation_set.star).")] = "",
        b: Annotated[int, typer.Option("--b", help="Box size (output pixels, even; required).")] = 0,
        o: Annotated[str, typer.Option("--o", help="Output directory (required).")] = "",
        crop: Annotated[int, typer.Option("--crop", help="Also crop the maps to this size (px).")] = -1,
        binning: Annotated[float, typer.Option("--bin", help="Binning factor (output px / tilt px).")] = 1.0,
        snr: Annotated[
            float, typer.Option("--SNR", help="Wiener SNR (1/SNR added to the weights); <=0: heuristic.")
        ] = -1.0,
        max_dose: Annotated[
            float, typer.Option("--max_dose", help="Use only tilts with pre-exposure <= this (e/A^2).")
        ] = -1.0,
        cutoff_fract: Annotated[
            float, typer.Option("--cutoff_fract", help="Ignore frequencies with dose weight below this.")
        ] = 0.01,
        taper: Annotated[float, typer.Option("--taper", help="Final spherical taper width (px).")] = 10.0,
        mask: Annotated[
            str, typer.Option("--mask", help="Mask (MRC) applied to the half maps for the FSC.")
        ] = "",
        chunk: Annotated[
            int, typer.Option("--chunk", help="polish3d: particle-tilt pairs per batch (0: automatic).")
        ] = 0,
        j: Annotated[int, typer.Option("--j", help="Accepted for RELION compatibility (JAX threads).")] = 1,
        device: Annotated[
            str, typer.Option("--device", help="polish3d: JAX platform: cpu, gpu or tpu.")
        ] = "",
    ) -> None:
        """Reconstruct the half maps of the particles (relion_tomo_reconstruct_particle) + FSC."""

        def go():
            if not i:
                raise InputError("--i (optimisation set) is required")
            if not o:
                raise InputError("--o (output directory) is required")
            if b <= 0:
                raise InputError("--b (box size in pixels) is required")
            if j < 1:
                raise InputError(f"--j {j}: must be at least 1")
            if device:
                from polish3d.api import set_device

                set_device(device)
            options = ReconstructOptions(
                box=b, crop=crop, binning=binning, snr=snr, max_dose=max_dose,
                cutoff_fract=cutoff_fract, taper_px=taper, chunk=chunk,
            )
            m = None
            if mask:
                from polish3d.io import read_map

                m = read_map(mask)[0]
                if m.shape != (options.out_box,) * 3:
                    raise InputError(
                        f"--mask {mask}: shape {m.shape}, expected the output box "
                        f"{(options.out_box,) * 3}"
                    )
            rec = reconstruct(i, options, mask=m)
            write_reconstruction(rec, o)
            typer.echo(format_fsc_table(rec))
            typer.echo(f"wrote {Path(o) / 'half1.mrc'}, half2.mrc, merged.mrc, fsc.star")

        run(go)

