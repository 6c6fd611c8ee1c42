"""The final stage's data term: the CC as an exact function of the real 2D displacement.

The CC window of stage 1 samples ``C(d) = Re Σ_k c_k · g(k) · exp(2πi k·d/s) / s²`` (``g`` the
weighted cross spectrum of the observed box and the predicted particle, :func:`ccmaps.cc_spectra`;
``c_k = 1`` on the ``kx = 0`` column of the half spectrum, 2 elsewhere) at integer ``d``, and
stage 2 interpolates those samples bicubically. Evaluating the same trigonometric polynomial at
the real displacement instead applies the sub-pixel shift as a Fourier phase ramp to the
prediction: for a fixed prediction this is, up to a constant, the whitened Gaussian
log-likelihood of the observed box (the ``|S|²`` and ``|Y|²`` terms do not depend on the shift),
so no sampling grid and no interpolation kernel pull the optimum anywhere.

The final stage uses the polynomial's exact Taylor coefficients to 4th order about each pair's
current prediction (:func:`compute_taylor`, 15 numbers per pair, computed like the CC windows
but without the inverse FFT; no spectra are stored) and re-expands if a prediction moved more
than a tenth of a pixel. :func:`exact_values` evaluates the full polynomial from cropped spectra
(rows ``ky = −K..K``, columns ``kx = 0..K``, scaled by ``c_k/s²``): the reference the expansion
is tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from polish3d import imaging
from polish3d.imaging.fourier import crop_half
from polish3d.refine import ccmaps, devices

__all__ = [
    "TAYLOR_ORDER",
    "compute_taylor",
    "exact_values",
    "spectrum_support",
    "taylor_exponents",
    "taylor_values",
]

#: order of the local expansion of the final stage (remainder ~5e-7 of the CC for moves ≤ 0.1 px
#: at box 64, see :func:`compute_taylor`)
TAYLOR_ORDER = 4


def spectrum_support(weights, box: int) -> int:
    """``K``: the largest ``|kx|`` or ``|ky|`` (Fourier pixels, below Nyquist) where any tilt's
    frequency weight ``weights (F, s, s//2+1)`` is non-zero (at least 1)."""
    return max(1, min(ccmaps.weight_extent(weights, box), box // 2 - 1))


def _crop(g, box: int, k_max: int):
    """``(P, s, s//2+1)`` half spectra → ``(P, 2K+1, K+1)``: rows ``ky = −K..K``, columns
    ``kx = 0..K``, scaled by ``c_kx / s²`` (so :func:`exact_values` needs no further factor)."""
    c = np.full(k_max + 1, 2.0 / (box * box), np.float32)
    c[0] = 1.0 / (box * box)
    return crop_half(g, k_max) * c[None, None, :]


def exact_values(spec: jax.Array, delta_px: jax.Array, two_pi_over_box) -> jax.Array:
    """``C(Δ)`` of every pair at real displacements ``delta_px (..., 2)`` (``x, y``, pixels) from
    the phase origin, for cropped spectra ``spec (..., 2K+1, K+1)`` (``_crop`` of the spectra of
    :func:`polish3d.refine.ccmaps.cc_spectra`).

    ``two_pi_over_box`` is ``2π/s`` (radians per pixel per Fourier pixel). Exact (no
    interpolation); periodic in ``Δ`` with period ``s``. Differentiable in ``delta_px``.
    """
    kk = spec.shape[-1] - 1
    ky = jnp.arange(-kk, kk + 1, dtype=jnp.float32)
    kx = jnp.arange(kk + 1, dtype=jnp.float32)
    px = two_pi_over_box * delta_px[..., 0, None] * kx  # (..., K+1)
    py = two_pi_over_box * delta_px[..., 1, None] * ky  # (..., 2K+1)
    ex = jax.lax.complex(jnp.cos(px), jnp.sin(px))
    ey = jax.lax.complex(jnp.cos(py), jnp.sin(py))
    row = jnp.einsum("...yx,...x->...y", spec, ex)
    return jnp.real(jnp.einsum("...y,...y->...", row, ey))


def taylor_exponents(order: int = TAYLOR_ORDER) -> tuple[tuple[int, int], ...]:
    """Monomials ``dx^a · dy^b`` with ``a + b ≤ order``, in the order of the coefficients."""
    return tuple((a, t - a) for t in range(order + 1) for a in range(t, -1, -1))


def _taylor_from_spectra(g, box: int, order: int, k_max: int | None = None, radius: float | None = None,
                         cropped: bool = False):
    """Taylor coefficients ``(P, M)`` of ``C(Δ)`` at ``Δ = 0`` from half spectra ``(P, s, sh)``:
    ``m_ab = Re Σ_k c_k g(k) (iθx)^a (iθy)^b / (a! b! s²)``, ``θ = 2πk/s`` (Nyquist excluded;
    with ``k_max`` only ``|kx|, |ky| ≤ k_max``, where the weights are non-zero; with ``radius``
    only ``|k| ≤ radius``: the CC of those frequencies alone). ``cropped``: ``g`` holds only
    ``|kx|, |ky| ≤ k_max`` (``(P, 2K+1, K+1)``, :func:`polish3d.imaging.fourier.crop_half`)."""
    import math

    kx, ky = (np.asarray(a, np.float64) for a in imaging.freq_grid_2d(box, k_max if cropped else None))
    c = np.where(kx == 0, 1.0, 2.0) / (box * box)
    c = np.where(kx == box // 2, 0.0, c)  # Nyquist column
    keep = np.abs(ky) < box / 2  # all but the Nyquist row
    if radius is not None:
        keep = keep & (np.hypot(kx, ky) <= radius)
    if k_max is not None:  # only the frequencies that carry weight
        keep = keep & (np.maximum(np.abs(kx), np.abs(ky)) <= k_max)
    tx, ty = 2.0 * np.pi * kx / box, 2.0 * np.pi * ky / box
    basis = []
    for a, b in taylor_exponents(order):
        f = (1j * tx) ** a * (1j * ty) ** b * c * keep
        basis.append(f / (math.factorial(a) * math.factorial(b)))
    basis = np.stack(basis).reshape(len(basis), -1)  # (M, rows·cols): Re(g · basis) summed over k
    used = np.flatnonzero(np.any(basis != 0, axis=0))
    # one real matrix product (P, 2·K') @ (2·K', M): [Re g, Im g] · [Re b; −Im b]
    b = np.concatenate([basis.real[:, used], -basis.imag[:, used]], axis=1).T.astype(np.float32)
    flat = g.reshape(g.shape[0], -1)[:, used]
    return jnp.concatenate([flat.real, flat.imag], axis=1) @ jnp.asarray(b)


def _taylor_pairs(windows, frac, cam_rot, depth, tilt, half, valid, weight, const, order, k_max,
                  low_radius=None):
    """Taylor coefficients ``(P, M)`` of a batch of pairs (arguments as
    :func:`polish3d.refine.ccmaps.cc_spectra`): two compiled calls (see ``ccmaps.spectra``)."""
    box = windows.shape[-1]
    g = ccmaps.spectra(windows, frac, cam_rot, depth, tilt, half, valid, weight, const, k_max)
    return _taylor_moments(g, box, order, k_max, low_radius)


@functools.partial(jax.jit, static_argnames=("box", "order", "k_max", "low_radius"))
def _taylor_moments(g, box: int, order: int, k_max: int, low_radius: float | None):
    m = _taylor_from_spectra(g, box, order, k_max, cropped=True)
    if low_radius is None:
        return m
    return jnp.concatenate([m, _taylor_from_spectra(g, box, 0, k_max, low_radius, cropped=True)], axis=1)


def compute_taylor(
    stack,
    geom: ccmaps.PairGeometry,
    const: ccmaps.CCInputs,
    *,
    box: int,
    chunk: int = 8,
    n_pad: int | None = None,
    order: int = TAYLOR_ORDER,
    low_radius: float | None = None,
) -> np.ndarray:
    """Taylor coefficients ``(n_pad, F, M)`` float32 of every visible pair of ``geom`` (its
    predictions, :class:`~polish3d.refine.ccmaps.PairGeometry`): the exact CC's expansion about
    the prediction ``geom.u_px`` (others 0); monomials as :func:`taylor_exponents`.

    The coefficients are exact moments of the pair's CC spectrum (computed as the CC windows
    are, without the inverse FFT), so ``C(Δ) = Σ m_ab Δx^a Δy^b + R`` with the remainder
    ``|R| ≤ Σ_k |c_k g(k)| (θ_max |Δ|)^(order+1) / (order+1)!``: for a peak of spectral extent
    ``θ_max = 2πK/s`` (e.g. ``K = 23`` at ``s = 64``: 2.3 rad/px) and ``|Δ| ≤ 0.1`` px that is
    ~5·10⁻⁷ of the CC, far below the curvature term that fixes the optimum (~(θΔ)²/2 ≈ 3 %).
    Memory: ``M = 15`` floats per pair at order 4 (no spectra are stored). With ``low_radius``
    (Fourier pixels) one more column: the CC at the prediction from ``|k| ≤ low_radius`` alone
    (from the same spectrum: the reference checks' low band).
    """
    n, f = geom.u_px.shape[:2]
    n_pad = n if n_pad is None else max(n, n_pad)
    m = len(taylor_exponents(order)) + (low_radius is not None)
    # frequencies without weight contribute nothing: skip them (exact)
    k_max = spectrum_support(np.asarray(const.weights) * np.asarray(const.dose), box)
    out = np.zeros((n_pad, f, m), np.float32)
    todo = np.asarray(geom.visible, bool)
    const = devices.replicate(const)  # (on every device, if several)
    weight = ccmaps.pass_weights(const, k_max=k_max)
    batches = ccmaps.pair_batches(stack, geom, todo, box=box, chunk=chunk)
    for p_b, t_b, k, m in ccmaps.one_behind(
        (p_b, t_b, k, _taylor_pairs(*args, weight, const, order, k_max, low_radius))
        for p_b, t_b, k, args in batches
    ):
        out[p_b, t_b] = np.asarray(m)[:k]
    return out


def taylor_values(coeffs: jax.Array, delta_px: jax.Array, radius_px) -> jax.Array:
    """``C(Δ)`` from Taylor coefficients ``coeffs (..., M)`` at ``delta_px (..., 2)`` (pixels).

    Beyond ``radius_px`` (the range where the expansion is trusted) the displacement is clamped
    radially, and a quadratic penalty ``κ·(|Δ| − radius)²`` (``κ`` the pair's curvature
    ``−(m_20 + m_02)``, floored at 0) is subtracted, so the model stays bounded and pulls back
    inside; the final stage never gets there in practice (moves ≤ 0.05 px).
    """
    m = coeffs.shape[-1]
    order = int(round((np.sqrt(8 * m + 1) - 3) / 2))
    r = jnp.sqrt(jnp.sum(delta_px * delta_px, -1) + 1e-20)
    excess = jnp.maximum(r - radius_px, 0.0)
    d = delta_px * (jnp.minimum(1.0, radius_px / r))[..., None]
    dx, dy = d[..., 0], d[..., 1]
    px = [jnp.ones_like(dx)]
    py = [jnp.ones_like(dy)]
    for _ in range(order):
        px.append(px[-1] * dx)
        py.append(py[-1] * dy)
    mono = jnp.stack([px[a] * py[b] for a, b in taylor_exponents(order)], -1)
    exps = taylor_exponents(order)
    kappa = jnp.maximum(-(coeffs[..., exps.index((2, 0))] + coeffs[..., exps.index((0, 2))]), 0.0)
    return jnp.sum(coeffs * mono, -1) - kappa * excess * excess
