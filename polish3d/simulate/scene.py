"""What a simulated tilt series shows: acquisition scheme, true and nominal geometry, particles,
their motion, the 2D deformation and the per-tilt defocus (all random draws but the noise)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from einops import rearrange

from polish3d import geometry as geo
from polish3d.model import Deformation
from polish3d.simulate.config import SimulationConfig

__all__ = ["Acquisition", "hagen_dose_order"]


@dataclass(frozen=True)
class Acquisition:
    """The tilt scheme shared by every tilt series (file order = increasing angle).

    Attributes:
        angles_deg: ``(F,)`` nominal stage tilts (degrees).
        dose_rank: ``(F,)`` acquisition rank per tilt (0 = first acquired).
        pre_exposure_e_per_ang2: ``(F,)`` dose received before each tilt (e⁻/Å²).
    """

    angles_deg: np.ndarray
    dose_rank: np.ndarray
    pre_exposure_e_per_ang2: np.ndarray

    @property
    def n_tilts(self) -> int:
        """Number of tilts ``F``."""
        return len(self.angles_deg)

    @classmethod
    def from_config(cls, cfg: SimulationConfig) -> Acquisition:
        """Tilts from ``tilt_min_deg`` to ``tilt_max_deg`` (inclusive) in ``tilt_step_deg``,
        acquired dose-symmetrically or in sequence."""
        n_steps = int(np.floor((cfg.tilt_max_deg - cfg.tilt_min_deg) / cfg.tilt_step_deg + 1e-6)) + 1
        angles = cfg.tilt_min_deg + cfg.tilt_step_deg * np.arange(n_steps)
        f = len(angles)
        rank = hagen_dose_order(angles, cfg.dose_group) if cfg.dose_symmetric else np.arange(f)
        return cls(angles, rank, rank * cfg.dose_per_tilt_e_per_ang2)


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



def tilt_geometry(cfg: SimulationConfig, angles_deg: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """``(P_true, P_nominal)``, each ``(F, 4, 4)``: the true geometry tilts about a fixed axis
    (``tilt_axis_deg``) without shifts; the nominal one adds Gaussian angle and shift errors."""
    f = len(angles_deg)
    px = float(cfg.pixel_size_ang)
    true_x, true_y, true_z = np.zeros(f), angles_deg.astype(np.float64), np.full(f, cfg.tilt_axis_deg)
    nom_x = true_x + cfg.x_tilt_err_deg * rng.normal(size=f)
    nom_y = true_y + cfg.y_tilt_err_deg * rng.normal(size=f)
    nom_z = true_z + cfg.z_rot_err_deg * rng.normal(size=f)
    nom_sx = cfg.shift_err_px * px * rng.normal(size=f)
    nom_sy = cfg.shift_err_px * px * rng.normal(size=f)
    kw = dict(pixel_size_ang=px, image_size_px=tuple(int(v) for v in cfg.image_size_px),
              tomo_size_px=cfg.tomo_size_px)
    p_true = geo.projection_from_euler(true_x, true_y, true_z, np.zeros(f), np.zeros(f), **kw)
    p_nom = geo.projection_from_euler(nom_x, nom_y, nom_z, nom_sx, nom_sy, **kw)
    return p_true, p_nom


def place_particles(rng, cfg, n, radius_px, proj_list):
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



def random_rotations(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rotations (n, 3, 3), euler_deg (n, 3))``: uniformly random particle orientations, the
    matrices rebuilt from their ZYZ Euler angles (what the particle STAR file stores)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    rots = np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )
    eul = np.stack(geo.matrix_to_euler_zyz(rots), -1)
    return geo.particle_rotations(eul), eul


def gp_trajectories(rng, positions_px, rank, sigma_v_px, sigma_d_px):
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
    traj[:, :, :] = rearrange(cum[rank], "f n xyz -> n f xyz")
    return traj



def random_deformation(cfg: SimulationConfig, n_tilts: int, rng) -> Deformation | None:
    """A per-tilt RELION ``spline`` deformation with Gaussian node values (σ =
    ``deformation_amplitude_px``) and slopes (σ/2), or ``None`` when the amplitude is 0."""
    if cfg.deformation_amplitude_px <= 0:
        return None
    f = n_tilts
    gw, gh = cfg.deformation_grid
    coeffs = np.zeros((f, 2, gh, gw, 4))
    coeffs[..., 0] = cfg.deformation_amplitude_px * rng.normal(size=(f, 2, gh, gw))
    coeffs[..., 1:3] = 0.5 * cfg.deformation_amplitude_px * rng.normal(size=(f, 2, gh, gw, 2))
    return Deformation("spline", (gw, gh), coeffs.reshape(f, -1))


def random_distortion(cfg: SimulationConfig, n_tilts: int, rng) -> np.ndarray | None:
    """``(F, 2, 2)`` image distortions ``I + [[a, s], [s, −a]]`` (anisotropic magnification of
    ``aniso_percent`` per tilt and ``series_aniso_percent`` per series, each along a uniformly
    random axis), or ``None`` when both are 0."""
    if cfg.aniso_percent <= 0 and cfg.series_aniso_percent <= 0:
        return None

    def stretch(percent, n):
        axis = rng.uniform(0.0, np.pi, n)  # (a, s) = m·(cos 2φ, sin 2φ): the axis at φ
        return 0.01 * percent * np.stack([np.cos(2 * axis), np.sin(2 * axis)], -1)

    a_s = stretch(cfg.aniso_percent, n_tilts) + stretch(cfg.series_aniso_percent, 1)
    return geo.distortion_matrix(a_s[:, 0], a_s[:, 1])


def random_defocus(cfg: SimulationConfig, n_tilts: int, rng) -> dict[str, np.ndarray]:
    """Per-tilt ``defocus_u_ang``, ``defocus_v_ang``, ``defocus_angle_deg``: the mean defocus
    with Gaussian jitter per tilt, a fixed astigmatism and one random angle per tilt series."""
    d_tilt = cfg.defocus_ang + cfg.defocus_jitter_ang * rng.normal(size=n_tilts)
    return {
        "defocus_u_ang": d_tilt + cfg.astigmatism_ang / 2,
        "defocus_v_ang": d_tilt - cfg.astigmatism_ang / 2,
        "defocus_angle_deg": np.full(n_tilts, rng.uniform(-90, 90)),
    }
