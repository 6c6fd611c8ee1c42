"""Finishing the half maps (step 5 of :mod:`polish3d.reconstruct`: gridding correction, CTF
division, crop and taper) and the FSC of two half maps with its resolution at 0.143."""

from __future__ import annotations

import numpy as np

from polish3d.errors import InputError
from polish3d.reconstruct.options import ReconstructOptions

__all__ = ["finish_map", "fsc_resolution_ang", "masked_fsc"]

#: RELION's ``ctfCorrect3D_heuristic`` weight fraction
HEURISTIC_FRACTION = 0.001


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



def masked_fsc(half1: np.ndarray, half2: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """FSC per shell (``n//2 + 1`` values) of two ``(n, n, n)`` half maps, both multiplied by
    ``mask`` (``(n, n, n)``) first when given.

    Raises:
        InputError: the mask's shape differs from the maps'.
    """
    from polish3d.imaging import fsc_from_half_maps

    if mask is not None:
        mask = np.asarray(mask, np.float32)
        if mask.shape != half1.shape:
            raise InputError(f"mask is {mask.shape}, the half maps {half1.shape}")
        half1, half2 = half1 * mask, half2 * mask
    return fsc_from_half_maps(half1, half2)[1]
