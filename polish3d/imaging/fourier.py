"""Fourier-space conventions of the imaging model (pure ``jax.numpy``).

Layouts (``s`` = box size in pixels, ``sh = s // 2 + 1``):

* **2D half spectrum** ``(s, sh)`` indexed ``[ky, kx]``: ``kx = 0..s//2``, ``ky`` in ``fftfreq``
  order (``0, 1, …, s/2−1, −s/2, …, −1``) — exactly ``numpy.fft.rfft2`` of a ``[y, x]`` image.
* **3D half spectrum** ``(s, s, sh)`` indexed ``[kz, ky, kx]`` — ``rfftn`` of a ``[z, y, x]``
  volume.
* Frequencies are integers in cycles per box (``k / (s · px)`` in Å⁻¹).
* **Phase origin at the box centre** ``c = s // 2``: a centred transform is
  ``F_c(k) = Σ_x f(x) · exp(−2πi k·(x − c)/s)``, i.e. ``exp(+2πi k·c/s) · rfft`` (``(−1)^k``
  for even ``s``). An object centred on voxel ``c`` therefore has a smooth, nearly real
  spectrum, and geometry is expressed relative to the box centre.
* **Unitary** scaling: forward and inverse ``/ sqrt(#pixels)`` (``norm="ortho"``), so that
  Parseval holds and white noise of variance σ² has ``E|F|² = σ²``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = [
    "centre_phase_2d",
    "centre_phase_3d",
    "freq_grid_2d",
    "irfft2c",
    "radial_expand",
    "radial_index",
    "radius_2d",
    "rfft2c",
    "shift_phase",
]


def freq_grid_2d(box: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer frequencies ``(kx, ky)`` (cycles per box) of the ``(box, box//2+1)`` half grid.

    Returned as float32 numpy arrays of shape ``(box, box//2+1)`` (constants under ``jit``).
    """
    kx = np.arange(box // 2 + 1, dtype=np.float32)
    ky = (np.fft.fftfreq(box) * box).astype(np.float32)
    return np.broadcast_to(kx[None, :], (box, box // 2 + 1)), np.broadcast_to(
        ky[:, None], (box, box // 2 + 1)
    )


def radius_2d(box: int) -> np.ndarray:
    """Frequency radius ``|k|`` (cycles per box, float32) on the ``(box, box//2+1)`` half grid."""
    kx, ky = freq_grid_2d(box)
    return np.sqrt(kx * kx + ky * ky).astype(np.float32)


def radial_index(box: int) -> jnp.ndarray:
    """Integer shell index ``round(|k|)`` (int32, shape ``(box, box//2+1)``).

    Shells ``≥ box//2 + 1`` (the corners) exist; clip or mask them when indexing a profile of
    length ``box//2 + 1``.
    """
    return jnp.asarray(np.floor(radius_2d(box) + 0.5).astype(np.int32))


def radial_expand(profile, box: int) -> jnp.ndarray:
    """Expand a radial profile (shells ``0..n−1``, unit spacing) onto the 2D half grid.

    Linear interpolation at ``|k|`` between shells (as RELION's ``toFftwHalf_2D_lin``); radii
    beyond the last shell take the last value.

    Args:
        profile: ``(n,)`` values per integer shell (any ``n ≥ 2``).
        box: box size ``s`` in pixels.

    Returns:
        ``(box, box//2+1)`` array, dtype of ``profile``.
    """
    profile = jnp.asarray(profile)
    n = profile.shape[-1]
    r = np.minimum(radius_2d(box), n - 1)
    r0 = np.minimum(np.floor(r).astype(np.int32), n - 2)
    f = (r - r0).astype(np.float32)
    return profile[..., r0] * (1 - f) + profile[..., r0 + 1] * f


def centre_phase_2d(box: int) -> np.ndarray:
    """``exp(+2πi k·c/s)`` with ``c = (s//2, s//2)``: multiply an ``rfft2`` by it to move the
    phase origin to the box centre (complex64, ``(box, box//2+1)``)."""
    kx, ky = freq_grid_2d(box)
    c = box // 2
    return np.exp(2j * np.pi * (kx + ky).astype(np.float64) * c / box).astype(np.complex64)


def centre_phase_3d(box: int) -> np.ndarray:
    """3D analogue of :func:`centre_phase_2d`, shape ``(box, box, box//2+1)`` ``[kz, ky, kx]``."""
    k = np.fft.fftfreq(box) * box
    kx = np.arange(box // 2 + 1)
    tot = k[:, None, None] + k[None, :, None] + kx[None, None, :]
    c = box // 2
    return np.exp(2j * np.pi * tot * c / box).astype(np.complex64)


def rfft2c(image) -> jnp.ndarray:
    """Unitary 2D rfft of ``[..., y, x]`` images with the phase origin at the box centre.

    The last two axes must be square (``s × s``). Returns ``(..., s, s//2+1)`` complex.
    """
    s = image.shape[-1]
    return jnp.fft.rfft2(image, norm="ortho") * centre_phase_2d(s)


def irfft2c(spectrum, box: int) -> jnp.ndarray:
    """Inverse of :func:`rfft2c`: ``(..., box, box//2+1)`` → real ``(..., box, box)``."""
    return jnp.fft.irfft2(spectrum * np.conj(centre_phase_2d(box)), s=(box, box), norm="ortho")


def shift_phase(box: int, shift_px) -> jnp.ndarray:
    """Phase ramp ``exp(−2πi k·shift/s)`` on the ``(box, box//2+1)`` half grid.

    Sign: multiplying the (r)FFT of an image by it **translates the image by +shift**, i.e. the
    content at pixel ``x`` moves to ``x + shift`` (periodic).

    Args:
        box: box size ``s`` (static).
        shift_px: ``(..., 2)`` shift ``(x, y)`` in pixels (may be traced; batch dims broadcast
            in front of the grid).

    Returns:
        complex64 ``(..., box, box//2+1)``.
    """
    kx, ky = freq_grid_2d(box)
    shift = jnp.asarray(shift_px, dtype=jnp.float32)
    arg = (kx * shift[..., 0, None, None] + ky * shift[..., 1, None, None]) * (-2.0 * np.pi / box)
    return jnp.exp(1j * arg).astype(jnp.complex64)
