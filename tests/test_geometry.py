"""Unit tests of polish3d.geometry (conventions of RELION 5, spec §5.3–§5.6)."""

from __future__ import annotations

import numpy as np
import pytest

from polish3d import geometry as g

RNG = np.random.default_rng(1234)


def test_rotations_are_orthogonal_and_right_handed():
    a = RNG.uniform(-360, 360, 50)
    for r in (g.rot_x(a), g.rot_y(a), g.rot_z(a), g.euler_zyz_matrix(a, a[::-1], 0.5 * a)):
        np.testing.assert_allclose(
            r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(3), r.shape), atol=1e-12
        )
        np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-12)
    # right-handed: +90° about z takes x to y, about x takes y to z, about y takes z to x
    np.testing.assert_allclose(g.rot_z(90.0) @ [1, 0, 0], [0, 1, 0], atol=1e-15)
    np.testing.assert_allclose(g.rot_x(90.0) @ [0, 1, 0], [0, 0, 1], atol=1e-15)
    np.testing.assert_allclose(g.rot_y(90.0) @ [0, 0, 1], [1, 0, 0], atol=1e-15)


def test_euler_matrix_is_relion_zyz():
    """A(rot, tilt, psi) = Rz(psi)ᵀ... in RELION's convention: A = Rz(-psi) Ry(-tilt) Rz(-rot)."""
    rot, tilt, psi = RNG.uniform(-180, 180, (3, 20))
    a = g.euler_zyz_matrix(rot, tilt, psi)
    b = g.rot_z(-psi) @ g.rot_y(-tilt) @ g.rot_z(-rot)
    np.testing.assert_allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("tilt", [None, 0.0, 180.0, 1e-9, 90.0])
def test_euler_round_trip(tilt):
    n = 200
    rot = RNG.uniform(-180, 180, n)
    psi = RNG.uniform(-180, 180, n)
    t = RNG.uniform(0, 180, n) if tilt is None else np.full(n, tilt)
    a = g.euler_zyz_matrix(rot, t, psi)
    r2, t2, p2 = g.matrix_to_euler_zyz(a)
    assert np.all((t2 >= 0) & (t2 <= 180))
    np.testing.assert_allclose(g.euler_zyz_matrix(r2, t2, p2), a, atol=1e-9)
    if tilt is None:  # regular case: the angles themselves come back (mod 360)
        np.testing.assert_allclose(np.cos(np.deg2rad(r2 - rot)), 1.0, atol=1e-9)
        np.testing.assert_allclose(np.cos(np.deg2rad(p2 - psi)), 1.0, atol=1e-9)


@pytest.mark.parametrize(
    ("image", "tomo"),
    [((256, 256), (256, 256, 128)), ((255, 257), (301, 199, 77)), ((384, 383), (384, 384, 256))],
)
def test_projection_to_euler_is_exact_inverse(image, tomo):
    f = 41
    xt = RNG.normal(0, 1, f)
    yt = np.linspace(-60, 60, f)
    zr = 85 + RNG.normal(0, 1, f)
    sx, sy = RNG.normal(0, 30, (2, f))
    kw = dict(pixel_size_ang=7.5, image_size_px=image, tomo_size_px=tomo)
    p = g.projection_from_euler(xt, yt, zr, sx, sy, **kw)
    cols = g.projection_to_euler(p, **kw)
    np.testing.assert_allclose(cols["rlnTomoXTilt"], xt, atol=1e-10)
    np.testing.assert_allclose(cols["rlnTomoYTilt"], yt, atol=1e-10)
    np.testing.assert_allclose(cols["rlnTomoZRot"], zr, atol=1e-10)
    np.testing.assert_allclose(cols["rlnTomoXShiftAngst"], sx, atol=1e-9)
    np.testing.assert_allclose(cols["rlnTomoYShiftAngst"], sy, atol=1e-9)
    p2 = g.projection_from_euler(
        *(
            cols[k]
            for k in (
                "rlnTomoXTilt",
                "rlnTomoYTilt",
                "rlnTomoZRot",
                "rlnTomoXShiftAngst",
                "rlnTomoYShiftAngst",
            )
        ),
        **kw,
    )
    np.testing.assert_allclose(p2, p, atol=1e-10)


