"""Residual report of a fiducial alignment: a JSON-able dict and a human-readable text."""

from __future__ import annotations

import dataclasses

import numpy as np

from polish3d.fiducials._align import FiducialResult

__all__ = ["report_dict", "report_text"]


def _rms(dx, dy) -> float:
    """Per-coordinate RMS ``sqrt(mean(dx² + dy²) / 2)`` (0 for no points)."""
    dx, dy = np.asarray(dx), np.asarray(dy)
    return float(np.sqrt(np.mean(dx**2 + dy**2) / 2.0)) if dx.size else 0.0


def report_dict(result: FiducialResult) -> dict:
    """Statistics of a fit (JSON-serialisable).

    RMS values are per coordinate, ``sqrt(mean(dx² + dy²) / 2)`` (px; ``*_ang`` in Å), so they
    compare directly with a per-axis tracking noise; ``mean_residual_px`` is the mean 2D
    residual length (what tiltalign calls the residual error mean). ``rms_inliers`` uses the
    points with robust weight ≥ 0.5; ``sigma_px`` is the weighted noise estimate with the
    degrees of freedom removed (``FiducialResult.sigma_px``). ``n_params`` counts every free
    parameter (per-tilt variables, shifts, bead positions; gauge removed), ``n_variables`` the
    same per kind, and ``n_variables_tiltalign`` the count tiltalign prints: per-tilt geometry
    variables plus ``3 (beads − 1)`` bead coordinates, without the shifts (tiltalign solves
    them in closed form from the per-view means).
    """
    res = result.residuals
    px = result.pixel_size_ang
    inl = res["weight"] >= 0.5
    rms_all = _rms(res["dx"], res["dy"])
    rms_in = _rms(res["dx"][inl], res["dy"][inl])
    return {
        "n_tilts": result.n_tilts,
        "n_aligned_tilts": int(np.sum(result.aligned)),
        "n_beads": len(result.bead_ids),
        "n_observations": len(res),
        "n_params": result.n_params,
        "n_variables": dict(result.n_variables),
        "n_variables_tiltalign": _tiltalign_count(result),
        "ref_tilt": result.ref_tilt,
        "stretch_ref_tilt": result.stretch_ref_tilt,
        "tilt_axis_deg": result.tilt_axis_deg,
        "image_size_px": list(result.image_size_px),
        "tomo_size_px": list(result.tomo_size_px),
        "pixel_size_ang": px,
        "options": dataclasses.asdict(result.options),
        "rms_px": rms_all,
        "rms_ang": rms_all * px,
        "rms_inliers_px": rms_in,
        "rms_inliers_ang": rms_in * px,
        "mean_residual_px": float(res["dist"].mean()),
        "sigma_px": result.sigma_px,
        "sigma_ang": result.sigma_px * px,
        "n_downweighted": int(np.sum(res["weight"] < 0.5)),
        "n_rejected": int(np.sum(res["weight"] == 0.0)),
        "per_tilt": _per_tilt(result),
        "per_bead": _per_bead(result),
        "largest_residuals": _largest_residuals(result),
        "notes": list(result.notes),
    }


def _per_tilt(result: FiducialResult) -> list[dict]:
    """One record per tilt (file order): fitted geometry, observation count and RMS."""
    px = result.pixel_size_ang
    by_tilt = dict(list(result.residuals.groupby("tilt")))
    rows = []
    for i in range(result.n_tilts):
        g = by_tilt.get(i)
        rms = _rms(g["dx"], g["dy"]) if g is not None else 0.0
        rows.append({
            "index": i,
            "nominal_tilt_deg": float(result.nominal_tilt_deg[i]),
            "tilt_deg": float(result.tilt_deg[i]),
            "rotation_deg": float(result.rotation_deg[i]),
            "magnification": float(result.magnification[i]),
            "stretch": float(result.stretch[i]),
            "skew_deg": float(result.skew_deg[i]),
            "shift_x_px": float(result.shifts_px[i, 0]),
            "shift_y_px": float(result.shifts_px[i, 1]),
            "aligned": bool(result.aligned[i]),
            "n_obs": 0 if g is None else len(g),
            "rms_px": rms,
            "rms_ang": rms * px,
        })
    return rows


def _per_bead(result: FiducialResult) -> list[dict]:
    """One record per kept bead: 3D position (voxels), observation count and RMS."""
    px = result.pixel_size_ang
    by_bead = dict(list(result.residuals.groupby("bead")))
    rows = []
    for k, b in enumerate(result.bead_ids):
        g = by_bead[b]
        x = result.bead_positions_px[k]
        rms = _rms(g["dx"], g["dy"])
        rows.append({"bead": int(b), "x_px": float(x[0]), "y_px": float(x[1]),
                     "z_px": float(x[2]), "n_obs": len(g), "rms_px": rms, "rms_ang": rms * px})
    return rows


