"""Fourier insertion of particle tilt images into the half-set accumulators (steps 1–4 of
:mod:`polish3d.reconstruct`; RELION's ``backprojectSlice_backward``), compiled with JAX.

The accumulators are one ``(2·s·s·(s//2+1), 3)`` float32 array: real and imaginary part of the
CTF- and dose-weighted data and the weight ``Σ (CTF · dose)²`` per frequency, half set 1 first.
"""

from __future__ import annotations

import functools

import numpy as np

from polish3d import geometry
from polish3d.errors import InputError
from polish3d.model import ParticleData, TiltSeriesData
from polish3d.reconstruct.options import ReconstructOptions

__all__ = ["backproject_tomogram", "new_accumulators"]


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
