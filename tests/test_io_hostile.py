"""Hostile inputs to the RELION readers (issue 11, items 2, 6 and 7): never a silently wrong
geometry, one clear InputError naming the file, block, column or line instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from _helpers import edit_tilt_table, one_line

from polish3d import geometry
from polish3d.errors import InputError
from polish3d.io import read_particle_set, read_star, read_tomogram_set, write_star
from polish3d.io.relion import EULER_LABELS, PROJ_LABELS, TILT_ANGLE_LABELS, TILT_SHIFT_LABELS

RELION_FIXTURES = Path(__file__).resolve().parent / "data" / "relion"


def _edit_global(project: Path, column: str, value) -> Path:
    g = read_star(project / "tomograms.star")["global"]
    g[column] = g[column].astype(object)
    g.loc[0, column] = value
    write_star(project / "tomograms.star", {"global": g})
    return project / "tomograms.star"


def _read(project: Path):
    return read_tomogram_set(project / "tomograms.star", project_dir=project).tilt_series("TS_01")


def _euler_projections(table, ts, *, zero_shift=()):
    """What RELION builds from the table's columns (shifts in ``zero_shift`` taken as 0)."""
    v = {c: (np.zeros(len(table)) if c in zero_shift else table[c].to_numpy(float)) for c in EULER_LABELS}
    return geometry.projection_from_euler(
        *(v[c] for c in EULER_LABELS),
        pixel_size_ang=ts.pixel_size_ang,
        image_size_px=ts.image_size_px,
        tomo_size_px=ts.tomo_size_px,
    )


# --------------------------------------------------------------------------- per-tilt geometry


@pytest.mark.parametrize(
    "drop", [TILT_SHIFT_LABELS, TILT_SHIFT_LABELS[:1], TILT_SHIFT_LABELS[1:]], ids=["both", "x", "y"]
)
def test_missing_shift_columns_are_zero_with_a_warning(small_project, caplog, drop):
    """A table with XTilt/YTilt/ZRot but no shift column(s) (WarpTools writes such tables) keeps
    its angles: the shifts default to 0 Å with a warning naming the file and the columns."""
    out, ts, _ = small_project()
    table = read_star(out / "tilt_series/TS_01.star")["TS_01"]
    edit_tilt_table(out, lambda t: t.drop(columns=list(drop)))
    with caplog.at_level(logging.WARNING, logger="polish3d"):
        got = _read(out)
    warned = [r.getMessage() for r in caplog.records if "0 Å" in r.getMessage()]
    assert len(warned) == 1
    assert "tilt_series/TS_01.star" in warned[0] and "data_TS_01" in warned[0]
    assert all(c in warned[0] for c in drop)
    assert not any(c in warned[0] for c in TILT_SHIFT_LABELS if c not in drop)
    expected = _euler_projections(table, ts, zero_shift=drop)
    np.testing.assert_allclose(got.projections, expected, atol=1e-9)
    # the angles are used (not identity) and the shift present is kept
    assert np.abs(got.projections[:, :3, :3] - np.eye(3)).max() > 0.1
    np.testing.assert_allclose(got.projections[:, :3, :3], ts.projections[:, :3, :3], atol=1e-5)


def test_angles_without_shifts_point_where_the_angles_say(small_project):
    """End to end: with zero true shifts, dropping the shift columns loses nothing."""
    out, ts, _ = small_project()
    edit_tilt_table(out, lambda t: t.assign(rlnTomoXShiftAngst=0.0, rlnTomoYShiftAngst=0.0))
    full = _read(out)
    edit_tilt_table(out, lambda t: t.drop(columns=list(TILT_SHIFT_LABELS)))
    x = np.array([[20.0, 18.0, 10.0], [5.0, 30.0, 2.0]])
    np.testing.assert_allclose(
        geometry.project_points(_read(out).projections, x),
        geometry.project_points(full.projections, x),
        atol=1e-9,
    )


@pytest.mark.parametrize("column", TILT_ANGLE_LABELS)
def test_missing_angle_column_is_an_error(small_project, column):
    out, _, _ = small_project()
    edit_tilt_table(out, lambda t: t.drop(columns=[column]))
    with pytest.raises(InputError) as e:
        _read(out)
    msg = one_line(e)
    assert f"missing column {column}" in msg
    assert "tilt_series/TS_01.star" in msg and "data_TS_01" in msg


def test_shifts_without_angles_is_an_error(small_project):
    out, _, _ = small_project()
    edit_tilt_table(out, lambda t: t.drop(columns=list(TILT_ANGLE_LABELS)))
    with pytest.raises(InputError) as e:
        _read(out)
    msg = one_line(e)
    assert "missing column rlnTomoXTilt" in msg and "rlnTomoXShiftAngst" in msg
    assert "TS_01.star" in msg


