"""Benchmark of ``polish3d.fiducials`` on simulated bead tracks (prints the figures of docs).

Run: ``python benchmarks/bench_fiducials.py [--seeds 10] [--imod_dir DIR] [--only
distortion|imod]``; ``--imod_dir`` compares with tiltalign on IMOD's tutorial bead models.
Geometry error = 2D RMS distance
(px) between the true beads projected with the fitted and with the true matrices, either in the
gauge fixed by align_fiducials ("raw") or after the best exact gauge transform ("aligned";
translation, scale, rotation about the tilt axis: these leave every residual unchanged).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import scipy.optimize

from polish3d.fiducials import FiducialOptions, align_fiducials, simulate_bead_tracks
from polish3d.fiducials._bundle import BundleProblem, levenberg_marquardt, param_map
from polish3d.geometry import project_points, rot_y


def geometry_error(projections, truth, align_gauge, distortion=False):
    """2D RMS reprojection difference of the true beads (px), optionally gauge-aligned.

    With ``distortion`` the gauge also holds the transforms that fits with per-tilt X-stretch
    and skew cannot see (X stretch, X→Y shear, z scale and X→z shear of the beads).
    """
    x = truth["bead_positions_px"]
    b = project_points(truth["projections"], x)
    c = x.mean(0)
    n = 9 if distortion else 5

    def f(g):
        g = np.concatenate([g, np.zeros(9 - len(g))])
        d = np.array([[1 + g[5], 0, 0], [g[6], 1, 0], [g[8], 0, 1 + g[7]]])
        xg = (1 + g[3]) * (x - c) @ d.T @ rot_y(np.rad2deg(g[4])).T + c + g[:3]
        return (project_points(projections, xg) - b).ravel()

    g = scipy.optimize.least_squares(f, np.zeros(n)).x if align_gauge else np.zeros(n)
    return float(np.sqrt(np.mean(f(g) ** 2) * 2))


def fit(tracks, truth, **opts):
    """align_fiducials on simulated data; returns (result, seconds)."""
    t0 = time.perf_counter()
    r = align_fiducials(tracks, truth["nominal_tilt_deg"], truth["tilt_axis_deg"],
                        truth["image_size_px"], tomo_size_px=truth["tomo_size_px"],
                        options=FiducialOptions(**opts))
    return r, time.perf_counter() - t0


def _problem(tracks, truth, distortion=False):
    """The per-tilt problem (every parameter per tilt) and the true parameter vector, with the
    gauge constraints of align_fiducials."""
    f = len(truth["nominal_tilt_deg"])
    th = np.deg2rad(truth["nominal_tilt_deg"])
    order = np.argsort(th)
    e = np.zeros(f)
    e[truth["ref_tilt"]] = 1
    ones_tan = np.vstack([np.ones(f), np.tan(th)])
    maps = [param_map("per_tilt", f, order, 5),
            param_map("per_tilt", f, order, 5, constraint=ones_tan if distortion else np.ones(f)),
            param_map("per_tilt", f, order, 5, constraint=e)]
    if distortion:
        maps += [param_map("per_tilt", f, order, 5, constraint=ones_tan),
                 param_map("per_tilt", f, order, 5, constraint=np.ones(f))]
    prob = BundleProblem(tracks.tilt, tracks.bead, tracks[["x", "y"]].to_numpy(),
                         np.full(f, np.deg2rad(truth["tilt_axis_deg"])), th, *maps[:3],
                         np.array(truth["image_size_px"]) // 2,
                         b_stretch=maps[3] if distortion else None,
                         b_skew=maps[4] if distortion else None)
    c = np.array(truth["tomo_size_px"]) // 2
    ic = np.array(truth["image_size_px"]) // 2
    values = [np.deg2rad(truth["rotation_deg"]) - prob.psi0, np.deg2rad(truth["tilt_deg"]) - th,
              truth["magnification"] - 1]
    if distortion:
        values += [truth["stretch"], np.deg2rad(truth["skew_deg"])]
    q = [np.linalg.lstsq(m, v, rcond=None)[0] for m, v in zip(prob.b, values, strict=False)]
    p = prob.pack(q, truth["shifts_px"] + ic, truth["bead_positions_px"] - c)
    return prob, p


def least_squares_floor(truth, noise_px=0.3, distortion=False):
    """Expected raw geometry error of the least-squares estimate (linearised covariance)."""
    f = len(truth["nominal_tilt_deg"])
    nb = len(truth["bead_positions_px"])
    ti, bj = (a.ravel() for a in np.meshgrid(np.arange(f), np.arange(nb), indexing="ij"))
    uv = project_points(truth["projections"], truth["bead_positions_px"]).reshape(-1, 2)
    full = pd.DataFrame({"tilt": ti, "bead": bj, "x": uv[:, 0], "y": uv[:, 1]})
    prob, p = _problem(full, truth, distortion)
    j = prob.jacobian(p).toarray()
    jo = j[:-3]
    h = j.T @ j
    hi = np.linalg.inv(h)
    cov = noise_px**2 * hi @ (jo.T @ jo) @ hi
    n_tilt_params = prob.n_params - 3 * nb
    g = jo[:, :n_tilt_params]
    ct = cov[:n_tilt_params, :n_tilt_params]
    return float(np.sqrt(np.trace(g @ ct @ g.T) / len(ti)))


def _rms(r):
    e = r.residuals
    return float(np.sqrt(np.mean(e.dx**2 + e.dy**2) / 2))


def distortion_cases(seeds):
    """tiltalign-like tracks with per-view X-stretch and skew; and undistorted tracks fitted
    with the distortion terms switched on."""
    print("\n== tiltalign-like: 25 beads x 61 tilts (±60°), 0.3 px noise, per-tilt errors as above"
          " plus X-stretch (dmag) uniform ±1 % and skew N(0, 0.3°)")
    kw = dict(n_beads=25, n_tilts=61, stretch_error=0.01, skew_error_deg=0.3)
    for label, opts in (("without stretch/skew", {}),
                        ("stretch+skew per_tilt", dict(stretch="per_tilt", skew="per_tilt"))):
        raw, al, rms, fl, sig, dstr, dskw, dt, npar = [], [], [], [], [], [], [], [], []
        for s in seeds:
            tracks, truth = simulate_bead_tracks(seed=s, **kw)
            r, t = fit(tracks, truth, **opts)
            raw.append(geometry_error(r.projections, truth, False))
            al.append(geometry_error(r.projections, truth, True, distortion=True))
            n = 2 * len(r.residuals)
            rms.append(_rms(r))
            fl.append(0.3 * np.sqrt((n - r.n_params) / n))
            sig.append(r.sigma_px)
            dstr.append(np.sqrt(np.mean((r.stretch - truth["stretch"]) ** 2)))
            dskw.append(np.sqrt(np.mean((r.skew_deg - truth["skew_deg"]) ** 2)))
            dt.append(t)
            npar.append(r.n_params)
        print(f"{label:22s} residual RMS/axis {np.mean(rms):.4f} px vs LS floor "
              f"0.3*sqrt((n-p)/n) = {np.mean(fl):.4f} px (p = {npar[0]}); noise estimate "
              f"{np.mean(sig):.4f}; geometry raw mean {np.mean(raw):.3f} max {np.max(raw):.3f}, "
              f"aligned mean {np.mean(al):.3f} max {np.max(al):.3f} px; dmag error RMS "
              f"{np.mean(dstr):.4f}, skew error RMS {np.mean(dskw):.3f}°; "
              f"{np.mean(dt) * 1e3:.0f} ms")
    floor = np.mean([least_squares_floor(simulate_bead_tracks(seed=s, **kw)[1], distortion=True)
                     for s in seeds])
    print(f"linearised LS floor of the raw geometry error (per-tilt model with distortion, same "
          f"gauge): {floor:.3f} px")

    print("\n== same, distortion grouped as tiltalign's default (stretch groups of 7, skew groups of"
          " 11, linear between centres)")
    kwg = dict(kw, stretch_group=7, skew_group=11)
    for label, opts in (("stretch 7 / skew 11 grouped",
                         dict(stretch="grouped", stretch_group=7, skew="grouped", skew_group=11)),
                        ("stretch+skew per_tilt", dict(stretch="per_tilt", skew="per_tilt"))):
        raw, rms, fl, dstr, dskw = [], [], [], [], []
        for s in seeds:
            tracks, truth = simulate_bead_tracks(seed=s, **kwg)
            r, _ = fit(tracks, truth, **opts)
            raw.append(geometry_error(r.projections, truth, False))
            n = 2 * len(r.residuals)
            rms.append(_rms(r))
            fl.append(0.3 * np.sqrt((n - r.n_params) / n))
            dstr.append(np.sqrt(np.mean((r.stretch - truth["stretch"]) ** 2)))
            dskw.append(np.sqrt(np.mean((r.skew_deg - truth["skew_deg"]) ** 2)))
        print(f"{label:28s} residual {np.mean(rms):.4f} (floor {np.mean(fl):.4f}) px; geometry raw "
              f"mean {np.mean(raw):.3f} max {np.max(raw):.3f} px; dmag error RMS "
              f"{np.mean(dstr):.5f}, skew error RMS {np.mean(dskw):.4f}°")

    print("\n== undistorted 20 x 41 tracks (the first case) fitted with and without stretch/skew")
    for label, opts in (("without", {}), ("stretch+skew per_tilt",
                                          dict(stretch="per_tilt", skew="per_tilt")),
                        ("stretch 7 / skew 11 grouped",
                         dict(stretch="grouped", stretch_group=7, skew="grouped", skew_group=11))):
        al, rms, fl, ms, mk = [], [], [], [], []
        for s in seeds:
            tracks, truth = simulate_bead_tracks(seed=s)
            r, _ = fit(tracks, truth, **opts)
            al.append(geometry_error(r.projections, truth, True, distortion=True))
            n = 2 * len(r.residuals)
            rms.append(_rms(r))
            fl.append(0.3 * np.sqrt((n - r.n_params) / n))
            ms.append(np.sqrt(np.mean(r.stretch**2)))
            mk.append(np.sqrt(np.mean(r.skew_deg**2)))
        print(f"{label:28s} residual {np.mean(rms):.4f} (floor {np.mean(fl):.4f}) px; geometry "
              f"aligned (distortion gauge) mean {np.mean(al):.3f} max {np.max(al):.3f} px; "
              f"|dmag| RMS {np.mean(ms):.4f}, |skew| RMS {np.mean(mk):.3f}°")
    floor0 = np.mean([least_squares_floor(simulate_bead_tracks(seed=s)[1], distortion=True)
                      for s in seeds])
    print(f"linearised LS floor, raw gauge, per-tilt model with distortion: {floor0:.3f} px")


def imod_models(imod_dir):
    """polish3d beside tiltalign on IMOD bead models: ``<imod_dir>/BB{a,b}.fid``, ``.rawtlt``,
    ``align{a,b}.com`` and ``align{a,b}.log`` (IMOD's dual-axis tutorial, finalFiles)."""
    import re
    from pathlib import Path

    from polish3d.fiducials import read_tracks, report_dict

    d = Path(imod_dir)
    configs = {
        "rot per_tilt, tilt+mag grouped 5 (no distortion)":
            dict(tilt="grouped", magnification="grouped"),
        "tiltalign's align.com: rot+mag per_tilt, tilt grouped 5, stretch 7, skew 11":
            dict(tilt="grouped", tilt_group=5, stretch="grouped", stretch_group=7,
                 skew="grouped", skew_group=11),
        "same with --cosine_groups": dict(tilt="grouped", tilt_group=5, stretch="grouped",
                                          stretch_group=7, skew="grouped", skew_group=11,
                                          cosine_groups=True),
        "rot+mag per_tilt, tilt grouped 5, stretch grouped 4, skew grouped 11":
            dict(tilt="grouped", tilt_group=5, stretch="grouped", stretch_group=4,
                 skew="grouped", skew_group=11),
        "all per_tilt, stretch+skew per_tilt": dict(stretch="per_tilt", skew="per_tilt"),
    }
    for ab in "ab":
        com = (d / f"align{ab}.com").read_text()
        log = (d / f"align{ab}.log").read_text()
        off = float(re.search(r"\nAngleOffset\s+(\S+)", com).group(1))
        rot = float(re.search(r"\nRotationAngle\s+(\S+)", com).group(1))
        ta_mean = float(re.search(r"Residual error mean and sd:\s+(\S+)", log).group(1))
        ta_nvar = int(re.search(r"variables in search.*?=\s*\d+/\s*(\d+)", log).group(1))
        resid = np.loadtxt(d / f"BB{ab}.resid", skiprows=1)
        ta_rms = float(np.sqrt(np.mean(np.sum(resid[:, 3:5] ** 2, 1)) / 2))
        tracks = read_tracks(d / f"BB{ab}.fid")
        tilt = np.loadtxt(d / f"BB{ab}.rawtlt") + off
        print(f"\n== BB{ab}.fid: {tracks.bead.nunique()} beads x {tracks.tilt.nunique()} views; "
              f"tiltalign: mean residual {ta_mean:.3f} px, RMS/axis {ta_rms:.4f} px (.resid), "
              f"{ta_nvar} variables")
        for label, kw in configs.items():
            r, t = None, time.perf_counter()
            r = align_fiducials(tracks, tilt, rot, (512, 512), options=FiducialOptions(**kw))
            rep = report_dict(r)
            print(f"  {label:78s} mean {rep['mean_residual_px']:.4f} px, RMS/axis "
                  f"{rep['rms_px']:.4f} px, {rep['n_variables_tiltalign']} variables "
                  f"({time.perf_counter() - t:.2f} s)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--imod_dir", default="", help="folder with IMOD's tutorial bead models "
                    "(BBa.fid, BBa.rawtlt, aligna.com, aligna.log, BBa.resid, and b): compare "
                    "with tiltalign")
    ap.add_argument("--only", default="", help="run only: distortion or imod")
    args = ap.parse_args()
    seeds = range(args.seeds)
    if args.only == "imod":
        imod_models(args.imod_dir)
        return
    if args.only == "distortion":
        distortion_cases(seeds)
        return

    print("== 20 beads x 41 tilts (±60°), 0.3 px noise, per-tilt rot/tilt/mag(±1 %)/shift errors")
    raw, al, rms, exp, sig, dt = [], [], [], [], [], []
    for s in seeds:
        tracks, truth = simulate_bead_tracks(seed=s)
        r, t = fit(tracks, truth)
        raw.append(geometry_error(r.projections, truth, False))
        al.append(geometry_error(r.projections, truth, True))
        e = r.residuals
        rms.append(np.sqrt(np.mean(e.dx**2 + e.dy**2) / 2))
        exp.append(0.3 * np.sqrt(1 - r.n_params / (2 * len(e))))
        sig.append(r.sigma_px)
        dt.append(t)
    floor = np.mean([least_squares_floor(simulate_bead_tracks(seed=s)[1]) for s in seeds])
    print(f"geometry error raw     mean {np.mean(raw):.3f} max {np.max(raw):.3f} px "
          f"(linearised LS floor, same gauge: {floor:.3f} px)")
    print(f"geometry error aligned mean {np.mean(al):.3f} max {np.max(al):.3f} px")
    print(f"residual RMS/axis      mean {np.mean(rms):.4f} px; 0.3*sqrt(1-p/n) = "
          f"{np.mean(exp):.4f} px; noise estimate {np.mean(sig):.4f} px")
    print(f"time per fit           {np.mean(dt) * 1e3:.0f} ms (median {np.median(dt) * 1e3:.0f})")

    print("\n== same, 5 % of the points displaced by 5–20 px")
    for robust in ("none", "huber", "tukey"):
        raw, al, prec, dt = [], [], [], []
        for s in seeds:
            tracks, truth = simulate_bead_tracks(seed=s, outlier_fraction=0.05)
            r, t = fit(tracks, truth, robust=robust)
            raw.append(geometry_error(r.projections, truth, False))
            al.append(geometry_error(r.projections, truth, True))
            n = int(tracks.outlier.sum())
            top = r.residuals.sort_values("dist", ascending=False).head(n)
            prec.append(tracks.outlier.to_numpy()[top.index].mean())
            dt.append(t)
        print(f"robust={robust:5s} geometry raw mean {np.mean(raw):.3f} max {np.max(raw):.3f}; "
              f"aligned mean {np.mean(al):.3f} max {np.max(al):.3f} px; outliers in top-n "
              f"{np.mean(prec) * 100:.1f} % (min {np.min(prec) * 100:.0f} %); "
              f"{np.mean(dt) * 1e3:.0f} ms")

    print("\n== solver comparison (clean 20x41, seed 0; start: nominal angles, true shifts/beads)")
    tracks, truth = simulate_bead_tracks(seed=0)
    prob, p_true = _problem(tracks, truth)
    p0 = p_true.copy()
    p0[: sum(prob.k)] = 0.0
    w = np.ones(prob.n_obs)
    t0 = time.perf_counter()
    p_lm, c_lm, it = levenberg_marquardt(prob, p0, w)
    t_lm = time.perf_counter() - t0
    print(f"own LM (dense normal eq., sparse J)   cost {c_lm:.6f}  {it} it  {t_lm * 1e3:.0f} ms")
    for solver in ("exact", "lsmr"):
        t0 = time.perf_counter()
        jac = (lambda q: prob.jacobian(q).toarray()) if solver == "exact" else prob.jacobian
        res = scipy.optimize.least_squares(prob.residuals, p0, jac=jac, method="trf",
                                           tr_solver=solver, x_scale="jac")
        t = time.perf_counter() - t0
        print(f"scipy least_squares trf/{solver:5s}        cost {res.cost:.6f}  {res.nfev} fev "
              f"{t * 1e3:.0f} ms")

    print("\n== scaling (per-tilt everything, clean)")
    for nb, nt in ((20, 41), (100, 61), (300, 61)):
        tracks, truth = simulate_bead_tracks(n_beads=nb, n_tilts=nt, seed=0)
        r, t = fit(tracks, truth)
        print(f"{nb:4d} beads x {nt} tilts: {len(tracks):6d} points, {r.n_params:5d} params, "
              f"{t * 1e3:6.0f} ms, geometry aligned "
              f"{geometry_error(r.projections, truth, True):.3f} px")

    distortion_cases(seeds)
    if args.imod_dir:
        imod_models(args.imod_dir)


if __name__ == "__main__":
    main()
