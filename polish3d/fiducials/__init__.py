"""Bead (fiducial) bundle adjustment, like IMOD's tiltalign: ``polish3d fiducials``.

See ``docs/fiducials.md``. Python API: :func:`align_fiducials` (tracks → :class:`FiducialResult`),
:func:`simulate_bead_tracks`, readers/writers for tracks, ``.tlt``, ``.xf``, STAR, and
:func:`run_fiducials` (files → files, what the CLI calls).
"""

from polish3d.fiducials._align import FiducialOptions as FiducialOptions
from polish3d.fiducials._align import FiducialResult as FiducialResult
from polish3d.fiducials._align import align_fiducials as align_fiducials
from polish3d.fiducials._align import projection_matrices as projection_matrices
from polish3d.fiducials._cli import register_cli as register_cli
from polish3d.fiducials._cli import run_fiducials as run_fiducials
from polish3d.fiducials._files import geometry_from_xf as geometry_from_xf
from polish3d.fiducials._files import read_tilt_angles as read_tilt_angles
from polish3d.fiducials._files import read_tracks as read_tracks
from polish3d.fiducials._files import read_xf as read_xf
from polish3d.fiducials._files import write_tlt as write_tlt
from polish3d.fiducials._files import write_xf as write_xf
from polish3d.fiducials._files import xf_from_result as xf_from_result
from polish3d.fiducials._report import report_dict as report_dict
from polish3d.fiducials._report import report_text as report_text
from polish3d.fiducials._simulate import simulate_bead_tracks as simulate_bead_tracks

__all__ = [
    "FiducialOptions",
    "FiducialResult",
    "align_fiducials",
    "geometry_from_xf",
    "projection_matrices",
    "read_tilt_angles",
    "read_tracks",
    "read_xf",
    "register_cli",
    "report_dict",
    "report_text",
    "run_fiducials",
    "simulate_bead_tracks",
    "write_tlt",
    "write_xf",
    "xf_from_result",
]
