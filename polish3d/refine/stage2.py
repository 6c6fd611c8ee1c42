"""Assemble the stage-2 problem (data pytree, initial parameters) and read its result back."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from polish3d import geometry
from polish3d.refine.devices import round_up
from polish3d.refine.objective import tilt_transforms

__all__ = ["Stage2Params", "build_data", "initial_params", "pad_to_bucket", "results_from_params"]


def pad_to_bucket(n: int, bucket: int = 64) -> int:
    """Particle count padded up so that shapes (and jit compilations) come in few buckets.

    Buckets are multiples of ``bucket`` up to 512, then powers-of-two-ish steps of 25 %, and a
    multiple of the devices the particle axis is split across (:mod:`polish3d.refine.devices`).
    """
    if n <= 512:
        return round_up(max(bucket, -(-n // bucket) * bucket))
    size = 512
    while size < n:
        size = int(size * 1.25) // bucket * bucket
    return round_up(size)


def build_data(
    projections: np.ndarray,
    positions_px: np.ndarray,
    u0: np.ndarray,
    cc: np.ndarray,
    weight: np.ndarray,
    *,
    tomo_size_px,
    image_size_px,
    window_radius_px: float,
    n_pad: int | None = None,
    taylor_radius_px: float = 0.0,
) -> dict:
    """The stage-2 data pytree (float32, particle axis padded to ``n_pad`` with zero weight).

    Args:
        projections: ``(F, 4, 4)`` geometry at which the CC windows were computed.
        positions_px: ``(N, 3)`` particle positions at which the CC windows were computed.
        u0: ``(N, F, 2)`` 2D window centres (pixels).
        cc: ``(N, F, D, D)`` CC windows ``[y, x]``, zero displacement at index ``(D − 1)/2``.
        weight: ``(N, F)`` weight of each particle–tilt (0: invisible / excluded).
        tomo_size_px: ``(w0, h0, d0)``.
        image_size_px: ``(W, H)``.
        window_radius_px: the CC window half-width ``r`` (pixels).
        n_pad: padded particle count (default: no padding).
        taylor_radius_px: ``> 0``: ``cc`` holds the Taylor coefficients ``(N, F, M)`` of the exact
            CC about ``u0`` (:func:`polish3d.refine.likelihood.compute_taylor`), trusted within
            this radius (pixels); stored as ``data["taylor"]`` instead of ``data["cc"]``.
    """
    n = positions_px.shape[0]
    n_pad = n if n_pad is None else max(n_pad, n)  # (cc may already come padded to n_pad)
    pad = n_pad - n

    def padn(a):
        if not pad or a.shape[0] == n_pad:
            return a
        return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)], 0)

    p = np.asarray(projections, np.float64)
    c = geometry.tomogram_centre_px(tomo_size_px)
    centre_cam = p[:, :3, :3] @ c + p[:, :3, 3]
    radius = 0.5 * float(np.hypot(*image_size_px))
    mask = np.zeros(n_pad, np.float32)
    mask[:n] = 1.0
    return {
        "projections": jnp.asarray(p, jnp.float32),
        "centre_cam": jnp.asarray(centre_cam, jnp.float32),
        "positions": jnp.asarray(padn(np.asarray(positions_px, np.float64)), jnp.float32),
        "u0": jnp.asarray(padn(np.asarray(u0, np.float64)), jnp.float32),
        **(
            {"taylor": jnp.asarray(padn(np.asarray(cc, np.float32))),
             "taylor_radius": jnp.float32(taylor_radius_px)}
            if taylor_radius_px > 0
            else {"cc": jnp.asarray(padn(np.asarray(cc, np.float32)))}
        ),
        "weight": jnp.asarray(padn(np.asarray(weight, np.float32))),
        "particle_mask": jnp.asarray(mask),
        "offsets": jnp.zeros((n_pad, p.shape[0], 3), jnp.float32),
        "cc_base": jnp.zeros((n_pad, p.shape[0]), jnp.float32),
        "window_radius": jnp.float32(window_radius_px),
        "angle_unit_rad": jnp.float32(1.0 / radius),
    }


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["tilt_angles", "tilt_shifts", "positions", "motion", "deformation"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class Stage2Params:
    """The stage-2 parameters (a pytree; float32 arrays, all zero at the current geometry).

    Attributes:
        tilt_angles: ``(F, 3)`` small camera-frame rotations, in units of
            ``data["angle_unit_rad"]`` radians (see :mod:`polish3d.refine.objective`).
        tilt_shifts: ``(F, 2)`` 2D shifts of the tilt images (pixels).
        positions: ``(N_pad, 3)`` particle position changes (tomogram pixels).
        motion: the motion model's coefficients (:mod:`polish3d.refine.motion`), or ``None``.
        deformation: the deformation update (:mod:`polish3d.refine.deformation`), or ``None``.
    """

    tilt_angles: jax.Array
    tilt_shifts: jax.Array
    positions: jax.Array
    motion: jax.Array | None = None
    deformation: jax.Array | None = None


def initial_params(n_tilts: int, n_particles: int, **models) -> Stage2Params:
    """All-zero parameters (the current geometry); ``models``: the optional blocks' start values
    (``motion=``, ``deformation=``)."""
    return Stage2Params(
        tilt_angles=jnp.zeros((n_tilts, 3), jnp.float32),
        tilt_shifts=jnp.zeros((n_tilts, 2), jnp.float32),
        positions=jnp.zeros((n_particles, 3), jnp.float32),
        **models,
    )


@functools.partial(jax.jit, static_argnames=("fix_gauge",))
def _tilt_transforms(params, data, fix_gauge):
    return tilt_transforms(params, data, fix_gauge=fix_gauge)


def results_from_params(params: Stage2Params, data: dict, options, n_particles: int):
    """New projection matrices ``(F, 4, 4)`` and positions ``(N, 3)`` (float64) from parameters.

    The update is applied to the float64 input geometry: ``P_new = ΔP · P`` with ``ΔP`` computed
    in float32 from the parameters, so rounding does not accumulate over outer iterations.
    """
    p_old = np.asarray(data["projections"], np.float64)
    p_new32 = np.asarray(_tilt_transforms(params, data, options.fix_gauge_angles), np.float64)
    # ΔP = P_new · P_old⁻¹, then re-orthonormalise its rotation block
    delta = p_new32 @ np.linalg.inv(p_old)
    u, _, vt = np.linalg.svd(delta[:, :3, :3])
    delta[:, :3, :3] = u @ vt
    delta[:, 3] = [0, 0, 0, 1]
    pos = np.asarray(params.positions, np.float64)[:n_particles]
    if options.fix_gauge_positions:
        pos = pos - pos.mean(0, keepdims=True)
    return delta, pos
