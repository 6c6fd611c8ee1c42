"""RELION sets: optimisation/tomogram/particle/trajectory sets of every fixture family."""

from __future__ import annotations

import logging
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from polish3d import geometry
from polish3d.errors import InputError
from polish3d.io import (
    OptimisationSet,
    image_size,
    new_particle_set,
    open_stack,
    read_fsc,
    read_map,
    read_optimisation_set,
    read_particle_set,
    read_star,
    read_tomogram_set,
    read_trajectories,
    write_map,
    write_new_optimisation_set,
    write_optimisation_set,
    write_stack,
    write_trajectories,
)
from polish3d.io.relion import PROJ_LABELS, _pipeline_post
from polish3d.model import Deformation, TiltSeriesData

DATA = Path(__file__).resolve().parent / "data"
RELION = DATA / "relion"
CC = DATA / "convention-check"
CETS = RELION / "cets-relion-relion5"
SYN = RELION / "relion5-run-synthetic"
WARP = RELION / "tomodrgn-warptools"
WARP_STEM = "warptools_test_4-tomos_10-ptcls_box-32_angpix-12"
OPT_FILES = sorted(RELION.glob("**/*optimisation_set.star"))


def _is_rotation(p):
    a = p[:, :3, :3]
    np.testing.assert_allclose(a @ np.swapaxes(a, 1, 2), np.broadcast_to(np.eye(3), a.shape), atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(a), 1.0, atol=1e-9)


def _fake_ts(name, n=3, px=1.0, tomo=(100, 100, 50)):
    return TiltSeriesData(
        name=name,
        pixel_size_ang=px,
        tomo_size_px=tomo,
        image_size_px=tomo[:2],
        projections=np.broadcast_to(np.eye(4), (n, 4, 4)).copy(),
    )


# ---------------------------------------------------------------------------- optimisation set


@pytest.mark.parametrize("path", OPT_FILES, ids=lambda p: str(p.relative_to(RELION)))
def test_read_optimisation_set_fixtures(path):
    family = RELION / path.relative_to(RELION).parts[0]
    opt = read_optimisation_set(path, project_dir=family)
    assert opt.particles_file is not None and opt.tomograms_file is not None
    assert opt.source == path
    for f in (opt.particles_file, opt.tomograms_file):
        assert f.name.endswith(".star")


def test_optimisation_set_forms_and_empty_entry():
    loop = read_optimisation_set(CETS / "Picks/job019/optimisation_set.star", project_dir=CETS)
    assert loop.particles_file == CETS / "Picks/job019/particles.star"
    assert loop.tomograms_file == CETS / "Denoise/job008/tomograms.star"
    cyl = RELION / "cylindra-relion5"
    kv = read_optimisation_set(cyl / "Class3D/job_class3d/run_it025_optimisation_set.star", project_dir=cyl)
    assert kv.trajectories_file is None  # "" means unset
    inp = read_optimisation_set(SYN / "input/optimisation_set.star", project_dir=SYN / "input")
    assert inp.ref1 == SYN / "input/reference/half1.mrc"
    assert inp.mask == SYN / "input/reference/mask.mrc" and inp.fsc is None


def test_optimisation_set_relative_to_cwd(monkeypatch):
    monkeypatch.chdir(CC)
    opt = read_optimisation_set("Truth/optimisation_set.star")
    assert opt.particles_file == Path("Truth/particles.star")  # relative: cwd, as RELION


def test_write_optimisation_set(tmp_path):
    opt = OptimisationSet(
        particles_file=tmp_path / "Polish/job001/particles.star",
        tomograms_file=tmp_path / "Polish/job001/tomograms.star",
        ref1=tmp_path / "ref.mrc",
    )
    out = write_optimisation_set(tmp_path / "Polish/job001/optimisation_set.star", opt, project_dir=tmp_path)
    blocks = read_star(out)
    assert blocks == {
        "": {
            "rlnTomoParticlesFile": "Polish/job001/particles.star",
            "rlnTomoTomogramsFile": "Polish/job001/tomograms.star",
        }
    }
    back = read_optimisation_set(out, project_dir=tmp_path)
    assert back.particles_file == opt.particles_file and back.ref1 is None
    given = OptimisationSet(particles_file=Path("a/p.star"), trajectories_file=Path("a/m.star"))
    write_optimisation_set(tmp_path / "o.star", given)
    assert read_star(tmp_path / "o.star")[""] == {
        "rlnTomoParticlesFile": "a/p.star",
        "rlnTomoTrajectoriesFile": "a/m.star",
    }


