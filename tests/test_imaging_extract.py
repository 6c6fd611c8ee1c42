"""Observation extraction, phase conventions, noise power, FSC envelope."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from polish3d import imaging as im


def _masked_ft(win):
    box = win.shape[0]
    mask, outside = im.circle_mask(box)
    w = mask * (win - win[outside].mean())
    return np.asarray(im.rfft2c(jnp.asarray(w)))


def test_extract_matches_slicing_at_integer_positions():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(96, 128)).astype(np.float32)
    box = 32
    f = jax.jit(im.extract_observation, static_argnums=2)
    for x, y in [(40, 50), (70, 30), (16, 16)]:
        obs = np.asarray(f(img, jnp.array([x, y], jnp.float32), box))
        win = img[y - box // 2 : y + box // 2, x - box // 2 : x + box // 2]
        np.testing.assert_allclose(obs, _masked_ft(win), atol=1e-4)


def test_extract_clamps_at_border():
    img = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    win = np.asarray(im.extract_window(img, jnp.array([-5, 60]), 16))
    assert win[0, 0] == img[60, 0] and win[-1, -1] == img[63, 10]
    assert win[0, 7] == img[60, 2] and win[5, 3] == img[63, 0]


def _blob_image(centre, shape=(96, 112), sigma=2.5):
    y, x = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * sigma**2)).astype(
        np.float32
    )


def test_subpixel_phase_matches_shifted_image():
    box = 32
    u = np.array([50.0, 41.0])
    a = np.asarray(im.extract_observation(_blob_image(u), u, box))
    for d in ([0.3, -0.4], [0.45, 0.2], [-0.3, 0.49]):
        v = u + np.array(d)
        b = np.asarray(im.extract_observation(_blob_image(v), v, box))
        np.testing.assert_allclose(b, a, atol=2e-3 * np.abs(a).max())
        # the blob sits at the phase origin: its spectrum is real and positive at low k
        assert np.abs(b.imag).max() < 2e-3 * np.abs(b).max()


def test_shift_phase_sign():
    box = 16
    img = np.zeros((box, box), np.float32)
    img[5, 4] = 1.0
    out = np.fft.irfft2(
        np.fft.rfft2(img) * np.asarray(im.shift_phase(box, [2.0, 3.0])), s=(box, box)
    )
    assert np.unravel_index(np.argmax(out), out.shape) == (8, 6)
    # round trip of the centred transforms
    np.testing.assert_allclose(np.asarray(im.irfft2c(im.rfft2c(img), box)), img, atol=1e-6)


def test_extract_gradient_wrt_position():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(80, 80)).astype(np.float32)
    w = rng.normal(size=(32, 17)).astype(np.float32)

    def f(u):
        o = im.extract_observation(img, u, 32)
        return jnp.sum(w * o.real - w * o.imag)

    check_grads(
        f, (jnp.array([40.2, 39.7]),), order=1, modes=["fwd", "rev"], eps=1e-2, atol=0.05, rtol=0.05
    )


def test_noise_power_white():
    rng = np.random.default_rng(3)
    img = (2.0 * rng.normal(size=(256, 256))).astype(np.float32)
    p = np.asarray(im.noise_power(img, 32))
    assert p.shape == (17,)
    assert np.all(np.abs(p[1:] / 4.0 - 1) < 0.15)


def test_radial_helpers():
    box = 16
    idx = np.asarray(im.radial_index(box))
    assert idx.shape == (16, 9) and idx[0, 0] == 0 and idx[3, 4] == 5 and idx[-3, 0] == 3
    prof = np.arange(9, dtype=np.float32)
    e = np.asarray(im.radial_expand(prof, box))
    np.testing.assert_allclose(e, np.minimum(im.radius_2d(box), 8), atol=1e-5)


def test_fsc_envelope():
    box = 32
    idx = np.arange(17)
    fsc = np.where(idx < 10, 0.9, 0.05)
    e = np.asarray(im.fsc_envelope(idx, fsc, box, box, 4.0, width=5))
    r = im.radius_2d(box)
    # firstBad = 10, q = 1 → lastShell = 9: flat 1 up to 9, cosine to 14, zero beyond
    assert np.all(e[r <= 9] == 1.0)
    assert np.all(e[np.floor(r) + 1 > 14] == 0.0)
    mid = (r > 10) & (r < 13)
    assert np.all((e[mid] > 0) & (e[mid] < 1))
    # explicit cutoff: 32·4/20 = 6.4 → 6
    e2 = np.asarray(im.fsc_envelope(idx, fsc, box, box, 4.0, freq_cutoff_ang=20.0))
    assert np.all(e2[r <= 6] == 1.0) and np.all(e2[r >= 11.01] == 0.0)
    e3 = np.asarray(im.fsc_envelope(idx, fsc, box, box, 4.0, use_snr=True))
    assert abs(e3[0, 1] - 2 * 0.9 / 1.9) < 1e-5


def test_cropped_spectra_are_the_full_ones_at_the_kept_frequencies():
    """crop_half / rfft2c_cropped / the cropped grids against the full half spectrum (even and
    odd boxes), and uncrop_half (plain and modulated) against zero-filling by hand."""
    from polish3d.imaging.fourier import crop_half, rfft2c_cropped, row_signs, uncrop_half

    rng = np.random.default_rng(3)
    for box, k in ((32, 9), (33, 10), (16, 7)):
        img = jnp.asarray(rng.normal(size=(3, box, box)), jnp.float32)
        full = np.asarray(im.rfft2c(img))
        kx, ky = im.freq_grid_2d(box)
        ckx, cky = im.freq_grid_2d(box, k)
        rows = np.mod(cky[:, 0].astype(int), box)
        want = full[:, rows][:, :, : k + 1]
        np.testing.assert_allclose(np.asarray(crop_half(jnp.asarray(full), k)), want, atol=1e-6)
        np.testing.assert_allclose(np.asarray(rfft2c_cropped(img, k)), want, atol=2e-5)
        np.testing.assert_array_equal(ky[rows, 0], cky[:, 0])
        np.testing.assert_array_equal(kx[0, : k + 1], ckx[0])
        zero_filled = np.zeros_like(full)
        zero_filled[:, rows, : k + 1] = want
        np.testing.assert_array_equal(np.asarray(uncrop_half(jnp.asarray(want), box)), zero_filled)
        if box % 2 == 0:  # modulated: rows ky + box/2; its inverse FFT is the image times (-1)^y
            mod = np.asarray(uncrop_half(jnp.asarray(want), box, modulated=True))
            np.testing.assert_allclose(np.fft.irfft2(mod, s=(box, box)) * row_signs(box)[:, None],
                                       np.fft.irfft2(zero_filled, s=(box, box)), atol=1e-6)
        phase = np.asarray(im.shift_phase(box, [0.3, -0.7], k))
        np.testing.assert_allclose(phase, np.asarray(im.shift_phase(box, [0.3, -0.7]))[rows][:, : k + 1],
                                   atol=1e-6)
