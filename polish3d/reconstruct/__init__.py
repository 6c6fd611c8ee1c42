"""Half maps of the particles from their tilt images (``polish3d reconstruct``).

What ``relion_tomo_reconstruct_particle`` does, in JAX, for any optimisation set:

1. **Where.** Every particle ``p`` is projected into every tilt ``j`` with the geometry the
   refinement uses (:func:`polish3d.score.project_particles`: projection ``P_j``, input motion,
   2D deformation). A pair is used when the box fits in the image (RELION's ``isVisible``:
   ``s/2 < u < size − s/2``) and, with ``max_dose``, the tilt's pre-exposure is at most that.
2. **Observation.** The ``s × s`` window around ``u`` (corner ``round(u) − s//2``), minus the mean
   outside radius ``s/2``, times the 5-px soft circle, Fourier transformed with the exact ``u`` at
   the phase origin (:func:`polish3d.refine.ccmaps.observe_windows`, RELION's
   ``extractAt2D_Fourier``). With ``binning = b``: a window of ``round(b·s)`` px, Fourier-cropped
   to ``s``.
3. **Weighting.** ``D = −CTF · dose · Y`` and ``W = (CTF · dose)²`` (dark particles: the sign is
   flipped as RELION's ``flip_value``); the CTF at the particle's depth (static position),
   the dose weights of the tilt. Frequencies of a row beyond the last one whose dose weight
   exceeds ``cutoff_fract`` (and beyond radius ``s/2``) are zero.
4. **Insertion** (RELION's ``backprojectSlice_backward``). With ``A = P_j[:3,:3] · M_p`` (reference
   → camera) and ``B = A⁻ᵀ``, every 3D half-grid frequency ``k`` whose camera coordinates
   ``B·k = (ξ, η, ζ)`` have ``|ζ| < 1`` (and ``|k| ≤`` the tilt's cutoff row length) receives
   ``(1 − |ζ|) · D(ξ, η)`` and ``(1 − |ζ|) · W(ξ, η)``, bilinearly interpolated in the 2D half
   spectrum (Friedel mate for ``ξ < 0``), into the accumulators of its half set
   (``rlnRandomSubset``). Those frequencies are found without scanning the volume: along the
   axis where the plane normal is largest at most four voxels per column lie within
   ``|ζ| < 1``, so each pair touches ``4·M`` candidates, ``M ≈ π(s/2+1)²`` columns (fixed
   shapes, one ``vmap``).
5. **Finish** (RELION's ``griddingCorrect3D_sinc2`` then ``ctfCorrect3D_heuristic`` or
   ``_Wiener``): inverse transform, divide by ``sinc²(r/s)`` (at least 0.01), transform, divide by
   ``max(W, 0.001 · ⟨W⟩_shell)`` (or ``W + 1/SNR`` with ``snr > 0``), zero beyond radius
   ``s/2``, inverse transform; optional central crop; subtract the mean and taper the last
   10 px of the sphere.

Pairs are processed in fixed-size chunks of one compiled function (memory bounded by the chunk
and the ``(s, s, s/2+1)`` accumulators of data and weight per half set, float32); the tilt images
are read from the (memory-mapped) stacks only where a box lies.

The **FSC** of the two half maps is :func:`polish3d.imaging.fsc_from_half_maps` (shells of
``round(|k|)``); the resolution is where it first falls below 0.143, linearly interpolated
between shells: ``box · px / k*`` (Å).

Modules: :mod:`~polish3d.reconstruct.options` (options, result),
:mod:`~polish3d.reconstruct.insertion` (steps 1–4, the compiled kernel),
:mod:`~polish3d.reconstruct.maps` (step 5, FSC and resolution),
:mod:`~polish3d.reconstruct.halfmaps` (the whole set, before/after FSC, writing the maps),
:mod:`~polish3d.reconstruct.command` (the command line). Every public name is importable from
``polish3d.reconstruct`` itself.
"""

from polish3d.reconstruct.command import register_cli
from polish3d.reconstruct.halfmaps import (
    format_fsc_table,
    half_map_fsc,
    reconstruct,
    with_results,
    write_reconstruction,
)
from polish3d.reconstruct.insertion import backproject_tomogram, new_accumulators
from polish3d.reconstruct.maps import HEURISTIC_FRACTION, finish_map, fsc_resolution_ang, masked_fsc
from polish3d.reconstruct.options import Reconstruction, ReconstructOptions

__all__ = [
    "HEURISTIC_FRACTION",
    "ReconstructOptions",
    "Reconstruction",
    "backproject_tomogram",
    "finish_map",
    "format_fsc_table",
    "fsc_resolution_ang",
    "half_map_fsc",
    "masked_fsc",
    "new_accumulators",
    "reconstruct",
    "register_cli",
    "with_results",
    "write_reconstruction",
]