def test_incomplete_projection_matrices_are_an_error(small_project):
    out, ts, _ = small_project()

    def add_some(t):
        for r, lab in enumerate(PROJ_LABELS[:3]):
            t[lab] = [list(ts.projections[j, r]) for j in range(len(t))]
        return t

    edit_tilt_table(out, add_some)
    with pytest.raises(InputError) as e:
        _read(out)
    msg = one_line(e)
    assert "rlnTomoProjW missing" in msg and "TS_01.star" in msg


def test_matrices_take_precedence_over_euler_columns(small_project):
    """RELION 4/WarpTools tables: rlnTomoProjX..W are read as they are, whatever else is there."""
    out, ts, _ = small_project()
    p = ts.projections.copy()
    p[:, :2, 3] += 7.0  # disagree with the Euler columns on purpose

    def add(t):
        for r, lab in enumerate(PROJ_LABELS):
            t[lab] = [list(p[j, r]) for j in range(len(t))]
        return t.drop(columns=list(TILT_SHIFT_LABELS))

    edit_tilt_table(out, add)
    np.testing.assert_allclose(_read(out).projections, p, atol=1e-9)


def test_unaligned_table_is_an_error(small_project):
    """Nominal tilt angles but no alignment: not read as identity projections."""
    out, _, _ = small_project()

    def unaligned(t):
        t = t.drop(columns=list(EULER_LABELS))
        t["rlnTomoNominalStageTiltAngle"] = np.linspace(-30, 30, len(t))
        return t

    edit_tilt_table(out, unaligned)
    with pytest.raises(InputError) as e:
        _read(out)
    msg = one_line(e)
    assert "not been aligned" in msg and "rlnTomoNominalStageTiltAngle" in msg
    assert "TS_01.star" in msg


def test_no_geometry_at_all_is_identity_with_a_warning(small_project, caplog):
    out, _, _ = small_project()
    edit_tilt_table(out, lambda t: t.drop(columns=list(EULER_LABELS)))
    with caplog.at_level(logging.WARNING, logger="polish3d"):
        ts = _read(out)
    assert "identity" in caplog.text and "TS_01.star" in caplog.text
    np.testing.assert_array_equal(ts.projections, np.broadcast_to(np.eye(4), ts.projections.shape))


def test_warptools_relion4_tables_are_read_as_matrices(tmp_path):
    """The WarpTools fixture has rlnTomoProjX..W only (no Euler or shift column)."""
    stem = "warptools_test_4-tomos_10-ptcls_box-32_angpix-12_tomograms.star"
    src = RELION_FIXTURES / "tomodrgn-warptools" / stem
    s = read_tomogram_set(src, project_dir=tmp_path)
    table = s.tilt_tables["Unt_083.tomostar"]
    assert not any(c in table.columns for c in EULER_LABELS)
    ts = s.tilt_series("Unt_083.tomostar", load_images=False)
    first = read_star(src)["Unt_083.tomostar"]["rlnTomoProjX"].iloc[0]
    np.testing.assert_allclose(ts.projections[0, 0], [float(v) for v in first.strip("[]").split(",")])
    assert ts.n_tilts == 37


# --------------------------------------------------------------------------- pixel and tomogram size


@pytest.mark.parametrize("value", [0.0, -8.0, np.nan, np.inf], ids=["zero", "negative", "nan", "inf"])
def test_bad_pixel_size_in_tomograms_star(small_project, value):
    """Refused on reading the set (not after refining the tomograms before it)."""
    out, _, _ = small_project()
    _edit_global(out, "rlnTomoTiltSeriesPixelSize", value)
    with pytest.raises(InputError) as e:
        read_tomogram_set(out / "tomograms.star", project_dir=out)
    msg = one_line(e)
    assert "tomograms.star (block data_global): column rlnTomoTiltSeriesPixelSize" in msg
    if np.isfinite(value):
        assert f"must be a positive pixel size in Å/px, got {value}" in msg
    else:
        assert f"non-finite or non-numeric value {value} in row 1" in msg


@pytest.mark.parametrize("value", [0.0, np.nan])
def test_bad_pixel_size_of_a_set_changed_in_memory(small_project, value):
    """The per-tomogram readers and the geometry writer check it too."""
    out, ts, _ = small_project()
    s = read_tomogram_set(out / "tomograms.star", project_dir=out)
    s.global_table["rlnTomoTiltSeriesPixelSize"] = value
    expected = r"tomograms.star \(tomogram TS_01\): column rlnTomoTiltSeriesPixelSize"
    with pytest.raises(InputError, match=expected):
        s.tilt_series("TS_01")
    with pytest.raises(InputError, match=expected):
        s.with_tilt_series("TS_01", ts.projections)


@pytest.mark.parametrize("column", ["rlnTomoSizeX", "rlnTomoSizeZ"])
def test_zero_tomogram_size(small_project, column):
    out, _, _ = small_project()
    _edit_global(out, column, 0)
    with pytest.raises(InputError) as e:
        read_tomogram_set(out / "tomograms.star", project_dir=out)
    msg = one_line(e)
    assert f"column {column} must be a positive tomogram size in pixels, got 0" in msg


