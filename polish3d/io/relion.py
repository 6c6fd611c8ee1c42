"""RELION 5 (and RELION 4) tomography sets: optimisation set, tomogram set, particles, motion.

Units: pixel sizes Å/px, positions in tilt-series pixels (frames of :mod:`polish3d.geometry`),
centred coordinates, origins and trajectories in Å, angles in degrees, doses in e⁻/Å².

**Paths.** RELION runs from the project folder and stores every path relative to it. Here a
relative path found in a STAR file is resolved against ``project_dir`` (default: the current
working directory, as RELION does). As a convenience, when that file does not exist but one at
the same relative path next to the STAR file that names it does, the latter is used (this makes
self-contained folders readable from anywhere). Paths are written relative to ``project_dir``.

The layouts, precedences and defaults are those of RELION 5 (``tomogram_set.cpp``,
``particle_set.cpp``, ``trajectory.cpp``, ``optimisation_set.cpp``; spec §2.2 and §5).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from polish3d import geometry
from polish3d.errors import InputError
from polish3d.io import mrc
from polish3d.io.star import parse_vector, read_star, write_star
from polish3d.model import Deformation, ParticleData, TiltSeriesData

__all__ = [
    "OptimisationSet",
    "ParticleSet",
    "TomogramSet",
    "new_particle_set",
    "read_optimisation_set",
    "read_particle_set",
    "read_tomogram_set",
    "read_trajectories",
    "write_new_optimisation_set",
    "write_optimisation_set",
    "write_trajectories",
]

log = logging.getLogger(__name__)

PROJ_LABELS = ("rlnTomoProjX", "rlnTomoProjY", "rlnTomoProjZ", "rlnTomoProjW")
TILT_ANGLE_LABELS = ("rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot")
TILT_SHIFT_LABELS = ("rlnTomoXShiftAngst", "rlnTomoYShiftAngst")
EULER_LABELS = TILT_ANGLE_LABELS + TILT_SHIFT_LABELS
#: per-tilt columns of an unaligned (imported) tilt series: present without alignment means
#: the set was never aligned, and identity projections would be silently wrong
NOMINAL_TILT_LABELS = ("rlnTomoNominalStageTiltAngle", "rlnTomoNominalTiltAxisAngle")
CENTRED_LABELS = (
    "rlnCenteredCoordinateXAngst",
    "rlnCenteredCoordinateYAngst",
    "rlnCenteredCoordinateZAngst",
)
COORD_LABELS = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
ORIGIN_LABELS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
ANGLE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
SUBTOMO_LABELS = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")
DEFORMATION_TYPES = ("spline", "Fourier", "linear")
DEFORMATION_LABELS = ("rlnTomoDeformationGridSizeX", "rlnTomoDeformationGridSizeY", "rlnTomoDeformationType")


def deformation_coefficient_count(model: str, grid) -> int:
    """Length of one tilt's ``rlnTomoDeformationCoefficients`` for a model and grid ``(gw, gh)``.

    ``spline``: ``8·gw·gh``; ``linear``: 3; ``Fourier``: ``4·n_freq`` with RELION's frequency
    set (``polish3d.refine.deformation.fourier_frequencies``; the layout RELION *writes*).
    """
    gw, gh = (int(v) for v in grid)
    if model == "spline":
        return 8 * gw * gh
    if model == "linear":
        return 3
    if model == "Fourier":
        n_freq = sum(gw // 2 + (1 if 0 < iy < gh // 2 else 0) for iy in range(gh))
        return 4 * n_freq
    raise ValueError(f"unknown deformation model {model!r}")

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


# --------------------------------------------------------------------------------------------
# helpers


def _resolve(path_text, project_dir: Path | None, referrer: Path | None = None) -> Path:
    """Resolve a path from a STAR file as RELION does (see the module docstring)."""
    p = Path(str(path_text))
    if p.is_absolute():
        return p
    cand = (Path(project_dir) / p) if project_dir is not None else p
    if cand.exists() or referrer is None:
        return cand
    # not found under the project folder: a project moved or run from elsewhere; try the
    # referring file's folder and its ancestors (a job folder is at most 3 levels deep)
    for base in list(Path(referrer).parents)[:4]:
        alt = base / p
        if alt.exists():
            log.debug("%s: %s not found under the project folder, using %s", referrer, p, alt)
            return alt
    return cand


def _relative_to(path: Path, project_dir: Path | None) -> str:
    """``path`` as RELION would store it: relative to the project folder when inside it."""
    base = Path(project_dir) if project_dir is not None else Path.cwd()
    ap = Path(os.path.abspath(path))
    ab = Path(os.path.abspath(base))
    try:
        return ap.relative_to(ab).as_posix()
    except ValueError:
        return ap.as_posix()


def _require_file(path: Path, what: str, referrer=None) -> Path:
    if not Path(path).is_file():
        ref = f" (referenced from {referrer})" if referrer is not None else ""
        raise InputError(f"{what} not found: {path}{ref}")
    return Path(path)


def _require_columns(table: pd.DataFrame, labels: Iterable[str], where: str) -> None:
    missing = [c for c in labels if c not in table.columns]
    if missing:
        raise InputError(f"{where}: missing mandatory column(s) {', '.join(missing)}")


def _plain(value) -> str:
    """A cell for a message: numbers as plain text (``nan``, ``0.5``, ``3``), text quoted."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return repr(float(value))
    return repr(str(value))


