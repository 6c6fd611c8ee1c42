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

Nominal ("input") geometry = truth + errors: per-tilt rotation errors (``XTilt``, ``YTilt``,
``ZRot``) and shifts, 3D position errors; no motion and no deformation. The output folder:

```
<out>/optimisation_set.star, tomograms.star, tilt_series/<tomo>.star + <tomo>.mrcs,
      particles.star, reference/{half1,half2,mask}.mrc, reference/postprocess.star
<out>/truth/  optimisation set with the true geometry (+ motion.star, deformations)
<out>/truth/truth.npz  every true and nominal array, including unlisted particles
```
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import typer

from polish3d import geometry as geo
from polish3d.model import Deformation, ParticleData, TiltSeriesData

__all__ = [
    "SimulationConfig",
    "SimulationResult",
    "hagen_dose_order",
    "phantom_volume",
    "register_cli",
    "simulate",
    "soft_sphere_mask",
]

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------


def phantom_volume(box: int, pixel_size_ang: float, diameter_ang: float = 250.0) -> np.ndarray:
    """A chiral, asymmetric ribosome-like phantom (sum of Gaussian blobs), ``[z, y, x]`` float32.

    Two "subunits" (a large body of radius ≈ 0.42·d and a small one of ≈ 0.3·d, offset along
    a skewed axis) built from 60 + 30 Gaussian blobs (σ ≈ 12–24 Å) at fixed pseudo-random
    places, plus a helical "stalk" of 6 blobs (chirality); centred on voxel ``box//2`` with
    its extent ``≈ diameter_ang``. Peak value ≈ 1. The geometry is in Å, so the physical size
    does not depend on the pixel size.
    """
    rng = np.random.default_rng(20240611)
    d = diameter_ang
    blobs = []

    def body(n, centre, radius, sig):
        pts = rng.normal(size=(n, 3))
        pts /= np.linalg.norm(pts, axis=1, keepdims=True)
        pts *= radius * rng.uniform(0.0, 1.0, size=(n, 1)) ** (1 / 3)
        for p in pts:
            blobs.append((np.asarray(centre) + p * np.array([1.0, 0.85, 0.75]), sig, 1.0))

    body(60, [-0.08 * d, -0.05 * d, -0.02 * d], 0.30 * d, 0.055 * d)
    body(30, [0.17 * d, 0.14 * d, 0.08 * d], 0.20 * d, 0.05 * d)
    for i in range(6):  # right-handed helical stalk
        t = i / 5.0
        a = 2.0 * np.pi * 0.8 * t
        blobs.append(
            (
                np.array(
                    [-0.30 * d + 0.06 * d * np.cos(a), 0.20 * d + 0.2 * d * t, 0.06 * d * np.sin(a)]
                ),
                0.04 * d,
                0.8,
            )
        )
    g = (np.arange(box, dtype=np.float64) - box // 2) * pixel_size_ang
    vol = np.zeros((box, box, box))
    zz, yy, xx = np.meshgrid(g, g, g, indexing="ij")
    centres = np.array([b[0] for b in blobs])
    centres -= centres.mean(axis=0)
    for (_, sig, amp), c in zip(blobs, centres, strict=True):
        vol += amp * np.exp(
            -((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2) / (2 * sig**2)
        )
    vol /= vol.max()
    return vol.astype(np.float32)


def soft_sphere_mask(box: int, radius_px: float, edge_px: float = 6.0) -> np.ndarray:
    """Soft spherical mask about voxel ``box//2``: 1 inside ``radius``, raised-cosine to 0 over
    ``edge_px`` (``[z, y, x]``, float32)."""
    g = np.arange(box, dtype=np.float64) - box // 2
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    m = np.where(
        r <= radius_px,
        1.0,
        0.5 + 0.5 * np.cos(np.pi * np.clip(r - radius_px, 0, edge_px) / edge_px),
    )
    return np.where(r > radius_px + edge_px, 0.0, m).astype(np.float32)


def _particle_radius_px(vol: np.ndarray, fraction: float = 0.95) -> float:
    box = vol.shape[0]
    g = np.arange(box) - box // 2
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2).ravel()
    a = np.abs(vol).ravel()
    order = np.argsort(r)
    c = np.cumsum(a[order])
    return float(r[order][np.searchsorted(c, fraction * c[-1])])


def _fsc_table(h1: np.ndarray, h2: np.ndarray, pixel_size_ang: float):
    from polish3d.imaging import fsc_from_half_maps

    idx, fsc = fsc_from_half_maps(h1, h2)
    box = h1.shape[0]
    res = np.where(idx > 0, box * pixel_size_ang / np.maximum(idx, 1), 999.0)
    return idx, res, fsc


def hagen_dose_order(angles_deg: np.ndarray, group: int = 2) -> np.ndarray:
    """Acquisition rank per tilt for the dose-symmetric (Hagen) scheme.

    Starts at the tilt closest to 0°, then takes ``group`` tilts on the positive side, ``group``
    on the negative side, and so on (a side that runs out is skipped).

    Returns:
        ``(F,)`` int ranks (0 = first acquired) in the order of ``angles_deg``.
    """
    a = np.asarray(angles_deg, dtype=np.float64)
    start = int(np.argmin(np.abs(a)))
    pos = [i for i in np.argsort(a) if a[i] > a[start]]
    neg = [i for i in np.argsort(-a) if a[i] < a[start]]
    seq = [start]
    side = 0
    while pos or neg:
        src = pos if side == 0 else neg
        seq.extend(src[:group])
        del src[:group]
        side ^= 1
    rank = np.empty(len(a), dtype=np.int64)
    rank[np.asarray(seq)] = np.arange(len(a))
    return rank


def _random_rotations(rng, n):
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def _gp_trajectories(rng, positions_px, rank, sigma_v_px, sigma_d_px):
    """``(N, F, 3)`` trajectories (file order), zero at dose rank 0, GP velocities per step."""
    n = positions_px.shape[0]
    f = rank.shape[0]
    traj = np.zeros((n, f, 3))
    if sigma_v_px <= 0 or f < 2:
        return traj
    dist = np.linalg.norm(positions_px[:, None] - positions_px[None], axis=-1)
    k = sigma_v_px**2 * np.exp(-dist / max(sigma_d_px, 1e-9))
    w, v = np.linalg.eigh(k)
    b = v * np.sqrt(np.clip(w, 0, None))  # K = B Bᵀ
    vel = np.einsum("pb,mbd->mpd", b, rng.normal(size=(f - 1, n, 3)))  # (F−1, N, 3)
    cum = np.concatenate([np.zeros((1, n, 3)), np.cumsum(vel, axis=0)], axis=0)  # by rank
    traj[:, :, :] = np.transpose(cum[rank], (1, 0, 2))
    return traj


def _render_fn(cfg: SimulationConfig, particle_radius_px: float):
    """Jitted renderer of one tilt series' clean images (closure over the static sizes)."""
    import jax
    import jax.numpy as jnp

    from polish3d import imaging as im

    box = cfg.box_px
    w, h = (int(v) for v in cfg.image_size_px)
    px = float(cfg.pixel_size_ang)
    mask, _ = im.circle_mask(box)
    g = np.arange(box) - box // 2

    def one_particle(ref_ft, rot, u, du, dv, ang, dose):
        ctf = im.ctf_2d(box, px, du, dv, ang, cfg.voltage_kv, cfg.cs_mm, cfg.amplitude_contrast)
        s = im.central_slice(ref_ft, rot, box) * ctf * dose
        s = s.at[0, 0].set(0.0)
        r = jnp.floor(u + 0.5)
        d = u - r
        patch = -im.irfft2c(s * im.shift_phase(box, d), box) * mask
        rr = (g[None, :] - d[0]) ** 2 + (g[:, None] - d[1]) ** 2
        disc = rr <= particle_radius_px**2
        power = jnp.sum(jnp.where(disc, patch * patch, 0.0)) / jnp.maximum(jnp.sum(disc), 1)
        return patch, r.astype(jnp.int32) - box // 2, power

    def one_tilt(ref_ft, args):
        rots, uv, du, dv, ang, pre = args
        dose = im.dose_weights(box, px, pre)
        patches, corners, power = jax.vmap(one_particle, in_axes=(None, 0, 0, 0, 0, None, None))(
            ref_ft, rots, uv, du, dv, ang, dose
        )
        ar = jnp.arange(box)
        iy = corners[:, 1, None, None] + ar[None, :, None]
        ix = corners[:, 0, None, None] + ar[None, None, :]
        iy = jnp.broadcast_to(iy, patches.shape)
        ix = jnp.broadcast_to(ix, patches.shape)
        img = jnp.zeros((h, w), jnp.float32).at[iy, ix].add(patches, mode="drop")
        return img, power

    @jax.jit
    def render(ref_ft, rots, uv, du, dv, ang, pre):
        return jax.lax.map(lambda a: one_tilt(ref_ft, a), (rots, uv, du, dv, ang, pre))

    return render


def _place_particles(rng, cfg, n, radius_px, proj_list):
    """Rejection-sample ``n`` non-overlapping positions visible in every projection given."""
    w0, h0, d0 = cfg.tomo_size_px
    box = cfg.box_px
    margin = box / 2 + 2.0
    zr = max(radius_px, 1.0)
    if d0 <= 2 * zr:
        raise ValueError(f"tomo_thickness_px={d0} too thin for particles of radius {radius_px:.1f}")
    accepted: list[np.ndarray] = []
    min_dist = 2.0 * radius_px
    w, h = cfg.image_size_px
    for _ in range(200):
        cand = np.stack(
            [
                rng.uniform(zr, w0 - zr, 4096),
                rng.uniform(zr, h0 - zr, 4096),
                rng.uniform(zr, d0 - zr, 4096),
            ],
            -1,
        )
        ok = np.ones(len(cand), bool)
        for p in proj_list:
            uv = geo.project_points(p, cand)  # (F, N, 2)
            ok &= np.all(
                (uv[..., 0] > margin)
                & (uv[..., 0] < w - margin)
                & (uv[..., 1] > margin)
                & (uv[..., 1] < h - margin),
                axis=0,
            )
        for c in cand[ok]:
            if not accepted or np.min(np.linalg.norm(np.asarray(accepted) - c, axis=1)) >= min_dist:
                accepted.append(c)
                if len(accepted) == n:
                    return np.asarray(accepted)
    raise ValueError(
        f"could only place {len(accepted)} of {n} non-overlapping visible particles; use a larger "
        "image, a thicker tomogram, fewer particles or a smaller tilt range"
    )


# ----------------------------------------------------------------------------------------------
# main entry
# ----------------------------------------------------------------------------------------------


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
    import jax.numpy as jnp

    from polish3d import imaging as im
    from polish3d.io import mrc as mrc_io
    from polish3d.io import relion
    from polish3d.io.star import write_star
    from polish3d.score import evaluate_deformation

    t_start = time.perf_counter()
    cfg = config
    check_config(cfg)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--o {out_dir}: is an existing file, not a folder; give a folder")
    (out / "reference").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    (out / "tilt_series").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    box = int(cfg.box_px)
    px = float(cfg.pixel_size_ang)
    w, h = (int(v) for v in cfg.image_size_px)
    tomo_size = cfg.tomo_size_px

    # ---- reference, halves, mask, FSC
    if reference is None:
        vol = phantom_volume(box, px, cfg.particle_diameter_ang)
    elif isinstance(reference, str | Path):
        vol, _ = mrc_io.read_map(reference)
        vol = np.asarray(vol, np.float32)
    else:
        vol = np.asarray(reference, np.float32)
    if vol.shape[0] < box:
        o = (box - vol.shape[0]) // 2
        vol = np.pad(vol, [(o, box - vol.shape[0] - o)] * 3)
    elif vol.shape[0] > box:
        raise ValueError(f"reference ({vol.shape[0]} voxels) larger than box_px={box}")
    radius = _particle_radius_px(vol)
    mask = soft_sphere_mask(box, min(radius + 3.0, box / 2 - 7.0), 4.0)
    noise_amp = cfg.half_map_noise * float(np.abs(vol).max())
    halves = [vol + noise_amp * rng.normal(size=vol.shape).astype(np.float32) for _ in range(2)]
    ref_dir = out / "reference"
    half_paths = [mrc_io.write_map(ref_dir / f"half{i + 1}.mrc", halves[i], px) for i in range(2)]
    mask_path = mrc_io.write_map(ref_dir / "mask.mrc", mask, px)
    idx, res, fsc = _fsc_table(halves[0] * mask, halves[1] * mask, px)
    fsc_path = write_star(
        ref_dir / "postprocess.star",
        {
            "general": {"rlnFinalResolution": float(res[max(int(np.argmax(fsc < 0.143)) - 1, 1)])},
            "fsc": pd.DataFrame(
                {
                    "rlnSpectralIndex": idx.astype(int),
                    "rlnResolution": idx / (box * px),
                    "rlnAngstromResolution": res,
                    "rlnFourierShellCorrelationCorrected": fsc,
                    "rlnFourierShellCorrelationUnmaskedMaps": fsc,
                }
            ),
        },
    )
    ref_ft = im.prepare_reference(jnp.asarray(vol), box)
    render = _render_fn(cfg, radius)

    # ---- acquisition scheme
    n_steps = int(np.floor((cfg.tilt_max_deg - cfg.tilt_min_deg) / cfg.tilt_step_deg + 1e-6)) + 1
    angles = cfg.tilt_min_deg + cfg.tilt_step_deg * np.arange(n_steps)
    f = len(angles)
    rank = hagen_dose_order(angles, cfg.dose_group) if cfg.dose_symmetric else np.arange(f)
    pre_exposure = rank * cfg.dose_per_tilt_e_per_ang2
    fd = cfg.dose_per_tilt_e_per_ang2

    ts_nom, ts_true, parts_nom, parts_true = [], [], {}, {}
    npz: dict[str, np.ndarray] = {"tilt_angles_deg": angles, "pre_exposure": pre_exposure}
    sigmas = []
    n_tot = cfg.n_particles + cfg.n_unlisted
    for t in range(cfg.n_tomograms):
        name = f"TS_{t + 1:02d}"
        # true and nominal per-tilt parameters
        true_par = {
            "x": np.zeros(f),
            "y": angles.astype(np.float64),
            "z": np.full(f, cfg.tilt_axis_deg),
            "sx": np.zeros(f),
            "sy": np.zeros(f),
        }
        nom_par = {
            "x": true_par["x"] + cfg.x_tilt_err_deg * rng.normal(size=f),
            "y": true_par["y"] + cfg.y_tilt_err_deg * rng.normal(size=f),
            "z": true_par["z"] + cfg.z_rot_err_deg * rng.normal(size=f),
            "sx": cfg.shift_err_px * px * rng.normal(size=f),
            "sy": cfg.shift_err_px * px * rng.normal(size=f),
        }
        kw = dict(pixel_size_ang=px, image_size_px=(w, h), tomo_size_px=tomo_size)
        p_true = geo.projection_from_euler(
            true_par["x"], true_par["y"], true_par["z"], true_par["sx"], true_par["sy"], **kw
        )
        p_nom = geo.projection_from_euler(
            nom_par["x"], nom_par["y"], nom_par["z"], nom_par["sx"], nom_par["sy"], **kw
        )

        # particles
        x_true = _place_particles(rng, cfg, n_tot, radius, [p_true, p_nom])
        rots = _random_rotations(rng, n_tot)
        eul = np.stack(geo.matrix_to_euler_zyz(rots), -1)
        rots = geo.particle_rotations(eul)
        x_nom = x_true + cfg.position_err_px * rng.normal(size=x_true.shape)
        sig_v, sig_d = fd * cfg.s_vel / px, fd * cfg.s_div / px
        traj = _gp_trajectories(rng, x_true, rank, sig_v, sig_d)  # (N, F, 3)

        # deformation (per tilt, spline)
        deformation = None
        if cfg.deformation_amplitude_px > 0:
            gw, gh = cfg.deformation_grid
            coeffs = np.zeros((f, 2, gh, gw, 4))
            coeffs[..., 0] = cfg.deformation_amplitude_px * rng.normal(size=(f, 2, gh, gw))
            coeffs[..., 1:3] = (
                0.5 * cfg.deformation_amplitude_px * rng.normal(size=(f, 2, gh, gw, 2))
            )
            deformation = Deformation("spline", (gw, gh), coeffs.reshape(f, -1))

        # true 2D positions and rendering inputs (file order)
        x_t = x_true[None] + np.transpose(traj, (1, 0, 2))  # (F, N, 3)
        uv = geo.project_points(p_true, x_t)
        if deformation is not None:
            uv = uv + np.stack(
                [evaluate_deformation(deformation, (w, h), uv[j], j) for j in range(f)]
            )
        depth = geo.projection_depth(p_true, x_true)
        cdepth = geo.projection_depth(p_true, geo.tomogram_centre_px(tomo_size)[None])
        dz = cfg.hand * px * (depth - cdepth)  # (F, N)
        d_tilt = cfg.defocus_ang + cfg.defocus_jitter_ang * rng.normal(size=f)
        d_u = d_tilt + cfg.astigmatism_ang / 2
        d_v = d_tilt - cfg.astigmatism_ang / 2
        d_ang = np.full(f, rng.uniform(-90, 90))
        cam_rots = np.einsum("fij,njk->fnik", p_true[:, :3, :3], rots)
        clean, power = render(
            ref_ft,
            jnp.asarray(cam_rots, jnp.float32),
            jnp.asarray(uv, jnp.float32),
            jnp.asarray(d_u[:, None] + dz, jnp.float32),
            jnp.asarray(d_v[:, None] + dz, jnp.float32),
            jnp.asarray(d_ang, jnp.float32),
            jnp.asarray(pre_exposure, jnp.float32),
        )
        clean = np.asarray(clean)
        sigma = float(np.sqrt(np.mean(np.asarray(power)) / cfg.snr)) if cfg.snr > 0 else 0.0
        sigmas.append(sigma)
        images = clean + sigma * rng.standard_normal(size=clean.shape, dtype=np.float32)
        stack_path = mrc_io.write_stack(out / "tilt_series" / f"{name}.mrcs", images, px)

        common = dict(
            name=name,
            pixel_size_ang=px,
            tomo_size_px=tomo_size,
            image_size_px=(w, h),
            hand=cfg.hand,
            defocus_slope=1.0,
            voltage_kv=cfg.voltage_kv,
            cs_mm=cfg.cs_mm,
            amplitude_contrast=cfg.amplitude_contrast,
            bfactor_per_dose_ang2=0.0,
            fractional_dose_e_per_ang2=fd,
            defocus_u_ang=d_u,
            defocus_v_ang=d_v,
            defocus_angle_deg=d_ang,
            ctf_scale=np.ones(f),
            ctf_bfactor_ang2=np.zeros(f),
            phase_shift_deg=np.zeros(f),
            pre_exposure_e_per_ang2=pre_exposure.astype(np.float64),
        )
        ts_nom.append(
            TiltSeriesData(
                projections=p_nom,
                image_files=[(str(stack_path.resolve()), j) for j in range(f)],
                **common,
            )
        )
        ts_true.append(
            TiltSeriesData(
                projections=p_true,
                deformation=deformation,
                image_files=[(str(stack_path.resolve()), j) for j in range(f)],
                **common,
            )
        )
        listed = np.arange(cfg.n_particles)
        names = [f"{name}/{i + 1}" for i in listed]
        half = (listed % 2 + 1).astype(np.int64)
        parts_nom[name] = ParticleData(
            names=names, positions_px=x_nom[listed], rotations=rots[listed], half_set=half
        )
        parts_true[name] = ParticleData(
            names=names,
            positions_px=x_true[listed],
            rotations=rots[listed],
            half_set=half,
            trajectories_px=traj[listed] if cfg.s_vel > 0 else None,
        )
        pre = f"{name}/"
        npz.update(
            {
                pre + "projections_true": p_true,
                pre + "projections_nominal": p_nom,
                pre + "positions_true_px": x_true,
                pre + "positions_nominal_px": x_nom,
                pre + "rotations": rots,
                pre + "euler_deg": eul,
                pre + "listed": np.arange(n_tot) < cfg.n_particles,
                pre + "trajectories_px": traj,
                pre + "uv_true_px": uv,
                pre + "defocus_u_ang": d_u,
                pre + "defocus_v_ang": d_v,
                pre + "defocus_angle_deg": d_ang,
                pre + "depth_defocus_ang": dz,
                pre + "noise_sigma": np.float64(sigma),
                pre + "deformation_coefficients": (
                    deformation.coefficients if deformation is not None else np.zeros((f, 0))
                ),
            }
        )

    refs = {
        k: Path(v).resolve()
        for k, v in {"ref1": half_paths[0], "ref2": half_paths[1], "mask": mask_path, "fsc": fsc_path}.items()
    }
    opt = relion.write_new_optimisation_set(out, ts_nom, parts_nom, references=refs)
    # the truth set lives in the same project (every path relative to <out>): it shares the
    # stacks and references; truth trajectories come from the particles' trajectories_px
    opt_true = relion.write_new_optimisation_set(
        out / "truth", ts_true, parts_true, references=refs, project_dir=out
    )
    npz["config_json"] = np.array(json.dumps(dataclasses.asdict(cfg)))
    npz_path = out / "truth" / "truth.npz"
    np.savez_compressed(npz_path, **npz)
    seconds = time.perf_counter() - t_start
    return SimulationResult(
        out_dir=out,
        optimisation_set=Path(opt),
        truth_optimisation_set=Path(opt_true),
        truth_npz=npz_path,
        tilt_series=ts_nom,
        particles=parts_nom,
        truth_tilt_series=ts_true,
        truth_particles=parts_true,
        noise_sigma=sigmas,
        seconds=seconds,
    )


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def register_cli(app, run) -> None:
    """Add ``polish3d simulate`` to the typer ``app``; ``run(fn)`` maps errors to exit codes."""
    d = SimulationConfig()

    @app.command("simulate")
    def simulate_cmd(
        o: Annotated[str, typer.Option("--o", help="Output directory (required).")] = "",
        n_tomograms: Annotated[
            int, typer.Option("--n_tomograms", help="Tilt series.")
        ] = d.n_tomograms,
        n_particles: Annotated[
            int, typer.Option("--n_particles", help="Listed particles per tomogram.")
        ] = d.n_particles,
        n_unlisted: Annotated[
            int, typer.Option("--n_unlisted", help="Extra particles in the images, not listed.")
        ] = d.n_unlisted,
        tilt_min: Annotated[
            float, typer.Option("--tilt_min", help="Lowest tilt (deg).")
        ] = d.tilt_min_deg,
        tilt_max: Annotated[
            float, typer.Option("--tilt_max", help="Highest tilt (deg).")
        ] = d.tilt_max_deg,
        tilt_step: Annotated[
            float, typer.Option("--tilt_step", help="Tilt step (deg).")
        ] = d.tilt_step_deg,
        sequential: Annotated[
            bool, typer.Option("--sequential", help="Sequential instead of dose-symmetric order.")
        ] = False,
        dose: Annotated[
            float, typer.Option("--dose", help="Dose per tilt (e/A^2).")
        ] = d.dose_per_tilt_e_per_ang2,
        angpix: Annotated[
            float, typer.Option("--angpix", help="Pixel size (A).")
        ] = d.pixel_size_ang,
        box: Annotated[int, typer.Option("--box", help="Box size (px).")] = d.box_px,
        image_size: Annotated[
            int, typer.Option("--image_size", help="Square tilt-image size (px).")
        ] = d.image_size_px[0],
        thickness: Annotated[
            int, typer.Option("--thickness", help="Tomogram thickness (px).")
        ] = d.tomo_thickness_px,
        snr: Annotated[
            float, typer.Option("--snr", help="Per-pixel SNR over the particle.")
        ] = d.snr,
        tilt_axis: Annotated[
            float, typer.Option("--tilt_axis", help="ZRot (deg).")
        ] = d.tilt_axis_deg,
        x_tilt_err: Annotated[
            float, typer.Option("--x_tilt_err", help="XTilt error sigma (deg).")
        ] = d.x_tilt_err_deg,
        y_tilt_err: Annotated[
            float, typer.Option("--y_tilt_err", help="YTilt error sigma (deg).")
        ] = d.y_tilt_err_deg,
        z_rot_err: Annotated[
            float, typer.Option("--z_rot_err", help="ZRot error sigma (deg).")
        ] = d.z_rot_err_deg,
        shift_err: Annotated[
            float, typer.Option("--shift_err", help="Per-tilt shift error sigma (px).")
        ] = d.shift_err_px,
        position_err: Annotated[
            float, typer.Option("--position_err", help="3D position error sigma (px).")
        ] = d.position_err_px,
        s_vel: Annotated[
            float, typer.Option("--s_vel", help="Motion velocity sigma (A per e/A^2); 0 = off.")
        ] = d.s_vel,
        s_div: Annotated[
            float, typer.Option("--s_div", help="Motion correlation length.")
        ] = d.s_div,
        deformation: Annotated[
            float, typer.Option("--deformation", help="2D deformation amplitude (px); 0 = off.")
        ] = d.deformation_amplitude_px,
        defocus: Annotated[
            float, typer.Option("--defocus", help="Mean defocus (A).")
        ] = d.defocus_ang,
        reference: Annotated[
            str, typer.Option("--reference", help="Reference MRC instead of the built-in phantom.")
        ] = "",
        seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = d.seed,
    ) -> None:
        """Simulate a synthetic optimisation set with ground truth (truth/ subfolder)."""
        from polish3d.errors import InputError

        def go():
            if not o:
                raise InputError("--o (output directory) is required")
            cfg = SimulationConfig(
                n_tomograms=n_tomograms,
                n_particles=n_particles,
                n_unlisted=n_unlisted,
                tilt_min_deg=tilt_min,
                tilt_max_deg=tilt_max,
                tilt_step_deg=tilt_step,
                dose_symmetric=not sequential,
                dose_per_tilt_e_per_ang2=dose,
                pixel_size_ang=angpix,
                box_px=box,
                image_size_px=(image_size, image_size),
                tomo_thickness_px=thickness,
                snr=snr,
                tilt_axis_deg=tilt_axis,
                x_tilt_err_deg=x_tilt_err,
                y_tilt_err_deg=y_tilt_err,
                z_rot_err_deg=z_rot_err,
                shift_err_px=shift_err,
                position_err_px=position_err,
                s_vel=s_vel,
                s_div=s_div,
                deformation_amplitude_px=deformation,
                defocus_ang=defocus,
                seed=seed,
            )
            try:
                res = simulate(cfg, o, reference=reference or None)
            except ValueError as exc:
                raise InputError(str(exc)) from exc
            typer.echo(
                f"simulated {cfg.n_tomograms} tilt series x {cfg.n_particles} particles in "
                f"{res.seconds:.1f} s -> {res.optimisation_set} "
                f"(truth: {res.truth_optimisation_set})"
            )

        run(go)
