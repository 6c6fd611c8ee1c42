"""``polish3d reconstruct``: Fourier insertion, half maps, FSC (known answers on simulated sets)."""

import dataclasses
import hashlib

import numpy as np
import pytest

from polish3d import geometry as geo
from polish3d import reconstruct as rc
from polish3d.api import read_optimisation_set
from polish3d.errors import InputError
from polish3d.imaging import fsc_from_half_maps
from polish3d.model import TomogramResult
from polish3d.reconstruct import insertion
from polish3d.simulate import SimulationConfig, phantom_volume, simulate

BOX = 32
PX = 16.0
SIM = SimulationConfig(
    n_tomograms=1,
    n_particles=16,
    n_unlisted=0,
    tilt_min_deg=-60.0,
    tilt_max_deg=60.0,
    tilt_step_deg=10.0,
    pixel_size_ang=PX,
    box_px=BOX,
    image_size_px=(256, 256),
    tomo_thickness_px=48,
    snr=0.0,
    seed=1,
)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Noise-free images; the truth set."""
    return simulate(SIM, tmp_path_factory.mktemp("clean")).truth_optimisation_set


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """The same particles and geometry at two noise levels: ``{snr: truth set}``."""
    return {
        snr: simulate(SIM.replace(snr=snr), tmp_path_factory.mktemp(f"snr{snr}")).truth_optimisation_set
        for snr in (0.02, 0.5)
    }


# ----------------------------------------------------------------------------------------------
# the insertion kernel against RELION's voxel loop


def _relion_backward(data2d, weight2d, bmat, max_freq, s):
    """RELION's ``backprojectSlice_backward``, written as its loops over every voxel."""
    sh = s // 2 + 1
    dest = np.zeros((s, s, sh), complex)
    wdest = np.zeros((s, s, sh))
    for z in range(s):
        for y in range(s):
            yy = y - s if y >= s // 2 else y
            zz = z - s if z >= s // 2 else z
            for x in range(sh):
                if x * x + yy * yy + zz * zz > max_freq * max_freq:
                    continue
                xi, eta, zeta = bmat @ np.array([x, yy, zz], float)
                if not (abs(zeta) < 1 and abs(xi) < sh and abs(eta) < s // 2 + 1):
                    continue
                conj = xi < 0
                xd, yd = (-xi, -eta) if conj else (xi, eta)
                if yd < 0:
                    yd += s
                x0, y0 = int(xd), int(yd)
                fx, fy = xd - x0, yd - y0
                x0 = min(x0, sh - 1)
                x1 = x0 + 1 if x0 + 1 < sh else sh - 2
                y0 = min(max(y0, 0), s - 1)
                y1 = (y0 + 1) % s

                def lin(img, x0=x0, x1=x1, y0=y0, y1=y1, fx=fx, fy=fy):
                    v0 = (1 - fx) * img[y0, x0] + fx * img[y0, x1]
                    v1 = (1 - fx) * img[y1, x0] + fx * img[y1, x1]
                    return (1 - fy) * v0 + fy * v1

                c = 1 - abs(zeta)
                d = lin(data2d)
                dest[z, y, x] += c * (np.conj(d) if conj else d)
                wdest[z, y, x] += c * lin(weight2d)
    return dest, wdest


@pytest.mark.parametrize(
    # normal along z and x exactly, nearly along y; then oblique with x, z, y the largest
    # component. (Exactly along y, RELION's double-precision η = +1e-49 on the Friedel branch
    # wraps ky = −0 to row s−1: a rounding quirk polish3d does not copy.)
    "angles",
    [(0.0, 0.0, 0.0), (0.0, 90.0, 0.0), (90.5, 89.5, 0.5), (30.0, 50.0, -20.0),
     (100.0, 170.0, 65.0), (80.0, 60.0, 10.0)],
)
def test_insertion_touches_relions_voxels_with_relions_values(angles):
    import jax.numpy as jnp

    s = 8
    rng = np.random.default_rng(7)
    # spectra of real images (Hermitian along kx = 0, as every observation): a frequency exactly
    # on that column may take either Friedel branch, in RELION too, without changing the value
    data = np.fft.rfft2(rng.normal(size=(s, s))).astype(np.complex64)
    weight = (np.abs(np.fft.rfft2(rng.normal(size=(s, s)))) ** 2 + 0.1).astype(np.float32)
    a = geo.euler_zyz_matrix(*angles)
    bmat = np.linalg.inv(a).T
    flat, vals = insertion._insert_one(
        jnp.asarray(data), jnp.asarray(weight), jnp.asarray(bmat, jnp.float32), 4.0, s
    )
    flat, vals = np.asarray(flat), np.asarray(vals)
    d, w = vals[:, 0] + 1j * vals[:, 1], vals[:, 2]
    n = s * s * (s // 2 + 1)
    ok = flat >= 0
    assert len(np.unique(flat[ok])) == ok.sum()  # each voxel once per slice
    got_d = np.bincount(flat[ok], d[ok].real, n) + 1j * np.bincount(flat[ok], d[ok].imag, n)
    got_w = np.bincount(flat[ok], w[ok], n)
    want_d, want_w = _relion_backward(data, weight, bmat, 4.0, s)
    np.testing.assert_allclose(got_d, want_d.ravel(), atol=1e-4)
    np.testing.assert_allclose(got_w, want_w.ravel(), rtol=1e-5, atol=1e-4)
    assert want_w.sum() > 5.0  # the slice did land somewhere


def test_row_limits_follow_the_dose_cutoff_and_the_circle():
    s = 8
    dose = np.ones((2, s, s // 2 + 1))
    dose[1, :, 3:] = 0.001
    lim = insertion._row_limits(dose, 0.01)
    ky = np.abs(np.fft.fftfreq(s) * s)
    np.testing.assert_array_equal(lim[0], np.floor(np.sqrt(16 - ky**2)).astype(int) + 1)
    np.testing.assert_array_equal(lim[1], np.minimum(lim[0], 3))


def test_fsc_resolution_interpolates_the_crossing():
    fsc = np.array([1.0, 0.9, 0.5, 0.243, 0.043, 0.0])
    assert rc.fsc_resolution_ang(fsc, 10, 2.0) == pytest.approx(20.0 / 3.5)
    assert rc.fsc_resolution_ang(np.ones(6), 10, 2.0) == 4.0
    assert rc.fsc_resolution_ang([1.0, 0.1, 0.5], 10, 2.0) == 20.0


# ----------------------------------------------------------------------------------------------
# known answers on simulated sets


def test_noise_free_truth_reconstructs_the_simulated_reference(clean):
    rec = rc.reconstruct(clean, box=BOX)
    assert rec.n_pairs == (104, 104) and rec.pixel_size_ang == PX
    vol = phantom_volume(BOX, PX, SIM.particle_diameter_ang)
    _, fsc_ref = fsc_from_half_maps(rec.merged, vol)
    # the phantom, to 0.98 from shell 2 to 14 of 16 (35 Å at 16 Å/px); shell 1 carries the
    # mean subtraction and the taper of the written map
    assert fsc_ref[2:15].min() > 0.98, np.round(fsc_ref, 3)
    assert rec.fsc[1:16].min() > 0.95, np.round(rec.fsc, 3)
    assert rec.resolution_ang < 2.2 * PX
    # the map is the phantom, not its negative (dark particles flipped)
    assert np.corrcoef(rec.merged.ravel(), vol.ravel())[0, 1] > 0.9


def test_more_signal_gives_higher_resolution(noisy):
    low = rc.reconstruct(noisy[0.02], box=BOX)
    high = rc.reconstruct(noisy[0.5], box=BOX)
    assert high.resolution_ang < low.resolution_ang - 0.1 * PX, (high.resolution_ang, low.resolution_ang)
    assert high.fsc[2:12].mean() > low.fsc[2:12].mean() + 0.05
    # halves of independent noise: far from 1 at high frequency at the low SNR
    assert low.fsc[12:].mean() < 0.5


def test_wrong_tilt_shifts_lower_the_fsc(noisy):
    data = read_optimisation_set(noisy[0.5])
    fsc_true, res_true = rc.half_map_fsc(data, BOX)
    rng = np.random.default_rng(0)
    wrong_ts = {}
    for name, ts in data.tilt_series.items():
        p = ts.projections.copy()
        p[:, :2, 3] += rng.normal(0.0, 4.0, size=(ts.n_tilts, 2))
        wrong_ts[name] = ts.replace(projections=p)
    wrong = dataclasses.replace(data, tilt_series=wrong_ts)
    fsc_wrong, res_wrong = rc.half_map_fsc(wrong, BOX)
    # the same through align's results: {tomogram: TomogramResult}
    results = {k: TomogramResult(name=k, projections=v.projections) for k, v in wrong_ts.items()}
    fsc_res, _ = rc.half_map_fsc(noisy[0.5], BOX, results=results)
    np.testing.assert_allclose(fsc_res, fsc_wrong, atol=1e-5)
    assert res_wrong > res_true + 0.2 * PX, (res_true, res_wrong)
    assert fsc_wrong[3:14].mean() < fsc_true[3:14].mean() - 0.1
    again = read_optimisation_set(noisy[0.5])  # the records passed in were not modified
    for k in again.names:
        np.testing.assert_array_equal(data.tilt_series[k].projections, again.tilt_series[k].projections)


def test_particle_motion_is_followed(tmp_path):
    """Trajectories (motion.star) move the boxes exactly as the refinement's forward model."""
    cfg = SIM.replace(s_vel=6.0, s_div=2000.0, n_particles=8, seed=4)
    truth = simulate(cfg, tmp_path).truth_optimisation_set
    data = read_optimisation_set(truth)
    assert all(p.trajectories_px is not None for p in data.particles.values())
    still = dataclasses.replace(
        data, particles={k: p.replace(trajectories_px=None) for k, p in data.particles.items()}
    )
    vol = phantom_volume(BOX, PX, SIM.particle_diameter_ang)
    moving = fsc_from_half_maps(rc.reconstruct(data, box=BOX).merged, vol)[1]
    ignored = fsc_from_half_maps(rc.reconstruct(still, box=BOX).merged, vol)[1]
    assert moving[2:15].min() > 0.97, np.round(moving, 3)
    assert moving[4:15].mean() > ignored[4:15].mean() + 0.05, (np.round(moving, 3), np.round(ignored, 3))


def test_chunking_does_not_change_the_maps(noisy):
    one = rc.reconstruct(noisy[0.5], box=BOX, chunk=1000)
    many = rc.reconstruct(noisy[0.5], box=BOX, chunk=7)
    scale = np.abs(one.half1).max()
    for tag in ("half1", "half2", "merged"):
        np.testing.assert_allclose(getattr(many, tag), getattr(one, tag), atol=1e-4 * scale)
    np.testing.assert_allclose(many.fsc, one.fsc, atol=1e-4)


def test_crop_bin_snr_and_max_dose_options(clean):
    cropped = rc.reconstruct(clean, box=BOX, crop=24)
    assert cropped.half1.shape == (24, 24, 24) and cropped.full["half1"].shape == (BOX,) * 3
    assert len(cropped.fsc) == 13
    binned = rc.reconstruct(clean, box=16, binning=2.0)
    assert binned.pixel_size_ang == 2 * PX and binned.half1.shape == (16, 16, 16)
    small = phantom_volume(16, 2 * PX, SIM.particle_diameter_ang)
    assert fsc_from_half_maps(binned.merged, small)[1][2:7].min() > 0.95
    wiener = rc.reconstruct(clean, box=BOX, snr=10.0)
    assert wiener.fsc[1:14].min() > 0.9
    few = rc.reconstruct(clean, box=BOX, max_dose=10.0)  # 0, 3, 6, 9 e/A^2: four tilts
    assert few.n_pairs == (32, 32)


def test_bad_options_name_the_flag():
    with pytest.raises(InputError, match="--b"):
        rc.ReconstructOptions(box=31)
    with pytest.raises(InputError, match="--crop"):
        rc.ReconstructOptions(box=32, crop=40)
    with pytest.raises(InputError, match="--bin"):
        rc.ReconstructOptions(box=32, binning=0.5)


def _digest(folder):
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_cli_writes_maps_and_fsc_and_leaves_inputs_alone(clean, tmp_path):
    import mrcfile
    from typer.testing import CliRunner

    from polish3d.cli import app
    from polish3d.io.star import read_star

    project = clean.parent.parent
    before = _digest(project)
    out = tmp_path / "rec"
    r = CliRunner().invoke(app, ["reconstruct", "--i", str(clean), "--b", str(BOX), "--o", str(out)])
    assert r.exit_code == 0, r.output
    assert "resolution at FSC 0.143" in r.output
    for tag in ("half1", "half2", "merged"):
        with mrcfile.open(out / f"{tag}.mrc") as m:
            assert m.data.shape == (BOX,) * 3
            assert float(m.voxel_size.x) == pytest.approx(PX)
    star = read_star(out / "fsc.star")
    assert list(star["fsc"]["rlnSpectralIndex"]) == list(range(BOX // 2 + 1))
    assert star["fsc"]["rlnFourierShellCorrelation"].iloc[1:15].min() > 0.95
    assert float(star["general"]["rlnFinalResolution"]) < 2.2 * PX
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporary files
    assert _digest(project) == before

    r = CliRunner().invoke(app, ["reconstruct", "--i", str(clean), "--o", str(out)])
    assert r.exit_code == 2 and "--b" in r.output
    missing = str(tmp_path / "nope.star")
    r = CliRunner().invoke(app, ["reconstruct", "--i", missing, "--b", "32", "--o", str(out)])
    assert r.exit_code == 2 and "nope.star" in r.output