def _numeric(table: pd.DataFrame, label: str, where: str, *, finite: bool = True) -> np.ndarray:
    """A numeric column as float64; InputError naming the column on non-numbers/non-finite."""
    col = pd.to_numeric(table[label], errors="coerce").to_numpy(dtype=np.float64)
    if finite and not np.all(np.isfinite(col)):
        bad = int(np.flatnonzero(~np.isfinite(col))[0])
        raise InputError(
            f"{where}: column {label} has a non-finite or non-numeric value "
            f"{_plain(table[label].iloc[bad])} in row {bad + 1}"
        )
    return col


def _positive(values, label: str, where: str, what: str) -> None:
    """InputError naming the column unless every value is > 0 (they are already finite)."""
    v = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if v.size and not np.all(v > 0):
        bad = int(np.flatnonzero(~(v > 0))[0])
        row = f" in row {bad + 1}" if v.size > 1 else ""
        raise InputError(
            f"{where}: column {label} must be a positive {what}, got {_plain(v[bad])}{row}"
        )


def _optional(table, label, default, where) -> np.ndarray:
    if label in table.columns:
        return _numeric(table, label, where)
    return np.full(len(table), float(default))


def _scalar(row: pd.Series, label: str, where: str, default=None) -> float:
    if label not in row.index:
        if default is None:
            raise InputError(f"{where}: missing mandatory column {label}")
        return float(default)
    if default is not None and isinstance(row[label], float) and np.isnan(row[label]):
        return float(default)  # an empty cell of an optional column (tables of mixed origin)
    try:
        v = float(row[label])
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: column {label} is not a number: {_plain(row[label])}") from exc
    if not np.isfinite(v):
        raise InputError(f"{where}: column {label} is not finite: {_plain(row[label])}")
    return v


#: columns that must be finite and > 0 wherever they are present (pixel size first)
_SIZE_COLUMNS = (
    ("rlnTomoTiltSeriesPixelSize", "pixel size in Å/px"),
    ("rlnTomoSizeX", "tomogram size in pixels"),
    ("rlnTomoSizeY", "tomogram size in pixels"),
    ("rlnTomoSizeZ", "tomogram size in pixels"),
)


def _check_positive_columns(table: pd.DataFrame, columns, where: str) -> None:
    """Fail early (on reading, not after hours of refinement) on a size that is not > 0."""
    for label, what in columns:
        if label in table.columns:
            _positive(_numeric(table, label, where), label, where, what)


