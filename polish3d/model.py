"""Typed in-memory records that flow between I/O and computation (plain numpy, no JAX).

``polish3d.io`` produces them from RELION files and consumes them to write results;
``polish3d.imaging``/``polish3d.refine`` never read files and only see these records (or the
arrays in them). Units are in the field names; frames are those of :mod:`polish3d.geometry`.
Per-tilt arrays are in **file order** (row ``j`` of the per-tilt STAR table); use
``geometry.dose_order`` for dose ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Deformation", "ParticleData", "TiltSeriesData", "TomogramResult"]


@dataclass
class Deformation:
    """A 2D deformation of the tilt images (RELION's ``rlnTomoDeformation*`` columns).

    Attributes:
        model: ``"linear"``, ``"spline"`` or ``"Fourier"`` (``rlnTomoDeformationType``).
        grid_size: ``(rlnTomoDeformationGridSizeX, rlnTomoDeformationGridSizeY)``.
        coefficients: ``(F, n_coeff)`` per tilt (``rlnTomoDeformationCoefficients``), in the
            model's own layout (see ``polish3d.refine.deformation``).
    """

    model: str
    grid_size: tuple[int, int]
    coefficients: np.ndarray


@dataclass
class TiltSeriesData:
    """Everything polish3d needs about one tilt series (one tomogram).

    Attributes:
        name: ``rlnTomoName``.
        pixel_size_ang: ``rlnTomoTiltSeriesPixelSize`` (Å/px); all geometry is in these pixels.
        tomo_size_px: ``(rlnTomoSizeX, rlnTomoSizeY, rlnTomoSizeZ)``.
        image_size_px: tilt-image size ``(W, H)``, from the stack header.
        projections: ``(F, 4, 4)`` tomogram voxel → tilt-image pixel (see ``geometry``).
        hand: ``rlnTomoHand`` (±1), sign of the defocus change with depth.
        defocus_slope: ``rlnTomoDefocusSlope`` (default 1).
        voltage_kv, cs_mm, amplitude_contrast: ``rlnVoltage``, ``rlnSphericalAberration``,
            ``rlnAmplitudeContrast``.
        bfactor_per_dose_ang2: ``rlnCtfBfactorPerElectronDose`` (Å² per e⁻/Å²); 0 ⇒ the
            critical-exposure curve of Grant & Grigorieff is used for dose weighting.
        fractional_dose_e_per_ang2: dose per tilt (``rlnTomoImportFractionalDose``, else the
            difference of the two smallest pre-exposures).
        defocus_u_ang, defocus_v_ang, defocus_angle_deg: per tilt (``rlnDefocusU/V/Angle``).
        ctf_scale: ``rlnCtfScalefactor`` per tilt (default 1).
        ctf_bfactor_ang2: ``rlnCtfBfactor`` per tilt (default 0).
        phase_shift_deg: ``rlnPhaseShift`` per tilt (default 0).
        pre_exposure_e_per_ang2: ``rlnMicrographPreExposure`` per tilt (cumulative dose before
            the tilt, e⁻/Å²).
        image_files: per tilt ``(path, index)``: the MRC file (resolved path) and the 0-based
            section index in it.
        deformation: the stored 2D deformation, or ``None``.
    """

    name: str
    pixel_size_ang: float
    tomo_size_px: tuple[int, int, int]
    image_size_px: tuple[int, int]
    projections: np.ndarray
    hand: float = -1.0
    defocus_slope: float = 1.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    bfactor_per_dose_ang2: float = 0.0
    fractional_dose_e_per_ang2: float = 3.0
    defocus_u_ang: np.ndarray = field(default_factory=lambda: np.zeros(0))
    defocus_v_ang: np.ndarray = field(default_factory=lambda: np.zeros(0))
    defocus_angle_deg: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ctf_scale: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ctf_bfactor_ang2: np.ndarray = field(default_factory=lambda: np.zeros(0))
    phase_shift_deg: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pre_exposure_e_per_ang2: np.ndarray = field(default_factory=lambda: np.zeros(0))
    image_files: list[tuple[str, int]] = field(default_factory=list)
    deformation: Deformation | None = None

    @property
    def n_tilts(self) -> int:
        """Number of tilt images ``F``."""
        return int(self.projections.shape[0])

    def replace(self, **changes) -> TiltSeriesData:
        """A copy with some fields replaced."""
        return dataclasses.replace(self, **changes)


@dataclass
class ParticleData:
    """The particles of one tomogram.

    Attributes:
        names: ``rlnTomoParticleName`` per particle.
        positions_px: ``(N, 3)`` tomogram-frame positions (pixels), origins folded in.
        rotations: ``(N, 3, 3)`` ``M = A_sub · A_part`` (reference frame → tomogram frame).
        half_set: ``(N,)`` ``rlnRandomSubset`` (1 or 2): which half map predicts the particle.
        trajectories_px: ``(N, F, 3)`` input motion (pixels, per tilt in file order) or ``None``.
    """

    names: list[str]
    positions_px: np.ndarray
    rotations: np.ndarray
    half_set: np.ndarray
    trajectories_px: np.ndarray | None = None

    @property
    def n_particles(self) -> int:
        """Number of particles ``N``."""
        return len(self.names)

    def replace(self, **changes) -> ParticleData:
        """A copy with some fields replaced."""
        return dataclasses.replace(self, **changes)


@dataclass
class TomogramResult:
    """What refinement of one tomogram produced (consumed by ``io`` to write files).

    Attributes:
        name: ``rlnTomoName``.
        projections: ``(F, 4, 4)`` refined projection matrices (file order).
        positions_px: ``(N, 3)`` refined positions at the lowest-dose tilt, or ``None`` when
            positions were not refined (shift-only mode).
        trajectories_px: ``(N, F, 3)`` refined motion (pixels, file order, zero at the
            lowest-dose tilt) or ``None``.
        deformation: refined deformation or ``None`` (keep the input's).
        metrics: JSON-serialisable statistics.
        particle_names: ``rlnTomoParticleName`` of the rows of ``positions_px``.
        status: ``"converged"``, or ``"not_converged"`` when the last L-BFGS run stopped at its
            iteration limit.
    """

    name: str
    projections: np.ndarray
    positions_px: np.ndarray | None = None
    trajectories_px: np.ndarray | None = None
    deformation: Deformation | None = None
    metrics: dict = field(default_factory=dict)
    particle_names: tuple[str, ...] = ()
    status: str = "converged"


def deformation_coefficient_count(model: str, grid) -> int:
    """Length of one tilt's ``rlnTomoDeformationCoefficients`` for a model and grid ``(gw, gh)``.

    ``spline``: ``8·gw·gh``; ``linear``: 3; ``Fourier``: ``4·n_freq`` with RELION's frequency
    set (``polish3d.refine.deformation.fourier_frequencies``; the layout RELION *writes*).
    """
    gw, gh = (int(v) for v in grid)
    if model == "spline":
        return 8 * gw * gh
    if model == "linear":
        return 3
    if model == "Fourier":
        n_freq = sum(gw // 2 + (1 if 0 < iy < gh // 2 else 0) for iy in range(gh))
        return 4 * n_freq
    raise ValueError(f"unknown deformation model {model!r}")
