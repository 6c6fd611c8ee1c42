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
    fast = _read_plain_trajectories(p)
    if fast is not None:
        out, n_declared = fast
        _check_count(p, out, n_declared)
        return out
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
    _check_count(p, out, gen["rlnParticleNumber"])
    return out


def _check_count(p: Path, out: dict, n_declared) -> None:
    if "0" in out and next(iter(out)) == "0":
        log.warning("%s: trajectories have no particle names (legacy file); keyed by position", p)
    if int(n_declared) < len(out):
        log.warning("%s: rlnParticleNumber = %s but %d trajectories", p, n_declared, len(out))


def _read_plain_trajectories(p: Path) -> tuple[dict[str, np.ndarray], str] | None:
    """The trajectories of a ``motion.star`` laid out as RELION and polish3d write it (a
    ``data_general`` pair list, then one loop of plain finite numbers per particle with the three
    ``rlnOrigin*Angst`` columns), parsed directly: one block per particle made ``starfile`` take
    ~3 ms each (seconds for a tomogram). ``None`` for anything else (missing file included): the
    general reader then reads it and names what is wrong."""
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    blocks: dict[str, object] = {}
    i, n = 0, len(lines)

    def skip(i):
        while i < n and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
            i += 1
        return i

    while (i := skip(i)) < n:
        head = lines[i].strip()
        if not head.startswith("data_") or head[5:] in blocks or len(head.split()) != 1:
            return None
        name, i = head[5:], skip(i + 1)
        if i < n and lines[i].strip() == "loop_":
            i += 1
            labels = []
            while i < n and lines[i].lstrip().startswith("_"):
                labels.append(lines[i].split()[0][1:])
                i += 1
            rows = []
            while (i := skip(i)) < n and not lines[i].lstrip().startswith(("data_", "_", "loop_")):
                rows.append(lines[i].split())
                i += 1
            if not labels or any(len(r) != len(labels) for r in rows):
                return None
            try:
                table = np.array(rows, dtype=np.float64).reshape(len(rows), len(labels))
            except ValueError:
                return None
            if not np.all(np.isfinite(table)) or not set(ORIGIN_LABELS) <= set(labels):
                return None
            blocks[name] = table[:, [labels.index(c) for c in ORIGIN_LABELS]]
        else:
            pairs = {}
            while i < n and lines[i].lstrip().startswith("_"):
                parts = lines[i].split()
                if len(parts) != 2:
                    return None
                pairs[parts[0][1:]] = parts[1]
                i = skip(i + 1)
            if name != "general":  # an empty block or pairs: the general reader decides
                return None
            blocks[name] = pairs
    general = blocks.pop("general", None)
    if not isinstance(general, dict) or "rlnParticleNumber" not in general:
        return None
    try:
        int(general["rlnParticleNumber"])
    except ValueError:
        return None
    return blocks, general["rlnParticleNumber"]


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
