"""2D deformations of the tilt images (RELION's ``linear``, ``spline`` and ``Fourier`` models).

A deformation maps a projected tilt-image position ``u`` (pixels) to ``u + def(u)``
(``Tomogram::projectPoint``). The three models, their coefficient layouts (exactly RELION's, so
``rlnTomoDeformationCoefficients`` round-trips) and regularisers (spec §4):

* ``spline``: cubic-Hermite patches on a ``gw × gh`` node grid spanning the image, node ``(0, 0)``
  at pixel ``(0, 0)``, node ``(gw−1, gh−1)`` at ``(W, H)`` (spacing ``W/(gw−1)``, ``H/(gh−1)`` px).
  Per node and output dimension ``d``: value (px), slope_x, slope_y, twist — derivatives per
  *grid cell* (px per cell, px per cell²), at index ``((d·gh + iy)·gw + ix)·4 + {0, 1, 2, 3}``
  (``8·gw·gh`` numbers). Positions outside the image are clamped to the border cell.
  Regulariser ``λ·Σ c²``.
* ``linear``: ``(a_xx, a_xy, a_yy)`` (dimensionless), ``def = (a_xx·rx, a_xy·rx + a_yy·ry)`` with
  ``r = u − (W/2, H/2)``. The grid is ignored (but stored). Regulariser ``λ·Σ a²``.
* ``Fourier``: the frequency set of :func:`fourier_frequencies` (DC excluded), wave vectors
  ``k = (ix·π/W, iy·π/H)`` rad/px, ``def_d(u) = Σ_i re_{d,i}·cos(k_i·u) + im_{d,i}·sin(k_i·u)``
  (px), layout ``[d][i](re, im)`` (``4·n_freq`` numbers). Regulariser ``λ·Σ |k_i|²·|c_{d,i}|²``.
  This is the layout RELION's *writer* (the model) uses; RELION's own reader
  (``Fourier2DDeformation``) copies ``(gw/2+1)·gh·2`` complex numbers, i.e. over-reads the
  stored vector (spec §7.1 item 6). polish3d reads and writes the ``4·n_freq`` layout.

Per series (``per_tilt=False``, RELION's default) one update vector is shared by all tilts;
``per_tilt`` (``--per_frame_deformation``) estimates one per tilt. Coefficients are stored per
tilt (file order) in both cases.

**Evaluation** is pure ``jax.numpy`` (vmapped over tilts, differentiable): autodiff replaces
RELION's hand-written Jacobians (so RELION's wrong spline twist gradient, spec §7.1 item 5, has
no counterpart here).

**Parametrisation and gauge.** The stage-2 parameter block ``"deformation"`` is an *update*
``δ`` (``(n,)`` per series, ``(F, n)`` per tilt, all zero at the start); the coefficients are
``c_f = base_f + G·(s ⊙ δ)`` where ``base_f`` is the deformation the run starts from (the input's,
per tilt, or zero), ``s`` a per-coefficient unit (1, except ``linear``: ``2/max(W, H)``, so one
unit moves the image edge by about one pixel) and ``G`` a fixed projection that removes the
gauge. A constant field is exactly degenerate with the per-tilt shifts, and a rotation field
``(−ry, rx)`` with the in-plane rotations ψ (which act on the projected positions as 2D
rotations); for the ``spline`` model both are representable, so without a gauge the optimum
would be a whole affine family. ``G`` is the orthogonal projection (in coefficient space) onto
the updates whose field has **zero mean offset and zero mean rotation over the image**
(evaluated on a 32 × 32 grid of image points): these 3 directions are then carried by the
per-tilt shifts and ψ alone, and nothing the model could express is lost. The rule is applied
to exactly those rigid fields the model can represent (tested numerically): ``spline`` gets
all three constraints; ``linear`` and ``Fourier`` cannot represent a constant or a rotation
(the degeneracy is only partial, a conditioning issue, not a gauge), so ``G = I`` for them —
forcing a zero mean on a ``Fourier`` field would remove its lowest non-rigid mode
(``sin(πx/W)``). The constant constraints are used only when the shifts are free, the rotation
only when the angles and shifts are free.

**Near-degeneracies and shrinkage.** Beyond those exact directions, much of a smooth field can
be reproduced by the other free parameters: for a thin specimen the per-tilt angles φ, θ act
on the projections almost like affine fields, and for a single-axis tilt series a field along
the projected tilt axis that varies only along it is exactly what moving each particle along
the axis does (the positions are free). There is no sharp gap between determined and
undetermined field directions (the singular values of the field block, after projecting out
the other parameters, decay smoothly), so L-BFGS ends somewhere along these shallow valleys:
on undeformed analytic data an unconstrained field drifts to ~0.4 px RMS. polish3d therefore
adds a *shrinkage* of the update field at the particles, ``shrink·κ̄·Σ w·|Δdef(u)|²``
(:func:`shrinkage_scale`; ``κ̄`` the mean CC peak curvature, so the term is ``shrink`` times what
the same displacement costs in the data term, whatever the CC scale). Default
``shrink = 0.01``: a field direction is left to the rigid parameters and positions when they
reproduce its effect to within ~10 %; undeformed data then give < 0.05 px RMS fields while a
2.5-px warp is still fitted to ~0.1 px (tests). ``shrink = 0`` is RELION's behaviour.
``--def_reg`` (default 0) adds RELION's regulariser on the full coefficients ``c_f`` (per
series: on their tilt mean). Consequence for users: the estimated field is the part of the
warp that the rigid model and the positions cannot explain — compare deformations by the
reprojection error (``polish3d score``), not coefficient by coefficient.

**Input deformations** (spec §7.1 item 11): a deformation stored in the input is applied
consistently — in the CC centring, in the model and in the output. Without ``--deformation``
it is a fixed model (``free=False``) and written back unchanged; with ``--deformation`` and the
same model and grid it is the starting point ``base`` (per tilt: RELION averages the tilts in
per-series mode, which changes the field at the start; polish3d keeps every tilt's stored field
and estimates one common update); a different grid (or model) is discarded with a warning, as
RELION does for the grid (``align.cpp:137-150``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from polish3d.errors import InputError
from polish3d.model import Deformation, deformation_coefficient_count
from polish3d.refine import forward

__all__ = [
    "MODELS", "DeformationConfig", "DeformationModel", "DeformationPlugin", "build_plugin",
    "evaluate", "evaluate_per_tilt", "fixed_model", "fourier_frequencies", "gauge_projection",
    "n_coefficients", "plot_deformation", "prior_weights", "rigid_residual", "shrinkage_scale",
]

#: The model names (``rlnTomoDeformationType``, ``--def_model``; case-sensitive).
MODELS = ("linear", "spline", "Fourier")


@dataclasses.dataclass(frozen=True)
class DeformationConfig:
    """Options of the deformation estimate (``--deformation`` and friends; hashable).

    Attributes:
        model: ``"linear"``, ``"spline"`` or ``"Fourier"`` (``--def_model``).
        grid: ``(gw, gh)`` (``--def_w``, ``--def_h``): spline nodes, Fourier frequency extent;
            ignored (but stored) by ``linear``.
        reg: ``λ`` (``--def_reg``), weight of RELION's regulariser (same cost scale as RELION).
        per_tilt: one deformation per tilt (``--per_frame_deformation``) instead of one per
            tilt series.
        shrink: polish3d: relative weight of the shrinkage of the deformation *update* at the
            particles (:func:`shrinkage_scale`; 0 = off, RELION's behaviour).
    """

    model: str = "spline"
    grid: tuple[int, int] = (3, 3)
    reg: float = 0.0
    per_tilt: bool = False
    shrink: float = 0.01

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"deformation model {self.model!r}: expected one of {MODELS}")
        gw, gh = (int(v) for v in self.grid)
        if self.model == "spline" and (gw < 2 or gh < 2):
            raise ValueError(f"spline deformation grid {self.grid}: needs at least 2 × 2 nodes")
        if self.model == "Fourier" and n_coefficients("Fourier", (gw, gh)) == 0:
            raise ValueError(f"Fourier deformation grid {self.grid}: no frequencies")
        object.__setattr__(self, "grid", (gw, gh))


# ----------------------------------------------------------------------------------------------
# the models (pure functions)
# ----------------------------------------------------------------------------------------------


def fourier_frequencies(grid) -> np.ndarray:
    """RELION's Fourier frequency set ``(n_freq, 2)`` of integer ``(ix, iy)``, in storage order.

    For ``iy`` in ``[0, gh)``: if ``iy < gh // 2``, ``ix`` runs from ``(0 if iy > 0 else 1)`` to
    ``gw // 2``; otherwise from 1 to ``gw // 2`` with ``iy → iy − gh``. (3 × 3 → (1, 0), (1, −2),
    (1, −1).) The wave vector is ``(ix·π/W, iy·π/H)`` rad/px.
    """
    gw, gh = (int(v) for v in grid)
    out = []
    for iy in range(gh):
        if iy < gh // 2:
            out += [(ix, iy) for ix in range(0 if iy > 0 else 1, gw // 2 + 1)]
        else:
            out += [(ix, iy - gh) for ix in range(1, gw // 2 + 1)]
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def n_coefficients(model: str, grid) -> int:
    """Length of one tilt's coefficient vector (:func:`polish3d.model.deformation_coefficient_count`)."""
    return deformation_coefficient_count(model, grid)