def _tomogram_geometry(row: pd.Series, where: str) -> tuple[float, tuple[int, int, int]]:
    """``(rlnTomoTiltSeriesPixelSize Å/px, (rlnTomoSizeX, Y, Z) px)``, checked to be > 0."""
    px = _scalar(row, "rlnTomoTiltSeriesPixelSize", where)
    _positive(px, "rlnTomoTiltSeriesPixelSize", where, "pixel size in Å/px")
    size = []
    for a in "XYZ":
        v = _scalar(row, f"rlnTomoSize{a}", where)
        _positive(v, f"rlnTomoSize{a}", where, "tomogram size in pixels")
        size.append(int(v))
    return px, (size[0], size[1], size[2])


def _split_image_name(cell) -> tuple[str, int]:
    """``'7@dir/TS.mrcs'`` → ``('dir/TS.mrcs', 6)`` (1-based ``n@``); a plain path → index 0."""
    s = str(cell).strip()
    head, sep, tail = s.partition("@")
    if sep and head.strip().isdigit():
        n = int(head)
        if n < 1:
            raise ValueError(f"image index must be ≥ 1 in {s!r}")
        return tail, n - 1
    return s, 0


_JOB_RE = re.compile(r"/job\d{3}[^/]*/")


def _pipeline_post(path_text: str) -> str | None:
    """The part of a RELION pipeline path after its ``jobNNN/`` component, or ``None``.

    Mirrors ``decomposePipelineFileName`` (``filename.cpp``): the first ``/jobNNN…/`` after the
    first character.
    """
    m = _JOB_RE.search(path_text, 1) if len(path_text) > 1 else None
    if m is None:
        return None
    post = path_text[m.end() :]
    return post or None


def _vector_rows(table: pd.DataFrame, label: str, where: str) -> list[np.ndarray]:
    out = []
    for i, cell in enumerate(table[label].tolist()):
        try:
            out.append(parse_vector(cell))
        except ValueError as exc:
            raise InputError(f"{where}: column {label} row {i + 1}: {exc}") from exc
    return out


# --------------------------------------------------------------------------------------------
# optimisation set


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


