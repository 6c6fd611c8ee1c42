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


def geometry_error(projections, truth, *, align_gauge: bool) -> float:
    """2D RMS distance (px) between true beads projected with fitted and true geometry.

    With ``align_gauge`` the fitted geometry first gets the best exact gauge transform
    (3D translation, scale, rotation about the tilt axis), which leaves its residuals unchanged.
    """
    x = truth["bead_positions_px"]
    b = project_points(truth["projections"], x)
    c = x.mean(0)

    def f(g):
        xg = (1 + g[3]) * (x - c) @ rot_y(np.rad2deg(g[4])).T + c + g[:3]
        return (project_points(projections, xg) - b).ravel()

    g = scipy.optimize.least_squares(f, np.zeros(5)).x if align_gauge else np.zeros(5)
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
    jac = prob.jacobian(p).toarray()
    num = np.zeros_like(jac)
    for k in range(prob.n_params):
        d = np.zeros_like(p)
        d[k] = 1e-6
        num[:, k] = (prob.residuals(p + d) - prob.residuals(p - d)) / 2e-6
    assert np.allclose(jac, num, atol=1e-5)


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
    p, rot, s, sh = geometry_from_xf(
        read_xf(tmp_path / "a.xf"),
        read_tilt_angles(tmp_path / "a.tlt"),
        r.image_size_px,
        r.tomo_size_px,
    )
    x = r.bead_positions_px
    assert np.abs(project_points(p, x) - project_points(r.projections, x)).max() < 1e-3
    assert np.allclose(s, r.magnification, atol=1e-6)
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
    with pytest.raises(InputError, match="missing column"):
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
