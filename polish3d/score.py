"""Reprojection error of a refined optimisation set against the ground truth (``polish3d score``).

**Measure.** For every listed particle ``p`` (matched by ``rlnTomoParticleName``) and every tilt
``j`` (matched by row of the per-tilt tables) we compare where the two sets *project* the
particle: ``u_pj = u + def_j(u)``, ``u = xy(P_j · [X_p + m_pj; 1])`` with the set's own
projection ``P_j`` (tilt-series STAR; with its image distortion, if any), static position
``X_p`` (particles.star), motion ``m_pj`` (motion.star, if any) and 2D deformation ``def_j`` (if
any). The distance ``|u_ref − u_true|`` (pixels) is summarised as RMS, median, 95th percentile
and maximum, overall, per tomogram and per tilt.

**Gauge.** The data only constrain 2D projections: moving all particles by one 3D rigid motion
``G`` and replacing every ``P_j`` by ``P_j·G⁻¹`` leaves every ``u_pj`` unchanged. The projected
distances above are therefore already gauge-invariant and need no alignment. Tilt *angles*,
however, depend on the gauge, so for the angle errors the refined frame is first aligned to
the true frame by the least-squares rigid transform ``X_true ≈ R·X_ref + t`` of the particle
positions (Kabsch); the refined projections become ``P_j·T⁻¹`` and the camera-frame rotation
error ``angle(A'_j · A_jᵀ)`` (degrees) is reported, with the residual 3D position error
(``A`` the rotation of a distorted matrix, :func:`polish3d.geometry.split_distortion`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from polish3d import geometry as geo
from polish3d.model import Deformation

__all__ = ["evaluate_deformation", "project_particles", "register_cli", "rigid_align", "score"]


# ----------------------------------------------------------------------------------------------
# projecting: the refinement's forward model (polish3d.refine.forward), fields in float64
# ----------------------------------------------------------------------------------------------


def evaluate_deformation(deformation: Deformation | None, image_size_px, points_px, tilt: int):
    """The 2D deformation ``def_j(u)`` (pixels) of tilt ``tilt`` at image points ``u``.

    RELION's ``spline`` (cubic Hermite on a ``gw × gh`` node grid spanning the image, layout
    ``((dim·gh + iy)·gw + ix)·4 + {value, slope_x, slope_y, twist}``), ``linear``
    (``(a_xx·rx, a_xy·rx + a_yy·ry)`` about the image centre) and ``Fourier`` models (spec §4),
    evaluated by the refinement's own model (:mod:`polish3d.refine.deformation`) in float64.

    Args:
        deformation: the model (``None`` ⇒ zeros).
        image_size_px: ``(W, H)``.
        points_px: ``(N, 2)`` positions ``(x, y)``.
        tilt: row of ``deformation.coefficients``.

    Returns:
        ``(N, 2)`` displacement to add to the points.
    """
    from polish3d.refine import forward
    from polish3d.refine.deformation import fixed_model

    pts = np.asarray(points_px, dtype=np.float64).reshape(-1, 2)
    if deformation is None:
        return np.zeros_like(pts)
    if deformation.model not in ("spline", "Fourier", "linear"):
        raise ValueError(f"unknown deformation model {deformation.model!r}")
    coeffs = np.asarray(deformation.coefficients, np.float64)[tilt : tilt + 1]
    moved = forward.deform_host(pts[:, None, :], fixed_model(deformation, image_size_px), coeffs,
                                field_dtype=np.float64)
    return moved[:, 0] - pts


def project_particles(ts, particles) -> np.ndarray:
    """``(N, F, 2)`` 2D positions of particles in every tilt (projection, motion, deformation).

    The refinement's forward model (:func:`polish3d.refine.forward.predict_host`), with the
    deformation field in float64.

    Args:
        ts: :class:`~polish3d.model.TiltSeriesData`.
        particles: :class:`~polish3d.model.ParticleData` (``trajectories_px`` used if present).
    """
    from polish3d.refine import forward
    from polish3d.refine.deformation import fixed_model

    x = np.asarray(particles.positions_px, dtype=np.float64)
    pts = np.broadcast_to(x[:, None, :], (len(x), ts.n_tilts, 3))
    if particles.trajectories_px is not None:
        pts = pts + np.asarray(particles.trajectories_px, np.float64)
    d = ts.deformation
    model = None if d is None else fixed_model(d, ts.image_size_px)
    u, _ = forward.predict_host(ts.projections, pts, model, None if d is None else d.coefficients,
                                field_dtype=np.float64)
    return u


def _load(opt_path):
    from polish3d.io import relion
    from polish3d.io.star import read_star

    # RELION resolves paths against the project folder (the cwd); sets written by polish3d's
    # simulator are self-contained, with paths relative to their own folder: use that folder
    # when the entries do not exist relative to the cwd.
    project_dir = None
    raw = next((b for b in read_star(opt_path).values() if isinstance(b, dict)), {})
    entry = str(raw.get("rlnTomoTomogramsFile", "")).strip()
    if entry and not Path(entry).is_absolute() and not Path(entry).exists():
        if (Path(opt_path).parent / entry).exists():
            project_dir = Path(opt_path).parent
    opt = relion.read_optimisation_set(opt_path, project_dir=project_dir)
    if opt.tomograms_file is None or opt.particles_file is None:
        raise ValueError(f"{opt_path}: needs rlnTomoTomogramsFile and rlnTomoParticlesFile")
    tomos = relion.read_tomogram_set(opt.tomograms_file, project_dir=project_dir)
    parts = relion.read_particle_set(opt.particles_file)
    traj = (
        relion.read_trajectories(opt.trajectories_file)
        if opt.trajectories_file is not None
        else None
    )
    out = {}
    for name in tomos.names:
        ts = tomos.tilt_series(name, load_images=False)
        pd_ = parts.for_tomogram(ts, traj, require_half_set=False)
        if pd_.n_particles:
            out[name] = (ts, pd_)
    return out


def rigid_align(src, dst):
    """Least-squares rigid ``(R, t)`` with ``dst ≈ R·src + t`` (Kabsch, proper rotation)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    u, _, vt = np.linalg.svd((dst - md).T @ (src - ms))
    d = np.sign(np.linalg.det(u @ vt))
    r = u @ np.diag([1.0, 1.0, d]) @ vt
    return r, md - r @ ms