# --------------------------------------------------------------------------------------------
# tomogram set


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

        projections = self._projections(name, table, px, image_size, tomo_size)

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
            defocus_slope=_scalar(row, "rlnTomoDefocusSlope", where_g, 1.0),
            voltage_kv=_scalar(row, "rlnVoltage", where_g),
            cs_mm=_scalar(row, "rlnSphericalAberration", where_g),
            amplitude_contrast=_scalar(row, "rlnAmplitudeContrast", where_g),
            bfactor_per_dose_ang2=_scalar(row, "rlnCtfBfactorPerElectronDose", where_g, 0.0),
            fractional_dose_e_per_ang2=frac,
            defocus_u_ang=_numeric(table, "rlnDefocusU", where_t),
            defocus_v_ang=_numeric(table, "rlnDefocusV", where_t),
            defocus_angle_deg=_numeric(table, "rlnDefocusAngle", where_t),
            ctf_scale=_optional(table, "rlnCtfScalefactor", 1.0, where_t),
            ctf_bfactor_ang2=_optional(table, "rlnCtfBfactor", 0.0, where_t),
            phase_shift_deg=_optional(table, "rlnPhaseShift", 0.0, where_t),
            pre_exposure_e_per_ang2=pre,
            image_files=files,
            deformation=self._deformation(name, row, table),
        )

    def _projections(self, name, table, px, image_size, tomo_size) -> np.ndarray:
        """The ``(F, 4, 4)`` projections of one per-tilt table.

        ``rlnTomoProjX..W`` when all four are present (RELION 4, WarpTools; RELION reads them in
        preference); otherwise ``rlnTomoXTilt/YTilt/ZRot`` (all three required once any of the
        five Euler/shift columns is present) and ``rlnTomoX/YShiftAngst`` (missing: 0 Å, with a
        warning). A table with none of these is read as identity projections (as RELION does)
        unless it has nominal tilt angles, i.e. was never aligned.
        """
        where_t = self._table_where(name)
        n = len(table)
        cols = set(table.columns)
        proj = [c for c in PROJ_LABELS if c in cols]
        if proj:
            missing = [c for c in PROJ_LABELS if c not in cols]
            if missing:
                raise InputError(
                    f"{where_t}: column(s) {', '.join(missing)} missing while "
                    f"{', '.join(proj)} present (the projection matrices need all of "
                    f"{'/'.join(PROJ_LABELS)})"
                )
            return self._matrices(table, where_t)
        present = [c for c in EULER_LABELS if c in cols]
        if not present:
            nominal = [c for c in NOMINAL_TILT_LABELS if c in cols]
            if nominal:
                raise InputError(
                    f"{where_t}: no alignment columns ({', '.join(TILT_ANGLE_LABELS)} or "
                    f"{'/'.join(PROJ_LABELS)}) but nominal angles ({', '.join(nominal)}): the "
                    f"tilt series has not been aligned"
                )
            log.warning(
                "%s: neither rlnTomoProjX/Y/Z/W nor rlnTomoXTilt/YTilt/ZRot; using identity "
                "projections (as RELION does)",
                where_t,
            )
            return np.broadcast_to(np.eye(4), (n, 4, 4)).copy()
        for lab in TILT_ANGLE_LABELS:
            if lab not in cols:
                raise InputError(
                    f"{where_t}: missing column {lab} while {', '.join(present)} present (the "
                    f"projections need all of {', '.join(TILT_ANGLE_LABELS)})"
                )
        no_shift = [c for c in TILT_SHIFT_LABELS if c not in cols]
        if no_shift:
            log.warning("%s: no column(s) %s; taking the shifts as 0 Å", where_t, ", ".join(no_shift))
        vals = {lab: _optional(table, lab, 0.0, where_t) for lab in EULER_LABELS}
        return geometry.projection_from_euler(
            *(vals[lab] for lab in EULER_LABELS),
            pixel_size_ang=px,
            image_size_px=image_size,
            tomo_size_px=tomo_size,
        )

    @staticmethod
    def _matrices(table, where_t) -> np.ndarray:
        """``rlnTomoProjX..W`` vector cells as ``(F, 4, 4)`` (rows X, Y, Z, W)."""
        p = np.zeros((len(table), 4, 4))
        for r, lab in enumerate(PROJ_LABELS):
            for j, v in enumerate(_vector_rows(table, lab, where_t)):
                if v.size != 4:
                    raise InputError(f"{where_t}: column {lab} row {j + 1} has {v.size} values, expected 4")
                p[j, r] = v
        if not np.all(np.isfinite(p)):
            raise InputError(f"{where_t}: non-finite value in rlnTomoProjX/Y/Z/W")
        return p

    def _deformation(self, name, row, table) -> Deformation | None:
        if not ("rlnTomoDeformationGridSizeX" in row.index and "rlnTomoDeformationGridSizeY" in row.index):
            return None
        where_g = f"{self.source} (tomogram {name})"
        where_t = self._table_where(name)
        kind = str(row.get("rlnTomoDeformationType", ""))
        has_coeffs = "rlnTomoDeformationCoefficients" in table.columns
        if kind not in DEFORMATION_TYPES:
            if not has_coeffs:
                # e.g. the STAR default 'empty' that RELION writes for tomograms without
                # particles (issue #905): no deformation
                log.warning(
                    "%s: rlnTomoDeformationType %r without coefficients; no deformation", where_g, kind
                )
                return None
            raise InputError(
                f"{where_g}: rlnTomoDeformationType is {kind!r}, "
                f"expected one of {', '.join(DEFORMATION_TYPES)}"
            )
        grid = (
            int(_scalar(row, "rlnTomoDeformationGridSizeX", where_g)),
            int(_scalar(row, "rlnTomoDeformationGridSizeY", where_g)),
        )
        if not has_coeffs:
            return None
        coeffs = _vector_rows(table, "rlnTomoDeformationCoefficients", where_t)
        sizes = {c.size for c in coeffs}
        if len(sizes) != 1:
            raise InputError(
                f"{where_t}: rlnTomoDeformationCoefficients have unequal lengths {sorted(sizes)}"
            )
        c = np.stack(coeffs)
        if not np.all(np.isfinite(c)):
            raise InputError(f"{where_t}: non-finite rlnTomoDeformationCoefficients")
        return Deformation(model=kind, grid_size=grid, coefficients=c)

    # -- modification ---------------------------------------------------------------------

    def with_tilt_series(
        self,
        name: str,
        projections=None,
        deformation: Deformation | None = None,
        *,
        keep_matrix: bool = False,
        image_size_px: tuple[int, int] | None = None,
    ) -> TomogramSet:
        """A copy with new per-tilt geometry (and/or deformation) for one tilt series.

        Args:
            name: ``rlnTomoName``.
            projections: ``(F, 4, 4)`` new matrices (file order) or ``None`` (keep). Written as
                ``rlnTomoXTilt/YTilt/ZRot/XShiftAngst/YShiftAngst`` via
                :func:`geometry.projection_to_euler`; ``rlnTomoProjX..W`` are dropped unless
                ``keep_matrix`` (then they are written as ``[a,b,c,d]`` cells, which RELION reads
                in preference: needed when the matrices are not rotations, e.g. magnification).
            deformation: new deformation or ``None`` (keep): global
                ``rlnTomoDeformationGridSizeX/Y``, ``rlnTomoDeformationType`` and per-tilt
                ``rlnTomoDeformationCoefficients``.
            image_size_px: tilt-image size ``(W, H)`` for the shift conversion; default: the size
                found by :meth:`tilt_series` (image headers when available).
        """
        out = copy.copy(self)
        out.global_table = self.global_table.copy()
        out.tilt_tables = dict(self.tilt_tables)
        out._image_sizes = dict(self._image_sizes)
        i, row = out._row(name)
        table = self.tilt_tables[name].copy()
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
            cols = geometry.projection_to_euler(
                p, pixel_size_ang=px, image_size_px=image_size_px, tomo_size_px=tomo_size
            )
            for lab in EULER_LABELS:
                table[lab] = np.asarray(cols[lab], dtype=np.float64)
            if keep_matrix:
                for r, lab in enumerate(PROJ_LABELS):
                    table[lab] = [list(p[j, r]) for j in range(n)]
            else:
                table = table.drop(columns=[c for c in PROJ_LABELS if c in table.columns])
        if deformation is not None:
            c = np.asarray(deformation.coefficients, dtype=np.float64)
            if c.shape[0] != n:
                raise ValueError(f"{name}: deformation has {c.shape[0]} rows, expected {n}")
            g = out.global_table
            for lab, val in (
                ("rlnTomoDeformationGridSizeX", int(deformation.grid_size[0])),
                ("rlnTomoDeformationGridSizeY", int(deformation.grid_size[1])),
                ("rlnTomoDeformationType", str(deformation.model)),
            ):
                if lab not in g.columns:
                    g[lab] = [val] * len(g)
                else:
                    col = g[lab].tolist()
                    col[i] = val
                    g[lab] = col
            table["rlnTomoDeformationCoefficients"] = [list(c[j]) for j in range(n)]
        out.tilt_tables[name] = table
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
        g, tilt_tables = _complete_deformations(self.global_table.copy(), dict(self.tilt_tables))
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


