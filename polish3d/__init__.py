"""polish3d: tilt-series geometry, particle-position and motion refinement for cryo-ET.

Reads and writes RELION 5 optimisation sets; a JAX numerical core that runs on CPU, GPU or TPU.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
