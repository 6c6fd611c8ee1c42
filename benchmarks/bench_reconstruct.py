"""``polish3d reconstruct`` against RELION 5's ``relion_tomo_reconstruct_particle``: half-map FSC.

Usage::

    python benchmarks/bench_reconstruct.py [--work DIR] [--box 64] [--particles 40] [--snr 0.05]
                                           [--geometry truth|nominal] [--repeats 1]

Simulates one small tilt series (polish3d's simulator), then reconstructs the two half maps of
its particles from the same optimisation set (``truth/`` by default: the true geometry) with both
programs, as fresh processes one after the other, with the same flags (``--b``, ``--j 2``). The
FSC of each program's half maps is computed the same way
(:func:`polish3d.imaging.fsc_from_half_maps`, unmasked, the maps as written) and printed shell by
shell with the difference; then the resolution at FSC 0.143, the wall time (median over the
repeats, start-up and compilation included) and the peak resident memory of each process, and
the correlation of the two programs' merged maps. Without RELION (``$RELION_BIN`` or ``PATH``)
it prints polish3d's figures and says so.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
from _side_by_side import POLISH3D_MAIN, relion_binary, timed_process


def main() -> None:
    from polish3d.imaging import fsc_from_half_maps
    from polish3d.io import read_map
    from polish3d.reconstruct import fsc_resolution_ang
    from polish3d.simulate import SimulationConfig, simulate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench_reconstruct_work")
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--particles", type=int, default=40)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--geometry", choices=("truth", "nominal"), default="truth")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    work = Path(args.work).resolve()
    project = work / f"b{args.box}_n{args.particles}_snr{args.snr:g}"
    if not (project / "optimisation_set.star").exists():
        cfg = SimulationConfig(
            n_tomograms=1, n_particles=args.particles, n_unlisted=0, box_px=args.box,
            image_size_px=(384, 384), tilt_min_deg=-60.0, tilt_max_deg=60.0, tilt_step_deg=3.0,
            snr=args.snr, seed=11,
        )
        simulate(cfg, project)
    opt = "truth/optimisation_set.star" if args.geometry == "truth" else "optimisation_set.star"
    relion = relion_binary("relion_tomo_reconstruct_particle")
    print(f"RELION: {relion or 'not found (set RELION_BIN or put relion_tomo_reconstruct_particle on PATH)'}")
    programs = {"polish3d": [sys.executable, "-c", POLISH3D_MAIN, "reconstruct"]}
    if relion:
        programs["relion"] = [relion]
    times: dict[str, list[float]] = {p: [] for p in programs}
    peak: dict[str, float] = {p: 0.0 for p in programs}
    for repeat in range(args.repeats):
        for prog, exe in programs.items():  # interleaved: both see the same machine load
            out = f"Rec/{prog}/"
            shutil.rmtree(project / out, ignore_errors=True)
            (project / out).mkdir(parents=True)
            cmd = [*exe, "--i", opt, "--b", str(args.box), "--j", "2", "--o", out]
            wall, rss = timed_process(cmd, project, project / f"rec_{prog}_{repeat}.log")
            times[prog].append(wall)
            peak[prog] = max(peak[prog], rss)

    fsc, res, merged = {}, {}, {}
    for prog in programs:
        h1, px = read_map(project / f"Rec/{prog}/half1.mrc")
        h2, _ = read_map(project / f"Rec/{prog}/half2.mrc")
        fsc[prog] = fsc_from_half_maps(h1, h2)[1]
        res[prog] = fsc_resolution_ang(fsc[prog], args.box, px)
        merged[prog] = read_map(project / f"Rec/{prog}/merged.mrc")[0]
        print(f"{prog}: {statistics.median(times[prog]):.1f} s (median of {args.repeats}), "
              f"peak {peak[prog]:.0f} MiB, resolution at FSC 0.143 {res[prog]:.2f} A")

    n = args.box
    header = f"{'shell':>5} {'A':>8} " + " ".join(f"{p:>9}" for p in programs)
    if relion:
        header += f" {'diff':>8}"
    print(header)
    for k in range(n // 2 + 1):
        a = f"{n * px / k:8.2f}" if k else f"{'inf':>8}"
        line = f"{k:>5d} {a} " + " ".join(f"{fsc[p][k]:>9.4f}" for p in programs)
        if relion:
            line += f" {fsc['polish3d'][k] - fsc['relion'][k]:>+8.4f}"
        print(line)
    if relion:
        d = np.abs(fsc["polish3d"] - fsc["relion"])
        print(f"max |FSC difference| over shells 1..{n // 2}: {d[1:].max():.1e} "
              f"(shell {int(np.argmax(d[1:])) + 1}); target 0.02")
        cc = np.corrcoef(merged["polish3d"].ravel(), merged["relion"].ravel())[0, 1]
        _, fsc_cross = fsc_from_half_maps(merged["polish3d"], merged["relion"])
        print(f"merged maps: correlation {cc:.4f}; FSC polish3d vs RELION min over shells "
              f"1..{n // 2}: {fsc_cross[1:].min():.4f}")
        ratio = statistics.median(times["polish3d"]) / statistics.median(times["relion"])
        print(f"time ratio polish3d/RELION {ratio:.2f}, memory ratio {peak['polish3d'] / peak['relion']:.2f}")


if __name__ == "__main__":
    main()
