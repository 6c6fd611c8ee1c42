"""Particle sets (``particles.star``): general, optics and particle tables.

RELION 5 (``rlnCenteredCoordinateX/Y/ZAngst``), RELION 4 and WarpTools (pixel
``rlnCoordinateX/Y/Z``) and single-table particle files. Units: positions in tilt-series pixels
(tomogram frame of :mod:`polish3d.geometry`), centred coordinates and origins in Å, pixel sizes
Å/px, angles in degrees.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from polish3d import geometry
from polish3d.errors import InputError
from polish3d.io.relion._common import (
    _SIZE_COLUMNS,
    ANGLE_LABELS,
    CENTRED_LABELS,
    COORD_LABELS,
    ORIGIN_LABELS,
    SUBTOMO_LABELS,
    _check_positive_columns,
    _numeric,
    _positive,
    _require_columns,
)
from polish3d.io.star import read_star, write_star
from polish3d.model import ParticleData, TiltSeriesData

log = logging.getLogger(__name__)


def _generate_names(t: pd.DataFrame, where: str) -> pd.DataFrame:
    log.warning("%s: no rlnTomoParticleName; generating <tomo>/<n> names", where)
    counts: dict[str, int] = {}
    out = []
    for tomo in t["rlnTomoName"].astype(str).tolist():
        counts[tomo] = counts.get(tomo, 0) + 1
        out.append(f"{tomo}/{counts[tomo]}")
    t = t.copy()
    t["rlnTomoParticleName"] = pd.Series(out, index=t.index, dtype=object)
    return t


def _check_particles(t: pd.DataFrame, where: str) -> pd.DataFrame:
    _require_columns(t, ["rlnTomoName"], where)
    t = t.copy()
    t["rlnTomoName"] = t["rlnTomoName"].astype(str)
    has_c = all(c in t.columns for c in CENTRED_LABELS)
    has_p = all(c in t.columns for c in COORD_LABELS)
    if not (has_c or has_p):
        raise InputError(
            f"{where}: missing particle coordinates (rlnCenteredCoordinateX/Y/ZAngst, or "
            f"RELION 4 rlnCoordinateX/Y/Z)"
        )
    geo = [*(CENTRED_LABELS if has_c else COORD_LABELS)]
    geo += [c for c in (*ORIGIN_LABELS, *ANGLE_LABELS, *SUBTOMO_LABELS) if c in t.columns]
    for c in geo:
        _numeric(t, c, where)
    if "rlnTomoParticleName" not in t.columns:
        t = _generate_names(t, where)
    else:
        t["rlnTomoParticleName"] = t["rlnTomoParticleName"].astype(str)
    names = t["rlnTomoParticleName"]
    dup = names[names.duplicated()].unique().tolist()
    if dup:
        raise InputError(
            f"{where}: duplicate rlnTomoParticleName {', '.join(map(str, dup[:5]))}"
            + (" …" if len(dup) > 5 else "")
        )
    return t


@dataclass
class ParticleSet:
    """A RELION particle set (``particles.star``): general, optics and particle tables.

    Attributes:
        particles: the particle table (all columns kept).
        optics: ``data_optics`` or ``None``.
        general: ``data_general`` key-values or ``None``.
        source: the file read (for messages) or ``None``.
        extra_blocks: any other blocks (written back unchanged).
    """

    particles: pd.DataFrame
    optics: pd.DataFrame | None = None
    general: dict | None = None
    source: Path | None = None
    extra_blocks: dict = field(default_factory=dict)

    @property
    def _where(self) -> str:
        return f"{self.source if self.source is not None else '<particles>'} (block data_particles)"

    def tomogram_names(self) -> list[str]:
        """Distinct ``rlnTomoName`` values, in order of first appearance."""
        return list(dict.fromkeys(self.particles["rlnTomoName"].astype(str).tolist()))

    def check_tomograms(self, tomogram_names: Iterable[str]) -> list[str]:
        """Warn about particles of tomograms not in ``tomogram_names`` (they are kept).

        Returns:
            The unknown tomogram names.

        Raises:
            InputError: no particle belongs to any of the tomograms.
        """
        known = set(map(str, tomogram_names))
        mine = self.tomogram_names()
        unknown = [n for n in mine if n not in known]
        if mine and len(unknown) == len(mine):
            raise InputError(
                f"{self._where}: no particle belongs to a tomogram of the tomogram set "
                f"(particles name {', '.join(unknown[:5])}; tomograms are "
                f"{', '.join(sorted(known)[:5])})"
            )
        if unknown:
            n = int(self.particles["rlnTomoName"].isin(unknown).sum())
            log.warning(
                "%s: %d particles belong to tomograms not in the tomogram set (%s); kept unchanged",
                self._where,
                n,
                ", ".join(unknown),
            )
        return unknown

    def _pixel_sizes(self, rows: pd.DataFrame, default: float) -> np.ndarray:
        """Tilt-series pixel size (Å/px) per particle, from its optics group as RELION does."""
        o = self.optics
        if o is None or "rlnTomoTiltSeriesPixelSize" not in o.columns or len(o) == 0:
            return np.full(len(rows), float(default))
        where_o = f"{self.source} (block data_optics)"
        ps = _numeric(o, "rlnTomoTiltSeriesPixelSize", where_o)
        _positive(ps, "rlnTomoTiltSeriesPixelSize", where_o, "pixel size in Å/px")
        if "rlnOpticsGroup" not in rows.columns or "rlnOpticsGroup" not in o.columns:
            if len(o) > 1:
                raise InputError(f"{self._where}: missing column rlnOpticsGroup ({len(o)} groups)")
            out = np.full(len(rows), ps[0])
        else:
            lut = dict(zip(o["rlnOpticsGroup"].astype(int).tolist(), ps.tolist(), strict=True))
            groups = rows["rlnOpticsGroup"].astype(int).tolist()
            missing = sorted({g for g in groups if g not in lut})
            if missing:
                raise InputError(f"{self._where}: optics group(s) {missing} not in {where_o}")
            out = np.array([lut[g] for g in groups], dtype=np.float64)
        if out.size and np.any(np.abs(out - default) > 1e-3 * default):
            log.warning(
                "%s: optics pixel size %s Å/px differs from the tilt series' %s Å/px; using the "
                "optics value (as RELION does)",
                self._where,
                ", ".join(f"{v:g}" for v in np.unique(out)),
                f"{default:g}",
            )
        return out

    def _rows(self, tomo: str) -> pd.DataFrame:
        return self.particles[self.particles["rlnTomoName"].astype(str) == tomo]

    def for_tomogram(
        self,
        ts: TiltSeriesData,
        trajectories: Mapping[str, np.ndarray] | None = None,
        *,
        require_half_set: bool = True,
    ) -> ParticleData:
        """The particles of one tomogram as :class:`~polish3d.model.ParticleData`.

        Positions follow RELION 5 (``X = centred/px + c − A_sub·origin/px``; RELION 4
        ``rlnCoordinateX/Y/Z`` are taken as pixels without RELION 4's +1, origins still
        subtracted); rotations ``M = A_sub · A_part``.

        Args:
            ts: the tilt series (its name selects the particles; its tomogram size and, for
                tables without optics, its pixel size are used).
            trajectories: ``{particle name: (F, 3) Å}`` (from :func:`read_trajectories`), or
                ``None``; converted to pixels in ``trajectories_px``.
            require_half_set: if false, a missing ``rlnRandomSubset`` gives half set 1 for all.

        Raises:
            InputError: missing ``rlnRandomSubset`` (when required), values other than 1/2,
                missing or wrongly sized trajectories.
        """
        rows = self._rows(ts.name)
        n = len(rows)
        names = rows["rlnTomoParticleName"].astype(str).tolist()
        px = self._pixel_sizes(rows, ts.pixel_size_ang)

        def trio(labels):
            if all(c in rows.columns for c in labels):
                return np.stack([_numeric(rows, c, self._where) for c in labels], -1)
            return None

        angles = trio(ANGLE_LABELS)
        sub = trio(SUBTOMO_LABELS)
        origin = trio(ORIGIN_LABELS)
        centred = trio(CENTRED_LABELS)
        pos = np.zeros((n, 3))
        for value in np.unique(px):
            m = px == value
            if centred is not None:
                c_ang = centred[m]
            else:  # RELION 4 pixel coordinates, no +1
                coords = trio(COORD_LABELS)[m]
                c_ang = geometry.positions_to_centred_ang(
                    coords, pixel_size_ang=float(value), tomo_size_px=ts.tomo_size_px
                )
            pos[m] = geometry.particle_positions_px(
                c_ang,
                pixel_size_ang=float(value),
                tomo_size_px=ts.tomo_size_px,
                origin_ang=None if origin is None else origin[m],
                subtomo_angles_deg=None if sub is None else sub[m],
            )
        rot = geometry.particle_rotations(np.zeros((n, 3)) if angles is None else angles, sub)
        return ParticleData(
            names=names,
            positions_px=pos,
            rotations=rot,
            half_set=self._half_sets(rows, require_half_set),
            trajectories_px=_trajectories_px(names, trajectories, ts, px),
        )

    def _half_sets(self, rows: pd.DataFrame, required: bool) -> np.ndarray:
        """``rlnRandomSubset`` (1 or 2) per particle; all 1 when absent and not ``required``."""
        if "rlnRandomSubset" in rows.columns:
            half = _numeric(rows, "rlnRandomSubset", self._where).astype(np.int64)
            bad = sorted(set(half.tolist()) - {1, 2})
            if bad:
                raise InputError(f"{self._where}: rlnRandomSubset must be 1 or 2, found {bad}")
            return half
        if required and len(rows) > 0:
            raise InputError(f"{self._where}: missing mandatory column rlnRandomSubset")
        return np.ones(len(rows), dtype=np.int64)

    def with_positions(self, ts: TiltSeriesData, names: Iterable[str], positions_px) -> ParticleSet:
        """A copy with new positions for some particles of one tomogram.

        Writes ``rlnCenteredCoordinateX/Y/ZAngst = (X − c)·px`` and ``rlnOriginX/Y/ZAngst = 0``
        for those particles (RELION 5's output convention); ``rlnCoordinateX/Y/Z`` columns are
        dropped once every particle has centred coordinates.

        Args:
            ts: the tilt series (tomogram size and default pixel size).
            names: ``rlnTomoParticleName`` of the particles to update.
            positions_px: ``(N, 3)`` tomogram-frame positions (pixels).
        """
        names = [str(x) for x in names]
        pos = np.asarray(positions_px, dtype=np.float64).reshape(len(names), 3)
        t = self.particles.copy()
        index_of = {nm: i for i, nm in enumerate(t["rlnTomoParticleName"].astype(str).tolist())}
        missing = [nm for nm in names if nm not in index_of]
        if missing:
            raise KeyError(f"particles not in the set: {', '.join(missing[:5])}")
        idx = np.array([index_of[nm] for nm in names], dtype=np.int64)
        rows = t.iloc[idx]
        px = self._pixel_sizes(rows, ts.pixel_size_ang)
        centred = np.zeros_like(pos)
        for value in np.unique(px):
            m = px == value
            centred[m] = geometry.positions_to_centred_ang(
                pos[m], pixel_size_ang=float(value), tomo_size_px=ts.tomo_size_px
            )
        for k, lab in enumerate(CENTRED_LABELS):
            col = (
                t[lab].to_numpy(dtype=np.float64, copy=True) if lab in t.columns else np.full(len(t), np.nan)
            )
            col[idx] = centred[:, k]
            t[lab] = col
        for lab in ORIGIN_LABELS:
            col = t[lab].to_numpy(dtype=np.float64, copy=True) if lab in t.columns else np.zeros(len(t))
            col[idx] = 0.0
            t[lab] = col
        if any(c in t.columns for c in COORD_LABELS):
            if np.all(np.isfinite(t[list(CENTRED_LABELS)].to_numpy(dtype=np.float64))):
                t = t.drop(columns=[c for c in COORD_LABELS if c in t.columns])
        return dataclasses.replace(self, particles=t)

    def write(self, path) -> Path:
        """Write ``data_general``, ``data_optics`` (if any) and ``data_particles`` (RELION 5)."""
        blocks: dict = {
            "general": dict(self.general) if self.general is not None else {"rlnTomoSubTomosAre2DStacks": 0}
        }
        if self.optics is not None:
            blocks["optics"] = self.optics
        blocks["particles"] = self.particles
        blocks.update(self.extra_blocks)
        if all(c in self.particles.columns for c in CENTRED_LABELS):
            c = self.particles[list(CENTRED_LABELS)].to_numpy(dtype=np.float64)
            if not np.all(np.isfinite(c)):
                log.warning("%s: some particles have no centred coordinates (written as nan)", path)
        return write_star(path, blocks)


def read_particle_set(path) -> ParticleSet:
    """Read a particle set: RELION 5, RELION 4, or a plain single-table particle file.

    Accepted: ``data_general`` + ``data_optics`` + ``data_particles`` (RELION 5), ``data_optics``
    + ``data_particles`` with pixel ``rlnCoordinateX/Y/Z`` (RELION 4, WarpTools), or a file with a
    single particle table of any name (Select jobs' ``data_``, picking tools). Missing
    ``rlnTomoParticleName`` are generated as ``<tomo>/<n>`` (1-based per tomogram), with a
    warning, as RELION does.

    Raises:
        InputError: missing file, no particle table, missing ``rlnTomoName`` or coordinates,
            non-finite geometry, duplicate particle names.
    """
    p = Path(path)
    blocks = read_star(p)
    if "particles" in blocks and isinstance(blocks["particles"], pd.DataFrame):
        key = "particles"
    else:
        loops = [
            k for k, v in blocks.items() if isinstance(v, pd.DataFrame) and k not in ("optics", "general")
        ]
        if len(loops) != 1:
            raise InputError(f"{p}: no data_particles table")
        key = loops[0]
    where = f"{p} (block data_{key})"
    t = _check_particles(blocks[key], where)
    optics = blocks.get("optics") if isinstance(blocks.get("optics"), pd.DataFrame) else None
    if optics is not None:
        _check_positive_columns(optics, _SIZE_COLUMNS[:1], f"{p} (block data_optics)")
    general = blocks.get("general") if isinstance(blocks.get("general"), dict) else None
    extra = {k: v for k, v in blocks.items() if k not in (key, "optics", "general")}
    return ParticleSet(particles=t, optics=optics, general=general, source=p, extra_blocks=extra)


def new_particle_set(
    rows: pd.DataFrame, optics: pd.DataFrame | None = None, general: dict | None = None
) -> ParticleSet:
    """Build a :class:`ParticleSet` from tables (validated as on reading)."""
    t = _check_particles(rows, "<new particle set>")
    return ParticleSet(
        particles=t.reset_index(drop=True),
        optics=None if optics is None else optics.copy(),
        general=dict(general) if general is not None else {"rlnTomoSubTomosAre2DStacks": 1},
    )



def _trajectories_px(names, trajectories, ts: TiltSeriesData, px) -> np.ndarray | None:
    """``(N, F, 3)`` trajectories in pixels from ``{particle name: (F, 3) Å}`` (or ``None``)."""
    if trajectories is None or len(names) == 0:
        return None
    traj = np.zeros((len(names), ts.n_tilts, 3))
    for k, name in enumerate(names):
        if name not in trajectories:
            raise InputError(f"no trajectory for particle {name!r} (tomogram {ts.name})")
        t = np.asarray(trajectories[name], dtype=np.float64)
        if t.shape != (ts.n_tilts, 3):
            raise InputError(
                f"trajectory of particle {name!r} has shape {t.shape}, expected "
                f"({ts.n_tilts}, 3) for the {ts.n_tilts} tilts of {ts.name}"
            )
        traj[k] = t / px[k]
    return traj


def _optics_groups(tilt_series: list[TiltSeriesData]) -> dict[tuple, int]:
    """``{(pixel size Å/px, kV, Cs mm, amplitude contrast): optics group}``, 1-based."""
    groups: dict[tuple, int] = {}
    for ts in tilt_series:
        key = (ts.pixel_size_ang, ts.voltage_kv, ts.cs_mm, ts.amplitude_contrast)
        groups.setdefault(key, len(groups) + 1)
    return groups


def particle_set_from_records(
    tilt_series: list[TiltSeriesData],
    particles: Mapping[str, ParticleData],
    extra_columns: Mapping[str, pd.DataFrame] | None = None,
) -> ParticleSet:
    """A RELION 5 particle set of particle records, one optics group per distinct optics.

    Positions are written as centred Å with zero origins, rotations as ``rlnAngleRot/Tilt/Psi``
    (no subtomogram angles); ``extra_columns`` (``{tomogram: N rows}``) add columns.
    """
    extra_columns = dict(extra_columns or {})
    groups = _optics_groups(tilt_series)
    optics = pd.DataFrame(
        [
            {
                "rlnOpticsGroup": gid,
                "rlnOpticsGroupName": f"opticsGroup{gid}",
                "rlnSphericalAberration": float(k[2]),
                "rlnVoltage": float(k[1]),
                "rlnAmplitudeContrast": float(k[3]),
                "rlnTomoTiltSeriesPixelSize": float(k[0]),
            }
            for k, gid in groups.items()
        ]
    )
    frames = []
    for ts in tilt_series:
        pdata = particles.get(ts.name)
        if pdata is None or pdata.n_particles == 0:
            continue
        gid = groups[(ts.pixel_size_ang, ts.voltage_kv, ts.cs_mm, ts.amplitude_contrast)]
        centred = geometry.positions_to_centred_ang(
            pdata.positions_px, pixel_size_ang=ts.pixel_size_ang, tomo_size_px=ts.tomo_size_px
        )
        rot, tilt, psi = geometry.matrix_to_euler_zyz(np.asarray(pdata.rotations))
        n = pdata.n_particles
        df = pd.DataFrame(
            {
                "rlnTomoName": [ts.name] * n,
                "rlnTomoParticleName": list(pdata.names),
                **{lab: centred[:, k] for k, lab in enumerate(CENTRED_LABELS)},
                "rlnAngleRot": rot,
                "rlnAngleTilt": tilt,
                "rlnAnglePsi": psi,
                **{lab: np.zeros(n) for lab in ORIGIN_LABELS},
                "rlnOpticsGroup": np.full(n, gid, dtype=np.int64),
                "rlnRandomSubset": np.asarray(pdata.half_set, dtype=np.int64),
                "rlnClassNumber": np.ones(n, dtype=np.int64),
            }
        )
        extra = extra_columns.get(ts.name)
        if extra is not None:
            if len(extra) != n:
                raise ValueError(f"{ts.name}: particles_extra_columns has {len(extra)} rows, expected {n}")
            for c in extra.columns:
                if c not in df.columns:
                    df[c] = extra[c].to_numpy()
        frames.append(df)
    table = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["rlnTomoName", "rlnTomoParticleName", *CENTRED_LABELS])
    )
    return ParticleSet(particles=table, optics=optics, general={"rlnTomoSubTomosAre2DStacks": 1})