# ---------------------------------------------------------------------------- tomogram sets


@pytest.mark.parametrize("job", ["Tomograms/job006", "Polish/job030"])
def test_cets_tomogram_set(job):
    s = read_tomogram_set(CETS / job / "tomograms.star", project_dir=CETS)
    assert s.names == ["TS_01", "TS_03", "TS_43", "TS_45", "TS_54"]
    assert s.layout == "relion5"
    for name in s.names:
        ts = s.tilt_series(name, load_images=False)
        n = len(s.tilt_tables[name])
        assert ts.n_tilts == n and ts.projections.shape == (n, 4, 4)
        _is_rotation(ts.projections)
        assert ts.tomo_size_px == (4000, 4000, 2000) and ts.pixel_size_ang == pytest.approx(1.35)
        assert ts.hand == -1.0 and ts.defocus_slope == 1.0 and ts.bfactor_per_dose_ang2 == 0.0
        assert ts.image_size_px == (4000, 4000)  # images absent: tomogram size
        pre = ts.pre_exposure_e_per_ang2
        o = geometry.dose_order(pre)
        assert ts.fractional_dose_e_per_ang2 == pytest.approx(pre[o[1]] - pre[o[0]])
        assert ts.image_files[0][0].startswith(str(CETS / "MotionCorr"))
        assert np.all(ts.phase_shift_deg == 0) and np.all(ts.ctf_bfactor_ang2 == 0)
    ts03 = s.tilt_series("TS_03", load_images=False)
    if "rlnCtfScalefactor" not in s.tilt_tables["TS_03"]:
        assert np.all(ts03.ctf_scale == 1.0)
    ts01 = s.tilt_series("TS_01", load_images=False)
    np.testing.assert_allclose(ts01.ctf_scale, s.tilt_tables["TS_01"]["rlnCtfScalefactor"])


def test_relion4_warptools_tomogram_set(caplog):
    with caplog.at_level(logging.WARNING):
        s = read_tomogram_set(WARP / f"{WARP_STEM}_tomograms.star", project_dir=WARP)
    assert s.layout == "relion4" and len(s.names) == 4
    ts = s.tilt_series("Unt_083.tomostar", load_images=False)
    assert ts.n_tilts == 37 and ts.fractional_dose_e_per_ang2 == pytest.approx(2.556)
    assert ts.image_files[5] == (str(WARP / "dummy_tiltseries.mrc"), 5)
    np.testing.assert_allclose(ts.projections[0, 0], [0.10915412, -0.99366254, 0.026835253, 0])
    np.testing.assert_allclose(ts.projections[:, 3], np.tile([0, 0, 0, 1.0], (37, 1)))
    np.testing.assert_allclose(ts.ctf_scale[:2], [0.0, 0.707])
    with pytest.raises(InputError, match="dummy_tiltseries.mrc"):
        s.tilt_series("Unt_083.tomostar", load_images=True)


def test_relion4_converted_on_write(tmp_path):
    s = read_tomogram_set(WARP / f"{WARP_STEM}_tomograms.star", project_dir=WARP)
    out = s.write(tmp_path / "Polish/job001", project_dir=tmp_path)
    g = read_star(out)["global"]
    assert g["rlnTomoTiltSeriesStarFile"].tolist()[0] == "Polish/job001/tilt_series/Unt_083.tomostar.star"
    back = read_tomogram_set(out, project_dir=tmp_path)
    assert back.layout == "relion5" and back.names == s.names
    for name in s.names:
        a = s.tilt_series(name, load_images=False)
        b = back.tilt_series(name, load_images=False)
        np.testing.assert_allclose(b.projections, a.projections, atol=1e-12)
        np.testing.assert_allclose(b.defocus_u_ang, a.defocus_u_ang)


@pytest.mark.parametrize(
    ("job", "model", "n_coeff"),
    [("Polish/job050", "spline", None), ("Polish/job051", "Fourier", 12)],
)
def test_synthetic_run_deformations(job, model, n_coeff):
    s = read_tomogram_set(SYN / job / "tomograms.star", project_dir=SYN)
    ts = s.tilt_series("TS_01", load_images=False)
    assert ts.deformation is not None and ts.deformation.model == model
    assert ts.deformation.grid_size == (3, 3)
    assert ts.deformation.coefficients.shape[0] == 19
    if n_coeff is not None:
        assert ts.deformation.coefficients.shape[1] == n_coeff
    assert "rlnTomoProjX" not in s.tilt_tables["TS_01"]  # RELION dropped them