def _complete_deformations(g: pd.DataFrame, tables: dict) -> tuple[pd.DataFrame, dict]:
    """Make the deformation columns valid for every tomogram before writing (RELION #905).

    RELION decides per *set* whether deformations exist (both ``rlnTomoDeformationGridSizeX/Y``
    columns present) and then needs, for every tomogram, a valid ``rlnTomoDeformationType`` and
    per-tilt ``rlnTomoDeformationCoefficients`` (else it fails with "illegal deformation type
    'empty'", or dereferences a missing deformation). A tomogram without a (valid) deformation
    therefore gets the model and grid of the first tomogram that has one (or keeps its own valid
    model and grid) and zero coefficients — the identity. If no tomogram has coefficients, the
    global deformation columns are dropped.
    """
    if not all(lab in g.columns for lab in DEFORMATION_LABELS[:2]):
        return g, tables
    key = "rlnTomoDeformationCoefficients"
    names = g["rlnTomoName"].astype(str).tolist()
    if DEFORMATION_LABELS[2] in g.columns:
        kinds = g[DEFORMATION_LABELS[2]].astype(str).tolist()
    else:
        kinds = [""] * len(g)

    def grid_of(i):
        try:
            gx = float(g[DEFORMATION_LABELS[0]].iloc[i])
            gy = float(g[DEFORMATION_LABELS[1]].iloc[i])
        except (TypeError, ValueError):
            return None
        return (int(gx), int(gy)) if np.isfinite(gx) and np.isfinite(gy) and gx >= 1 and gy >= 1 else None

    def has_coeffs(name):
        t = tables.get(name)
        return t is not None and key in t.columns and not t[key].isna().any()

    setups = [(k, grid_of(i)) if k in DEFORMATION_TYPES and grid_of(i) is not None else None
              for i, k in enumerate(kinds)]
    ref = next((i for i, n in enumerate(names) if setups[i] is not None and has_coeffs(n)), None)
    if ref is None:
        log.warning("deformation columns without coefficients in any tomogram; dropping them")
        g = g.drop(columns=[c for c in DEFORMATION_LABELS if c in g.columns])
        for n in names:
            if n in tables and key in tables[n].columns:
                tables[n] = tables[n].drop(columns=[key])
        return g, tables
    for i, n in enumerate(names):
        if setups[i] is not None and has_coeffs(n):
            continue
        if setups[i] is None:
            setups[i] = setups[ref]
        if n in tables:
            t = tables[n].copy()
            m = deformation_coefficient_count(*setups[i])
            t[key] = [[0.0] * m for _ in range(len(t))]
            tables[n] = t
        log.info("%s: no deformation; writing a zero %s deformation (RELION needs one)", n, setups[i][0])
    g[DEFORMATION_LABELS[0]] = np.asarray([s[1][0] for s in setups], dtype=np.int64)
    g[DEFORMATION_LABELS[1]] = np.asarray([s[1][1] for s in setups], dtype=np.int64)
    g[DEFORMATION_LABELS[2]] = pd.Series([s[0] for s in setups], index=g.index, dtype=object)
    return g, tables


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
    return TomogramSet(
        global_table=g,
        tilt_tables=tables,
        source=p,
        project_dir=pdir,
        layout=layout,
        tilt_files=files,
        tilt_file_entries=entries,
        extra_blocks=extra,
    )


