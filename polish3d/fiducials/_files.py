"""Fiducial inputs and outputs: bead tracks, IMOD ``.tlt``/``.xf``, bead CSV, RELION STARs.

Pixel frames: polish3d puts pixel centres on integers (0-based). IMOD model coordinates put the
centre of pixel ``i`` at ``i + 0.5`` (sections at integers), so IMOD ``(x, y)`` − 0.5 is the
polish3d position; tracks in CSV/STAR tables are taken as polish3d positions.

IMOD ``.xf`` convention implemented (one line per tilt ``A11 A12 A21 A22 DX DY``): the transform
that maps a raw tilt image to the aligned image, about the image centre ``c``,
``u_al = A · (u_raw − c) + D + c``, ``c = (W/2, H/2)`` in IMOD coordinates = ``((W−1)/2,
(H−1)/2)`` in polish3d pixels. In the aligned image the tilt axis is vertical through ``c`` and
a bead at ``X`` (tomogram voxels) is at ``[Ry(θ) (X − ⌊tomo/2⌋)]_xy + c``. With the fitted
``u_raw = M · [Ry(θ) (X − ⌊tomo/2⌋)]_xy + t`` for beads in the specimen mid-plane
(``M = s R2(ψ) [[a, 0], [b, 1]]`` with tiltalign's X-stretch and skew in ``a, b``; ``M = s
R2(ψ)`` without them) this gives ``A = M⁻¹`` and ``D = M⁻¹ (c − t)``. Off the mid-plane a
stretched specimen needs tiltalign's z-factors; :func:`geometry_from_xf` rebuilds the exact
matrices from the ``.xf`` and ``.tlt``. For even image sizes this is the inverse of RELION 5's IMOD importer
(``shift = −A⁻¹ D − ½`` px, ``ZRot`` = rotation of ``A⁻¹``, ``YTilt`` = ``.tlt``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from einops import rearrange

from polish3d.errors import InputError
from polish3d.fiducials._align import FiducialResult, projection_matrices
from polish3d.fiducials._tracks import normalise_tracks
from polish3d.io.star import atomic_write_text

__all__ = [
    "geometry_from_xf",
    "read_nominal_tilts_star",
    "read_tilt_angles",
    "read_tracks",
    "read_xf",
    "write_beads_csv",
    "write_projections_star",
    "write_tlt",
    "write_xf",
    "xf_from_result",
]

IMOD_PIXEL_OFFSET = 0.5  # IMOD model coordinate of the centre of pixel 0


def read_tracks(path) -> pd.DataFrame:
    """Bead tracks ``bead, tilt, x, y`` (polish3d pixels) from an IMOD model or a table.

    * ``.fid``/``.mod``: IMOD fiducial model (needs the optional package ``imodmodel``,
      ``pip install polish3d[imod]``): one bead per contour, ``tilt`` = section ``z``,
      ``x, y`` shifted by −0.5 px into the polish3d frame.
    * ``.csv``/``.tsv``/``.txt``: table with columns ``bead, tilt, x, y``, or the names other
      tools write (``bead_id``/``contour``, ``tilt_row``/``view``/``z``, ``x_px``/``y_px``, …;
      see :data:`~polish3d.fiducials._tracks.TRACK_COLUMNS`); extra columns are ignored.
    * ``.star``: a loop block with such columns (``rln`` prefixes allowed).

    Raises:
        InputError: naming the file, the column and the data row of what cannot be read.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"tracks file not found: {p}")
    suffix = p.suffix.lower()
    if suffix in (".fid", ".mod"):
        try:
            import imodmodel
        except ImportError:
            raise InputError(
                f"{p}: reading IMOD models needs the optional package imodmodel "
                "(pip install imodmodel, or polish3d[imod]); or give a CSV/STAR table "
                "with columns bead, tilt, x, y"
            ) from None
        try:
            df = imodmodel.read(p)
        except Exception as exc:  # the reader raises many kinds of errors
            raise InputError(f"cannot read IMOD model {p}: {type(exc).__name__}: {exc}") from exc
        key = df["object_id"].astype(np.int64) * 1_000_000 + df["contour_id"].astype(np.int64)
        bead = pd.factorize(key)[0]
        return normalise_tracks(pd.DataFrame({
            "bead": bead, "tilt": np.rint(df["z"].to_numpy(float)).astype(int),
            "x": df["x"].to_numpy(float) - IMOD_PIXEL_OFFSET,
            "y": df["y"].to_numpy(float) - IMOD_PIXEL_OFFSET,
        }), source=str(p))
    if suffix == ".star":
        from polish3d.io.star import read_star

        loops = [b for b in read_star(p).values() if isinstance(b, pd.DataFrame)]
        if not loops:
            raise InputError(f"{p}: no loop table with bead, tilt, x, y")
        return normalise_tracks(loops[0], source=str(p))
    sep = "\t" if suffix == ".tsv" else None
    try:
        df = pd.read_csv(p, sep=sep, engine="python", comment="#")
    except Exception as exc:
        raise InputError(f"cannot read tracks table {p}: {exc}") from exc
    return normalise_tracks(df, source=str(p))