def test_synthetic_input_matrices_match_euler():
    s = read_tomogram_set(SYN / "input/tomograms.star", project_dir=SYN / "input")
    with_m = s.tilt_series("TS_01", load_images=False)
    s.tilt_tables["TS_01"] = s.tilt_tables["TS_01"].drop(columns=list(PROJ_LABELS))
    euler = s.tilt_series("TS_01", load_images=False)
    x = np.random.default_rng(1).uniform(0, 384, (50, 3))
    d = geometry.project_points(with_m.projections, x) - geometry.project_points(euler.projections, x)
    assert np.abs(d).max() < 1e-6


def test_convention_input_matrices_match_euler():
    """The input per-tilt table carries both rlnTomoProj* and Euler columns: they agree."""
    s = read_tomogram_set(CC / "tomograms.star", project_dir=CC)
    with_m = s.tilt_series("TS_01", load_images=False)  # 256² images, as the tomogram
    assert with_m.image_size_px == (256, 256)
    s.tilt_tables["TS_01"] = s.tilt_tables["TS_01"].drop(columns=list(PROJ_LABELS))
    euler = s.tilt_series("TS_01", load_images=False)
    x = np.random.default_rng(2).uniform(0, 256, (100, 3)) * [1, 1, 0.5]
    d = geometry.project_points(with_m.projections, x) - geometry.project_points(euler.projections, x)
    assert np.abs(d).max() < 1e-6
    np.testing.assert_allclose(with_m.projections, euler.projections, atol=1e-6)


def test_partial_families_fail_clearly():
    cyl = RELION / "cylindra-relion5"
    with pytest.raises(InputError, match="rlnMicrographPreExposure"):
        read_tomogram_set(cyl / "Tomograms/job_tomo/tomograms.star", project_dir=cyl)
    with pytest.raises(InputError, match=r"not found.*referenced from .*fomo-relion5/tomograms.star"):
        read_tomogram_set(RELION / "fomo-relion5/tomograms.star", project_dir=RELION / "fomo-relion5")
    imp = read_tomogram_set(CETS / "Import/job001/tilt_series.star", project_dir=CETS)
    with pytest.raises(InputError, match="rlnTomoSizeX"):
        imp.tilt_series("TS_01", load_images=False)


def test_single_block_with_other_name_is_accepted(tmp_path, caplog):
    """cylindra quirk: 14pf_MT.star holds data_13pf_MT; accepted when it is the only block."""
    cyl = RELION / "cylindra-relion5"
    g = read_star(cyl / "Tomograms/job_tomo/tomograms.star")["global"]
    from polish3d.io import write_star

    for stem in ("13pf_MT", "14pf_MT"):
        t = read_star(cyl / f"Tomograms/job_tomo/tilt_series/{stem}.star")["13pf_MT"]
        t["rlnMicrographPreExposure"] = 3.0 * np.arange(len(t))
        write_star(tmp_path / f"Tomograms/job_tomo/tilt_series/{stem}.star", {"13pf_MT": t})
    write_star(tmp_path / "tomograms.star", {"global": g})
    with caplog.at_level(logging.WARNING):
        s = read_tomogram_set(tmp_path / "tomograms.star", project_dir=tmp_path)
    assert len(s.tilt_tables["TS_02"]) == 7 and "data_13pf_MT" in caplog.text
    out = s.write(tmp_path / "Polish/job002", project_dir=tmp_path)
    back = read_tomogram_set(out, project_dir=tmp_path)
    assert list(read_star(back.tilt_files["TS_02"])) == ["TS_02"]


