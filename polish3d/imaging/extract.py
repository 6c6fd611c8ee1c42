"""Observation extraction from a tilt image (RELION ``TomoExtraction``; pure ``jax.numpy``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from polish3d.imaging.fourier import rfft2c, rfft2c_cropped, shift_phase

__all__ = ["EDGE_FALLOFF_PX", "circle_mask", "extract_observation", "extract_window", "observe_windows"]

EDGE_FALLOFF_PX = 5.0


def circle_mask(box: int, falloff_px: float = EDGE_FALLOFF_PX) -> tuple[np.ndarray, np.ndarray]:
    """RELION's ``cropCircle`` weights about ``(s/2, s/2)`` (float centre).

    Returns ``(mask, outside)``: ``mask`` = 1 for ``ρ < s/2 − falloff``,
    ``½ − ½cos(π(s/2 − ρ)/falloff)`` up to ``s/2``, 0 beyond; ``outside`` = ``ρ > s/2`` (the pixels
    whose mean is subtracted). Both ``(box, box)`` ``[y, x]``.
    """
    m = box / 2.0
    g = np.arange(box, dtype=np.float64) - m
    r = np.sqrt(g[:, None] ** 2 + g[None, :] ** 2)
    c = np.where(
        r < m - falloff_px,
        1.0,
        np.where(r < m, 0.5 - 0.5 * np.cos(np.pi * (m - r) / falloff_px), 0.0),
    )
    return c.astype(np.float32), r > m


def extract_window(image, corner_px, box: int) -> jnp.ndarray:
    """The ``box × box`` window of ``image`` (``[y, x]``) whose corner pixel is ``corner_px``
    (``(x, y)`` ints, may be traced); indices are clamped to the border (edge replication)."""
    h, w = image.shape[-2:]
    corner = jnp.asarray(corner_px, dtype=jnp.int32)
    ar = jnp.arange(box, dtype=jnp.int32)
    ix = jnp.clip(corner[0] + ar, 0, w - 1)
    iy = jnp.clip(corner[1] + ar, 0, h - 1)
    return image[..., iy[:, None], ix[None, :]]


def extract_observation(image, position_px, box: int) -> jnp.ndarray:
    """Centred Fourier observation of the particle projected at ``position_px`` (RELION §2.5).

    Takes the ``s × s`` window with corner ``round(u) − s//2`` (``round`` = half up; clamped
    indices), subtracts the mean of the window pixels at radius ``> s/2`` from ``(s/2, s/2)``,
    multiplies by the 5-px soft circular mask (:func:`circle_mask`), takes the unitary rfft2 with
    the phase origin at the box centre and multiplies by ``exp(+2πi k·δ/s)``,
    ``δ = u − round(u)``, so that the exact position ``u`` is the phase origin (i.e. the window
    content is translated by ``−δ``). Differentiable w.r.t. ``position_px`` through that phase
    (the integer window is piecewise constant).

    Args:
        image: ``(H, W)`` tilt image ``[y, x]``.
        position_px: ``(2,)`` position ``(x, y)`` in tilt-image pixels (may be traced).
        box: box size ``s`` (static int).

    Returns:
        complex64 ``(box, box//2+1)``.
    """
    u = jnp.asarray(position_px, dtype=jnp.float32)
    r = jnp.floor(u + 0.5)
    corner = r.astype(jnp.int32) - box // 2
    win = extract_window(jnp.asarray(image, dtype=jnp.float32), corner, box)
    return observe_windows(win, u - r)


def observe_windows(windows, frac_px, k_max: int | None = None) -> jnp.ndarray:
    """Fourier observations from raw windows ``(..., s, s)`` and sub-pixel offsets ``(..., 2)``.

    The second half of :func:`extract_observation` (the refinement gathers its windows on the
    host, :func:`polish3d.refine.ccmaps.gather_pairs`, and calls this on them): the mean of the
    pixels at radius ``> s/2`` subtracted, the soft circular mask, the centred unitary rfft2 and
    the phase ramp of ``frac = u − round(u)`` that puts the exact position at the phase origin.
    With ``k_max`` only ``|kx|, |ky| ≤ k_max`` (:func:`polish3d.imaging.fourier.rfft2c_cropped`).
    """
    box = windows.shape[-1]
    mask, outside = circle_mask(box)
    n_out = max(int(outside.sum()), 1)
    mean_out = jnp.sum(jnp.where(outside, windows, 0.0), axis=(-2, -1), keepdims=True) / n_out
    masked = mask * (windows - mean_out)
    spectrum = rfft2c(masked) if k_max is None else rfft2c_cropped(masked, k_max)
    return spectrum * shift_phase(box, -frac_px, k_max)