@pytest.mark.parametrize("value", [0.0, -10.0])
def test_bad_pixel_size_in_optics(small_project, value):
    out, ts, _ = small_project()
    blocks = read_star(out / "particles.star")
    good = blocks["optics"].copy()
    blocks["optics"].loc[0, "rlnTomoTiltSeriesPixelSize"] = value
    write_star(out / "particles.star", blocks)
    with pytest.raises(InputError) as e:
        read_particle_set(out / "particles.star")
    msg = one_line(e)
    assert "particles.star (block data_optics)" in msg
    assert f"rlnTomoTiltSeriesPixelSize must be a positive pixel size in Å/px, got {value}" in msg
    # and where the pixel sizes are used, for a set changed in memory
    write_star(out / "particles.star", dict(blocks, optics=good))
    ps = read_particle_set(out / "particles.star")
    ps.optics = blocks["optics"]
    with pytest.raises(InputError, match=r"data_optics.*must be a positive pixel size"):
        ps.for_tomogram(ts)


# --------------------------------------------------------------------------- truncated rows


def test_truncated_last_row_of_a_tilt_table(small_project):
    out, _, _ = small_project()
    f = out / "tilt_series/TS_01.star"
    lines = f.read_text().rstrip("\n ").split("\n")
    n_lines = len(lines)
    cut = lines[-1][: len(lines[-1]) // 2].rstrip()
    f.write_text("\n".join(lines[:-1] + [cut]) + "\n")
    with pytest.raises(InputError) as e:
        read_tomogram_set(out / "tomograms.star", project_dir=out)
    msg = one_line(e)
    assert "TS_01.star" in msg and "data_TS_01" in msg and f"line {n_lines}" in msg
    assert "truncated row" in msg and "cut short" in msg
    assert "non-finite" not in msg


def test_short_row_inside_a_particle_table(small_project):
    out, _, _ = small_project()
    f = out / "particles.star"
    lines = f.read_text().split("\n")
    k = next(i for i, ln in enumerate(lines) if ln.strip().startswith("TS_01"))
    lines[k] = " ".join(lines[k].split()[:-2])
    f.write_text("\n".join(lines))
    with pytest.raises(InputError) as e:
        read_particle_set(f)
    msg = one_line(e)
    assert f"particles.star (block data_particles), line {k + 1}: short row" in msg
    assert "cut short" not in msg


def test_long_row_and_quoted_values(tmp_path):
    f = tmp_path / "q.star"
    f.write_text('data_t\n\nloop_\n_rlnTomoName #1\n_rlnA #2\n"a b" 1\n\'c d\' 2\nx 3 4\n')
    long_row = r"q.star \(block data_t\), line 8: long row with 3 values, expected 2"
    with pytest.raises(InputError, match=long_row):
        read_star(f)
    f.write_text('data_t\n\nloop_\n_rlnTomoName #1\n_rlnA #2\n"a b" 1\n\'c d\' 2\n')
    assert read_star(f)["t"]["rlnTomoName"].tolist() == ["a b", "c d"]


def test_non_numeric_value_is_printed_plainly(small_project):
    out, _, _ = small_project()

    def poison(t):
        t["rlnDefocusV"] = t["rlnDefocusV"].astype(object)
        t.loc[1, "rlnDefocusV"] = "nan"
        return t

    edit_tilt_table(out, poison)
    with pytest.raises(InputError) as e:
        _read(out)
    msg = one_line(e)
    assert "column rlnDefocusV has a non-finite or non-numeric value nan in row 2" in msg


def test_cli_pixel_size_zero_is_a_clear_error(small_project, tmp_path, monkeypatch):
    """`polish3d align` on a set with pixel size 0: exit 2 and one line naming file and column
    (it used to end in ``LinAlgError: SVD did not converge``); the inputs are not touched."""
    import hashlib

    from typer.testing import CliRunner

    from polish3d.cli import app
    from polish3d.io import write_map

    out, _, _ = small_project()
    _edit_global(out, "rlnTomoTiltSeriesPixelSize", 0.0)
    rng = np.random.default_rng(0)
    for name in ("half1", "half2"):
        write_map(out / f"{name}.mrc", rng.normal(size=(16, 16, 16)).astype(np.float32), 10.0)
    inputs = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs}
    monkeypatch.chdir(out)
    res = CliRunner().invoke(
        app,
        ["align", "--i", "optimisation_set.star", "--ref1", "half1.mrc", "--ref2", "half2.mrc",
         "--b", "16", "--r", "2", "--j", "1", "--o", str(tmp_path / "job")],
    )
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "LinAlgError" not in res.output
    assert "tomograms.star (block data_global): column rlnTomoTiltSeriesPixelSize must be a " \
           "positive pixel size in Å/px, got 0.0" in res.output
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs} == before
