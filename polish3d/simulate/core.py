""":func:`simulate`: a synthetic optimisation set with ground truth (see :mod:`polish3d.simulate`).

The driver draws everything from one random stream in a fixed order (reference halves, then per
tilt series: nominal geometry, particles, orientations, position errors, motion, deformation,
defocus, noise), so a seed always gives the same set.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from einops import rearrange

from polish3d import geometry as geo
from polish3d.io import mrc as mrc_io
from polish3d.io import relion
from polish3d.model import Deformation, ParticleData, TiltSeriesData
from polish3d.score import project_particles
from polish3d.simulate import scene
from polish3d.simulate.config import SimulationConfig, SimulationResult, check_config
from polish3d.simulate.reference import load_reference, write_reference_set
from polish3d.simulate.render import Renderer

__all__ = ["simulate"]

#: the image distortions come from their own random stream (seed, tomogram, this number), so
#: that a set without distortion is drawn exactly as before they existed
_DISTORTION_STREAM = 16


@dataclass
class _Tomogram:
    """One simulated tilt series: its nominal and true records, noise level and truth arrays."""

    ts_nominal: TiltSeriesData
    ts_true: TiltSeriesData
    particles_nominal: ParticleData
    particles_true: ParticleData
    noise_sigma: float
    arrays: dict[str, np.ndarray]


def simulate(config: SimulationConfig, out_dir, reference=None) -> SimulationResult:
    """Simulate an optimisation set with ground truth (see the module docstring).

    Args:
        config: the knobs.
        out_dir: output folder (created; existing files are overwritten).
        reference: optional reference map — a path to an MRC file or a ``[z, y, x]`` array at
            ``config.pixel_size_ang`` with side ``≤ box_px`` — instead of the built-in phantom.

    Returns:
        :class:`SimulationResult`.
    """
    t_start = time.perf_counter()
    check_config(config)
    out = _output_folders(out_dir)
    rng = np.random.default_rng(config.seed)
    vol = load_reference(reference, config)
    refs = write_reference_set(out / "reference", vol, config, rng)
    renderer = Renderer(config, vol, refs.radius_px)
    acq = scene.Acquisition.from_config(config)
    tomograms = [
        _simulate_tomogram(f"TS_{t + 1:02d}", config, acq, refs.radius_px, renderer, rng, out,
                           np.random.default_rng([config.seed, t, _DISTORTION_STREAM]))
        for t in range(config.n_tomograms)
    ]
    return _write_sets(out, config, acq, refs.paths, tomograms, t_start)


def _output_folders(out_dir) -> Path:
    """``out_dir`` with its ``reference/``, ``truth/`` and ``tilt_series/`` folders created."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--o {out_dir}: is an existing file, not a folder; give a folder")
    for sub in ("reference", "truth", "tilt_series"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    return out


def _simulate_tomogram(name: str, cfg: SimulationConfig, acq: scene.Acquisition,
                       radius_px: float, renderer: Renderer, rng, out: Path, rng_distortion) -> _Tomogram:
    """Draw one tilt series (geometry, image distortion, particles, motion, deformation,
    defocus), render its images with noise and write its stack ``<out>/tilt_series/<name>.mrcs``."""
    f = acq.n_tilts
    n_all = cfg.n_particles + cfg.n_unlisted
    fd, px = cfg.dose_per_tilt_e_per_ang2, float(cfg.pixel_size_ang)
    p_true, p_nom = scene.tilt_geometry(cfg, acq.angles_deg, rng)
    distortion = scene.random_distortion(cfg, f, rng_distortion)
    if distortion is not None:  # the true images are distorted; the nominal geometry is not
        p_true = geo.compose_distortion(p_true, distortion, cfg.image_size_px)
    x_true = scene.place_particles(rng, cfg, n_all, radius_px, [p_true, p_nom])
    rots, eul = scene.random_rotations(rng, n_all)
    x_nom = x_true + cfg.position_err_px * rng.normal(size=x_true.shape)
    traj = scene.gp_trajectories(rng, x_true, acq.dose_rank, fd * cfg.s_vel / px,
                                 fd * cfg.s_div / px)  # (N, F, 3)
    deformation = scene.random_deformation(cfg, f, rng)
    defocus = scene.random_defocus(cfg, f, rng)
    stack_path = out / "tilt_series" / f"{name}.mrcs"
    ts_true = _tilt_series(name, cfg, acq, p_true, defocus, stack_path, deformation)
    ts_nom = ts_true.replace(projections=p_nom, deformation=None)

    # every particle, listed or not, moves and is deformed in the images: one forward model
    names = [f"{name}/{i + 1}" for i in range(n_all)]
    everyone = ParticleData(names, x_true, rots, np.ones(n_all, np.int64), trajectories_px=traj)
    uv = rearrange(project_particles(ts_true, everyone), "n f xy -> f n xy")
    dz = _depth_defocus_ang(cfg, p_true, x_true)  # (F, N)
    clean, power = renderer(ts_true, rots, uv, dz)
    sigma = float(np.sqrt(np.mean(power) / cfg.snr)) if cfg.snr > 0 else 0.0
    images = clean + sigma * rng.standard_normal(size=clean.shape, dtype=np.float32)
    mrc_io.write_stack(stack_path, images, px)

    listed = np.arange(cfg.n_particles)
    half = (listed % 2 + 1).astype(np.int64)
    listed_names = names[: cfg.n_particles]
    arrays = {
        "projections_true": p_true,
        "distortion_true": np.broadcast_to(np.eye(2), (f, 2, 2)) if distortion is None else distortion,
        "projections_nominal": p_nom,
        "positions_true_px": x_true,
        "positions_nominal_px": x_nom,
        "rotations": rots,
        "euler_deg": eul,
        "listed": np.arange(n_all) < cfg.n_particles,
        "trajectories_px": traj,
        "uv_true_px": uv,
        **defocus,
        "depth_defocus_ang": dz,
        "noise_sigma": np.float64(sigma),
        "deformation_coefficients": (
            deformation.coefficients if deformation is not None else np.zeros((f, 0))
        ),
    }
    return _Tomogram(
        ts_nominal=ts_nom,
        ts_true=ts_true,
        particles_nominal=ParticleData(listed_names, x_nom[listed], rots[listed], half),
        particles_true=ParticleData(listed_names, x_true[listed], rots[listed], half,
                                    trajectories_px=traj[listed] if cfg.s_vel > 0 else None),
        noise_sigma=sigma,
        arrays=arrays,
    )


def _tilt_series(name: str, cfg: SimulationConfig, acq: scene.Acquisition,
                 projections: np.ndarray, defocus: dict[str, np.ndarray], stack_path: Path,
                 deformation: Deformation | None) -> TiltSeriesData:
    """The record of one simulated tilt series (optics from ``cfg``, images in ``stack_path``)."""
    f = acq.n_tilts
    return TiltSeriesData(
        name=name,
        pixel_size_ang=float(cfg.pixel_size_ang),
        tomo_size_px=cfg.tomo_size_px,
        image_size_px=tuple(int(v) for v in cfg.image_size_px),
        projections=projections,
        hand=cfg.hand,
        defocus_slope=1.0,
        voltage_kv=cfg.voltage_kv,
        cs_mm=cfg.cs_mm,
        amplitude_contrast=cfg.amplitude_contrast,
        bfactor_per_dose_ang2=0.0,
        fractional_dose_e_per_ang2=cfg.dose_per_tilt_e_per_ang2,
        **defocus,
        ctf_scale=np.ones(f),
        ctf_bfactor_ang2=np.zeros(f),
        phase_shift_deg=np.zeros(f),
        pre_exposure_e_per_ang2=acq.pre_exposure_e_per_ang2.astype(np.float64),
        image_files=[(str(stack_path.resolve()), j) for j in range(f)],
        deformation=deformation,
    )


def _depth_defocus_ang(cfg: SimulationConfig, projections: np.ndarray,
                       positions_px: np.ndarray) -> np.ndarray:
    """``(F, N)`` defocus offset (Å) of each particle from its depth relative to the tomogram
    centre (``hand · pixel size · Δz``)."""
    depth = geo.projection_depth(projections, positions_px)
    centre = geo.projection_depth(projections, geo.tomogram_centre_px(cfg.tomo_size_px)[None])
    return cfg.hand * float(cfg.pixel_size_ang) * (depth - centre)


def _write_sets(out: Path, cfg: SimulationConfig, acq: scene.Acquisition,
                refs: dict[str, Path], tomograms: list[_Tomogram],
                t_start: float) -> SimulationResult:
    """Write the nominal set into ``out``, the true one into ``out/truth`` (same project: every
    path relative to ``out``; they share the stacks and references; truth trajectories come
    from the particles' ``trajectories_px``) and ``truth/truth.npz``."""
    ts_nom = [t.ts_nominal for t in tomograms]
    ts_true = [t.ts_true for t in tomograms]
    parts_nom = {t.ts_nominal.name: t.particles_nominal for t in tomograms}
    parts_true = {t.ts_true.name: t.particles_true for t in tomograms}
    opt = relion.write_new_optimisation_set(out, ts_nom, parts_nom, references=refs)
    opt_true = relion.write_new_optimisation_set(
        out / "truth", ts_true, parts_true, references=refs, project_dir=out
    )
    npz: dict[str, np.ndarray] = {
        "tilt_angles_deg": acq.angles_deg,
        "pre_exposure": acq.pre_exposure_e_per_ang2,
    }
    for t in tomograms:
        npz.update({f"{t.ts_true.name}/{key}": value for key, value in t.arrays.items()})
    npz["config_json"] = np.array(json.dumps(dataclasses.asdict(cfg)))
    npz_path = out / "truth" / "truth.npz"
    np.savez_compressed(npz_path, **npz)
    return SimulationResult(
        out_dir=out,
        optimisation_set=Path(opt),
        truth_optimisation_set=Path(opt_true),
        truth_npz=npz_path,
        tilt_series=ts_nom,
        particles=parts_nom,
        truth_tilt_series=ts_true,
        truth_particles=parts_true,
        noise_sigma=[t.noise_sigma for t in tomograms],
        seconds=time.perf_counter() - t_start,
    )