# --------------------------------------------------------------------------------------------
# particles


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

        if "rlnRandomSubset" in rows.columns:
            half = _numeric(rows, "rlnRandomSubset", self._where).astype(np.int64)
            bad = sorted(set(half.tolist()) - {1, 2})
            if bad:
                raise InputError(f"{self._where}: rlnRandomSubset must be 1 or 2, found {bad}")
        elif require_half_set and n > 0:
            raise InputError(f"{self._where}: missing mandatory column rlnRandomSubset")
        else:
            half = np.ones(n, dtype=np.int64)

        traj = None
        if trajectories is not None and n > 0:
            traj = np.zeros((n, ts.n_tilts, 3))
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
        return ParticleData(names=names, positions_px=pos, rotations=rot, half_set=half, trajectories_px=traj)

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


# --------------------------------------------------------------------------------------------
# trajectories (motion.star)


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


# --------------------------------------------------------------------------------------------
# building a complete set from records (simulator)


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

    def rel(path: Path) -> str:
        return _relative_to(path, project)
    tilt_tables_extra = dict(tilt_tables_extra or {})
    particles_extra_columns = dict(particles_extra_columns or {})

    any_bf = any(ts.bfactor_per_dose_ang2 != 0 for ts in tilt_series)
    # RELION needs a valid deformation for every tomogram once one has it (#905): zero fill
    ref_def = next((ts.deformation for ts in tilt_series if ts.deformation is not None), None)
    if ref_def is not None:
        m = deformation_coefficient_count(ref_def.model, ref_def.grid_size)
        grid = tuple(ref_def.grid_size)
        tilt_series = [
            ts if ts.deformation is not None
            else ts.replace(deformation=Deformation(ref_def.model, grid, np.zeros((ts.n_tilts, m))))
            for ts in tilt_series
        ]
    rows = []
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
            "rlnTomoTiltSeriesStarFile": rel(out / "tilt_series" / f"{ts.name}.star"),
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
        write_star(
            out / "tilt_series" / f"{ts.name}.star",
            {ts.name: _tilt_table(ts, project, tilt_tables_extra.get(ts.name))},
        )
    g = pd.DataFrame(rows)
    for lab in ("rlnTomoDefocusSlope",):
        if lab in g.columns:
            g[lab] = g[lab].fillna(1.0)
    write_star(out / "tomograms.star", {"global": g})

    # particles
    optics_keys: dict[tuple, int] = {}
    for ts in tilt_series:
        k = (ts.pixel_size_ang, ts.voltage_kv, ts.cs_mm, ts.amplitude_contrast)
        optics_keys.setdefault(k, len(optics_keys) + 1)
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
            for k, gid in optics_keys.items()
        ]
    )
    frames = []
    traj_out: dict[str, np.ndarray] = {}
    for ts in tilt_series:
        pdata = particles.get(ts.name)
        if pdata is None or pdata.n_particles == 0:
            continue
        gid = optics_keys[(ts.pixel_size_ang, ts.voltage_kv, ts.cs_mm, ts.amplitude_contrast)]
        centred = geometry.positions_to_centred_ang(
            pdata.positions_px, pixel_size_ang=ts.pixel_size_ang, tomo_size_px=ts.tomo_size_px
        )
        rot, tilt, psi = geometry.matrix_to_euler_zyz(np.asarray(pdata.rotations))
        n = pdata.n_particles
        df = pd.DataFrame(
            {
                "rlnTomoName": [ts.name] * n,
                "rlnTomoParticleName": list(pdata.names),
                "rlnCenteredCoordinateXAngst": centred[:, 0],
                "rlnCenteredCoordinateYAngst": centred[:, 1],
                "rlnCenteredCoordinateZAngst": centred[:, 2],
                "rlnAngleRot": rot,
                "rlnAngleTilt": tilt,
                "rlnAnglePsi": psi,
                "rlnOriginXAngst": np.zeros(n),
                "rlnOriginYAngst": np.zeros(n),
                "rlnOriginZAngst": np.zeros(n),
                "rlnOpticsGroup": np.full(n, gid, dtype=np.int64),
                "rlnRandomSubset": np.asarray(pdata.half_set, dtype=np.int64),
                "rlnClassNumber": np.ones(n, dtype=np.int64),
            }
        )
        extra = particles_extra_columns.get(ts.name)
        if extra is not None:
            if len(extra) != n:
                raise ValueError(f"{ts.name}: particles_extra_columns has {len(extra)} rows, expected {n}")
            for c in extra.columns:
                if c not in df.columns:
                    df[c] = extra[c].to_numpy()
        frames.append(df)
        if trajectories is None and pdata.trajectories_px is not None:
            tr = np.asarray(pdata.trajectories_px, dtype=np.float64) * ts.pixel_size_ang
            for k, nm in enumerate(pdata.names):
                traj_out[nm] = tr[k]
    ptable = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["rlnTomoName", "rlnTomoParticleName", *CENTRED_LABELS])
    )
    write_star(
        out / "particles.star",
        {"general": {"rlnTomoSubTomosAre2DStacks": 1}, "optics": optics, "particles": ptable},
    )

    if trajectories is not None:
        traj_out = {str(k): np.asarray(v) for k, v in trajectories.items()}
    kv = {
        "rlnTomoParticlesFile": rel(out / "particles.star"),
        "rlnTomoTomogramsFile": rel(out / "tomograms.star"),
    }
    if traj_out:
        write_trajectories(out / "motion.star", traj_out)
        kv["rlnTomoTrajectoriesFile"] = rel(out / "motion.star")
    for key, value in (references or {}).items():
        if value is None:
            continue
        label = _OPT_KEYS.get(key, key)
        if label not in _OPT_KEYS.values():
            raise ValueError(f"unknown reference key {key!r}; use one of {list(_OPT_KEYS)[4:]}")
        vp = Path(str(value))
        kv[label] = rel(vp) if vp.is_absolute() else vp.as_posix()
    return write_star(out / "optimisation_set.star", {"": kv})