def _hermite(t):
    t2 = t * t
    t3 = t2 * t
    return (1.0 - 3.0 * t2 + 2.0 * t3, 3.0 * t2 - 2.0 * t3, t - 2.0 * t2 + t3, t3 - t2)


def _spline(c, grid, image_size, u):
    gw, gh = grid
    w, h = image_size
    c = rearrange(c, "(dim gy gx k) -> dim gy gx k", dim=2, gy=gh, gx=gw)  # k: value, ∂x, ∂y, ∂xy
    gx = u[..., 0] * ((gw - 1) / w)
    gy = u[..., 1] * ((gh - 1) / h)
    # RELION clamps the grid coordinate to [0, g−1−ε]; the cell is the integer part. (jnp.where,
    # not jnp.clip, so that the derivative on a node/border is the one-sided one, not halved.)
    gx = jnp.where(gx < 0, 0.0, jnp.where(gx > gw - 1, float(gw - 1), gx))
    gy = jnp.where(gy < 0, 0.0, jnp.where(gy > gh - 1, float(gh - 1), gy))
    cx = jnp.clip(jnp.floor(gx), 0, gw - 2)
    cy = jnp.clip(jnp.floor(gy), 0, gh - 2)
    tx = gx - cx
    ty = gy - cy
    cx = cx.astype(jnp.int32)
    cy = cy.astype(jnp.int32)
    vx = _hermite(tx)
    vy = _hermite(ty)
    out = 0.0
    for a in (0, 1):  # x offset of the corner
        for b in (0, 1):  # y offset of the corner
            d = c[:, cy + b, cx + a]  # (2, ..., 4)
            out = out + (
                vx[a] * vy[b] * d[..., 0]
                + vx[2 + a] * vy[b] * d[..., 1]
                + vx[a] * vy[2 + b] * d[..., 2]
                + vx[2 + a] * vy[2 + b] * d[..., 3]
            )
    return jnp.moveaxis(out, 0, -1)