def read_tilt_angles(path) -> np.ndarray:
    """Tilt angles (degrees) from an IMOD ``.tlt`` (one per line) or a tilt-series STAR."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"tilt-angle file not found: {p}")
    if p.suffix.lower() == ".star":
        return read_nominal_tilts_star(p)
    try:
        return np.loadtxt(p, dtype=float, ndmin=1).ravel()
    except ValueError as exc:
        raise InputError(f"{p}: expected one tilt angle per line ({exc})") from exc


def read_nominal_tilts_star(path, table: pd.DataFrame | None = None) -> np.ndarray:
    """``rlnTomoNominalStageTiltAngle`` (else ``rlnTomoYTilt``) of a per-tilt STAR table."""
    if table is None:
        from polish3d.io.star import read_star

        loops = [b for b in read_star(path).values() if isinstance(b, pd.DataFrame)]
        if not loops:
            raise InputError(f"{path}: no per-tilt loop table")
        table = loops[0]
    for lab in ("rlnTomoNominalStageTiltAngle", "rlnTomoYTilt"):
        if lab in table.columns:
            return table[lab].to_numpy(float)
    raise InputError(f"{path}: no column rlnTomoNominalStageTiltAngle or rlnTomoYTilt")


def _xf_centre(image_size_px) -> np.ndarray:
    w, h = image_size_px
    return np.array([(w - 1) / 2.0, (h - 1) / 2.0])


def _inplane_matrices(rotation_deg, magnification, tilt_deg, stretch=None, skew_deg=None):
    """``M = s R2(ψ) [[a, 0], [b, 1]]``: raw image ← aligned image for the specimen mid-plane.

    ``a = (1 + m/s) cos δ`` and ``b = (1 + m/s) sin δ / cos θ`` (X-stretch ``m``, skew ``δ``):
    a point at ``z = 0`` with undistorted aligned position ``w = [Ry(θ) X]_xy`` is seen at
    ``M w + t``; without distortion ``M = s R2(ψ)``.
    """
    psi = np.deg2rad(np.asarray(rotation_deg, float))
    s = np.asarray(magnification, float)
    f = len(s)
    m = np.zeros(f) if stretch is None else np.asarray(stretch, float)
    d = np.zeros(f) if skew_deg is None else np.deg2rad(np.asarray(skew_deg, float))
    c = np.cos(np.deg2rad(np.asarray(tilt_deg, float)))
    xm = 1.0 + m / s
    dist = np.zeros((f, 2, 2))
    dist[:, 0, 0] = xm * np.cos(d)
    dist[:, 1, 0] = xm * np.sin(d) / c
    dist[:, 1, 1] = 1.0
    r = np.stack([np.stack([np.cos(psi), -np.sin(psi)], -1),
                  np.stack([np.sin(psi), np.cos(psi)], -1)], -2)
    return s[:, None, None] * r @ dist


def xf_from_result(result: FiducialResult) -> np.ndarray:
    """``(F, 6)`` IMOD transforms ``A11 A12 A21 A22 DX DY`` of the fitted geometry.

    ``A = M⁻¹`` with ``M`` the in-plane matrix of rotation, magnification, X-stretch and skew
    (:func:`_inplane_matrices`); exact for the specimen mid-plane (``z = 0``), as tiltalign's.
    """
    m = _inplane_matrices(result.rotation_deg, result.magnification, result.tilt_deg,
                          result.stretch, result.skew_deg)
    a = np.linalg.inv(m)
    ic = np.array([v // 2 for v in result.image_size_px], float)
    t = result.shifts_px + ic
    d = np.einsum("fij,fj->fi", a, _xf_centre(result.image_size_px) - t)
    return np.column_stack([a.reshape(-1, 4), d])


def write_xf(path, result: FiducialResult) -> Path:
    """Write the IMOD ``.xf`` of the fitted geometry (see the module docstring), atomically."""
    xf = xf_from_result(result)
    return atomic_write_text(path, "".join(
        f"{r[0]:12.7f}{r[1]:12.7f}{r[2]:12.7f}{r[3]:12.7f}{r[4]:14.4f}{r[5]:14.4f}\n" for r in xf))


def read_xf(path) -> np.ndarray:
    """``(F, 6)`` rows ``A11 A12 A21 A22 DX DY`` of an IMOD ``.xf``."""
    try:
        return np.loadtxt(path, dtype=float, ndmin=2).reshape(-1, 6)
    except ValueError as exc:
        raise InputError(f"{path}: expected 6 numbers per line ({exc})") from exc


def write_tlt(path, tilt_deg) -> Path:
    """Write an IMOD ``.tlt`` (one tilt angle per line, degrees)."""
    return atomic_write_text(path, "".join(f"{v:.5f}\n" for v in np.asarray(tilt_deg, float)))


def geometry_from_xf(xf, tilt_deg, image_size_px, tomo_size_px):
    """Projection matrices from IMOD ``.xf`` rows and ``.tlt`` angles (inverse of writing).

    ``A⁻¹ = M = s R2(ψ) [[a, 0], [b, 1]]`` is decomposed exactly: its second column gives
    ``s`` and ``ψ``, then ``a = (1 + m/s) cos δ`` and ``b cos θ = (1 + m/s) sin δ`` give the
    X-stretch ``m`` and the skew ``δ`` (tiltalign's distortion, see
    :func:`~polish3d.fiducials._align.distortion_matrices`). An ``.xf`` without distortion
    gives ``m = δ = 0``.

    Returns:
        ``(projections (F, 4, 4), rotation_deg, magnification, shifts_px (F, 2), stretch,
        skew_deg)``.
    """
    xf = np.asarray(xf, float)
    tilt_deg = np.asarray(tilt_deg, float)
    if len(tilt_deg) != len(xf):
        raise InputError(f".xf has {len(xf)} lines but there are {len(tilt_deg)} tilt angles")
    a = rearrange(xf[:, :4], "view (row col) -> view row col", row=2)  # A11 A12 A21 A22
    m = np.linalg.inv(a)
    s = np.hypot(m[:, 0, 1], m[:, 1, 1])
    psi = np.arctan2(-m[:, 0, 1], m[:, 1, 1])
    c, sn = np.cos(psi), np.sin(psi)
    col_a = (c * m[:, 0, 0] + sn * m[:, 1, 0]) / s
    col_b = (-sn * m[:, 0, 0] + c * m[:, 1, 0]) / s
    col_b = col_b * np.cos(np.deg2rad(tilt_deg))
    xm = np.hypot(col_a, col_b)
    skew = np.rad2deg(np.arctan2(col_b, col_a))
    stretch = (xm - 1.0) * s
    rot = np.rad2deg(psi)
    t = _xf_centre(image_size_px) - np.einsum("fij,fj->fi", m, xf[:, 4:])
    ic = np.array([v // 2 for v in image_size_px], float)
    shifts = t - ic
    proj = projection_matrices(rot, tilt_deg, s, shifts, image_size_px, tomo_size_px,
                               stretch=stretch, skew_deg=skew)
    return proj, rot, s, shifts, stretch, skew


def write_beads_csv(path, result: FiducialResult) -> Path:
    """Bead positions (tomogram voxels and Å from the tomogram centre) with their residuals."""
    res = result.residuals
    rms = res.groupby("bead").apply(
        lambda g: float(np.sqrt(np.mean(g["dx"] ** 2 + g["dy"] ** 2) / 2)), include_groups=False)
    x = result.bead_positions_px
    c = np.asarray(result.tomo_size_px, float) / 2.0
    ang = (x - c) * result.pixel_size_ang
    df = pd.DataFrame({
        "bead": result.bead_ids, "x_px": x[:, 0], "y_px": x[:, 1], "z_px": x[:, 2],
        "x_centred_ang": ang[:, 0], "y_centred_ang": ang[:, 1], "z_centred_ang": ang[:, 2],
        "n_obs": res.groupby("bead").size().reindex(result.bead_ids).to_numpy(),
        "rms_px": rms.reindex(result.bead_ids).to_numpy(),
    })
    return atomic_write_text(path, df.to_csv(index=False, float_format="%.4f"))


def write_projections_star(path, result: FiducialResult, name: str = "fiducials") -> Path:
    """A per-tilt STAR table ``data_<name>`` with the fitted geometry.

    Columns: ``rlnTomoNominalStageTiltAngle``, RELION 5's Euler/shift columns (for the pixel
    size of the result; they cannot hold magnification or distortion) and
    ``rlnTomoProjX/Y/Z/W`` (the exact matrices with magnification, X-stretch and skew, which
    RELION 5 reads first), plus the informative polish3d columns ``rlnTomoMagnification``
    (``s_i``), ``rlnTomoXStretch`` (tiltalign's ``dmag``) and ``rlnTomoSkewAngle`` (degrees).
    """
    from polish3d.geometry import projection_to_euler
    from polish3d.io.star import write_star

    cols = projection_to_euler(result.projections, pixel_size_ang=result.pixel_size_ang,
                               image_size_px=result.image_size_px,
                               tomo_size_px=result.tomo_size_px)
    df = pd.DataFrame({"rlnTomoNominalStageTiltAngle": result.nominal_tilt_deg, **cols})
    for r, lab in enumerate(("rlnTomoProjX", "rlnTomoProjY", "rlnTomoProjZ", "rlnTomoProjW")):
        df[lab] = [list(result.projections[j, r]) for j in range(result.n_tilts)]
    df["rlnTomoMagnification"] = result.magnification
    df["rlnTomoXStretch"] = result.stretch
    df["rlnTomoSkewAngle"] = result.skew_deg
    return write_star(path, {name: df})
