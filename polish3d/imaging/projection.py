"""Central-slice projection of a prepared reference (RELION ``ForwardProjection``; pure ``jnp``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from polish3d.imaging.fourier import freq_grid_2d, radius_2d

__all__ = ["central_slice", "nyquist_mask", "predict_particle"]


def nyquist_mask(box: int, k_max: int | None = None) -> np.ndarray:
    """``|k| ≤ box/2`` on the 2D half grid (bool ``(box, box//2+1)``; the cropped grid of
    :func:`~polish3d.imaging.fourier.crop_half` with ``k_max``)."""
    return radius_2d(box, k_max) <= box / 2.0


def central_slice(ref_ft, rotation, box: int, k_max: int | None = None) -> jnp.ndarray:
    """2D centred unitary rfft of the projection of the rotated reference (central-slice theorem).

    The reference spectrum (from :func:`~polish3d.imaging.reference.prepare_reference`) is
    sampled at ``q = rotationᵀ · (kx, ky, 0)`` by trilinear interpolation on the half grid; points
    with ``qx < 0`` use Hermitian symmetry ``F(q) = conj F(−q)`` (as RELION's
    ``linearXYZ_FftwHalf_complex``; ``ky``/``kz`` wrap periodically). Frequencies with
    ``|k| > box/2`` are 0. The result is scaled by ``sqrt(box)`` so that
    ``irfft2c(slice, box)`` is the **line integral** (sum over voxels along the camera z axis) of
    the preprocessed volume rotated about voxel ``box//2``: the camera pixel ``c + p`` (``c``
    the box centre) sees ``Σ_z V(c + rotationᵀ·(p, z))``. (RELION's prediction is the bare slice,
    i.e. this value ``/ sqrt(box)``.)

    Args:
        ref_ft: complex ``(box, box, box//2+1)`` ``[kz, ky, kx]`` centred unitary half spectrum.
        rotation: ``(3, 3)`` matrix mapping reference coordinates (x, y, z) to camera coordinates
            (image x, image y, depth) — for a particle ``P_j[:3,:3] · M_p``. Differentiable.
        box: box size ``s`` (static).
        k_max: only the frequencies ``|kx|, |ky| ≤ k_max`` (static; the layout of
            :func:`~polish3d.imaging.fourier.crop_half`, ``(2K+1, K+1)``).

    Returns:
        complex64 ``(box, box//2+1)`` ``[ky, kx]``, phase origin at the box centre.
    """
    sh = box // 2 + 1
    kx, ky = freq_grid_2d(box, k_max)
    rot = jnp.asarray(rotation, dtype=jnp.float32)
    # q_i = Σ_a R[a, i] k_a with k = (kx, ky, 0)
    qx = rot[0, 0] * kx + rot[1, 0] * ky
    qy = rot[0, 1] * kx + rot[1, 1] * ky
    qz = rot[0, 2] * kx + rot[1, 2] * ky
    neg = qx < 0
    sgn = jnp.where(neg, -1.0, 1.0)
    xd, yd, zd = qx * sgn, qy * sgn, qz * sgn

    x0f = jnp.floor(xd)
    y0f = jnp.floor(yd)
    z0f = jnp.floor(zd)
    fx, fy, fz = xd - x0f, yd - y0f, zd - z0f
    x0 = jnp.clip(x0f.astype(jnp.int32), 0, sh - 1)
    x1 = jnp.clip(x0 + 1, 0, sh - 1)
    y0 = jnp.mod(y0f.astype(jnp.int32), box)
    y1 = jnp.mod(y0 + 1, box)
    z0 = jnp.mod(z0f.astype(jnp.int32), box)
    z1 = jnp.mod(z0 + 1, box)

    flat = jnp.reshape(ref_ft, (-1,))

    def at(z, y, x):
        return jnp.take(flat, (z * box + y) * sh + x, mode="clip")

    vx00 = (1 - fx) * at(z0, y0, x0) + fx * at(z0, y0, x1)
    vx10 = (1 - fx) * at(z0, y1, x0) + fx * at(z0, y1, x1)
    vx01 = (1 - fx) * at(z1, y0, x0) + fx * at(z1, y0, x1)
    vx11 = (1 - fx) * at(z1, y1, x0) + fx * at(z1, y1, x1)
    vxy0 = (1 - fy) * vx00 + fy * vx10
    vxy1 = (1 - fy) * vx01 + fy * vx11
    v = (1 - fz) * vxy0 + fz * vxy1
    v = jnp.where(neg, jnp.conj(v), v)
    v = jnp.where(nyquist_mask(box, k_max), v, 0.0) * np.float32(np.sqrt(box))
    return v.astype(jnp.complex64)


def predict_particle(ref_ft, rotation, ctf, dose, box: int) -> jnp.ndarray:
    """Predicted particle spectrum ``central_slice · ctf · dose`` (DC kept; RELION zeroes the DC
    term of both prediction and observation only inside the CC).

    Args:
        ref_ft: prepared reference (see :func:`central_slice`).
        rotation: ``(3, 3)`` reference → camera rotation.
        ctf: ``(box, box//2+1)`` CTF (e.g. :func:`~polish3d.imaging.ctf.ctf_2d`) or ``None``.
        dose: ``(box, box//2+1)`` dose weights or ``None``.
        box: box size (static).
    """
    s = central_slice(ref_ft, rotation, box)
    if ctf is not None:
        s = s * ctf
    if dose is not None:
        s = s * dose
    return s
