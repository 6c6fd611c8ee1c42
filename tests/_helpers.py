"""Helpers shared by the test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from polish3d.io.star import read_star, write_star

#: the CLI in a fresh interpreter: ``[sys.executable, "-c", CLI_MAIN, "align", ...]``
CLI_MAIN = "import sys; from polish3d.cli import main; sys.argv[0] = 'polish3d'; main()"


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


# ----------------------------------------------------------------------------------------------
# an independent NumPy spelling of RELION's deformation models (spec §4), only as a cross-check
# of the refinement's JAX model (polish3d.refine.deformation), which is what polish3d runs
# ----------------------------------------------------------------------------------------------


def _spline(coeffs, grid, image_size, pts):
    gw, gh = grid
    w, h = image_size
    c = np.asarray(coeffs, dtype=np.float64).reshape(2, gh, gw, 4)
    spacing = np.array([w / (gw - 1), h / (gh - 1)])
    g = pts / spacing
    eps = 1e-10
    g = np.clip(g, 0.0, np.array([gw - 1 - eps, gh - 1 - eps]))
    cell = np.floor(g).astype(int)
    fr = g - cell

    def basis(t):
        t2, t3 = t * t, t * t * t
        return np.stack([1 - 3 * t2 + 2 * t3, 3 * t2 - 2 * t3, t - 2 * t2 + t3, -t2 + t3], -1)

    vx, vy = basis(fr[:, 0]), basis(fr[:, 1])
    cx, cy = cell[:, 0], cell[:, 1]
    out = np.zeros_like(pts, dtype=np.float64)
    for dim in range(2):
        d00 = c[dim, cy, cx]
        d01 = c[dim, cy + 1, cx]
        d10 = c[dim, cy, cx + 1]
        d11 = c[dim, cy + 1, cx + 1]
        # F rows: (x-corner 0 values, x-corner 1 values, x-corner 0 x-slopes, x-corner 1 x-slopes)
        f = np.stack(
            [
                np.stack([d00[:, 0], d01[:, 0], d00[:, 2], d01[:, 2]], -1),
                np.stack([d10[:, 0], d11[:, 0], d10[:, 2], d11[:, 2]], -1),
                np.stack([d00[:, 1], d01[:, 1], d00[:, 3], d01[:, 3]], -1),
                np.stack([d10[:, 1], d11[:, 1], d10[:, 3], d11[:, 3]], -1),
            ],
            -2,
        )
        out[:, dim] = np.einsum("ni,nij,nj->n", vx, f, vy)
    return out


def _fourier_freqs(grid):
    gw, gh = grid
    freqs = []
    for iy in range(gh):
        if iy < gh // 2:
            for ix in range(0 if iy > 0 else 1, gw // 2 + 1):
                freqs.append((ix, iy))
        else:
            for ix in range(1, gw // 2 + 1):
                freqs.append((ix, iy - gh))
    return np.asarray(freqs, dtype=np.float64).reshape(-1, 2)


def _fourier(coeffs, grid, image_size, pts):
    w, h = image_size
    fr = _fourier_freqs(grid)
    k = fr * np.array([np.pi / w, np.pi / h])
    c = np.asarray(coeffs, dtype=np.float64).reshape(2, len(fr), 2)
    ph = pts @ k.T  # (n, n_freq)
    cos, sin = np.cos(ph), np.sin(ph)
    return np.stack([cos @ c[d, :, 0] + sin @ c[d, :, 1] for d in range(2)], -1)


def _linear(coeffs, image_size, pts):
    a = np.asarray(coeffs, dtype=np.float64)
    r = pts - np.array([image_size[0] / 2.0, image_size[1] / 2.0])
    return np.stack([a[0] * r[:, 0], a[1] * r[:, 0] + a[2] * r[:, 1]], -1)


def reference_deformation(deformation, image_size_px, points_px, tilt: int):
    """NumPy spelling of ``polish3d.score.evaluate_deformation`` (same arguments and result),
    written from RELION's layouts independently of the JAX model."""
    pts = np.asarray(points_px, dtype=np.float64).reshape(-1, 2)
    if deformation is None:
        return np.zeros_like(pts)
    c = np.asarray(deformation.coefficients)[tilt]
    if deformation.model == "spline":
        return _spline(c, deformation.grid_size, image_size_px, pts)
    if deformation.model == "Fourier":
        return _fourier(c, deformation.grid_size, image_size_px, pts)
    if deformation.model == "linear":
        return _linear(c, image_size_px, pts)
    raise ValueError(f"unknown deformation model {deformation.model!r}")


#: pixel size (Å) of :func:`tiny_simulation`
TINY_PIXEL_ANG = 16.0


def tiny_simulation(directory, *, n_particles: int, image_px: int, tilt_step_deg: float,
                    n_tomograms: int = 1, n_unlisted: int = 0, seed: int = 3):
    """A small simulated set in ``directory/sim`` (±30°, box 32 at 16 Å/px, 48 px thick, shift
    errors 2 px, position errors 1.5 px); returns the simulation."""
    from polish3d.simulate import SimulationConfig, simulate

    cfg = SimulationConfig(
        n_tomograms=n_tomograms, n_particles=n_particles, n_unlisted=n_unlisted,
        image_size_px=(image_px, image_px), tilt_min_deg=-30, tilt_max_deg=30,
        tilt_step_deg=tilt_step_deg, tomo_thickness_px=48, pixel_size_ang=TINY_PIXEL_ANG, box_px=32,
        shift_err_px=2.0, position_err_px=1.5, seed=seed,
    )
    return simulate(cfg, Path(directory) / "sim")


def tiny_refinement_problem(directory, n_particles: int, image_px: int, tilt_step_deg: float):
    """A one-tomogram simulated set (:func:`tiny_simulation`, 2 unlisted particles, seed 3) and
    what ``refine_tomogram`` takes: ``(sim, stack, refs_ft, envelope)``."""
    from polish3d.io import mrc
    from polish3d.refine import tomogram

    sim = tiny_simulation(directory, n_particles=n_particles, image_px=image_px,
                          tilt_step_deg=tilt_step_deg, n_unlisted=2)
    stack = np.asarray(mrc.open_stack(sim.tilt_series[0].image_files[0][0]))
    halves = [np.asarray(mrc.read_map(sim.out_dir / f"reference/half{i}.mrc")[0]) for i in (1, 2)]
    refs, (idx, fsc) = tomogram.prepare_references(*halves, 32)
    env = tomogram.reference_envelope(idx, fsc, 32, TINY_PIXEL_ANG)
    return sim, stack, refs, env
