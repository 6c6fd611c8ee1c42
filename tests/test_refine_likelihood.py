"""The final stage's exact CC (refine/likelihood.py): known answers, no grid bias, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from polish3d.refine import likelihood, objective

BOX = 32


def _blob_spectra(shifts_px, box=BOX, seed=0):
    """Weighted cross spectra ``g`` (as ccmaps.cc_spectra: C(d) = irfft2(g)[d]) of a noise-free
    particle (a sum of Gaussian blobs) observed displaced by ``shifts_px (P, 2)`` from the
    phase origin, matched against itself with a whitening-like weight rising with frequency."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:box, :box] - box // 2
    img = np.zeros((box, box))
    for _ in range(5):
        cx, cy = rng.uniform(-4, 4, 2)
        img += rng.uniform(0.5, 1.0) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 1.5**2))
    s = np.fft.rfft2(np.fft.ifftshift(img))
    ky = np.fft.fftfreq(box)[:, None] * box
    kx = np.arange(box // 2 + 1)[None, :]
    w = 1.0 + 0.05 * (kx**2 + ky**2)  # emphasises high frequencies: a sharp CC peak
    g = []
    for dx, dy in shifts_px:
        yobs = s * np.exp(-2j * np.pi * (kx * dx + ky * dy) / box)  # particle moved by +d
        g.append(box * box * w * yobs * np.conj(s))
    return np.asarray(g)


def test_exact_values_equal_windows_at_integer_displacements():
    g = _blob_spectra([(0.3, -0.7), (1.45, 0.2)])
    cc = np.fft.irfft2(g, s=(BOX, BOX))
    k = BOX // 2 - 1
    spec = np.asarray(likelihood._crop(jnp.asarray(g, jnp.complex64), BOX, k))
    # the crop drops only the Nyquist row/column: remove them from the reference too
    g_no_nyq = g.copy()
    g_no_nyq[:, BOX // 2, :] = 0
    g_no_nyq[:, :, BOX // 2] = 0
    cc = np.fft.irfft2(g_no_nyq, s=(BOX, BOX))
    for d in [(0, 0), (1, 0), (0, -2), (3, 1), (-1, -1)]:
        got = likelihood.exact_values(
            jnp.asarray(spec), jnp.asarray(np.tile(d, (2, 1)), jnp.float32), 2 * np.pi / BOX
        )
        want = cc[:, d[1] % BOX, d[0] % BOX]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-3 * np.abs(cc).max())


def _argmax(fun, start):
    res = scipy.optimize.minimize(lambda d: -fun(d), np.asarray(start, float), method="Nelder-Mead",
                                  options={"xatol": 1e-7, "fatol": 1e-12, "maxiter": 2000})
    return res.x


@pytest.mark.parametrize("shift", [(0.3, -0.2), (0.25, 0.4), (-0.37, 0.11)])
def test_exact_peak_recovers_a_subpixel_shift_where_bicubic_does_not(shift):
    """Noise-free particle displaced by a known sub-pixel shift: the exact CC peaks exactly there;
    the bicubic interpolation of the sampled window (the old data term) is pulled by its grid."""
    g = _blob_spectra([shift])
    k = BOX // 2 - 1
    spec = likelihood._crop(jnp.asarray(g, jnp.complex64), BOX, k)

    exact_jit = jax.jit(lambda d: likelihood.exact_values(spec, d[None], 2 * np.pi / BOX)[0])

    def exact(d):
        return float(exact_jit(jnp.asarray(d, jnp.float32)))

    found = _argmax(exact, (0.0, 0.0))
    np.testing.assert_allclose(found, shift, atol=2e-3)
    # bicubic on the window sampled on the integer grid: biased by several hundredths of a pixel
    hw = 6
    cc = np.fft.irfft2(g, s=(BOX, BOX))
    idx = np.mod(np.arange(-hw, hw + 1), BOX)
    win = jnp.asarray(cc[0][idx[:, None], idx[None, :]], jnp.float32)

    bicubic_jit = jax.jit(lambda d: objective.catmull_rom_2d(win, hw + d[0], hw + d[1]))

    def bicubic(d):
        return float(bicubic_jit(jnp.asarray(d, jnp.float32)))

    biased = _argmax(bicubic, (0.0, 0.0))
    assert np.abs(biased - np.asarray(shift)).max() > 0.01


@pytest.mark.parametrize("shift", [(0.04, -0.03), (-0.02, 0.05)])
def test_taylor_model_peaks_at_a_small_known_shift(shift):
    """The final stage's local model (4th-order expansion about the prediction) of a noise-free
    particle displaced by a small known shift peaks at that shift (to 1e-3 px)."""
    g = _blob_spectra([shift])
    tay = likelihood._taylor_from_spectra(jnp.asarray(g, jnp.complex64), BOX, 4)

    model_jit = jax.jit(lambda d: likelihood.taylor_values(tay, d[None], 0.5)[0])

    def model(d):
        return float(model_jit(jnp.asarray(d, jnp.float32)))

    np.testing.assert_allclose(_argmax(model, (0.0, 0.0)), shift, atol=1e-3)


def test_taylor_expansion_matches_the_trig_polynomial():
    g = _blob_spectra([(0.2, -0.1), (0.0, 0.0), (-0.4, 0.3)])
    k = BOX // 2 - 1
    spec = likelihood._crop(jnp.asarray(g, jnp.complex64), BOX, k)
    # float64 reference of the Taylor coefficients' polynomial vs the exact sum
    coeffs = np.asarray(likelihood._taylor_from_spectra(jnp.asarray(g, jnp.complex64), BOX, 4))
    rng = np.random.default_rng(1)
    d = rng.uniform(-0.08, 0.08, (3, 2)).astype(np.float32)
    exact = np.asarray(likelihood.exact_values(spec, jnp.asarray(d), 2 * np.pi / BOX))
    tay = np.asarray(likelihood.taylor_values(jnp.asarray(coeffs), jnp.asarray(d), 0.5))
    at0 = np.asarray(likelihood.exact_values(spec, jnp.zeros((3, 2)), 2 * np.pi / BOX))
    # differences to the value at 0 (the part that moves the optimum) agree to 1e-3 relative
    np.testing.assert_allclose(tay - coeffs[:, 0], exact - at0, rtol=2e-3,
                               atol=1e-4 * np.abs(exact - at0).max())


def test_taylor_gradient_matches_finite_differences_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        coeffs = jnp.asarray(rng.normal(size=(4, 15)))
        d = jnp.asarray(rng.uniform(-0.6, 0.6, (4, 2)))  # inside and beyond the 0.5 px radius

        @jax.jit
        def f(x):
            return jnp.sum(likelihood.taylor_values(coeffs, x, 0.5))

        g = np.asarray(jax.grad(f)(d))
        eps = 1e-6
        fd = np.zeros_like(g)
        for i in range(4):
            for j in range(2):
                e = np.zeros((4, 2))
                e[i, j] = eps
                fd[i, j] = (float(f(d + e)) - float(f(d - e))) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def test_exact_values_gradient_matches_finite_differences_float64():
    with jax.enable_x64(True):
        g = _blob_spectra([(0.3, -0.2)])
        spec = likelihood._crop(jnp.asarray(g, jnp.complex128), BOX, BOX // 2 - 1)
        d = jnp.asarray([[0.1, 0.25]])

        @jax.jit
        def f(x):
            return jnp.sum(likelihood.exact_values(spec, x, 2 * np.pi / BOX))

        grad = np.asarray(jax.grad(f)(d))
        eps = 1e-6
        fd = [(float(f(d + e)) - float(f(d - e))) / (2 * eps) for e in (
            jnp.asarray([[eps, 0.0]]), jnp.asarray([[0.0, eps]]))]
        np.testing.assert_allclose(grad[0], fd, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# start independence on a tiny simulated tomogram (refine_tomogram end to end, arrays in/out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from _helpers import tiny_refinement_problem

    return tiny_refinement_problem(tmp_path_factory.mktemp("lik"), 16, 192, 10)


def _rms_vs_truth(sim, res):
    t_ts, t_p = sim.truth_tilt_series[0], sim.truth_particles["TS_01"]

    def project(p, x):
        return np.einsum("fij,nj->nfi", p[:, :2, :3], x) + p[None, :, :2, 3]

    d = project(res.projections, res.positions_px) - project(t_ts.projections, t_p.positions_px)
    return float(np.sqrt(np.mean(np.sum(d * d, -1))))


def test_result_does_not_depend_on_the_start(tiny):
    """Nominal start, truth perturbed by ~1 px, and the truth: the final stage brings all three to
    the same geometry (to a small fraction of its error); without it (bicubic windows only) the
    truth start stays pinned to the truth, closer than the data's own optimum."""
    import dataclasses

    from polish3d.refine import tomogram

    sim, stack, refs, env = tiny
    rng = np.random.default_rng(0)
    t_ts, t_p = sim.truth_tilt_series[0], sim.truth_particles["TS_01"]
    p_pert = t_ts.projections.copy()
    p_pert[:, :2, 3] += rng.normal(0, 0.5, (t_ts.n_tilts, 2))
    starts = {
        "nominal": (sim.tilt_series[0], sim.particles["TS_01"]),
        "pert": (dataclasses.replace(t_ts, projections=p_pert),
                 dataclasses.replace(t_p, positions_px=t_p.positions_px + rng.normal(0, 0.5, (16, 3)))),
        "truth": (t_ts, t_p),
    }
    out = {}
    for passes, names in ((2, ("nominal", "pert", "truth")), (0, ("truth",))):
        cfg = tomogram.AlignConfig(
            box=32, r=8, exact_passes=passes, coarse_shift=False, rescue=False, outer=2
        )
        for name in names:
            res = tomogram.refine_tomogram(*starts[name][:2], stack, refs, env, cfg)
            out[passes, name] = (_rms_vs_truth(sim, res), res)
    exact = [out[2, k][0] for k in starts]
    assert max(exact) < 0.3, exact
    assert max(exact) - min(exact) < 0.05 * min(exact), exact

    def proj(res):
        p = res.projections
        return np.einsum("fij,nj->nfi", p[:, :2, :3], res.positions_px) + p[None, :, :2, 3]

    # the three final geometries project every particle to within a small fraction of the error
    for k in ("pert", "truth"):
        gap = np.sqrt(np.mean(np.sum((proj(out[2, k][1]) - proj(out[2, "nominal"][1])) ** 2, -1)))
        assert gap < 0.1 * min(exact), (k, gap, exact)
    # without the final stage the truth start stays pinned to the truth by the window grid
    assert out[0, "truth"][0] < 0.9 * out[2, "truth"][0], (out[0, "truth"][0], exact)


def test_cropped_cc_kernel_equals_the_full_one():
    """The CC stage's kernel on the weights' support only (``k_max``) gives the CC windows, their
    per-tilt sums and the Taylor coefficients of the full half grid (weights 0 beyond ``k_max``)."""
    from scipy.spatial.transform import Rotation

    from polish3d.refine import ccmaps

    box, n_tilts, n, k = 32, 5, 12, 11
    sh = box // 2 + 1
    rng = np.random.default_rng(7)
    refs = jnp.asarray(rng.normal(size=(2, box, box, sh)) + 1j * rng.normal(size=(2, box, box, sh)),
                       jnp.complex64)
    ky = np.abs(np.fft.fftfreq(box) * box)[:, None]
    w = np.broadcast_to(np.where((ky <= k) & (np.arange(sh)[None] <= k), 1.0 + rng.random((box, sh)), 0.0),
                        (n_tilts, box, sh)).astype(np.float32)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    const = ccmaps.CCInputs(
        refs=refs, weights=jnp.asarray(w), dose=f32(rng.uniform(0.5, 1.0, (n_tilts, box, sh))),
        defocus_u=f32(rng.uniform(1e4, 3e4, n_tilts)), defocus_v=f32(rng.uniform(1e4, 3e4, n_tilts)),
        defocus_angle=f32(rng.uniform(0, 90, n_tilts)), phase_shift=f32(np.zeros(n_tilts)),
        bfactor=f32(np.zeros(n_tilts)), ctf_scale=f32(np.ones(n_tilts)), pixel_size=f32(6.0),
        voltage=f32(300.0), cs=f32(2.7), q0=f32(0.1), hand_slope_px=f32(6.0))
    assert ccmaps.cc_support(const, box) == k
    args = (f32(rng.normal(size=(n, box, box))), f32(rng.uniform(-0.5, 0.5, (n, 2))),
            f32(Rotation.random(n, random_state=2).as_matrix()), f32(rng.normal(0, 20, n)),
            jnp.asarray(np.arange(n) % n_tilts, jnp.int32), jnp.int32(2), f32(np.ones(n)))
    blur = f32(np.exp(-np.arange(box * sh).reshape(box, sh) / 300.0))
    maps, windows, sums = {}, {}, {}
    for k_max in (None, k):
        g = ccmaps.spectra(*args, ccmaps.pass_weights(const, blur, k_max), const, k_max)
        maps[k_max] = np.asarray(ccmaps._full_maps_jit(g, box))
        windows[k_max] = np.asarray(ccmaps._cc_windows(g, box, 6))
        sums[k_max] = np.asarray(ccmaps._full_maps_jit(ccmaps._tilt_sums(g, args[4], n_tilts), box))
    for got in (maps, windows, sums):
        np.testing.assert_allclose(got[k], got[None], atol=2e-5 * np.abs(got[None]).max())
    # windows: the maps around displacement 0; tilt sums: the maps' sums (irfft is linear)
    np.testing.assert_allclose(windows[k][:, 6, 6], maps[k][:, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(windows[k][:, 0, 7], maps[k][:, -6, 1], rtol=1e-6)
    by_tilt = np.stack([maps[k][np.arange(n) % n_tilts == j].sum(0) for j in range(n_tilts)])
    np.testing.assert_allclose(sums[k], by_tilt, atol=1e-4 * np.abs(by_tilt).max())
    ones = f32(np.ones((box, sh)))
    full = ccmaps.spectra(*args, ccmaps.pass_weights(const, ones, None), const, None)
    want = np.asarray(likelihood._taylor_from_spectra(full, box, 4, k))
    got = np.asarray(likelihood._taylor_pairs(*args, ccmaps.pass_weights(const, ones, k), const, 4, k))
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())


def test_blurred_windows_are_the_fourier_gaussian_low_pass_inside():
    """blur_windows (chunked separable Gaussian) against the same low-pass as a Fourier product
    on a periodic map, away from the window edges; and the window store's memory alignment."""
    from polish3d.refine import ccmaps

    rng = np.random.default_rng(5)
    d, sigma = 41, 1.5
    maps = rng.normal(size=(37, 3, d, d)).astype(np.float32)  # 37 particles: a partial last chunk
    got = np.asarray(ccmaps.blur_windows(maps, sigma))
    k = np.fft.fftfreq(d)
    gain = np.exp(-2 * (np.pi * sigma) ** 2 * (k[:, None] ** 2 + k[None, :] ** 2))
    want = np.real(np.fft.ifft2(np.fft.fft2(maps) * gain))
    inner = slice(8, d - 8)
    np.testing.assert_allclose(got[..., inner, inner], want[..., inner, inner], atol=1e-4)
    store = ccmaps.aligned_zeros((5, 3, d, d))
    assert store.ctypes.data % 64 == 0 and store.shape == (5, 3, d, d) and not store.any()
