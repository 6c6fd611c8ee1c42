"""STAR reading/writing: RELION formatting and lossless round trips of every bundled fixture (tests/data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from polish3d.io.star import format_value, parse_vector, read_star, write_star

FIXTURES = Path(__file__).resolve().parent / "data"
STAR_FILES = sorted(FIXTURES.glob("**/*.star"))
RELION_FILES = sorted((FIXTURES / "relion").glob("**/*"))


def _assert_blocks_equal(a: dict, b: dict, what: str) -> None:
    assert list(a) == list(b), what
    for name in a:
        x, y = a[name], b[name]
        assert type(x) is type(y), (what, name)
        if isinstance(x, dict):
            assert list(x) == list(y), (what, name)
            for k in x:
                if isinstance(x[k], float):
                    assert isinstance(y[k], float)
                    assert y[k] == pytest.approx(x[k], rel=1e-5, abs=6e-6), (what, name, k)
                else:
                    assert type(x[k]) is type(y[k]) and x[k] == y[k], (what, name, k)
            continue
        assert list(x.columns) == list(y.columns), (what, name)
        assert len(x) == len(y), (what, name)
        for c in x.columns:
            if pd.api.types.is_float_dtype(x[c].dtype):
                assert pd.api.types.is_float_dtype(y[c].dtype), (what, name, c)
                np.testing.assert_allclose(y[c], x[c], rtol=1e-5, atol=6e-6, err_msg=f"{what} {c}")
            else:
                assert x[c].dtype == y[c].dtype, (what, name, c, x[c].dtype, y[c].dtype)
                assert x[c].tolist() == y[c].tolist(), (what, name, c)


def test_fixtures_present():
    assert len(STAR_FILES) >= 60


@pytest.mark.parametrize("path", RELION_FILES, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_every_relion_fixture_file_is_read(path):
    """Every file of tests/data/relion is read: STAR files parse, other files are text notes."""
    if path.is_dir():
        return
    if path.suffix == ".star":
        blocks = read_star(path)
        assert blocks
        for b in blocks.values():
            assert isinstance(b, dict | pd.DataFrame)
    else:
        assert path.read_text(encoding="utf-8").strip()


@pytest.mark.parametrize("path", STAR_FILES, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_star_round_trip(path, tmp_path):
    """write → read keeps every block, column, dtype and value (floats to printed precision)."""
    a = read_star(path)
    write_star(tmp_path / "out.star", a)
    b = read_star(tmp_path / "out.star")
    _assert_blocks_equal(a, b, str(path))
    # and a second pass is byte-stable
    write_star(tmp_path / "out2.star", b)
    assert (tmp_path / "out.star").read_bytes() == (tmp_path / "out2.star").read_bytes()


@pytest.mark.parametrize(
    "rel",
    [
        "Polish/job050/tomograms.star",
        "Polish/job050/optimisation_set.star",
        "Polish/job050/motion.star",
        "Polish/job050/particles.star",
        "Polish/job050/tilt_series/TS_01.star",
        "Polish/job051/tilt_series/TS_01.star",
    ],
)
def test_byte_identical_to_relion(rel, tmp_path):
    """Files written by RELION 5.0.1 are reproduced byte for byte."""
    src = FIXTURES / "relion/relion5-run-synthetic" / rel
    write_star(tmp_path / "x.star", read_star(src))
    assert (tmp_path / "x.star").read_bytes() == src.read_bytes()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.5, "    1.500000"),
        (-1.5, "    -1.50000"),
        (0.0, "    0.000000"),
        (0.0005, "5.000000e-04"),
        (-0.0005, "-5.00000e-04"),
        (123456.0, "1.234560e+05"),
        (-123456.0, "-1.23456e+05"),
        (100000.0, "100000.000000"),
        (7, "           7"),
        (np.int64(-3), "          -3"),
        (True, "           1"),
        ("TS_01", "TS_01"),
        ("", '""'),
        ("a b", '"a b"'),
        ([1.0, -0.5, 1 / 3], "[1,-0.5,0.333333333333]"),
        (np.array([1, 2, 3]), "[1,2,3]"),
        ([], "[]"),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_write_layout_and_types(tmp_path):
    df = pd.DataFrame(
        {
            "rlnTomoName": ["001", "TS_2"],
            "rlnTomoSizeX": np.array([4000, 10], dtype=np.int64),
            "rlnTomoHand": [-1.0, 1.0],
            "rlnTomoProjX": [[1.0, 0.0, 0.0, 2.5], np.array([0.1, 0.2, 0.3, 0.4])],
        }
    )
    kv = {"rlnTomoParticlesFile": "a/particles.star", "rlnParticleNumber": 3}
    write_star(tmp_path / "t.star", {"": kv, "global": df})
    text = (tmp_path / "t.star").read_text()
    assert text.startswith("\n# version 50001\n\ndata_\n\n_rlnTomoParticlesFile")
    assert "\n# version 50001\n\ndata_global\n\nloop_ \n_rlnTomoName #1 \n" in text
    assert "[1,0,0,2.5]" in text and "[0.1,0.2,0.3,0.4]" in text
    # key-value values aligned in one column
    lines = [ln for ln in text.splitlines() if ln.startswith("_") and "#" not in ln]
    assert len(lines) == 2
    start = 1 + len("rlnTomoParticlesFile") + 12  # RELION: "_" + longest label + setw(12)
    assert [ln[start:].strip() for ln in lines] == ["a/particles.star", "3"]
    assert {ln[start - 1] for ln in lines} == {" "}
    back = read_star(tmp_path / "t.star")
    g = back["global"]
    assert g["rlnTomoName"].tolist() == ["001", "TS_2"]  # string label stays a string
    assert pd.api.types.is_integer_dtype(g["rlnTomoSizeX"].dtype)
    assert pd.api.types.is_float_dtype(g["rlnTomoHand"].dtype)
    np.testing.assert_allclose(parse_vector(g["rlnTomoProjX"][1]), [0.1, 0.2, 0.3, 0.4])
    assert back[""] == kv


def test_atomic_write_leaves_no_temporary(tmp_path):
    write_star(tmp_path / "a.star", {"x": {"rlnParticleNumber": 1}})
    write_star(tmp_path / "a.star", {"x": {"rlnParticleNumber": 2}})
    assert [p.name for p in tmp_path.iterdir()] == ["a.star"]
    assert read_star(tmp_path / "a.star")["x"]["rlnParticleNumber"] == 2


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    """One atomic writer for STAR and MRC files: a failure leaves the old file and no temporary."""
    from polish3d.io import write_map
    from polish3d.io.star import atomic_write

    write_star(tmp_path / "a.star", {"x": {"rlnParticleNumber": 1}})
    before = (tmp_path / "a.star").read_bytes()

    def fail(tmp):
        Path(tmp).write_text("half written")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a.star", fail)
    with pytest.raises(ValueError):  # not a 3D array: refused before anything is written
        write_map(tmp_path / "m.mrc", np.zeros((2, 2)), 1.0)
    with pytest.raises(ValueError):  # a bad voxel size: fails after the data went to the temporary
        write_map(tmp_path / "m.mrc", np.zeros((2, 2, 2), np.float32), "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.star"]
    assert (tmp_path / "a.star").read_bytes() == before


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("[0.06,-0.99,-0.06,383.85]", [0.06, -0.99, -0.06, 383.85]),
        ("[1,2]", [1, 2]),
        ("[ 1, 2 ,3 ]", [1, 2, 3]),
        ("[1e-3,2.5E+02]", [1e-3, 250.0]),
        ([1, 2], [1, 2]),
        (np.arange(3.0), [0, 1, 2]),
        ("[]", []),
    ],
)
def test_parse_vector(cell, expected):
    np.testing.assert_allclose(parse_vector(cell), expected)


def test_parse_vector_rejects_garbage():
    with pytest.raises(ValueError):
        parse_vector("[a,b]")


def test_io_never_imports_jax():
    import subprocess
    import sys

    code = "import sys, polish3d.io; sys.exit(1 if 'jax' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_tests_read_only_bundled_data():
    """No test reaches outside the repository for data (a fresh clone must run every test)."""
    here = Path(__file__).resolve().parent
    word = "sha" + "red"  # spelt in pieces so that this file does not match itself
    outside = ["../" + word, word + "/fixtures", "parents[" + "2]", chr(34) + word + chr(34)]
    offenders = [
        f"{f.name}: {pat}"
        for f in sorted(here.glob("*.py"))
        for pat in outside
        if pat in f.read_text(encoding="utf-8")
    ]
    assert not offenders, offenders
    assert (here / "data" / "SOURCES.md").is_file()
