"""Per-particle 3D beam-induced motion with RELION's Gaussian-process prior (``--motion``).

**Model** (RELION's ``GP_motion_model``; spec §3). Tilts are ordered by dose rank ``k``
(ascending ``rlnMicrographPreExposure``, :func:`polish3d.geometry.dose_order`). The trajectory of
particle ``p`` is anchored at ``k = 0`` and advances by one velocity per consecutive dose step
``m = 0 … F−2``::

    X_pk = X_p + Σ_{m<k} v_pm ,      v_pm = Σ_b B[p, b] · c_{m,b}     (c_{m,b} ∈ R³, pixels)

``X_p`` is the refined position at the lowest-dose tilt (the core's ``positions``). The spatial
basis ``B`` (pixels per dose step) comes from the eigen-decomposition of the covariance
``K = B·Bᵀ`` of the *initial* positions (pixels)::

    K(a, b) = σ_v² · exp(−|a − b| / σ_d)          (default, exponential)
    K(a, b) = σ_v² · exp(−|a − b|² / σ_d²)        (``--sq_exp_ker``; no factor ½, as RELION)

with ``σ_v = fd·s_vel/px`` and ``σ_d = fd·s_div/px`` (``fd`` the dose per tilt, e⁻/Å²; both
sigmas are scaled by the dose as in RELION, spec §7.1 item 8), or ``σ_v = s_vel/px``,
``σ_d = s_div/px`` with ``--abs_params``. ``B[:, b] = sqrt(λ_b)·V[:, b]`` keeps the eigenvalues
``λ_b ≥ 1e-10 px²`` (RELION's absolute threshold) in descending order, at most ``--max_ed``.
The prior added to the stage-2 cost is ``Σ_{m,b} |c_{m,b}|²`` (no ½, the same scale against the
CC data term as RELION, so ``--s_vel``/``--s_div`` mean the same; it corresponds to velocities
``v ~ N(0, ½·K)`` per axis and step). The positions are a cumulative sum over dose steps, so
the cost and gradient are ``O(N·nb·F)`` (RELION's coefficient gradient is ``O(N·nb·F²)``).

**Large tomograms** (polish3d; ``--max_ed`` not given and ``N > MotionConfig.low_rank``): the
dense ``N × N`` eigen-decomposition (``O(N³)``) and a basis of ``N`` columns (``O(N²·F)`` per
cost evaluation) are replaced by a *low-rank plus diagonal* ("FITC") prior: the top
``low_rank`` eigenpairs from a randomized eigen-decomposition (Halko et al., power iterations on
blocked kernel products, ``O(N²·low_rank)`` without storing ``K``), plus an independent
per-particle term that restores the exact prior variance of every particle::

    v_pm = Σ_b B[p, b]·c_{m,b} + s_p·e_{m,p} ,   s_p² = K_pp − Σ_b B[p, b]²,   prior Σ|c|² + Σ|e|²

so ``cov(v) = B·Bᵀ + diag(s²)``: the marginal variance of every velocity is exact and only the
short-range part of the correlations (the small-eigenvalue tail) is approximated (for the
default ``s_div`` and 2000 particles in a 1000 × 1000 × 300 px tomogram, the covariance error is
< 3 % of ``σ_v²`` with 128 modes). An explicit ``--max_ed`` is honoured exactly as RELION does
(truncation, no diagonal term).

**Gauge** (polish3d). A translation common to all particles at one dose step is exactly
degenerate with that tilt's 2D shift (its in-plane part moves every projection equally; its
depth part does not enter the stage-2 cost), and a common (small) rotation with that tilt's
angles. RELION leaves these rigid parts in the model, where the unpenalised per-tilt parameters
win against the GP prior — but slowly, along directions of curvature ``2`` next to the large
data curvature (for the default ``s_div`` the top GP mode is almost a pure translation). polish3d
removes the least-squares rigid part (per step: the particle mean and the infinitesimal rotation
``ω × (X − X̄)`` about the centroid of the initial positions) from the velocities
(:func:`remove_rigid`), when the tilt shifts (translation) and also the tilt angles (rotation)
are free. The reachable motions modulo a rigid motion are the same and the minimum-norm
coefficients for them are the same (``{c : P·B·c = w} = {c : B·c = w + rigid}``, ``P`` the
projection), so the optimum of the projections is unchanged (exactly for translations, to first
order in the angle for rotations), the problem is better conditioned, and the written
trajectories are the non-rigid motion: zero particle mean and zero net rotation at every tilt
(the rigid part of the beam-induced motion is in the refined tilt shifts and angles, as RELION's
documentation says: "these cannot be distinguished").

**Input trajectories** (``motion.star``, :attr:`ParticleData.trajectories_px`). With
``--motion`` they are the starting point: they are held fixed as a base offset, the GP models a
correction on top of them (the prior applies to the correction) and the *total* is written, so
nothing is applied twice and a second run refines the first run's result. (RELION uses them only
to centre the CC windows and replaces them by the new fit, spec §2.9.) If the input is not zero
at the lowest-dose tilt, that offset is moved into the particle position when writing, so the
written trajectories are zero there and every projection is unchanged. Without ``--motion`` the
core keeps the input trajectories fixed and writes them back.

**--const_p**: as in RELION, the motion model is disabled (no free coefficients; the input
trajectories stay as they are).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from polish3d import geometry

__all__ = [
    "GPMotion",
    "MotionConfig",
    "MotionPlugin",
    "build_plugin",
    "gp_basis",
    "kernel_matrix",
    "motion_sigmas_px",
]

EIG_EPS = 1e-10  # px²: RELION's GaussianProcess::getBasis threshold on eigenvalues
BASIS_BUCKET = 32  # basis columns are padded to a multiple of this (fewer jit compilations)


@dataclasses.dataclass(frozen=True)
class MotionConfig:
    """Motion options (RELION's ``--s_vel --s_div --abs_params --sq_exp_ker --max_ed``).

    Attributes:
        s_vel: velocity sigma, Å per e⁻/Å² of dose (Å per dose step with ``abs_params``).
        s_div: correlation length, Å per e⁻/Å² (Å with ``abs_params``).
        abs_params: do not scale the sigmas by the dose per tilt.
        sq_exp_ker: squared-exponential instead of exponential kernel.
        max_ed: maximum number of eigen-deformations (``-1``: all, RELION semantics: truncation).
        low_rank: polish3d: with ``max_ed = -1`` and more particles than this, use the
            top-``low_rank`` eigenpairs plus a per-particle diagonal term (see the module
            docstring); ``0`` never (exact dense basis, ``O(N³)`` set-up, ``O(N²F)`` per step).
        seed: seed of the randomized eigen-decomposition (results are deterministic).
    """

    s_vel: float = 0.5
    s_div: float = 5000.0
    abs_params: bool = False
    sq_exp_ker: bool = False
    max_ed: int = -1
    low_rank: int = 128
    seed: int = 0


def motion_sigmas_px(cfg: MotionConfig, pixel_size_ang: float, fractional_dose: float) -> tuple[float, float]:
    """``(σ_v, σ_d)`` in pixels (per dose step) from the options (spec §3)."""
    scale = 1.0 if cfg.abs_params else float(fractional_dose)
    return scale * cfg.s_vel / pixel_size_ang, scale * cfg.s_div / pixel_size_ang


def _kernel_from_dist2(d2: np.ndarray, sig_v: float, sig_d: float, sq_exp: bool) -> np.ndarray:
    sig_d = max(sig_d, 1e-12)
    if sq_exp:
        return sig_v**2 * np.exp(-d2 / sig_d**2)
    return sig_v**2 * np.exp(-np.sqrt(np.maximum(d2, 0.0)) / sig_d)


def kernel_matrix(
    a: np.ndarray, b: np.ndarray, sig_v: float, sig_d: float, sq_exp: bool = False
) -> np.ndarray:
    """Covariance ``K(a_i, b_j)`` (px²) between positions ``a (n, 3)`` and ``b (m, 3)`` (pixels)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return _kernel_from_dist2(np.maximum(d2, 0.0), sig_v, sig_d, sq_exp)


def _kernel_times(x, a, sig_v, sig_d, sq_exp, block=2048):
    """``K(x, x) @ a`` without storing ``K`` (row blocks of ``block``)."""
    out = np.empty((x.shape[0], a.shape[1]))
    for i in range(0, x.shape[0], block):
        out[i : i + block] = kernel_matrix(x[i : i + block], x, sig_v, sig_d, sq_exp) @ a
    return out


def _randomized_eigh(x, sig_v, sig_d, sq_exp, rank, seed, n_power=3):
    """Top ``rank`` eigenpairs of ``K(x, x)`` (randomized range finder with power iterations)."""
    n = x.shape[0]
    k = min(n, rank + max(rank // 2, 16))
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(_kernel_times(x, rng.normal(size=(n, k)), sig_v, sig_d, sq_exp))[0]
    for _ in range(n_power):
        q = np.linalg.qr(_kernel_times(x, q, sig_v, sig_d, sq_exp))[0]
    kq = _kernel_times(x, q, sig_v, sig_d, sq_exp)
    small = q.T @ kq
    w, u = np.linalg.eigh(0.5 * (small + small.T))
    order = np.argsort(w)[::-1][:rank]
    return w[order], q @ u[:, order]


def gp_basis(
    positions_px: np.ndarray,
    sig_v: float,
    sig_d: float,
    *,
    sq_exp: bool = False,
    max_ed: int = -1,
    low_rank: int = 0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GP velocity basis of particles at ``positions_px`` ``(N, 3)`` (pixels).

    Returns:
        ``(B, s, lam)``: ``B (N, nb)`` (px) with ``B·Bᵀ ≈ K``, columns in descending eigenvalue
        order; ``s (N,)`` (px) the per-particle diagonal term (zero unless the low-rank
        approximation is used; then ``B·Bᵀ + diag(s²)`` has the exact diagonal of ``K``);
        ``lam (nb,)`` the eigenvalues (px²).
    """
    x = np.asarray(positions_px, np.float64)
    n = x.shape[0]
    if n == 0:
        return np.zeros((0, 0)), np.zeros(0), np.zeros(0)
    use_low_rank = max_ed < 0 and 0 < low_rank < n
    if use_low_rank:
        lam, vec = _randomized_eigh(x, sig_v, sig_d, sq_exp, low_rank, seed)
    else:
        lam, vec = np.linalg.eigh(kernel_matrix(x, x, sig_v, sig_d, sq_exp))
        lam, vec = lam[::-1], vec[:, ::-1]
    keep = lam.size if max_ed < 0 else min(max_ed, lam.size)
    small = np.nonzero(lam < EIG_EPS)[0]
    if small.size:
        keep = min(keep, int(small[0]))
    lam, vec = lam[:keep], vec[:, :keep]
    # a deterministic sign per column (eigenvectors are defined up to sign)
    sign = np.sign(vec[np.argmax(np.abs(vec), axis=0), np.arange(keep)])
    vec = vec * np.where(sign == 0, 1.0, sign)
    b = vec * np.sqrt(lam)[None, :]
    s = np.zeros(n)
    if use_low_rank:
        s = np.sqrt(np.maximum(sig_v**2 - (b * b).sum(1), 0.0))
    return b, s, lam


def rigid_frame(positions_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(r, J⁺)``: positions relative to their centroid ``(N, 3)`` px and the pseudo-inverse of
    ``J = Σ_p (|r_p|²·I − r_p·r_pᵀ)`` ``(3, 3)`` (1/px²), for :func:`remove_rigid`."""
    x = np.asarray(positions_px, np.float64)
    if x.shape[0] == 0:
        return np.zeros((0, 3)), np.zeros((3, 3))
    r = x - x.mean(0)
    j = np.sum(np.sum(r * r, 1)) * np.eye(3) - r.T @ r
    return r, np.linalg.pinv(j, rcond=1e-9)


def remove_rigid(v, r, jinv, mask, rotation: bool, xp=jnp):
    """Velocities ``v (M, N, 3)`` minus their least-squares rigid part per step (the gauge).

    Removes the particle mean ``t_m`` (mask-weighted) and, with ``rotation``, the infinitesimal
    rotation ``ω_m × r_p`` with ``ω_m = J⁺·Σ_p r_p × v_mp`` (``r``, ``J⁺`` from
    :func:`rigid_frame`; padded rows of ``r`` are zero). Works with ``xp = jnp`` or ``np``.
    """
    t = xp.einsum("p,mpd->md", mask, v) / xp.maximum(xp.sum(mask), 1.0)
    v = v - mask[None, :, None] * t[:, None, :]
    if rotation:
        torque = xp.sum(xp.cross(r[None], v), axis=1)  # (M, 3)
        omega = torque @ jinv.T
        v = v - xp.cross(omega[:, None, :], r[None])
    return v


@dataclasses.dataclass(frozen=True)
class GPMotion:
    """The jit-static part of the motion model (hashable; shapes come from the data arrays).

    Data keys used: ``motion_basis (N_pad, nb)`` px, ``motion_diag (N_pad,)`` px,
    ``motion_rank (F,)`` int32 (dose rank of each file-order tilt), ``motion_base (N_pad, F, 3)``
    px (fixed input trajectories), ``motion_r (N_pad, 3)`` px and ``motion_jinv (3, 3)`` 1/px²
    (:func:`rigid_frame` of the initial positions), ``particle_mask (N_pad,)``.

    Attributes:
        diagonal: the parameters include the per-particle diagonal block ``e``.
        translation: remove the common translation of every step (per-tilt shifts free).
        rotation: remove the common rotation of every step (per-tilt angles and shifts free).
    """

    diagonal: bool = False
    translation: bool = True
    rotation: bool = True

    def velocities(self, params, data):
        """Velocities ``(F−1, N_pad, 3)`` px per dose step from ``params (F−1, nb [+N_pad], 3)``."""
        basis = data["motion_basis"]
        nb = basis.shape[1]
        v = jnp.einsum("pb,mbd->mpd", basis, params[:, :nb])
        if self.diagonal:
            v = v + data["motion_diag"][None, :, None] * params[:, nb:]
        if self.translation:
            v = remove_rigid(v, data["motion_r"], data["motion_jinv"], data["particle_mask"], self.rotation)
        return v

    def offsets_and_prior(self, params, data):
        """Per-particle per-tilt offsets ``(N_pad, F, 3)`` px (file order) and the prior ``Σ c²``."""
        v = self.velocities(params, data)
        zero = jnp.zeros((1,) + v.shape[1:], v.dtype)
        cum = jnp.concatenate([zero, jnp.cumsum(v, axis=0)], axis=0)  # (F, N_pad, 3) by rank
        offsets = rearrange(jnp.take(cum, data["motion_rank"], axis=0), "f n xyz -> n f xyz")
        return offsets + data["motion_base"], jnp.sum(params * params)


_velocities_jit = jax.jit(lambda model, params, data: model.velocities(params, data), static_argnums=0)
_offsets_jit = jax.jit(lambda model, params, data: model.offsets_and_prior(params, data), static_argnums=0)


class MotionPlugin:
    """Stage-2 plug-in of the GP motion model (contract: ``refine.tomogram._build_plugins``).

    Built once per tomogram from the initial positions; its parameters ``(F−1, nb_pad [+N_pad], 3)``
    (dimensionless GP coefficients per dose step) are carried across outer iterations.
    """

    key = "motion"

    def __init__(self, cfg: MotionConfig, ts, particles, config, n_pad: int, report=None):
        t0 = time.perf_counter()
        report = report or (lambda *a, **k: None)
        self.cfg = cfg
        n, f = particles.n_particles, ts.n_tilts
        self.n, self.f, self.n_pad = n, f, n_pad
        self.seq = geometry.dose_order(ts.pre_exposure_e_per_ang2)
        rank = np.empty(f, np.int64)
        rank[self.seq] = np.arange(f)
        self.rank = rank
        self.sig_v, self.sig_d = motion_sigmas_px(cfg, ts.pixel_size_ang, ts.fractional_dose_e_per_ang2)
        self.free = not config.const_p
        translation = not config.const_s
        rotation = translation and not config.const_a
        x0 = np.asarray(particles.positions_px, np.float64)
        b, s, lam = gp_basis(
            x0, self.sig_v, self.sig_d, sq_exp=cfg.sq_exp_ker, max_ed=cfg.max_ed,
            low_rank=cfg.low_rank, seed=cfg.seed,
        )
        self.n_modes = b.shape[1]
        self.eigenvalues = lam
        nbp = max(BASIS_BUCKET, -(-self.n_modes // BASIS_BUCKET) * BASIS_BUCKET)
        self.basis = np.zeros((n_pad, nbp))
        self.basis[:n, : self.n_modes] = b
        self.diag = np.zeros(n_pad)
        self.diag[:n] = s
        diagonal = bool(np.any(s > 0))
        self.static = GPMotion(diagonal=diagonal, translation=translation, rotation=rotation)
        self.n_params_per_step = nbp + (n_pad if diagonal else 0)
        base = np.zeros((n_pad, f, 3))
        self.has_input = particles.trajectories_px is not None
        if self.has_input:
            base[:n] = np.asarray(particles.trajectories_px, np.float64)
        self.base = base
        r, jinv = rigid_frame(x0)
        self.r = np.zeros((n_pad, 3))
        self.r[:n] = r
        self.jinv = jinv
        self.mask = (np.arange(n_pad) < n).astype(np.float64)
        self._data = {
            "motion_basis": jnp.asarray(self.basis, jnp.float32),
            "motion_diag": jnp.asarray(self.diag, jnp.float32),
            "motion_rank": jnp.asarray(rank, jnp.int32),
            "motion_base": jnp.asarray(base, jnp.float32),
            "motion_r": jnp.asarray(self.r, jnp.float32),
            "motion_jinv": jnp.asarray(jinv, jnp.float32),
        }
        trace = n * self.sig_v**2
        self.basis_seconds = time.perf_counter() - t0
        self.kept_variance_fraction = float(lam.sum() / trace) if trace > 0 else 1.0
        if not self.free:
            report("motion", message="motion: positions held fixed (const_p): not refined (as RELION)")
        kind = "low-rank + diagonal" if diagonal else "exact"
        report(
            "motion",
            message=(
                f"motion: σ_vel = {self.sig_v:.4g} px/frame, σ_div = {self.sig_d:.4g} px; keeping "
                f"{self.n_modes} of {n} eigendeformations ({kind}, {100 * self.kept_variance_fraction:.1f} % "
                f"of the variance in the basis); basis in {self.basis_seconds:.2f} s"
            ),
        )

    # -- contract -------------------------------------------------------------------------------

    def init_params(self):
        """Zero coefficients ``(F−1, nb_pad [+ N_pad], 3)`` float32 (start: the input trajectories)."""
        return jnp.zeros((max(self.f - 1, 0), self.n_params_per_step, 3), jnp.float32)

    def data(self, projections, positions):
        """Arrays for the stage-2 data pytree (independent of the current geometry)."""
        return dict(self._data)

    def velocities(self, params) -> np.ndarray:
        """``(F−1, N_pad, 3)`` px per dose step: the model's own :meth:`GPMotion.velocities`,
        evaluated on the host in float64."""
        with jax.enable_x64(True):
            v = _velocities_jit(self.static, jnp.asarray(params, jnp.float64), self._host_data())
            return np.asarray(v, np.float64)

    def gp_offsets(self, params) -> np.ndarray:
        """The GP part of the trajectories ``(N, F, 3)`` px, file order, zero at dose rank 0: the
        model's own :meth:`GPMotion.offsets_and_prior` without the input trajectories."""
        with jax.enable_x64(True):
            offsets, _ = _offsets_jit(self.static, jnp.asarray(params, jnp.float64), self._host_data())
            return np.asarray(offsets, np.float64)[: self.n] - self.base[: self.n]

    def _host_data(self) -> dict:
        """The model's data from the float64 host copies (call inside ``jax.enable_x64``)."""
        host = {"motion_basis": self.basis, "motion_diag": self.diag, "motion_base": self.base,
                "motion_r": self.r, "motion_jinv": self.jinv, "particle_mask": self.mask}
        return {"motion_rank": jnp.asarray(self.rank, jnp.int32),
                **{k: jnp.asarray(np.asarray(v, np.float64)) for k, v in host.items()}}

    def trajectories(self, params) -> np.ndarray:
        """Current total trajectories ``(N, F, 3)`` px (file order): input + GP correction."""
        return self.base[: self.n] + self.gp_offsets(params)

    def finish(self, params, result) -> None:
        """Store the refined trajectories (zero at the lowest-dose tilt) and the motion metrics."""
        gp = self.gp_offsets(params)
        traj = self.base[: self.n] + gp
        j0 = int(self.seq[0]) if self.f else 0
        anchor = traj[:, j0, :].copy() if self.f else np.zeros((self.n, 3))
        if np.any(anchor != 0):
            # input trajectories not zero at the lowest-dose tilt: move that into the position
            traj = traj - anchor[:, None, :]
            if result.positions_px is not None:
                result.positions_px = np.asarray(result.positions_px, np.float64) + anchor
        result.trajectories_px = traj
        c = np.asarray(params, np.float64)
        per_tilt = np.sqrt(np.mean(np.sum(gp**2, -1), 0)) if self.n else np.zeros(self.f)
        rms = float(np.sqrt(np.mean(np.sum(gp**2, -1)))) if gp.size else 0.0
        steps = self.velocities(params)[:, : self.n]
        result.metrics["motion"] = {
            "sigma_vel_px": self.sig_v,
            "sigma_div_px": self.sig_d,
            "n_eigendeformations": int(self.n_modes),
            "low_rank_diagonal": bool(self.static.diagonal),
            "basis_variance_fraction": self.kept_variance_fraction,
            "basis_seconds": self.basis_seconds,
            "refined": bool(self.free),
            "input_trajectories": bool(self.has_input),
            "prior": float(np.sum(c * c)),
            "correction_rms_px": rms,
            "correction_max_px": float(np.linalg.norm(gp, axis=-1).max()) if gp.size else 0.0,
            "correction_per_tilt_rms_px": [float(v) for v in per_tilt],
            "velocity_rms_px": float(np.sqrt(np.mean(np.sum(steps**2, -1)))) if steps.size else 0.0,
            "total_rms_px": float(np.sqrt(np.mean(np.sum(traj**2, -1)))) if traj.size else 0.0,
        }


def build_plugin(cfg: MotionConfig, ts, particles, config, n_pad: int, report=None) -> MotionPlugin:
    """The motion plug-in of one tomogram (basis built once from the initial positions).

    Args:
        cfg: motion options.
        ts: the tilt series (pixel size Å, dose per tilt e⁻/Å², pre-exposures).
        particles: the particles (initial positions px, optional input trajectories px).
        config: the ``AlignConfig`` (``const_p`` disables the motion, ``const_s`` the gauge
            centring).
        n_pad: padded particle count of the stage-2 arrays.
        report: optional progress callback ``report(event, **figures)``.
    """
    return MotionPlugin(cfg, ts, particles, config, n_pad, report)
