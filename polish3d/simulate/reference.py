"""The reference of a simulation: the built-in phantom, its half maps, mask and FSC table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from polish3d.io import mrc as mrc_io
from polish3d.io.star import write_star
from polish3d.simulate.config import SimulationConfig

__all__ = ["ReferenceSet", "load_reference", "phantom_volume", "soft_sphere_mask",
           "write_reference_set"]


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


def load_reference(reference, cfg: SimulationConfig) -> np.ndarray:
    """The ``box_px³`` reference ``[z, y, x]`` (float32): the phantom, an MRC file or an array,
    zero-padded to the box.

    Raises:
        ValueError: the given map is larger than ``box_px``.
    """
    box = int(cfg.box_px)
    if reference is None:
        vol = phantom_volume(box, float(cfg.pixel_size_ang), cfg.particle_diameter_ang)
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
    return vol


@dataclass
class ReferenceSet:
    """The written reference files (resolved paths) and the particle radius they imply.

    Attributes:
        paths: ``{"ref1", "ref2", "mask", "fsc"}`` → half maps, mask and ``postprocess.star``.
        radius_px: radius holding 95 % of the reference's absolute density (pixels).
    """

    paths: dict[str, Path]
    radius_px: float


def write_reference_set(ref_dir: Path, vol: np.ndarray, cfg: SimulationConfig,
                        rng: np.random.Generator) -> ReferenceSet:
    """Write ``half1/2.mrc`` (``vol`` + independent noise), ``mask.mrc`` and ``postprocess.star``
    (the FSC of the masked halves) into ``ref_dir``."""
    box = int(cfg.box_px)
    px = float(cfg.pixel_size_ang)
    radius = _particle_radius_px(vol)
    mask = soft_sphere_mask(box, min(radius + 3.0, box / 2 - 7.0), 4.0)
    noise_amp = cfg.half_map_noise * float(np.abs(vol).max())
    halves = [vol + noise_amp * rng.normal(size=vol.shape).astype(np.float32) for _ in range(2)]
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
    paths = {"ref1": half_paths[0], "ref2": half_paths[1], "mask": mask_path, "fsc": fsc_path}
    return ReferenceSet({k: Path(v).resolve() for k, v in paths.items()}, radius)
