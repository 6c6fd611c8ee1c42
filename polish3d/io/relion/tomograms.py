"""Tomogram sets (``tomograms.star``): the global table and one per-tilt table per tilt series.

RELION 5 layout: ``data_global`` with ``rlnTomoTiltSeriesStarFile`` naming one STAR file per tilt
series; RELION 4 (also WarpTools): one file with ``data_global`` and a ``data_<rlnTomoName>``
table per tilt series. Units: pixel sizes Å/px, sizes in pixels, shifts Å, angles degrees.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from polish3d import geometry
from polish3d.errors import InputError
from polish3d.io import mrc
from polish3d.io.relion._common import (
    _SIZE_COLUMNS,
    _check_positive_columns,
    _numeric,
    _optional,
    _pipeline_post,
    _relative_to,
    _require_columns,
    _require_file,
    _resolve,
    _scalar,
    _split_image_name,
    _tomogram_geometry,
)
from polish3d.io.relion.tilt_tables import (
    complete_deformations,
    encode_deformation,
    encode_projections,
    new_tilt_table,
    read_deformation,
    read_projections,
)
from polish3d.io.star import read_star, write_star
from polish3d.model import Deformation, TiltSeriesData

log = logging.getLogger(__name__)



#: per-tilt-series CTF/dose scalars of ``data_global``: field → (column, default; None: mandatory)
_SERIES_CTF_COLUMNS = {
    "defocus_slope": ("rlnTomoDefocusSlope", 1.0),
    "voltage_kv": ("rlnVoltage", None),
    "cs_mm": ("rlnSphericalAberration", None),
    "amplitude_contrast": ("rlnAmplitudeContrast", None),
    "bfactor_per_dose_ang2": ("rlnCtfBfactorPerElectronDose", 0.0),
}
#: per-tilt CTF columns of a tilt table: field → (column, default; None: mandatory)
_TILT_CTF_COLUMNS = {
    "defocus_u_ang": ("rlnDefocusU", None),
    "defocus_v_ang": ("rlnDefocusV", None),
    "defocus_angle_deg": ("rlnDefocusAngle", None),
    "ctf_scale": ("rlnCtfScalefactor", 1.0),
    "ctf_bfactor_ang2": ("rlnCtfBfactor", 0.0),
    "phase_shift_deg": ("rlnPhaseShift", 0.0),
}


@dataclass
class TomogramSet:
    """A RELION tomogram set: the global table and one per-tilt table per tilt series.

    Attributes:
        global_table: ``data_global`` (one row per tilt series), columns untouched.
        tilt_tables: ``{rlnTomoName: per-tilt table}`` (rows in file order).
        source: the ``tomograms.star`` read.
        project_dir: folder relative paths are resolved against (``None``: the cwd).
        layout: ``"relion5"`` (per-tilt STAR files) or ``"relion4"`` (one file with all
            tables; converted to the RELION 5 layout by :meth:`write`).
        tilt_files: ``{name: path}`` of each per-tilt table as resolved (for RELION 4 the
            virtual path ``<dir>/tilt_series/<name>.star`` that RELION 5 assigns).
        tilt_file_entries: ``{name: the rlnTomoTiltSeriesStarFile text}`` (used by write).
        extra_blocks: any other blocks of the global file (written back unchanged).
    """

    global_table: pd.DataFrame
    tilt_tables: dict[str, pd.DataFrame]
    source: Path
    project_dir: Path | None = None
    layout: str = "relion5"
    tilt_files: dict[str, Path] = field(default_factory=dict)
    tilt_file_entries: dict[str, str] = field(default_factory=dict)
    extra_blocks: dict[str, pd.DataFrame | dict] = field(default_factory=dict)
    _image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    # -- access ---------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """``rlnTomoName`` of every tilt series, in file order."""
        return [str(n) for n in self.global_table["rlnTomoName"].tolist()]

    def _row(self, name: str) -> tuple[int, pd.Series]:
        idx = np.flatnonzero(self.global_table["rlnTomoName"].astype(str).to_numpy() == name)
        if idx.size == 0:
            raise KeyError(f"tomogram {name!r} is not in {self.source}")
        i = int(idx[0])
        return i, self.global_table.iloc[i]

    def _table_where(self, name: str) -> str:
        if self.layout == "relion4":
            return f"{self.source} (block data_{name})"
        return f"{self.tilt_files.get(name, '?')} (block data_{name})"

    def _image_size(
        self, name: str, row: pd.Series, table: pd.DataFrame, load_images: bool
    ) -> tuple[tuple[int, int], list[tuple[str, int]]]:
        where_g = f"{self.source} (tomogram {name})"
        where_t = self._table_where(name)
        n = len(table)
        tomo_xy = None
        if "rlnTomoSizeX" in row.index and "rlnTomoSizeY" in row.index:
            tomo_xy = (int(row["rlnTomoSizeX"]), int(row["rlnTomoSizeY"]))

        if "rlnTomoTiltSeriesName" in row.index:
            stack = _resolve(row["rlnTomoTiltSeriesName"], self.project_dir, self.source)
            if "rlnTomoFrameCount" in row.index:
                fc = int(_scalar(row, "rlnTomoFrameCount", where_g))
                if fc != n:
                    raise InputError(
                        f"{where_t}: {n} tilts in the per-tilt table but rlnTomoFrameCount = {fc} "
                        f"in {self.source}"
                    )
            files = [(str(stack), j) for j in range(n)]
            if stack.is_file() or load_images:
                _require_file(stack, "tilt-series stack", self.source)
                w, h, f = mrc.image_size(stack)
                if f != n:
                    raise InputError(
                        f"tilt-count mismatch: {stack} has {f} images but {where_t} lists {n} tilts"
                    )
                return (w, h), files
        else:
            if "rlnMicrographName" not in table.columns:
                if load_images:
                    raise InputError(
                        f"{where_t}: missing column rlnMicrographName (and no "
                        f"rlnTomoTiltSeriesName in {self.source})"
                    )
                files = []
            else:
                files = []
                for cell in table["rlnMicrographName"].tolist():
                    try:
                        rel, k = _split_image_name(cell)
                    except ValueError as exc:
                        raise InputError(f"{where_t}: rlnMicrographName: {exc}") from exc
                    files.append((str(_resolve(rel, self.project_dir, self.tilt_files.get(name))), k))
            distinct = list(dict.fromkeys(f for f, _ in files))
            present = bool(distinct) and all(Path(f).is_file() for f in distinct)
            if present or load_images:
                if not distinct:
                    raise InputError(f"{where_t}: no images listed")
                sizes = {}
                for fpath in distinct:
                    _require_file(Path(fpath), "tilt image file", self.tilt_files.get(name))
                    sizes[fpath] = mrc.image_size(fpath)
                wh = {s[:2] for s in sizes.values()}
                if len(wh) != 1:
                    raise InputError(f"{where_t}: tilt images of unequal sizes {sorted(wh)}")
                for fpath, k in files:
                    if k >= sizes[fpath][2]:
                        raise InputError(
                            f"tilt-count mismatch: {where_t} refers to image {k + 1} of {fpath}, "
                            f"which has {sizes[fpath][2]} images"
                        )
                w, h = next(iter(wh))
                return (w, h), files
        if tomo_xy is None:
            raise InputError(f"{where_g}: missing mandatory columns rlnTomoSizeX/rlnTomoSizeY")
        log.warning("%s: tilt images not available; using the tomogram size %s as image size", name, tomo_xy)
        return tomo_xy, files

    def tilt_series(self, name: str, *, load_images: bool = True) -> TiltSeriesData:
        """The :class:`~polish3d.model.TiltSeriesData` of one tilt series.

        Args:
            name: ``rlnTomoName``.
            load_images: if true, the tilt images must exist (InputError naming the missing file
                and the STAR file that references it) and the image size is read from their MRC
                headers. If false, headers are used when all images exist; otherwise the image
                size falls back to ``(rlnTomoSizeX, rlnTomoSizeY)`` (with a warning).

        Raises:
            InputError: missing mandatory column/file, tilt-count mismatch, non-finite geometry.
        """
        i, row = self._row(name)
        table = self.tilt_tables[name]
        where_g = f"{self.source} (tomogram {name})"
        where_t = self._table_where(name)
        n = len(table)
        if n == 0:
            raise InputError(f"{where_t}: the per-tilt table is empty")
        for lab in ("rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ", "rlnTomoTiltSeriesPixelSize"):
            if lab not in row.index:
                raise InputError(f"{self.source}: block data_global lacks mandatory column {lab}")
        px, tomo_size = _tomogram_geometry(row, where_g)
        _require_columns(
            table,
            ("rlnMicrographPreExposure", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"),
            where_t,
        )
        image_size, files = self._image_size(name, row, table, load_images)
        if files:
            self._image_sizes[name] = image_size

        projections = read_projections(
            table, where_t, pixel_size_ang=px, image_size_px=image_size, tomo_size_px=tomo_size
        )

        if "rlnTomoHand" in row.index:
            hand = _scalar(row, "rlnTomoHand", where_g)
        else:
            log.warning("%s: no rlnTomoHand; assuming -1", where_g)
            hand = -1.0
        pre = _numeric(table, "rlnMicrographPreExposure", where_t)
        if "rlnTomoImportFractionalDose" in row.index:
            frac = _scalar(row, "rlnTomoImportFractionalDose", where_g)
        else:
            order = geometry.dose_order(pre)
            frac = float(pre[order[1]] - pre[order[0]]) if n > 1 else 0.0

        return TiltSeriesData(
            name=name,
            pixel_size_ang=px,
            tomo_size_px=tomo_size,
            image_size_px=image_size,
            projections=projections,
            hand=hand,
            fractional_dose_e_per_ang2=frac,
            pre_exposure_e_per_ang2=pre,
            **{field: _scalar(row, label, where_g, default)
               for field, (label, default) in _SERIES_CTF_COLUMNS.items()},
            **{field: _numeric(table, label, where_t) if default is None
               else _optional(table, label, default, where_t)
               for field, (label, default) in _TILT_CTF_COLUMNS.items()},
            image_files=files,
            deformation=read_deformation(row, table, where_g, where_t),
        )


    def with_tilt_series(
        self,
        name: str,
        projections=None,
        deformation: Deformation | None = None,
        *,
        keep_matrix: bool | None = None,
        image_size_px: tuple[int, int] | None = None,
    ) -> TomogramSet:
        """A copy with new per-tilt geometry (and/or deformation) for one tilt series.

        Args:
            name: ``rlnTomoName``.
            projections: ``(F, 4, 4)`` new matrices (file order) or ``None`` (keep). Written as
                ``rlnTomoXTilt/YTilt/ZRot/XShiftAngst/YShiftAngst`` via
                :func:`geometry.projection_to_euler`; ``rlnTomoProjX..W`` too when
                ``keep_matrix``, or (``None``) when some matrix is not a rotation (e.g.
                magnification from ``polish3d fiducials``): see :func:`encode_projections`.
            deformation: new deformation or ``None`` (keep): global
                ``rlnTomoDeformationGridSizeX/Y``, ``rlnTomoDeformationType`` and per-tilt
                ``rlnTomoDeformationCoefficients``.
            image_size_px: tilt-image size ``(W, H)`` for the shift conversion; default: the size
                found by :meth:`tilt_series` (image headers when available).
        """
        out = copy.copy(self)
        out.tilt_tables = dict(self.tilt_tables)
        out._image_sizes = dict(self._image_sizes)
        i, row = out._row(name)
        table = self.tilt_tables[name]
        n = len(table)
        if projections is not None:
            p = np.asarray(projections, dtype=np.float64)
            if p.shape != (n, 4, 4):
                raise ValueError(f"{name}: projections must have shape ({n}, 4, 4), got {p.shape}")
            px, tomo_size = _tomogram_geometry(row, f"{self.source} (tomogram {name})")
            if image_size_px is None:
                image_size_px = self._image_sizes.get(name)
            if image_size_px is None:
                image_size_px = self.tilt_series(name, load_images=False).image_size_px
            table = encode_projections(
                table, p, keep_matrix=keep_matrix, pixel_size_ang=px, image_size_px=image_size_px,
                tomo_size_px=tomo_size,
            )
        if deformation is not None:
            rows = np.shape(deformation.coefficients)[0]
            if rows != n:
                raise ValueError(f"{name}: deformation has {rows} rows, expected {n}")
            out.global_table, table = encode_deformation(self.global_table, i, table, deformation)
        else:
            out.global_table = self.global_table.copy()
        out.tilt_tables[name] = table.copy() if table is self.tilt_tables[name] else table
        return out

    # -- writing ----------------------------------------------------------------------------

    def _rebased_tilt_table(self, name: str, table: pd.DataFrame, project_dir) -> pd.DataFrame:
        """The per-tilt table with image paths valid from ``project_dir`` (default: the cwd).

        Image paths are normally relative to the project folder and stay as they are; only
        paths that were found through the fallback (next to the STAR file, i.e. a set read from
        outside its project) are rewritten relative to ``project_dir``.
        """
        if "rlnMicrographName" not in table.columns:
            return table
        base = Path(project_dir) if project_dir is not None else Path.cwd()
        referrer = self.tilt_files.get(name, self.source)
        cells = []
        changed = False
        for cell in table["rlnMicrographName"].tolist():
            try:
                path_text, index = _split_image_name(cell)
            except ValueError:
                cells.append(cell)
                continue
            src = Path(self.project_dir) if self.project_dir is not None else Path.cwd()
            if Path(path_text).is_absolute() or (base / path_text).exists() or (src / path_text).exists():
                cells.append(cell)  # a proper project-relative path: RELION's convention
                continue
            found = _resolve(path_text, self.project_dir, referrer)
            if not found.exists():
                cells.append(cell)
                continue
            prefix = f"{index + 1}@" if "@" in str(cell) else ""
            cells.append(prefix + _relative_to(found, base))
            changed = True
        if not changed:
            return table
        out = table.copy()
        out["rlnMicrographName"] = pd.Series(cells, index=out.index, dtype=object)
        return out

    def write(self, out_dir, *, project_dir=None) -> Path:
        """Write ``<out_dir>/tomograms.star`` and every per-tilt table, RELION 5 layout.

        Each per-tilt table goes to ``<out_dir>/`` + the part of its old path after the
        ``jobNNN/`` component (``tilt_series/<name>.star`` when the old path is not a pipeline
        path), as block ``data_<name>``; ``rlnTomoTiltSeriesStarFile`` is updated to the new
        path relative to ``project_dir`` (default: the cwd). A RELION-4 set is thereby
        converted to the RELION-5 layout. All other columns and blocks are kept as they are.

        Returns:
            The path of the new ``tomograms.star``.
        """
        out_dir = Path(out_dir)
        g, tilt_tables = complete_deformations(self.global_table.copy(), dict(self.tilt_tables))
        entries = []
        used: dict[Path, str] = {}
        for name in self.names:
            old = self.tilt_file_entries.get(name, f"tilt_series/{name}.star")
            post = _pipeline_post(old) or f"tilt_series/{name}.star"
            new = out_dir / post
            if new in used:
                new = out_dir / "tilt_series" / f"{name}.star"
            used[new] = name
            write_star(new, {name: self._rebased_tilt_table(name, tilt_tables[name], project_dir)})
            entries.append(_relative_to(new, project_dir))
        g["rlnTomoTiltSeriesStarFile"] = pd.Series(entries, index=g.index, dtype=object)
        blocks: dict = {"global": g}
        blocks.update(self.extra_blocks)
        return write_star(out_dir / "tomograms.star", blocks)


def _pick_block(blocks: dict, name: str, path: Path, referrer: Path) -> pd.DataFrame:
    if name in blocks and isinstance(blocks[name], pd.DataFrame):
        return blocks[name]
    loops = [k for k, v in blocks.items() if isinstance(v, pd.DataFrame)]
    if len(loops) == 1:
        log.warning("%s: expected block data_%s, using data_%s (only block)", path, name, loops[0])
        return blocks[loops[0]]
    raise InputError(
        f"{path} (referenced from {referrer}): no block data_{name} "
        f"(found {', '.join('data_' + k for k in blocks)})"
    )


def read_tomogram_set(path, *, project_dir=None) -> TomogramSet:
    """Read a tomogram set (``tomograms.star``), RELION 5 or RELION 4 layout.

    RELION 5: ``data_global`` with ``rlnTomoTiltSeriesStarFile`` naming one STAR file per tilt
    series whose table is ``data_<rlnTomoName>`` (a file with a single, differently named table
    is accepted with a warning). RELION 4 (also WarpTools): one file with ``data_global`` and a
    ``data_<rlnTomoName>`` table per tilt series (``rlnTomoProjX..W`` matrices).

    Args:
        path: the ``tomograms.star``.
        project_dir: the RELION project folder (default: the cwd), see the module docstring.

    Raises:
        InputError: missing file or table, missing ``rlnTomoName``/``rlnMicrographPreExposure``,
            duplicate names.
    """
    p = Path(path)
    blocks = read_star(p)
    if "global" not in blocks or not isinstance(blocks["global"], pd.DataFrame):
        raise InputError(f"{p}: no data_global table (expected a RELION tomogram set)")
    g = blocks["global"].copy()
    _require_columns(g, ["rlnTomoName"], f"{p} (block data_global)")
    g["rlnTomoName"] = g["rlnTomoName"].astype(str)
    names = g["rlnTomoName"].tolist()
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"{p} (block data_global): duplicate rlnTomoName {', '.join(dup)}")
    pdir = Path(project_dir) if project_dir is not None else None
    tables: dict[str, pd.DataFrame] = {}
    files: dict[str, Path] = {}
    entries: dict[str, str] = {}
    extra = {}
    if "rlnTomoTiltSeriesStarFile" in g.columns:
        layout = "relion5"
        extra = {k: v for k, v in blocks.items() if k != "global"}
        for name, entry in zip(names, g["rlnTomoTiltSeriesStarFile"].astype(str), strict=True):
            f = _resolve(entry, pdir, p)
            _require_file(f, f"per-tilt STAR file of tomogram {name}", p)
            tables[name] = _pick_block(read_star(f), name, f, p).copy()
            files[name] = f
            entries[name] = entry
    else:
        layout = "relion4"
        log.warning("%s: no rlnTomoTiltSeriesStarFile; reading the RELION 4 layout", p)
        for name in names:
            if name not in blocks or not isinstance(blocks[name], pd.DataFrame):
                raise InputError(f"{p}: RELION 4 layout but no table data_{name}")
            tables[name] = blocks[name].copy()
            virt = p.parent / "tilt_series" / f"{name}.star"
            files[name] = virt
            entries[name] = virt.as_posix()
        extra = {k: v for k, v in blocks.items() if k != "global" and k not in names}
    for name, t in tables.items():
        if "rlnMicrographPreExposure" not in t.columns:
            where = files[name] if layout == "relion5" else p
            raise InputError(
                f"{where} (block data_{name}): missing mandatory column rlnMicrographPreExposure"
            )
    _check_positive_columns(g, _SIZE_COLUMNS, f"{p} (block data_global)")
    return TomogramSet(global_table=g, tilt_tables=tables, source=p, project_dir=pdir, layout=layout,
                       tilt_files=files, tilt_file_entries=entries, extra_blocks=extra)



def tomogram_set_from_records(
    tilt_series: list[TiltSeriesData],
    out_dir: Path,
    project: Path,
    tilt_tables_extra: Mapping[str, pd.DataFrame] | None = None,
) -> TomogramSet:
    """A RELION 5 tomogram set holding tilt-series records, to be written to ``out_dir``.

    Its :meth:`TomogramSet.write` puts each per-tilt table at ``tilt_series/<name>.star`` and
    completes the deformations as for every other set (see :func:`complete_deformations`).
    """
    extra = dict(tilt_tables_extra or {})
    any_bf = any(ts.bfactor_per_dose_ang2 != 0 for ts in tilt_series)
    rows, tables = [], {}
    for ts in tilt_series:
        r = {
            "rlnTomoName": ts.name,
            "rlnVoltage": float(ts.voltage_kv),
            "rlnSphericalAberration": float(ts.cs_mm),
            "rlnAmplitudeContrast": float(ts.amplitude_contrast),
            "rlnMicrographOriginalPixelSize": float(ts.pixel_size_ang),
            "rlnTomoHand": float(ts.hand),
            "rlnOpticsGroupName": "opticsGroup1",
            "rlnTomoTiltSeriesPixelSize": float(ts.pixel_size_ang),
            "rlnTomoTiltSeriesStarFile": f"tilt_series/{ts.name}.star",  # set by write()
            "rlnTomoSizeX": int(ts.tomo_size_px[0]),
            "rlnTomoSizeY": int(ts.tomo_size_px[1]),
            "rlnTomoSizeZ": int(ts.tomo_size_px[2]),
            "rlnTomoTomogramBinning": 1.0,
            "rlnTomoImportFractionalDose": float(ts.fractional_dose_e_per_ang2),
        }
        if ts.defocus_slope != 1.0:
            r["rlnTomoDefocusSlope"] = float(ts.defocus_slope)
        if any_bf:
            r["rlnCtfBfactorPerElectronDose"] = float(ts.bfactor_per_dose_ang2)
        if ts.deformation is not None:
            r["rlnTomoDeformationGridSizeX"] = int(ts.deformation.grid_size[0])
            r["rlnTomoDeformationGridSizeY"] = int(ts.deformation.grid_size[1])
            r["rlnTomoDeformationType"] = str(ts.deformation.model)
        rows.append(r)
        tables[ts.name] = new_tilt_table(ts, project, extra.get(ts.name))
    g = pd.DataFrame(rows)
    if "rlnTomoDefocusSlope" in g.columns:
        g["rlnTomoDefocusSlope"] = g["rlnTomoDefocusSlope"].fillna(1.0)
    return TomogramSet(
        global_table=g,
        tilt_tables=tables,
        source=Path(out_dir) / "tomograms.star",
        project_dir=Path(project),
        tilt_file_entries={ts.name: f"tilt_series/{ts.name}.star" for ts in tilt_series},
    )