def test_with_tilt_series_write_round_trip(tmp_path):
    s = read_tomogram_set(CC / "Truth/tomograms.star", project_dir=CC)
    ts = s.tilt_series("TS_01", load_images=False)
    rng = np.random.default_rng(3)
    new = ts.projections.copy()
    new[:, :3, :3] = geometry.rot_z(rng.normal(0, 1, ts.n_tilts)) @ new[:, :3, :3]
    new[:, :2, 3] += rng.normal(0, 2, (ts.n_tilts, 2))
    coeff = rng.normal(size=(ts.n_tilts, 8))
    s2 = s.with_tilt_series("TS_01", new, Deformation("linear", (2, 2), coeff))
    assert s.tilt_tables["TS_01"] is not s2.tilt_tables["TS_01"]  # original untouched
    np.testing.assert_allclose(s2.tilt_series("TS_01", load_images=False).projections, new, atol=1e-9)
    out = s2.write(tmp_path / "Polish/job002", project_dir=tmp_path)
    assert (tmp_path / "Polish/job002/tilt_series/TS_01.star").is_file()
    g = read_star(out)["global"]
    assert g["rlnTomoTiltSeriesStarFile"].tolist() == ["Polish/job002/tilt_series/TS_01.star"]
    assert g["rlnTomoDeformationType"].tolist() == ["linear"]
    # all other global columns untouched
    pd.testing.assert_frame_equal(
        g.drop(
            columns=[
                "rlnTomoTiltSeriesStarFile",
                "rlnTomoDeformationGridSizeX",
                "rlnTomoDeformationGridSizeY",
                "rlnTomoDeformationType",
            ]
        ),
        s.global_table.drop(columns=["rlnTomoTiltSeriesStarFile"]),
    )
    back = read_tomogram_set(out, project_dir=tmp_path)
    b = back.tilt_series("TS_01", load_images=False)
    x = rng.uniform(0, 256, (100, 3)) * [1, 1, 0.5]
    d = geometry.project_points(b.projections, x) - geometry.project_points(new, x)
    assert np.abs(d).max() < 1e-4
    np.testing.assert_allclose(b.deformation.coefficients, coeff, rtol=1e-10)
    old_t = s.tilt_tables["TS_01"]
    new_t = back.tilt_tables["TS_01"]
    for c in old_t.columns:
        if c not in (
            "rlnTomoXTilt",
            "rlnTomoYTilt",
            "rlnTomoZRot",
            "rlnTomoXShiftAngst",
            "rlnTomoYShiftAngst",
        ):
            if pd.api.types.is_float_dtype(old_t[c].dtype):
                np.testing.assert_allclose(new_t[c], old_t[c], rtol=1e-5, atol=6e-6)
            else:
                assert new_t[c].tolist() == old_t[c].tolist(), c


def test_with_tilt_series_matrix_handling():
    s = read_tomogram_set(CC / "tomograms.star", project_dir=CC)
    ts = s.tilt_series("TS_01", load_images=False)
    dropped = s.with_tilt_series("TS_01", ts.projections)
    assert not any(c in dropped.tilt_tables["TS_01"] for c in PROJ_LABELS)
    mag = ts.projections.copy()
    mag[:, :2, :3] *= 1.01  # not a rotation: only the matrices can carry it
    kept = s.with_tilt_series("TS_01", mag, keep_matrix=True)
    assert all(c in kept.tilt_tables["TS_01"] for c in PROJ_LABELS)
    np.testing.assert_allclose(kept.tilt_series("TS_01", load_images=False).projections, mag, atol=1e-12)
    # by default the matrices are kept exactly when the Euler columns cannot hold them: a
    # magnification from `polish3d fiducials` survives a later `polish3d align`
    auto = s.with_tilt_series("TS_01", mag)
    assert all(c in auto.tilt_tables["TS_01"] for c in PROJ_LABELS)
    np.testing.assert_allclose(auto.tilt_series("TS_01", load_images=False).projections, mag, atol=1e-12)
    assert not any(c in s.with_tilt_series("TS_01", ts.projections, keep_matrix=None).tilt_tables["TS_01"]
                   for c in PROJ_LABELS)


@pytest.mark.parametrize(
    ("old", "post"),
    [
        ("Tomograms/job006/tilt_series/TS_01.star", "tilt_series/TS_01.star"),
        ("Polish/job030/tilt_series/TS_01.star", "tilt_series/TS_01.star"),
        ("/data/proj/Polish/job030/tilt_series/a.star", "tilt_series/a.star"),
        ("Refine3D/job034/run_data.star", "run_data.star"),
        ("tilt_series/TS_01.star", None),
        ("Tomograms/job_tomo/tilt_series/x.star", None),
        ("job001/x.star", None),
    ],
)
def test_pipeline_post(old, post):
    assert _pipeline_post(old) == post


# ---------------------------------------------------------------------------- particle sets


