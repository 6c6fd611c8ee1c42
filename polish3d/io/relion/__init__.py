"""RELION 5 (and RELION 4) tomography sets: optimisation set, tomogram set, particles, motion.

Units: pixel sizes Å/px, positions in tilt-series pixels (frames of :mod:`polish3d.geometry`),
centred coordinates, origins and trajectories in Å, angles in degrees, doses in e⁻/Å².

**Paths.** RELION runs from the project folder and stores every path relative to it. Here a
relative path found in a STAR file is resolved against ``project_dir`` (default: the current
working directory, as RELION does). As a convenience, when that file does not exist but one at
the same relative path next to the STAR file that names it does, the latter is used (this makes
self-contained folders readable from anywhere). Paths are written relative to ``project_dir``.

The layouts, precedences and defaults are those of RELION 5 (``tomogram_set.cpp``,
``particle_set.cpp``, ``trajectory.cpp``, ``optimisation_set.cpp``; spec §2.2 and §5).
Modules, one per file type: ``_common`` (labels, paths and checked column access),
``tilt_tables`` (per-tilt geometry and deformation, read and written), ``tomograms``
(``tomograms.star``), ``particles`` (``particles.star``), ``motion`` (``motion.star``) and
``optimisation_set`` (``optimisation_set.star``, and complete sets from records).
"""

from __future__ import annotations

# labels and helpers (the private ones are used by align.py and the tests), importable from
# here as before the split into modules
from polish3d.io.relion._common import (  # noqa: F401
    ANGLE_LABELS,
    CENTRED_LABELS,
    COORD_LABELS,
    DEFORMATION_LABELS,
    DEFORMATION_TYPES,
    EULER_LABELS,
    NOMINAL_TILT_LABELS,
    ORIGIN_LABELS,
    PROJ_LABELS,
    SUBTOMO_LABELS,
    TILT_ANGLE_LABELS,
    TILT_SHIFT_LABELS,
    _pipeline_post,
    _relative_to,
    _resolve,
    _split_image_name,
    deformation_coefficient_count,
)
from polish3d.io.relion.motion import read_trajectories, write_trajectories
from polish3d.io.relion.optimisation_set import (
    OptimisationSet,
    read_optimisation_set,
    write_new_optimisation_set,
    write_optimisation_set,
)
from polish3d.io.relion.particles import ParticleSet, new_particle_set, read_particle_set
from polish3d.io.relion.tilt_tables import complete_deformations
from polish3d.io.relion.tomograms import TomogramSet, read_tomogram_set

__all__ = [
    "ANGLE_LABELS",
    "CENTRED_LABELS",
    "COORD_LABELS",
    "DEFORMATION_LABELS",
    "DEFORMATION_TYPES",
    "EULER_LABELS",
    "NOMINAL_TILT_LABELS",
    "ORIGIN_LABELS",
    "OptimisationSet",
    "PROJ_LABELS",
    "ParticleSet",
    "SUBTOMO_LABELS",
    "TILT_ANGLE_LABELS",
    "TILT_SHIFT_LABELS",
    "TomogramSet",
    "complete_deformations",
    "deformation_coefficient_count",
    "new_particle_set",
    "read_optimisation_set",
    "read_particle_set",
    "read_tomogram_set",
    "read_trajectories",
    "write_new_optimisation_set",
    "write_optimisation_set",
    "write_trajectories",
]
