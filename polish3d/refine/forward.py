"""The forward model of particle positions: where every particle lands in every tilt image.

One formula, used by the stage-2 objective (inside its jit, float32), by the host-side
predictions of the refinement (CC-window centres, visibility, rescue, metrics: float64 through
:func:`predict_host`) and available to the scoring and the simulation:

``u_pf = P_f[:2, :3] · x_pf + P_f[:2, 3]`` (+ the tilt's 2D deformation field at that point),
``depth_pf = P_f[2, :3] · x_pf + P_f[2, 3]``, with ``x_pf`` the particle's 3D position in tilt
``f`` (its position plus its motion offset, tomogram pixels) and ``P_f`` the tilt's ``4 × 4``
projection matrix (RELION's ``rlnTomoProj``, pixels).

``P_f`` is affine in general: its first two rows carry the tilt's 2×2 image distortion ``D_f``
(anisotropic magnification and skew, ``--aniso``/``--per_tilt_aniso``) about the image centre
``c = (⌊W/2⌋, ⌊H/2⌋)``, ``u = c + D_f · (u_rigid − c)`` (:func:`distort`,
:func:`polish3d.geometry.compose_distortion`), so every prediction — CC windows, objective,
validation, metrics, scoring, simulation — sees it.

Pure JAX; every function is traceable (dtype follows the inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["deform", "deform_host", "distort", "predict", "predict_host", "project"]


def project(projections: jax.Array, points_px: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rigid projection of per-tilt 3D points.

    Args:
        projections: ``(F, 4, 4)`` projection matrices (pixels).
        points_px: ``(N, F, 3)`` 3D positions per particle and tilt (tomogram pixels).

    Returns:
        ``u_px (N, F, 2)`` image positions and ``depth_px (N, F)`` (pixels along the beam).
    """
    u = jnp.einsum("fij,nfj->nfi", projections[:, :2, :3], points_px) + projections[None, :, :2, 3]
    depth = jnp.einsum("fj,nfj->nf", projections[:, 2, :3], points_px) + projections[None, :, 2, 3]
    return u, depth


def distort(projections: jax.Array, distortion: jax.Array, centre_px: jax.Array) -> jax.Array:
    """Projection matrices ``(F, 4, 4)`` whose image positions are distorted about ``centre_px``.

    ``u' = c + D_f · (u − c)``: rows 0–1 become ``D_f · P_f[:2]`` with the translation
    ``D_f · (P_f[:2, 3] − c) + c``; the depth row is unchanged (the traceable twin of
    :func:`polish3d.geometry.compose_distortion`).

    Args:
        projections: ``(F, 4, 4)`` (pixels).
        distortion: ``(F, 2, 2)`` matrices ``D_f``.
        centre_px: ``(2,)`` the image centre ``c``.
    """
    rows = jnp.einsum("fij,fjk->fik", distortion, projections[:, :2, :])
    shift = centre_px - jnp.einsum("fij,j->fi", distortion, centre_px)
    rows = rows.at[:, :, 3].add(shift)
    return jnp.concatenate([rows, projections[:, 2:, :]], axis=1)


def deform(u_px: jax.Array, deformation, coefficients: jax.Array) -> jax.Array:
    """``u + def_f(u)``: image positions ``(N, F, 2)`` moved by each tilt's 2D deformation field.

    ``deformation`` is the static model (a hashable object with ``field(coefficients, u)``, e.g.
    :class:`polish3d.refine.deformation.DeformationModel`) and ``coefficients`` its ``(F, n)``
    coefficients (RELION layout). The field is evaluated in the coefficients' precision and
    added in that of ``u_px``.
    """
    field = deformation.field(coefficients, u_px.astype(coefficients.dtype))
    return u_px + field.astype(u_px.dtype)


def predict(projections, points_px, deformation=None, coefficients=None):
    """Where every particle lands: ``(u_px (N, F, 2), depth_px (N, F))``.

    Args:
        projections: ``(F, 4, 4)`` projection matrices (pixels).
        points_px: ``(N, F, 3)`` per-tilt 3D positions (position + motion offset, pixels).
        deformation: optional static deformation model (see :func:`deform`); ``None``: rigid.
        coefficients: its ``(F, n)`` coefficients.
    """
    u, depth = project(projections, points_px)
    if deformation is not None:
        u = deform(u, deformation, coefficients)
    return u, depth


_predict_jit = jax.jit(predict, static_argnames=("deformation",))
_deform_jit = jax.jit(deform, static_argnames=("deformation",))


def predict_host(projections, points_px, deformation=None, coefficients=None, *,
                 field_dtype=np.float32):
    """:func:`predict` compiled, in float64 (NumPy in, NumPy out; host-side predictions).

    The projection runs in float64 (positions of thousands of pixels keep sub-µpx precision);
    the deformation field in ``field_dtype``: float32 as inside the objective (the refinement's
    own predictions), float64 for measurements (``polish3d score``).
    """
    points_px = np.asarray(points_px, np.float64)
    if points_px.size == 0:
        n, f = points_px.shape[:2]
        return np.zeros((n, f, 2)), np.zeros((n, f))
    coeffs = None if deformation is None else np.asarray(coefficients, field_dtype)
    with jax.enable_x64(True):
        u, depth = _predict_jit(
            np.asarray(projections, np.float64), points_px, deformation,
            None if coeffs is None else jnp.asarray(coeffs),
        )
        return np.asarray(u, np.float64), np.asarray(depth, np.float64)


def deform_host(u_px, deformation, coefficients, *, field_dtype=np.float32) -> np.ndarray:
    """:func:`deform` compiled, for NumPy positions ``(N, F, 2)`` (float64 in, float64 out; the
    field in ``field_dtype``, see :func:`predict_host`)."""
    u_px = np.asarray(u_px, np.float64)
    if u_px.size == 0:
        return u_px
    with jax.enable_x64(True):
        out = _deform_jit(u_px, deformation, jnp.asarray(np.asarray(coefficients, field_dtype)))
        return np.asarray(out, np.float64)
