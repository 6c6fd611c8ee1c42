"""End-to-end geometry check against the convention-check fixture (true particle positions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from polish3d import geometry
from polish3d.io import read_optimisation_set, read_particle_set, read_tomogram_set

#: the reduced case: every STAR file and true position of the full one (tests/data/SOURCES.md)
CC = Path(__file__).resolve().parent / "data" / "convention-check"


def _projected_error(opt_file: Path, **kw) -> np.ndarray:
    opt = read_optimisation_set(opt_file, **kw)
    tomos = read_tomogram_set(opt.tomograms_file, **kw)
    particles = read_particle_set(opt.particles_file)
    particles.check_tomograms(tomos.names)
    truth = pd.read_csv(CC / "true_positions.csv")
    errors = []
    for name in tomos.names:
        # the 41-tilt stack is not bundled: the image size is the tomogram's (256², as the images)
        ts = tomos.tilt_series(name, load_images=False)
        assert ts.image_size_px == (256, 256)
        pdata = particles.for_tomogram(ts)
        uv = geometry.project_points(ts.projections, pdata.positions_px)  # (F, N, 2)
        col = {n: k for k, n in enumerate(pdata.names)}
        t = truth[truth["rlnMicrographName"].str.contains(name)]
        k = t["rlnTomoParticleName"].map(col).to_numpy()
        j = t["tilt_row"].to_numpy()
        # every listed particle × every tilt is in the truth table
        assert len(t) == pdata.n_particles * ts.n_tilts
        assert set(j) == set(range(ts.n_tilts))
        # the image named in the truth row is the image of that tilt row
        files = [f"{i + 1}@tilt_series/{Path(f).name}" for f, i in ts.image_files]
        assert t["rlnMicrographName"].tolist() == [files[r] for r in j]
        errors.append(np.hypot(uv[j, k, 0] - t["u_px"], uv[j, k, 1] - t["v_px"]))
    return np.concatenate(errors)


def test_truth_reproduces_true_positions():
    err = _projected_error(CC / "Truth/optimisation_set.star", project_dir=CC)
    assert len(err) == 40 * 41
    assert err.max() < 1e-3


def test_truth_from_project_cwd(monkeypatch):
    """RELION runs from the project folder: relative paths resolve against the cwd."""
    monkeypatch.chdir(CC)
    err = _projected_error(Path("Truth/optimisation_set.star"))
    assert err.max() < 1e-3


@pytest.mark.parametrize(
    ("opt", "rms_min"),
    [("optimisation_set.star", 4.0), ("Polish/job001/optimisation_set.star", 1.0)],
)
def test_input_and_relion_result_are_off(opt, rms_min):
    """The nominal input (≈5.2 px RMS) and RELION's result (≈2.6 px RMS) are not the truth."""
    err = _projected_error(CC / opt, project_dir=CC)
    assert np.sqrt(np.mean(err**2)) > rms_min