def _linear(c, image_size, u):
    rx = u[..., 0] - 0.5 * image_size[0]
    ry = u[..., 1] - 0.5 * image_size[1]
    return jnp.stack([c[0] * rx, c[1] * rx + c[2] * ry], -1)


def _wave_vectors(grid, image_size) -> np.ndarray:
    return fourier_frequencies(grid) * np.array([math.pi / image_size[0], math.pi / image_size[1]])


def _fourier(c, grid, image_size, u):
    k = jnp.asarray(_wave_vectors(grid, image_size), u.dtype)  # (n_freq, 2)
    c = rearrange(c, "(dim freq part) -> dim freq part", dim=2, part=2)  # part: cos, sin
    ph = u @ k.T  # (..., n_freq)
    cos, sin = jnp.cos(ph), jnp.sin(ph)
    return jnp.stack([cos @ c[d, :, 0] + sin @ c[d, :, 1] for d in range(2)], -1)


def evaluate(model: str, grid, image_size, coeffs, u):
    """The displacement ``def(u)`` (px) of one coefficient vector at points ``u`` ``(..., 2)`` px.

    Args:
        model: ``"linear"``, ``"spline"`` or ``"Fourier"``.
        grid: ``(gw, gh)``.
        image_size: ``(W, H)`` tilt-image size (px).
        coeffs: ``(n,)`` coefficients in RELION's layout (see the module docstring).
        u: ``(..., 2)`` image positions ``(x, y)`` (px).

    Returns:
        ``(..., 2)`` displacement (px), differentiable in ``coeffs`` and ``u``.
    """
    grid = tuple(int(v) for v in grid)
    image_size = tuple(float(v) for v in image_size)
    u = jnp.asarray(u)
    coeffs = jnp.asarray(coeffs, u.dtype)
    if model == "spline":
        return _spline(coeffs, grid, image_size, u)
    if model == "linear":
        return _linear(coeffs, image_size, u)
    if model == "Fourier":
        return _fourier(coeffs, grid, image_size, u)
    raise ValueError(f"unknown deformation model {model!r}")


