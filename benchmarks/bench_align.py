"""Time `polish3d align` per tomogram, the CC stage against the bare FFTs it needs, peak memory.

Usage::

    python benchmarks/bench_align.py [--particles 100,600,2000] [--boxes 64,96,128]
        [--image 1024] [--tilts 41] [--work DIR] [--cli]

For every (particles, box) it simulates one tomogram (polish3d's simulator, default SNR), runs
the alignment in a fresh process (``--cli``: the real ``polish3d align`` command, so JIT
compilation and start-up are included) and prints: whole-process seconds, the CC-stage seconds
beside the seconds of the bare FFTs of the same sizes (one forward rfft2 of the observation and
one inverse rfft2 of the CC per particle-tilt and CC pass), the L-BFGS seconds, peak resident
memory (MiB) and the reprojection error against the truth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _side_by_side import POLISH3D_MAIN, timed_process


def _bare_fft_seconds(n_pairs: int, box: int, passes: int) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    chunk = 656
    x = jnp.asarray(np.random.default_rng(0).normal(size=(chunk, box, box)), jnp.float32)
    f = jax.jit(lambda a: jnp.fft.irfft2(jnp.fft.rfft2(a), s=(box, box)))
    f(x).block_until_ready()
    t0 = time.perf_counter()
    reps = max(1, n_pairs // chunk)
    for _ in range(reps):
        f(x).block_until_ready()
    return (time.perf_counter() - t0) * n_pairs / (reps * chunk) * passes


def run_one(work: Path, n: int, box: int, image: int, tilts_step: float, use_cli: bool) -> dict:
    from polish3d.score import score
    from polish3d.simulate import SimulationConfig, simulate

    sim = work / f"sim_n{n}_b{box}_i{image}"
    if not (sim / "optimisation_set.star").exists():
        cfg = SimulationConfig(
            n_tomograms=1, n_particles=n, n_unlisted=0, box_px=box, image_size_px=(image, image),
            tilt_step_deg=tilts_step, tomo_thickness_px=max(96, box + 16),
        )
        simulate(cfg, sim)
    out = sim / "Polish" / "bench"
    cmd = [
        sys.executable, "-c", POLISH3D_MAIN,
        "align", "--i", "optimisation_set.star", "--b", str(box), "--r", "20", "--j", "2",
        "--o", "Polish/bench/",
    ]
    # this run's own peak (GNU time): the children's maximum would carry earlier, larger runs
    wall, peak_mib = timed_process(cmd, sim, sim / "bench_align.log")
    metrics = json.loads((out / "metrics.json").read_text())
    tomo = next(iter(metrics["tomograms"].values()))
    cc_s = sum(s["cc_seconds"] for s in tomo["outer"])
    lbfgs_s = sum(s["lbfgs_seconds"] for s in tomo["outer"])
    passes = len({s["outer"] for s in tomo["outer"]})
    f = tomo["n_tilts"]
    cwd = os.getcwd()
    os.chdir(sim)
    try:
        sc = score("Polish/bench/optimisation_set.star", "truth/optimisation_set.star")["overall"]
    finally:
        os.chdir(cwd)
    return {
        "particles": n,
        "box": box,
        "tilts": f,
        "image": image,
        "process_s": wall,
        "tomogram_s": tomo["seconds"],
        "cc_s": cc_s,
        "cc_passes": passes,
        "bare_fft_s": _bare_fft_seconds(n * f, box, passes),
        "lbfgs_s": lbfgs_s,
        "peak_rss_mib": peak_mib,
        "rms_px": sc["rms"],
        "median_px": sc["median"],
        "p95_px": sc["p95"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", default="100,600,2000")
    ap.add_argument("--boxes", default="64,96,128")
    ap.add_argument("--image", type=int, default=1024)
    ap.add_argument("--tilt_step", type=float, default=3.0)
    ap.add_argument("--work", default="bench_work")
    ap.add_argument("--cli", action="store_true", help="(always on) run the real CLI")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cols = ["particles", "box", "tilts", "image", "process_s", "tomogram_s", "cc_s", "cc_passes",
            "bare_fft_s",
            "lbfgs_s", "peak_rss_mib", "rms_px", "median_px", "p95_px"]
    print(" ".join(f"{c:>11}" for c in cols), flush=True)
    for n in [int(v) for v in args.particles.split(",")]:
        for box in [int(v) for v in args.boxes.split(",")]:
            image = args.image if n <= 600 else 2 * args.image  # room for 2000 ribosomes
            r = run_one(work, n, box, image, args.tilt_step, True)
            print(" ".join(f"{r[c]:>11.3f}" if isinstance(r[c], float) else f"{r[c]:>11}" for c in cols),
                  flush=True)


if __name__ == "__main__":
    main()
