"""Reference-map preprocessing and the FSC frequency envelope (RELION §2.3; pure ``jax.numpy``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from polish3d.imaging.fourier import centre_phase_3d, radius_2d

__all__ = [
    "fsc_envelope", "fsc_from_half_maps", "gridding_correction", "prepare_reference", "taper_weights"]

TAPER_WIDTH_PX = 10.0
GRIDDING_EPSILON = 0.02


def taper_weights(box: int, width_px: float = TAPER_WIDTH_PX) -> np.ndarray:
    """Spherical raised-cosine taper about ``(s/2, s/2, s/2)`` (float centre, as RELION).

    1 for ``r < m − width``, ``½ − ½cos(π(m − r)/width)`` for ``m − width ≤ r < m``, 0 beyond,
    with ``m = s/2`` (pixels). Shape ``(box, box, box)``, float32.
    """
    m = box / 2.0
    g = np.arange(box, dtype=np.float64) - m
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    c = np.where(r < m - width_px, 1.0, 0.5 - 0.5 * np.cos(np.pi * (m - r) / width_px))
    return np.where(r < m, c, 0.0).astype(np.float32)


def gridding_correction(box: int) -> np.ndarray:
    """Divisor ``sinc²(r/s) + 0.02`` for the trilinear-interpolation pre-correction.

    ``r`` = distance to the integer centre ``s//2``; voxels with ``r/s ≥ 1`` get ``inf`` (→ 0
    after division). Unlike RELION the centre voxel is kept (RELION zeroes it, a quirk).
    """
    c = box // 2
    g = np.arange(box, dtype=np.float64) - c
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) / box
    d = np.sinc(r) ** 2 + GRIDDING_EPSILON
    return np.where(r < 1.0, d, np.inf).astype(np.float32)


def prepare_reference(volume, box: int, mask=None) -> jnp.ndarray:
    """RELION's reference preprocessing (§2.3 steps 1–5) → centred unitary half spectrum.

    1. multiply by ``mask`` (same shape as ``volume``), if given;
    2. zero-pad centrally to ``box`` (voxel ``i`` → ``i + (box − n)//2``); larger ⇒ ``ValueError``;
    3. subtract the taper-weighted mean inside the sphere ``r < box/2``, multiply by the 10-px
       raised-cosine taper (:func:`taper_weights`);
    4. divide by ``sinc²(r/box) + 0.02`` (gridding pre-correction for trilinear slicing; the
       centre voxel is *not* zeroed);
    5. unitary 3D rfft (``/ box^{3/2}``) with the phase origin at voxel ``box//2``.

    Args:
        volume: ``(n, n, n)`` real map indexed ``[z, y, x]``, at the tilt-series pixel size.
        box: output box size ``s`` (static int, ``≥ n``).
        mask: optional ``(n, n, n)`` soft mask.

    Returns:
        complex64 ``(box, box, box//2+1)`` indexed ``[kz, ky, kx]``.
    """
    v = jnp.asarray(volume, dtype=jnp.float32)
    n = v.shape[0]
    if v.shape != (n, n, n):
        raise ValueError(f"reference must be a cube, got shape {v.shape}")
    if n > box:
        raise ValueError(f"reference map is too big: {n} voxels instead of {box}")
    if mask is not None:
        v = v * jnp.asarray(mask, dtype=jnp.float32)
    if n < box:
        o = (box - n) // 2
        v = jnp.pad(v, [(o, box - n - o)] * 3)
    t = taper_weights(box)
    mean = jnp.sum(t * v) / float(t.sum())
    v = t * (v - mean)
    d = gridding_correction(box)
    v = v * np.where(np.isfinite(d), 1.0 / d, 0.0).astype(np.float32)
    return jnp.fft.rfftn(v, norm="ortho") * centre_phase_3d(box)


def fsc_envelope(
    spectral_index,
    fsc,
    box: int,
    ref_box: int,
    pixel_size_ang: float,
    freq_cutoff_ang: float = -1.0,
    width: float = 5.0,
    use_snr: bool = False,
) -> jnp.ndarray:
    """Reference frequency envelope ``E`` on the 2D half grid (RELION ``reference_map`` §2.3).

    FSC values < 0.143 are set to 0 and the first such row is ``firstBad``; the table (rows in
    order; ``spectral_index`` is only checked for length) is resampled to the ``ref_box``
    shells with ``q = 2(N−1)/ref_box`` (linear), ``SNRw = 2·FSC/(1+FSC)``,
    ``lastShell = (firstBad − 1)/q``, lowered to ``int(ref_box·px/freq_cutoff)`` if that is
    smaller. On the ``box`` grid with ``q2 = box/ref_box`` and ``r = |k|/q2``: weight 0 if
    ``⌊r⌋+1 ≥ ref_box//2+1`` or ``⌊r⌋+1 > lastShell + width·q2``; else the interpolated
    ``SNRw`` (≡ 1 unless ``use_snr``) times ``(1 + cos(πt))/2``, ``t = (r − lastShell)/(width·q2)``
    for ``lastShell < r < lastShell + width·q2``.

    Args:
        spectral_index: ``(N,)`` ``rlnSpectralIndex`` column (0..N−1).
        fsc: ``(N,)`` ``rlnFourierShellCorrelationCorrected`` (table ``fsc`` of postprocess.star).
        box: size of the weight image (static).
        ref_box: reference box size (static; = ``box`` in tomo_align).
        pixel_size_ang: reference pixel size (Å/px), used for ``freq_cutoff_ang``.
        freq_cutoff_ang: explicit resolution cutoff in Å (≤ 0: off).
        width: cosine fall-off width in shells (``--fsc_thresh_width``).
        use_snr: weight by ``SNRw`` (``--use_SNR_weight``); default flat 1.

    Returns:
        float32 ``(box, box//2+1)``.
    """
    fsc = jnp.asarray(fsc, dtype=jnp.float32)
    n_fsc = fsc.shape[0]
    if np.shape(spectral_index)[0] != n_fsc:
        raise ValueError("spectral_index and fsc differ in length")
    sh = ref_box // 2 + 1
    bad = fsc < 0.143
    fsc = jnp.where(bad, 0.0, fsc)
    first_bad = jnp.where(jnp.any(bad), jnp.argmax(bad), n_fsc)
    q = 2.0 * (n_fsc - 1) / ref_box
    r_fsc = q * np.arange(sh)
    r0 = np.floor(r_fsc).astype(np.int32)
    valid = r0 + 1 < n_fsc
    r0c = np.minimum(r0, n_fsc - 2)
    f = (r_fsc - r0c).astype(np.float32)
    fsc_r = (1 - f) * fsc[r0c] + f * fsc[r0c + 1]
    snr = jnp.where(valid, 2.0 * fsc_r / (fsc_r + 1.0), 0.0)
    last_shell = (first_bad - 1).astype(jnp.float32) / q
    if freq_cutoff_ang > 0:
        manual = int(ref_box * pixel_size_ang / freq_cutoff_ang)
        if manual > 0:
            last_shell = jnp.minimum(last_shell, float(manual))
    if not use_snr:
        snr = jnp.ones_like(snr)

    q2 = box / ref_box
    r = radius_2d(box) / q2
    i0 = np.floor(r).astype(np.int32)
    i1 = i0 + 1
    fw = width * q2
    zero = (i1 >= sh) | (i1 > last_shell + fw)
    i0c = np.minimum(i0, sh - 1)
    i1c = np.minimum(i1, sh - 1)
    fr = (r - i0).astype(np.float32)
    g = (1 - fr) * snr[i0c] + fr * snr[i1c]
    t = (r - last_shell) / fw
    env = jnp.where((r > last_shell) & (r < last_shell + fw), (jnp.cos(np.pi * t) + 1.0) / 2.0, 1.0)
    return jnp.where(zero, 0.0, env * g).astype(jnp.float32)


def fsc_from_half_maps(half1: np.ndarray, half2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FSC per integer shell of two half maps (used when no ``--fsc`` table is given).

    Returns ``(spectral_index, fsc)`` with ``box//2 + 1`` shells.
    """
    f1 = np.fft.rfftn(half1)
    f2 = np.fft.rfftn(half2)
    s = half1.shape[0]
    k = np.fft.fftfreq(s) * s
    kx = np.arange(s // 2 + 1)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    shell = np.floor(r + 0.5).astype(int).ravel()
    n = s // 2 + 1
    ok = shell < n
    num = np.bincount(shell[ok], (f1 * np.conj(f2)).real.ravel()[ok], n)
    d1 = np.bincount(shell[ok], (np.abs(f1) ** 2).ravel()[ok], n)
    d2 = np.bincount(shell[ok], (np.abs(f2) ** 2).ravel()[ok], n)
    fsc = num / np.sqrt(np.maximum(d1 * d2, 1e-30))
    fsc[0] = 1.0
    return np.arange(n), fsc
