"""Synthetic RELION 5 optimisation sets with ground truth (``polish3d simulate``).

The images are formed with the **same forward model** that alignment uses for its predictions
(:mod:`polish3d.imaging`): for every particle ``p`` and tilt ``j``

``S_pj = central_slice(ref, P_j[:3,:3]·M_p) · CTF_j(defocus at the particle's depth) · D_j``

(DC removed), inverse-FFT'd to a ``box × box`` patch, translated by the sub-pixel part of its true
2D position, multiplied by RELION's soft circular mask (radius ``box/2``, 5-px fall-off) and
**subtracted** (dark particles, as RELION's ``flip_value``) from tilt image ``j`` at its true
2D position ``u_pj = def_j(xy(P_j·[X_p + m_pj; 1]))`` (true projection ``P_j``, motion ``m_pj``,
2D deformation ``def_j``). White Gaussian noise is added at the requested SNR.

**SNR definition**: ``snr = ⟨s²⟩ / σ²`` where ``⟨s²⟩`` is the mean squared noise-free particle
signal over the pixels within the particle radius (the radius holding 95 % of the reference's
absolute density) of each projected particle centre, averaged over all particles and tilts
of a tomogram, and σ² the per-pixel noise variance. The default 0.05 gives a matched-filter
SNR of about ``sqrt(π r² · snr) ≈ 6`` per particle and tilt for a ribosome at 8 Å/px (box 64):
every single-particle CC peak is visible, yet noisy at the highest tilts, so alignment works
but is not trivial.

With ``aniso_percent``/``series_aniso_percent`` the true projections carry a 2×2 image
distortion about the image centre (anisotropic magnification along a random axis,
:func:`polish3d.geometry.compose_distortion`; written in ``rlnTomoProjX..W`` of the truth and in
``truth.npz`` as ``distortion_true``), which moves the particles and distorts their images.

Nominal ("input") geometry = truth + errors: per-tilt rotation errors (``XTilt``, ``YTilt``,
``ZRot``) and shifts, 3D position errors; no motion, no deformation and no distortion. The output folder:

```
<out>/optimisation_set.star, tomograms.star, tilt_series/<tomo>.star + <tomo>.mrcs,
      particles.star, reference/{half1,half2,mask}.mrc, reference/postprocess.star
<out>/truth/  optimisation set with the true geometry (+ motion.star, deformations)
<out>/truth/truth.npz  every true and nominal array, including unlisted particles
```

Modules: :mod:`~polish3d.simulate.config` (the knobs and their checks),
:mod:`~polish3d.simulate.reference` (phantom, half maps, mask, FSC),
:mod:`~polish3d.simulate.scene` (acquisition, geometry, particles, motion, deformation, defocus),
:mod:`~polish3d.simulate.render` (noise-free images), :mod:`~polish3d.simulate.core` (the
driver, :func:`simulate`) and :mod:`~polish3d.simulate.cli` (``polish3d simulate``).
"""

from polish3d.simulate.cli import register_cli
from polish3d.simulate.config import SimulationConfig, SimulationResult, check_config
from polish3d.simulate.core import simulate
from polish3d.simulate.reference import phantom_volume, soft_sphere_mask
from polish3d.simulate.scene import hagen_dose_order

__all__ = [
    "SimulationConfig",
    "SimulationResult",
    "check_config",
    "hagen_dose_order",
    "phantom_volume",
    "register_cli",
    "simulate",
    "soft_sphere_mask",
]