def _rotation_angle_deg(m):
    tr = np.clip((np.trace(m, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    return np.rad2deg(np.arccos(tr))


def _stats(d):
    d = np.asarray(d, np.float64).ravel()
    if d.size == 0:
        return {
            "rms": float("nan"),
            "median": float("nan"),
            "p95": float("nan"),
            "max": float("nan"),
            "n": 0,
        }
    return {
        "rms": float(np.sqrt(np.mean(d * d))),
        "median": float(np.median(d)),
        "p95": float(np.percentile(d, 95)),
        "max": float(d.max()),
        "n": int(d.size),
    }


def score(refined_set, truth_set) -> dict:
    """Score a refined optimisation set against the truth (see the module docstring).

    Args:
        refined_set: path of the refined ``optimisation_set.star``.
        truth_set: path of the true one (e.g. ``<sim>/truth/optimisation_set.star``).

    Returns:
        ``{"overall": stats, "tomograms": {name: {"reprojection": stats, "per_tilt_rms": [F],
        "per_tilt_median": [F], "angle_error_deg": stats, "per_tilt_angle_error_deg": [F],
        "euler_error_deg": {XTilt/YTilt/ZRot rms}, "position_error_px": stats,
        "n_matched": int, "n_missing": int}}, "angle_error_deg": stats,
        "position_error_px": stats}``; stats = ``{rms, median, p95, max, n}`` in pixels (angles in
        degrees). Identical sets score exactly 0.

    Raises:
        InputError: no particle is in both sets.
        ValueError: a tomogram has different numbers of tilts in the two sets.
    """
    ref = _load(refined_set)
    per_tomo, errors = {}, {"reprojection": [], "angle": [], "position": []}
    for name, (ts_t, p_t) in _load(truth_set).items():
        matched = _matched_particles(name, ts_t, p_t, ref)
        if matched is None:  # no particle of this tomogram in both sets: nothing to measure
            per_tomo[name] = {"n_matched": 0, "n_missing": p_t.n_particles}
            continue
        ts_r, sub_r, sub_t = matched
        per_tomo[name], tomo_errors = _score_tomogram(ts_r, sub_r, ts_t, sub_t)
        per_tomo[name]["n_missing"] = p_t.n_particles - sub_t.n_particles
        for key, value in tomo_errors.items():
            errors[key].append(value)
    if not errors["reprojection"]:
        from polish3d.errors import InputError

        raise InputError(
            f"{refined_set} and {truth_set}: no particle is in both sets (matched by tomogram "
            "name and rlnTomoParticleName); nothing to score"
        )
    return {
        "overall": _stats(np.concatenate(errors["reprojection"])),
        "angle_error_deg": _stats(np.concatenate(errors["angle"])),
        "position_error_px": _stats(np.concatenate(errors["position"])),
        "tomograms": per_tomo,
    }


def _particle_subset(particles, index):
    """The particles at positions ``index`` (a list), every per-particle field taken along."""
    traj = particles.trajectories_px
    return particles.replace(
        names=[particles.names[i] for i in index],
        positions_px=particles.positions_px[index],
        rotations=particles.rotations[index],
        half_set=particles.half_set[index],
        trajectories_px=None if traj is None else traj[index],
    )


def _matched_particles(name, ts_t, p_t, refined):
    """``(ts_ref, particles_ref, particles_true)`` of tomogram ``name``: the particles in both
    sets (matched by name, in the truth's order), or ``None`` when there are none."""
    if name not in refined:
        return None
    ts_r, p_r = refined[name]
    if ts_r.n_tilts != ts_t.n_tilts:
        raise ValueError(
            f"{name}: {ts_r.n_tilts} tilts in the refined set, {ts_t.n_tilts} in the truth"
        )
    index_r = {n: i for i, n in enumerate(p_r.names)}
    it = [i for i, n in enumerate(p_t.names) if n in index_r]
    if not it:
        return None
    ir = [index_r[p_t.names[i]] for i in it]
    return ts_r, _particle_subset(p_r, ir), _particle_subset(p_t, it)


def _score_tomogram(ts_r, sub_r, ts_t, sub_t) -> tuple[dict, dict[str, np.ndarray]]:
    """``(summary, errors)`` of one tomogram's matched particles; the errors are reprojection
    distances ``(N, F)`` (px, raveled), per-tilt rotation errors ``(F,)`` (degrees) and 3D
    position errors ``(N,)`` (px), both after the rigid gauge alignment."""
    d = np.linalg.norm(project_particles(ts_r, sub_r) - project_particles(ts_t, sub_t), axis=-1)
    # gauge: align refined frame to the true one, then compare rotations
    if sub_t.n_particles >= 3:
        rot, tr = rigid_align(sub_r.positions_px, sub_t.positions_px)
    else:
        rot, tr = np.eye(3), np.zeros(3)
    tmat = np.eye(4)
    tmat[:3, :3] = rot
    tmat[:3, 3] = tr
    p_aligned = ts_r.projections @ np.linalg.inv(tmat)
    # the rotations of distorted projections (anisotropic magnification, skew) without the distortion
    rot_r = geo.split_distortion(p_aligned, ts_r.image_size_px)[1][:, :3, :3]
    rot_t = geo.split_distortion(ts_t.projections, ts_t.image_size_px)[1][:, :3, :3]
    dr = rot_r @ np.transpose(rot_t, (0, 2, 1))
    ang = _rotation_angle_deg(dr)
    pos_err = np.linalg.norm(sub_r.positions_px @ rot.T + tr - sub_t.positions_px, axis=-1)
    summary = {
        "reprojection": _stats(d),
        "per_tilt_rms": np.sqrt(np.mean(d * d, axis=0)).tolist(),
        "per_tilt_median": np.median(d, axis=0).tolist(),
        "angle_error_deg": _stats(ang),
        "per_tilt_angle_error_deg": ang.tolist(),
        "euler_error_deg": _euler_errors_deg(p_aligned, ts_t),
        "position_error_px": _stats(pos_err),
        "n_matched": sub_t.n_particles,
    }
    return summary, {"reprojection": d.ravel(), "angle": ang, "position": pos_err}


def _euler_errors_deg(p_aligned, ts_t) -> dict[str, float]:
    """RMS over tilts of the RELION Euler-angle differences ``{XTilt, YTilt, ZRot}`` (degrees,
    wrapped to ±180) between the gauge-aligned refined projections and the true ones."""
    kw = dict(
        pixel_size_ang=ts_t.pixel_size_ang,
        image_size_px=ts_t.image_size_px,
        tomo_size_px=ts_t.tomo_size_px,
    )
    e_r = geo.projection_to_euler(p_aligned, **kw)
    e_t = geo.projection_to_euler(ts_t.projections, **kw)
    out = {}
    for key in ("XTilt", "YTilt", "ZRot"):
        diff = (e_r[f"rlnTomo{key}"] - e_t[f"rlnTomo{key}"] + 180.0) % 360.0 - 180.0
        out[key] = float(np.sqrt(np.mean(diff**2)))
    return out


def format_table(result: dict) -> str:
    """A short human-readable table of :func:`score`'s result."""
    lines = [
        f"{'tomogram':<14}{'n':>6}{'rms px':>10}{'median':>10}{'p95':>10}{'max':>10}"
        f"{'angle rms°':>12}{'pos rms px':>12}"
    ]
    for name, t in result["tomograms"].items():
        if "reprojection" not in t:
            lines.append(f"{name:<14}{'missing':>6}")
            continue
        r = t["reprojection"]
        lines.append(
            f"{name:<14}{t['n_matched']:>6}{r['rms']:>10.3f}{r['median']:>10.3f}{r['p95']:>10.3f}"
            f"{r['max']:>10.3f}{t['angle_error_deg']['rms']:>12.3f}"
            f"{t['position_error_px']['rms']:>12.3f}"
        )
    o = result["overall"]
    lines.append(
        f"{'all':<14}{o['n']:>6}{o['rms']:>10.3f}{o['median']:>10.3f}{o['p95']:>10.3f}"
        f"{o['max']:>10.3f}{result['angle_error_deg']['rms']:>12.3f}"
        f"{result['position_error_px']['rms']:>12.3f}"
    )
    lines.append(
        "(n = particles; pixel stats over particles x tilts; angles after rigid alignment)"
    )
    return "\n".join(lines)


def register_cli(app, run) -> None:
    """Add ``polish3d score REFINED TRUTH [--json FILE]`` to the typer ``app``."""

    @app.command("score")
    def score_cmd(
        refined: Annotated[str, typer.Argument(help="Refined optimisation_set.star.")],
        truth: Annotated[str, typer.Argument(help="True optimisation_set.star (sim truth/).")],
        json_out: Annotated[
            str, typer.Option("--json", help="Also write the full result as JSON.")
        ] = "",
    ) -> None:
        """Reprojection error (px) of a refined set against the ground truth."""
        from polish3d.errors import InputError

        def go():
            try:
                res = score(refined, truth)
            except ValueError as exc:
                raise InputError(str(exc)) from exc
            typer.echo(format_table(res))
            if json_out:
                from polish3d.io.jsonsafe import json_safe
                from polish3d.io.star import atomic_write_text

                # strict JSON: an undefined statistic (NaN) is written as null
                try:
                    atomic_write_text(Path(json_out), json.dumps(json_safe(res), indent=1, allow_nan=False))
                except OSError as exc:
                    raise InputError(f"--json {json_out}: cannot write it ({exc.strerror or exc})") from None

        run(go)
