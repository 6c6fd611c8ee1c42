"""Assemble the stage-2 problem (data pytree, initial parameters) and read its result back."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from polish3d import geometry
from polish3d.refine.devices import round_up
from polish3d.refine.objective import distortion_update, rigid_transforms, tilt_transforms

__all__ = [
    "Stage2Params",
    "aniso_gauge_basis",
    "aniso_mode",
    "build_data",
    "initial_params",
    "pad_to_bucket",
    "results_from_params",
]

#: the distortion refined by ``--aniso`` (one per tilt series) and ``--per_tilt_aniso`` (per tilt)
ANISO_MODES = ("series", "tilt")


def aniso_mode(config) -> str | None:
    """``"tilt"`` (``config.per_tilt_aniso``), ``"series"`` (``config.aniso``) or ``None``."""
    if getattr(config, "per_tilt_aniso", False):
        return "tilt"
    return "series" if getattr(config, "aniso", False) else None


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
    aniso: str | None = None,
    free: tuple[str, ...] | None = None,
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
        aniso: the distortion to refine (:data:`ANISO_MODES`) or ``None``.
        free: the optimised parameter blocks (``None``: all), for the distortion's gauge.

    Projections with an image distortion (or any, with ``aniso``) are split into
    ``data["distortion"]`` ``D0 (F, 2, 2)`` and their rigid part ``data["projections"]``
    (:func:`polish3d.geometry.split_distortion`); without either the data are what they were
    before distortions existed, bit for bit.
    """
    n = positions_px.shape[0]
    n_pad = n if n_pad is None else max(n_pad, n)  # (cc may already come padded to n_pad)
    pad = n_pad - n

    def padn(a):
        if not pad or a.shape[0] == n_pad:
            return a
        return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)], 0)

    p, extra = _distortion_data(np.asarray(projections, np.float64), image_size_px, aniso, free)
    c = geometry.tomogram_centre_px(tomo_size_px)
    centre_cam = p[:, :3, :3] @ c + p[:, :3, 3]
    radius = 0.5 * float(np.hypot(*image_size_px))
    mask = np.zeros(n_pad, np.float32)
    mask[:n] = 1.0
    return {
        **extra,
        "projections": jnp.asarray(p, jnp.float32),
        "centre_cam": jnp.asarray(centre_cam, jnp.float32),
        "positions": jnp.asarray(padn(np.asarray(positions_px, np.float64)), jnp.float32),
        "u0": jnp.asarray(padn(np.asarray(u0, np.float64)), jnp.float32),
        **(
            {"taylor": jnp.asarray(padn(np.asarray(cc, np.float32))),
             "taylor_radius": jnp.float32(taylor_radius_px)}
            if taylor_radius_px > 0
            # device_put: on a CPU an aligned float32 store is shared, not copied
            else {"cc": jax.device_put(np.ascontiguousarray(padn(np.asarray(cc, np.float32))))}
        ),
        "weight": jnp.asarray(padn(np.asarray(weight, np.float32))),
        "particle_mask": jnp.asarray(mask),
        "offsets": jnp.zeros((n_pad, p.shape[0], 3), jnp.float32),
        "cc_base": jnp.zeros((n_pad, p.shape[0]), jnp.float32),
        "window_radius": jnp.float32(window_radius_px),
        "angle_unit_rad": jnp.float32(1.0 / radius),
    }


