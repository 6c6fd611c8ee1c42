"""File I/O: STAR tables, MRC maps/stacks and RELION tomography sets (never imports JAX)."""

from __future__ import annotations

from polish3d.io.mrc import image_size, open_stack, read_fsc, read_map, write_map, write_stack
from polish3d.io.relion import (
    OptimisationSet,
    ParticleSet,
    TomogramSet,
    new_particle_set,
    read_optimisation_set,
    read_particle_set,
    read_tomogram_set,
    read_trajectories,
    write_new_optimisation_set,
    write_optimisation_set,
    write_trajectories,
)
from polish3d.io.star import parse_vector, read_star, write_star

__all__ = [
    "OptimisationSet",
    "ParticleSet",
    "TomogramSet",
    "image_size",
    "new_particle_set",
    "open_stack",
    "parse_vector",
    "read_fsc",
    "read_map",
    "read_optimisation_set",
    "read_particle_set",
    "read_star",
    "read_tomogram_set",
    "read_trajectories",
    "write_map",
    "write_new_optimisation_set",
    "write_optimisation_set",
    "write_stack",
    "write_star",
    "write_trajectories",
]
