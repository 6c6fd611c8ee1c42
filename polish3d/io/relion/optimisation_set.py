"""Optimisation sets (``optimisation_set.star``): the files a refinement reads and writes.

Also :func:`write_new_optimisation_set`, which writes a complete set (tomograms, per-tilt
tables, particles, motion, optimisation set) from in-memory records through the same writers
as every other set.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from polish3d.errors import InputError
from polish3d.io.relion._common import _relative_to, _resolve
from polish3d.io.relion.motion import trajectories_from_records, write_trajectories
from polish3d.io.relion.particles import particle_set_from_records
from polish3d.io.relion.tomograms import tomogram_set_from_records
from polish3d.io.star import read_star, write_star
from polish3d.model import ParticleData, TiltSeriesData

log = logging.getLogger(__name__)

_OPT_KEYS = {
    "particles_file": "rlnTomoParticlesFile",
    "tomograms_file": "rlnTomoTomogramsFile",
    "trajectories_file": "rlnTomoTrajectoriesFile",
    "manifolds_file": "rlnTomoManifoldsFile",
    "ref1": "rlnTomoReferenceMap1File",
    "ref2": "rlnTomoReferenceMap2File",
    "mask": "rlnTomoReferenceMaskFile",
    "fsc": "rlnTomoReferenceFscFile",
}
_OPT_WRITTEN = ("particles_file", "tomograms_file", "trajectories_file", "manifolds_file")

@dataclass
class OptimisationSet:
    """The files of a RELION optimisation set (``optimisation_set.star``); ``None`` if unset.

    Paths are as resolved by :func:`read_optimisation_set` (relative paths are relative to the
    current working directory when no ``project_dir`` was given, as in RELION).
    """

    particles_file: Path | None = None
    tomograms_file: Path | None = None
    trajectories_file: Path | None = None
    manifolds_file: Path | None = None
    ref1: Path | None = None
    ref2: Path | None = None
    mask: Path | None = None
    fsc: Path | None = None
    source: Path | None = field(default=None, compare=False)


def read_optimisation_set(path, *, project_dir=None) -> OptimisationSet:
    """Read an optimisation set in either form RELION and its tools write.

    Forms: a key-value block (``data_`` with ``_rlnTomoParticlesFile …``, what RELION writes)
    or a one-row loop (``data_optimisation_set``, what the RELION 5 Picks job writes through
    the ``starfile`` package). Empty entries (``""``) count as unset.

    Args:
        path: the ``optimisation_set.star`` file.
        project_dir: the RELION project folder the paths are relative to (default: the current
            working directory, as RELION).

    Raises:
        InputError: missing/unreadable file, or no recognised key.
    """
    p = Path(path)
    blocks = read_star(p)
    values: dict[str, object] = {}
    for block in blocks.values():
        if isinstance(block, dict):
            values = dict(block)
        elif isinstance(block, pd.DataFrame) and len(block) >= 1:
            if len(block) > 1:
                log.warning("%s: optimisation set table has %d rows; using the first", p, len(block))
            values = block.iloc[0].to_dict()
        if any(k in values for k in _OPT_KEYS.values()):
            break
    if not any(k in values for k in _OPT_KEYS.values()):
        raise InputError(f"{p}: not an optimisation set (none of {', '.join(_OPT_KEYS.values())} found)")
    pd_ = Path(project_dir) if project_dir is not None else None
    kw = {}
    for attr, label in _OPT_KEYS.items():
        v = values.get(label)
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "":
            kw[attr] = None
        else:
            kw[attr] = _resolve(str(v).strip(), pd_, p)
    return OptimisationSet(**kw, source=p)


def write_optimisation_set(
    path, opt: OptimisationSet, *, project_dir=None, include_references: bool = False
) -> Path:
    """Write an optimisation set as RELION does: a key-value ``data_`` block, set keys only.

    Only particles, tomograms, trajectories and manifolds are written (RELION never writes the
    reference entries), unless ``include_references`` is true.

    Args:
        path: destination.
        opt: the set; its paths are written as given, or relative to ``project_dir`` when that
            is given and they lie inside it.
    """
    kv: dict[str, str] = {}
    attrs = list(_OPT_KEYS) if include_references else list(_OPT_WRITTEN)
    for attr in attrs:
        v = getattr(opt, attr)
        if v is None:
            continue
        if project_dir is not None:
            kv[_OPT_KEYS[attr]] = _relative_to(Path(v), project_dir)
        else:
            kv[_OPT_KEYS[attr]] = Path(v).as_posix()
    return write_star(path, {"": kv})




def write_new_optimisation_set(
    out_dir,
    tilt_series: list[TiltSeriesData],
    particles: Mapping[str, ParticleData],
    *,
    tilt_tables_extra: Mapping[str, pd.DataFrame] | None = None,
    particles_extra_columns: Mapping[str, pd.DataFrame] | None = None,
    references: Mapping[str, object] | None = None,
    project_dir=None,
    trajectories: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write a complete RELION 5 optimisation set built from in-memory records.

    Every path inside the files is relative to the project folder ``project_dir`` (default:
    ``out_dir`` itself), as RELION writes them.
    Writes ``tomograms.star``, ``tilt_series/<name>.star``, ``particles.star``, optionally
    ``motion.star``, and ``optimisation_set.star``.

    Args:
        out_dir: destination folder.
        project_dir: the project folder paths are written relative to (default ``out_dir``).
        tilt_series: one record per tilt series (``image_files`` give ``rlnMicrographName`` as
            ``n@path``; default ``n@tilt_series/<name>.mrcs``).
        particles: ``{tomogram name: ParticleData}``; positions written as centred Å with zero
            origins, rotations as ``rlnAngleRot/Tilt/Psi`` (no subtomogram angles).
        tilt_tables_extra: ``{name: DataFrame with F rows}`` extra per-tilt columns (e.g.
            ``rlnTomoNominalStageTiltAngle``); they do not override the geometry/CTF columns.
        particles_extra_columns: ``{name: DataFrame with N rows}`` extra particle columns.
        references: ``{"ref1"|"ref2"|"mask"|"fsc" (or the rln label): path}`` written as
            ``rlnTomoReferenceMap1File`` etc.
        trajectories: ``{particle name: (F, 3) Å}``; when ``None``, the particles'
            ``trajectories_px`` (if any) are written. Gives ``motion.star``.

    Returns:
        The path of ``optimisation_set.star``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    project = Path(project_dir) if project_dir is not None else out
    tomogram_set_from_records(tilt_series, out, project, tilt_tables_extra).write(out, project_dir=project)
    particle_set_from_records(tilt_series, particles, particles_extra_columns).write(out / "particles.star")
    if trajectories is not None:
        traj = {str(k): np.asarray(v) for k, v in trajectories.items()}
    else:
        traj = trajectories_from_records(tilt_series, particles)
    opt = OptimisationSet(particles_file=out / "particles.star", tomograms_file=out / "tomograms.star")
    if traj:
        opt.trajectories_file = write_trajectories(out / "motion.star", traj)
    kv = {_OPT_KEYS[a]: _relative_to(getattr(opt, a), project) for a in _OPT_WRITTEN if getattr(opt, a)}
    for key, value in (references or {}).items():
        if value is None:
            continue
        label = _OPT_KEYS.get(key, key)
        if label not in _OPT_KEYS.values():
            raise ValueError(f"unknown reference key {key!r}; use one of {list(_OPT_KEYS)[4:]}")
        vp = Path(str(value))
        kv[label] = _relative_to(vp, project) if vp.is_absolute() else vp.as_posix()
    return write_star(out / "optimisation_set.star", {"": kv})
