"""CTF, defocus at depth and dose weights against direct numpy formulas."""

import jax
import numpy as np

from polish3d import imaging as im


def _ref_ctf(kx, ky, px, box, du, dv, ang, kv, cs, q0, ps=0.0, b=0.0, scale=1.0):
    x, y = kx / (box * px), ky / (box * px)
    v = kv * 1e3
    lam = 12.2643247 / np.sqrt(v * (1 + v * 0.978466e-6))
    phi = np.arctan2(y, x)
    a = np.deg2rad(ang)
    k2 = x * x + y * y
    # defocus along the azimuth: ΔU at angle `ang`, ΔV perpendicular
    df = 0.5 * (du + dv + (du - dv) * np.cos(2 * (phi - a)))
    gamma = (
        -np.pi * lam * df * k2
        + 0.5 * np.pi * cs * 1e7 * lam**3 * k2**2
        - np.deg2rad(ps)
        - np.arctan(q0 / np.sqrt(1 - q0 * q0))
    )
    return -np.sin(gamma) * np.exp(-b * k2 / 4) * scale


def test_wavelength():
    assert abs(float(im.electron_wavelength_ang(300.0)) - 0.019687) < 1e-5


def test_ctf_matches_formula():
    box, px = 48, 2.1
    args = dict(
        du=21000.0, dv=18500.0, ang=33.0, kv=300.0, cs=2.7, q0=0.07, ps=15.0, b=40.0, scale=0.8
    )
    c = np.asarray(
        im.ctf_2d(
            box,
            px,
            args["du"],
            args["dv"],
            args["ang"],
            args["kv"],
            args["cs"],
            args["q0"],
            args["ps"],
            args["b"],
            args["scale"],
        )
    )
    assert c.shape == (box, box // 2 + 1) and c.dtype == np.float32
    for ky, kx in [(0, 0), (0, 5), (3, 0), (-7, 4), (11, 13), (-24, 24), (20, 1)]:
        row = ky % box
        expect = _ref_ctf(kx, ky, px, box, **args)
        assert abs(c[row, kx] - expect) < 2e-4, (ky, kx, c[row, kx], expect)
    # at DC: Q0 (with phase shift 0, scale 1)
    c0 = im.ctf_2d(box, px, 20000.0, 20000.0, 0.0, 300.0, 2.7, 0.1)
    assert abs(float(c0[0, 0]) - 0.1) < 1e-6


def test_ctf_vmaps_over_defocus():
    f = jax.vmap(lambda d: im.ctf_2d(32, 4.0, d, d, 0.0, 300.0, 2.7, 0.07))
    out = f(np.array([1e4, 3e4, 5e4], np.float32))
    assert out.shape == (3, 32, 17)


def test_defocus_at_depth():
    d = im.defocus_at_depth(30000.0, 60.0, 50.0, 8.0, -1.0, 1.0)
    assert abs(float(d) - (30000.0 - 80.0)) < 1e-6


def test_dose_weights_match_formula():
    box, px, n = 40, 3.0, 37.5
    w = np.asarray(im.dose_weights(box, px, n))
    assert w[0, 0] == 1.0
    for ky, kx in [(0, 1), (5, 3), (-20, 20), (13, 0)]:
        k = np.hypot(kx, ky) / (box * px)
        expect = np.exp(-n / (2 * (0.245 * k**-1.665 + 2.81)))
        assert abs(w[ky % box, kx] - expect) < 1e-5
    wb = np.asarray(im.dose_weights(box, px, n, 4.0))
    k2 = (7**2 + 2**2) / (box * px) ** 2
    assert abs(wb[2, 7] - np.exp(-4.0 * n * k2 / 4)) < 1e-6
    assert np.all(np.asarray(im.dose_weights(box, px, 0.0)) == 1.0)
