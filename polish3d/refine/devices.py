"""The devices one tomogram is split across: its particle axis, sharded over a 1-D device mesh.

When JAX sees several devices of its default backend (GPUs, or CPU host devices made with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``), the CC stage
(:mod:`polish3d.refine.ccmaps`, :mod:`polish3d.refine.likelihood`) puts each batch of
particle–tilt pairs, and the stage-2 objective (:mod:`polish3d.refine.optimise`) every array
indexed by particle, on a :class:`jax.sharding.NamedSharding` over the mesh axis ``particles``;
everything else is replicated. The jitted functions are the same: XLA's partitioner (GSPMD) runs
each device's share of the pairs and inserts the reductions (sums over particles) itself.

The result equals the one-device result up to the order of the float32 sums over particles (the
CC windows and Taylor coefficients of a pair are computed alone, so they do not change at all).

With one device (the default on a CPU) nothing here touches an array: the one-device path is
the code as it was. ``POLISH3D_DEVICES=N`` uses only the first ``N`` devices (1: one device).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["ENV_DEVICES", "count", "mesh", "replicate", "round_up", "shard_rows", "split_particles"]

#: environment variable limiting the devices used for one tomogram (unset: all of the default backend)
ENV_DEVICES = "POLISH3D_DEVICES"

_AXIS = "particles"


@functools.cache
def mesh() -> Mesh | None:
    """The 1-D mesh (axis ``"particles"``) over the devices used, or ``None`` for one device."""
    devices = jax.devices()
    limit = os.environ.get(ENV_DEVICES, "").strip()
    if limit:
        try:
            n = int(limit)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{ENV_DEVICES} must be a whole number >= 1, got {limit!r}")
        devices = devices[:n]
    return Mesh(np.array(devices), (_AXIS,)) if len(devices) > 1 else None


def count() -> int:
    """How many devices a tomogram's particle axis is split across (1: not split)."""
    m = mesh()
    return 1 if m is None else int(m.size)


def round_up(n: int) -> int:
    """``n`` rounded up to a multiple of :func:`count` (a particle axis that splits evenly)."""
    d = count()
    return -(-n // d) * d


def shard_rows(a) -> jax.Array:
    """``a`` (numpy or JAX, leading axis a multiple of :func:`count`) split along its first axis
    across the devices; needs more than one device."""
    return jax.device_put(a, NamedSharding(mesh(), PartitionSpec(_AXIS)))


def replicate(tree):
    """Every array leaf of ``tree`` copied to each device (unchanged with one device)."""
    m = mesh()
    if m is None:
        return tree
    return jax.device_put(tree, NamedSharding(m, PartitionSpec()))


def split_particles(tree, n_rows: int):
    """Array leaves whose first axis has ``n_rows`` (the padded particle count) split across the
    devices, the others replicated; ``tree`` unchanged with one device.

    Splitting an array that is not particle-indexed but happens to have ``n_rows`` rows changes
    nothing in the result (the partitioner keeps the program's meaning), only where it runs.
    """
    m = mesh()
    if m is None:
        return tree
    rows = NamedSharding(m, PartitionSpec(_AXIS))
    whole = NamedSharding(m, PartitionSpec())
    splits = n_rows % m.size == 0

    def put(a):
        if not isinstance(a, jax.Array | np.ndarray | np.generic):
            return a
        split = splits and a.ndim >= 1 and a.shape[0] == n_rows
        return jax.device_put(a, rows if split else whole)

    return jax.tree_util.tree_map(put, tree)