def evaluate_per_tilt(model: str, grid, image_size, coeffs, u):
    """``def_f(u)`` for per-tilt coefficients ``(F, n)`` at points ``u`` ``(N, F, 2)`` → ``(N, F, 2)`` px."""
    fn = functools.partial(evaluate, model, grid, image_size)
    return jax.vmap(fn, in_axes=(0, 1), out_axes=1)(coeffs, u)


def prior_weights(model: str, grid, image_size) -> np.ndarray:
    """Per-coefficient weights ``w`` of RELION's regulariser ``λ·Σ w·c²`` (``(n,)``).

    1 for ``spline`` and ``linear``; ``|k_i|²`` (rad²/px²) for both parts of a ``Fourier``
    coefficient.
    """
    if model != "Fourier":
        return np.ones(n_coefficients(model, grid))
    k2 = np.sum(_wave_vectors(grid, image_size) ** 2, axis=1)
    return np.tile(np.repeat(k2, 2), 2)


def _coefficient_units(model: str, image_size) -> np.ndarray | float:
    if model == "linear":
        return 2.0 / max(float(image_size[0]), float(image_size[1]))
    return 1.0


def _sample_points(image_size, n: int = 32) -> np.ndarray:
    """``(n², 2)`` cell centres of an ``n × n`` grid over the image (px)."""
    w, h = image_size
    xs = (np.arange(n) + 0.5) * (w / n)
    ys = (np.arange(n) + 0.5) * (h / n)
    return np.stack(np.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)


def _basis_fields(model, grid, image_size, pts) -> np.ndarray:
    """``(S, 2, n)``: the field of every unit coefficient vector at the points (float64)."""
    n = n_coefficients(model, grid)
    with jax.enable_x64(True):
        eye = jnp.eye(n, dtype=jnp.float64)
        b = jax.vmap(lambda e: evaluate(model, grid, image_size, e, jnp.asarray(pts, jnp.float64)))(eye)
        return np.asarray(b).transpose(1, 2, 0)


def _rigid_fields(image_size, pts) -> np.ndarray:
    """``(S, 2, 3)``: unit x offset, unit y offset, rotation ``(−ry, rx)/R`` about the centre."""
    w, h = image_size
    r = pts - np.array([w / 2.0, h / 2.0])
    rad = 0.5 * math.hypot(w, h)
    t = np.zeros((len(pts), 2, 3))
    t[:, 0, 0] = 1.0
    t[:, 1, 1] = 1.0
    t[:, 0, 2] = -r[:, 1] / rad
    t[:, 1, 2] = r[:, 0] / rad
    return t


def gauge_projection(model: str, grid, image_size, *, constant: bool = True, rotation: bool = True):
    """The gauge projection ``G`` ``(n, n)`` (float64) of the module docstring.

    Rows of the constraint: the image-mean x offset, y offset and rotation of the field, each
    kept only if requested and if the model can represent that rigid field exactly (relative
    least-squares residual < 1e-6 on a 32 × 32 point grid).
    """
    grid = tuple(int(v) for v in grid)
    image_size = tuple(float(v) for v in image_size)
    return _gauge_projection(model, grid, image_size, bool(constant), bool(rotation)).copy()


@functools.lru_cache(maxsize=64)
def _gauge_projection(model, grid, image_size, constant, rotation):
    n = n_coefficients(model, grid)
    pts = _sample_points(image_size)
    b = _basis_fields(model, grid, image_size, pts).reshape(-1, n)  # (2S, n)
    t = _rigid_fields(image_size, pts).reshape(-1, 3)  # (2S, 3)
    wanted = [constant, constant, rotation]
    rows = []
    for i in range(3):
        if not wanted[i]:
            continue
        sol, *_ = np.linalg.lstsq(b, t[:, i], rcond=None)
        resid = np.linalg.norm(b @ sol - t[:, i]) / np.linalg.norm(t[:, i])
        if resid < 1e-6:
            rows.append(t[:, i] @ b)
    if not rows:
        return np.eye(n)
    a = np.stack(rows)
    return np.eye(n) - a.T @ np.linalg.solve(a @ a.T, a)


