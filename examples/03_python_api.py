"""The Python API on arrays: simulate → refine_tilt_series → score.

Usage::

    python examples/03_python_api.py OUT_DIR [--small]

1. ``polish3d.simulate`` writes a synthetic optimisation set with known true geometry to
   ``OUT_DIR/sim`` (one tilt series; ``--small``: 7 tilts of 128² px, box 32, 10 particles).
2. ``polish3d.read_optimisation_set`` loads it into records (``TiltSeriesData``,
   ``ParticleData``) and arrays (tilt stack, half maps, mask, FSC).
3. ``polish3d.refine_tilt_series`` refines the tilt series in memory: no file is read or
   written; the result holds the refined projection matrices and particle positions and the
   statistics of the run.
4. The refined records are written as an optimisation set (``OUT_DIR/refined``) and scored
   against the truth with ``polish3d.score``.

Prints the reprojection error against the truth (pixels) before and after, per-outer-iteration
statistics and the score table. Runs in about a minute on 2 CPU cores (``--small``: ~20 s).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import polish3d
from polish3d.io import write_new_optimisation_set
from polish3d.score import project_particles

FULL = dict(
    n_tomograms=1, n_particles=30, n_unlisted=5, box_px=48, image_size_px=256,
    tilt_min_deg=-60.0, tilt_max_deg=60.0, tilt_step_deg=6.0, tomo_thickness_px=64,
    pixel_size_ang=8.0, seed=0,
)
SMALL = dict(
    n_tomograms=1, n_particles=10, n_unlisted=0, box_px=32, image_size_px=128,
    tilt_min_deg=-30.0, tilt_max_deg=30.0, tilt_step_deg=10.0, tomo_thickness_px=48,
    pixel_size_ang=16.0, particle_diameter_ang=300.0, seed=1,
)


def reprojection_rms_px(ts, particles, ts_true, particles_true) -> float:
    """RMS distance (px) between where two geometries project the same particles."""
    d = project_particles(ts, particles) - project_particles(ts_true, particles_true)
    return float(np.sqrt(np.mean(np.sum(d**2, axis=-1))))


def main(out_dir: Path, small: bool) -> dict:
    polish3d.set_device("cpu")  # before any JAX computation; "gpu" on a CUDA machine
    settings = SMALL if small else FULL
    box = settings["box_px"]
    r = 8 if small else 12

    t0 = time.perf_counter()
    sim = polish3d.simulate(out_dir / "sim", **settings)
    print(f"simulated {sim.optimisation_set} in {time.perf_counter() - t0:.1f} s")

    data = polish3d.read_optimisation_set(sim.optimisation_set)
    name = data.names[0]
    ts, particles = data.tilt_series[name], data.particles[name]
    stack = data.stack(name)
    print(f"{name}: {ts.n_tilts} tilts of {ts.image_size_px[0]}×{ts.image_size_px[1]} px at "
          f"{ts.pixel_size_ang:g} Å/px, {particles.n_particles} particles, box {box}")

    t0 = time.perf_counter()
    result = polish3d.refine_tilt_series(
        ts, particles, stack, data.half_maps(), box=box, r=r, mask=data.mask(), fsc=data.fsc(),
        outer=2,
    )
    seconds = time.perf_counter() - t0
    for step in result.metrics["outer"]:
        moves = f"; 2D moves RMS {step['move_rms_px']:.2f} px" if "move_rms_px" in step else ""
        print(f"  outer {step['outer']} (CC low-pass {step.get('blur_px', 0):g} px): cost "
              f"{step['cost_initial']:.5g} → {step['cost_final']:.5g} in {step['iterations']} "
              f"L-BFGS iterations{moves}")
    print(f"refined in {seconds:.1f} s, status {result.status}")

    # arrays: where do the input and the refined geometry put the particles, versus the truth?
    ts_ref = ts.replace(projections=result.projections)
    particles_ref = particles.replace(positions_px=result.positions_px)
    ts_true, particles_true = sim.truth_tilt_series[0], sim.truth_particles[name]
    before = reprojection_rms_px(ts, particles, ts_true, particles_true)
    after = reprojection_rms_px(ts_ref, particles_ref, ts_true, particles_true)
    print(f"reprojection error vs truth: {before:.2f} px (input) → {after:.2f} px (refined)")

    # files: write the refined records as an optimisation set and score it
    refined_set = write_new_optimisation_set(out_dir / "refined", [ts_ref], {name: particles_ref})
    score = polish3d.score(refined_set, sim.truth_optimisation_set)
    print(score.table())
    return {"before_px": before, "after_px": after, "score_rms_px": score.rms_px,
            "status": result.status}


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 1:
        sys.exit(__doc__)
    main(Path(args[0]), small="--small" in sys.argv)
