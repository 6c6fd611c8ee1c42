"""polish3d: tilt-series geometry, particle-position and motion refinement for cryo-ET.

Reads and writes RELION 5 optimisation sets; a JAX numerical core that runs on CPU, GPU or TPU.

The public API (see ``docs/api.md``)::

    import polish3d

    polish3d.set_device("cpu")                       # optional; before any JAX computation
    sim = polish3d.simulate("sim", n_tomograms=1, n_particles=10, box_px=32)
    out = polish3d.align(sim.optimisation_set, "aligned", box=32, r=8)
    print(polish3d.score(out.optimisation_set, sim.truth_optimisation_set).table())

Note: the functions :func:`align`, :func:`simulate` and :func:`score` have the names of the
submodules that implement them; ``polish3d.align`` is the function. Import from a submodule with
``from polish3d.align import …`` (``from polish3d import align`` gives the function).
"""

from __future__ import annotations

import os as _os

# The host-side linear algebra is small (L-BFGS vectors, tiny dense solves): a multi-threaded
# OpenBLAS only adds contention with XLA's own threads (measured 10-100x slower L-BFGS steps on
# a busy 2-core machine). Takes effect only if numpy is not imported yet (the CLI).
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"

# The submodules are imported first so that the functions below keep their names as package
# attributes (importing a submodule later would otherwise rebind ``polish3d.<name>`` to it).
import polish3d.align as _align_module  # noqa: E402,F401  (binds the submodule first)
import polish3d.score as _score_module  # noqa: E402,F401
import polish3d.simulate as _simulate_module  # noqa: E402,F401
from polish3d.api import (  # noqa: E402
    AlignInputs,
    AlignOutcome,
    Deformation,
    FiducialOptions,
    FiducialResult,
    OptimisationSetData,
    ParticleData,
    ScoreResult,
    TiltSeriesData,
    TomogramResult,
    align,
    align_fiducials,
    make_align_config,
    read_optimisation_set,
    refine_tilt_series,
    score,
    set_device,
    simulate,
)
from polish3d.errors import InputError  # noqa: E402
from polish3d.simulate import SimulationConfig, SimulationResult  # noqa: E402

__all__ = [
    "AlignConfig",
    "AlignInputs",
    "AlignOutcome",
    "Deformation",
    "FiducialOptions",
    "FiducialResult",
    "InputError",
    "OptimisationSetData",
    "ParticleData",
    "ScoreResult",
    "SimulationConfig",
    "SimulationResult",
    "TiltSeriesData",
    "TomogramResult",
    "__version__",
    "align",
    "align_fiducials",
    "make_align_config",
    "read_optimisation_set",
    "refine_tilt_series",
    "score",
    "set_device",
    "simulate",
]


def __getattr__(name: str):
    # AlignConfig lives with the JAX code; imported on first use so that ``import polish3d``
    # (and ``polish3d.io``) do not import JAX.
    if name == "AlignConfig":
        from polish3d.refine.tomogram import AlignConfig

        return AlignConfig
    raise AttributeError(f"module 'polish3d' has no attribute {name!r}")
