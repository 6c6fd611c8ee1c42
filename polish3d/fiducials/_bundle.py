"""Bead bundle adjustment (the model, its analytic sparse Jacobian, Levenberg–Marquardt, IRLS).

Model (pixels), for tilt ``i`` and bead ``j`` with position ``X_j`` relative to the tomogram
centre ``c_int = (⌊w0/2⌋, ⌊h0/2⌋, ⌊d0/2⌋)``::

    u_ij = R2(ψ_i) · [Ry(θ_i) · D_i · X_j]_xy + t_i
    D_i  = [[(s_i + m_i) cos δ_i, 0, 0], [(s_i + m_i) sin δ_i, s_i, 0], [0, 0, s_i]]

``θ_i`` is the tilt angle (rotation about the specimen y axis, RELION's ``rlnTomoYTilt``),
``ψ_i`` the in-plane rotation = tilt-axis angle from the image y axis, counter-clockwise
(RELION's ``rlnTomoZRot``), ``s_i`` the magnification, ``m_i`` the X-stretch (tiltalign's
``dmag``: the X magnification is ``s_i + m_i``), ``δ_i`` the skew (tiltalign's ``skew``: the
rotation of the specimen X axis towards Y) and ``t_i`` the image position of the tomogram
centre. ``D_i`` is tiltalign's distortion matrix (its stretch type 1); like tiltalign it acts on
the specimen before the tilt. Without distortion (``m = δ = 0``),
``P_i = T(t_i) · diag(s_i, s_i, 1) · Rz(ψ_i) · Ry(θ_i) · T(−c_int)``, which for ``s_i = 1`` is
exactly RELION 5's matrix with shifts ``(t_i − ⌊W/2⌋, ⌊H/2⌋) · px``.

Gauge (the model is invariant under these, so they are fixed by convention):

* global 3D translation of the beads (3 DOF): ``Σ_i (t_i − ⌊(W, H)/2⌋) = 0`` over the aligned
  tilts (the tomogram centre projects on average to the image centre) and ``Σ_j z_j = 0`` (the
  beads' mean depth is the tomogram mid-plane);
* overall scale: ``s_ref = 1`` at the reference tilt;
* rotation of the beads about the tilt axis (a common tilt-angle offset): the tilt-angle
  increments sum to zero, ``Σ_i (θ_i − θ⁰_i) = 0`` (the tilt angles keep their nominal values on
  average; fixing one view's angle instead, as tiltalign does, pins this gauge to the noise of
  a single view and doubles the geometry error at high tilt);
* when X-stretch and tilt angles are solved: the specimen thickness against the tilt
  magnitudes (beads ``z → c z`` with ``sin θ_i → sin θ_i / c`` and the X-stretch taking up
  ``cos θ_i``; exact when both are per tilt): the tilt increments also satisfy
  ``Σ_i tan θ⁰_i (θ_i − θ⁰_i) = 0``;
* when X-stretch is solved: a shear of the beads' depth by x, ``z → z + ε x``, which the
  stretches take up (``m_i → m_i − ε s_i tan θ_i``, exact when they are per tilt):
  ``Σ_i tan θ⁰_i m_i = 0``;
* when X-stretch or skew are solved: a common stretch of the beads along X and a common shear
  of X into Y (2 DOF; the matrices ``[[a, 0], [b, 1]]`` form a group, so the beads absorb a
  common factor of every ``D_i``): ``Σ_i m_i = 0`` and ``Σ_i δ_i = 0``, or ``m = δ = 0`` at a
  reference tilt (tiltalign fixes both at one view);
* mirror ``(θ, z) → (−θ, −z)``: resolved by starting from the nominal angles.

A rotation of the beads about the beam is *not* an exact gauge (the foreshortening ``cos θ`` of
tilted views breaks it), so ψ may be solved per tilt without fixing one view.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp

__all__ = ["BundleProblem", "levenberg_marquardt", "param_map", "robust_weights"]

MODES = ("fixed", "global", "grouped", "per_tilt")


def param_map(mode: str, n_tilts: int, order: np.ndarray, group_size: int,
              constraint: np.ndarray | None = None,
              global_column: np.ndarray | None = None,
              group_scale: np.ndarray | None = None) -> np.ndarray:
    """Linear map ``B`` (``(F, k)``) from solved variables to per-tilt parameter increments.

    Args:
        mode: ``fixed`` (k = 0), ``global`` (one column, ``global_column`` or ones), ``grouped``
            (linear interpolation between group centres of ``group_size`` tilts neighbouring in
            tilt angle, as tiltalign does), ``per_tilt`` (identity).
        n_tilts: ``F``, the aligned tilts.
        order: tilt indices sorted by nominal tilt angle.
        group_size: tilts per group (``grouped``), on average.
        constraint: ``(F,)`` weights ``c`` of a gauge constraint ``Σ_i c_i δ_i = 0`` on the
            increments ``δ = B q`` (one variable is eliminated), a ``(n, F)`` array of ``n``
            such constraints, or ``None``.
        global_column: the ``(F,)`` column used for ``global``.
        group_scale: ``(F,)`` relative local group size (``grouped``; e.g. ``cos^p θ``, so that
            groups are smaller at high tilt, as tiltalign's automapping of tilt angles and
            X-stretch); ``None``: equal groups. Normalised so that the mean group size is
            ``group_size``.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; expected one of {MODES}")
    f = n_tilts
    if mode == "fixed":
        return np.zeros((f, 0))
    if mode == "global":
        b = np.ones((f, 1)) if global_column is None else np.asarray(global_column, float)[:, None]
    elif mode == "per_tilt":
        b = np.eye(f)
    else:
        g = max(1, int(group_size))
        n_groups = max(1, int(round(f / g)))
        if n_groups == 1:
            b = np.ones((f, 1))
        else:
            if group_scale is None:
                # rank positions 0..f−1 along the tilt order; group centres evenly spread
                centres = np.linspace((g - 1) / 2.0, f - 1 - (g - 1) / 2.0, n_groups)
                pos = np.empty(f)
                pos[order] = np.arange(f)
            else:
                # position of each tilt counted in groups along the tilt order (the density of
                # groups is 1 / local group size); group centres evenly spread in it
                dens = 1.0 / np.maximum(np.asarray(group_scale, float)[order], 1e-6)
                dens *= n_groups / dens.sum()
                pos = np.empty(f)
                pos[order] = np.cumsum(dens) - dens / 2.0
                centres = np.linspace(0.5, n_groups - 0.5, n_groups)
            b = np.zeros((f, n_groups))
            for i in range(f):
                r = np.clip(pos[i], centres[0], centres[-1])
                k = min(int(np.searchsorted(centres, r, side="right")) - 1, n_groups - 2)
                a = (r - centres[k]) / (centres[k + 1] - centres[k])
                b[i, k], b[i, k + 1] = 1.0 - a, a
    if constraint is not None:
        for c in np.atleast_2d(np.asarray(constraint, float)):
            row = c @ b
            if b.shape[1] and np.any(np.abs(row) > 1e-12 * max(1.0, np.abs(row).max())):
                k = int(np.argmax(np.abs(row)))
                b = b - np.outer(b[:, k] / row[k], row)
                b = np.delete(b, k, axis=1)
    return b


