"""Make this reduced convention-check case from the full one (see README.md here).

Usage: ``python tests/data/convention-check/make_reduced.py FULL_CASE_DIR``

Copies the STAR files, ``true_positions.csv`` and RELION's ``Polish/job001`` unchanged, and writes
the two reduced binary files:

* ``tilt_series/TS_01_lowdose.mrcs``: the images of the ``N_TILTS`` lowest-dose tilts (the rows
  with the smallest ``rlnMicrographPreExposure`` of ``tilt_series/TS_01.star``), in table order,
  as float16 (MRC mode 12);
* ``reference/half1.mrc`` and ``reference/mask.mrc``: the central ``CROP``³ voxels (the mask is
  zero beyond 25.9 voxels from the centre voxel 32, so the masked map is unchanged; the centre
  voxel ``CROP // 2`` stays the centre), as float16.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import mrcfile
import numpy as np

from polish3d import geometry
from polish3d.io import open_stack, read_map, read_star

N_TILTS = 5
CROP = 54
HERE = Path(__file__).resolve().parent
COPIED = [
    "optimisation_set.star",
    "tomograms.star",
    "particles.star",
    "tilt_series/TS_01.star",
    "true_positions.csv",
    "reference/postprocess.star",
    "Truth/optimisation_set.star",
    "Truth/tomograms.star",
    "Truth/particles.star",
    "Truth/tilt_series/TS_01.star",
    "Polish/job001/note.txt",
    "Polish/job001/optimisation_set.star",
    "Polish/job001/tomograms.star",
    "Polish/job001/particles.star",
    "Polish/job001/tilt_series/TS_01.star",
]


def lowdose_rows(pre_exposure, n: int) -> np.ndarray:
    """Rows (table order) of the ``n`` tilts with the smallest pre-exposure."""
    return np.sort(geometry.dose_order(np.asarray(pre_exposure, dtype=np.float64))[:n])


def _write_f16(path: Path, data: np.ndarray, voxel_size: float, stack: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.ascontiguousarray(data, dtype=np.float16))
        if stack:
            m.set_image_stack()
        else:
            m.set_volume()
        m.voxel_size = voxel_size
        m.update_header_stats()


def main(full: Path) -> None:
    for rel in COPIED:
        (HERE / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(full / rel, HERE / rel)
    pre = read_star(full / "tilt_series/TS_01.star")["TS_01"]["rlnMicrographPreExposure"]
    rows = lowdose_rows(pre, N_TILTS)
    stack = np.asarray(open_stack(full / "tilt_series/TS_01.mrcs"))[rows]
    _write_f16(HERE / "tilt_series/TS_01_lowdose.mrcs", stack, 8.0, stack=True)
    for name in ("half1", "mask"):
        vol, vs = read_map(full / f"reference/{name}.mrc")
        box = slice((vol.shape[0] - CROP) // 2, (vol.shape[0] - CROP) // 2 + CROP)
        _write_f16(HERE / f"reference/{name}.mrc", vol[box, box, box], vs, stack=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