def test_projection_from_euler_centres():
    """Identity angles and zero shifts map the integer-halved tomogram centre to the image's."""
    p = g.projection_from_euler(
        [0.0],
        [0.0],
        [0.0],
        [0.0],
        [0.0],
        pixel_size_ang=2.0,
        image_size_px=(101, 64),
        tomo_size_px=(33, 40, 9),
    )
    u = g.project_points(p, np.array([[16.0, 20.0, 4.0]]))
    np.testing.assert_allclose(u[0, 0], [50.0, 32.0])
    np.testing.assert_allclose(g.projection_depth(p, np.array([[16.0, 20.0, 4.0]])), [[0.0]])


@pytest.mark.parametrize("y_tilt", [90.0, -90.0])
@pytest.mark.parametrize("x_tilt", [0.0, 17.0])
def test_projection_gimbal_lock(y_tilt, x_tilt):
    """At YTilt = ±90° only XTilt ∓ ZRot is defined; the matrix must still come back exactly."""
    kw = dict(pixel_size_ang=1.0, image_size_px=(64, 64), tomo_size_px=(65, 64, 31))
    p = g.projection_from_euler([x_tilt], [y_tilt], [30.0], [3.0], [-2.0], **kw)
    c = g.projection_to_euler(p, **kw)
    assert c["rlnTomoXTilt"][0] == 0.0 and c["rlnTomoYTilt"][0] == pytest.approx(y_tilt)
    labels = (
        "rlnTomoXTilt",
        "rlnTomoYTilt",
        "rlnTomoZRot",
        "rlnTomoXShiftAngst",
        "rlnTomoYShiftAngst",
    )
    p2 = g.projection_from_euler(*(c[k] for k in labels), **kw)
    np.testing.assert_allclose(p2, p, atol=1e-9)


def test_dose_order_stable_ties():
    pre = np.array([6.0, 3.0, 0.0, 3.0, 9.0, 0.0])
    np.testing.assert_array_equal(g.dose_order(pre), [2, 5, 1, 3, 0, 4])


def test_particle_positions_with_origins_and_subtomo_angles():
    n = 30
    tomo = (401, 300, 151)
    px = 4.0
    centred = RNG.normal(0, 300, (n, 3))
    origin = RNG.normal(0, 10, (n, 3))
    sub = RNG.uniform(-180, 180, (n, 3))
    x = g.particle_positions_px(
        centred, pixel_size_ang=px, tomo_size_px=tomo, origin_ang=origin, subtomo_angles_deg=sub
    )
    a_sub = g.euler_zyz_matrix(sub[:, 0], sub[:, 1], sub[:, 2])
    expect = centred / px + np.array(tomo) / 2.0 - np.einsum("nij,nj->ni", a_sub, origin) / px
    np.testing.assert_allclose(x, expect, atol=1e-12)
    # no origin: plain centring with the float centre (c = size / 2, also for odd sizes)
    x0 = g.particle_positions_px(centred, pixel_size_ang=px, tomo_size_px=tomo)
    np.testing.assert_allclose(x0, centred / px + [200.5, 150.0, 75.5])
    np.testing.assert_allclose(
        g.positions_to_centred_ang(x0, pixel_size_ang=px, tomo_size_px=tomo), centred, atol=1e-12
    )
    # origin without subtomogram angles: subtracted as is
    x1 = g.particle_positions_px(centred, pixel_size_ang=px, tomo_size_px=tomo, origin_ang=origin)
    np.testing.assert_allclose(x1, x0 - origin / px, atol=1e-12)


def test_particle_rotations_compose_subtomogram_first():
    ang = RNG.uniform(-180, 180, (10, 3))
    sub = RNG.uniform(-180, 180, (10, 3))
    m = g.particle_rotations(ang, sub)
    a = g.euler_zyz_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    s = g.euler_zyz_matrix(sub[:, 0], sub[:, 1], sub[:, 2])
    np.testing.assert_allclose(m, s @ a, atol=1e-12)
    np.testing.assert_allclose(g.particle_rotations(ang), a, atol=1e-12)


def test_project_points_static_and_per_tilt():
    p = g.projection_from_euler(
        np.zeros(3),
        [-30.0, 0.0, 30.0],
        np.zeros(3),
        np.zeros(3),
        np.zeros(3),
        pixel_size_ang=1.0,
        image_size_px=(64, 64),
        tomo_size_px=(64, 64, 32),
    )
    x = RNG.uniform(0, 64, (5, 3))
    u = g.project_points(p, x)
    assert u.shape == (3, 5, 2)
    u2 = g.project_points(p, np.broadcast_to(x, (3, 5, 3)))
    np.testing.assert_allclose(u2, u)
    np.testing.assert_allclose(u[1], x[:, :2])  # 0° tilt, centres equal: image = (x, y)
