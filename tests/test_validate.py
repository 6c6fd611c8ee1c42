"""Held-out validation (polish3d.refine.validate): the decision rule on synthetic numbers, and
end to end on a small simulated tomogram (a signal-free tilt; a normal set)."""

import dataclasses

import numpy as np
import pytest

from polish3d.refine import validate

# ------------------------------------------------------------------------------------------------
# the decision rule (pure function)


def _pairs(rng, n, f, signal, noise=1.0):
    """CC of n particles × f tilts: per-tilt mean ``signal`` (F,) plus Gaussian noise."""
    return np.asarray(signal)[None, :] + noise * rng.normal(size=(n, f))


def test_decide_verdicts():
    rng = np.random.default_rng(0)
    n, f = 40, 6
    vis = np.ones((n, f), bool)
    cc_in = _pairs(rng, n, f, [4.0, 4.0, 4.0, 0.0, 4.0, 4.0])
    # tilt 0: improved; 1: the same (started at its optimum); 2: worse; 3: no signal anywhere;
    # 4: improved; 5: slightly better, not significantly
    held = cc_in + np.array([3.0, 0.0, -2.0, 0.0, 1.0, 0.02]) + 0.3 * rng.normal(size=(n, f))
    held[:, 3] = rng.normal(size=n)
    d = validate.decide(held, cc_in, vis)
    assert list(d["tilt_verdict"]) == ["improved", "kept", "rolled_back", "no_signal", "improved", "kept"]
    assert list(d["rollback"]) == [False, False, True, True, False, False]
    assert not d["mismatch"] and d["verdict"] == "rolled_back"
    assert d["weak_particles"].size == 0
    assert np.allclose(d["cc_input"], cc_in.mean(0)) and np.allclose(d["cc_refined"], held.mean(0))


def test_decide_start_at_the_optimum_keeps_everything():
    """Held-out CC statistically equal to the input's: nothing rolled back, verdict "kept"."""
    rng = np.random.default_rng(1)
    cc_in = _pairs(rng, 60, 30, np.full(30, 3.0))
    held = cc_in + 0.2 * rng.normal(size=cc_in.shape) - 0.01
    d = validate.decide(held, cc_in, np.ones(cc_in.shape, bool))
    assert set(d["tilt_verdict"]) == {"kept"} and d["verdict"] == "kept"


def test_decide_reference_mismatch_and_weak_particles():
    rng = np.random.default_rng(2)
    n, f = 50, 20
    vis = rng.uniform(size=(n, f)) > 0.1
    d = validate.decide(rng.normal(size=(n, f)), rng.normal(size=(n, f)), vis)
    assert d["mismatch"] and d["verdict"] == "reference_mismatch"
    assert d["rollback"].all()
    msgs = validate._messages(d)
    assert any("reference does not match" in m for m in msgs)
    # a good tomogram with two empty particles (no signal in any tilt)
    cc_in = _pairs(rng, n, f, np.full(f, 1.0))
    held = cc_in + 1.0
    held[[7, 31]] = rng.normal(size=(2, f))
    d = validate.decide(held, cc_in, vis)
    assert d["weak_particles"].tolist() == [7, 31] and not d["mismatch"]
    assert any("2 particle(s)" in m for m in validate._messages(d))


def test_t_statistic_edge_cases():
    t, n = validate.t_statistic(np.array([[1.0], [2.0]]), np.ones((2, 1), bool))
    assert t[0] == 0.0 and n[0] == 2  # fewer than 3 values: no conclusion
    t, _ = validate.t_statistic(np.full((4, 1), 2.0), np.ones((4, 1), bool))
    assert t[0] > 1e5


# ------------------------------------------------------------------------------------------------
# end to end on a small simulated tomogram


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from _helpers import tiny_refinement_problem

    return tiny_refinement_problem(tmp_path_factory.mktemp("val"), 24, 224, 5)


def _per_tilt_error(sim, projections, positions):
    """RMS 2D error per tilt (px) of a geometry against the truth."""
    t_ts, t_p = sim.truth_tilt_series[0], sim.truth_particles["TS_01"]

    def project(p, x):
        return np.einsum("fij,nj->nfi", p[:, :2, :3], x) + p[None, :, :2, 3]

    d = project(projections, positions) - project(t_ts.projections, t_p.positions_px)
    return np.sqrt(np.mean(np.sum(d * d, -1), axis=0))


