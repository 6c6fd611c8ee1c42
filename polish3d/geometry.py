"""Geometry conventions shared by every part of polish3d (plain numpy, float64).

Frames (all 0-based, pixel centres on integers; see ``docs/conventions.md``):

* **tomogram frame** — voxel coordinates ``X = (x, y, z)`` in tilt-series pixels, origin at the
  centre of the corner voxel, extent ``tomo_size_px = (w0, h0, d0)`` (``rlnTomoSizeX/Y/Z``).
* **tilt-image frame** — pixel coordinates ``u = (x, y)`` of one tilt image of size
  ``image_size_px = (W, H)``; row 2 of a projection matrix gives a depth (pixels) along the beam.
* **particle (reference) frame** — voxel offsets from the reference box centre ``s // 2``.

A *projection matrix* ``P`` (4×4, acting on column vectors ``[x, y, z, 1]``) maps the tomogram
frame to the tilt-image frame. RELION 5 stores a rigid ``P`` as Euler angles and shifts; this
module builds ``P`` from those columns exactly as RELION 5 does (``tomogram.cpp``), including
RELION's *integer-halved* centres, and inverts it exactly (so a matrix written by polish3d is
read back by RELION bit-for-bit, with no drift for odd sizes; RELION's own inverse uses float
centres and drifts by up to 0.5 px per write, its issue #1280). The first two rows of ``P`` may
carry a 2×2 image distortion ``D`` (anisotropic magnification, skew) about the image centre
``c = (⌊W/2⌋, ⌊H/2⌋)``: ``u' = c + D·(u − c)`` (:func:`compose_distortion`,
:func:`split_distortion`); RELION reads such a matrix from ``rlnTomoProjX..W``.

Particle positions use RELION's *float* tomogram centre ``c = (w0/2, h0/2, d0/2)``:
``X = centred_Å / px + c − A_sub · origin_Å / px``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "compose_distortion",
    "distortion_matrix",
    "dose_order",
    "image_centre_px",
    "euler_zyz_matrix",
    "matrix_to_euler_zyz",
    "particle_positions_px",
    "particle_rotations",
    "positions_to_centred_ang",
    "project_points",
    "projection_depth",
    "projection_from_euler",
    "projection_to_euler",
    "rot_x",
    "rot_y",
    "rot_z",
    "split_distortion",
    "tomogram_centre_px",
]


def _trig(angle_deg):
    a = np.deg2rad(np.asarray(angle_deg, dtype=np.float64))
    return np.cos(a), np.sin(a)


def rot_x(angle_deg) -> np.ndarray:
    """Right-handed rotation about x, ``[[1,0,0],[0,c,−s],[0,s,c]]`` (shape ``(..., 3, 3)``)."""
    c, s = _trig(angle_deg)
    o, z = np.ones_like(c), np.zeros_like(c)
    return np.stack([np.stack([o, z, z], -1), np.stack([z, c, -s], -1), np.stack([z, s, c], -1)], -2)


def rot_y(angle_deg) -> np.ndarray:
    """Right-handed rotation about y, ``[[c,0,s],[0,1,0],[−s,0,c]]`` (shape ``(..., 3, 3)``)."""
    c, s = _trig(angle_deg)
    o, z = np.ones_like(c), np.zeros_like(c)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)


def rot_z(angle_deg) -> np.ndarray:
    """Right-handed rotation about z, ``[[c,−s,0],[s,c,0],[0,0,1]]`` (shape ``(..., 3, 3)``)."""
    c, s = _trig(angle_deg)
    o, z = np.ones_like(c), np.zeros_like(c)
    return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2)


def euler_zyz_matrix(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION's ZYZ Euler matrix ``A(rot, tilt, psi)`` (degrees), shape ``(..., 3, 3)``.

    Exactly RELION's ``Euler::anglesToMatrix3``:
    ``A = [[cψcθcφ−sψsφ, cψcθsφ+sψcφ, −cψsθ], [−sψcθcφ−cψsφ, −sψcθsφ+cψcφ, sψsθ],
    [sθcφ, sθsφ, cθ]]`` with φ=rot, θ=tilt, ψ=psi. It maps particle (reference) coordinates
    to the rotated frame (for a subtomogram: to the tomogram frame).
    """
    cp, sp = _trig(rot_deg)
    ct, st = _trig(tilt_deg)
    cc, sc = _trig(psi_deg)
    r0 = np.stack([cc * ct * cp - sc * sp, cc * ct * sp + sc * cp, -cc * st], -1)
    r1 = np.stack([-sc * ct * cp - cc * sp, -sc * ct * sp + cc * cp, sc * st], -1)
    r2 = np.stack([st * cp, st * sp, ct], -1)
    return np.stack([r0, r1, r2], -2)


