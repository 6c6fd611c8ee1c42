"""The simulator: files, ground truth consistency, image formation, CLI."""

import numpy as np
import pytest

from polish3d import geometry as geo
from polish3d import imaging as im
from polish3d.io import mrc, relion
from polish3d.score import project_particles, score
from polish3d.simulate import SimulationConfig, hagen_dose_order, phantom_volume, simulate

TINY = SimulationConfig(
    n_tomograms=1,
    n_particles=8,
    n_unlisted=2,
    tilt_min_deg=-30.0,
    tilt_max_deg=30.0,
    tilt_step_deg=10.0,
    pixel_size_ang=12.0,
    box_px=32,
    image_size_px=(128, 128),
    tomo_thickness_px=40,
    particle_diameter_ang=180.0,
    seed=3,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    return simulate(TINY, out), out


@pytest.fixture(scope="module")
def tiny_motion(tmp_path_factory):
    out = tmp_path_factory.mktemp("simmot")
    cfg = TINY.replace(s_vel=2.0, s_div=200.0, deformation_amplitude_px=1.5, seed=5)
    return simulate(cfg, out), out


def test_hagen_order():
    rank = hagen_dose_order(np.array([-9, -6, -3, 0, 3, 6, 9.0]), 2)
    # 0, +3, +6, −3, −6, +9, −9
    assert rank.tolist() == [6, 4, 3, 0, 1, 2, 5]


def test_phantom_is_asymmetric():
    v = phantom_volume(32, 12.0, 200.0)
    assert v.shape == (32, 32, 32) and abs(v.max() - 1) < 1e-6
    assert np.abs(v - v[::-1, ::-1, ::-1]).max() > 0.2  # not centrosymmetric
    assert np.abs(v - np.transpose(v, (0, 2, 1))).max() > 0.2


def test_files_and_readback(tiny):
    res, out = tiny
    for f in [
        "optimisation_set.star",
        "tomograms.star",
        "particles.star",
        "tilt_series/TS_01.star",
        "tilt_series/TS_01.mrcs",
        "reference/half1.mrc",
        "reference/half2.mrc",
        "reference/mask.mrc",
        "reference/postprocess.star",
        "truth/optimisation_set.star",
        "truth/truth.npz",
    ]:
        assert (out / f).exists(), f
    stack = mrc.open_stack(out / "tilt_series/TS_01.mrcs")
    assert stack.shape == (7, 128, 128)
    opt = relion.read_optimisation_set(out / "optimisation_set.star", project_dir=out)
    ts = relion.read_tomogram_set(opt.tomograms_file, project_dir=out).tilt_series("TS_01")
    np.testing.assert_allclose(ts.projections, res.tilt_series[0].projections, atol=1e-5)
    parts = relion.read_particle_set(opt.particles_file).for_tomogram(ts)
    assert parts.n_particles == 8 and sorted(set(parts.half_set.tolist())) == [1, 2]
    idx, fsc = mrc.read_fsc(opt.fsc)
    assert fsc[0] == 1.0 and len(idx) == 17
    z = np.load(out / "truth/truth.npz")
    assert z["TS_01/positions_true_px"].shape == (10, 3) and z["TS_01/listed"].sum() == 8
    # nominal = truth + errors
    np.testing.assert_allclose(parts.positions_px, z["TS_01/positions_nominal_px"][:8], atol=1e-4)


def test_truth_scores_zero_and_nominal_scores_input_error(tiny):
    res, out = tiny
    truth = out / "truth/optimisation_set.star"
    s0 = score(truth, truth)
    assert s0["overall"]["max"] < 1e-6
    s1 = score(out / "optimisation_set.star", truth)
    z = np.load(out / "truth/truth.npz")
    u_t = geo.project_points(z["TS_01/projections_true"], z["TS_01/positions_true_px"][:8])
    u_n = geo.project_points(z["TS_01/projections_nominal"], z["TS_01/positions_nominal_px"][:8])
    d = np.linalg.norm(u_t - u_n, axis=-1)
    assert abs(s1["overall"]["rms"] - np.sqrt(np.mean(d**2))) < 1e-3
    assert s1["overall"]["rms"] > 1.0


def test_motion_and_deformation_round_trip(tiny_motion):
    res, out = tiny_motion
    assert (out / "truth/motion.star").exists()
    truth = out / "truth/optimisation_set.star"
    z = np.load(out / "truth/truth.npz")
    ts = res.truth_tilt_series[0]
    assert ts.deformation is not None
    # the 2D positions used for rendering are what the written truth files give
    opt = relion.read_optimisation_set(truth, project_dir=out / "truth")
    tomos = relion.read_tomogram_set(opt.tomograms_file, project_dir=out / "truth")
    ts_r = tomos.tilt_series("TS_01", load_images=False)
    traj = relion.read_trajectories(opt.trajectories_file)
    parts = relion.read_particle_set(opt.particles_file).for_tomogram(ts_r, traj)
    uv = project_particles(ts_r, parts)  # (N, F, 2)
    np.testing.assert_allclose(uv, np.transpose(z["TS_01/uv_true_px"][:, :8], (1, 0, 2)), atol=1e-3)
    # motion is zero at the lowest-dose tilt and nonzero elsewhere
    t = z["TS_01/trajectories_px"]
    j0 = int(np.argmin(z["pre_exposure"]))
    assert np.all(t[:, j0] == 0) and np.abs(t).max() > 0
    assert score(truth, truth)["overall"]["max"] < 1e-6


def test_clean_images_put_particles_at_true_positions(tmp_path):
    res = simulate(TINY.replace(snr=0.0, n_unlisted=0, n_particles=4), tmp_path)
    z = np.load(tmp_path / "truth/truth.npz")
    stack = np.asarray(mrc.open_stack(tmp_path / "tilt_series/TS_01.mrcs"))
    vol, _ = mrc.read_map(tmp_path / "reference/half1.mrc")
    box, px = 32, 12.0
    ref = im.prepare_reference(phantom_volume(box, px, 180.0), box)
    ts = res.truth_tilt_series[0]
    for j, p in [(3, 0), (0, 1), (6, 2)]:
        u = z["TS_01/uv_true_px"][j, p] + np.array([0.7, -1.2])
        dz = z["TS_01/depth_defocus_ang"][j, p]
        ctf = im.ctf_2d(
            box,
            px,
            ts.defocus_u_ang[j] + dz,
            ts.defocus_v_ang[j] + dz,
            ts.defocus_angle_deg[j],
            300.0,
            2.7,
            0.07,
        )
        rot = ts.projections[j, :3, :3] @ z["TS_01/rotations"][p]
        s = im.central_slice(ref, rot, box) * ctf * im.dose_weights(box, px, z["pre_exposure"][j])
        y = im.extract_observation(stack[j], u, box)
        g = np.array(-y * np.conj(s))
        g[0, 0] = 0
        c = np.fft.fftshift(np.fft.irfft2(g, s=(box, box)))
        iy, ix = np.unravel_index(np.argmax(c), c.shape)
        assert (ix - box // 2, iy - box // 2) == (-1, 1)  # peak at true − extraction position


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from polish3d.cli import app

    r = CliRunner().invoke(
        app,
        [
            "simulate",
            "--o",
            str(tmp_path / "s"),
            "--n_tomograms",
            "1",
            "--n_particles",
            "4",
            "--n_unlisted",
            "0",
            "--tilt_min",
            "-20",
            "--tilt_max",
            "20",
            "--tilt_step",
            "20",
            "--box",
            "32",
            "--image_size",
            "128",
            "--thickness",
            "40",
            "--angpix",
            "12",
        ],
    )
    assert r.exit_code == 0, r.output
    js = tmp_path / "score.json"
    r = CliRunner().invoke(
        app,
        [
            "score",
            str(tmp_path / "s/optimisation_set.star"),
            str(tmp_path / "s/truth/optimisation_set.star"),
            "--json",
            str(js),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "rms" in r.output and js.exists()
    r = CliRunner().invoke(app, ["simulate"])
    assert r.exit_code == 2


def test_cli_flags_map_onto_the_config():
    """Every flag's default is the config's; the converted flags set their fields."""
    from polish3d.simulate.cli import FLAGS, config_from_flags, option_rows

    defaults = {flag: default for flag, (_, default, _) in option_rows().items()}
    assert config_from_flags(defaults) == SimulationConfig()
    cfg = config_from_flags({**defaults, "sequential": True, "image_size": 200, "snr": 0.1})
    assert (cfg.dose_symmetric, cfg.image_size_px, cfg.snr) == (False, (200, 200), 0.1)
    fields = {f for f, _ in FLAGS.values() if f}
    assert fields <= set(SimulationConfig.__dataclass_fields__)