def _largest_residuals(result: FiducialResult) -> list[dict]:
    """The ``options.n_largest`` largest residuals, largest first."""
    px = result.pixel_size_ang
    top = result.residuals.sort_values("dist", ascending=False).head(result.options.n_largest)
    return [{
        "rank": r + 1, "bead": int(row.bead), "tilt": int(row.tilt), "x_px": float(row.x),
        "y_px": float(row.y), "dx_px": float(row.dx), "dy_px": float(row.dy),
        "dist_px": float(row.dist), "dist_ang": float(row.dist) * px, "weight": float(row.weight),
    } for r, row in enumerate(top.itertuples())]


def _tiltalign_count(result: FiducialResult) -> int:
    nv = result.n_variables
    if not nv:
        return 0
    geom = sum(nv.get(k, 0) for k in ("rotation", "tilt", "magnification", "stretch", "skew"))
    return int(geom + 3 * (len(result.bead_ids) - 1))


def report_text(rep: dict) -> str:
    """Human-readable tables of :func:`report_dict`."""
    px = rep["pixel_size_ang"]
    out = [
        "polish3d fiducials — bead bundle adjustment",
        f"tilts {rep['n_tilts']} (aligned {rep['n_aligned_tilts']}), beads {rep['n_beads']}, "
        f"observations {rep['n_observations']}, free parameters {rep['n_params']} "
        f"(tiltalign's count, without shifts: {rep.get('n_variables_tiltalign', 0)}), "
        f"reference tilt {rep['ref_tilt']}, pixel size {px:g} Å",
        "variables: " + ", ".join(f"{k} {v}" for k, v in rep.get("n_variables", {}).items()),
        f"residual RMS per coordinate: all {rep['rms_px']:.3f} px ({rep['rms_ang']:.2f} Å), "
        f"inliers {rep['rms_inliers_px']:.3f} px ({rep['rms_inliers_ang']:.2f} Å); "
        f"mean 2D residual {rep['mean_residual_px']:.3f} px; noise estimate "
        f"{rep['sigma_px']:.3f} px; down-weighted {rep['n_downweighted']}, "
        f"rejected {rep['n_rejected']}",
    ]
    out += [f"note: {n}" for n in rep["notes"]]
    out += ["", "per tilt:",
            f"{'tilt':>4} {'nominal':>8} {'fitted':>8} {'rotation':>9} {'mag':>8} "
            f"{'dmag':>8} {'skew':>7} {'shift_x':>8} {'shift_y':>8} {'n':>4} {'rms_px':>7} {'rms_Å':>7}"]
    for t in rep["per_tilt"]:
        flag = "" if t["aligned"] else "  (not aligned)"
        out.append(
            f"{t['index']:4d} {t['nominal_tilt_deg']:8.2f} {t['tilt_deg']:8.3f} "
            f"{t['rotation_deg']:9.3f} {t['magnification']:8.5f} {t.get('stretch', 0.0):8.5f} "
            f"{t.get('skew_deg', 0.0):7.3f} {t['shift_x_px']:8.2f} "
            f"{t['shift_y_px']:8.2f} {t['n_obs']:4d} {t['rms_px']:7.3f} {t['rms_ang']:7.2f}{flag}")
    out += ["", "per bead:",
            f"{'bead':>5} {'x_px':>9} {'y_px':>9} {'z_px':>9} {'n':>4} {'rms_px':>7} {'rms_Å':>7}"]
    for b in rep["per_bead"]:
        out.append(f"{b['bead']:5d} {b['x_px']:9.2f} {b['y_px']:9.2f} {b['z_px']:9.2f} "
                   f"{b['n_obs']:4d} {b['rms_px']:7.3f} {b['rms_ang']:7.2f}")
    out += ["", "largest residuals:",
            f"{'rank':>4} {'bead':>5} {'tilt':>4} {'x_px':>9} {'y_px':>9} {'dx':>8} {'dy':>8} "
            f"{'|r|_px':>7} {'|r|_Å':>8} {'weight':>6}"]
    for r in rep["largest_residuals"]:
        out.append(f"{r['rank']:4d} {r['bead']:5d} {r['tilt']:4d} {r['x_px']:9.2f} "
                   f"{r['y_px']:9.2f} {r['dx_px']:8.3f} {r['dy_px']:8.3f} {r['dist_px']:7.3f} "
                   f"{r['dist_ang']:8.2f} {r['weight']:6.3f}")
    return "\n".join(out) + "\n"