def test_cets_particles_into_particle_data():
    s = read_tomogram_set(CETS / "Polish/job030/tomograms.star", project_dir=CETS)
    ps = read_particle_set(CETS / "Polish/job030/particles.star")
    assert ps.general == {"rlnTomoSubTomosAre2DStacks": 1}
    ts = s.tilt_series("TS_01", load_images=False)
    pdata = ps.for_tomogram(ts)
    assert pdata.n_particles == 200
    assert np.all((pdata.positions_px > -50) & (pdata.positions_px < 4050))
    r = pdata.rotations
    np.testing.assert_allclose(r @ np.swapaxes(r, 1, 2), np.broadcast_to(np.eye(3), r.shape), atol=1e-9)
    assert set(pdata.half_set.tolist()) <= {1, 2}
    # positions follow RELION's formula, origins rotated by the subtomogram matrix
    t = ps.particles.iloc[:5]
    sub = t[["rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi"]].to_numpy(float)
    a_sub = geometry.euler_zyz_matrix(sub[:, 0], sub[:, 1], sub[:, 2])
    o = t[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy(float)
    c = t[
        [
            "rlnCenteredCoordinateXAngst",
            "rlnCenteredCoordinateYAngst",
            "rlnCenteredCoordinateZAngst",
        ]
    ].to_numpy(float)
    expect = c / 1.35 + 2000.0 * np.array([1, 1, 0.5]) - np.einsum("nij,nj->ni", a_sub, o) / 1.35
    np.testing.assert_allclose(pdata.positions_px[:5], expect, atol=1e-9)


@pytest.mark.parametrize(
    "name", ["Select/job024/particles_removed.star", "Select/job077/particles_removed.star"]
)
def test_select_particle_tables(name):
    ps = read_particle_set(CETS / name)
    assert ps.optics is None and len(ps.tomogram_names()) >= 3
    ts = _fake_ts(ps.tomogram_names()[0], tomo=(4000, 4000, 2000), px=1.35)
    pdata = ps.for_tomogram(ts)
    assert pdata.n_particles == int((ps.particles["rlnTomoName"] == ts.name).sum())


def test_picks_names_generated(caplog):
    with caplog.at_level(logging.WARNING):
        ps = read_particle_set(RELION / "cylindra-relion5/Picks/job_picks/particles.star")
    assert "rlnTomoParticleName" in caplog.text
    names = ps.particles["rlnTomoParticleName"].tolist()
    assert names[0] == "TS_01/1" and len(set(names)) == len(names)
    ts = _fake_ts("TS_01", px=10.52, tomo=(84, 136, 44))
    with pytest.raises(InputError, match="rlnRandomSubset"):
        ps.for_tomogram(ts)
    pdata = ps.for_tomogram(ts, require_half_set=False)
    assert np.all(pdata.half_set == 1)
    np.testing.assert_allclose(pdata.rotations, np.broadcast_to(np.eye(3), pdata.rotations.shape))


def test_relion4_particles_pixel_coordinates():
    ps = read_particle_set(RELION / "relion2dynamo-relion4/refine.star")
    ts = _fake_ts("TS_115", px=1.329, tomo=(4000, 4000, 2000))
    pdata = ps.for_tomogram(ts)
    t = ps.particles
    coord = t[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(float)
    o = t[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy(float)
    np.testing.assert_allclose(pdata.positions_px, coord - o / 1.329, atol=1e-9)  # no +1
    # new positions are written RELION-5 style
    moved = ps.with_positions(ts, pdata.names, pdata.positions_px + 1.0)
    assert "rlnCoordinateX" not in moved.particles
    np.testing.assert_allclose(moved.particles["rlnOriginXAngst"], 0.0)
    np.testing.assert_allclose(moved.for_tomogram(ts).positions_px, pdata.positions_px + 1.0, atol=1e-9)


def test_warptools_particles_with_relion4_tomograms():
    s = read_tomogram_set(WARP / f"{WARP_STEM}_tomograms.star", project_dir=WARP)
    ps = read_particle_set(WARP / f"{WARP_STEM}.star")
    assert ps.check_tomograms(s.names) == []
    for name in s.names:
        pdata = ps.for_tomogram(s.tilt_series(name, load_images=False), require_half_set=False)
        assert pdata.n_particles == 10 and pdata.positions_px.shape == (10, 3)


def test_synthetic_particles_and_trajectories():
    s = read_tomogram_set(SYN / "Polish/job050/tomograms.star", project_dir=SYN)
    ts = s.tilt_series("TS_01", load_images=False)
    opt = read_optimisation_set(SYN / "Polish/job050/optimisation_set.star", project_dir=SYN)
    traj = read_trajectories(opt.trajectories_file)
    assert len(traj) == 24 and all(v.shape == (19, 3) for v in traj.values())
    ps = read_particle_set(opt.particles_file)
    pdata = ps.for_tomogram(ts, traj)
    assert pdata.trajectories_px.shape == (24, 19, 3)
    first = geometry.dose_order(ts.pre_exposure_e_per_ang2)[0]
    np.testing.assert_allclose(pdata.trajectories_px[:, first], 0.0)
    np.testing.assert_allclose(pdata.trajectories_px[0, 0], traj["TS_01/1"][0] / 8.0)


def test_trajectories_round_trip(tmp_path):
    src = read_trajectories(SYN / "Polish/job050/motion.star")
    write_trajectories(tmp_path / "motion.star", src)
    back = read_trajectories(tmp_path / "motion.star")
    assert list(back) == list(src)
    for k in src:
        np.testing.assert_allclose(back[k], src[k], atol=6e-6)
    assert read_star(tmp_path / "motion.star")["general"] == {"rlnParticleNumber": 24}


def test_trajectories_direct_reader_equals_the_general_one(tmp_path, monkeypatch):
    """motion.star as RELION writes it is parsed directly; the general (starfile) reader gives the
    same arrays, and what the direct parser does not recognise still reads (or fails) as before."""
    from polish3d.io.relion import motion

    src = SYN / "Polish/job050/motion.star"
    assert motion._read_plain_trajectories(src) is not None
    direct = read_trajectories(src)
    with monkeypatch.context() as m:
        m.setattr(motion, "_read_plain_trajectories", lambda p: None)
        general = read_trajectories(src)
    assert list(direct) == list(general) and len(direct) == 24
    for k in general:
        np.testing.assert_array_equal(direct[k], general[k])
    # an extra string column: not plain numbers, read by the general reader, same trajectories
    text = src.read_text()
    lines = text.splitlines()
    labelled = []
    for line in lines:
        labelled.append(line)
        if line.strip().startswith("_rlnOriginZAngst"):
            labelled.append("_rlnNote #4")
    rows = [f"{line} note" if line.strip() and line.split()[0].lstrip("-")[:1].isdigit() else line
            for line in labelled]
    (tmp_path / "note.star").write_text("\n".join(rows) + "\n")
    assert motion._read_plain_trajectories(tmp_path / "note.star") is None
    noted = read_trajectories(tmp_path / "note.star")
    assert list(noted) == list(general)
    np.testing.assert_allclose(noted["TS_01/1"], general["TS_01/1"])
    # a non-finite value: the general reader names the column
    k = next(i for i, line in enumerate(lines) if line.strip() and line.split()[0].lstrip("-")[:1].isdigit())
    lines[k] = "nan " + " ".join(lines[k].split()[1:])
    (tmp_path / "bad.star").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="rlnOriginXAngst"):
        read_trajectories(tmp_path / "bad.star")


def test_particle_set_write_round_trip(tmp_path):
    ps = read_particle_set(SYN / "input/particles.star")
    s = read_tomogram_set(SYN / "input/tomograms.star", project_dir=SYN / "input")
    ts = s.tilt_series("TS_01", load_images=False)
    pdata = ps.for_tomogram(ts)
    moved = ps.with_positions(ts, pdata.names[:3], pdata.positions_px[:3] + [0.5, -0.25, 2.0])
    moved.write(tmp_path / "particles.star")
    back = read_particle_set(tmp_path / "particles.star")
    assert list(read_star(tmp_path / "particles.star")) == ["general", "optics", "particles"]
    assert list(back.particles.columns) == list(ps.particles.columns)
    p2 = back.for_tomogram(ts)
    np.testing.assert_allclose(p2.positions_px[:3], pdata.positions_px[:3] + [0.5, -0.25, 2.0], atol=1e-5)
    np.testing.assert_allclose(p2.positions_px[3:], pdata.positions_px[3:], atol=1e-5)
    np.testing.assert_allclose(p2.rotations, pdata.rotations, atol=1e-6)
    pd.testing.assert_series_equal(
        back.particles["rlnTomoVisibleFrames"], ps.particles["rlnTomoVisibleFrames"]
    )


def test_new_particle_set():
    rows = pd.DataFrame(
        {
            "rlnTomoName": ["A", "A", "B"],
            "rlnCenteredCoordinateXAngst": [0.0, 1.0, 2.0],
            "rlnCenteredCoordinateYAngst": [0.0, 1.0, 2.0],
            "rlnCenteredCoordinateZAngst": [0.0, 1.0, 2.0],
        }
    )
    ps = new_particle_set(rows, None, None)
    assert ps.particles["rlnTomoParticleName"].tolist() == ["A/1", "A/2", "B/1"]
    assert ps.general == {"rlnTomoSubTomosAre2DStacks": 1}


# ---------------------------------------------------------------------------- full new set


def test_write_new_optimisation_set_round_trip(small_project):
    out, ts, parts = small_project(n_tilts=6, n_particles=5)
    opt = read_optimisation_set(out / "optimisation_set.star", project_dir=out)
    assert opt.trajectories_file is None
    s = read_tomogram_set(opt.tomograms_file, project_dir=out)
    ts2 = s.tilt_series("TS_01")  # images exist: size from the stack header
    assert ts2.image_size_px == (32, 30) and ts2.image_files[2] == (
        str(out / "tilt_series/TS_01.mrcs"),
        2,
    )
    assert s.tilt_tables["TS_01"]["rlnMicrographName"].tolist()[0] == "1@tilt_series/TS_01.mrcs"
    x = np.random.default_rng(4).uniform(0, 40, (20, 3))
    d = geometry.project_points(ts2.projections, x) - geometry.project_points(ts.projections, x)
    assert np.abs(d).max() < 1e-4
    np.testing.assert_allclose(ts2.pre_exposure_e_per_ang2, ts.pre_exposure_e_per_ang2)
    np.testing.assert_allclose(ts2.defocus_u_ang, 20000.0)
    g = s.global_table
    for c in (
        "rlnTomoName",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnMicrographOriginalPixelSize",
        "rlnTomoHand",
        "rlnOpticsGroupName",
        "rlnTomoTiltSeriesPixelSize",
        "rlnTomoTiltSeriesStarFile",
        "rlnTomoSizeX",
        "rlnTomoTomogramBinning",
        "rlnTomoImportFractionalDose",
    ):
        assert c in g.columns, c
    assert "rlnCtfBfactorPerElectronDose" not in g.columns
    p2 = read_particle_set(opt.particles_file).for_tomogram(ts2)
    assert p2.names == parts.names
    np.testing.assert_allclose(p2.positions_px, parts.positions_px, atol=1e-5)
    np.testing.assert_allclose(p2.rotations, parts.rotations, atol=1e-5)
    np.testing.assert_array_equal(p2.half_set, parts.half_set)


def test_write_new_optimisation_set_extras(tmp_path):
    n = 4
    proj = geometry.projection_from_euler(
        np.zeros(n),
        np.linspace(-30, 30, n),
        np.full(n, 85.0),
        np.zeros(n),
        np.zeros(n),
        pixel_size_ang=5.0,
        image_size_px=(20, 20),
        tomo_size_px=(20, 20, 10),
    )
    ts = TiltSeriesData(
        name="T1",
        pixel_size_ang=5.0,
        tomo_size_px=(20, 20, 10),
        image_size_px=(20, 20),
        projections=proj,
        bfactor_per_dose_ang2=4.0,
        defocus_u_ang=np.full(n, 1e4),
        defocus_v_ang=np.full(n, 1e4),
        defocus_angle_deg=np.zeros(n),
        pre_exposure_e_per_ang2=np.arange(n) * 2.0,
    )
    from polish3d.model import ParticleData

    pdata = ParticleData(
        names=["T1/1", "T1/2"],
        positions_px=np.full((2, 3), 10.0),
        rotations=np.broadcast_to(np.eye(3), (2, 3, 3)).copy(),
        half_set=np.array([1, 2]),
        trajectories_px=np.ones((2, n, 3)),
    )
    out = write_new_optimisation_set(
        tmp_path / "sim",
        [ts],
        {"T1": pdata},
        tilt_tables_extra={"T1": pd.DataFrame({"rlnTomoNominalStageTiltAngle": np.linspace(-30, 30, n)})},
        particles_extra_columns={"T1": pd.DataFrame({"rlnTomoParticleId": [1, 2]})},
        references={"ref1": "reference/half1.mrc", "mask": tmp_path / "sim/reference/mask.mrc"},
    )
    kv = read_star(out)[""]
    assert kv["rlnTomoTrajectoriesFile"] == "motion.star"
    assert kv["rlnTomoReferenceMap1File"] == "reference/half1.mrc"
    assert kv["rlnTomoReferenceMaskFile"] == "reference/mask.mrc"
    tr = read_trajectories(tmp_path / "sim/motion.star")
    np.testing.assert_allclose(tr["T1/2"], 5.0)
    t = read_star(tmp_path / "sim/tilt_series/T1.star")["T1"]
    assert "rlnTomoNominalStageTiltAngle" in t.columns
    assert t["rlnMicrographName"].tolist()[1] == "2@tilt_series/T1.mrcs"
    g = read_star(tmp_path / "sim/tomograms.star")["global"]
    assert g["rlnCtfBfactorPerElectronDose"].tolist() == [4.0]
    p = read_star(tmp_path / "sim/particles.star")["particles"]
    assert p["rlnTomoParticleId"].tolist() == [1, 2] and p["rlnClassNumber"].tolist() == [1, 1]


# ---------------------------------------------------------------------------- MRC


def test_mrc_stack_and_map_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    stack = rng.normal(size=(3, 10, 12)).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", stack, 4.5)
    assert image_size(tmp_path / "s.mrcs") == (12, 10, 3)
    mm = open_stack(tmp_path / "s.mrcs")
    assert isinstance(mm, np.memmap) and mm.shape == (3, 10, 12)
    np.testing.assert_array_equal(np.asarray(mm), stack)
    vol = rng.normal(size=(8, 9, 10)).astype(np.float32)
    write_map(tmp_path / "v.mrc", vol, 2.25)
    v, vs = read_map(tmp_path / "v.mrc")
    assert v.dtype == np.float32 and vs == pytest.approx(2.25)
    np.testing.assert_array_equal(v, vol)
    with mrcfile.new(tmp_path / "img.mrc") as m:
        m.set_data(np.arange(20, dtype=np.int16).reshape(4, 5))
    one = open_stack(tmp_path / "img.mrc")
    assert one.shape == (1, 4, 5) and one[0, 1, 0] == 5
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["img.mrc", "s.mrcs", "v.mrc"]


def test_convention_reference_files():
    """The reduced convention-check case (tests/data/convention-check/README.md): float16 data."""
    half, vs = read_map(CC / "reference/half1.mrc")
    assert half.shape == (54, 54, 54) and half.dtype == np.float32 and vs == 8.0
    idx, fsc = read_fsc(CC / "reference/postprocess.star")
    assert idx[0] == 0 and len(idx) == len(fsc) == 33 and fsc[0] == pytest.approx(1.0)
    stack = open_stack(CC / "tilt_series/TS_01_lowdose.mrcs")
    assert stack.shape == (5, 256, 256) and stack.dtype == np.float16
    assert image_size(CC / "tilt_series/TS_01_lowdose.mrcs") == (256, 256, 5)


def test_relion_output_reproduced_byte_for_byte(tmp_path):
    """Reading RELION 5's relion_tomo_align output and writing it again gives the same bytes."""
    s = read_tomogram_set(SYN / "Polish/job050/tomograms.star", project_dir=SYN)
    out = s.write(tmp_path / "Polish/job050", project_dir=tmp_path)
    assert out.read_bytes() == (SYN / "Polish/job050/tomograms.star").read_bytes()
    rel = "Polish/job050/tilt_series/TS_01.star"
    assert (tmp_path / rel).read_bytes() == (SYN / rel).read_bytes()
    read_particle_set(SYN / "Polish/job050/particles.star").write(tmp_path / "particles.star")
    assert (tmp_path / "particles.star").read_bytes() == (SYN / "Polish/job050/particles.star").read_bytes()
    write_trajectories(tmp_path / "motion.star", read_trajectories(SYN / "Polish/job050/motion.star"))
    assert (tmp_path / "motion.star").read_bytes() == (SYN / "Polish/job050/motion.star").read_bytes()
    opt = read_optimisation_set(SYN / "Polish/job050/optimisation_set.star", project_dir=SYN)
    write_optimisation_set(tmp_path / "o.star", opt, project_dir=SYN)
    assert (tmp_path / "o.star").read_bytes() == (SYN / "Polish/job050/optimisation_set.star").read_bytes()


def test_tomogram_without_particles(small_project):
    out, ts, _ = small_project()
    ps = read_particle_set(out / "particles.star")
    empty = ps.for_tomogram(ts.replace(name="TS_02"))
    assert empty.n_particles == 0 and empty.positions_px.shape == (0, 3)
    assert empty.rotations.shape == (0, 3, 3)