def rigid_residual(fields: np.ndarray, pts: np.ndarray, image_size) -> np.ndarray:
    """Fields ``(..., S, 2)`` at points ``pts`` ``(S, 2)`` minus their least-squares rigid part.

    The rigid part (x offset, y offset, in-plane rotation about the image centre) is what the
    per-tilt shifts and ψ absorb; the residual is the gauge-free part of a deformation (px).
    """
    t = _rigid_fields(image_size, pts).reshape(-1, 3)
    f = np.asarray(fields, np.float64)
    flat = f.reshape(f.shape[:-2] + (-1,))
    coef = np.linalg.lstsq(t, flat.reshape(-1, flat.shape[-1]).T, rcond=None)[0]
    res = flat.reshape(-1, flat.shape[-1]) - (t @ coef).T
    return res.reshape(f.shape)


# ----------------------------------------------------------------------------------------------
# the stage-2 plug-in
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeformationModel:
    """The static (hashable) part used inside the jitted stage-2 objective.

    Attributes:
        model, grid: the model and its grid.
        image_size: ``(W, H)`` px.
        per_tilt: the update ``δ`` is ``(F, n)`` (else ``(n,)``, shared).
        reg: ``λ``.

    The data pytree carries ``deformation_base`` ``(F, n)``, ``deformation_gauge`` ``(n, n)``,
    ``deformation_units`` ``(n,)`` and ``deformation_prior_w`` ``(n,)``.
    """

    model: str
    grid: tuple[int, int]
    image_size: tuple[float, float]
    per_tilt: bool = False
    reg: float = 0.0
    shrink: float = 0.0

    def update(self, delta, data):
        """``(F, n)`` coefficient update ``G·(s ⊙ δ)`` (broadcast over tilts per series)."""
        upd = (delta * data["deformation_units"]) @ data["deformation_gauge"].T
        return upd if self.per_tilt else jnp.broadcast_to(upd, data["deformation_base"].shape)

    def coefficients(self, delta, data):
        """``(F, n)`` coefficients ``base + G·(s ⊙ δ)``."""
        return data["deformation_base"] + self.update(delta, data)

    def field(self, coefficients, u):
        """The fields ``def_f(u)`` ``(N, F, 2)`` px of coefficients ``(F, n)`` at ``u`` ``(N, F, 2)``."""
        return evaluate_per_tilt(self.model, self.grid, self.image_size, coefficients, u)

    def apply_and_prior(self, delta, u, data):
        """``(u + def_f(u), prior)`` for positions ``u`` ``(N, F, 2)`` px (tilts in file order).

        ``prior`` is RELION's regulariser (``reg``) plus the shrinkage ``shrink`` of the update
        field at the particles (see :func:`shrinkage_scale`).
        """
        upd = self.update(delta, data)
        c = data["deformation_base"] + upd
        u_new = forward.deform(u, self, c)
        prior = jnp.zeros((), u.dtype)
        if self.reg > 0:
            per_f = jnp.sum(data["deformation_prior_w"] * c * c, axis=-1)
            prior = prior + self.reg * (jnp.sum(per_f) if self.per_tilt else jnp.mean(per_f))
        if self.shrink > 0 and "cc" in data:  # κ̄: per run (stages), not per evaluation (~100 ms)
            w = data["weight"]
            d_upd = self.field(upd, u)
            kappa = data.get("deformation_kappa")
            kappa = shrinkage_scale(data["cc"], w) if kappa is None else kappa
            prior = prior + self.shrink * kappa * jnp.sum(w * jnp.sum(d_upd * d_upd, -1))
        return u_new, prior


