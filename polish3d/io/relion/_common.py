"""Paths and columns: RELION labels, path resolution, and checked access to table columns.

Every helper that reads a value raises :class:`~polish3d.errors.InputError` naming the file,
block and column (``where``) and what was expected; cell values are printed plainly.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from polish3d.errors import InputError
from polish3d.io.star import parse_vector
from polish3d.model import deformation_coefficient_count  # noqa: F401  (re-exported)

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





def _resolve(path_text, project_dir: Path | None, referrer: Path | None = None) -> Path:
    """Resolve a path from a STAR file as RELION does (see the :mod:`polish3d.io.relion` docstring)."""
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