def _run(sim, stack, refs, env, ts=None, **kw):
    from polish3d.refine import tomogram

    cfg = tomogram.AlignConfig(box=32, r=8, **kw)
    events = []
    res = tomogram.refine_tomogram(
        ts or sim.tilt_series[0], sim.particles["TS_01"], stack, refs, env, cfg,
        progress=lambda e, **k: events.append((e, k)),
    )
    return res, events


def _check_record(v):
    assert set(v) >= {"verdict", "tilts", "rolled_back_tilts", "no_signal_tilts", "weak_particles",
                      "messages", "seconds"}
    for t in v["tilts"]:
        assert set(t) == {"row", "cc_input", "cc_refined", "z", "signal_z", "verdict"}


def test_normal_set_nothing_rolled_back_accuracy_unchanged(tiny):
    sim, stack, refs, env = tiny
    res, events = _run(sim, stack, refs, env)
    v = res.metrics["validation"]
    _check_record(v)
    assert v["verdict"] == "improved" and not v["rolled_back_tilts"] and not v["no_signal_tilts"]
    assert [e for e, _ in events].count("validation") == 1
    off, _ = _run(sim, stack, refs, env, validate=False)
    assert "validation" not in off.metrics
    np.testing.assert_array_equal(res.projections, off.projections)
    np.testing.assert_array_equal(res.positions_px, off.positions_px)


def test_signal_free_tilt_is_flagged_and_keeps_its_input(tiny):
    sim, stack, refs, env = tiny
    j = 3
    rng = np.random.default_rng(1)
    noisy = np.array(stack, copy=True)
    noisy[j] = rng.normal(stack[j].mean(), stack[j].std(), stack[j].shape)
    ts = sim.tilt_series[0]
    p = ts.projections.copy()
    p[j, :2, 3] += [4.0, -4.0]
    ts = dataclasses.replace(ts, projections=p)
    res, _ = _run(sim, noisy, refs, env, ts=ts)
    v = res.metrics["validation"]
    _check_record(v)
    assert v["no_signal_tilts"] == [j] and not v["rolled_back_tilts"]
    assert any(f"[{j}]" in m for m in v["messages"])
    err_in = _per_tilt_error(sim, ts.projections, sim.particles["TS_01"].positions_px)
    err_out = _per_tilt_error(sim, res.projections, res.positions_px)
    assert err_out[j] <= err_in[j]
    others = np.delete(err_out, j)
    assert np.sqrt(np.mean(others**2)) < 0.15, others
    np.testing.assert_array_equal(res.projections[j], ts.projections[j])


def test_reference_of_another_structure_does_not_move_the_geometry(tiny):
    """A reference with the phantom's power spectrum but random phases (another structure of
    the same size): the refinement finds consistent but spurious maxima; the held-out CC does
    not rise above what a search over noise reaches, so the whole tomogram keeps its input."""
    from polish3d.refine import tomogram
    from polish3d.simulate import phantom_volume, soft_sphere_mask

    sim, stack, _, _ = tiny
    rng = np.random.default_rng(7)
    ft = np.fft.rfftn(phantom_volume(32, 16.0))
    phases = np.exp(2j * np.pi * rng.uniform(size=ft.shape))
    vol = np.fft.irfftn(np.abs(ft) * phases, s=(32,) * 3, axes=(0, 1, 2))
    vol = vol * soft_sphere_mask(32, 9.0, 3.0) / np.abs(vol).max()
    halves = [(vol + 0.02 * rng.normal(size=vol.shape)).astype(np.float32) for _ in range(2)]
    refs, (idx, fsc) = tomogram.prepare_references(*halves, 32)
    env = tomogram.reference_envelope(idx, fsc, 32, 16.0)
    res, _ = _run(sim, stack, refs, env)
    v = res.metrics["validation"]
    _check_record(v)
    assert v["verdict"] == "reference_mismatch"
    assert any("reference does not match" in m for m in v["messages"])
    ts, parts = sim.tilt_series[0], sim.particles["TS_01"]
    np.testing.assert_array_equal(res.projections, ts.projections)
    np.testing.assert_array_equal(res.positions_px, parts.positions_px)


