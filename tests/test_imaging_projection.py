"""Central slice vs real-space rotation + line integral; reference preprocessing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import ndimage
from scipy.spatial.transform import Rotation

from polish3d import imaging as im


def _blobs(box, seed=0, n=8):
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    vol = np.zeros((box, box, box), np.float32)
    for _ in range(n):
        c = rng.normal(0, box / 10, 3)
        s = rng.uniform(box / 32, box / 16)
        vol += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol


def _real_space_projection(vol, rot):
    """Σ_z V(c + Rᵀ·(p, z)) via scipy (volume [z, y, x], rotation on (x, y, z))."""
    box = vol.shape[0]
    perm = np.eye(3)[::-1]
    m = perm @ rot.T @ perm
    c = np.full(3, box // 2)
    return ndimage.affine_transform(vol, m, offset=c - m @ c, order=3).sum(0)


@pytest.fixture(scope="module")
def blob_ref():
    box = 64
    vol = _blobs(box)
    t = im.taper_weights(box)
    tapered = t * (vol - (t * vol).sum() / t.sum())
    return box, tapered, im.prepare_reference(vol, box)


def test_central_slice_matches_real_space(blob_ref):
    box, tapered, ref = blob_ref
    slicer = jax.jit(im.central_slice, static_argnums=2)
    for seed in range(5):
        rot = Rotation.random(random_state=seed).as_matrix()
        proj = np.asarray(im.irfft2c(slicer(ref, rot, box), box))
        expect = _real_space_projection(tapered, rot)
        assert np.corrcoef(proj.ravel(), expect.ravel())[0, 1] > 0.99
        # same scale (line integral, not normalised)
        a = proj - proj.mean()
        b = expect - expect.mean()
        assert 0.9 < (a * b).sum() / (b * b).sum() < 1.1


def test_centred_gaussian_projects_to_centre():
    box = 32
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    vol = np.exp(-(x**2 + y**2 + z**2) / (2 * 2.0**2)).astype(np.float32)
    ref = im.prepare_reference(vol, box)
    for seed in range(4):
        rot = Rotation.random(random_state=seed).as_matrix()
        proj = np.asarray(im.irfft2c(im.central_slice(ref, rot, box), box))
        iy, ix = np.unravel_index(np.argmax(proj), proj.shape)
        assert (iy, ix) == (box // 2, box // 2)
        # symmetric about the centre: the spectrum is (nearly) real
        sl = np.asarray(im.central_slice(ref, rot, box))
        assert np.abs(sl.imag).max() < 1e-3 * np.abs(sl).max()


def test_off_centre_blob_moves_with_rotation():
    box = 32
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    q = np.array([5.0, -3.0, 2.0])  # (x, y, z) offset from the centre
    vol = np.exp(-((x - q[0]) ** 2 + (y - q[1]) ** 2 + (z - q[2]) ** 2) / 2.0).astype(np.float32)
    ref = im.prepare_reference(vol, box)
    rot = Rotation.from_euler("zyx", [30, 20, 10], degrees=True).as_matrix()
    proj = np.asarray(im.irfft2c(im.central_slice(ref, rot, box), box))
    p = rot @ q
    iy, ix = np.unravel_index(np.argmax(proj), proj.shape)
    assert abs(ix - (box // 2 + p[0])) <= 1 and abs(iy - (box // 2 + p[1])) <= 1


def test_prepare_reference_pads_and_rejects():
    vol = _blobs(24, n=3)
    ref = im.prepare_reference(vol, 32)
    assert ref.shape == (32, 32, 17) and ref.dtype == jnp.complex64
    big = im.prepare_reference(_blobs(32, n=3), 32, mask=np.ones((32,) * 3))
    assert big.shape == (32, 32, 17)
    with pytest.raises(ValueError):
        im.prepare_reference(vol, 16)


def test_central_slice_vmaps_and_nyquist():
    box = 32
    ref = im.prepare_reference(_blobs(box, n=3), box)
    rots = Rotation.random(3, random_state=1).as_matrix()
    out = jax.vmap(im.central_slice, in_axes=(None, 0, None))(ref, rots, box)
    assert out.shape == (3, box, box // 2 + 1)
    assert np.all(np.asarray(out)[:, ~im.nyquist_mask(box)] == 0)


def test_central_slice_gradient_wrt_rotation():
    box = 32
    ref = im.prepare_reference(_blobs(box, n=4), box)
    rot0 = Rotation.from_euler("zyx", [12, 34, 56], degrees=True).as_matrix()
    w = np.random.default_rng(3).normal(size=(box, box // 2 + 1)).astype(np.float32)

    def f(angles):
        c, s = jnp.cos(angles), jnp.sin(angles)
        rz = jnp.array([[c[0], -s[0], 0.0], [s[0], c[0], 0.0], [0.0, 0.0, 1.0]])
        rx = jnp.array([[1.0, 0.0, 0.0], [0.0, c[1], -s[1]], [0.0, s[1], c[1]]])
        sl = im.central_slice(ref, rz @ rx @ rot0, box)
        return jnp.sum(w * sl.real) + jnp.sum(w * sl.imag)

    check_grads(
        f, (jnp.array([0.0123, -0.0071]),), order=1, modes=["rev"], eps=1e-3, atol=0.05, rtol=0.05
    )
    g = jax.grad(f)(jnp.zeros(2))
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).sum() > 0
