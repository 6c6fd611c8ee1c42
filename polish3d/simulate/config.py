"""The simulator's configuration (:class:`SimulationConfig`), its checks and its result record."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polish3d.model import ParticleData, TiltSeriesData

__all__ = ["SimulationConfig", "SimulationResult", "check_config"]


@dataclass(frozen=True)
class SimulationConfig:
    """Knobs of the simulator (units in the names).

    Attributes:
        n_tomograms: number of tilt series.
        n_particles: listed particles per tomogram (written to ``particles.star``).
        n_unlisted: extra particles per tomogram present in the images but not listed.
        tilt_min_deg, tilt_max_deg, tilt_step_deg: tilt range (inclusive) and step.
        dose_symmetric: Hagen dose-symmetric order (0°, then groups of ``dose_group`` tilts
            alternating sides, positive first); else sequential from ``tilt_min_deg``.
        dose_group: group size of the dose-symmetric scheme.
        dose_per_tilt_e_per_ang2: exposure per tilt (e⁻/Å²).
        pixel_size_ang: tilt-series pixel size (Å/px).
        box_px: box size ``s`` (reference box; also the alignment box).
        image_size_px: tilt-image size ``(W, H)``.
        tomo_thickness_px: tomogram depth ``d0`` (tomogram size is ``(W, H, d0)``).
        snr: per-pixel SNR over the particle footprint (see module docstring); 0: no noise.
        tilt_axis_deg: ``rlnTomoZRot`` of the true geometry.
        x_tilt_err_deg, y_tilt_err_deg, z_rot_err_deg: std. dev. of the per-tilt angle errors
            of the nominal geometry (degrees).
        shift_err_px: std. dev. of the per-tilt shift errors (pixels, per axis).
        position_err_px: std. dev. of the 3D particle position errors (pixels, per axis).
        s_vel: motion velocity sigma (Å per e⁻/Å², RELION ``--s_vel``); 0 = no motion.
        s_div: motion correlation length (Å per e⁻/Å², RELION ``--s_div``); the GP kernel is
            ``σ_v²·exp(−|a−b|/σ_d)`` with ``σ_v = fd·s_vel/px``, ``σ_d = fd·s_div/px`` (pixels per
            dose step, ``fd`` = dose per tilt), velocities independent per dose step.
        deformation_amplitude_px: std. dev. of the node values of a per-tilt 2D spline
            deformation (RELION ``spline`` model, grid ``deformation_grid``); 0 = none.
        deformation_grid: ``(gw, gh)`` of the spline deformation.
        aniso_percent: per-tilt anisotropic magnification of the images (%): every tilt's
            distortion ``D = I + [[a, s], [s, −a]]`` about the image centre has
            ``sqrt(a² + s²) = aniso_percent / 100`` along a random axis (0 = none).
        series_aniso_percent: the same, one distortion shared by the tilts of a tilt series
            (added to the per-tilt one).
        defocus_ang: mean defocus (Å, underfocus positive).
        defocus_jitter_ang: per-tilt defocus std. dev. (Å).
        astigmatism_ang: ``defocusU − defocusV`` (Å); the angle is random per tilt series.
        voltage_kv, cs_mm, amplitude_contrast: optics.
        hand: ``rlnTomoHand``.
        particle_diameter_ang: diameter of the built-in phantom (Å).
        half_map_noise: std. dev. of independent Gaussian noise added to each half map,
            relative to the phantom's maximum (the FSC table is computed from the halves).
        seed: random seed (everything is reproducible).
    """

    n_tomograms: int = 2
    n_particles: int = 80
    n_unlisted: int = 10
    tilt_min_deg: float = -60.0
    tilt_max_deg: float = 60.0
    tilt_step_deg: float = 3.0
    dose_symmetric: bool = True
    dose_group: int = 2
    dose_per_tilt_e_per_ang2: float = 3.0
    pixel_size_ang: float = 8.0
    box_px: int = 64
    image_size_px: tuple[int, int] = (512, 512)
    tomo_thickness_px: int = 96
    snr: float = 0.5
    tilt_axis_deg: float = 85.0
    x_tilt_err_deg: float = 0.5
    y_tilt_err_deg: float = 0.5
    z_rot_err_deg: float = 0.5
    shift_err_px: float = 3.0
    position_err_px: float = 2.5
    s_vel: float = 0.0
    s_div: float = 5000.0
    deformation_amplitude_px: float = 0.0
    deformation_grid: tuple[int, int] = (3, 3)
    aniso_percent: float = 0.0
    series_aniso_percent: float = 0.0
    defocus_ang: float = 35000.0
    defocus_jitter_ang: float = 500.0
    astigmatism_ang: float = 400.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    hand: float = -1.0
    particle_diameter_ang: float = 250.0
    half_map_noise: float = 0.02
    seed: int = 0

    def replace(self, **changes) -> SimulationConfig:
        """A copy with some fields replaced."""
        return dataclasses.replace(self, **changes)

    @property
    def tomo_size_px(self) -> tuple[int, int, int]:
        """``(w0, h0, d0)`` = image size × thickness (pixels)."""
        return (int(self.image_size_px[0]), int(self.image_size_px[1]), int(self.tomo_thickness_px))


@dataclass
class SimulationResult:
    """What :func:`simulate` produced.

    Attributes:
        out_dir: the output folder.
        optimisation_set: ``<out>/optimisation_set.star`` (nominal geometry).
        truth_optimisation_set: ``<out>/truth/optimisation_set.star``.
        truth_npz: ``<out>/truth/truth.npz``.
        tilt_series, particles: nominal records (as written).
        truth_tilt_series, truth_particles: true records (listed particles only).
        noise_sigma: per-tomogram noise standard deviation (image units).
        seconds: wall time of the simulation (s).
    """

    out_dir: Path
    optimisation_set: Path
    truth_optimisation_set: Path
    truth_npz: Path
    tilt_series: list[TiltSeriesData]
    particles: dict[str, ParticleData]
    truth_tilt_series: list[TiltSeriesData]
    truth_particles: dict[str, ParticleData]
    noise_sigma: list[float] = field(default_factory=list)
    seconds: float = 0.0



def check_config(cfg: SimulationConfig) -> None:
    """Refuse values under which no meaningful set can be simulated (names the CLI flag).

    Raises:
        ValueError: naming the flag (``--n_particles`` …) and what was expected.
    """

    def need(cond, flag, value, expected):
        if not cond:
            raise ValueError(f"{flag} {value}: expected {expected}")

    need(cfg.n_tomograms >= 1, "--n_tomograms", cfg.n_tomograms, "at least 1 tilt series")
    need(cfg.n_particles >= 1, "--n_particles", cfg.n_particles, "at least 1 particle")
    need(cfg.n_unlisted >= 0, "--n_unlisted", cfg.n_unlisted, "a number >= 0")
    need(np.isfinite(cfg.tilt_step_deg) and cfg.tilt_step_deg > 0, "--tilt_step", cfg.tilt_step_deg,
         "a positive step in degrees")
    need(cfg.tilt_min_deg <= cfg.tilt_max_deg, "--tilt_min/--tilt_max",
         f"{cfg.tilt_min_deg:g}/{cfg.tilt_max_deg:g}", "--tilt_min <= --tilt_max")
    need(-90 < cfg.tilt_min_deg and cfg.tilt_max_deg < 90, "--tilt_min/--tilt_max",
         f"{cfg.tilt_min_deg:g}/{cfg.tilt_max_deg:g}", "tilts strictly between -90 and 90 degrees")
    need(np.isfinite(cfg.pixel_size_ang) and cfg.pixel_size_ang > 0, "--angpix", cfg.pixel_size_ang,
         "a positive pixel size in Å")
    need(cfg.box_px >= 8 and cfg.box_px % 2 == 0, "--box", cfg.box_px, "an even box size >= 8 pixels")
    need(min(cfg.image_size_px) > cfg.box_px, "--image_size", min(cfg.image_size_px),
         f"tilt images larger than the box ({cfg.box_px} px)")
    need(cfg.tomo_thickness_px > 0, "--thickness", cfg.tomo_thickness_px, "a positive thickness in pixels")
    need(np.isfinite(cfg.snr) and cfg.snr >= 0, "--snr", cfg.snr, "an SNR >= 0 (0: no noise)")
    need(cfg.dose_per_tilt_e_per_ang2 >= 0, "--dose", cfg.dose_per_tilt_e_per_ang2, "a dose >= 0 e⁻/Å²")
    for flag, value in (("--x_tilt_err", cfg.x_tilt_err_deg), ("--y_tilt_err", cfg.y_tilt_err_deg),
                        ("--z_rot_err", cfg.z_rot_err_deg), ("--shift_err", cfg.shift_err_px),
                        ("--position_err", cfg.position_err_px), ("--s_vel", cfg.s_vel),
                        ("--deformation", cfg.deformation_amplitude_px)):
        need(np.isfinite(value) and value >= 0, flag, value, "a standard deviation >= 0")
    need(cfg.s_div > 0, "--s_div", cfg.s_div, "a positive correlation length (Å)")
    for flag, value in (("--aniso_percent", cfg.aniso_percent),
                        ("--series_aniso_percent", cfg.series_aniso_percent)):
        need(np.isfinite(value) and 0 <= value < 20, flag, value, "a distortion between 0 and 20 %")

