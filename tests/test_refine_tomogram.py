"""Helpers of the per-tomogram refinement: the enlarged box of the per-tilt shift search."""

import numpy as np

from polish3d import imaging
from polish3d.refine import tomogram


def test_coarse_box():
    assert tomogram.coarse_box(128, 20) == 128
    assert tomogram.coarse_box(64, 20) == 80
    assert tomogram.coarse_box(32, 8.5) == 34


def test_padded_problem_keeps_the_projection():
    """The reference carried to a larger box projects to the same image (line integrals)."""
    rng = np.random.default_rng(0)
    box, cbox = 32, 48
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    vol = np.exp(-((x - 3) ** 2 + (y + 2) ** 2 + z**2) / 18.0)
    vol += 0.5 * np.exp(-((x + 5) ** 2 + y**2 + (z - 4) ** 2) / 8.0)
    refs = np.stack([np.asarray(imaging.prepare_reference(vol.astype(np.float32), box))] * 2)
    env = np.ones((box, box // 2 + 1), np.float32)
    refs_c, env_c = tomogram._padded_problem(refs, env, box, cbox)
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    rot *= np.sign(np.linalg.det(rot))
    small = np.asarray(imaging.irfft2c(imaging.central_slice(refs[0], rot, box), box))
    large = np.asarray(imaging.irfft2c(imaging.central_slice(refs_c[0], rot, cbox), cbox))
    lo = (cbox - box) // 2
    crop = large[lo:lo + box, lo:lo + box]
    assert np.corrcoef(small.ravel(), crop.ravel())[0, 1] > 0.99
    assert abs(small.max() - crop.max()) < 0.05 * abs(small.max())
    assert env_c.shape == (cbox, cbox // 2 + 1) and env_c[0, 0] == 1.0
