"""JAX forward model of tilt-image formation (pure ``jax.numpy``; jittable and vmap-able).

Conventions (see :mod:`polish3d.imaging.fourier`): 2D half spectra ``(s, s//2+1)`` indexed
``[ky, kx]`` in ``numpy.fft.rfft2`` layout, 3D ``(s, s, s//2+1)`` ``[kz, ky, kx]``; unitary
transforms; phase origin at the box centre ``s//2``; float32/complex64; box sizes are static
Python ints. Real-space images are ``[y, x]``, volumes ``[z, y, x]``, positions/shifts ``(x, y)``.

Model of one particle in tilt ``j`` (RELION §2.5)::

    Y = extract_observation(image_j, u_pj, s)                      # observation
    S = central_slice(ref_ft, P_j[:3,:3] @ M_p, s) * ctf * dose      # prediction
    image ≈ −irfft2c(S) pasted at u_pj                               # dark particles
"""

from __future__ import annotations

from polish3d.imaging.ctf import ctf_2d, defocus_at_depth, dose_weights, electron_wavelength_ang
from polish3d.imaging.extract import circle_mask, extract_observation, extract_window, observe_windows
from polish3d.imaging.fourier import (
    centre_phase_2d,
    centre_phase_3d,
    freq_grid_2d,
    irfft2c,
    radial_expand,
    radial_index,
    radius_2d,
    rfft2c,
    shift_phase,
)
from polish3d.imaging.noise import noise_power, noise_spectra, radial_average, tile_corners
from polish3d.imaging.projection import central_slice, nyquist_mask, predict_particle
from polish3d.imaging.reference import (
    fsc_envelope,
    fsc_from_half_maps,
    gridding_correction,
    prepare_reference,
    taper_weights,
)

__all__ = [
    "central_slice",
    "centre_phase_2d",
    "centre_phase_3d",
    "circle_mask",
    "ctf_2d",
    "defocus_at_depth",
    "dose_weights",
    "electron_wavelength_ang",
    "extract_observation",
    "extract_window",
    "freq_grid_2d",
    "fsc_envelope",
    "fsc_from_half_maps",
    "gridding_correction",
    "irfft2c",
    "noise_power",
    "noise_spectra",
    "nyquist_mask",
    "observe_windows",
    "predict_particle",
    "prepare_reference",
    "radial_average",
    "radial_expand",
    "radial_index",
    "radius_2d",
    "rfft2c",
    "shift_phase",
    "taper_weights",
    "tile_corners",
]
