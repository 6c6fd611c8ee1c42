"""Per-tilt tables (``tilt_series/<name>.star``): the geometry and deformation they encode.

Reading: projections from ``rlnTomoProjX..W`` or from the Euler/shift columns, deformations
from ``rlnTomoDeformationCoefficients`` and the global grid/type columns. Writing: the one
encoding of projections and deformations shared by every writer (a refined set written back
by :meth:`TomogramSet.with_tilt_series` and a set built from records by
:func:`write_new_optimisation_set`), and the completion of deformations RELION needs (#905).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from polish3d import geometry
from polish3d.errors import InputError
from polish3d.io.relion._common import (
    DEFORMATION_LABELS,
    DEFORMATION_TYPES,
    EULER_LABELS,
    NOMINAL_TILT_LABELS,
    PROJ_LABELS,
    TILT_ANGLE_LABELS,
    TILT_SHIFT_LABELS,
    _optional,
    _relative_to,
    _resolve,
    _scalar,
    _vector_rows,
    deformation_coefficient_count,
)
from polish3d.model import Deformation, TiltSeriesData

log = logging.getLogger(__name__)

COEFFICIENTS = "rlnTomoDeformationCoefficients"

# --------------------------------------------------------------------------------------------
# reading


def read_projections(table: pd.DataFrame, where: str, **frame) -> np.ndarray:
    """The ``(F, 4, 4)`` projections of one per-tilt table.

    ``rlnTomoProjX..W`` when all four are present (RELION 4, WarpTools; RELION reads them in
    preference); otherwise ``rlnTomoXTilt/YTilt/ZRot`` (all three required once any of the five
    Euler/shift columns is present) and ``rlnTomoX/YShiftAngst`` (missing: 0 Å, with a warning).
    A table with none of these is read as identity projections (as RELION does) unless it has
    nominal tilt angles, i.e. was never aligned.

    Args:
        table: the per-tilt table; ``where``: its file and block, for messages.
        frame: ``pixel_size_ang``, ``image_size_px``, ``tomo_size_px`` (for the Euler columns).

    Raises:
        InputError: naming the file, block and missing column.
    """
    cols = set(table.columns)
    proj = [c for c in PROJ_LABELS if c in cols]
    if proj:
        missing = [c for c in PROJ_LABELS if c not in cols]
        if missing:
            raise InputError(
                f"{where}: column(s) {', '.join(missing)} missing while {', '.join(proj)} present "
                f"(the projection matrices need all of {'/'.join(PROJ_LABELS)})"
            )
        return _matrices(table, where)
    present = [c for c in EULER_LABELS if c in cols]
    if not present:
        nominal = [c for c in NOMINAL_TILT_LABELS if c in cols]
        if nominal:
            raise InputError(
                f"{where}: no alignment columns ({', '.join(TILT_ANGLE_LABELS)} or "
                f"{'/'.join(PROJ_LABELS)}) but nominal angles ({', '.join(nominal)}): the tilt "
                f"series has not been aligned"
            )
        log.warning(
            "%s: neither rlnTomoProjX/Y/Z/W nor rlnTomoXTilt/YTilt/ZRot; using identity "
            "projections (as RELION does)",
            where,
        )
        return np.broadcast_to(np.eye(4), (len(table), 4, 4)).copy()
    for lab in TILT_ANGLE_LABELS:
        if lab not in cols:
            raise InputError(
                f"{where}: missing column {lab} while {', '.join(present)} present (the "
                f"projections need all of {', '.join(TILT_ANGLE_LABELS)})"
            )
    no_shift = [c for c in TILT_SHIFT_LABELS if c not in cols]
    if no_shift:
        log.warning("%s: no column(s) %s; taking the shifts as 0 Å", where, ", ".join(no_shift))
    vals = [_optional(table, lab, 0.0, where) for lab in EULER_LABELS]
    return geometry.projection_from_euler(*vals, **frame)


def _matrices(table: pd.DataFrame, where: str) -> np.ndarray:
    """``rlnTomoProjX..W`` vector cells as ``(F, 4, 4)`` (rows X, Y, Z, W)."""
    p = np.zeros((len(table), 4, 4))
    for r, lab in enumerate(PROJ_LABELS):
        for j, v in enumerate(_vector_rows(table, lab, where)):
            if v.size != 4:
                raise InputError(f"{where}: column {lab} row {j + 1} has {v.size} values, expected 4")
            p[j, r] = v
    if not np.all(np.isfinite(p)):
        raise InputError(f"{where}: non-finite value in rlnTomoProjX/Y/Z/W")
    return p


def read_deformation(row: pd.Series, table: pd.DataFrame, where_g: str, where_t: str) -> Deformation | None:
    """The deformation of one tilt series: global ``row`` (grid, type) and per-tilt ``table``."""
    if not (DEFORMATION_LABELS[0] in row.index and DEFORMATION_LABELS[1] in row.index):
        return None
    kind = str(row.get(DEFORMATION_LABELS[2], ""))
    has_coeffs = COEFFICIENTS in table.columns
    if kind not in DEFORMATION_TYPES:
        if not has_coeffs:
            # e.g. the STAR default 'empty' that RELION writes for tomograms without
            # particles (issue #905): no deformation
            log.warning("%s: rlnTomoDeformationType %r without coefficients; no deformation", where_g, kind)
            return None
        raise InputError(
            f"{where_g}: rlnTomoDeformationType is {kind!r}, expected one of {', '.join(DEFORMATION_TYPES)}"
        )
    grid = tuple(int(_scalar(row, lab, where_g)) for lab in DEFORMATION_LABELS[:2])
    if not has_coeffs:
        return None
    coeffs = _vector_rows(table, COEFFICIENTS, where_t)
    sizes = {c.size for c in coeffs}
    if len(sizes) != 1:
        raise InputError(f"{where_t}: rlnTomoDeformationCoefficients have unequal lengths {sorted(sizes)}")
    c = np.stack(coeffs)
    if not np.all(np.isfinite(c)):
        raise InputError(f"{where_t}: non-finite rlnTomoDeformationCoefficients")
    return Deformation(model=kind, grid_size=grid, coefficients=c)


# --------------------------------------------------------------------------------------------
# writing


def encode_projections(
    table: pd.DataFrame, projections, *, keep_matrix: bool | None = None, **frame
) -> pd.DataFrame:
    """``table`` with the projections written as ``rlnTomoXTilt/YTilt/ZRot/X/YShiftAngst``.

    Via :func:`geometry.projection_to_euler` (``frame``: ``pixel_size_ang``, ``image_size_px``,
    ``tomo_size_px``). ``rlnTomoProjX..W`` are written too (as ``[a,b,c,d]`` cells, which RELION
    reads in preference) when ``keep_matrix``, or, with ``keep_matrix=None``, when some matrix
    is not a rotation (magnification, stretch, skew: the Euler columns cannot hold it); else they
    are dropped. New columns are appended; existing ones keep their place.
    """
    p = np.asarray(projections, dtype=np.float64)
    n = len(table)
    if p.shape != (n, 4, 4):
        raise ValueError(f"projections must have shape ({n}, 4, 4), got {p.shape}")
    if keep_matrix is None:
        a = p[:, :3, :3]
        keep_matrix = not np.allclose(a @ np.swapaxes(a, 1, 2), np.eye(3), atol=1e-6)
    out = table.copy()
    cols = geometry.projection_to_euler(p, **frame)
    for lab in EULER_LABELS:
        out[lab] = np.asarray(cols[lab], dtype=np.float64)
    if keep_matrix:
        for r, lab in enumerate(PROJ_LABELS):
            out[lab] = [list(p[j, r]) for j in range(n)]
    else:
        out = out.drop(columns=[c for c in PROJ_LABELS if c in out.columns])
    return out


def encode_deformation(
    global_table: pd.DataFrame, row: int, table: pd.DataFrame, deformation: Deformation
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Copies of the global table (grid and type of row ``row``) and the per-tilt table
    (``rlnTomoDeformationCoefficients``) with ``deformation`` written in."""
    c = np.asarray(deformation.coefficients, dtype=np.float64)
    if c.shape[0] != len(table):
        raise ValueError(f"deformation has {c.shape[0]} rows, expected {len(table)}")
    g = global_table.copy()
    values = (int(deformation.grid_size[0]), int(deformation.grid_size[1]), str(deformation.model))
    for lab, val in zip(DEFORMATION_LABELS, values, strict=True):
        if lab not in g.columns:
            g[lab] = [val] * len(g)
        else:
            col = g[lab].tolist()
            col[row] = val
            g[lab] = col
    t = table.copy()
    t[COEFFICIENTS] = [list(c[j]) for j in range(len(t))]
    return g, t


