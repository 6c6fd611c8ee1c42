"""Helpers shared by the test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from polish3d.io.star import read_star, write_star


def one_line(exc: pytest.ExceptionInfo) -> str:
    """The message of a raised error, checked to be one clean line (no NumPy scalar reprs)."""
    msg = str(exc.value)
    assert "\n" not in msg
    assert "np.float64" not in msg and "np.int64" not in msg
    return msg


def edit_tilt_table(project: Path, edit) -> Path:
    """Rewrite ``tilt_series/TS_01.star`` of a small project as ``edit(table)``; returns its
    ``tomograms.star``."""
    f = project / "tilt_series/TS_01.star"
    t = read_star(f)["TS_01"]
    write_star(f, {"TS_01": edit(t)})
    return project / "tomograms.star"
