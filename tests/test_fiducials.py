"""Bead bundle adjustment (polish3d.fiducials): accuracy, robustness, gauge, files, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.optimize

from polish3d.errors import InputError
from polish3d.fiducials import (
    FiducialOptions,
    align_fiducials,
    geometry_from_xf,
    read_tilt_angles,
    read_tracks,
    read_xf,
    report_dict,
    report_text,
    simulate_bead_tracks,
    write_tlt,
    write_xf,
    xf_from_result,
)
from polish3d.fiducials._bundle import BundleProblem, param_map
from polish3d.geometry import project_points, rot_y


def _fit(tracks, truth, **opts):
    return align_fiducials(
        tracks,
        truth["nominal_tilt_deg"],
        truth["tilt_axis_deg"],
        truth["image_size_px"],
        tomo_size_px=truth["tomo_size_px"],
        pixel_size_ang=2.0,
        options=FiducialOptions(**opts),
    )


def geometry_error(projections, truth, *, align_gauge: bool, distortion: bool = False) -> float:
    """2D RMS distance (px) between true beads projected with fitted and true geometry.

    With ``align_gauge`` the fitted geometry first gets the best exact gauge transform
    (3D translation, scale, rotation about the tilt axis), which leaves its residuals unchanged;
    with ``distortion`` also those of a fit with per-tilt X-stretch and skew (X stretch, X→Y
    shear, z scale, X→z shear of the beads).
    """
    x = truth["bead_positions_px"]
    b = project_points(truth["projections"], x)
    c = x.mean(0)
    n = 9 if distortion else 5

    def f(g):
        g = np.concatenate([g, np.zeros(9 - len(g))])
        d = np.array([[1 + g[5], 0, 0], [g[6], 1, 0], [g[8], 0, 1 + g[7]]])
        xg = (1 + g[3]) * (x - c) @ d.T @ rot_y(np.rad2deg(g[4])).T + c + g[:3]
        return (project_points(projections, xg) - b).ravel()

    g = scipy.optimize.least_squares(f, np.zeros(n)).x if align_gauge else np.zeros(n)
    return float(np.sqrt(np.mean(f(g) ** 2) * 2))


@pytest.fixture(scope="module")
def clean():
    tracks, truth = simulate_bead_tracks(seed=0)
    return tracks, truth, _fit(tracks, truth)


def test_recovers_geometry_at_noise_floor(clean):
    tracks, truth, r = clean
    assert geometry_error(r.projections, truth, align_gauge=True) < 0.17
    assert geometry_error(r.projections, truth, align_gauge=False) < 0.2
    n_res = 2 * len(r.residuals)
    expected = 0.3 * np.sqrt(1 - r.n_params / n_res)
    rep = report_dict(r)
    assert rep["rms_px"] == pytest.approx(expected, rel=0.1)
    assert r.sigma_px == pytest.approx(0.3, rel=0.1)
    assert np.max(np.abs(r.magnification - truth["magnification"])) < 2e-3
    assert np.max(np.abs(r.rotation_deg - truth["rotation_deg"])) < 0.1
    assert r.magnification[r.ref_tilt] == 1.0
    # gauge: mean bead depth at the tomogram mid-plane, tilt increments sum to zero
    c_int = np.array(truth["tomo_size_px"]) // 2
    assert np.mean(r.bead_positions_px[:, 2]) == pytest.approx(c_int[2], abs=1e-6)
    assert np.sum(r.tilt_deg - r.nominal_tilt_deg) == pytest.approx(0.0, abs=1e-8)


def test_robust_fit_rejects_and_ranks_outliers():
    tracks, truth = simulate_bead_tracks(seed=2, outlier_fraction=0.05)
    plain = _fit(tracks, truth)
    r = _fit(tracks, truth, robust="tukey")
    assert geometry_error(plain.projections, truth, align_gauge=True) > 0.5
    assert geometry_error(r.projections, truth, align_gauge=True) < 0.2
    assert geometry_error(r.projections, truth, align_gauge=False) < 0.2
    n_out = int(tracks["outlier"].sum())
    rep = report_dict(r)
    ranked = r.residuals.sort_values("dist", ascending=False).head(n_out)
    assert tracks["outlier"].to_numpy()[ranked.index].all()
    top = {(d["bead"], d["tilt"]) for d in rep["largest_residuals"]}
    outl = set(zip(tracks.bead[tracks.outlier], tracks.tilt[tracks.outlier], strict=True))
    assert top <= outl
    assert rep["rms_inliers_px"] < 0.3


def test_jacobian_matches_finite_differences():
    tracks, truth = simulate_bead_tracks(n_beads=6, n_tilts=9, seed=3)
    f = 9
    th = np.deg2rad(truth["nominal_tilt_deg"])
    order = np.argsort(th)
    e = np.zeros(f)
    e[4] = 1
    prob = BundleProblem(
        tracks.tilt,
        tracks.bead,
        tracks[["x", "y"]].to_numpy(),
        np.full(f, 1.4),
        th,
        param_map("grouped", f, order, 3),
        param_map("global", f, order, 3, constraint=np.ones(f), global_column=th - th.mean()),
        param_map("per_tilt", f, order, 3, constraint=e),
        [512, 512],
    )
    rng = np.random.default_rng(0)
    p = rng.normal(0, 0.01, prob.n_params)
    p[-3 * prob.n_beads :] = rng.normal(0, 200, 3 * prob.n_beads)
    _assert_jacobian_matches_differences(prob, p)


def test_param_maps():
    order = np.arange(11)
    b = param_map("grouped", 11, order, 3)
    assert b.shape == (11, 4) and np.allclose(b.sum(1), 1)
    c = np.arange(11.0)
    bc = param_map("grouped", 11, order, 3, constraint=c)
    assert bc.shape == (11, 3) and np.allclose(c @ bc, 0)
    assert param_map("fixed", 11, order, 3).shape == (11, 0)
    e = np.zeros(11)
    e[5] = 1
    assert param_map("global", 11, order, 3, constraint=e).shape == (11, 0)


def test_modes_gaps_and_left_out_tilts():
    tracks, truth = simulate_bead_tracks(
        seed=4, mag_error=0.0, rotation_error_deg=0.0, missing_fraction=0.2
    )
    # tilt 0 keeps only two beads: it is left out and gets the nominal geometry
    t0 = tracks[tracks.tilt == 0]
    tracks = tracks.drop(t0.index[2:])
    r = _fit(tracks, truth, rotation="global", magnification="fixed", tilt="grouped", group_size=3)
    assert not r.aligned[0] and r.aligned[1:].all()
    assert r.tilt_deg[0] == truth["nominal_tilt_deg"][0]
    assert np.allclose(r.magnification, 1.0)
    assert np.ptp(r.rotation_deg[1:]) < 1e-9
    assert abs(r.rotation_deg[1] - truth["tilt_axis_deg"]) < 0.05
    assert any("not aligned" in n for n in r.notes)
    assert report_dict(r)["rms_inliers_px"] < 0.6


def test_xf_tlt_round_trip_and_convention(tmp_path, clean):
    tracks, truth, r = clean
    write_xf(tmp_path / "a.xf", r)
    write_tlt(tmp_path / "a.tlt", r.tilt_deg)
    p, rot, s, sh, stretch, skew = geometry_from_xf(
        read_xf(tmp_path / "a.xf"),
        read_tilt_angles(tmp_path / "a.tlt"),
        r.image_size_px,
        r.tomo_size_px,
    )
    x = r.bead_positions_px
    assert np.abs(project_points(p, x) - project_points(r.projections, x)).max() < 1e-3
    assert np.allclose(s, r.magnification, atol=1e-6)
    assert np.abs(stretch).max() < 1e-6 and np.abs(skew).max() < 1e-4
    # the .xf maps raw positions to the aligned image [Ry(θ)(X − ⌊tomo/2⌋)]_xy + (W−1)/2
    xf = xf_from_result(r)
    a, d = xf[:, :4].reshape(-1, 2, 2), xf[:, 4:]
    c = (np.array(r.image_size_px) - 1) / 2
    raw = project_points(r.projections, x)
    al = np.einsum("fij,fnj->fni", a, raw - c) + d[:, None] + c
    q = np.einsum("fij,nj->fni", rot_y(r.tilt_deg)[:, :2], x - np.array(r.tomo_size_px) // 2) + c
    assert np.abs(al - q).max() < 1e-6


def _tomogram_set(tmp_path, truth):
    from polish3d.io.relion import write_new_optimisation_set
    from polish3d.model import TiltSeriesData

    f = len(truth["nominal_tilt_deg"])
    ts = TiltSeriesData(
        name="TS_01",
        pixel_size_ang=2.0,
        tomo_size_px=truth["tomo_size_px"],
        image_size_px=truth["image_size_px"],
        projections=np.broadcast_to(np.eye(4), (f, 4, 4)).copy(),
        pre_exposure_e_per_ang2=np.arange(f) * 3.0,
    )
    extra = {
        "TS_01": pd.DataFrame(
            {
                "rlnTomoNominalStageTiltAngle": truth["nominal_tilt_deg"],
                "rlnTomoNominalTiltAxisAngle": np.full(f, truth["tilt_axis_deg"]),
            }
        )
    }
    write_new_optimisation_set(tmp_path / "in", [ts], {}, tilt_tables_extra=extra)
    return tmp_path / "in" / "tomograms.star"


def test_cli_writes_relion_and_imod_files(tmp_path, clean, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from polish3d.cli import _run
    from polish3d.fiducials import register_cli
    from polish3d.io.relion import read_tomogram_set

    tracks, truth, r = clean
    star = _tomogram_set(tmp_path, truth)
    tracks[["bead", "tilt", "x", "y"]].to_csv(tmp_path / "tracks.csv", index=False)
    monkeypatch.chdir(tmp_path / "in")
    app = typer.Typer()
    register_cli(app, _run)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps typer's subcommand layout
        pass

    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        ["fiducials", "--tracks", str(tmp_path / "tracks.csv"), "--t", str(star), "--o", str(out)],
    )
    assert res.exit_code == 0, res.output
    for fn in (
        "TS_01.xf",
        "TS_01.tlt",
        "TS_01_beads.csv",
        "TS_01_residuals.csv",
        "TS_01_projections.star",
        "report.json",
        "report.txt",
        "tomograms.star",
    ):
        assert (out / fn).is_file(), fn
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_tilts"] == 41 and rep["pixel_size_ang"] == 2.0
    back = read_tomogram_set(out / "tomograms.star").tilt_series("TS_01", load_images=False)
    assert np.abs(back.projections - r.projections).max() < 1e-6
    assert "rlnTomoProjX" in read_tomogram_set(out / "tomograms.star").tilt_tables["TS_01"]
    # the same through the .xf/.tlt written by the CLI
    p, *_ = geometry_from_xf(
        read_xf(out / "TS_01.xf"),
        read_tilt_angles(out / "TS_01.tlt"),
        r.image_size_px,
        r.tomo_size_px,
    )
    x = r.bead_positions_px
    assert np.abs(project_points(p, x) - project_points(r.projections, x)).max() < 1e-3
    bad = CliRunner().invoke(
        app, ["fiducials", "--tracks", str(tmp_path / "tracks.csv"), "--o", str(out)]
    )
    assert bad.exit_code == 2 and "tilt angles" in bad.output
    assert "largest residuals" in report_text(rep)


def test_imod_model_reader(tmp_path):
    imodmodel = pytest.importorskip("imodmodel")
    df = pd.DataFrame(
        {
            "object_id": [0, 0, 0, 0],
            "contour_id": [0, 0, 1, 1],
            "x": [10.5, 11.5, 20.5, 21.0],
            "y": [5.5, 6.5, 7.5, 8.0],
            "z": [0.0, 1.0, 0.0, 2.0],
        }
    )
    imodmodel.write(df, tmp_path / "a.fid")
    t = read_tracks(tmp_path / "a.fid")
    assert t["bead"].tolist() == [0, 0, 1, 1] and t["tilt"].tolist() == [0, 1, 0, 2]
    assert np.allclose(t["x"], df["x"] - 0.5) and np.allclose(t["y"], df["y"] - 0.5)


def test_input_errors(tmp_path):
    with pytest.raises(InputError, match="no column for tilt"):
        align_fiducials(pd.DataFrame({"bead": [0], "x": [1.0], "y": [2.0]}), [0.0], 0.0, (10, 10))
    with pytest.raises(InputError, match="outside"):
        align_fiducials(
            pd.DataFrame({"bead": [0], "tilt": [3], "x": [1.0], "y": [2.0]}), [0.0], 0.0, (10, 10)
        )
    with pytest.raises(InputError):
        FiducialOptions(tilt="sometimes")
    (tmp_path / "t.csv").write_text("bead,tilt,x,y\n0,0,1,2\n0,1,1,2\n")
    assert len(read_tracks(tmp_path / "t.csv")) == 2
    with pytest.raises(InputError, match="not found"):
        read_tracks(tmp_path / "missing.fid")


# --- X-stretch and skew (tiltalign's distortion) -------------------------------------------------

SIGMA = 0.3  # tracking noise of the simulations (px per coordinate)


def _rms(r) -> float:
    e = r.residuals
    return float(np.sqrt(np.mean(e.dx**2 + e.dy**2) / 2))


def _ls_floor_rms(r) -> float:
    """Least-squares residual floor per coordinate: σ·sqrt((n_obs − n_params) / n_obs)."""
    n_obs = 2 * len(r.residuals)
    return SIGMA * float(np.sqrt((n_obs - r.n_params) / n_obs))


@pytest.fixture(scope="module")
def distorted():
    """tiltalign-like: 25 beads × 61 views (±60°), per-view stretch (±1 %) and skew (0.3°)."""
    tracks, truth = simulate_bead_tracks(
        n_beads=25, n_tilts=61, seed=0, stretch_error=0.01, skew_error_deg=0.3
    )
    return tracks, truth, _fit(tracks, truth, stretch="per_tilt", skew="per_tilt")


def test_stretch_skew_reach_least_squares_floor(distorted):
    tracks, truth, r = distorted
    # the residual sits at the least-squares floor (0.3 px noise, 493 free parameters)
    assert _rms(r) == pytest.approx(_ls_floor_rms(r), rel=0.05)
    assert r.sigma_px == pytest.approx(SIGMA, rel=0.08)
    # geometry at the linearised floor (0.20 px in this gauge; benchmarks/bench_fiducials.py)
    assert geometry_error(r.projections, truth, align_gauge=False) < 0.26
    assert geometry_error(r.projections, truth, align_gauge=True, distortion=True) < 0.22
    # the distortion itself: errors well below its spread
    assert np.sqrt(np.mean((r.stretch - truth["stretch"]) ** 2)) < 0.3 * np.std(truth["stretch"])
    assert np.sqrt(np.mean((r.skew_deg - truth["skew_deg"]) ** 2)) < 0.15 * np.std(
        truth["skew_deg"]
    )
    # gauge: stretch and skew sum to zero, stretch also against tan θ⁰
    th0 = np.deg2rad(r.nominal_tilt_deg)
    assert abs(np.sum(r.stretch)) < 1e-9 and abs(np.sum(r.skew_deg)) < 1e-7
    assert abs(np.sum(np.tan(th0) * r.stretch)) < 1e-9
    assert abs(np.sum(np.tan(th0) * (r.tilt_deg - r.nominal_tilt_deg))) < 1e-7
    rep = report_dict(r)
    assert rep["n_variables"]["stretch"] == 59 and rep["n_variables"]["skew"] == 60
    assert rep["n_variables_tiltalign"] == r.n_params - rep["n_variables"]["shifts"] - 2
    # without the distortion terms the same data cannot be fitted to the noise
    plain = _fit(tracks, truth)
    assert _rms(plain) > 2 * _ls_floor_rms(plain)


def test_stretch_reference_tilt_is_a_gauge_choice(distorted):
    tracks, truth, r = distorted
    ref = _fit(tracks, truth, stretch="per_tilt", skew="per_tilt", stretch_ref_tilt=10)
    assert ref.stretch[10] == 0.0 and ref.skew_deg[10] == 0.0
    assert ref.n_params == r.n_params
    # another gauge: same residuals, same gauge-invariant geometry
    assert _rms(ref) == pytest.approx(_rms(r), rel=1e-6)
    assert geometry_error(ref.projections, truth, align_gauge=True, distortion=True) < 0.22
    with pytest.raises(InputError, match="stretch_ref_tilt"):
        _fit(tracks, truth, stretch="per_tilt", stretch_ref_tilt=99)


def test_stretch_skew_without_distortion_change_nothing_beyond_noise(clean):
    tracks, truth, r0 = clean
    r = _fit(tracks, truth, stretch="per_tilt", skew="per_tilt")
    assert _rms(r) == pytest.approx(_ls_floor_rms(r), rel=0.05)
    # the stretch and skew found are noise: ~1e-3 and ~0.02° (per-view values of real data
    # are ~1e-2 and ~0.3°)
    assert np.sqrt(np.mean(r.stretch**2)) < 3e-3
    assert np.sqrt(np.mean(r.skew_deg**2)) < 0.05
    # geometry stays at the floor of the larger model (0.16 px without the terms)
    assert geometry_error(r.projections, truth, align_gauge=True, distortion=True) < 0.22
    # global stretch/skew is a gauge: identical to no distortion terms
    g = _fit(tracks, truth, stretch="global", skew="global")
    assert np.allclose(g.projections, r0.projections, atol=1e-6)
    assert any("gauge" in n for n in g.notes)


def test_distortion_round_trip_xf_and_star(tmp_path, distorted, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from polish3d.cli import _run
    from polish3d.fiducials import register_cli
    from polish3d.io.relion import read_tomogram_set

    tracks, truth, r = distorted
    # .xf/.tlt → exact matrices (also off the mid-plane) and the distortion parameters
    write_xf(tmp_path / "a.xf", r)
    write_tlt(tmp_path / "a.tlt", r.tilt_deg)
    p, rot, s, sh, stretch, skew = geometry_from_xf(
        read_xf(tmp_path / "a.xf"), read_tilt_angles(tmp_path / "a.tlt"), r.image_size_px,
        r.tomo_size_px,
    )
    x = np.vstack([r.bead_positions_px, [[100.0, 900.0, 128.0 + 120], [900.0, 50.0, 8.0]]])
    assert np.abs(project_points(p, x) - project_points(r.projections, x)).max() < 5e-4
    assert np.abs(stretch - r.stretch).max() < 1e-6 and np.abs(skew - r.skew_deg).max() < 5e-5
    assert np.abs(s - r.magnification).max() < 2e-6
    # the .xf maps a raw mid-plane point (z = 0) onto its undistorted aligned position
    xf = xf_from_result(r)
    a, d = xf[:, :4].reshape(-1, 2, 2), xf[:, 4:]
    c = (np.array(r.image_size_px) - 1) / 2
    mid = r.bead_positions_px.copy()
    mid[:, 2] = np.array(r.tomo_size_px)[2] // 2
    raw = project_points(r.projections, mid)
    al = np.einsum("fij,fnj->fni", a, raw - c) + d[:, None] + c
    q = np.einsum("fij,nj->fni", rot_y(r.tilt_deg)[:, :2], mid - np.array(r.tomo_size_px) // 2)
    assert np.abs(al - (q + c)).max() < 1e-6
    # STAR: the CLI writes the distortion into rlnTomoProjX..W of the tomogram set
    star = _tomogram_set(tmp_path, truth)
    tracks[["bead", "tilt", "x", "y"]].rename(
        columns={"bead": "bead_id", "tilt": "view", "x": "x_px", "y": "y_px"}
    ).to_csv(tmp_path / "tracks.csv", index=False)
    monkeypatch.chdir(tmp_path / "in")
    app = typer.Typer()
    register_cli(app, _run)

    @app.command("noop")
    def _noop() -> None:
        pass

    out = tmp_path / "out"
    res = CliRunner().invoke(app, [
        "fiducials", "--tracks", str(tmp_path / "tracks.csv"), "--t", str(star), "--o", str(out),
        "--stretch", "per_tilt", "--skew", "per_tilt",
    ])
    assert res.exit_code == 0, res.output
    tset = read_tomogram_set(out / "tomograms.star")
    back = tset.tilt_series("TS_01", load_images=False)
    assert np.abs(back.projections - r.projections).max() < 1e-6
    assert "rlnTomoProjX" in tset.tilt_tables["TS_01"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_variables"]["stretch"] == 59
    assert rep["per_tilt"][5]["stretch"] == pytest.approx(r.stretch[5], abs=1e-9)
    assert "dmag" in (out / "report.txt").read_text()


def test_grouped_stretch_interpolates_between_group_centres():
    tracks, truth = simulate_bead_tracks(n_beads=25, n_tilts=61, seed=1)
    r = _fit(tracks, truth, stretch="grouped", skew="grouped", stretch_group=7, skew_group=11)
    nv = r.n_variables
    # 61/7 → 9 groups, 2 gauge constraints; 61/11 → 6 groups, 1 constraint
    assert nv["stretch"] == 7 and nv["skew"] == 5
    order = np.argsort(r.nominal_tilt_deg)
    # linear between the 9 group centres (evenly spread in tilt order), constant beyond the
    # first and last: the fitted stretches lie in the span of that interpolation
    rank = np.empty(61)
    rank[order] = np.arange(61)
    centres = np.linspace(3, 57, 9)
    hat = np.maximum(0, 1 - np.abs(np.clip(rank, 3, 57)[:, None] - centres) / np.diff(centres)[0])
    coef = np.linalg.lstsq(hat, r.stretch, rcond=None)[0]
    assert np.abs(hat @ coef - r.stretch).max() < 1e-12 < np.abs(r.stretch).max()
    assert np.abs(np.diff(r.stretch[order], 2)).max() > 1e-6  # not a single line
    assert _rms(r) == pytest.approx(_ls_floor_rms(r), rel=0.05)


def test_grouped_stretch_skew_known_answer():
    """tiltalign-like grouped distortion (stretch groups of 7, skew groups of 11, linear between
    centres): the grouped fit reaches the floor and beats the per-tilt fit of the same data."""
    tracks, truth = simulate_bead_tracks(n_beads=25, n_tilts=61, seed=0, stretch_error=0.01,
                                         skew_error_deg=0.3, stretch_group=7, skew_group=11)
    g = _fit(tracks, truth, stretch="grouped", stretch_group=7, skew="grouped", skew_group=11)
    p = _fit(tracks, truth, stretch="per_tilt", skew="per_tilt")
    assert _rms(g) == pytest.approx(_ls_floor_rms(g), rel=0.05)
    assert geometry_error(g.projections, truth, align_gauge=False) < 0.2
    err_g = np.sqrt(np.mean((g.stretch - truth["stretch"]) ** 2))
    err_p = np.sqrt(np.mean((p.stretch - truth["stretch"]) ** 2))
    assert err_g < 0.2 * np.std(truth["stretch"]) and err_g < 0.5 * err_p
    assert np.sqrt(np.mean((g.skew_deg - truth["skew_deg"]) ** 2)) < 0.1 * np.std(
        truth["skew_deg"])
    assert g.n_variables["stretch"] == 7 and g.n_variables["skew"] == 5


def test_jacobian_with_stretch_and_skew_matches_finite_differences():
    tracks, truth = simulate_bead_tracks(n_beads=6, n_tilts=9, seed=5, stretch_error=0.02,
                                         skew_error_deg=1.0)
    f = 9
    th = np.deg2rad(truth["nominal_tilt_deg"])
    order = np.argsort(th)
    prob = BundleProblem(
        tracks.tilt, tracks.bead, tracks[["x", "y"]].to_numpy(), np.full(f, 1.4), th,
        param_map("per_tilt", f, order, 3), param_map("grouped", f, order, 3),
        param_map("per_tilt", f, order, 3), [512, 512],
        b_stretch=param_map("per_tilt", f, order, 3, constraint=np.vstack([np.ones(f),
                                                                             np.tan(th)])),
        b_skew=param_map("grouped", f, order, 2),
    )
    rng = np.random.default_rng(1)
    p = rng.normal(0, 0.03, prob.n_params)
    p[-3 * prob.n_beads:] = rng.normal(0, 200, 3 * prob.n_beads)
    _assert_jacobian_matches_differences(prob, p)
    assert prob.k[3] == 7 and prob.k[4] == 4


def test_param_map_cosine_groups_smaller_at_high_tilt():
    th = np.deg2rad(np.linspace(-60, 60, 61))
    order = np.argsort(th)
    eq = param_map("grouped", 61, order, 5)
    cs = param_map("grouped", 61, order, 5, group_scale=np.cos(th) ** 1.5)
    assert eq.shape == cs.shape == (61, 12)
    assert np.allclose(cs.sum(1), 1) and np.all(cs >= 0)
    width = (cs > 0).sum(0)  # tilts touched by each group variable
    assert width[0] < width[6] and width[-1] < width[5]
    assert np.all((eq > 0).sum(0)[1:-1] == 10)  # equal groups: centres 4.9 tilts apart


def test_param_map_two_constraints():
    order = np.arange(11)
    c = np.vstack([np.ones(11), np.tan(np.linspace(-1, 1, 11))])
    b = param_map("per_tilt", 11, order, 3, constraint=c)
    assert b.shape == (11, 9) and np.allclose(c @ b, 0)
    assert np.linalg.matrix_rank(b) == 9


# --- track files as users have them ----------------------------------------------------------------


def test_track_column_aliases(tmp_path):
    base = pd.DataFrame({"bead": [0, 0, 1], "tilt": [0, 1, 1], "x": [1.0, 2.0, 3.0],
                         "y": [4.0, 5.0, 6.0]})
    layouts = [
        {"bead": "bead_id", "tilt": "tilt_row", "x": "x_px", "y": "y_px"},
        {"bead": "contour", "tilt": "view", "x": "X", "y": "Y"},
        {"bead": "rlnBeadId", "tilt": "z", "x": "rlnCoordinateX", "y": "rlnCoordinateY"},
        {"bead": "Fiducial ID", "tilt": "Tilt Index", "x": "x_pixel", "y": "y_pixel"},
    ]
    for k, names in enumerate(layouts):
        fn = tmp_path / f"t{k}.csv"
        base.rename(columns=names).assign(extra="note").to_csv(fn, index=False)
        got = read_tracks(fn)
        assert got[["bead", "tilt", "x", "y"]].equals(base), names
    # IMOD point files: contours restart in each object
    fn = tmp_path / "obj.tsv"
    pd.DataFrame({"object": [1, 1, 2, 2], "contour": [1, 1, 1, 1], "z": [0, 1, 0, 1],
                  "x": [1.0, 2, 3, 4], "y": [1.0, 2, 3, 4]}).to_csv(fn, sep="\t", index=False)
    assert read_tracks(fn)["bead"].tolist() == [0, 0, 1, 1]
    (tmp_path / "bad.csv").write_text("particle,frame,u,v\n0,0,1,2\n")
    with pytest.raises(InputError) as exc:
        read_tracks(tmp_path / "bad.csv")
    msg = str(exc.value)
    assert "bad.csv" in msg and "particle, frame, u, v" in msg
    for name in ("bead_id", "contour", "tilt_row", "view", "x_px", "y_px"):
        assert name.replace("_", "") in msg.replace("_", "")
    (tmp_path / "nohead.csv").write_text("0,0,1.5,2.5\n0,1,1.5,2.5\n")
    with pytest.raises(InputError, match="first line looks like data"):
        read_tracks(tmp_path / "nohead.csv")


def test_track_values_errors_name_file_column_row(tmp_path):
    (tmp_path / "text.csv").write_text("bead,tilt,x,y\n0,0,1,2\n0,1,abc,2\n")
    with pytest.raises(InputError, match=r"text\.csv: column 'x' \(x\), data row 2: 'abc'"):
        read_tracks(tmp_path / "text.csv")
    (tmp_path / "frac.csv").write_text("bead,view,x,y\n0,0,1,2\n0,1.5,1,2\n")
    with pytest.raises(InputError, match=r"frac\.csv: column 'view', data row 2: the tilt index"
                                         r".* 1\.5 must be an integer"):
        read_tracks(tmp_path / "frac.csv")
    (tmp_path / "empty.csv").write_text("bead,tilt,x,y\n0,0,1,2\n0,1,,2\n")
    with pytest.raises(InputError, match=r"column 'x' \(x\), data row 2: is empty"):
        read_tracks(tmp_path / "empty.csv")
    (tmp_path / "beadtxt.csv").write_text("bead,tilt,x,y\nA,0,1,2\n")
    with pytest.raises(InputError, match=r"column 'bead' \(bead\), data row 1: 'A'"):
        read_tracks(tmp_path / "beadtxt.csv")
    with pytest.raises(InputError, match="bead 0 has more than one position on tilt 1"):
        align_fiducials(pd.DataFrame({"bead": [0, 0, 0], "tilt": [0, 1, 1], "x": [1.0, 2, 3],
                                      "y": [1.0, 2, 3]}), [0.0, 1.0], 0.0, (10, 10))


def test_cli_track_errors_exit_2_without_traceback(tmp_path):
    import typer
    from typer.testing import CliRunner

    from polish3d.cli import _run
    from polish3d.fiducials import register_cli

    app = typer.Typer()
    register_cli(app, _run)

    @app.command("noop")
    def _noop() -> None:
        pass

    (tmp_path / "a.tlt").write_text("-3\n0\n3\n")
    for text, expect in (("bead,tilt,x,y\n0,0,1,2\n0,1,1,oops\n", "'oops' is not a finite"),
                         ("bead,tilt,x,y\n0,0,1,2\n0,0.5,1,2\n", "must be an integer")):
        (tmp_path / "t.csv").write_text(text)
        before = (tmp_path / "t.csv").read_bytes()
        res = CliRunner().invoke(app, ["fiducials", "--tracks", str(tmp_path / "t.csv"), "--tlt",
                                       str(tmp_path / "a.tlt"), "--tilt_axis", "0",
                                       "--image_size", "100,100", "--o", str(tmp_path / "o")])
        assert res.exit_code == 2, res.output
        assert expect in res.output and "t.csv" in res.output
        assert "Traceback" not in res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
        assert (tmp_path / "t.csv").read_bytes() == before
        assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(app, ["fiducials", "--tracks", str(tmp_path / "t.csv"), "--tlt",
                                   str(tmp_path / "a.tlt"), "--tilt_axis", "0", "--image_size",
                                   "100,100", "--o", str(tmp_path / "o"), "--skew", "often"])
    assert res.exit_code == 2 and "--skew" in res.output


def test_cli_refuses_to_overwrite_inputs(tmp_path, clean, monkeypatch):
    import hashlib

    import typer
    from typer.testing import CliRunner

    from polish3d.cli import _run
    from polish3d.fiducials import register_cli

    tracks, truth, _ = clean
    star = _tomogram_set(tmp_path, truth)
    tracks[["bead", "tilt", "x", "y"]].to_csv(tmp_path / "in" / "tracks.csv", index=False)
    write_tlt(tmp_path / "in" / "report.txt", truth["nominal_tilt_deg"])  # an input named so
    app = typer.Typer()
    register_cli(app, _run)

    @app.command("noop")
    def _noop() -> None:
        pass

    def digest():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((tmp_path / "in").rglob("*")) if p.is_file()}

    before = digest()
    monkeypatch.chdir(tmp_path / "in")
    for out, expect in ((str(tmp_path / "in" / "."), "tomograms.star"),
                        ("./", "tomograms.star"),
                        (str(tmp_path / "in"), "tomograms.star")):
        res = CliRunner().invoke(app, ["fiducials", "--tracks", "tracks.csv", "--t", str(star),
                                       "--o", out])
        assert res.exit_code == 2, res.output
        assert "overwrite the input" in res.output and expect in res.output
    # without a tomogram set: a plain output that would replace an input file
    res = CliRunner().invoke(app, ["fiducials", "--tracks", "tracks.csv", "--tlt", "report.txt",
                                   "--tilt_axis", "85", "--image_size", "1024,1024", "--o", "."])
    assert res.exit_code == 2 and "report.txt" in res.output
    assert digest() == before
    # a fresh folder is fine
    res = CliRunner().invoke(app, ["fiducials", "--tracks", "tracks.csv", "--t", str(star),
                                   "--o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert digest() == before


def _assert_jacobian_matches_differences(prob, p):
    """The analytic Jacobian of the bundle residuals at ``p`` equals central differences."""
    jac = prob.jacobian(p).toarray()
    num = np.zeros_like(jac)
    for k in range(prob.n_params):
        d = np.zeros_like(p)
        d[k] = 1e-6
        num[:, k] = (prob.residuals(p + d) - prob.residuals(p - d)) / 2e-6
    assert np.allclose(jac, num, atol=1e-5)
