"""Serial `polish3d align` against `--workers N` on the same simulated set, as whole processes.

Usage::

    python benchmarks/bench_scale.py [--tomograms 4] [--particles 150] [--image 512]
        [--workers 2] [--repeats 2] [--j-serial 2] [--work DIR]

Simulates the set once (``--tomograms`` tilt series of ``--particles`` particles, 41 tilts of
``--image``² pixels, box 64), then runs the serial command (``--j <j-serial>``) and the Dask
command (``--workers N --j <j-serial / N>``) back to back, alternating, ``--repeats`` times each
(the first run of all also fills the persistent compilation cache and is not counted). Prints
every wall time, the ratio of the medians (Dask / serial), the reprojection error of both
against the truth and the reprojection difference between the two results (``polish3d score``
of one against the other, pixels).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _side_by_side import POLISH3D_MAIN


def _simulate(work: Path, tomograms: int, particles: int, image: int) -> Path:
    from polish3d.simulate import SimulationConfig, simulate

    sim = work / f"sim_t{tomograms}_n{particles}_i{image}"
    if not (sim / "optimisation_set.star").exists():
        simulate(SimulationConfig(n_tomograms=tomograms, n_particles=particles, n_unlisted=0, box_px=64,
                                  image_size_px=(image, image), seed=11), sim)
    return sim


def _align(sim: Path, out: str, *extra: str) -> float:
    """Wall seconds of one whole ``polish3d align`` process into ``sim/out``."""
    shutil.rmtree(sim / out, ignore_errors=True)
    cmd = [sys.executable, "-c", POLISH3D_MAIN, "align", "--i", "optimisation_set.star", "--b", "64",
           "--r", "20", "--o", out, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=sim, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall


def _score(sim: Path, refined: str, against: str) -> dict:
    from polish3d.score import score

    cwd = os.getcwd()
    os.chdir(sim)
    try:
        return score(f"{refined}/optimisation_set.star", f"{against}/optimisation_set.star")["overall"]
    finally:
        os.chdir(cwd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tomograms", type=int, default=4)
    ap.add_argument("--particles", type=int, default=150)
    ap.add_argument("--image", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--j-serial", type=int, default=2, dest="j_serial")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/polish3d_bench_scale"))
    args = ap.parse_args()
    sim = _simulate(args.work, args.tomograms, args.particles, args.image)
    j_worker = max(1, args.j_serial // args.workers)
    runs = {
        "serial": ("Serial/", "--j", str(args.j_serial)),
        "dask": ("Dask/", "--j", str(j_worker), "--workers", str(args.workers)),
    }
    print(f"set: {sim} ({args.tomograms} tomograms × {args.particles} particles, 41 × {args.image}², box 64)")
    print("warm-up (compilation cache):", f"{_align(sim, *runs['serial']):.1f} s", flush=True)
    times: dict[str, list[float]] = {"serial": [], "dask": []}
    for rep in range(args.repeats):
        for name in ("serial", "dask") if rep % 2 == 0 else ("dask", "serial"):
            times[name].append(_align(sim, *runs[name]))
            print(f"  {name:6s} {' '.join(runs[name][1:]):22s} {times[name][-1]:6.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [d / s for d, s in zip(times["dask"], times["serial"], strict=True)]
    print(f"serial  : {', '.join(f'{t:.1f}' for t in times['serial'])} s  (median {med['serial']:.1f})")
    print(f"workers : {', '.join(f'{t:.1f}' for t in times['dask'])} s  (median {med['dask']:.1f})")
    print(f"ratio workers / serial: {med['dask'] / med['serial']:.3f}  "
          f"(per repeat: {', '.join(f'{r:.3f}' for r in ratios)})")
    for name, out in (("serial", "Serial"), ("workers", "Dask")):
        s = _score(sim, out, "truth")
        print(f"reprojection vs truth, {name:7s}: RMS {s['rms']:.4f} px, max {s['max']:.4f} px")
    d = _score(sim, "Dask", "Serial")
    print(f"reprojection difference workers − serial: RMS {d['rms']:.2e} px, max {d['max']:.2e} px")


if __name__ == "__main__":
    main()
