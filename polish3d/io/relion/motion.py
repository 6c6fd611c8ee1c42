"""Trajectory sets (``motion.star``): per-particle 3D displacements per tilt, in Å."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from polish3d.errors import InputError
from polish3d.io.relion._common import ORIGIN_LABELS, _numeric, _require_columns
from polish3d.io.star import read_star, write_star
from polish3d.model import ParticleData, TiltSeriesData

log = logging.getLogger(__name__)



def read_trajectories(path) -> dict[str, np.ndarray]:
    """Read a RELION trajectory set (``motion.star``).

    Returns:
        ``{rlnTomoParticleName: (F, 3) displacement in Å}`` per tilt in per-tilt-table order
        (relative to the position at the lowest-dose tilt). Legacy unnamed files (first table
        ``data_0``) are returned keyed ``"0"``, ``"1"``, … with a warning.

    Raises:
        InputError: missing file, no ``rlnParticleNumber``, missing ``rlnOrigin*Angst`` columns.
    """
    p = Path(path)
    blocks = read_star(p)
    gen = blocks.get("general")
    if not isinstance(gen, dict) or "rlnParticleNumber" not in gen:
        raise InputError(f"{p}: missing data_general with rlnParticleNumber")
    out: dict[str, np.ndarray] = {}
    for name, t in blocks.items():
        if name == "general":
            continue
        where = f"{p} (block data_{name})"
        if not isinstance(t, pd.DataFrame):
            raise InputError(f"{where}: expected a loop table")
        if len(t) == 0 and len(t.columns) == 0:
            out[name] = np.zeros((0, 3))
            continue
        _require_columns(t, ORIGIN_LABELS, where)
        out[name] = np.stack([_numeric(t, c, where) for c in ORIGIN_LABELS], -1)
    if "0" in out and next(iter(out)) == "0":
        log.warning("%s: trajectories have no particle names (legacy file); keyed by position", p)
    if int(gen["rlnParticleNumber"]) < len(out):
        log.warning("%s: rlnParticleNumber = %s but %d trajectories", p, gen["rlnParticleNumber"], len(out))
    return out


def write_trajectories(path, trajectories: Mapping[str, np.ndarray]) -> Path:
    """Write a RELION trajectory set (``motion.star``, spec §5.5).

    Args:
        path: destination.
        trajectories: ``{rlnTomoParticleName: (F, 3) Å}``, in the order to write (RELION:
            tomogram order, then particle order).
    """
    blocks: dict = {"general": {"rlnParticleNumber": len(trajectories)}}
    for name, t in trajectories.items():
        a = np.asarray(t, dtype=np.float64).reshape(-1, 3)
        blocks[str(name)] = pd.DataFrame({lab: a[:, k] for k, lab in enumerate(ORIGIN_LABELS)})
    return write_star(path, blocks)


def trajectories_from_records(
    tilt_series: list[TiltSeriesData], particles: Mapping[str, ParticleData]
) -> dict[str, np.ndarray]:
    """``{particle name: (F, 3) Å}`` from the records' ``trajectories_px`` (tomogram order)."""
    out: dict[str, np.ndarray] = {}
    for ts in tilt_series:
        pdata = particles.get(ts.name)
        if pdata is None or pdata.n_particles == 0 or pdata.trajectories_px is None:
            continue
        tr = np.asarray(pdata.trajectories_px, dtype=np.float64) * ts.pixel_size_ang
        for k, name in enumerate(pdata.names):
            out[name] = tr[k]
    return out
