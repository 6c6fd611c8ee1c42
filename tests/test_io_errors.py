"""Bad input gives one clear InputError naming the file, block, column and what was expected."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from _helpers import edit_tilt_table, one_line

from polish3d.errors import InputError
from polish3d.io import (
    image_size,
    open_stack,
    read_fsc,
    read_map,
    read_optimisation_set,
    read_particle_set,
    read_star,
    read_tomogram_set,
    read_trajectories,
    write_stack,
    write_star,
)

RELION = Path(__file__).resolve().parent / "data" / "relion"
SYN = RELION / "relion5-run-synthetic"


# --------------------------------------------------------------------------- missing files


def test_missing_star_file(tmp_path):
    with pytest.raises(InputError, match="nope.star") as e:
        read_star(tmp_path / "nope.star")
    one_line(e)
    with pytest.raises(InputError, match="nope.star"):
        read_optimisation_set(tmp_path / "nope.star")


def test_missing_per_tilt_file(small_project):
    out, _, _ = small_project()
    (out / "tilt_series/TS_01.star").unlink()
    with pytest.raises(InputError) as e:
        read_tomogram_set(out / "tomograms.star", project_dir=out)
    msg = one_line(e)
    assert "tilt_series/TS_01.star" in msg and "referenced from" in msg and "tomograms.star" in msg


def test_missing_image_file():
    s = read_tomogram_set(SYN / "input/tomograms.star", project_dir=SYN / "input")
    with pytest.raises(InputError) as e:
        s.tilt_series("TS_01", load_images=True)
    msg = one_line(e)
    assert "tilt_series/TS_01.mrcs" in msg and "referenced from" in msg
    assert msg.rstrip(")").endswith("input/tilt_series/TS_01.star")
    # without images the tomogram size stands in (documented fallback)
    assert s.tilt_series("TS_01", load_images=False).image_size_px == (384, 384)


def test_unparseable_star(tmp_path):
    f = tmp_path / "bad.star"
    f.write_text("data_x\n\nloop_\n_rlnA #1\n_rlnB #2\n1 2\n3 4 5 6\n")
    with pytest.raises(InputError, match="bad.star") as e:
        read_star(f)
    one_line(e)


def test_not_an_optimisation_set(tmp_path):
    write_star(tmp_path / "o.star", {"": {"rlnFoo": 1}})
    with pytest.raises(InputError, match="rlnTomoParticlesFile"):
        read_optimisation_set(tmp_path / "o.star")


# --------------------------------------------------------------------------- missing columns


@pytest.mark.parametrize("column", ["rlnMicrographPreExposure", "rlnDefocusU", "rlnDefocusAngle"])
def test_missing_mandatory_tilt_column(small_project, column):
    out, _, _ = small_project()
    tomos = edit_tilt_table(out, lambda t: t.drop(columns=[column]))
    with pytest.raises(InputError) as e:
        read_tomogram_set(tomos, project_dir=out).tilt_series("TS_01")
    msg = one_line(e)
    assert column in msg and "TS_01.star" in msg and "data_TS_01" in msg


def test_missing_global_column(small_project):
    out, _, _ = small_project()
    g = read_star(out / "tomograms.star")["global"].drop(columns=["rlnTomoSizeZ"])
    write_star(out / "tomograms.star", {"global": g})
    with pytest.raises(InputError, match=r"tomograms.star.*data_global.*rlnTomoSizeZ"):
        read_tomogram_set(out / "tomograms.star", project_dir=out).tilt_series("TS_01")


def test_missing_half_set_column(small_project):
    out, ts, _ = small_project()
    blocks = read_star(out / "particles.star")
    blocks["particles"] = blocks["particles"].drop(columns=["rlnRandomSubset"])
    write_star(out / "particles.star", blocks)
    ps = read_particle_set(out / "particles.star")
    with pytest.raises(InputError) as e:
        ps.for_tomogram(ts)
    msg = one_line(e)
    assert "particles.star" in msg and "rlnRandomSubset" in msg and "data_particles" in msg
    assert ps.for_tomogram(ts, require_half_set=False).half_set.tolist() == [1, 1, 1, 1]


def test_missing_particle_coordinates(tmp_path):
    import pandas as pd

    write_star(tmp_path / "p.star", {"particles": pd.DataFrame({"rlnTomoName": ["a"]})})
    with pytest.raises(InputError, match="rlnCenteredCoordinateX"):
        read_particle_set(tmp_path / "p.star")


def test_missing_fsc_column(tmp_path):
    import pandas as pd

    write_star(tmp_path / "pp.star", {"fsc": pd.DataFrame({"rlnSpectralIndex": [0, 1]})})
    with pytest.raises(InputError, match="rlnFourierShellCorrelationCorrected"):
        read_fsc(tmp_path / "pp.star")


def test_missing_trajectory_columns(tmp_path):
    import pandas as pd

    write_star(
        tmp_path / "m.star",
        {"general": {"rlnParticleNumber": 1}, "a/1": pd.DataFrame({"rlnOriginXAngst": [0.0]})},
    )
    with pytest.raises(InputError, match=r"data_a/1.*rlnOriginYAngst"):
        read_trajectories(tmp_path / "m.star")


# --------------------------------------------------------------------------- tilt counts


def test_tilt_count_mismatch_stack(small_project):
    out, _, _ = small_project(n_tilts=5)
    write_stack(out / "tilt_series/TS_01.mrcs", np.zeros((4, 30, 32), np.float32), 10.0)
    with pytest.raises(InputError) as e:
        read_tomogram_set(out / "tomograms.star", project_dir=out).tilt_series("TS_01")
    msg = one_line(e)
    assert "tilt-count mismatch" in msg and "TS_01.mrcs" in msg and "4 images" in msg


def test_tilt_count_mismatch_relion4_frame_count(tmp_path):
    stem = "warptools_test_4-tomos_10-ptcls_box-32_angpix-12_tomograms.star"
    blocks = read_star(RELION / "tomodrgn-warptools" / stem)
    blocks["global"].loc[0, "rlnTomoFrameCount"] = 36
    write_star(tmp_path / "tomograms.star", blocks)
    s = read_tomogram_set(tmp_path / "tomograms.star", project_dir=tmp_path)
    with pytest.raises(InputError, match=r"37 tilts.*rlnTomoFrameCount = 36"):
        s.tilt_series("Unt_083.tomostar", load_images=False)


def test_trajectory_length_mismatch(small_project):
    out, ts, parts = small_project(n_tilts=5)
    ps = read_particle_set(out / "particles.star")
    traj = {n: np.zeros((4, 3)) for n in parts.names}
    with pytest.raises(InputError, match=r"TS_01/1.*\(5, 3\)"):
        ps.for_tomogram(ts, traj)
    with pytest.raises(InputError, match="no trajectory"):
        ps.for_tomogram(ts, {})


# --------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("column", ["rlnTomoYTilt", "rlnTomoXShiftAngst", "rlnDefocusV"])
def test_non_finite_geometry(small_project, column):
    out, _, _ = small_project()

    def poison(t):
        t[column] = t[column].astype(float)
        t.loc[2, column] = np.nan
        return t

    tomos = edit_tilt_table(out, poison)
    with pytest.raises(InputError) as e:
        read_tomogram_set(tomos, project_dir=out).tilt_series("TS_01")
    msg = one_line(e)
    assert column in msg and "row 3" in msg and "TS_01.star" in msg


def test_non_finite_matrix(small_project):
    out, ts, _ = small_project()

    def add_matrix(t):
        for r, lab in enumerate(("rlnTomoProjX", "rlnTomoProjY", "rlnTomoProjZ", "rlnTomoProjW")):
            t[lab] = [list(ts.projections[j, r]) for j in range(len(t))]
        t.loc[1, "rlnTomoProjY"] = "[nan,0,0,1]"
        return t

    tomos = edit_tilt_table(out, add_matrix)
    with pytest.raises(InputError, match="non-finite value in rlnTomoProj"):
        read_tomogram_set(tomos, project_dir=out).tilt_series("TS_01")


def test_non_finite_particle_coordinate(small_project):
    out, _, _ = small_project()
    blocks = read_star(out / "particles.star")
    blocks["particles"].loc[1, "rlnCenteredCoordinateYAngst"] = np.inf
    write_star(out / "particles.star", blocks)
    with pytest.raises(InputError, match=r"rlnCenteredCoordinateYAngst.*row 2"):
        read_particle_set(out / "particles.star")


# --------------------------------------------------------------------------- particles


def test_particles_of_unknown_tomograms(small_project, caplog):
    out, _, _ = small_project()
    blocks = read_star(out / "particles.star")
    blocks["particles"].loc[0, "rlnTomoName"] = "TS_99"
    write_star(out / "particles.star", blocks)
    ps = read_particle_set(out / "particles.star")
    with caplog.at_level(logging.WARNING):
        assert ps.check_tomograms(["TS_01"]) == ["TS_99"]
    assert "TS_99" in caplog.text and "kept" in caplog.text
    with pytest.raises(InputError, match=r"no particle belongs.*TS_99"):
        ps.check_tomograms(["TS_02"])


def test_duplicate_particle_names(small_project):
    out, _, _ = small_project()
    blocks = read_star(out / "particles.star")
    blocks["particles"].loc[2, "rlnTomoParticleName"] = "TS_01/1"
    write_star(out / "particles.star", blocks)
    with pytest.raises(InputError) as e:
        read_particle_set(out / "particles.star")
    assert "duplicate rlnTomoParticleName TS_01/1" in one_line(e)


def test_duplicate_tomogram_names(small_project):
    out, _, _ = small_project()
    g = read_star(out / "tomograms.star")["global"]
    import pandas as pd

    write_star(out / "tomograms.star", {"global": pd.concat([g, g], ignore_index=True)})
    with pytest.raises(InputError, match="duplicate rlnTomoName TS_01"):
        read_tomogram_set(out / "tomograms.star", project_dir=out)


def test_bad_half_set_values(small_project):
    out, ts, _ = small_project()
    blocks = read_star(out / "particles.star")
    blocks["particles"].loc[0, "rlnRandomSubset"] = 3
    write_star(out / "particles.star", blocks)
    with pytest.raises(InputError, match=r"rlnRandomSubset must be 1 or 2.*\[3\]"):
        read_particle_set(out / "particles.star").for_tomogram(ts)


# --------------------------------------------------------------------------- MRC


def test_unreadable_mrc(tmp_path):
    short = tmp_path / "short.mrc"
    short.write_bytes(b"not an mrc file")
    garbage = tmp_path / "garbage.mrcs"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    for f in (short, garbage):
        for fn in (open_stack, read_map):
            with pytest.raises(InputError, match=f.name) as e:
                fn(f)
            one_line(e)
    with pytest.raises(InputError, match="short.mrc"):
        image_size(short)
    with pytest.raises(InputError, match="not found"):
        open_stack(tmp_path / "absent.mrcs")


def test_truncated_stack(tmp_path):
    f = tmp_path / "s.mrcs"
    write_stack(f, np.zeros((4, 8, 8), np.float32), 1.0)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(InputError, match="truncated"):
        open_stack(f)
