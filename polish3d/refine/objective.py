"""Stage-2 objective: geometry parameters → 2D positions → interpolated CC values.

Pure JAX, no I/O, no jit here (the jit boundary is :mod:`polish3d.refine.optimise`).

Parameters (:class:`polish3d.refine.stage2.Stage2Params`, a pytree, all float32):

* ``tilt_angles`` ``(F, 3)``: small rotations (φ about x, θ about y, ψ about z) of each tilt's
  camera frame, in units of ``data["angle_unit_rad"]`` radians (chosen so that one unit moves a
  point at the image edge by about one pixel, which conditions the problem).
  ``Q = Rz(ψ)·Ry(θ)·Rx(φ)`` acts about the projected tomogram centre (not about RELION's
  ``c`` expressed in camera coordinates): angles and shifts are then decoupled.
* ``tilt_shifts`` ``(F, 2)``: 2D shifts of each tilt image (pixels).
* ``positions`` ``(N, 3)``: 3D position changes of the particles (tomogram pixels).
* ``motion`` (optional): GP coefficients, see :mod:`polish3d.refine.motion`.
* ``deformation`` (optional): deformation coefficients, see :mod:`polish3d.refine.deformation`.
* ``aniso`` (optional, ``--aniso``: ``(1, 2)``, ``--per_tilt_aniso``: ``(F, 2)``): changes
  ``(a, s)`` of the image distortion ``D_f = D0_f + [[a, s], [s, −a]]`` about the image centre
  (anisotropic magnification and skew; ``D0_f`` the distortion the tilt has, ``data["distortion"]``),
  in units of ``data["aniso_unit"]`` (one unit moves the image edge by about a pixel). Symmetric
  and trace-preserving: the in-plane rotation is ``ψ`` already and an isotropic scale is a gauge.

Gauge: the model is invariant under a global rigid motion of all particles compensated by all
tilts (6 DOF). It is removed by construction: the mean particle position change is subtracted
(3 translations), and the tilt rotations are projected onto the complement of the 3 directions
that a global rotation of the tomogram produces (:func:`remove_rotation_gauge`). The objective is
then flat along those directions in parameter space and the solution unique and reproducible.
With a refined distortion, a linear stretch or shear of the whole tomogram compensated by all
tilts' distortions (and angles) is a gauge too: the distortion is projected off those directions,
``data["aniso_gauge"]`` (:func:`polish3d.refine.stage2.aniso_gauge_basis`).

Cost (minimised), on RELION's scale (so ``--s_vel``/``--s_div`` mean the same):
``E = −Σ_{p,f} w_pf · C_pf(Δ_pf) + λ_range Σ max(0, |Δ_pf| − r)² + priors``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from polish3d.refine import forward
from polish3d.refine.likelihood import taylor_values

__all__ = [
    "apply_tilt_params",
    "catmull_rom_2d",
    "distortion_update",
    "distortions",
    "pair_positions",
    "pair_values",
    "remove_rotation_gauge",
    "rigid_transforms",
    "small_rotation",
    "tilt_transforms",
    "total_cost",
]


def small_rotation(angles_rad: jax.Array) -> jax.Array:
    """``Rz(ψ)·Ry(θ)·Rx(φ)`` for ``angles_rad = (φ, θ, ψ)`` (radians), shape ``(..., 3, 3)``."""
    phi, theta, psi = angles_rad[..., 0], angles_rad[..., 1], angles_rad[..., 2]
    c1, s1 = jnp.cos(phi), jnp.sin(phi)
    c2, s2 = jnp.cos(theta), jnp.sin(theta)
    c3, s3 = jnp.cos(psi), jnp.sin(psi)
    o, z = jnp.ones_like(c1), jnp.zeros_like(c1)
    rx = jnp.stack([jnp.stack([o, z, z], -1), jnp.stack([z, c1, -s1], -1), jnp.stack([z, s1, c1], -1)], -2)
    ry = jnp.stack([jnp.stack([c2, z, s2], -1), jnp.stack([z, o, z], -1), jnp.stack([-s2, z, c2], -1)], -2)
    rz = jnp.stack([jnp.stack([c3, -s3, z], -1), jnp.stack([s3, c3, z], -1), jnp.stack([z, z, o], -1)], -2)
    return rz @ ry @ rx


def remove_rotation_gauge(angles: jax.Array, rotations: jax.Array) -> jax.Array:
    """Project out the 3 directions that a global rotation of the tomogram would produce.

    A small rotation ``v`` of the whole particle cloud is compensated by camera-frame rotations
    ``ω_f = A_f v`` (``A_f`` the rotation block of ``P_f``). Removing
    ``A_f · mean_g(A_gᵀ ω_g)`` makes the angles orthogonal to that 3D subspace.
    """
    v = jnp.mean(jnp.einsum("fji,fj->fi", rotations, angles), axis=0)
    return angles - jnp.einsum("fij,j->fi", rotations, v)


def rigid_transforms(params, data: dict, *, fix_gauge: bool = True) -> jax.Array:
    """Refined rigid projection matrices ``(F, 4, 4)`` (before any image distortion).

    ``P' = T(s) · T(p_c) · Q · T(−p_c) · P`` with ``P = data["projections"]`` (the rigid part
    when the tilts have a distortion) and ``p_c = P · c`` the projected tomogram centre.
    """
    ang = params.tilt_angles
    p = data["projections"]
    if fix_gauge:
        ang = remove_rotation_gauge(ang, p[:, :3, :3])
    q = small_rotation(ang * data["angle_unit_rad"])
    pc = data["centre_cam"]  # (F, 3)
    lin = q @ p[:, :3, :3]
    trans = jnp.einsum("fij,fj->fi", q, p[:, :3, 3] - pc) + pc
    trans = trans.at[:, :2].add(params.tilt_shifts)
    top = jnp.concatenate([lin, trans[:, :, None]], axis=2)
    bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], p.dtype), (p.shape[0], 1, 4))
    return jnp.concatenate([top, bottom], axis=1)


def distortion_update(params, data: dict) -> jax.Array:
    """``(F, 2, 2)`` change ``[[a, s], [s, −a]]`` of every tilt's distortion (one ``(a, s)`` per
    series broadcast to all tilts, or one per tilt), projected off the gauge directions."""
    a = params.aniso
    if "aniso_gauge" in data:
        basis = data["aniso_gauge"]  # (k, 2m) orthonormal rows
        flat = a.reshape(-1)
        a = (flat - basis.T @ (basis @ flat)).reshape(a.shape)
    a = jnp.broadcast_to(a * data["aniso_unit"], (data["distortion"].shape[0], 2))
    return jnp.stack([jnp.stack([a[:, 0], a[:, 1]], -1), jnp.stack([a[:, 1], -a[:, 0]], -1)], -2)


def distortions(params, data: dict) -> jax.Array:
    """``(F, 2, 2)`` image distortions ``D_f`` at ``params`` (``data["distortion"]`` if fixed)."""
    if params.aniso is None:
        return data["distortion"]
    return data["distortion"] + distortion_update(params, data)


def tilt_transforms(params, data: dict, *, fix_gauge: bool = True) -> jax.Array:
    """Refined projection matrices ``(F, 4, 4)`` from the parameters: :func:`rigid_transforms`,
    then, when the data carry distortions, ``D_f`` about the image centre (:func:`forward.distort`)."""
    p = rigid_transforms(params, data, fix_gauge=fix_gauge)
    if "distortion" not in data:
        return p
    return forward.distort(p, distortions(params, data), data["image_centre"])


def apply_tilt_params(params, data: dict, points: jax.Array, *, fix_gauge: bool = True):
    """Project per-tilt 3D points ``(N, F, 3)`` with the refined matrices → ``(N, F, 2)``
    (:func:`polish3d.refine.forward.project`; the deformation follows in :func:`total_cost`)."""
    return forward.project(tilt_transforms(params, data, fix_gauge=fix_gauge), points)[0]


def _keys_weights(t: jax.Array) -> jax.Array:
    """Catmull–Rom (Keys a = −½) weights for the 4 samples at offsets −1, 0, 1, 2."""
    t2, t3 = t * t, t * t * t
    w0 = 0.5 * (-t3 + 2 * t2 - t)
    w1 = 0.5 * (3 * t3 - 5 * t2 + 2)
    w2 = 0.5 * (-3 * t3 + 4 * t2 + t)
    w3 = 0.5 * (t3 - t2)
    return jnp.stack([w0, w1, w2, w3], -1)


def catmull_rom_2d(window: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """Bicubic Catmull–Rom interpolation of one 2D window ``[y, x]`` at ``(x, y)`` (index units).

    Coordinates are clamped to ``[1, D − 3]`` so the 4×4 stencil stays inside the window (the
    value is then constant, with zero gradient, outside the valid range).
    """
    d = window.shape[-1]
    x = jnp.clip(x, 1.0, d - 2.0 - 1e-3)
    y = jnp.clip(y, 1.0, d - 2.0 - 1e-3)
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    wx = _keys_weights(x - x0)
    wy = _keys_weights(y - y0)
    ix = x0.astype(jnp.int32) - 1 + jnp.arange(4)
    iy = y0.astype(jnp.int32) - 1 + jnp.arange(4)
    patch = window[iy[:, None], ix[None, :]]
    return wy @ patch @ wx


def data_term(u: jax.Array, data: dict, range_reg: float) -> tuple[jax.Array, jax.Array]:
    """``−Σ w·C(Δ)`` and the range penalty, for predicted 2D positions ``u`` ``(N, F, 2)``.

    ``C`` is the bicubic interpolation of the CC windows ``data["cc"]``, or, when the data hold
    Taylor coefficients ``data["taylor"]`` (the final stage), the exact CC's local expansion
    about ``u0`` (:func:`polish3d.refine.likelihood.taylor_values`).
    """
    delta = u - data["u0"]
    r = data["window_radius"]
    if "taylor" in data:
        # the final stage: the exact CC's local expansion at the real displacement (no grid)
        vals = taylor_values(data["taylor"], delta, data["taylor_radius"])
    else:
        centre = (data["cc"].shape[-1] - 1) / 2.0
        interp = jax.vmap(jax.vmap(catmull_rom_2d))
        vals = interp(data["cc"], delta[..., 0] + centre, delta[..., 1] + centre)
    # relative to a per-pair baseline (the values at the start of the run): the float32 sum of
    # small differences keeps the precision L-BFGS needs near the optimum; the gradient is the same
    cost = -jnp.sum(data["weight"] * (vals - data["cc_base"]))
    if range_reg > 0:
        excess = jnp.maximum(jnp.linalg.norm(delta, axis=-1) - r, 0.0)
        cost = cost + range_reg * jnp.sum(data["weight"] * excess**2)
    return cost, vals


def total_cost(params, data: dict, options) -> jax.Array:
    """Scalar cost of one tomogram (see the module docstring), relative to ``data["cc_base"]``.

    ``options`` is a hashable :class:`~polish3d.refine.optimise.StageOptions` (``range_reg``,
    ``fix_gauge_positions``, ``fix_gauge_angles``, ``motion``, ``deformation``) — static under jit.
    """
    return _cost_and_values(params, data, options)[0]


def pair_values(params, data: dict, options) -> jax.Array:
    """Interpolated CC value of every particle–tilt pair ``(N, F)`` at ``params``."""
    return _cost_and_values(params, data, options)[1]


def pair_positions(params, data: dict, options) -> tuple[jax.Array, jax.Array]:
    """Predicted 2D positions ``(N, F, 2)`` (px) of every particle–tilt pair at ``params``, and
    the priors of the motion and deformation models (the forward model of the objective)."""
    pos = params.positions
    if options.fix_gauge_positions:
        pos = pos - jnp.sum(pos * data["particle_mask"][:, None], 0) / jnp.maximum(
            jnp.sum(data["particle_mask"]), 1.0
        )
    # (N, F, 3): static position + change + fixed per-tilt offsets (input motion)
    points = data["positions"][:, None, :] + pos[:, None, :] + data["offsets"]
    cost = jnp.zeros((), points.dtype)
    if options.motion is not None:
        offsets, prior = options.motion.offsets_and_prior(params.motion, data)
        points = points + offsets
        cost = cost + prior
    u = apply_tilt_params(params, data, points, fix_gauge=options.fix_gauge_angles)
    if options.deformation is not None:
        u, prior = options.deformation.apply_and_prior(params.deformation, u, data)
        cost = cost + prior
    return u, cost


def _cost_and_values(params, data: dict, options):
    u, prior = pair_positions(params, data, options)
    d, vals = data_term(u, data, options.range_reg)
    return prior + d, vals