@jax.jit
def shrinkage_scale(cc, weight):
    """Mean CC peak curvature ``κ̄`` (cost per px²) of the windows ``(N, F, D, D)``.

    Per window: minus half the discrete Laplacian at its maximum (≥ 0), averaged with the
    weights ``(N, F)``. The shrinkage ``shrink·κ̄·Σ w·|Δdef(u)|²`` then costs the fraction
    ``shrink`` of what the same displacement costs in the data term, independent of the
    (unnormalised) CC scale: a deformation update whose effect on the particles the per-tilt
    rigid parameters and the particle positions can reproduce to within ~√shrink of its size is
    not taken up by the deformation (they are near-degenerate; see the module docstring).
    """
    n, f, d, _ = cc.shape
    flat = cc.reshape(n, f, d * d)
    k = jnp.argmax(flat, axis=-1)
    iy = jnp.clip(k // d, 1, d - 2)
    ix = jnp.clip(k % d, 1, d - 2)

    def at(dy, dx):
        return jnp.take_along_axis(flat, ((iy + dy) * d + ix + dx)[..., None], -1)[..., 0]

    lap = at(1, 0) + at(-1, 0) + at(0, 1) + at(0, -1) - 4.0 * at(0, 0)
    kappa = jnp.maximum(-0.5 * lap, 0.0)
    return jax.lax.stop_gradient(jnp.sum(weight * kappa) / jnp.maximum(jnp.sum(weight), 1.0))


class DeformationPlugin:
    """A deformation model plugged into :func:`polish3d.refine.tomogram.refine_tomogram`.

    See ``tomogram._build_plugins`` for the contract: ``key``, ``free``, ``static``,
    ``init_params()``, ``data(P, X)``, ``deform(params, u)`` and ``finish(params, result)``.
    """

    key = "deformation"

    def __init__(self, static: DeformationModel, base: np.ndarray, gauge: np.ndarray, *, free: bool,
                 n_tilts: int, input_deformation: Deformation | None, notes: list[str]):
        self.static = static
        self.free = free
        self.n_tilts = n_tilts
        self.base = np.asarray(base, np.float64)  # (F, n)
        self.gauge = np.asarray(gauge, np.float64)
        units = _coefficient_units(static.model, static.image_size)
        self.units = np.broadcast_to(units, self.base.shape[1:]).astype(np.float64)
        self.prior_w = prior_weights(static.model, static.grid, static.image_size)
        self.input_deformation = input_deformation
        self.notes = notes

    @property
    def n_coeff(self) -> int:
        """Coefficients per tilt."""
        return self.base.shape[1]

    def init_params(self):
        """The zero update ``δ`` (``(F, n)`` per tilt, ``(n,)`` per series), float32."""
        shape = (self.n_tilts, self.n_coeff) if self.static.per_tilt else (self.n_coeff,)
        return jnp.zeros(shape, jnp.float32)

    def data(self, projections=None, positions=None) -> dict:
        """Arrays for the stage-2 data pytree (independent of the geometry)."""
        arrays = {"base": self.base, "gauge": self.gauge, "units": self.units, "prior_w": self.prior_w}
        return {f"deformation_{k}": jnp.asarray(v, jnp.float32) for k, v in arrays.items()}

    def coefficients(self, params) -> np.ndarray:
        """``(F, n)`` float64 coefficients (RELION layout) for the update ``params``."""
        d = np.asarray(params, np.float64) * self.units
        upd = d @ self.gauge.T
        return self.base + (upd if self.static.per_tilt else upd[None, :])

    def deform(self, params, u) -> np.ndarray:
        """Host side: ``u + def_f(u)`` for ``u`` ``(N, F, 2)`` px (float64 in, float64 out)."""
        return forward.deform_host(u, self.static, self.coefficients(params))

    def finish(self, params, result) -> None:
        """Store the deformation (RELION layout, per tilt) and its statistics in ``result``."""
        s = self.static
        c = self.coefficients(params)
        if self.free:
            result.deformation = Deformation(model=s.model, grid_size=tuple(s.grid), coefficients=c)
        else:
            result.deformation = self.input_deformation
        pts = _sample_points(s.image_size, 16)
        u = np.broadcast_to(pts[:, None, :], (len(pts), self.n_tilts, 2))
        field = self.deform(params, u) - u  # (S, F, 2)
        field_t = np.transpose(field, (1, 0, 2))
        nonrigid = rigid_residual(field_t, pts, s.image_size)
        base_field = self.deform(np.zeros_like(np.asarray(params)), u) - u
        change = field - base_field

        def rms(a, axis=None):
            return np.sqrt(np.mean(np.sum(a * a, axis=-1), axis=axis))

        result.metrics["deformation"] = {
            "model": s.model,
            "grid": list(s.grid),
            "per_tilt": s.per_tilt,
            "estimated": bool(self.free),
            "from_input": self.input_deformation is not None,
            "field_rms_px": float(rms(field)),
            "field_max_px": float(np.max(np.linalg.norm(field, axis=-1))),
            "nonrigid_rms_px": float(rms(nonrigid)),
            "change_rms_px": float(rms(change)),
            "per_tilt_field_rms_px": rms(field, axis=0).tolist(),
            "notes": list(self.notes),
        }


def fixed_model(deformation: Deformation, image_size_px) -> DeformationModel:
    """The static model of a stored deformation (per tilt, no prior) for :mod:`~polish3d.refine.forward`."""
    size = tuple(float(v) for v in image_size_px)
    return DeformationModel(deformation.model, tuple(int(v) for v in deformation.grid_size), size, True)


def _same_setup(d: Deformation, cfg: DeformationConfig) -> bool:
    if d.model != cfg.model:
        return False
    return d.model == "linear" or tuple(d.grid_size) == tuple(cfg.grid)


def build_plugin(deformation: DeformationConfig | None, ts, config, n_pad=None, report=None):
    """The deformation plug-in of one tomogram, or ``None`` when there is nothing to model.

    Args:
        deformation: ``--deformation`` options, or ``None`` (then only an input deformation is
            applied, as a fixed model).
        ts: the tilt series (``ts.deformation``: the input's, or ``None``).
        config: the :class:`~polish3d.refine.tomogram.AlignConfig` (``shift_only``, ``const_a``,
            ``const_s`` decide which rigid fields are gauge and whether the model is free).
        n_pad: padded particle count (unused: the model has no per-particle arrays).
        report: progress callback ``report(event, **figures)``; warnings go out as
            ``report("deformation", message=..., warning=True)``.

    Raises:
        InputError: the input deformation's coefficient count does not fit its model and grid.
    """
    report = report or (lambda *a, **k: None)
    f, stored, notes = ts.n_tilts, ts.deformation, []
    image_size = tuple(float(v) for v in ts.image_size_px)

    def note(msg: str, **extra) -> None:
        notes.append(msg)
        report("deformation", message=msg, **extra)

    if stored is not None:
        want = (f, n_coefficients(stored.model, stored.grid_size))
        if np.shape(stored.coefficients) != want:
            raise InputError(
                f"{ts.name}: the stored {stored.model} deformation (grid {tuple(stored.grid_size)}) has "
                f"coefficients of shape {np.shape(stored.coefficients)}, expected {want}"
            )
    if deformation is None:
        if stored is None or not np.any(stored.coefficients):
            return None
        note(f"{ts.name}: applying the stored {stored.model} deformation (grid "
             f"{tuple(stored.grid_size)}) as a fixed model; it is written back unchanged")
        return DeformationPlugin(
            fixed_model(stored, image_size), np.asarray(stored.coefficients, np.float64), np.eye(want[1]),
            free=False, n_tilts=f, input_deformation=stored, notes=notes,
        )
    base = np.zeros((f, n_coefficients(deformation.model, deformation.grid)))
    start = None
    if stored is not None and _same_setup(stored, deformation):
        base = np.asarray(stored.coefficients, np.float64).copy()
        start = stored
        note(f"{ts.name}: starting from the stored {stored.model} deformation")
    elif stored is not None:
        note(f"{ts.name}: the stored {stored.model} deformation (grid {tuple(stored.grid_size)}) "
             f"differs from the requested {deformation.model} deformation (grid {deformation.grid}); "
             "discarding it", warning=True)
    shifts_free, angles_free = not config.const_s, not (config.const_a or config.shift_only)
    gauge = gauge_projection(
        deformation.model, deformation.grid, image_size,
        constant=shifts_free, rotation=shifts_free and angles_free,
    )
    static = DeformationModel(
        deformation.model, tuple(deformation.grid), image_size, bool(deformation.per_tilt),
        float(deformation.reg), float(deformation.shrink),
    )
    return DeformationPlugin(static, base, gauge, free=not config.shift_only, n_tilts=f,
                             input_deformation=start, notes=notes)


def plot_deformation(deformation: Deformation, image_size_px, path, **options) -> Path:
    """Draw a deformation as a PNG: :func:`polish3d.refine.deformation_plot.plot_deformation`."""
    from polish3d.refine.deformation_plot import plot_deformation as plot

    return plot(deformation, image_size_px, path, **options)
