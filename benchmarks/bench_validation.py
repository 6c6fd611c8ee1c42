"""Held-out validation (issue 14): what the data cannot support keeps its input geometry.

Usage::

    python benchmarks/bench_validation.py [--work DIR] [--only NAME[,NAME]]

Every case simulates the default set (2 tomograms × 80 particles, 41 tilts, box 64; polish3d's
simulator), changes one thing, runs the real ``polish3d align --b 64 --r 20 --j 2`` from the
nominal start and scores the result against the truth:

* ``normal``, ``snr0.05``: nothing changed (default SNR and SNR 0.05): how many tilts are rolled
  back or flagged (should be none) and the RMS with and without validation;
* ``signal_free_tilt``: one tilt of ``TS_01`` replaced by Gaussian noise of the same mean and
  variance (a tilt behind a grid bar): that tilt's error before and after, the other tilts' RMS;
* ``mirrored_reference``, ``random_phase_reference``, ``small_reference``: the half maps (and
  their FSC) of another structure: the phantom's mirror image (wrong hand), a map with the
  phantom's power spectrum and random phases, and a 150 Å phantom instead of 250 Å: the RMS
  against the truth before and after and the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _side_by_side import POLISH3D_MAIN

FLAGS = ["--b", "64", "--r", "20", "--j", "2"]
CASES = ("normal", "snr0.05", "signal_free_tilt", "mirrored_reference", "random_phase_reference",
         "small_reference")
#: the tilt (row of TS_01) replaced by noise in ``signal_free_tilt``
NOISE_TILT = 30


def _polish3d(args, cwd):
    cmd = [sys.executable, "-c", POLISH3D_MAIN]
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, check=True)


def _score(project: Path, opt: str) -> dict:
    from polish3d.score import score

    cwd = os.getcwd()
    os.chdir(project)
    try:
        return score(opt, "truth/optimisation_set.star")
    finally:
        os.chdir(cwd)


def _replace_tilt_by_noise(project: Path, row: int) -> None:
    import mrcfile

    path = project / "tilt_series" / "TS_01.mrcs"
    with mrcfile.open(path, mode="r+", permissive=True) as m:
        img = np.asarray(m.data[row], np.float64)
        rng = np.random.default_rng(11)
        m.data[row] = rng.normal(img.mean(), img.std(), img.shape).astype(m.data.dtype)


def _replace_reference(project: Path, kind: str, cfg) -> None:
    from polish3d.simulate import phantom_volume
    from polish3d.simulate.reference import write_reference_set

    vol = phantom_volume(cfg.box_px, cfg.pixel_size_ang, cfg.particle_diameter_ang)
    if kind == "mirrored_reference":
        vol = vol[::-1].copy()
    elif kind == "random_phase_reference":
        rng = np.random.default_rng(7)
        ft = np.fft.rfftn(vol)
        vol = np.fft.irfftn(np.abs(ft) * np.exp(2j * np.pi * rng.uniform(size=ft.shape)), s=vol.shape)
        vol = (vol / np.abs(vol).max()).astype(np.float32)
    elif kind == "small_reference":
        vol = phantom_volume(cfg.box_px, cfg.pixel_size_ang, 150.0)
    write_reference_set(project / "reference", vol, cfg, np.random.default_rng(5))


def run(name: str, work: Path) -> dict:
    from polish3d.simulate import SimulationConfig, simulate

    cfg = SimulationConfig(snr=0.05) if name == "snr0.05" else SimulationConfig()
    project = work / name
    if project.exists():
        shutil.rmtree(project)
    simulate(cfg, project)
    if name == "signal_free_tilt":
        _replace_tilt_by_noise(project, NOISE_TILT)
    if name.endswith("_reference"):
        _replace_reference(project, name, cfg)
    row = {"case": name}
    for label, extra in (("validated", []), ("off", ["--no_validation"])):
        if label == "off" and name not in ("normal", "snr0.05", "signal_free_tilt"):
            continue
        t0 = time.perf_counter()
        _polish3d(["align", "--i", "optimisation_set.star", *FLAGS, "--o", f"{label}/", *extra], project)
        row[f"{label}_seconds"] = time.perf_counter() - t0
        after = _score(project, f"{label}/optimisation_set.star")
        row[f"{label}_rms"] = after["overall"]["rms"]
        if name == "signal_free_tilt":
            per_tilt = np.asarray(after["tomograms"]["TS_01"]["per_tilt_rms"])
            row[f"{label}_noise_tilt_px"] = float(per_tilt[NOISE_TILT])
            row[f"{label}_others_rms"] = float(np.sqrt(np.mean(np.delete(per_tilt, NOISE_TILT) ** 2)))
        if label == "validated":
            metrics = json.loads((project / label / "metrics.json").read_text())
            v = {k: t.get("validation", {}) for k, t in metrics["tomograms"].items()}
            row["verdicts"] = {k: x.get("verdict") for k, x in v.items()}
            row["rolled_back"] = sum(len(x.get("rolled_back_tilts", [])) for x in v.values())
            row["no_signal"] = sum(len(x.get("no_signal_tilts", [])) for x in v.values())
            row["validation_seconds"] = sum(x.get("seconds", 0.0) for x in v.values())
            row["messages"] = [m for x in v.values() for m in x.get("messages", [])]
    before = _score(project, "optimisation_set.star")
    row["input_rms"] = before["overall"]["rms"]
    if name == "signal_free_tilt":
        row["input_noise_tilt_px"] = float(before["tomograms"]["TS_01"]["per_tilt_rms"][NOISE_TILT])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench_validation_work")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(",") if args.only else CASES:
        row = run(name, work)
        messages = row.pop("messages")
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
              flush=True)
        for m in messages:
            print(f"    message: {m}", flush=True)


if __name__ == "__main__":
    main()
