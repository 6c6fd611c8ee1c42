"""Simulated bead tracks with known geometry (tests, benchmarks)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from polish3d.fiducials._align import projection_matrices
from polish3d.fiducials._bundle import param_map

__all__ = ["simulate_bead_tracks"]


def simulate_bead_tracks(
    n_beads: int = 20,
    n_tilts: int = 41,
    tilt_range_deg: float = 60.0,
    *,
    noise_px: float = 0.3,
    tilt_axis_deg: float = 85.0,
    rotation_error_deg: float = 0.5,
    tilt_error_deg: float = 0.3,
    mag_error: float = 0.01,
    shift_error_px: float = 10.0,
    stretch_error: float = 0.0,
    skew_error_deg: float = 0.0,
    stretch_group: int | None = None,
    skew_group: int | None = None,
    outlier_fraction: float = 0.0,
    outlier_px: tuple[float, float] = (5.0, 20.0),
    missing_fraction: float = 0.0,
    image_size_px: tuple[int, int] = (1024, 1024),
    tomo_size_px: tuple[int, int, int] = (1024, 1024, 256),
    bead_depth_px: float = 80.0,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """Tracked bead positions for a random bead constellation and perturbed per-tilt geometry.

    Beads lie on two layers at ``z ≈ ±bead_depth_px`` (tomogram pixels from the mid-plane,
    ± 10 px), spread over the central 80 % of the tomogram in x and y. Per tilt: in-plane
    rotation ``ψ_i = tilt_axis + N(0, rotation_error)``, tilt ``θ_i = nominal + N(0,
    tilt_error)``, magnification ``s_i ∈ 1 ± mag_error`` (uniform), shift ``N(0,
    shift_error)`` per axis, and tiltalign's specimen distortion: X-stretch ``dmag`` uniform
    within ``± stretch_error`` and skew ``N(0, skew_error_deg)``. The truth obeys the gauge of
    :func:`align_fiducials` (mean bead depth 0, shifts, tilt-angle errors, stretches and skews
    summing to 0, ``Σ tan θ⁰ (θ − θ⁰) = 0`` and ``Σ tan θ⁰ dmag = 0`` when there is
    stretch, ``s = 1`` at the lowest-|tilt| view).

    Args:
        n_beads, n_tilts: sizes; tilts evenly spaced over ``±tilt_range_deg`` (degrees).
        noise_px: Gaussian tracking noise per coordinate (px).
        stretch_error: half-width of the uniform X-stretch ``dmag`` per tilt (unitless; 0.01 is
            a 1 % stretch of the specimen X axis).
        skew_error_deg: standard deviation of the skew angle per tilt (degrees).
        stretch_group, skew_group: draw the X-stretch / skew at the centres of groups of this
            many tilts and interpolate linearly between them (what ``grouped`` fits, so the
            data follow that model exactly); ``None``: independent per tilt.
        outlier_fraction: fraction of observations displaced in a random direction by a
            distance uniform in ``outlier_px`` (px).
        missing_fraction: fraction of observations removed at random (gaps); beads outside the
            image are never observed.
        seed: random seed.

    Returns:
        ``(tracks, truth)``: tracks with ``bead``, ``tilt``, ``x``, ``y`` (px) and ``outlier``
        (bool); truth with ``projections`` ``(F, 4, 4)``, ``bead_positions_px`` ``(B, 3)``,
        ``tilt_deg``, ``rotation_deg``, ``magnification``, ``stretch``, ``skew_deg``,
        ``shifts_px``,
        ``nominal_tilt_deg``, ``tilt_axis_deg``, ``ref_tilt``, ``image_size_px``,
        ``tomo_size_px``.
    """
    rng = np.random.default_rng(seed)
    nominal = np.linspace(-tilt_range_deg, tilt_range_deg, n_tilts)
    ref = int(np.argmin(np.abs(nominal)))
    truth = _per_tilt_truth(rng, nominal, ref, tilt_axis_deg, rotation_error_deg, tilt_error_deg,
                            mag_error, shift_error_px)
    truth["stretch"], truth["skew_deg"] = _distortions(rng, nominal, stretch_error,
                                                       skew_error_deg, stretch_group, skew_group)
    if stretch_error:  # the thickness gauge of align_fiducials: Σ tan θ⁰ (θ − θ⁰) = 0 as well
        c = np.vstack([np.ones(n_tilts), np.tan(np.deg2rad(nominal))])
        d = truth["tilt_deg"] - nominal
        truth["tilt_deg"] = nominal + d - c.T @ np.linalg.lstsq(c @ c.T, c @ d, rcond=None)[0]
    beads = _bead_constellation(rng, n_beads, tomo_size_px, bead_depth_px)
    proj = projection_matrices(truth["rotation_deg"], truth["tilt_deg"], truth["magnification"],
                               truth["shifts_px"], image_size_px, tomo_size_px,
                               stretch=truth["stretch"], skew_deg=truth["skew_deg"])
    tracks = _observe(rng, proj, beads, image_size_px, noise_px, missing_fraction,
                      outlier_fraction, outlier_px)
    return tracks, {
        "projections": proj, "bead_positions_px": beads, **truth, "nominal_tilt_deg": nominal,
        "tilt_axis_deg": tilt_axis_deg, "ref_tilt": ref, "image_size_px": tuple(image_size_px),
        "tomo_size_px": tuple(tomo_size_px),
    }


def _per_tilt_truth(rng, nominal, ref, tilt_axis_deg, rotation_error_deg, tilt_error_deg,
                    mag_error, shift_error_px) -> dict[str, np.ndarray]:
    """True ``rotation_deg``, ``tilt_deg`` (errors of zero mean), ``magnification`` (1 at
    ``ref``) and ``shifts_px`` (zero mean) per tilt."""
    n_tilts = len(nominal)
    rot = tilt_axis_deg + rng.normal(0.0, rotation_error_deg, n_tilts)
    tilt = nominal + rng.normal(0.0, tilt_error_deg, n_tilts)
    tilt -= np.mean(tilt - nominal)
    mag = 1.0 + rng.uniform(-mag_error, mag_error, n_tilts)
    mag[ref] = 1.0
    shifts = rng.normal(0.0, shift_error_px, (n_tilts, 2))
    shifts -= shifts.mean(0)
    return {"tilt_deg": tilt, "rotation_deg": rot, "magnification": mag, "shifts_px": shifts}


def _distortions(rng, nominal, stretch_error, skew_error_deg, stretch_group, skew_group):
    """``(stretch, skew_deg)`` per tilt in the gauge of :func:`align_fiducials`: X-stretch with
    ``Σ m = Σ tan θ⁰ m = 0``, skew with ``Σ δ = 0``; grouped draws lie in the span of the fitted
    basis. Drawn only when asked, so that undistorted simulations keep their random streams."""
    n_tilts = len(nominal)
    order = np.argsort(nominal, kind="stable")
    tan0 = np.tan(np.deg2rad(nominal))
    gauge_m = np.vstack([np.ones(n_tilts), tan0])  # Σ m = 0 and Σ tan θ⁰ m = 0
    stretch = np.zeros(n_tilts)
    if stretch_error:
        if stretch_group:  # grouped: in the span of the fitted basis, gauge included
            b = param_map("grouped", n_tilts, order, stretch_group, constraint=gauge_m)
            stretch = b @ rng.uniform(-stretch_error, stretch_error, b.shape[1])
        else:
            stretch = rng.uniform(-stretch_error, stretch_error, n_tilts)
            stretch -= gauge_m.T @ np.linalg.lstsq(gauge_m @ gauge_m.T, gauge_m @ stretch,
                                                   rcond=None)[0]
    skew = np.zeros(n_tilts)
    if skew_error_deg:
        if skew_group:
            b = param_map("grouped", n_tilts, order, skew_group, constraint=np.ones(n_tilts))
            skew = b @ rng.normal(0.0, skew_error_deg, b.shape[1])
        else:
            skew = rng.normal(0.0, skew_error_deg, n_tilts)
            skew -= skew.mean()
    return stretch, skew


def _bead_constellation(rng, n_beads, tomo_size_px, bead_depth_px) -> np.ndarray:
    """``(B, 3)`` bead positions (voxels): two layers at ``±bead_depth_px`` (± 10 px, mean
    depth 0) over the central 80 % of the tomogram in x and y."""
    w0, h0, _ = tomo_size_px
    xy = rng.uniform(-0.4, 0.4, (n_beads, 2)) * np.array([w0, h0])
    z = np.where(np.arange(n_beads) % 2 == 0, 1.0, -1.0) * bead_depth_px
    z = z + rng.uniform(-10.0, 10.0, n_beads)
    z -= z.mean()
    c_int = np.array([v // 2 for v in tomo_size_px], float)
    return np.column_stack([xy, z]) + c_int


def _observe(rng, proj, beads, image_size_px, noise_px, missing_fraction, outlier_fraction,
             outlier_px) -> pd.DataFrame:
    """Tracks of the beads' projections inside the images: some removed at random, Gaussian
    noise added, some displaced as outliers (column ``outlier``)."""
    n_tilts, n_beads = len(proj), len(beads)
    uv = np.einsum("fij,nj->fni", proj[:, :2, :3], beads) + proj[:, None, :2, 3]
    ti, bj = np.meshgrid(np.arange(n_tilts), np.arange(n_beads), indexing="ij")
    ti, bj = ti.ravel(), bj.ravel()
    pts = uv.reshape(-1, 2)
    inside = (pts[:, 0] >= 0) & (pts[:, 0] <= image_size_px[0] - 1) & \
        (pts[:, 1] >= 0) & (pts[:, 1] <= image_size_px[1] - 1)
    keep = inside & (rng.uniform(size=len(ti)) >= missing_fraction)
    ti, bj, pts = ti[keep], bj[keep], pts[keep]
    obs = pts + rng.normal(0.0, noise_px, pts.shape)
    outlier = rng.uniform(size=len(ti)) < outlier_fraction
    ang = rng.uniform(0, 2 * np.pi, outlier.sum())
    dist = rng.uniform(*outlier_px, outlier.sum())
    obs[outlier] += np.column_stack([np.cos(ang), np.sin(ang)]) * dist[:, None]
    return pd.DataFrame({"bead": bj, "tilt": ti, "x": obs[:, 0], "y": obs[:, 1],
                         "outlier": outlier})