class BundleProblem:
    """Residuals and analytic sparse Jacobian of the bead model for a set of observations.

    Per tilt ``i`` the model (pixels, radians) is, with ``X = (x, y, z)`` relative to the
    tomogram centre::

        D_i = [[(s_i + m_i) cos δ_i, 0,   0  ],      (tiltalign's distortion matrix: X-axis
               [(s_i + m_i) sin δ_i, s_i, 0  ],       stretch ``dmag`` m_i and skew δ_i act
               [0,                   0,   s_i]]       on the specimen, before the tilt)
        u = R2(ψ_i) · [Ry(θ_i) · D_i · X]_xy + t_i

    With ``m = δ = 0`` this is ``s R2(ψ) [Ry(θ) X]_xy + t``.

    Args:
        tilt_idx, bead_idx: ``(N,)`` 0-based indices of each observation (aligned tilts and
            kept beads, compact numbering).
        uv: ``(N, 2)`` observed positions (pixels).
        psi0_rad, theta0_rad: ``(F,)`` starting in-plane rotation and tilt (radians).
        b_rot, b_tilt, b_mag: per-tilt parameter maps (see :func:`param_map`); rotation and
            tilt increments are in radians, magnification increments are ``s − 1``.
        image_centre_px: ``(2,)`` ``⌊(W, H)/2⌋``.
        b_stretch, b_skew: maps of the X-stretch ``dmag`` (``m``, an increment of the X
            magnification, unitless) and of the skew ``δ`` (radians); ``None``: not solved.
    """

    KINDS = ("rotation", "tilt", "magnification", "stretch", "skew")

    def __init__(self, tilt_idx, bead_idx, uv, psi0_rad, theta0_rad, b_rot, b_tilt, b_mag,
                 image_centre_px, b_stretch=None, b_skew=None):
        self.ti = np.asarray(tilt_idx, int)
        self.bj = np.asarray(bead_idx, int)
        self.uv = np.asarray(uv, float)
        self.psi0 = np.asarray(psi0_rad, float)
        self.theta0 = np.asarray(theta0_rad, float)
        f = len(self.psi0)
        none = np.zeros((f, 0))
        self.b = [np.asarray(m) if m is not None else none
                  for m in (b_rot, b_tilt, b_mag, b_stretch, b_skew)]
        self.bs = [sp.csr_matrix(m) for m in self.b]
        self.ic = np.asarray(image_centre_px, float)
        self.n_tilts = f
        self.n_beads = int(self.bj.max()) + 1
        self.k = [m.shape[1] for m in self.b]
        self.n_params = sum(self.k) + 2 * self.n_tilts + 3 * self.n_beads
        self.n_obs = len(self.ti)
        self._rows = np.arange(2 * self.n_obs)

    # -- parameter vector layout ------------------------------------------------------------
    def split(self, p):
        """``(q, t (F, 2), X (B, 3))``: ``q`` lists the variables of each kind of
        :attr:`KINDS`; ``t`` the image positions of the tomogram centre; ``X`` the beads."""
        f, nb = self.n_tilts, self.n_beads
        q, o = [], 0
        for k in self.k:
            q.append(p[o:o + k])
            o += k
        t = p[o:o + 2 * f].reshape(f, 2)
        o += 2 * f
        x = p[o:o + 3 * nb].reshape(nb, 3)
        return q, t, x

    def pack(self, q, t, x):
        """Inverse of :meth:`split` (``q``: one array per kind; missing kinds are zero)."""
        q = list(q) + [np.zeros(k) for k in self.k[len(q):]]
        return np.concatenate([*(np.asarray(v, float) for v in q), np.ravel(t), np.ravel(x)])

    def zero_variables(self):
        """All per-tilt variables at their start values (empty arrays per kind)."""
        return [np.zeros(k) for k in self.k]

    def per_tilt(self, p):
        """``(ψ (rad), θ (rad), s, dmag m, skew δ (rad), t (px))`` per tilt."""
        q, t, _ = self.split(p)
        psi = self.psi0 + self.b[0] @ q[0]
        theta = self.theta0 + self.b[1] @ q[1]
        s = 1.0 + self.b[2] @ q[2]
        dm = self.b[3] @ q[3]
        dl = self.b[4] @ q[4]
        return psi, theta, s, dm, dl, t

    def predict(self, p, tilt_idx=None, points=None):
        """Predicted positions ``(N, 2)`` (pixels) of the observations (or of given points)."""
        psi, theta, s, dm, dl, t = self.per_tilt(p)
        x = self.split(p)[2] if points is None else np.asarray(points, float)
        ti = self.ti if tilt_idx is None else np.asarray(tilt_idx, int)
        bj = self.bj if points is None else np.arange(len(ti))
        return _project(psi[ti], theta[ti], s[ti], dm[ti], dl[ti], t[ti], x[bj])

    # -- residuals and Jacobian --------------------------------------------------------------
    def residuals(self, p):
        """``(2N,)`` interleaved ``pred − obs`` (pixels), then 3 gauge rows."""
        e = (self.predict(p) - self.uv).ravel()
        return np.concatenate([e, self._gauge(p)])

    def _gauge(self, p):
        _, t, x = self.split(p)
        return np.concatenate([np.sum(t - self.ic, axis=0), [np.sum(x[:, 2])]])

    def jacobian(self, p) -> sp.csr_matrix:
        """Sparse ``(2N + 3, n_params)`` Jacobian of :meth:`residuals`."""
        psi, theta, s, dm, dl, _ = self.per_tilt(p)
        x = self.split(p)[2]
        ti, bj = self.ti, self.bj
        n, f, nb = self.n_obs, self.n_tilts, self.n_beads
        cp, sp_ = np.cos(psi[ti]), np.sin(psi[ti])
        ct, st = np.cos(theta[ti]), np.sin(theta[ti])
        cd, sd = np.cos(dl[ti]), np.sin(dl[ti])
        sc = s[ti]
        xm = sc + dm[ti]
        xb = x[bj]
        x0, x1, x2 = xb[:, 0], xb[:, 1], xb[:, 2]
        qx = ct * xm * cd * x0 + st * sc * x2
        qy = xm * sd * x0 + sc * x1

        def rot(ax, ay):  # R2(ψ) · (ax, ay), interleaved
            return np.stack([cp * ax - sp_ * ay, sp_ * ax + cp * ay], 1).ravel()

        rqx, rqy = cp * qx - sp_ * qy, sp_ * qx + cp * qy
        derivs = [
            np.stack([-rqy, rqx], 1).ravel(),                              # ψ
            rot(-st * xm * cd * x0 + ct * sc * x2, np.zeros(n)),            # θ
            rot(ct * cd * x0 + st * x2, sd * x0 + x1),                      # s
            rot(ct * cd * x0, sd * x0),                                     # dmag
            rot(-ct * xm * sd * x0, xm * cd * x0),                          # skew δ
        ]
        rows = self._rows
        cols_t = np.repeat(ti, 2)
        blocks = []
        for d, bm in zip(derivs, self.bs, strict=True):
            dm_ = sp.csr_matrix((d, (rows, cols_t)), shape=(2 * n, f))
            blocks.append(dm_ @ bm)
        # shifts: identity per coordinate
        col_shift = 2 * cols_t + np.tile([0, 1], n)
        blocks.append(sp.csr_matrix((np.ones(2 * n), (rows, col_shift)), shape=(2 * n, 2 * f)))
        # bead positions: R2(ψ) [[cθ xm cδ, 0, sθ s], [xm sδ, s, 0]]
        a00, a02 = ct * xm * cd, st * sc
        a10, a11 = xm * sd, sc
        vals = np.stack([
            cp * a00 - sp_ * a10, -sp_ * a11, cp * a02,
            sp_ * a00 + cp * a10, cp * a11, sp_ * a02,
        ], 1).ravel()
        rr = np.repeat(rows, 3)
        cc = (3 * np.repeat(bj, 2)[:, None] + np.arange(3)[None, :]).ravel()
        blocks.append(sp.csr_matrix((vals, (rr, cc)), shape=(2 * n, 3 * nb)))
        j_obs = sp.hstack(blocks, format="csr")
        # gauge rows
        k_before = sum(self.k)
        g = sp.lil_matrix((3, self.n_params))
        g[0, k_before + 2 * np.arange(f)] = 1.0
        g[1, k_before + 2 * np.arange(f) + 1] = 1.0
        g[2, k_before + 2 * f + 3 * np.arange(nb) + 2] = 1.0
        return sp.vstack([j_obs, g.tocsr()], format="csr")


