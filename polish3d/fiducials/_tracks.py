"""Bead tracks from any table: column names matched by role, values checked (``normalise_tracks``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from polish3d.errors import InputError

__all__ = ["OBJECT_COLUMNS", "TRACK_COLUMNS", "accepted_track_columns", "normalise_tracks"]


# accepted track column names per role, by priority, after _column_key (lower case, an ``rln``
# prefix and the characters ``_ - . space`` removed)
TRACK_COLUMNS = {
    "bead": ("bead", "beadid", "beadindex", "contour", "contourid", "contourindex", "fiducial",
             "fiducialid", "fid", "track", "trackid"),
    "tilt": ("tilt", "tiltindex", "tiltidx", "tiltrow", "view", "viewindex", "section", "z"),
    "x": ("x", "xpx", "xpixel", "xpixels", "xcoord", "xcoordinate", "coordinatex", "posx",
          "positionx"),
    "y": ("y", "ypx", "ypixel", "ypixels", "ycoord", "ycoordinate", "coordinatey", "posy",
          "positiony"),
}
OBJECT_COLUMNS = ("object", "objectid", "obj")  # IMOD objects: contour ids restart per object


def _column_key(name) -> str:
    key = str(name).strip().lower()
    for ch in "_-. ":
        key = key.replace(ch, "")
    return key[3:] if key.startswith("rln") and len(key) > 3 else key


def _is_number(text) -> bool:
    try:
        float(str(text).split(".")[0] if str(text).count(".") > 1 else str(text))
    except ValueError:
        return False
    return True


def accepted_track_columns() -> str:
    """One line per role listing the accepted column names (for error messages)."""
    return "; ".join(f"{role}: {', '.join(names)}" for role, names in TRACK_COLUMNS.items())


def normalise_tracks(tracks, source: str = "tracks") -> pd.DataFrame:
    """Tracks as a DataFrame with int ``bead``, int ``tilt`` and float ``x``, ``y`` (px).

    Accepts a DataFrame, a dict of arrays or an ``(N, 4)`` array ``(bead, tilt, x, y)``. Column
    names are matched case-insensitively, without an ``rln`` prefix and ignoring ``_ - .``
    and spaces, against :data:`TRACK_COLUMNS` (e.g. ``bead_id``/``contour``, ``tilt_row``/
    ``view``/``z``, ``x_px``/``y_px``); with a ``contour`` column, an ``object`` column (IMOD)
    makes each (object, contour) pair one bead.

    Args:
        tracks: the table.
        source: what to name in error messages (the file name).

    Raises:
        InputError: naming the source, column and data row (1-based, header not counted) of
            a missing column, a value that is not a number, an empty cell or a tilt index or
            bead id that is not an integer.
    """
    if isinstance(tracks, pd.DataFrame):
        df = tracks
    elif isinstance(tracks, dict):
        df = pd.DataFrame(tracks)
    else:
        a = np.asarray(tracks)
        if a.ndim != 2 or a.shape[1] != 4:
            raise InputError(f"{source}: expected columns bead, tilt, x, y")
        df = pd.DataFrame(a, columns=["bead", "tilt", "x", "y"])
    keys: dict[str, list] = {}
    for c in df.columns:
        keys.setdefault(_column_key(c), []).append(c)
    chosen = {}
    for role, names in TRACK_COLUMNS.items():
        for nm in names:
            if nm in keys:
                chosen[role] = keys[nm][0]
                break
    missing = [r for r in TRACK_COLUMNS if r not in chosen]
    if missing:
        have = ", ".join(str(c) for c in df.columns) or "none"
        hint = ""
        if len(df.columns) and all(_is_number(c) for c in df.columns):
            hint = (" The first line looks like data: add a header line naming the columns "
                    "(e.g. bead,tilt,x,y).")
        raise InputError(
            f"{source}: no column for {', '.join(missing)} (columns found: {have}).{hint} "
            f"Accepted names (case-insensitive, '_' ignored): {accepted_track_columns()}")

    def numbers(role):
        col = df[chosen[role]]
        vals = pd.to_numeric(col, errors="coerce").to_numpy(float)
        bad = ~np.isfinite(vals)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raw = col.iloc[r]
            what = "is empty" if pd.isna(raw) or str(raw).strip() == "" else \
                f"{raw!r} is not a finite number"
            raise InputError(f"{source}: column {chosen[role]!r} ({role}), data row {r + 1}: "
                             f"{what} ({int(bad.sum())} such row(s))")
        return vals

    def integers(role, what):
        vals = numbers(role)
        frac = np.abs(vals - np.rint(vals)) > 1e-6
        if frac.any():
            r = int(np.flatnonzero(frac)[0])
            raise InputError(f"{source}: column {chosen[role]!r}, data row {r + 1}: {what} "
                             f"{vals[r]:g} must be an integer")
        return np.rint(vals).astype(np.int64)

    tilt = integers("tilt", "the tilt index (0-based view number, not an angle)")
    bead = integers("bead", "the bead id")
    if _column_key(chosen["bead"]).startswith("contour"):
        obj = next((keys[k][0] for k in OBJECT_COLUMNS if k in keys), None)
        if obj is not None:
            chosen["object"] = obj
            ob = integers("object", "the object number")
            bead = pd.factorize(pd.Series(list(zip(ob, bead, strict=True))))[0].astype(np.int64)
    return pd.DataFrame({"bead": bead, "tilt": tilt, "x": numbers("x"), "y": numbers("y")})
