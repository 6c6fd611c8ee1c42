"""``align_fiducials``: per-tilt geometry and bead positions from tracked bead positions."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from polish3d.errors import InputError
from polish3d.fiducials._bundle import (
    MODES,
    BundleProblem,
    levenberg_marquardt,
    param_map,
    robust_weights,
)

__all__ = ["FiducialOptions", "FiducialResult", "align_fiducials", "normalise_tracks",
           "projection_matrices"]


@dataclass(frozen=True)
class FiducialOptions:
    """What to solve and how (in the spirit of IMOD's tiltalign).

    Attributes:
        rotation, tilt, magnification: ``fixed`` (keep the start value), ``global`` (one value
            for the series: a common in-plane rotation offset; a common *stretch* of the tilt
            angles about their mean, ``θ_i = θ⁰_i + k (θ⁰_i − mean θ⁰)``; for
            magnification ``global`` is a pure gauge (overall scale) and equals ``fixed``),
            ``grouped`` (one value per ``group_size`` neighbouring tilts, linearly interpolated
            between group centres) or ``per_tilt``.
        group_size: tilts per group for ``grouped`` (tilts ordered by nominal angle).
        ref_tilt: index of the reference tilt (magnification fixed to 1);
            ``None``: the aligned tilt with the lowest ``|nominal tilt|``.
        robust: ``none``, ``huber`` (2σ) or ``tukey`` (biweight, 4.685σ) re-weighting of whole
            points by their 2D residual; σ from the median residual length.
        robust_c: tuning constant in units of σ (``None``: the defaults above).
        robust_iter: maximum number of re-weighting rounds.
        min_beads_per_tilt: tilts with fewer observed beads are not aligned (they get the nominal
            angles and the shift of the nearest aligned tilt).
        max_iter: Levenberg–Marquardt iteration limit per solve.
        n_largest: how many of the largest residuals the report lists.
    """

    rotation: str = "per_tilt"
    tilt: str = "per_tilt"
    magnification: str = "per_tilt"
    group_size: int = 5
    ref_tilt: int | None = None
    robust: str = "none"
    robust_c: float | None = None
    robust_iter: int = 20
    min_beads_per_tilt: int = 3
    max_iter: int = 100
    n_largest: int = 20

    def __post_init__(self):
        for name in ("rotation", "tilt", "magnification"):
            if getattr(self, name) not in MODES:
                raise InputError(f"--{name[:3] if name != 'tilt' else 'tilt'} mode "
                                 f"{getattr(self, name)!r}: expected one of {', '.join(MODES)}")
        if self.robust not in ("none", "huber", "tukey"):
            raise InputError(f"robust {self.robust!r}: expected none, huber or tukey")
        if self.group_size < 1:
            raise InputError("--group_size must be ≥ 1")


@dataclass
class FiducialResult:
    """Fitted geometry, bead positions and residuals.

    Per-tilt arrays have one entry per tilt in the order of ``tilt_angles_deg`` given to
    :func:`align_fiducials` (file order).

    Attributes:
        projections: ``(F, 4, 4)`` tomogram voxel → tilt-image pixel (``polish3d.geometry``).
        tilt_deg: fitted tilt angles ``θ_i`` (degrees, RELION ``rlnTomoYTilt``).
        rotation_deg: fitted in-plane rotation ``ψ_i`` = tilt-axis angle from the image y axis,
            counter-clockwise (degrees, RELION ``rlnTomoZRot``).
        magnification: ``s_i`` (1 at the reference tilt).
        shifts_px: ``(F, 2)`` image position of the tomogram centre minus ``⌊(W, H)/2⌋`` (px).
        aligned: ``(F,)`` bool, False for tilts left out (too few beads).
        bead_ids: ``(B,)`` ids of the beads kept (≥ 2 observations).
        bead_positions_px: ``(B, 3)`` bead positions in tomogram voxels.
        residuals: one row per observation of a kept bead on an aligned tilt: ``bead``,
            ``tilt``, ``x``, ``y`` (observed, px), ``dx``, ``dy`` (predicted − observed, px),
            ``dist`` (px), ``weight`` (final robust weight in [0, 1]).
        nominal_tilt_deg: the starting tilt angles (degrees).
        tilt_axis_deg: the starting tilt-axis angle (degrees).
        ref_tilt: the reference tilt index.
        image_size_px, tomo_size_px, pixel_size_ang: as given (Å/px; 1 if unknown).
        n_params: number of free parameters after removing the 3 gauge constraints.
        sigma_px: noise estimate per coordinate, ``sqrt(Σ w e² / (Σ 2w − n_params))`` (px).
        options: the :class:`FiducialOptions` used.
        notes: human-readable remarks (dropped beads, left-out tilts, gauge choices).
    """

    projections: np.ndarray
    tilt_deg: np.ndarray
    rotation_deg: np.ndarray
    magnification: np.ndarray
    shifts_px: np.ndarray
    aligned: np.ndarray
    bead_ids: np.ndarray
    bead_positions_px: np.ndarray
    residuals: pd.DataFrame
    nominal_tilt_deg: np.ndarray
    tilt_axis_deg: float
    ref_tilt: int
    image_size_px: tuple[int, int]
    tomo_size_px: tuple[int, int, int]
    pixel_size_ang: float
    n_params: int
    sigma_px: float
    options: FiducialOptions
    notes: list[str] = field(default_factory=list)

    @property
    def n_tilts(self) -> int:
        """Number of tilts ``F``."""
        return int(self.projections.shape[0])

    def project(self, points_px) -> np.ndarray:
        """Project tomogram points ``(N, 3)`` (voxels) into every tilt: ``(F, N, 2)`` px."""
        from polish3d.geometry import project_points

        return project_points(self.projections, points_px)


def normalise_tracks(tracks) -> pd.DataFrame:
    """Tracks as a DataFrame with int ``bead``, int ``tilt`` and float ``x``, ``y`` (px).

    Accepts a DataFrame (column names case-insensitive, ``rln`` prefixes and ``_`` ignored),
    a dict of arrays or an ``(N, 4)`` array ``(bead, tilt, x, y)``.
    """
    if isinstance(tracks, pd.DataFrame):
        df = tracks
    elif isinstance(tracks, dict):
        df = pd.DataFrame(tracks)
    else:
        a = np.asarray(tracks, float)
        if a.ndim != 2 or a.shape[1] != 4:
            raise InputError("tracks: expected columns bead, tilt, x, y")
        df = pd.DataFrame(a, columns=["bead", "tilt", "x", "y"])
    cols = {}
    for c in df.columns:
        key = str(c).lower().replace("_", "")
        key = key[3:] if key.startswith("rln") else key
        cols[c] = key
    df = df.rename(columns=cols)
    missing = [c for c in ("bead", "tilt", "x", "y") if c not in df.columns]
    if missing:
        raise InputError(f"tracks: missing column(s) {', '.join(missing)} (need bead, tilt, x, y)")
    out = pd.DataFrame({
        "bead": df["bead"].to_numpy().astype(int),
        "tilt": np.rint(df["tilt"].to_numpy(float)).astype(int),
        "x": df["x"].to_numpy(float),
        "y": df["y"].to_numpy(float),
    })
    if out[["x", "y"]].isna().any().any():
        raise InputError("tracks: NaN coordinates")
    return out


def projection_matrices(rotation_deg, tilt_deg, magnification, shifts_px, image_size_px,
                        tomo_size_px) -> np.ndarray:
    """``P = T(t) · diag(s, s, 1) · Rz(ψ) · Ry(θ) · T(−⌊tomo/2⌋)`` with ``t = shift + ⌊(W,H)/2⌋``.

    Args:
        rotation_deg, tilt_deg: ``(F,)`` ψ and θ (degrees).
        magnification: ``(F,)`` s.
        shifts_px: ``(F, 2)`` (px).
        image_size_px: ``(W, H)``; tomo_size_px: ``(w0, h0, d0)``.

    Returns:
        ``(F, 4, 4)`` projection matrices (polish3d convention).
    """
    from polish3d.geometry import rot_y, rot_z

    a = rot_z(rotation_deg) @ rot_y(tilt_deg)
    a[:, :2, :] *= np.asarray(magnification, float)[:, None, None]
    c_int = np.array([int(v) // 2 for v in tomo_size_px], float)
    ic = np.array([int(v) // 2 for v in image_size_px], float)
    p = np.zeros((len(a), 4, 4))
    p[:, :3, :3] = a
    p[:, 3, 3] = 1.0
    p[:, :3, 3] = -a @ c_int
    p[:, :2, 3] += np.asarray(shifts_px, float) + ic
    return p


def align_fiducials(tracks, tilt_angles_deg, tilt_axis_deg, image_size_px, *,
                    options: FiducialOptions | None = None, tomo_size_px=None,
                    pixel_size_ang: float | None = None) -> FiducialResult:
    """Bundle-adjust per-tilt geometry and 3D bead positions to tracked 2D bead positions.

    Minimises ``Σ w_ij |u_ij(θ_i, ψ_i, s_i, t_i, X_j) − obs_ij|²`` jointly over the per-tilt
    parameters selected by ``options`` and all bead positions (Levenberg–Marquardt with an
    analytic sparse Jacobian; IRLS for robust weights). See ``polish3d.fiducials._bundle`` for
    the model and the gauge.

    Args:
        tracks: table with ``bead`` (id), ``tilt`` (0-based index into ``tilt_angles_deg``),
            ``x``, ``y`` (tilt-image pixels, 0-based, pixel centres on integers); gaps allowed.
        tilt_angles_deg: ``(F,)`` nominal tilt angles (degrees), file order.
        tilt_axis_deg: tilt-axis angle (degrees, from the image y axis, counter-clockwise;
            RELION ``rlnTomoNominalTiltAxisAngle``/``rlnTomoZRot``), scalar or ``(F,)``.
        image_size_px: ``(W, H)`` of the tilt images.
        options: :class:`FiducialOptions` (defaults: everything per tilt, no robust weights).
        tomo_size_px: ``(w0, h0, d0)`` of the tomogram that ``projections`` refer to; default
            ``(W, H, 2·⌊max(W, H)/8⌋)``.
        pixel_size_ang: Å per tilt-series pixel (only for reporting; default 1).

    Returns:
        :class:`FiducialResult`.
    """
    opt = options or FiducialOptions()
    df = normalise_tracks(tracks)
    theta_nom = np.asarray(tilt_angles_deg, float).ravel()
    f_all = len(theta_nom)
    w_img, h_img = (int(v) for v in image_size_px)
    if tomo_size_px is None:
        tomo_size_px = (w_img, h_img, 2 * (max(w_img, h_img) // 8))
    tomo_size_px = tuple(int(v) for v in tomo_size_px)
    axis = np.broadcast_to(np.asarray(tilt_axis_deg, float), (f_all,)).copy()
    bad = (df["tilt"] < 0) | (df["tilt"] >= f_all)
    if bad.any():
        first_bad = int(df["tilt"][bad].iloc[0])
        raise InputError(f"tracks: tilt index {first_bad} outside 0..{f_all - 1}")
    if df.duplicated(["bead", "tilt"]).any():
        raise InputError("tracks: a bead has more than one position on the same tilt")
    notes: list[str] = []

    # tilts with enough beads are aligned; then beads seen on ≥ 2 aligned tilts are kept
    counts = np.bincount(df["tilt"], minlength=f_all)
    aligned = counts >= opt.min_beads_per_tilt
    df = df[aligned[df["tilt"].to_numpy()]]
    per_bead = df.groupby("bead")["tilt"].transform("size")
    dropped = sorted(set(df["bead"][per_bead < 2]))
    df = df[per_bead >= 2].reset_index(drop=True)
    counts = np.bincount(df["tilt"], minlength=f_all)
    aligned = counts >= opt.min_beads_per_tilt
    df = df[aligned[df["tilt"].to_numpy()]].reset_index(drop=True)
    if dropped:
        notes.append(f"beads seen on fewer than 2 aligned tilts dropped: {dropped}")
    if (~aligned).any():
        notes.append(f"tilts with fewer than {opt.min_beads_per_tilt} beads not aligned: "
                     f"{np.flatnonzero(~aligned).tolist()}")
    if aligned.sum() < 2 or df.empty:
        raise InputError("tracks: fewer than 2 tilts with enough beads")
    tilt_ids = np.flatnonzero(aligned)
    tilt_of = -np.ones(f_all, int)
    tilt_of[tilt_ids] = np.arange(len(tilt_ids))
    bead_ids, bj = np.unique(df["bead"].to_numpy(), return_inverse=True)
    ti = tilt_of[df["tilt"].to_numpy()]
    uv = df[["x", "y"]].to_numpy(float)
    f = len(tilt_ids)

    if opt.ref_tilt is None:
        ref_all = int(tilt_ids[np.argmin(np.abs(theta_nom[tilt_ids]))])
    else:
        ref_all = int(opt.ref_tilt)
        if not (0 <= ref_all < f_all) or not aligned[ref_all]:
            raise InputError(f"--ref_tilt {ref_all}: not an aligned tilt index")
    ref = int(tilt_of[ref_all])
    th0 = np.deg2rad(theta_nom[tilt_ids])
    ps0 = np.deg2rad(axis[tilt_ids])
    order = np.argsort(th0, kind="stable")
    b_rot = param_map(opt.rotation, f, order, opt.group_size)
    e_ref = np.zeros(f)
    e_ref[ref] = 1.0
    b_tilt = param_map(opt.tilt, f, order, opt.group_size, constraint=np.ones(f),
                       global_column=th0 - th0.mean())
    b_mag = param_map(opt.magnification, f, order, opt.group_size, constraint=e_ref)
    if opt.magnification == "global":
        notes.append("magnification 'global' is the overall scale (a gauge): kept fixed at 1")
    ic = np.array([w_img // 2, h_img // 2], float)

    # start: beads back-projected from their lowest-tilt view at z = 0, then a linear solve
    # for shifts and positions at the nominal angles, then the full problem
    p_lin = BundleProblem(ti, bj, uv, ps0, th0, np.zeros((f, 0)), np.zeros((f, 0)),
                          np.zeros((f, 0)), ic)
    x0 = np.zeros((len(bead_ids), 3))
    first = np.lexsort((np.abs(th0[ti]), bj))
    first = first[np.r_[True, bj[first][1:] != bj[first][:-1]]]
    for k in first:
        d = uv[k] - ic
        c, s = np.cos(-ps0[ti[k]]), np.sin(-ps0[ti[k]])
        q = np.array([c * d[0] - s * d[1], s * d[0] + c * d[1]])
        x0[bj[k]] = [q[0] / max(np.cos(th0[ti[k]]), 0.2), q[1], 0.0]
    p = p_lin.pack([], [], [], np.tile(ic, (f, 1)), x0)
    weights = np.ones(len(ti))
    p, _, _ = levenberg_marquardt(p_lin, p, weights, max_iter=10)
    prob = BundleProblem(ti, bj, uv, ps0, th0, b_rot, b_tilt, b_mag, ic)
    _, _, _, t_lin, x_lin = p_lin.split(p)
    p = prob.pack(np.zeros(prob.k[0]), np.zeros(prob.k[1]), np.zeros(prob.k[2]), t_lin, x_lin)
    p, _, _ = levenberg_marquardt(prob, p, weights, max_iter=opt.max_iter)

    if opt.robust != "none":
        schedule = ["huber"] * 3 + [opt.robust] * opt.robust_iter if opt.robust == "tukey" \
            else ["huber"] * opt.robust_iter
        for kind in schedule:
            dist = np.linalg.norm(prob.predict(p) - uv, axis=1)
            w_new, _ = robust_weights(dist, kind, opt.robust_c)
            change = np.max(np.abs(w_new - weights))
            weights = w_new
            p, _, _ = levenberg_marquardt(prob, p, weights, max_iter=opt.max_iter)
            if change < 1e-3 and kind == schedule[-1]:
                break

    psi, theta, s, t = prob.per_tilt(p)
    x_rel = prob.split(p)[4]
    rot_deg = axis.copy()
    tilt_deg = theta_nom.copy()
    mag = np.ones(f_all)
    shifts = np.zeros((f_all, 2))
    rot_deg[tilt_ids] = np.rad2deg(psi)
    tilt_deg[tilt_ids] = np.rad2deg(theta)
    mag[tilt_ids] = s
    shifts[tilt_ids] = t - ic
    for i in np.flatnonzero(~aligned):
        shifts[i] = shifts[tilt_ids[np.argmin(np.abs(theta_nom[tilt_ids] - theta_nom[i]))]]
    proj = projection_matrices(rot_deg, tilt_deg, mag, shifts, (w_img, h_img), tomo_size_px)
    c_int = np.array([v // 2 for v in tomo_size_px], float)

    e = prob.predict(p) - uv
    dist = np.linalg.norm(e, axis=1)
    n_free = prob.n_params - 3
    dof = max(2.0 * np.sum(weights) - n_free, 1.0)
    sigma = float(np.sqrt(np.sum(weights * np.sum(e * e, 1)) / dof))
    res = pd.DataFrame({
        "bead": bead_ids[bj], "tilt": tilt_ids[ti], "x": uv[:, 0], "y": uv[:, 1],
        "dx": e[:, 0], "dy": e[:, 1], "dist": dist, "weight": weights,
    })
    return FiducialResult(
        projections=proj, tilt_deg=tilt_deg, rotation_deg=rot_deg, magnification=mag,
        shifts_px=shifts, aligned=aligned, bead_ids=bead_ids,
        bead_positions_px=x_rel + c_int, residuals=res, nominal_tilt_deg=theta_nom,
        tilt_axis_deg=float(axis[0]), ref_tilt=ref_all, image_size_px=(w_img, h_img),
        tomo_size_px=tomo_size_px, pixel_size_ang=float(pixel_size_ang or 1.0),
        n_params=int(n_free), sigma_px=sigma, options=opt, notes=notes,
    )