def matrix_to_euler_zyz(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`euler_zyz_matrix`: ``(rot, tilt, psi)`` in degrees, tilt in [0, 180]."""
    a = np.asarray(a, dtype=np.float64)
    st = np.hypot(a[..., 0, 2], a[..., 1, 2])
    tilt = np.arctan2(st, a[..., 2, 2])
    regular = st > 1e-12
    rot = np.where(regular, np.arctan2(a[..., 2, 1], a[..., 2, 0]), 0.0)
    psi_reg = np.arctan2(a[..., 1, 2], -a[..., 0, 2])
    # gimbal lock: only rot ± psi is defined; put everything into psi
    psi_up = np.arctan2(-a[..., 1, 0], a[..., 0, 0])
    psi_down = np.arctan2(a[..., 1, 0], -a[..., 0, 0])
    psi = np.where(regular, psi_reg, np.where(a[..., 2, 2] > 0, psi_up, psi_down))
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


def tomogram_centre_px(tomo_size_px) -> np.ndarray:
    """RELION's float tomogram centre ``(w0/2, h0/2, d0/2)`` in tomogram pixels."""
    return np.asarray(tomo_size_px, dtype=np.float64) / 2.0


def _translation(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    m = np.broadcast_to(np.eye(4), v.shape[:-1] + (4, 4)).copy()
    m[..., :3, 3] = v
    return m


def projection_from_euler(
    x_tilt_deg,
    y_tilt_deg,
    z_rot_deg,
    x_shift_ang,
    y_shift_ang,
    *,
    pixel_size_ang: float,
    image_size_px: tuple[int, int],
    tomo_size_px: tuple[int, int, int],
) -> np.ndarray:
    """Projection matrices from RELION 5's per-tilt columns, exactly as RELION builds them.

    ``P = T(sx/px, sy/px, 0) · T(⌊W/2⌋, ⌊H/2⌋, 0) · Rz(ZRot) · Ry(YTilt) · Rx(XTilt)
    · T(−⌊w0/2⌋, −⌊h0/2⌋, −⌊d0/2⌋)``.

    Args:
        x_tilt_deg, y_tilt_deg, z_rot_deg: ``rlnTomoXTilt``, ``rlnTomoYTilt``, ``rlnTomoZRot``
            (degrees), shape ``(F,)``.
        x_shift_ang, y_shift_ang: ``rlnTomoXShiftAngst``, ``rlnTomoYShiftAngst`` (Å).
        pixel_size_ang: ``rlnTomoTiltSeriesPixelSize`` (Å/px).
        image_size_px: tilt-image size ``(W, H)`` in pixels.
        tomo_size_px: ``(rlnTomoSizeX, rlnTomoSizeY, rlnTomoSizeZ)`` in tilt-series pixels.

    Returns:
        ``(F, 4, 4)`` float64 matrices mapping tomogram voxels to tilt-image pixels.
    """
    w, h = (int(v) for v in image_size_px)
    w0, h0, d0 = (int(v) for v in tomo_size_px)
    r = rot_z(z_rot_deg) @ rot_y(y_tilt_deg) @ rot_x(x_tilt_deg)
    n = r.shape[:-2]
    p = np.zeros(n + (4, 4))
    p[..., :3, :3] = r
    p[..., 3, 3] = 1.0
    p = p @ _translation(np.broadcast_to([-(w0 // 2), -(h0 // 2), -(d0 // 2)], n + (3,)))
    shift = np.stack(
        [
            np.asarray(x_shift_ang, np.float64) / pixel_size_ang + (w // 2),
            np.asarray(y_shift_ang, np.float64) / pixel_size_ang + (h // 2),
            np.zeros(n),
        ],
        -1,
    )
    return _translation(shift) @ p


def projection_to_euler(
    projections: np.ndarray,
    *,
    pixel_size_ang: float,
    image_size_px: tuple[int, int],
    tomo_size_px: tuple[int, int, int],
) -> dict[str, np.ndarray]:
    """Inverse of :func:`projection_from_euler` (exact, for proper rotations).

    Angles follow RELION's decomposition ``A = Rz·Ry·Rx`` (``YTilt = asin(−A20)``,
    ``XTilt = atan2(A21, A22)``, ``ZRot = atan2(A10, A00)``); the shifts are chosen so that
    RELION's reader rebuilds exactly these matrices (integer-halved centres on both sides).
    A matrix with an image distortion (:func:`split_distortion`) gives the angles of its
    rotation and the shifts of the projected tomogram centre ``P · ⌊tomo/2⌋`` (where it lands
    in the distorted image): the rigid geometry closest to it (exact only with ``rlnTomoProjX..W``).

    Returns:
        dict with ``rlnTomoXTilt``, ``rlnTomoYTilt``, ``rlnTomoZRot`` (degrees) and
        ``rlnTomoXShiftAngst``, ``rlnTomoYShiftAngst`` (Å), each shape ``(F,)``.
    """
    p = np.asarray(projections, dtype=np.float64)
    a = split_distortion(p, image_size_px)[1][..., :3, :3]  # the rotation of a distorted matrix
    w, h = (int(v) for v in image_size_px)
    w0, h0, d0 = (int(v) for v in tomo_size_px)
    s20 = np.clip(-a[..., 2, 0], -1.0, 1.0)
    y_tilt = np.arcsin(s20)
    regular = np.abs(s20) < 1.0 - 1e-12
    x_tilt = np.where(regular, np.arctan2(a[..., 2, 1], a[..., 2, 2]), 0.0)
    z_reg = np.arctan2(a[..., 1, 0], a[..., 0, 0])
    # A20 = +1 (YTilt = −90°): ZRot = +atan2(−A12, A11); A20 = −1 (YTilt = +90°): the negative
    z_lock = np.where(s20 > 0, -1.0, 1.0) * np.arctan2(-a[..., 1, 2], a[..., 1, 1])
    z_rot = np.where(regular, z_reg, z_lock)
    # P = T(t) · R · T(−c_int)  ⇒  t = P[:3,3] + R · c_int (the projected integer centre)
    c_int = np.array([w0 // 2, h0 // 2, d0 // 2], dtype=np.float64)
    t = p[..., :3, 3] + p[..., :3, :3] @ c_int
    return {
        "rlnTomoXTilt": np.rad2deg(x_tilt),
        "rlnTomoYTilt": np.rad2deg(y_tilt),
        "rlnTomoZRot": np.rad2deg(z_rot),
        "rlnTomoXShiftAngst": (t[..., 0] - (w // 2)) * pixel_size_ang,
        "rlnTomoYShiftAngst": (t[..., 1] - (h // 2)) * pixel_size_ang,
    }


def image_centre_px(image_size_px) -> np.ndarray:
    """RELION's integer-halved image centre ``(⌊W/2⌋, ⌊H/2⌋)`` (pixels): where the tomogram centre
    projects with zero shifts, and the centre of the image distortion."""
    return np.array([int(v) // 2 for v in image_size_px], dtype=np.float64)


def distortion_matrix(aniso, skew) -> np.ndarray:
    """The symmetric, trace-2 image distortion ``D = I + [[a, s], [s, −a]]``, shape ``(..., 2, 2)``.

    ``a`` (``aniso``) stretches the image x axis by ``1 + a`` and y by ``1 − a``; ``s`` (``skew``)
    is the same stretch along the diagonals (axis at 45°). Exact (not a small-angle form): the
    eigenvalues are ``1 ± sqrt(a² + s²)`` along the axis at ``atan2(s, a)/2``.
    """
    a = np.asarray(aniso, np.float64)
    s = np.asarray(skew, np.float64)
    return np.stack([np.stack([1.0 + a, s], -1), np.stack([s, 1.0 - a], -1)], -2)


def compose_distortion(projections, distortion, image_size_px) -> np.ndarray:
    """``P`` whose image positions are those of ``projections`` distorted about the image centre.

    ``u' = c + D·(u − c)`` with ``c`` = :func:`image_centre_px`: the first two rows become
    ``D · P[:2]`` with the translation ``D · (P[:2, 3] − c) + c``; the depth row is untouched.

    Args:
        projections: ``(F, 4, 4)`` (pixels).
        distortion: ``(F, 2, 2)`` (or ``(2, 2)``) matrices ``D``.
        image_size_px: ``(W, H)``.
    """
    p = np.array(projections, dtype=np.float64)
    d = np.broadcast_to(np.asarray(distortion, np.float64), p.shape[:-2] + (2, 2))
    c = image_centre_px(image_size_px)
    rows = d @ p[..., :2, :]
    rows[..., 3] += c - d @ c
    p[..., :2, :] = rows
    return p


def split_distortion(projections, image_size_px, *, tol: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """``(D (F, 2, 2), rigid (F, 4, 4))`` with ``projections = compose_distortion(rigid, D)``.

    The polar decomposition of the image rows ``M = P[:2, :3] = D · R₂``: ``D = sqrt(M·Mᵀ)``
    (symmetric positive definite) and ``R₂ = D⁻¹ · M`` (orthonormal rows); the depth row is kept
    as it is. Where the rows are orthonormal within ``tol`` (``max |M·Mᵀ − I|``), ``D`` is
    exactly the identity and the matrix is returned unchanged (bit for bit).
    """
    p = np.array(projections, dtype=np.float64)
    m = p[..., :2, :3]
    mmt = m @ np.swapaxes(m, -1, -2)
    eye = np.eye(2)
    distorted = np.abs(mmt - eye).reshape(mmt.shape[:-2] + (4,)).max(-1) > tol
    d = np.broadcast_to(eye, mmt.shape).copy()
    if np.any(distorted):
        g = mmt[distorted]
        # square root of a 2×2 SPD matrix: (G + sqrt(det G)·I) / sqrt(tr G + 2·sqrt(det G))
        root_det = np.sqrt(np.linalg.det(g))
        norm = np.sqrt(np.trace(g, axis1=-2, axis2=-1) + 2.0 * root_det)
        d[distorted] = (g + root_det[:, None, None] * eye) / norm[:, None, None]
        c = image_centre_px(image_size_px)
        inv = np.linalg.inv(d[distorted])
        sub = p[distorted]
        sub[:, :2, :3] = inv @ sub[:, :2, :3]
        sub[:, :2, 3] = np.einsum("fij,fj->fi", inv, sub[:, :2, 3] - c) + c
        p[distorted] = sub
    return d, p


def particle_rotations(angles_deg, subtomo_angles_deg=None) -> np.ndarray:
    """Particle rotation ``M = A_sub · A_part`` (reference frame → tomogram frame), ``(N, 3, 3)``.

    Args:
        angles_deg: ``(N, 3)`` ``rlnAngleRot, rlnAngleTilt, rlnAnglePsi`` (degrees).
        subtomo_angles_deg: ``(N, 3)`` ``rlnTomoSubtomogramRot/Tilt/Psi`` or ``None`` (identity).
    """
    ang = np.asarray(angles_deg, dtype=np.float64)
    m = euler_zyz_matrix(ang[..., 0], ang[..., 1], ang[..., 2])
    if subtomo_angles_deg is not None:
        sub = np.asarray(subtomo_angles_deg, dtype=np.float64)
        m = euler_zyz_matrix(sub[..., 0], sub[..., 1], sub[..., 2]) @ m
    return m


def particle_positions_px(
    centred_ang,
    *,
    pixel_size_ang: float,
    tomo_size_px,
    origin_ang=None,
    subtomo_angles_deg=None,
) -> np.ndarray:
    """Particle positions in tomogram pixels, as RELION 5 computes them.

    ``X = centred_Å / px + c − A_sub · origin_Å / px`` with ``c`` the float tomogram centre.

    Args:
        centred_ang: ``(N, 3)`` ``rlnCenteredCoordinateX/Y/ZAngst`` (Å from the centre).
        pixel_size_ang: tilt-series pixel size (Å/px).
        tomo_size_px: ``(w0, h0, d0)``.
        origin_ang: ``(N, 3)`` ``rlnOriginX/Y/ZAngst`` (Å, subtomogram frame) or ``None``.
        subtomo_angles_deg: ``(N, 3)`` subtomogram Euler angles or ``None`` (identity).
    """
    x = np.asarray(centred_ang, dtype=np.float64) / pixel_size_ang + tomogram_centre_px(tomo_size_px)
    if origin_ang is not None:
        o = np.asarray(origin_ang, dtype=np.float64) / pixel_size_ang
        if subtomo_angles_deg is not None:
            sub = np.asarray(subtomo_angles_deg, dtype=np.float64)
            a_sub = euler_zyz_matrix(sub[..., 0], sub[..., 1], sub[..., 2])
            o = np.einsum("nij,nj->ni", a_sub, o)
        x = x - o
    return x


def positions_to_centred_ang(positions_px, *, pixel_size_ang: float, tomo_size_px) -> np.ndarray:
    """Inverse of :func:`particle_positions_px` with zero origins: ``(X − c) · px`` (Å)."""
    return (np.asarray(positions_px, np.float64) - tomogram_centre_px(tomo_size_px)) * pixel_size_ang


def project_points(projections, points_px) -> np.ndarray:
    """Project tomogram points into tilt images.

    Args:
        projections: ``(F, 4, 4)``.
        points_px: ``(N, 3)`` static points, or ``(F, N, 3)`` per-tilt points (with motion).

    Returns:
        ``(F, N, 2)`` tilt-image pixel coordinates ``(x, y)``.
    """
    p = np.asarray(projections, dtype=np.float64)
    x = np.asarray(points_px, dtype=np.float64)
    if x.ndim == 2:
        return np.einsum("fij,nj->fni", p[:, :2, :3], x) + p[:, None, :2, 3]
    return np.einsum("fij,fnj->fni", p[:, :2, :3], x) + p[:, None, :2, 3]


def projection_depth(projections, points_px) -> np.ndarray:
    """Depth ``z_j(X) = P_j[2] · [X; 1]`` (pixels), shape ``(F, N)``; used for defocus."""
    p = np.asarray(projections, dtype=np.float64)
    x = np.asarray(points_px, dtype=np.float64)
    return np.einsum("fj,nj->fn", p[:, 2, :3], x) + p[:, None, 2, 3]


def dose_order(pre_exposure_e_per_ang2) -> np.ndarray:
    """Dose ranks: ``seq[k] = j``, the file row of the k-th least exposed tilt.

    Stable: ties keep file order (RELION's ``std::sort`` leaves them unspecified).
    """
    return np.argsort(np.asarray(pre_exposure_e_per_ang2, dtype=np.float64), kind="stable")