def _tilt_projections(n_tilts: int = 21) -> np.ndarray:
    ang = np.deg2rad(np.linspace(-60, 60, n_tilts))
    p = np.zeros((n_tilts, 4, 4))
    p[:, 0, 0], p[:, 0, 2], p[:, 1, 1] = np.cos(ang), np.sin(ang), 1.0
    p[:, 2, 0], p[:, 2, 2], p[:, 3, 3] = -np.sin(ang), np.cos(ang), 1.0
    return p


def test_half_positions_find_a_known_3d_displacement_in_both_halves():
    """Windows with a Gaussian peak where a known 3D displacement projects: the even and the odd
    tilts both find it exactly; windows of pure noise agree only by chance."""
    p = _tilt_projections()
    f, h = len(p), 12
    truth = np.array([[3.0, -2.0, 5.0], [-6.0, 4.0, -3.0]])
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    win = np.zeros((2, f, 2 * h + 1, 2 * h + 1), np.float32)
    for k, d in enumerate(truth):
        uv = p[:, :2, :3] @ d
        for j in range(f):
            win[k, j] = np.exp(-((x - uv[j, 0]) ** 2 + (y - uv[j, 1]) ** 2) / 2.0)
    halves = validate.half_positions(win, p, np.ones((2, f), bool), 10)
    np.testing.assert_array_equal(halves[0], truth)
    np.testing.assert_array_equal(halves[1], truth)
    assert validate.positions_agree(halves).all()
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(40, f, 2 * h + 1, 2 * h + 1)).astype(np.float32)
    agree = validate.positions_agree(validate.half_positions(noise, p, np.ones((40, f), bool), 10))
    assert agree.sum() <= 3
    assert validate.matches_nothing(agree) and not validate.matches_nothing(np.ones(40, bool))
    # a handful of particles decides nothing (a tomogram of 2 particles is not rolled back)
    assert not validate.matches_nothing(np.ones(2, bool)) and not validate.matches_nothing(np.zeros(5, bool))


def test_mirror_of_a_prepared_reference_is_the_prepared_mirror_image():
    """``mirror_z`` on the prepared half maps equals preparing the volume mirrored in z about the
    centre voxel (``z → s − z``)."""
    from polish3d.imaging import prepare_reference

    rng = np.random.default_rng(2)
    vol = rng.normal(size=(16, 16, 16)).astype(np.float32)
    mirrored = np.roll(vol[::-1], 1, axis=0)  # z → (s − z) mod s: about voxel s//2
    a = np.asarray(validate.mirror_z(np.stack([prepare_reference(vol, 16)] * 2)))[0]
    b = np.asarray(prepare_reference(mirrored, 16))
    np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())


def test_mirror_image_slice_is_the_slice_at_the_z_reversed_rotation():
    """The reference checks slice the mirror image ``mirror_z`` at ``R`` as the reference itself
    at ``R·diag(1, 1, −1)`` (one CC pass for both)."""
    from scipy.spatial.transform import Rotation

    from polish3d.imaging import central_slice, prepare_reference

    rng = np.random.default_rng(4)
    vol = rng.normal(size=(16, 16, 16)).astype(np.float32)
    refs = np.stack([prepare_reference(vol, 16)] * 2)
    mirrored = validate.mirror_z(refs)[0]
    for r in Rotation.random(4, random_state=3).as_matrix():
        a = np.asarray(central_slice(mirrored, r, 16))
        b = np.asarray(central_slice(refs[0], r * [1.0, 1.0, -1.0], 16))
        np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())
        assert np.abs(a - np.asarray(central_slice(refs[0], r, 16))).max() > 0.1 * np.abs(a).max()


def test_reference_messages():
    """Mirror fits better → wrong hand; little gain above the cut while the low band fits → the
    reference only matches at low resolution; a good reference → nothing."""
    good = {"particles": 80, "mirror_z": -60.0, "high_band_z": 60.0, "low_band_z": 80.0, "cut_ang": 40.0}
    assert validate.reference_messages(good) == []
    hand = validate.reference_messages({**good, "mirror_z": 63.5})
    assert len(hand) == 1 and "wrong hand" in hand[0] and "63.5" in hand[0]
    low = validate.reference_messages({**good, "high_band_z": 5.0, "low_band_z": 40.0})
    assert len(low) == 1 and "only at low resolution" in low[0] and "40 Å" in low[0]
    assert validate.reference_messages({"particles": 2}) == []
