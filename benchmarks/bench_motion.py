"""Time `polish3d align` with and without `--motion` (the GP motion model, issue 5).

Usage::

    python benchmarks/bench_motion.py [--particles 100,600,2000] [--box 96] [--image 1024]
        [--tilt_step 3] [--s_vel 0.5] [--s_div 1000] [--sim_s_vel V] [--work DIR] [--threads1]

For every particle count it simulates one tomogram with GP motion (polish3d's simulator,
default SNR, ``--s_vel/--s_div`` in RELION's units), then runs the real ``polish3d align``
command in a fresh process (start-up and JIT compilation included) without and with
``--motion`` (same ``--s_vel/--s_div``; ``--sim_s_vel 0`` simulates data without motion while
aligning with ``--s_vel``) and prints: whole-process seconds, the seconds of the
GP basis set-up, the CC stage and L-BFGS, the number of eigendeformations kept, the reprojection
RMS against the truth (motion included, pixels) and the RMS of the refined trajectories (Å).
The 1-minute load average before each run is printed too (the machine may be shared).
``--threads1`` runs the children with ``OPENBLAS_NUM_THREADS=1`` (SciPy's L-BFGS-B is much
slower with a multi-threaded OpenBLAS on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _side_by_side import POLISH3D_MAIN


def _simulate(sim: Path, n: int, box: int, image: int, tilt_step: float, s_vel: float, s_div: float):
    from polish3d.simulate import SimulationConfig, simulate

    if not (sim / "optimisation_set.star").exists():
        cfg = SimulationConfig(
            n_tomograms=1, n_particles=n, n_unlisted=0, box_px=box, image_size_px=(image, image),
            tilt_step_deg=tilt_step, tomo_thickness_px=max(96, box + 16), s_vel=s_vel, s_div=s_div,
        )
        simulate(cfg, sim)


def _score(sim: Path, out: str) -> float:
    import importlib

    score = importlib.import_module("polish3d.score").score
    cwd = os.getcwd()
    os.chdir(sim)
    try:
        return float(score(f"{out}/optimisation_set.star", "truth/optimisation_set.star")["overall"]["rms"])
    finally:
        os.chdir(cwd)


def run_one(sim: Path, box: int, motion: bool, s_vel: float, s_div: float, threads1: bool) -> dict:
    out = "Polish/motion" if motion else "Polish/nomotion"
    cmd = [
        sys.executable, "-c", POLISH3D_MAIN,
        "align", "--i", "optimisation_set.star", "--b", str(box), "--r", "20", "--j", "2", "--o", out + "/",
    ]
    if motion:
        cmd += ["--motion", "--s_vel", str(s_vel), "--s_div", str(s_div)]
    env = dict(os.environ)
    if threads1:
        env["OPENBLAS_NUM_THREADS"] = "1"
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=sim, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    metrics = json.loads((sim / out / "metrics.json").read_text())
    tomo = next(iter(metrics["tomograms"].values()))
    mot = tomo.get("motion", {})
    return {
        "motion": "on" if motion else "off",
        "process_s": wall,
        "tomogram_s": tomo["seconds"],
        "basis_s": mot.get("basis_seconds", 0.0),
        "cc_s": sum(s["cc_seconds"] for s in tomo["outer"]),
        "lbfgs_s": sum(s["lbfgs_seconds"] for s in tomo["outer"]),
        "modes": mot.get("n_eigendeformations", 0),
        "rms_px": _score(sim, out),
        "traj_rms_A": mot.get("total_rms_px", 0.0) * _pixel_size(sim),
        "load": load,
    }


def _pixel_size(sim: Path) -> float:
    from polish3d.io import relion

    tset = relion.read_tomogram_set(sim / "tomograms.star")
    return tset.tilt_series(tset.names[0], load_images=False).pixel_size_ang


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", default="100,600,2000")
    ap.add_argument("--box", type=int, default=96)
    ap.add_argument("--image", type=int, default=1024)
    ap.add_argument("--tilt_step", type=float, default=3.0)
    ap.add_argument("--s_vel", type=float, default=0.5)
    ap.add_argument("--s_div", type=float, default=1000.0)
    ap.add_argument("--sim_s_vel", type=float, default=None, help="simulated s_vel (default --s_vel)")
    ap.add_argument("--work", default="bench_work")
    ap.add_argument("--threads1", action="store_true", help="OPENBLAS_NUM_THREADS=1 in the children")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cols = ["particles", "motion", "process_s", "tomogram_s", "basis_s", "cc_s", "lbfgs_s", "modes",
            "rms_px", "traj_rms_A", "load"]
    print(" ".join(f"{c:>10}" for c in cols), flush=True)
    for n in [int(v) for v in args.particles.split(",")]:
        sim_s_vel = args.s_vel if args.sim_s_vel is None else args.sim_s_vel
        sim = work / f"sim_motion_n{n}_b{args.box}_i{args.image}_v{sim_s_vel:g}_d{args.s_div:g}"
        _simulate(sim, n, args.box, args.image, args.tilt_step, sim_s_vel, args.s_div)
        for motion in (False, True):
            r = {"particles": n, **run_one(sim, args.box, motion, args.s_vel, args.s_div, args.threads1)}
            print(" ".join(f"{r[c]:>10.3f}" if isinstance(r[c], float) else f"{r[c]:>10}" for c in cols),
                  flush=True)


if __name__ == "__main__":
    main()
