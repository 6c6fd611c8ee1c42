"""Accuracy of `polish3d align` against the simulator's ground truth, scenario by scenario.

Usage::

    python benchmarks/bench_accuracy.py [--work DIR] [--only NAME[,NAME]]

Each scenario simulates a dataset (polish3d's simulator; SNR and errors as listed), runs the real
``polish3d align`` command from inside the simulated project and scores the result against the
truth (reprojection distance of every listed particle in every tilt, pixels; tilt-angle error
after removing the gauge). Prints one row per scenario.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SCENARIOS = {
    # name: (simulation overrides, align flags, per-tilt extra shift in px applied to the nominal)
    "default": ({}, [], 0.0),
    "default_outer1": ({}, ["--outer", "1"], 0.0),
    "close_input": (
        dict(x_tilt_err_deg=0.15, y_tilt_err_deg=0.15, z_rot_err_deg=0.15, shift_err_px=1.0,
             position_err_px=1.0), [], 0.0),
    "perfect_input": ({}, [], "truth"),
    "shift15_r20": ({}, [], 15.0),
    "shift30_r20": ({}, [], 30.0),
    "snr0.05": (dict(snr=0.05), [], 0.0),
    "snr0.15": (dict(snr=0.15), [], 0.0),
    "snr0.3": (dict(snr=0.3), [], 0.0),
}


def _polish3d(args, cwd):
    cmd = [sys.executable, "-c", "import sys; from polish3d.cli import main; sys.argv[0]='polish3d'; main()"]
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, check=True)


def _shift_tilts(project: Path, shift_px: float) -> None:
    """Add ±shift (alternating every 4th tilt, x and y) to the nominal per-tilt shifts."""
    from polish3d.io.star import read_star, write_star

    for path in sorted((project / "tilt_series").glob("*.star")):
        blocks = read_star(path)
        name = next(iter(blocks))
        t = blocks[name].copy()
        px = 8.0
        sel = np.arange(len(t)) % 4 == 1
        sign = np.where(np.arange(len(t)) % 8 == 1, 1.0, -1.0)
        t.loc[sel, "rlnTomoXShiftAngst"] += (sign * shift_px * px)[sel]
        t.loc[sel, "rlnTomoYShiftAngst"] -= (sign * 0.5 * shift_px * px)[sel]
        blocks[name] = t
        write_star(path, blocks)


def run(name: str, work: Path) -> dict:
    from polish3d.score import score
    from polish3d.simulate import SimulationConfig, simulate

    overrides, flags, extra = SCENARIOS[name]
    project = work / name
    if project.exists():
        import shutil

        shutil.rmtree(project)
    simulate(SimulationConfig(**overrides), project)
    opt = "optimisation_set.star"
    if extra == "truth":
        opt = "truth_input.star"
        (project / opt).write_text(
            (project / "truth/optimisation_set.star").read_text()
        )
    elif extra:
        _shift_tilts(project, float(extra))
    t0 = time.perf_counter()
    _polish3d(["align", "--i", opt, "--b", "64", "--r", "20", "--j", "2", "--o", "Polish/job001/", *flags],
              project)
    seconds = time.perf_counter() - t0
    cwd = os.getcwd()
    os.chdir(project)
    try:
        before = score(opt, "truth/optimisation_set.star")
        after = score("Polish/job001/optimisation_set.star", "truth/optimisation_set.star")
    finally:
        os.chdir(cwd)
    o, b = after["overall"], before["overall"]
    return {
        "scenario": name,
        "input_rms": b["rms"],
        "rms": o["rms"],
        "median": o["median"],
        "p95": o["p95"],
        "max": o["max"],
        "angle_rms_deg": after["angle_error_deg"]["rms"],
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench_accuracy_work")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    cols = ["scenario", "input_rms", "rms", "median", "p95", "max", "angle_rms_deg", "seconds"]
    print(" ".join(f"{c:>14}" for c in cols), flush=True)
    for name in names:
        r = run(name, work)
        print(" ".join(f"{r[c]:>14.3f}" if isinstance(r[c], float) else f"{r[c]:>14}" for c in cols),
              flush=True)


if __name__ == "__main__":
    main()
