"""Fourier-space conventions of the imaging model (pure ``jax.numpy``).

Layouts (``s`` = box size in pixels, ``sh = s // 2 + 1``):

* **2D half spectrum** ``(s, sh)`` indexed ``[ky, kx]``: ``kx = 0..s//2``, ``ky`` in ``fftfreq``
  order (``0, 1, …, s/2−1, −s/2, …, −1``) — exactly ``numpy.fft.rfft2`` of a ``[y, x]`` image.
* **3D half spectrum** ``(s, s, sh)`` indexed ``[kz, ky, kx]`` — ``rfftn`` of a ``[z, y, x]``
  volume.
* **Cropped 2D half spectrum** ``(2K+1, K+1)`` (:func:`crop_half`): only ``|kx|, |ky| ≤ K``
  (``K < s/2``), rows ``ky = −K..K`` in increasing order, columns ``kx = 0..K``; what the CC
  stage computes where its frequency weights are non-zero.
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
    "crop_half",
    "freq_grid_2d",
    "irfft2c",
    "radial_expand",
    "radial_index",
    "radius_2d",
    "rfft2c",
    "rfft2c_cropped",
    "row_signs",
    "shift_phase",
    "uncrop_half",
]


def freq_grid_2d(box: int, k_max: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer frequencies ``(kx, ky)`` (cycles per box) of the ``(box, box//2+1)`` half grid.

    Returned as float32 numpy arrays of shape ``(box, box//2+1)`` (constants under ``jit``); with
    ``k_max`` those of the cropped grid ``(2K+1, K+1)`` of :func:`crop_half` instead.
    """
    kx = np.arange(box // 2 + 1, dtype=np.float32)
    ky = (np.fft.fftfreq(box) * box).astype(np.float32)
    if k_max is not None:
        _check_crop(box, k_max)
        kx, ky = kx[: k_max + 1], np.arange(-k_max, k_max + 1, dtype=np.float32)
    return np.broadcast_to(kx[None, :], (ky.size, kx.size)), np.broadcast_to(ky[:, None], (ky.size, kx.size))


def _check_crop(box: int, k_max: int) -> None:
    if not 0 <= k_max < box // 2:
        raise ValueError(f"k_max must lie in [0, {box // 2}) for box {box}, got {k_max}")


def crop_half(spectrum, k_max: int) -> jnp.ndarray:
    """The frequencies ``|kx|, |ky| ≤ k_max < s/2`` of half spectra ``(..., s, s//2+1)`` (``fftfreq``
    row order): ``(..., 2K+1, K+1)``, rows ``ky = −K..K``.

    Computing a product of spectra only there is exact when a factor is 0 elsewhere (the
    refinement's frequency weights beyond their support); :func:`uncrop_half` puts it back.
    """
    s = spectrum.shape[-2]
    _check_crop(s, k_max)
    cols = spectrum[..., : k_max + 1]
    return jnp.concatenate([cols[..., s - k_max :, :], cols[..., : k_max + 1, :]], axis=-2)


def uncrop_half(cropped, box: int, *, modulated: bool = False) -> jnp.ndarray:
    """Inverse of :func:`crop_half`: ``(..., 2K+1, K+1)`` → ``(..., box, box//2+1)``, 0 elsewhere.

    ``modulated`` (even ``box``): rows ``ky + box/2`` instead of ``ky mod box`` — one pad, no
    reordering; the inverse FFT of that is the image times ``(−1)^y`` (:func:`row_signs`).
    """
    k_max = cropped.shape[-1] - 1
    _check_crop(box, k_max)
    pad = [(0, 0)] * (cropped.ndim - 2)
    if modulated:
        return jnp.pad(cropped, pad + [(box // 2 - k_max, box - box // 2 - k_max - 1), (0, box // 2 - k_max)])
    full = jnp.pad(cropped, pad + [(0, box - 2 * k_max - 1), (0, box // 2 - k_max)])
    return jnp.roll(full, -k_max, axis=-2)


def row_signs(box: int) -> np.ndarray:
    """``(−1)^y`` for the rows ``y = 0..box−1`` (float32): the modulation that moves row
    frequency ``ky`` to ``ky + box/2`` (:func:`rfft2c_cropped`, :func:`uncrop_half`)."""
    return np.where(np.arange(box) % 2 == 0, 1.0, -1.0).astype(np.float32)


def rfft2c_cropped(image, k_max: int) -> jnp.ndarray:
    """:func:`rfft2c` of even-sized ``(..., s, s)`` images at ``|kx|, |ky| ≤ k_max`` only
    (the layout of :func:`crop_half`): the rows are modulated by ``(−1)^y`` before the FFT, so
    ``ky = −K..K`` come out as one contiguous block of rows (no gather, no reordering)."""
    s = image.shape[-1]
    _check_crop(s, k_max)
    if s % 2:
        return crop_half(rfft2c(image), k_max)
    f = jnp.fft.rfft2(image * row_signs(s)[:, None], norm="ortho")
    kx, ky = freq_grid_2d(s, k_max)
    c = s // 2
    centre = np.exp(2j * np.pi * (kx + ky).astype(np.float64) * c / s).astype(np.complex64)
    return f[..., s // 2 - k_max : s // 2 + k_max + 1, : k_max + 1] * centre


def radius_2d(box: int, k_max: int | None = None) -> np.ndarray:
    """Frequency radius ``|k|`` (cycles per box, float32) on the ``(box, box//2+1)`` half grid
    (the cropped grid of :func:`crop_half` with ``k_max``)."""
    kx, ky = freq_grid_2d(box, k_max)
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


def shift_phase(box: int, shift_px, k_max: int | None = None) -> jnp.ndarray:
    """Phase ramp ``exp(−2πi k·shift/s)`` on the ``(box, box//2+1)`` half grid.

    Sign: multiplying the (r)FFT of an image by it **translates the image by +shift**, i.e. the
    content at pixel ``x`` moves to ``x + shift`` (periodic).

    Args:
        box: box size ``s`` (static).
        shift_px: ``(..., 2)`` shift ``(x, y)`` in pixels (may be traced; batch dims broadcast
            in front of the grid).
        k_max: on the cropped grid of :func:`crop_half` instead (static).

    Returns:
        complex64 ``(..., box, box//2+1)``.
    """
    kx, ky = freq_grid_2d(box, k_max)
    shift = jnp.asarray(shift_px, dtype=jnp.float32)
    arg = (kx * shift[..., 0, None, None] + ky * shift[..., 1, None, None]) * (-2.0 * np.pi / box)
    return jnp.exp(1j * arg).astype(jnp.complex64)
