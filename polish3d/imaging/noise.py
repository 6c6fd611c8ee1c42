"""Noise power spectrum of a tilt image (RELION ``PowerSpectrum::periodogramAverage2D``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from polish3d.imaging.fourier import radius_2d

__all__ = ["noise_power", "periodogram_average", "radial_average"]


def periodogram_average(image, box: int) -> jnp.ndarray:
    """Mean unitary periodogram ``|rfft2(tile)|²/s²`` of ``s × s`` tiles with 50 % overlap.

    Tiles start at multiples of ``s//2`` and must lie inside the image
    (``0..(W−s)//(s//2)`` per axis), as RELION. Tiles are not windowed and their mean is not
    removed (the DC term is meaningless but unused).

    Args:
        image: ``(H, W)`` ``[y, x]`` (``H, W ≥ box``).
        box: tile size ``s`` (static).

    Returns:
        float32 ``(box, box//2+1)``.
    """
    img = jnp.asarray(image, dtype=jnp.float32)
    h, w = img.shape
    step = box // 2
    ny = (h - box) // step + 1
    nx = (w - box) // step + 1
    ar = np.arange(box)
    cols = np.arange(nx)[:, None] * step + ar[None, :]  # (nx, s)

    def row(by):
        strip = jax.lax.dynamic_slice_in_dim(img, by * step, box, axis=0)  # (s, W)
        tiles = jnp.moveaxis(strip[:, cols], 1, 0)  # (nx, s, s)
        ft = jnp.fft.rfft2(tiles, norm="ortho")
        return jnp.sum(ft.real**2 + ft.imag**2, axis=0)

    total = jax.lax.map(row, jnp.arange(ny))
    return (jnp.sum(total, axis=0) / (nx * ny)).astype(jnp.float32)


def radial_average(spectrum, box: int) -> jnp.ndarray:
    """Radial average of a ``(box, box//2+1)`` half-grid array into ``box//2+1`` shells.

    Linear binning as RELION's ``RadialAvg::fftwHalf_2D_lin``: a value at radius ``r`` adds
    weight ``1 − frac(r)`` to shell ``⌊r⌋`` and ``frac(r)`` to shell ``⌊r⌋+1`` (shells beyond
    ``box//2`` dropped). Empty shells are 0.
    """
    sh = box // 2 + 1
    r = radius_2d(box).astype(np.float64).ravel()
    r0 = np.floor(r).astype(np.int32)
    w1 = (r - r0).astype(np.float32)
    w0 = (1.0 - w1).astype(np.float32)
    i0 = np.minimum(r0, sh)  # shell sh collects the dropped corners
    i1 = np.minimum(r0 + 1, sh)
    norm = np.bincount(i0, w0, sh + 1) + np.bincount(i1, w1, sh + 1)
    v = jnp.reshape(jnp.asarray(spectrum, jnp.float32), (-1,))
    acc = jax.ops.segment_sum(v * w0, i0, num_segments=sh + 1) + jax.ops.segment_sum(
        v * w1, i1, num_segments=sh + 1
    )
    inv = np.where(norm > 0, 1.0 / np.where(norm > 0, norm, 1.0), 0.0).astype(np.float32)
    return (acc * inv)[:sh]


def noise_power(image, box: int) -> jnp.ndarray:
    """Radially averaged noise power ``P(ρ)`` (shells ``0..box//2``) of one tilt image.

    :func:`periodogram_average` followed by :func:`radial_average` (RELION's whitening input,
    §2.4). Unitary FFT: white noise of variance σ² gives ``P ≈ σ²`` in every shell.

    Args:
        image: ``(H, W)`` tilt image ``[y, x]``.
        box: box size ``s`` (static).

    Returns:
        float32 ``(box//2+1,)``.
    """
    return radial_average(periodogram_average(image, box), box)
