"""Accuracy of `polish3d align` against the simulator's ground truth, scenario by scenario.

Usage::

    python benchmarks/bench_accuracy.py [--work DIR] [--only NAME[,NAME]] [--starts S[,S]]
                                        [--no-relion]

Each scenario simulates a dataset (polish3d's simulator; SNR and errors as listed) and runs the
real ``polish3d align`` command from inside the simulated project from three starts:

* ``nominal``: the simulated input geometry (the scenario's errors);
* ``pert``: the true geometry perturbed by about 1 px (every particle position and every tilt's
  2D shift moved by Gaussian noise of σ 0.5 px per axis; fixed seed);
* ``truth``: the true geometry itself.

Each result is scored against the truth (reprojection distance of every listed particle in every
tilt, pixels; tilt-angle error after removing the gauge). A result that does not depend on its
start gives the same figures in the three rows of a scenario.

When ``relion_tomo_align`` is found (``$RELION_BIN`` or ``PATH``) it is run from the same starts
(``--b 64 --r 20 --j 2``) and scored the same way; otherwise a note is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _side_by_side import POLISH3D_MAIN, relion_binary

SCENARIOS = {
    # name: (simulation overrides, align flags, per-tilt extra shift in px applied to the nominal)
    "default": ({}, [], 0.0),
    "default_outer1": ({}, ["--outer", "1"], 0.0),
    "close_input": (
        dict(x_tilt_err_deg=0.15, y_tilt_err_deg=0.15, z_rot_err_deg=0.15, shift_err_px=1.0,
             position_err_px=1.0), [], 0.0),
    "shift15_r20": ({}, [], 15.0),
    "shift30_r20": ({}, [], 30.0),
    "snr0.05": (dict(snr=0.05), [], 0.0),
    "snr0.15": (dict(snr=0.15), [], 0.0),
    "snr0.3": (dict(snr=0.3), [], 0.0),
}
STARTS = ("nominal", "pert", "truth")
#: standard deviation (pixels, per axis) of the perturbation of the truth in the ``pert`` start
PERTURB_SIGMA_PX = 0.5


def _polish3d(args, cwd):
    cmd = [sys.executable, "-c", POLISH3D_MAIN]
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


def perturbed_truth(project: Path, sigma_px: float = PERTURB_SIGMA_PX, seed: int = 1) -> str:
    """Write ``pert/`` + ``pert_input.star``: the truth with every particle position and every
    tilt's 2D shift moved by Gaussian noise of ``sigma_px`` pixels per axis. Returns the name of
    the optimisation set (relative to ``project``)."""
    from polish3d.io.star import read_star, write_star

    rng = np.random.default_rng(seed)
    src, dst = project / "truth", project / "pert"
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "tilt_series").mkdir(parents=True)
    tomos = read_star(src / "tomograms.star")
    g = tomos["global"].copy()
    for i, star in enumerate(g["rlnTomoTiltSeriesStarFile"]):
        blocks = read_star(project / star)
        name = next(iter(blocks))
        t = blocks[name].copy()
        px = float(g["rlnTomoTiltSeriesPixelSize"].iloc[i])
        for col in ("rlnTomoXShiftAngst", "rlnTomoYShiftAngst"):
            t[col] = t[col] + sigma_px * px * rng.normal(size=len(t))
        blocks[name] = t
        new = f"pert/tilt_series/{Path(star).name}"
        write_star(project / new, blocks)
        g.loc[g.index[i], "rlnTomoTiltSeriesStarFile"] = new
    tomos["global"] = g
    write_star(dst / "tomograms.star", tomos)
    parts = read_star(src / "particles.star")
    p = parts["particles"].copy()
    px_of = dict(zip(g["rlnTomoName"], g["rlnTomoTiltSeriesPixelSize"], strict=True))
    px = p["rlnTomoName"].map(px_of).to_numpy(float)
    for ax in "XYZ":
        col = f"rlnCenteredCoordinate{ax}Angst"
        p[col] = p[col] + sigma_px * px * rng.normal(size=len(p))
    parts["particles"] = p
    write_star(dst / "particles.star", parts)
    text = (src / "optimisation_set.star").read_text()
    (project / "pert_input.star").write_text(text.replace("truth/", "pert/"))
    return "pert_input.star"


def _score_row(project: Path, start_set: str, result_set: str) -> dict:
    from polish3d.score import score

    cwd = os.getcwd()
    os.chdir(project)
    try:
        before = score(start_set, "truth/optimisation_set.star")
        after = score(result_set, "truth/optimisation_set.star")
    finally:
        os.chdir(cwd)
    o, b = after["overall"], before["overall"]
    return {
        "input_rms": b["rms"], "rms": o["rms"], "median": o["median"], "p95": o["p95"],
        "max": o["max"], "angle_rms_deg": after["angle_error_deg"]["rms"],
    }


def run(name: str, work: Path, starts=STARTS, relion: Path | None = None) -> list[dict]:
    from polish3d.simulate import SimulationConfig, simulate

    overrides, flags, extra = SCENARIOS[name]
    project = work / name
    if project.exists():
        shutil.rmtree(project)
    simulate(SimulationConfig(**overrides), project)
    if extra:
        _shift_tilts(project, float(extra))
    sets = {"nominal": "optimisation_set.star", "truth": "truth_input.star"}
    (project / "truth_input.star").write_text((project / "truth/optimisation_set.star").read_text())
    if "pert" in starts:
        sets["pert"] = perturbed_truth(project)
    rows = []
    for start in starts:
        opt = sets[start]
        out = f"Polish/{start}/"
        t0 = time.perf_counter()
        _polish3d(["align", "--i", opt, "--b", "64", "--r", "20", "--j", "2", "--o", out, *flags],
                  project)
        seconds = time.perf_counter() - t0
        rows.append({"scenario": name, "start": start, "program": "polish3d",
                     **_score_row(project, opt, out + "optimisation_set.star"), "seconds": seconds})
        if relion is not None and not flags:
            out = f"Relion/{start}/"
            t0 = time.perf_counter()
            proc = subprocess.run(
                [str(relion), "--i", opt, "--b", "64", "--r", "20", "--j", "2", "--o", out],
                cwd=project, capture_output=True, text=True,
            )
            seconds = time.perf_counter() - t0
            if proc.returncode != 0 or not (project / out / "optimisation_set.star").exists():
                print(f"# RELION failed on {name}/{start}: {proc.stderr[-500:]}", flush=True)
                continue
            rows.append({"scenario": name, "start": start, "program": "relion5",
                         **_score_row(project, opt, out + "optimisation_set.star"),
                         "seconds": seconds})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench_accuracy_work")
    ap.add_argument("--only", default="")
    ap.add_argument("--starts", default=",".join(STARTS))
    ap.add_argument("--no-relion", action="store_true", help="do not run relion_tomo_align")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    starts = tuple(args.starts.split(","))
    found = None if args.no_relion else relion_binary("relion_tomo_align")
    relion = Path(found) if found else None
    if relion is None and not args.no_relion:
        print("# relion_tomo_align not found (set RELION_BIN or PATH): RELION rows skipped",
              flush=True)
    cols = ["scenario", "start", "program", "input_rms", "rms", "median", "p95", "max",
            "angle_rms_deg", "seconds"]
    print(" ".join(f"{c:>14}" for c in cols), flush=True)
    for name in names:
        for r in run(name, work, starts, relion):
            print(" ".join(f"{r[c]:>14.3f}" if isinstance(r[c], float) else f"{r[c]:>14}"
                           for c in cols), flush=True)


if __name__ == "__main__":
    main()