def _distortion_data(p: np.ndarray, image_size_px, aniso: str | None, free) -> tuple[np.ndarray, dict]:
    """The projections stage 2 rotates (``p``, or its rigid part when a tilt is distorted or the
    distortion is refined) and the distortion's data entries (none without a distortion)."""
    if aniso is not None and aniso not in ANISO_MODES:
        raise ValueError(f"aniso must be one of {ANISO_MODES} or None, got {aniso!r}")
    d0, rigid = geometry.split_distortion(p, image_size_px)
    if aniso is None and np.all(d0 == np.eye(2)):
        return p, {}
    extra = {"distortion": jnp.asarray(d0, jnp.float32),
             "image_centre": jnp.asarray(geometry.image_centre_px(image_size_px), jnp.float32),
             "aniso_unit": jnp.float32(2.0 / float(np.hypot(*image_size_px)))}
    free = ("tilt_angles", "positions") if free is None else free
    if aniso is not None and "positions" in free:
        basis = aniso_gauge_basis(rigid[:, :3, :3], aniso, angles_free="tilt_angles" in free)
        if basis.shape[0]:
            extra["aniso_gauge"] = jnp.asarray(basis, jnp.float32)
    return rigid, extra


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["tilt_angles", "tilt_shifts", "positions", "motion", "deformation", "aniso"],
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
        aniso: ``(1, 2)`` or ``(F, 2)`` change of the image distortion ``(a, s)`` in units of
            ``data["aniso_unit"]`` (see :mod:`polish3d.refine.objective`), or ``None``.
    """

    tilt_angles: jax.Array
    tilt_shifts: jax.Array
    positions: jax.Array
    motion: jax.Array | None = None
    deformation: jax.Array | None = None
    aniso: jax.Array | None = None


def initial_params(n_tilts: int, n_particles: int, *, aniso: str | None = None, **models) -> Stage2Params:
    """All-zero parameters (the current geometry); ``aniso``: the distortion refined
    (:data:`ANISO_MODES`, or ``None``); ``models``: the optional blocks' start values
    (``motion=``, ``deformation=``)."""
    if aniso is not None:
        models["aniso"] = jnp.zeros((1 if aniso == "series" else n_tilts, 2), jnp.float32)
    return Stage2Params(
        tilt_angles=jnp.zeros((n_tilts, 3), jnp.float32),
        tilt_shifts=jnp.zeros((n_tilts, 2), jnp.float32),
        positions=jnp.zeros((n_particles, 3), jnp.float32),
        **models,
    )


def aniso_gauge_basis(rotations: np.ndarray, mode: str, *, angles_free: bool = True,
                      tol: float = 0.05) -> np.ndarray:
    """Orthonormal rows ``(k, 2m)`` spanning the distortion parameters' gauge directions.

    A small linear map ``X → (I + εG)·X`` of the particle positions (about their mean, ``G``
    symmetric; the antisymmetric part is the rotation gauge) moves the image of tilt ``f`` by
    ``ε·R_f[:2]·G·X``: an in-plane part ``H_f = R_f[:2]·G·R_f[:2]ᵀ`` acting on ``u − c`` and a
    depth-dependent shift ``R_f[:2]·G·n_f`` (``n_f = R_f[2]``), which small tilt rotations absorb
    (when the angles are free). The distortion absorbs ``H_f`` when it has no isotropic part
    (``tr H_f = 0``: per-tilt magnification is not a parameter) and, for one distortion per tilt
    series, is the same in every tilt. Such ``G`` leave every prediction unchanged to first order:
    the distortion's component along them is undetermined and is held at zero. For a
    single-axis tilt series they are the stretch along the tilt axis against the other two axes
    (both modes) and, per tilt, the two shears that tilt with the beam (skew ∝ ``cos θ_f``,
    ``sin θ_f``).

    Args:
        rotations: ``(F, 3, 3)`` rotation blocks of the rigid projections.
        mode: ``"series"`` (parameters ``(a, s)``) or ``"tilt"`` (``(a_f, s_f)`` per tilt).
        angles_free: the tilt angles are refined (else the depth shifts must vanish too).
        tol: singular values below ``tol`` (per-tilt RMS of the constraints) count as zero:
            directions the data constrain this weakly are held too (per-tilt tilt-axis
            wobbles of 0.5° make the along-axis stretch of a per-series distortion 0.012 from
            a gauge; the next direction is at 0.12).
    """
    r = np.asarray(rotations, np.float64)
    f = r.shape[0]
    gens = np.zeros((6, 3, 3))
    for k, (i, j) in enumerate([(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]):
        gens[k, i, j] = gens[k, j, i] = 1.0
    img = r[:, :2, :]
    h = np.einsum("fia,gab,fjb->gfij", img, gens, img)  # (6, F, 2, 2)
    m = 1 if mode == "series" else f
    pick = np.zeros((f, m))
    pick[np.arange(f), 0 if m == 1 else np.arange(f)] = 1.0
    zeros = np.zeros((f, 2 * m))
    rows = [np.hstack([(h[..., 0, 0] + h[..., 1, 1]).T, zeros]),  # no isotropic part
            np.hstack([0.5 * (h[..., 0, 0] - h[..., 1, 1]).T, -np.kron(pick, [1.0, 0.0])]),  # a_f
            np.hstack([h[..., 0, 1].T, -np.kron(pick, [0.0, 1.0])])]  # s_f
    if not angles_free:
        shift = np.einsum("fia,gab,fb->gfi", img, gens, r[:, 2, :])  # (6, F, 2)
        rows += [np.hstack([shift[..., 0].T, zeros]), np.hstack([shift[..., 1].T, zeros])]
    k_mat = np.vstack(rows) / np.sqrt(f)
    _, sv, vt = np.linalg.svd(k_mat, full_matrices=True)
    sv = np.concatenate([sv, np.zeros(vt.shape[0] - sv.size)])
    null = vt[sv < tol][:, 6:]  # the distortion part of each (near-)gauge direction
    if null.size == 0:
        return np.zeros((0, 2 * m))
    _, s_null, vt_null = np.linalg.svd(null, full_matrices=False)
    return vt_null[s_null > 1e-6]


@functools.partial(jax.jit, static_argnames=("fix_gauge",))
def _tilt_transforms(params, data, fix_gauge):
    return tilt_transforms(params, data, fix_gauge=fix_gauge)


@functools.partial(jax.jit, static_argnames=("fix_gauge",))
def _rigid_and_update(params, data, fix_gauge):
    update = None if params.aniso is None else distortion_update(params, data)
    return rigid_transforms(params, data, fix_gauge=fix_gauge), update


def _orthonormal_delta(p_new32: np.ndarray, p_old: np.ndarray) -> np.ndarray:
    """``ΔP = P_new · P_old⁻¹`` with its rotation block re-orthonormalised (a rigid update)."""
    delta = p_new32 @ np.linalg.inv(p_old)
    u, _, vt = np.linalg.svd(delta[:, :3, :3])
    delta[:, :3, :3] = u @ vt
    delta[:, 3] = [0, 0, 0, 1]
    return delta


def results_from_params(params: Stage2Params, data: dict, options, n_particles: int, *,
                        projections: np.ndarray | None = None):
    """``(ΔP (F, 4, 4), position changes (N, 3))`` (float64) from the parameters.

    The update is applied to the float64 input geometry: ``P_new = ΔP · P`` with ``ΔP`` computed
    in float32 from the parameters, so rounding does not accumulate over outer iterations. With
    image distortions (``data["distortion"]``) the float64 ``projections`` the data were built
    from are needed: the rigid update is re-orthonormalised on the rigid
    part alone and the distortion update added to the float64 distortion, so neither spoils
    the other; ``ΔP = P_new · P⁻¹`` then.
    """
    pos = np.asarray(params.positions, np.float64)[:n_particles]
    if options.fix_gauge_positions:
        pos = pos - pos.mean(0, keepdims=True)
    p_old = np.asarray(data["projections"], np.float64)
    if "distortion" not in data:
        p_new32 = np.asarray(_tilt_transforms(params, data, options.fix_gauge_angles), np.float64)
        return _orthonormal_delta(p_new32, p_old), pos
    if projections is None:
        raise ValueError("distorted projections: results_from_params needs the float64 projections")
    # any size whose halves are the image centre (⌊W/2⌋, ⌊H/2⌋) (exact in float32) gives that centre
    image_size_px = tuple(2 * int(v) for v in np.asarray(data["image_centre"]))
    rigid32, update = _rigid_and_update(params, data, options.fix_gauge_angles)
    p_full = np.asarray(projections, np.float64)
    d_old, rigid_old = geometry.split_distortion(p_full, image_size_px)
    d_new = d_old if update is None else d_old + np.asarray(update, np.float64)
    rigid_new = _orthonormal_delta(np.asarray(rigid32, np.float64), p_old) @ rigid_old
    p_new = geometry.compose_distortion(rigid_new, d_new, image_size_px)
    return p_new @ np.linalg.inv(p_full), pos
