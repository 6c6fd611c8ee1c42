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
from polish3d.fiducials._tracks import normalise_tracks

__all__ = ["FiducialOptions", "FiducialResult", "align_fiducials", "projection_matrices"]


@dataclass(frozen=True)
class FiducialOptions:
    """What to solve and how (in the spirit of IMOD's tiltalign).

    Attributes:
        rotation, tilt, magnification, stretch, skew: ``fixed`` (keep the start value),
            ``global`` (one value for the series: a common in-plane rotation offset; a common
            *stretch* of the tilt angles about their mean, ``θ_i = θ⁰_i + k (θ⁰_i − mean
            θ⁰)``; for magnification, X-stretch and skew ``global`` is a pure gauge and equals
            ``fixed``), ``grouped`` (one value per group of neighbouring tilts, linearly
            interpolated between group centres) or ``per_tilt``. ``stretch`` is tiltalign's
            ``dmag`` (an increment of the X magnification, unitless), ``skew`` its skew angle
            (degrees in outputs); both default to ``fixed`` (no distortion).
        group_size: tilts per group for every ``grouped`` parameter without its own size.
        rotation_group, tilt_group, mag_group, stretch_group, skew_group: tilts per group of
            each parameter (``None``: ``group_size``).
        ref_tilt: index of the reference tilt (magnification fixed to 1);
            ``None``: the aligned tilt with the lowest ``|nominal tilt|``.
        cosine_groups: like tiltalign's automapping, make ``grouped`` tilt-angle groups
            ``∝ cos θ`` and X-stretch groups ``∝ cos^1.5 θ`` (smaller at high tilt, same mean
            size); other parameters keep equal groups (as in tiltalign).
        stretch_ref_tilt: index of the tilt whose X-stretch and skew are fixed at 0
            (tiltalign's choice); ``None``: they sum to 0 over the aligned tilts instead.
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
    stretch: str = "fixed"
    skew: str = "fixed"
    group_size: int = 5
    rotation_group: int | None = None
    tilt_group: int | None = None
    mag_group: int | None = None
    stretch_group: int | None = None
    skew_group: int | None = None
    ref_tilt: int | None = None
    stretch_ref_tilt: int | None = None
    cosine_groups: bool = False
    robust: str = "none"
    robust_c: float | None = None
    robust_iter: int = 20
    min_beads_per_tilt: int = 3
    max_iter: int = 100
    n_largest: int = 20

    FLAGS = {"rotation": "--rotation", "tilt": "--tilt", "magnification": "--mag",
             "stretch": "--stretch", "skew": "--skew"}
    GROUPS = {"rotation": "rotation_group", "tilt": "tilt_group", "magnification": "mag_group",
              "stretch": "stretch_group", "skew": "skew_group"}

    def __post_init__(self):
        for name, flag in self.FLAGS.items():
            if getattr(self, name) not in MODES:
                raise InputError(f"{flag} mode {getattr(self, name)!r}: expected one of "
                                 f"{', '.join(MODES)}")
        if self.robust not in ("none", "huber", "tukey"):
            raise InputError(f"robust {self.robust!r}: expected none, huber or tukey")
        if self.group_size < 1:
            raise InputError("--group_size must be ≥ 1")
        for g in self.GROUPS.values():
            v = getattr(self, g)
            if v is not None and v < 1:
                raise InputError(f"--{g} must be ≥ 1 (got {v})")

    def group(self, name: str) -> int:
        """Tilts per group of parameter ``name`` (one of :attr:`FLAGS`)."""
        v = getattr(self, self.GROUPS[name])
        return self.group_size if v is None else int(v)


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
        n_params: number of free parameters after removing the 3 gauge constraints (per-tilt
            variables, shifts and bead positions).
        sigma_px: noise estimate per coordinate, ``sqrt(Σ w e² / (Σ 2w − n_params))`` (px).
        options: the :class:`FiducialOptions` used.
        notes: human-readable remarks (dropped beads, left-out tilts, gauge choices).
        stretch: ``(F,)`` X-stretch ``dmag`` (tiltalign's: the X magnification of the specimen
            plane is ``magnification + stretch``; unitless, 0 when not solved).
        skew_deg: ``(F,)`` skew angle (degrees; rotation of the specimen X axis towards Y).
        stretch_ref_tilt: the tilt with stretch and skew fixed at 0, or ``None`` (they sum to
            0 over the aligned tilts).
        n_variables: free variables per kind (``rotation``, ``tilt``, ``magnification``,
            ``stretch``, ``skew``, ``shifts``, ``beads``), after the gauge constraints.
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
    stretch: np.ndarray | None = None
    skew_deg: np.ndarray | None = None
    stretch_ref_tilt: int | None = None
    n_variables: dict = field(default_factory=dict)

    def __post_init__(self):
        f = self.projections.shape[0]
        if self.stretch is None:
            self.stretch = np.zeros(f)
        if self.skew_deg is None:
            self.skew_deg = np.zeros(f)

    @property
    def n_tilts(self) -> int:
        """Number of tilts ``F``."""
        return int(self.projections.shape[0])

    def project(self, points_px) -> np.ndarray:
        """Project tomogram points ``(N, 3)`` (voxels) into every tilt: ``(F, N, 2)`` px."""
        from polish3d.geometry import project_points

        return project_points(self.projections, points_px)


def distortion_matrices(magnification, stretch=None, skew_deg=None) -> np.ndarray:
    """tiltalign's in-plane distortion, ``(F, 3, 3)``, divided by the magnification ``s``.

    ``D'/1 = [[(1 + m/s) cos δ, 0, 0], [(1 + m/s) sin δ, 1, 0], [0, 0, 1]]`` with the X-stretch
    ``m`` (``dmag``) and the skew ``δ``; identity without distortion.
    """
    s = np.atleast_1d(np.asarray(magnification, float))
    m = np.zeros_like(s) if stretch is None else np.asarray(stretch, float)
    d = np.zeros_like(s) if skew_deg is None else np.deg2rad(np.asarray(skew_deg, float))
    out = np.broadcast_to(np.eye(3), (len(s), 3, 3)).copy()
    xm = 1.0 + m / s
    out[:, 0, 0] = xm * np.cos(d)
    out[:, 1, 0] = xm * np.sin(d)
    return out


def projection_matrices(rotation_deg, tilt_deg, magnification, shifts_px, image_size_px,
                        tomo_size_px, stretch=None, skew_deg=None) -> np.ndarray:
    """``P = T(t) · diag(s, s, 1) · Rz(ψ) · Ry(θ) · D' · T(−⌊tomo/2⌋)``, ``t = shift + ⌊(W,H)/2⌋``.

    Args:
        rotation_deg, tilt_deg: ``(F,)`` ψ and θ (degrees).
        magnification: ``(F,)`` s.
        shifts_px: ``(F, 2)`` (px).
        image_size_px: ``(W, H)``; tomo_size_px: ``(w0, h0, d0)``.
        stretch, skew_deg: ``(F,)`` tiltalign's X-stretch ``dmag`` (unitless) and skew
            (degrees); ``D'`` is :func:`distortion_matrices` (identity when omitted).

    Returns:
        ``(F, 4, 4)`` projection matrices (polish3d convention).
    """
    from polish3d.geometry import rot_y, rot_z

    a = rot_z(rotation_deg) @ rot_y(tilt_deg)
    if stretch is not None or skew_deg is not None:
        a = a @ distortion_matrices(magnification, stretch, skew_deg)
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

    Minimises ``Σ w_ij |u_ij(θ_i, ψ_i, s_i, m_i, δ_i, t_i, X_j) − obs_ij|²`` jointly over the per-tilt
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
    w_img, h_img = (int(v) for v in image_size_px)
    if tomo_size_px is None:
        tomo_size_px = (w_img, h_img, 2 * (max(w_img, h_img) // 8))
    tomo_size_px = tuple(int(v) for v in tomo_size_px)
    axis = np.broadcast_to(np.asarray(tilt_axis_deg, float), (len(theta_nom),)).copy()
    notes: list[str] = []
    obs = _Observations.select(df, len(theta_nom), opt.min_beads_per_tilt, notes)
    ref_all = _reference_tilt(opt, obs, theta_nom)
    th0 = np.deg2rad(theta_nom[obs.tilt_ids])
    maps = _parameter_maps(opt, obs, th0, int(obs.tilt_of[ref_all]), notes)
    ic = np.array([w_img // 2, h_img // 2], float)
    prob, p, weights = _solve(opt, obs, th0, np.deg2rad(axis[obs.tilt_ids]), ic, maps)
    geometry = _per_tilt_geometry(prob, p, obs, axis, theta_nom, ic)
    proj = projection_matrices(geometry["rotation_deg"], geometry["tilt_deg"],
                               geometry["magnification"], geometry["shifts_px"], (w_img, h_img),
                               tomo_size_px, stretch=geometry["stretch"],
                               skew_deg=geometry["skew_deg"])
    residuals, sigma, n_free = _residuals(prob, p, weights, obs)
    c_int = np.array([v // 2 for v in tomo_size_px], float)
    return FiducialResult(
        projections=proj, aligned=obs.aligned, bead_ids=obs.bead_ids,
        bead_positions_px=prob.split(p)[2] + c_int, residuals=residuals,
        nominal_tilt_deg=theta_nom, tilt_axis_deg=float(axis[0]), ref_tilt=ref_all,
        image_size_px=(w_img, h_img), tomo_size_px=tomo_size_px,
        pixel_size_ang=float(pixel_size_ang or 1.0), n_params=int(n_free), sigma_px=sigma,
        options=opt, notes=notes, stretch_ref_tilt=maps["stretch_ref_tilt"],
        n_variables={**dict(zip(BundleProblem.KINDS, map(int, prob.k), strict=True)),
                     "shifts": 2 * len(obs.tilt_ids) - 2, "beads": 3 * len(obs.bead_ids) - 1},
        **geometry,
    )


@dataclass
class _Observations:
    """The observations the fit uses, on compact tilt and bead indices.

    Attributes:
        aligned: ``(F_all,)`` bool, tilts with enough beads (file order).
        tilt_ids: ``(f,)`` file index of each aligned tilt; ``tilt_of`` its inverse
            (``(F_all,)``, −1 for tilts left out).
        bead_ids: ``(B,)`` ids of the beads kept.
        ti, bj: ``(M,)`` compact tilt and bead index of each observation; uv: ``(M, 2)`` (px).
    """

    aligned: np.ndarray
    tilt_ids: np.ndarray
    tilt_of: np.ndarray
    bead_ids: np.ndarray
    ti: np.ndarray
    bj: np.ndarray
    uv: np.ndarray

    @classmethod
    def select(cls, df: pd.DataFrame, f_all: int, min_beads: int, notes: list[str]):
        """Check the tracks, align the tilts with ≥ ``min_beads`` beads and keep the beads seen
        on ≥ 2 of them (notes say what was left out)."""
        _check_track_indices(df, f_all)
        counts = np.bincount(df["tilt"], minlength=f_all)
        aligned = counts >= min_beads
        df = df[aligned[df["tilt"].to_numpy()]]
        per_bead = df.groupby("bead")["tilt"].transform("size")
        dropped = sorted(set(df["bead"][per_bead < 2]))
        df = df[per_bead >= 2].reset_index(drop=True)
        counts = np.bincount(df["tilt"], minlength=f_all)
        aligned = counts >= min_beads
        df = df[aligned[df["tilt"].to_numpy()]].reset_index(drop=True)
        if dropped:
            notes.append(f"beads seen on fewer than 2 aligned tilts dropped: {dropped}")
        if (~aligned).any():
            notes.append(f"tilts with fewer than {min_beads} beads not aligned: "
                         f"{np.flatnonzero(~aligned).tolist()}")
        if aligned.sum() < 2 or df.empty:
            raise InputError("tracks: fewer than 2 tilts with enough beads")
        tilt_ids = np.flatnonzero(aligned)
        tilt_of = -np.ones(f_all, int)
        tilt_of[tilt_ids] = np.arange(len(tilt_ids))
        bead_ids, bj = np.unique(df["bead"].to_numpy(), return_inverse=True)
        return cls(aligned, tilt_ids, tilt_of, bead_ids, tilt_of[df["tilt"].to_numpy()], bj,
                   df[["x", "y"]].to_numpy(float))


def _check_track_indices(df: pd.DataFrame, f_all: int) -> None:
    """InputError for a tilt index outside the tilt list or a bead seen twice on one tilt."""
    bad = (df["tilt"] < 0) | (df["tilt"] >= f_all)
    if bad.any():
        first_bad = int(df["tilt"][bad].iloc[0])
        raise InputError(f"tracks: tilt index {first_bad} outside 0..{f_all - 1}")
    dup = df.duplicated(["bead", "tilt"])
    if dup.any():
        r = df[dup].iloc[0]
        raise InputError(f"tracks: bead {int(r['bead'])} has more than one position on tilt "
                         f"{int(r['tilt'])} ({int(dup.sum())} duplicated (bead, tilt) pair(s))")


def _aligned_tilt_index(value, flag: str, obs: _Observations) -> int:
    """``value`` as a file tilt index, InputError naming ``flag`` unless it is an aligned tilt."""
    index = int(value)
    if not (0 <= index < len(obs.aligned)) or not obs.aligned[index]:
        raise InputError(f"{flag} {index}: not an aligned tilt index")
    return index


def _reference_tilt(opt: FiducialOptions, obs: _Observations, theta_nom: np.ndarray) -> int:
    """File index of the reference tilt (magnification 1): ``opt.ref_tilt`` or the aligned
    tilt with the lowest ``|nominal tilt|``."""
    if opt.ref_tilt is None:
        return int(obs.tilt_ids[np.argmin(np.abs(theta_nom[obs.tilt_ids]))])
    return _aligned_tilt_index(opt.ref_tilt, "--ref_tilt", obs)


def _parameter_maps(opt: FiducialOptions, obs: _Observations, th0: np.ndarray, ref: int,
                    notes: list[str]) -> dict:
    """The basis of each per-tilt parameter kind (``rotation``, ``tilt``, ``magnification``,
    ``stretch``, ``skew``: ``(f, k)`` matrices mapping free variables to per-tilt increments,
    gauges removed) and ``stretch_ref_tilt`` (file index or ``None``)."""
    f = len(obs.tilt_ids)
    order = np.argsort(th0, kind="stable")
    e_ref = np.zeros(f)
    e_ref[ref] = 1.0
    if opt.magnification == "global":
        notes.append("magnification 'global' is the overall scale (a gauge): kept fixed at 1")
    # X-stretch and skew: a common value is a gauge (the beads absorb it), fixed either at a
    # reference tilt (tiltalign) or by a zero sum over the aligned tilts
    sref_all = opt.stretch_ref_tilt
    if sref_all is None:
        c_dist = np.ones(f)
    else:
        sref_all = _aligned_tilt_index(sref_all, "--stretch_ref_tilt", obs)
        c_dist = np.zeros(f)
        c_dist[obs.tilt_of[sref_all]] = 1.0
    # a shear of the beads' z by x, z → z + εx, is taken up by the stretches m_i → m_i − ε tan θ_i
    cos0 = np.cos(th0)
    b_str = param_map(opt.stretch, f, order, opt.group("stretch"),
                      constraint=np.vstack([c_dist, np.tan(th0)]),
                      group_scale=cos0**1.5 if opt.cosine_groups else None)
    for nm in ("stretch", "skew"):
        if getattr(opt, nm) == "global":
            notes.append(f"{nm} 'global' is a common distortion of the beads (a gauge): kept 0")
    # tilt: a common offset is a gauge; with X-stretch solved, so is (exactly when both are per
    # tilt) the tilt magnitude against the specimen thickness
    c_tilt = np.ones(f)
    if b_str.shape[1]:
        c_tilt = np.vstack([c_tilt, np.tan(th0)])
        if opt.tilt != "fixed":
            notes.append("X-stretch solved: tilt increments constrained by Σ tan θ⁰ (θ − θ⁰) = 0 "
                         "(the tilt magnitude trades off against the specimen thickness)")
    return {
        "rotation": param_map(opt.rotation, f, order, opt.group("rotation")),
        "tilt": param_map(opt.tilt, f, order, opt.group("tilt"), constraint=c_tilt,
                          global_column=th0 - th0.mean(),
                          group_scale=cos0 if opt.cosine_groups else None),
        "magnification": param_map(opt.magnification, f, order, opt.group("magnification"),
                                   constraint=e_ref),
        "stretch": b_str,
        "skew": param_map(opt.skew, f, order, opt.group("skew"), constraint=c_dist),
        "stretch_ref_tilt": sref_all,
    }


def _solve(opt: FiducialOptions, obs: _Observations, th0: np.ndarray, ps0: np.ndarray,
           ic: np.ndarray, maps: dict) -> tuple[BundleProblem, np.ndarray, np.ndarray]:
    """``(problem, parameters, weights)``: a linear start (beads back-projected from their
    lowest-tilt view at z = 0, then shifts and positions at the nominal angles), the full
    problem, and robust re-weighting rounds when asked."""
    ti, bj, uv = obs.ti, obs.bj, obs.uv
    f = len(obs.tilt_ids)
    p_lin = BundleProblem(ti, bj, uv, ps0, th0, None, None, None, ic)
    x0 = np.zeros((len(obs.bead_ids), 3))
    first = np.lexsort((np.abs(th0[ti]), bj))
    first = first[np.r_[True, bj[first][1:] != bj[first][:-1]]]
    for k in first:
        d = uv[k] - ic
        c, s = np.cos(-ps0[ti[k]]), np.sin(-ps0[ti[k]])
        q = np.array([c * d[0] - s * d[1], s * d[0] + c * d[1]])
        x0[bj[k]] = [q[0] / max(np.cos(th0[ti[k]]), 0.2), q[1], 0.0]
    p = p_lin.pack([], np.tile(ic, (f, 1)), x0)
    weights = np.ones(len(ti))
    p, _, _ = levenberg_marquardt(p_lin, p, weights, max_iter=10)
    prob = BundleProblem(ti, bj, uv, ps0, th0, maps["rotation"], maps["tilt"],
                         maps["magnification"], ic, b_stretch=maps["stretch"],
                         b_skew=maps["skew"])
    _, t_lin, x_lin = p_lin.split(p)
    p = prob.pack(prob.zero_variables(), t_lin, x_lin)
    p, _, _ = levenberg_marquardt(prob, p, weights, max_iter=opt.max_iter)
    if opt.robust == "none":
        return prob, p, weights
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
    return prob, p, weights


def _per_tilt_geometry(prob: BundleProblem, p: np.ndarray, obs: _Observations, axis: np.ndarray,
                       theta_nom: np.ndarray, ic: np.ndarray) -> dict[str, np.ndarray]:
    """The fitted per-tilt fields of :class:`FiducialResult` over all tilts (file order):
    tilts left out keep the nominal angles and take the shift of the nearest aligned tilt."""
    psi, theta, s, dmag, skew, t = prob.per_tilt(p)
    ids = obs.tilt_ids
    f_all = len(theta_nom)
    out = {"rotation_deg": axis.copy(), "tilt_deg": theta_nom.copy(),
           "magnification": np.ones(f_all), "stretch": np.zeros(f_all),
           "skew_deg": np.zeros(f_all), "shifts_px": np.zeros((f_all, 2))}
    out["rotation_deg"][ids] = np.rad2deg(psi)
    out["tilt_deg"][ids] = np.rad2deg(theta)
    out["magnification"][ids] = s
    out["stretch"][ids] = dmag
    out["skew_deg"][ids] = np.rad2deg(skew)
    shifts = out["shifts_px"]
    shifts[ids] = t - ic
    for i in np.flatnonzero(~obs.aligned):
        shifts[i] = shifts[ids[np.argmin(np.abs(theta_nom[ids] - theta_nom[i]))]]
    return out


def _residuals(prob: BundleProblem, p: np.ndarray, weights: np.ndarray,
               obs: _Observations) -> tuple[pd.DataFrame, float, int]:
    """``(table, sigma_px, n_free)``: one row per observation (predicted − observed), the
    weighted noise estimate per coordinate and the number of free parameters (gauge removed)."""
    uv = obs.uv
    e = prob.predict(p) - uv
    n_free = prob.n_params - 3
    dof = max(2.0 * np.sum(weights) - n_free, 1.0)
    sigma = float(np.sqrt(np.sum(weights * np.sum(e * e, 1)) / dof))
    table = pd.DataFrame({
        "bead": obs.bead_ids[obs.bj], "tilt": obs.tilt_ids[obs.ti], "x": uv[:, 0], "y": uv[:, 1],
        "dx": e[:, 0], "dy": e[:, 1], "dist": np.linalg.norm(e, axis=1), "weight": weights,
    })
    return table, sigma, n_free
