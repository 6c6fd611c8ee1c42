"""polish3d: tilt-series geometry, particle-position and motion refinement for cryo-ET.

Reads and writes RELION 5 optimisation sets; a JAX numerical core that runs on CPU, GPU or TPU.

The public API (see ``docs/api.md``)::

    import polish3d

    polish3d.set_device("cpu")                       # optional; before any JAX computation
    sim = polish3d.simulate("sim", n_tomograms=1, n_particles=10, box_px=32)
    out = polish3d.align(sim.optimisation_set, "aligned", box=32, r=8)
    print(polish3d.score(out.optimisation_set, sim.truth_optimisation_set).table())

The public names are loaded on first use: ``import polish3d`` itself imports neither NumPy nor
JAX (so the command line can set thread limits before they load). :func:`simulate` and
:func:`score` have the names of the submodules that implement them; ``polish3d.simulate`` is the
function even after ``import polish3d.simulate`` (import from the submodule with ``from
polish3d.simulate import …``).
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_API = (
    "AlignInputs", "AlignOutcome", "Deformation", "FiducialOptions", "FiducialResult",
    "OptimisationSetData", "ParticleData", "ScoreResult", "TiltSeriesData", "TomogramResult", "align",
    "align_fiducials", "read_optimisation_set", "refine_tilt_series", "score", "set_device", "simulate",
)
#: where each public name lives (the option records live with the JAX code: loading them loads JAX)
_HOMES = {
    **dict.fromkeys(_API, "polish3d.api"),
    "InputError": "polish3d.errors",
    "SimulationConfig": "polish3d.simulate",
    "SimulationResult": "polish3d.simulate",
    "RefineConfig": "polish3d.config",
    "AlignConfig": "polish3d.refine.tomogram",
    "MotionConfig": "polish3d.refine.motion",
    "DeformationConfig": "polish3d.refine.deformation",
}

__all__ = [*sorted(_HOMES), "__version__"]


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:  # a submodule not imported yet (``polish3d.io``, ``polish3d.fiducials``, …)
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'polish3d' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


class _Package(types.ModuleType):
    """The package module: importing a submodule never rebinds a public name (``simulate``)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _HOMES and isinstance(value, types.ModuleType):
            return  # the import system binding ``polish3d.simulate`` (the module) on the package
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
