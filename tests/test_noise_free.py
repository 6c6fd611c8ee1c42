"""Noise-free images (issue 17): the refinement captures them from the nominal start.

Without noise the tiles' power spectrum is the particles' own, which falls by three orders of
magnitude towards high frequencies; whitening by it unfloored kept only a high-frequency band
(a phase correlation with a narrow, ringing peak), and tilts or whole tomograms a few pixels off
were not captured (0.30 px RMS with one tilt lost; 5.6 px and a ``reference_mismatch`` verdict
with noise-free half maps, default simulation). The noise spectra are now floored
(:func:`polish3d.imaging.noise_spectra`).
"""

from pathlib import Path

import numpy as np
import pytest

from polish3d import imaging


@pytest.fixture(scope="module")
def noise_free(tmp_path_factory):
    """A small noise-free tomogram (21 tilts ±60°, 24 particles, 256² px, box 64 at 8 Å/px)
    with noise-free half maps; unfloored whitening left it 5.9 px off (``reference_mismatch``)."""
    from polish3d.io import mrc
    from polish3d.refine import tomogram
    from polish3d.simulate import SimulationConfig, simulate

    cfg = SimulationConfig(
        n_tomograms=1, n_particles=24, n_unlisted=2, image_size_px=(256, 256),
        tilt_min_deg=-60, tilt_max_deg=60, tilt_step_deg=6, seed=3, snr=0.0, half_map_noise=0.0,
    )
    sim = simulate(cfg, Path(tmp_path_factory.mktemp("nf")) / "sim")
    stack = np.asarray(mrc.open_stack(sim.tilt_series[0].image_files[0][0]))
    halves = [np.asarray(mrc.read_map(sim.out_dir / f"reference/half{i}.mrc")[0]) for i in (1, 2)]
    return sim, stack, halves, tomogram


def _refine(noise_free, halves):
    sim, stack, _, tomogram = noise_free
    refs, (idx, fsc) = tomogram.prepare_references(*halves, 64)
    env = tomogram.reference_envelope(idx, fsc, 64, sim.tilt_series[0].pixel_size_ang)
    cfg = tomogram.AlignConfig(box=64, r=10)
    res = tomogram.refine_tomogram(sim.tilt_series[0], sim.particles["TS_01"], stack, refs, env, cfg)
    t_ts, t_p = sim.truth_tilt_series[0], sim.truth_particles["TS_01"]

    def project(p, x):
        return np.einsum("fij,nj->nfi", p[:, :2, :3], x) + p[None, :, :2, 3]

    d = project(res.projections, res.positions_px) - project(t_ts.projections, t_p.positions_px)
    return float(np.sqrt(np.mean(np.sum(d * d, -1)))), res.metrics["validation"]["verdict"]


def test_noise_spectra_floor_only_acts_without_noise(noise_free):
    _, stack, _, _ = noise_free
    raw = imaging.noise_spectra(stack, 64, floor_fraction=0.0)
    floored = imaging.noise_spectra(stack, 64)
    top = raw[:, 1:].max(axis=1, keepdims=True)
    assert (raw[:, 1:] / top).min() < 1e-2  # the particles' own power spans > 100×
    np.testing.assert_allclose(floored, np.maximum(raw, 0.01 * top))
    rng = np.random.default_rng(0)
    # noise of twice the images' standard deviation: the spectrum then spans ~17×, the floor is idle
    noisy = stack[:3] + 2.0 * stack.std() * rng.standard_normal(stack[:3].shape).astype(np.float32)
    np.testing.assert_array_equal(imaging.noise_spectra(noisy, 64),
                                  imaging.noise_spectra(noisy, 64, floor_fraction=0.0))


def test_noise_free_images_and_half_maps_from_the_nominal_start(noise_free):
    rms, verdict = _refine(noise_free, noise_free[2])  # 0.027 px (5.85 px before the floor)
    assert verdict != "reference_mismatch"
    assert rms < 0.1
