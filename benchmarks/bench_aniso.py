"""Image distortion: ``polish3d align --per_tilt_aniso`` / ``--aniso`` on simulated sets (issue 16).

Usage::

    python benchmarks/bench_aniso.py [--work DIR] [--percent 1] [--particles 200] [--image 512]
        [--step 3] [--box 64] [--r 20] [--snr 0.5] [--seed 0]

Two simulations (1 tomogram, ``--particles`` particles, tilts ±60° in ``--step``, box ``--box``):
one with ``--percent`` % anisotropic magnification per tilt along a random axis
(``SimulationConfig.aniso_percent``) and one without. The first is aligned with and without
``--per_tilt_aniso``, the second with and without ``--aniso``, through the files (``polish3d
align`` writes the distortion in ``rlnTomoProjX..W``, ``polish3d score`` reads it). Printed:

* ``reproj_rms_px``: RMS reprojection error against the truth (``polish3d.score``), px;
* ``distortion_err``: RMS over tilts of the refined minus the true ``(a, s)`` of
  ``D = m·I + [[a, s], [s, −a]]``, after removing the gauge directions (a stretch or shear of the
  whole tomogram the images cannot tell from a distortion; ``stage2.aniso_gauge_basis``), and
  ``distortion_true``: the same RMS of the truth;
* ``moved_px``: on the undistorted set, the RMS distance between where the ``--aniso`` run and
  the default run predict the particles (target < 0.01 px).

Everything is written under ``--work`` (default ``/tmp/bench_aniso``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _aniso_skew(projections, image_size_px) -> np.ndarray:
    """``(F, 2)`` ``(a, s)`` of each tilt's distortion."""
    from polish3d.geometry import split_distortion

    d = split_distortion(projections, image_size_px)[0]
    return np.stack([0.5 * (d[:, 0, 0] - d[:, 1, 1]), d[:, 0, 1]], -1)


def _distortion_errors(refined_opt: Path, truth_opt: Path) -> dict:
    """RMS of the refined minus the true ``(a, s)`` off the per-tilt gauge directions, and of the truth."""
    from polish3d.geometry import split_distortion
    from polish3d.refine.stage2 import aniso_gauge_basis
    from polish3d.score import _load

    ref, tru = _load(refined_opt), _load(truth_opt)
    err, true = [], []
    for name, (ts_t, _) in tru.items():
        ts_r = ref[name][0]
        rigid = split_distortion(ts_t.projections, ts_t.image_size_px)[1]
        basis = aniso_gauge_basis(rigid[:, :3, :3], "tilt")
        diff = (_aniso_skew(ts_r.projections, ts_r.image_size_px)
                - _aniso_skew(ts_t.projections, ts_t.image_size_px)).ravel()
        err.append(diff - basis.T @ (basis @ diff))
        true.append(_aniso_skew(ts_t.projections, ts_t.image_size_px).ravel())
    rms = lambda v: float(np.sqrt(np.mean(np.concatenate(v) ** 2)))  # noqa: E731
    return {"distortion_err": rms(err), "distortion_true": rms(true)}


def _moved_px(opt_a: Path, opt_b: Path) -> float:
    """RMS distance (px) between the two refined sets' predictions of the same particles."""
    from polish3d.score import _load, project_particles

    a, b = _load(opt_a), _load(opt_b)
    d = [project_particles(*a[name]) - project_particles(*b[name]) for name in a]
    return float(np.sqrt(np.mean(np.sum(np.concatenate(d) ** 2, axis=-1))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_aniso")
    ap.add_argument("--percent", type=float, default=1.0)
    ap.add_argument("--particles", type=int, default=200)
    ap.add_argument("--image", type=int, default=512)
    ap.add_argument("--step", type=float, default=3.0)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--r", type=float, default=20.0)
    ap.add_argument("--snr", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from polish3d.config import RefineConfig
    from polish3d.driver import AlignInputs, align
    from polish3d.score import score
    from polish3d.simulate import SimulationConfig, simulate

    work = Path(args.work)
    rows = []
    for percent, runs in ((args.percent, ("default", "per_tilt_aniso")), (0.0, ("default", "aniso"))):
        sim = work / f"sim_p{percent:g}_n{args.particles}"
        cfg = SimulationConfig(n_tomograms=1, n_particles=args.particles, box_px=args.box,
                               image_size_px=(args.image, args.image), tilt_step_deg=args.step, snr=args.snr,
                               aniso_percent=percent, seed=args.seed)
        if not (sim / "optimisation_set.star").exists():
            simulate(cfg, sim)
        outs = {}
        for run in runs:
            out = Path("Polish") / run
            options = {} if run == "default" else {run: True}
            t0 = time.perf_counter()
            cwd = os.getcwd()
            os.chdir(sim)
            try:
                align(AlignInputs(i="optimisation_set.star"), out,
                      RefineConfig.build(args.box, r=args.r, **options), write_note=False)
                opt = out / "optimisation_set.star"
                row = {"aniso_percent": percent, "run": run,
                       "reproj_rms_px": score(opt, "truth/optimisation_set.star")["overall"]["rms"],
                       **_distortion_errors(opt, Path("truth/optimisation_set.star")),
                       "seconds": time.perf_counter() - t0}
            finally:
                os.chdir(cwd)
            outs[run] = sim / opt
            rows.append(row)
            print(json.dumps(row), flush=True)
        if percent == 0.0:
            moved = {"aniso_percent": 0.0, "run": "aniso vs default",
                     "moved_px": _moved_px(outs["aniso"], outs["default"])}
            rows.append(moved)
            print(json.dumps(moved), flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