def _project(psi, theta, s, dm, dl, t, x):
    """``R2(ψ) [Ry(θ) D x]_xy + t`` for matching rows (pixels, radians; see BundleProblem)."""
    xm = s + dm
    qx = np.cos(theta) * xm * np.cos(dl) * x[:, 0] + np.sin(theta) * s * x[:, 2]
    qy = xm * np.sin(dl) * x[:, 0] + s * x[:, 1]
    cp, sn = np.cos(psi), np.sin(psi)
    return np.stack([cp * qx - sn * qy, sn * qx + cp * qy], 1) + t


def levenberg_marquardt(problem: BundleProblem, p0, weights, *, max_iter=100, tol=1e-12):
    """Weighted Levenberg–Marquardt on ``Σ w_k e_k²`` (Marquardt scaling, dense normal solve).

    Args:
        problem: the :class:`BundleProblem`.
        p0: start parameters.
        weights: ``(N,)`` per-observation weights (both coordinates), ≥ 0.
        max_iter: iteration limit.
        tol: stop when the relative cost decrease falls below this.

    Returns:
        ``(p, cost, n_iter)`` with ``cost = ½ Σ w e²`` (px²).
    """
    w = np.concatenate([np.repeat(weights, 2), np.ones(3)])
    p = np.asarray(p0, float).copy()
    r = problem.residuals(p)
    cost = 0.5 * np.sum(w * r * r)
    lam = 1e-3
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        jac = problem.jacobian(p)
        jw = jac.multiply(w[:, None]).tocsr()
        h = (jac.T @ jw).toarray()
        g = jw.T @ r
        d = np.maximum(np.diag(h), 1e-12)
        improved = False
        for _ in range(20):
            a = h + lam * np.diag(d)
            try:
                step = -scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), g)
            except np.linalg.LinAlgError:
                step = -np.linalg.lstsq(a, g, rcond=None)[0]
            p_new = p + step
            r_new = problem.residuals(p_new)
            c_new = 0.5 * np.sum(w * r_new * r_new)
            if c_new <= cost:
                improved = True
                break
            lam *= 10.0
        if not improved:
            break
        rel = (cost - c_new) / max(cost, 1e-300)
        p, r, cost = p_new, r_new, c_new
        lam = max(lam / 10.0, 1e-12)
        if rel < tol or np.max(np.abs(step)) < 1e-12:
            break
    return p, cost, it


RAYLEIGH_MEDIAN = float(np.sqrt(2.0 * np.log(2.0)))  # median of |e| / σ for 2D Gaussian noise


def robust_weights(dist_px, kind: str, c: float | None = None):
    """IRLS weights from 2D residual lengths, with the noise σ estimated from their median.

    ``σ = median(|e|) / √(2 ln 2)`` (the median of a Rayleigh distribution), then with
    ``u = |e| / σ``: ``huber`` gives ``min(1, c / u)`` (c = 2 by default), ``tukey`` gives
    ``(1 − (u / c)²)²`` for ``u < c`` else 0 (c = 4.685 by default).

    Returns:
        ``(weights (N,), sigma_px)``.
    """
    dist = np.asarray(dist_px, float)
    sigma = max(float(np.median(dist)) / RAYLEIGH_MEDIAN, 1e-9)
    u = dist / sigma
    if kind == "huber":
        c = 2.0 if c is None else c
        return np.minimum(1.0, c / np.maximum(u, 1e-300)), sigma
    if kind == "tukey":
        c = 4.685 if c is None else c
        return np.where(u < c, (1.0 - (u / c) ** 2) ** 2, 0.0), sigma
    raise ValueError(f"robust kind {kind!r}; expected none, huber or tukey")
