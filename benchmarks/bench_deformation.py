"""Recovery of simulated 2D deformations by ``polish3d align --deformation`` (issue 6 figures).

Usage::

    python benchmarks/bench_deformation.py [--work DIR] [--amplitude 2.5] [--grid 3]
        [--particles 60] [--image 384] [--step 4] [--models spline,Fourier] [--per_series]
        [--fit_grid g] [--no_control] [--shrink 0.01]

For a warped simulation (``SimulationConfig.deformation_amplitude_px``: a per-tilt spline) and an
unwarped one (amplitude 0) it runs the alignment without a deformation model and with each
model (``--per_frame_deformation`` unless ``--per_series``; grid ``g × g``) and prints:

* ``reproj``: RMS reprojection error against the truth (``polish3d.score``; gauge-invariant,
  includes the deformation), px;
* ``field``: RMS of the estimated field over the truth's 2D particle positions, px;
* ``field_err``: RMS of (estimated − true) field at those positions after removing, per tilt,
  the least-squares rigid part (x/y offset and in-plane rotation: what the per-tilt shifts and
  ψ absorb), px;
* ``field_err_affine``: the same after removing the per-tilt least-squares *affine* part (for a
  thin specimen the per-tilt tilt angles φ, θ act almost like affine fields), px;
* ``truth_nonrigid``: the same measure for a zero estimate (the warp's non-rigid size), px.

Everything is written under ``--work`` (default ``/tmp/bench_deformation``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _fields(ts, u):
    """``(N, F, 2)`` deformation of ``ts`` at points ``u`` ``(N, F, 2)`` (zeros if none)."""
    from polish3d.score import evaluate_deformation

    if ts.deformation is None:
        return np.zeros_like(u)
    return np.stack(
        [evaluate_deformation(ts.deformation, ts.image_size_px, u[:, j], j) for j in range(u.shape[1])], 1
    )


def _field_measures(refined_opt: Path, truth_opt: Path) -> dict:
    from polish3d.refine.deformation import rigid_residual
    from polish3d.score import _load, project_particles

    ref = _load(refined_opt)
    tru = _load(truth_opt)
    out = {"field": [], "field_err": [], "field_err_affine": [], "truth_nonrigid": []}
    for name, (ts_t, p_t) in tru.items():
        ts_r, _ = ref[name]
        u = project_particles(ts_t, p_t)  # (N, F, 2) true positions
        d_t = _fields(ts_t, u)
        d_r = _fields(ts_r, u)
        for j in range(u.shape[1]):
            out["field"].append(d_r[:, j])
            out["field_err"].append(rigid_residual(d_r[:, j] - d_t[:, j], u[:, j], ts_t.image_size_px))
            a = np.c_[np.ones(len(u)), u[:, j]]
            e = d_r[:, j] - d_t[:, j]
            out["field_err_affine"].append(e - a @ np.linalg.lstsq(a, e, rcond=None)[0])
            out["truth_nonrigid"].append(rigid_residual(d_t[:, j], u[:, j], ts_t.image_size_px))
    return {k: float(np.sqrt(np.mean(np.sum(np.concatenate(v) ** 2, -1)))) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_deformation")
    ap.add_argument("--amplitude", type=float, default=2.5)
    ap.add_argument("--no_control", action="store_true", help="skip the unwarped simulation")
    ap.add_argument("--fit_grid", type=int, default=0, help="model grid (default: --grid)")
    ap.add_argument("--grid", type=int, default=3)
    ap.add_argument("--particles", type=int, default=60)
    ap.add_argument("--image", type=int, default=384)
    ap.add_argument("--step", type=float, default=4.0)
    ap.add_argument("--models", default="spline,Fourier")
    ap.add_argument("--per_series", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shrink", type=float, default=0.01)
    args = ap.parse_args()

    from polish3d.config import RefineConfig
    from polish3d.driver import AlignInputs, align
    from polish3d.refine.deformation import DeformationConfig
    from polish3d.refine.tomogram import AlignConfig
    from polish3d.score import score
    from polish3d.simulate import SimulationConfig, simulate

    work = Path(args.work)
    rows = []
    fit = args.fit_grid or args.grid
    for amp in (args.amplitude,) if args.no_control else (args.amplitude, 0.0):
        sim = work / f"sim_a{amp:g}_g{args.grid}_n{args.particles}"
        cfg = SimulationConfig(
            n_tomograms=1,
            n_particles=args.particles,
            n_unlisted=0,
            box_px=48,
            image_size_px=(args.image, args.image),
            tilt_step_deg=args.step,
            deformation_amplitude_px=amp,
            deformation_grid=(args.grid, args.grid),
            seed=args.seed,
        )
        if not (sim / "optimisation_set.star").exists():
            simulate(cfg, sim)
        for model in ["none"] + args.models.split(","):
            out = sim / "Polish" / f"{model}{fit}{'_series' if args.per_series else ''}"
            dcfg = (
                None
                if model == "none"
                else DeformationConfig(model, (fit, fit), per_tilt=not args.per_series, shrink=args.shrink)
            )
            t0 = time.perf_counter()
            cwd = os.getcwd()
            os.chdir(sim)
            try:
                align(
                    AlignInputs(i="optimisation_set.star"),
                    out.relative_to(sim),
                    RefineConfig(AlignConfig(box=48, r=10), deformation=dcfg),
                    write_note=False,
                )
                opt = out.relative_to(sim) / "optimisation_set.star"
                sc = score(opt, "truth/optimisation_set.star")["overall"]
                fm = _field_measures(opt, Path("truth/optimisation_set.star"))
            finally:
                os.chdir(cwd)
            row = {
                "amplitude_px": amp,
                "model": model,
                "reproj_rms_px": sc["rms"],
                **fm,
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