def complete_deformations(g: pd.DataFrame, tables: dict) -> tuple[pd.DataFrame, dict]:
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
    names = g["rlnTomoName"].astype(str).tolist()
    has_kind = DEFORMATION_LABELS[2] in g.columns
    kinds = g[DEFORMATION_LABELS[2]].astype(str).tolist() if has_kind else [""] * len(g)

    def grid_of(i):
        try:
            gx, gy = float(g[DEFORMATION_LABELS[0]].iloc[i]), float(g[DEFORMATION_LABELS[1]].iloc[i])
        except (TypeError, ValueError):
            return None
        return (int(gx), int(gy)) if np.isfinite(gx) and np.isfinite(gy) and gx >= 1 and gy >= 1 else None

    def has_coeffs(name):
        t = tables.get(name)
        return t is not None and COEFFICIENTS in t.columns and not t[COEFFICIENTS].isna().any()

    setups = [(k, grid_of(i)) if k in DEFORMATION_TYPES and grid_of(i) is not None else None
              for i, k in enumerate(kinds)]
    ref = next((i for i, n in enumerate(names) if setups[i] is not None and has_coeffs(n)), None)
    if ref is None:
        log.warning("deformation columns without coefficients in any tomogram; dropping them")
        g = g.drop(columns=[c for c in DEFORMATION_LABELS if c in g.columns])
        for n in names:
            if n in tables and COEFFICIENTS in tables[n].columns:
                tables[n] = tables[n].drop(columns=[COEFFICIENTS])
        return g, tables
    for i, n in enumerate(names):
        if setups[i] is not None and has_coeffs(n):
            continue
        if setups[i] is None:
            setups[i] = setups[ref]
        if n in tables:
            t = tables[n].copy()
            m = deformation_coefficient_count(*setups[i])
            t[COEFFICIENTS] = [[0.0] * m for _ in range(len(t))]
            tables[n] = t
        log.info("%s: no deformation; writing a zero %s deformation (RELION needs one)", n, setups[i][0])
    g[DEFORMATION_LABELS[0]] = np.asarray([s[1][0] for s in setups], dtype=np.int64)
    g[DEFORMATION_LABELS[1]] = np.asarray([s[1][1] for s in setups], dtype=np.int64)
    g[DEFORMATION_LABELS[2]] = pd.Series([s[0] for s in setups], index=g.index, dtype=object)
    return g, tables


def new_tilt_table(ts: TiltSeriesData, project: Path, extra: pd.DataFrame | None) -> pd.DataFrame:
    """The per-tilt table of a tilt-series record: images, dose, CTF, geometry, deformation.

    ``extra`` (``F`` rows) adds columns; it does not override those written here.
    """
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
    for label, values in (("rlnCtfBfactor", ts.ctf_bfactor_ang2), ("rlnPhaseShift", ts.phase_shift_deg)):
        v = per_tilt(values, 0.0)
        if np.any(v != 0):
            cols[label] = v
    df = encode_projections(
        pd.DataFrame(cols),
        ts.projections,
        pixel_size_ang=ts.pixel_size_ang,
        image_size_px=ts.image_size_px,
        tomo_size_px=ts.tomo_size_px,
    )
    if ts.deformation is not None:
        c = np.asarray(ts.deformation.coefficients, dtype=np.float64)
        df[COEFFICIENTS] = [list(c[j]) for j in range(n)]
    if extra is not None:
        if len(extra) != n:
            raise ValueError(f"{ts.name}: tilt_tables_extra has {len(extra)} rows, expected {n}")
        for c in extra.columns:
            if c not in df.columns:
                df[c] = extra[c].to_numpy()
    return df
