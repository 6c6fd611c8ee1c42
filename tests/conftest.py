"""Shared pytest fixtures (keep small)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

#: Test data bundled with the repository (see tests/data/SOURCES.md). Tests that need it use it
#: unconditionally: a missing file is a failure, never a skip.
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def small_project(tmp_path):
    """Factory: a tiny RELION 5 project (images included) written by polish3d's own writer.

    ``small_project(n_tilts=5, n_particles=4, image_size=(32, 30))`` returns the project folder
    holding ``optimisation_set.star``, ``tomograms.star``, ``tilt_series/TS_01.{star,mrcs}`` and
    ``particles.star``.
    """
    from polish3d import geometry
    from polish3d.io import write_new_optimisation_set, write_stack
    from polish3d.model import ParticleData, TiltSeriesData

    def make(n_tilts=5, n_particles=4, image_size=(32, 30), tomo_size=(40, 36, 20), px=10.0):
        rng = np.random.default_rng(0)
        out = tmp_path / "project"
        stack = out / "tilt_series" / "TS_01.mrcs"
        write_stack(stack, np.zeros((n_tilts, image_size[1], image_size[0]), np.float32), px)
        tilts = np.linspace(-30, 30, n_tilts)
        proj = geometry.projection_from_euler(
            np.zeros(n_tilts),
            tilts,
            np.full(n_tilts, 85.0),
            rng.normal(0, 5, n_tilts),
            rng.normal(0, 5, n_tilts),
            pixel_size_ang=px,
            image_size_px=image_size,
            tomo_size_px=tomo_size,
        )
        order = np.argsort(np.abs(tilts), kind="stable")
        pre = np.empty(n_tilts)
        pre[order] = 3.0 * np.arange(n_tilts)
        ts = TiltSeriesData(
            name="TS_01",
            pixel_size_ang=px,
            tomo_size_px=tomo_size,
            image_size_px=image_size,
            projections=proj,
            defocus_u_ang=np.full(n_tilts, 20000.0),
            defocus_v_ang=np.full(n_tilts, 19000.0),
            defocus_angle_deg=np.full(n_tilts, 30.0),
            ctf_scale=np.ones(n_tilts),
            pre_exposure_e_per_ang2=pre,
            image_files=[(str(stack), j) for j in range(n_tilts)],
        )
        ang = rng.uniform(-180, 180, (n_particles, 3))
        parts = ParticleData(
            names=[f"TS_01/{k + 1}" for k in range(n_particles)],
            positions_px=rng.uniform(5, 15, (n_particles, 3)),
            rotations=geometry.euler_zyz_matrix(ang[:, 0], ang[:, 1], ang[:, 2]),
            half_set=np.arange(n_particles) % 2 + 1,
        )
        write_new_optimisation_set(out, [ts], {"TS_01": parts})
        return out, ts, parts

    return make
