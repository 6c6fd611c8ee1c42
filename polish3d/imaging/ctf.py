"""Contrast transfer function, defocus at depth and dose weights (pure ``jax.numpy``).

All frequency-dependent functions return real float32 arrays on the ``(box, box//2+1)`` half
grid (``kx`` = columns, ``ky`` = rows in ``fftfreq`` order); spatial frequency
``k = (kx, ky) / (box · px)`` in Å⁻¹.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from polish3d.imaging.fourier import freq_grid_2d

__all__ = ["ctf_2d", "defocus_at_depth", "dose_weights", "electron_wavelength_ang"]


def electron_wavelength_ang(voltage_kv):
    """Relativistic electron wavelength (Å): ``12.2643247 / sqrt(V · (1 + 0.978466e-6 · V))``,
    ``V`` in volts (RELION's ``CTF::initialise``). 300 kV → 0.019687 Å."""
    v = jnp.asarray(voltage_kv, dtype=jnp.float32) * 1e3
    return 12.2643247 / jnp.sqrt(v * (1.0 + v * 0.978466e-6))


def _freqs_ang(box: int, pixel_size_ang, k_max: int | None = None):
    kx, ky = freq_grid_2d(box, k_max)
    scale = 1.0 / (box * jnp.asarray(pixel_size_ang, dtype=jnp.float32))
    return kx * scale, ky * scale


def ctf_2d(
    box: int,
    pixel_size_ang,
    defocus_u_ang,
    defocus_v_ang,
    defocus_angle_deg,
    voltage_kv,
    cs_mm,
    amplitude_contrast,
    phase_shift_deg=0.0,
    bfactor_ang2=0.0,
    scale=1.0,
    k_max: int | None = None,
) -> jnp.ndarray:
    """RELION's CTF ``−sin γ(k) · exp(−B|k|²/4) · scale`` on the 2D half grid.

    ``γ = −πλ(ΔU·k_u² + ΔV·k_v²) + (π/2)·Cs·λ³·|k|⁴ − φ − atan(Q0/sqrt(1 − Q0²))`` with
    ``k_u``/``k_v`` the components along/perpendicular to the azimuth ``defocus_angle`` (ΔU acts
    along the direction at ``defocus_angle`` from the x axis), λ the relativistic wavelength, φ
    the phase shift. Positive defocus = underfocus; ``ctf(0) = Q0`` (scale 1, B 0).

    Args:
        box: box size (static int).
        pixel_size_ang: Å per pixel.
        defocus_u_ang, defocus_v_ang: defocus U/V in Å (``rlnDefocusU/V``).
        defocus_angle_deg: astigmatism azimuth in degrees (``rlnDefocusAngle``).
        voltage_kv: acceleration voltage in kV.
        cs_mm: spherical aberration in mm.
        amplitude_contrast: Q0 (0..1).
        phase_shift_deg: phase-plate shift in degrees (``rlnPhaseShift``).
        bfactor_ang2: CTF B-factor in Å² (``rlnCtfBfactor``).
        scale: ``rlnCtfScalefactor``.
        k_max: only the frequencies ``|kx|, |ky| ≤ k_max`` (static; the cropped layout of
            :func:`~polish3d.imaging.fourier.crop_half`, ``(2K+1, K+1)``).

    All scalar arguments may be traced (``vmap`` over particles/tilts).

    Returns:
        float32 ``(box, box//2+1)``.
    """
    x, y = _freqs_ang(box, pixel_size_ang, k_max)
    lam = electron_wavelength_ang(voltage_kv)
    cs = jnp.asarray(cs_mm, dtype=jnp.float32) * 1e7
    q0 = jnp.asarray(amplitude_contrast, dtype=jnp.float32)
    az = jnp.deg2rad(jnp.asarray(defocus_angle_deg, dtype=jnp.float32))
    du = jnp.asarray(defocus_u_ang, dtype=jnp.float32)
    dv = jnp.asarray(defocus_v_ang, dtype=jnp.float32)
    c, s = jnp.cos(az), jnp.sin(az)
    # A = R(az) · diag(−ΔU, −ΔV) · R(az)ᵀ
    axx = -(du * c * c + dv * s * s)
    axy = -(du - dv) * c * s
    ayy = -(du * s * s + dv * c * c)
    u2 = x * x + y * y
    k1 = np.pi * lam
    k2 = 0.5 * np.pi * cs * lam**3
    k3 = jnp.arctan(q0 / jnp.sqrt(1.0 - q0 * q0))
    k5 = jnp.deg2rad(jnp.asarray(phase_shift_deg, dtype=jnp.float32))
    gamma = k1 * (axx * x * x + 2.0 * axy * x * y + ayy * y * y) + k2 * u2 * u2 - k5 - k3
    env = jnp.exp(-jnp.asarray(bfactor_ang2, dtype=jnp.float32) * u2 / 4.0)
    return (-jnp.sin(gamma) * env * jnp.asarray(scale, dtype=jnp.float32)).astype(jnp.float32)


def defocus_at_depth(defocus_ang, depth_px, centre_depth_px, pixel_size_ang, hand, slope):
    """Defocus of a particle at depth (§2.5): ``defocus + hand · px · slope · (depth − centre)``.

    Add the same ``Δz`` to defocus U and V. Depths are ``P_j[2]·[X; 1]`` (pixels) of the particle
    and of the tomogram centre ``c``.

    Args:
        defocus_ang: tilt defocus (Å), U or V.
        depth_px: particle depth (pixels).
        centre_depth_px: depth of the tomogram centre (pixels).
        pixel_size_ang: Å/px.
        hand: ``rlnTomoHand`` (±1).
        slope: ``rlnTomoDefocusSlope``.

    Returns:
        defocus in Å (broadcast of the inputs).
    """
    return defocus_ang + hand * pixel_size_ang * slope * (depth_px - centre_depth_px)


def dose_weights(box: int, pixel_size_ang, dose_e_per_ang2, bfactor_per_dose_ang2=0.0):
    """Radiation-damage weights on the 2D half grid (RELION ``Damage::weightImage``).

    Critical exposure (Grant & Grigorieff 2015): ``exp(−N / (2·(0.245·|k|^−1.665 + 2.81)))``
    with ``|k|`` in Å⁻¹ (DC weight 1), or ``exp(−B·N·|k|²/4)`` when ``B > 0``.

    Args:
        box: box size (static int).
        pixel_size_ang: Å/px.
        dose_e_per_ang2: accumulated dose ``N`` before the tilt (``rlnMicrographPreExposure``).
        bfactor_per_dose_ang2: ``rlnCtfBfactorPerElectronDose`` B (Å² per e⁻/Å²); a static
            Python number or a traced scalar (the choice is made with ``where``).

    Returns:
        float32 ``(box, box//2+1)``.
    """
    x, y = _freqs_ang(box, pixel_size_ang)
    k2 = x * x + y * y
    n = jnp.asarray(dose_e_per_ang2, dtype=jnp.float32)
    b = jnp.asarray(bfactor_per_dose_ang2, dtype=jnp.float32)
    safe_k2 = jnp.where(k2 > 0, k2, 1.0)
    d0 = 0.245 * safe_k2 ** (-1.665 / 2.0) + 2.81
    crit = jnp.where(k2 > 0, jnp.exp(-0.5 * n / d0), 1.0)
    bfac = jnp.exp(-b * n * k2 / 4.0)
    return jnp.where(b > 0, bfac, crit).astype(jnp.float32)