def _tilt_table(ts: TiltSeriesData, project: Path, extra: pd.DataFrame | None) -> pd.DataFrame:
    n = ts.n_tilts
    if ts.image_files:
        if len(ts.image_files) != n:
            raise ValueError(f"{ts.name}: {len(ts.image_files)} image files for {n} tilts")
        names = [f"{k + 1}@{_relative_to(_resolve(f, project), project)}" for f, k in ts.image_files]
    else:
        names = [f"{j + 1}@tilt_series/{ts.name}.mrcs" for j in range(n)]

    def per_tilt(a, default):
        a = np.asarray(a, dtype=np.float64)
        return a if a.size == n else np.full(n, float(default))

    cols = {
        "rlnMicrographName": names,
        "rlnMicrographPreExposure": per_tilt(ts.pre_exposure_e_per_ang2, 0.0),
        "rlnDefocusU": per_tilt(ts.defocus_u_ang, 0.0),
        "rlnDefocusV": per_tilt(ts.defocus_v_ang, 0.0),
        "rlnDefocusAngle": per_tilt(ts.defocus_angle_deg, 0.0),
        "rlnCtfScalefactor": per_tilt(ts.ctf_scale, 1.0),
    }
    bf = per_tilt(ts.ctf_bfactor_ang2, 0.0)
    if np.any(bf != 0):
        cols["rlnCtfBfactor"] = bf
    ph = per_tilt(ts.phase_shift_deg, 0.0)
    if np.any(ph != 0):
        cols["rlnPhaseShift"] = ph
    eul = geometry.projection_to_euler(
        ts.projections,
        pixel_size_ang=ts.pixel_size_ang,
        image_size_px=ts.image_size_px,
        tomo_size_px=ts.tomo_size_px,
    )
    for lab in EULER_LABELS:
        cols[lab] = np.asarray(eul[lab], dtype=np.float64)
    if ts.deformation is not None:
        c = np.asarray(ts.deformation.coefficients, dtype=np.float64)
        cols["rlnTomoDeformationCoefficients"] = [list(c[j]) for j in range(n)]
    df = pd.DataFrame(cols)
    if extra is not None:
        if len(extra) != n:
            raise ValueError(f"{ts.name}: tilt_tables_extra has {len(extra)} rows, expected {n}")
        for c in extra.columns:
            if c not in df.columns:
                df[c] = extra[c].to_numpy()
    return df
