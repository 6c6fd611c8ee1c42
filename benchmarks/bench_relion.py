"""polish3d against RELION 5's ``relion_tomo_align``, side by side: same data, same flags, one script.

Usage::

    python benchmarks/bench_relion.py [--cases big,small,deform,motion] [--repeats 3] [--work DIR]

For every case it simulates a dataset once (polish3d's simulator), then runs, as whole fresh
processes one after the other on the same machine, ``polish3d align`` and — when it is installed
(``relion_tomo_align`` on ``PATH`` or in ``$RELION_BIN``) — RELION 5's ``relion_tomo_align`` with
the same flags. It prints, per program, the median wall-clock seconds over the repeats (start-up,
reading, compilation and writing included), the peak resident memory of the process (MiB) and the
reprojection error against the truth (``polish3d score``: RMS, median, p95 in pixels), then the
ratios polish3d / RELION. Without RELION it prints polish3d's figures and says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

from _side_by_side import POLISH3D_MAIN, relion_binary, timed_process

#: name: (simulation settings, align flags)
CASES = {
    "big": (dict(n_tomograms=1, n_particles=600, n_unlisted=0, box_px=96, image_size_px=(1024, 1024)),
            ["--b", "96", "--r", "20"]),
    "small": (dict(n_tomograms=2, n_particles=80, box_px=64, image_size_px=(384, 384)),
              ["--b", "64", "--r", "20"]),
    "deform": (dict(n_tomograms=2, n_particles=80, box_px=64, image_size_px=(384, 384),
                    deformation_amplitude_px=1.0),
               ["--b", "64", "--r", "20", "--deformation", "--per_frame_deformation"]),
    "motion": (dict(n_tomograms=1, n_particles=600, n_unlisted=0, box_px=96, image_size_px=(1024, 1024),
                    s_vel=0.5),
               ["--b", "96", "--r", "20", "--motion"]),
}


def score_px(project: Path, refined: str) -> dict:
    from polish3d.score import score

    cwd = os.getcwd()
    os.chdir(project)
    try:
        return score(refined, "truth/optimisation_set.star")["overall"]
    finally:
        os.chdir(cwd)


def run_case(name: str, work: Path, repeats: int, relion: str | None) -> dict:
    from polish3d.simulate import SimulationConfig, simulate

    settings, flags = CASES[name]
    project = work / name
    if not (project / "optimisation_set.star").exists():
        simulate(SimulationConfig(**settings), project)
    programs = {"polish3d": [sys.executable, "-c", POLISH3D_MAIN]}
    if relion:
        programs["relion"] = [relion]
    row = {"case": name}
    for repeat in range(repeats):
        for prog, exe in programs.items():  # interleaved: both see the same machine load
            out = f"Bench/{prog}/"
            shutil.rmtree(project / out, ignore_errors=True)
            (project / out).mkdir(parents=True)
            cmd = [*exe, *(["align"] if prog == "polish3d" else []), "--i", "optimisation_set.star",
                   *flags, "--j", "2", "--o", out]
            wall, rss = timed_process(cmd, project, project / f"bench_{prog}_{repeat}.log")
            row.setdefault(f"{prog}_s", []).append(wall)
            row[f"{prog}_mib"] = max(row.get(f"{prog}_mib", 0.0), rss)
    for prog in programs:
        row[f"{prog}_s"] = statistics.median(row[f"{prog}_s"])
        sc = score_px(project, f"Bench/{prog}/optimisation_set.star")
        row[f"{prog}_rms"], row[f"{prog}_median"], row[f"{prog}_p95"] = sc["rms"], sc["median"], sc["p95"]
    if relion:
        row["time_ratio"] = row["polish3d_s"] / row["relion_s"]
        row["memory_ratio"] = row["polish3d_mib"] / row["relion_mib"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="bench_relion_work")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    relion = relion_binary("relion_tomo_align")
    print(f"RELION: {relion or 'not installed (set RELION_BIN or put relion_tomo_align on PATH)'}")
    cols = ["case", "polish3d_s", "polish3d_mib", "polish3d_rms", "polish3d_median", "polish3d_p95"]
    if relion:
        cols += ["relion_s", "relion_mib", "relion_rms", "relion_median", "relion_p95",
                 "time_ratio", "memory_ratio"]
    print(" ".join(f"{c:>15}" for c in cols), flush=True)
    for name in args.cases.split(","):
        r = run_case(name, work, args.repeats, relion)
        print(" ".join(f"{r[c]:>15.3f}" if isinstance(r[c], float) else f"{r[c]:>15}" for c in cols),
              flush=True)


if __name__ == "__main__":
    main()
