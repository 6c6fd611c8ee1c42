"""The figures of ``polish3d report``: pure functions from gathered data to base64 PNGs.

Matplotlib (Agg) in the report's own style (:data:`STYLE`, applied per figure so that global
matplotlib settings are untouched); one colour per quantity (:data:`COLOURS`) in every plot;
every axis labelled with its unit (px: tilt-series pixels, angles in degrees).
"""

from __future__ import annotations

import base64
import functools
import io
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from polish3d.report import TomoData

__all__ = ["fig_deformation", "fig_displacements", "fig_fsc", "fig_geometry", "fig_per_tilt",
           "fig_trajectories", "fig_validation", "verdict_key"]

#: one colour per quantity, the same in every plot
COLOURS = {
    "x": "#1f77b4", "y": "#ff7f0e", "z": "#2ca02c", "input": "#7f7f7f", "refined": "#1f77b4",
    "improved": "#2ca02c", "kept": "#1f77b4", "rolled_back": "#d62728", "no_signal": "#e69f00",
    "bar": "#4c72b0",
}
#: held-out verdicts of a tilt, in legend order, and what each means for its geometry
TILT_VERDICTS = {
    "improved": "improved", "kept": "kept", "rolled_back": "rolled back (input geometry restored)",
    "no_signal": "no signal (input geometry kept)",
}
STYLE = {"font.size": 10, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
         "axes.spines.right": False}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _figure(draw):
    """Run a figure function in the report's style (global matplotlib settings untouched)."""

    @functools.wraps(draw)
    def styled(*args, **kwargs):
        with _plt().rc_context(STYLE):
            return draw(*args, **kwargs)

    return styled


#: fixed figure margins (inches): left, right, bottom, top, and the gaps between panels
#: (horizontal, vertical). Fixed margins draw each figure once; tight and constrained layouts
#: measure every label first (2-3 draws, ~70 % of the report's time).
MARGINS_IN = (0.8, 0.15, 0.6, 0.4, 0.8, 0.6)


def _margins(fig, right_in: float | None = None, top_in: float | None = None):
    """Lay out the figure's panel grid with :data:`MARGINS_IN` (call before adding colour bars,
    which take their room from the panels); ``right_in``/``top_in`` override those margins."""
    w, h = fig.get_size_inches()
    left, right, bottom, top, gap_x, gap_y = MARGINS_IN
    right = right if right_in is None else right_in
    top = top if top_in is None else top_in
    grid = fig.axes[0].get_gridspec()
    panel_w = (w - left - right - (grid.ncols - 1) * gap_x) / grid.ncols
    panel_h = (h - bottom - top - (grid.nrows - 1) * gap_y) / grid.nrows
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h,
                        wspace=gap_x / panel_w, hspace=gap_y / panel_h)


def _png(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, pil_kwargs={"compress_level": 1})  # fast to encode
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _floats(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


@_figure
def fig_geometry(d: TomoData) -> str:
    """Per-tilt change of the shifts (px) and the three angles (°) against the tilt angle."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    _margins(fig)
    order = np.argsort(d.tilt_deg)
    t = d.tilt_deg[order]
    for k, lab in enumerate(("X", "Y")):
        a1.plot(t, d.d_shift_px[order, k], "o-", ms=3, color=COLOURS[lab.lower()], label=f"{lab} shift")
    for k, (lab, c) in enumerate(zip(("XTilt", "YTilt", "ZRot"), "xyz", strict=True)):
        a2.plot(t, d.d_angle_deg[order, k], "o-", ms=3, color=COLOURS[c], label=lab)
    a1.set(title="Change of the per-tilt shifts (refined − input)", xlabel="tilt angle (°)",
           ylabel=f"Δ shift (px; 1 px = {d.pixel_size_ang:g} Å)")
    a2.set(title="Change of the per-tilt angles (refined − input)", xlabel="tilt angle (°)",
           ylabel="Δ angle (°)")
    for a in (a1, a2):
        a.axhline(0, color="k", lw=0.6)
        a.legend(fontsize=8, frameon=False)
    return _png(fig)


@_figure
def fig_per_tilt(d: TomoData) -> str:
    """2D displacement RMS and the particles' mean CC per tilt, from metrics.json."""
    plt = _plt()
    m = d.metrics
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.4))
    _margins(fig)
    order = np.argsort(d.tilt_deg)
    t = d.tilt_deg[order]
    rms = _floats(m.get("per_tilt_displacement_rms_px") or [np.nan] * len(t))
    a1.bar(t, rms[order], width=0.8 * np.min(np.diff(t)) if len(t) > 1 else 1.0, color=COLOURS["bar"])
    a1.set(title="2D displacement of the particles per tilt (RMS)", xlabel="tilt angle (°)",
           ylabel="RMS displacement (px)")
    for key, lab, c in (("per_tilt_cc_first", "first pass (input)", "input"),
                        ("per_tilt_cc_last", "last pass", "refined")):
        if m.get(key):
            a2.plot(t, _floats(m[key])[order], "o-", ms=3, color=COLOURS[c], label=lab)
    a2.set(title="Mean CC of the particles per tilt (fit data)", xlabel="tilt angle (°)",
           ylabel="mean whitened CC")
    a2.legend(fontsize=8, frameon=False)
    return _png(fig)


@_figure
def fig_displacements(d: TomoData) -> str:
    """Histograms of the 3D position change and of the 2D reprojected displacement (px)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    _margins(fig)
    for a, v, what in ((axes[0], d.disp3d_px, "3D position change per particle"),
                       (axes[1], d.disp2d_px, "2D reprojected displacement per particle and tilt")):
        v = v[np.isfinite(v)]
        a.hist(v, bins=min(40, max(5, v.size // 3)), color=COLOURS["bar"], edgecolor="white")
        rms = float(np.sqrt(np.mean(v**2))) if v.size else 0.0
        a.axvline(rms, color=COLOURS["rolled_back"], lw=1.2, label=f"RMS {rms:.2f} px")
        a.set(title=f"{what} (n = {v.size})", xlabel="displacement (px)", ylabel="count")
        a.legend(fontsize=8, frameon=False)
    return _png(fig)


def verdict_key(verdict) -> str:
    """A verdict as a key: ``"rolled back"`` and ``"rolled_back"`` are the same."""
    return str(verdict).strip().lower().replace(" ", "_").replace("-", "_")


def _validation_columns(d: TomoData):
    """``(x, x label, verdict keys, figures by name)`` of the held-out validation tilts; ``x``
    is the tilt angle when every row names a tilt of the table, else the row."""
    rows = [r for r in d.metrics["validation"]["tilts"] if isinstance(r, dict)]
    index = _floats([r.get("row") for r in rows])
    n = len(d.tilt_deg) if d.tilt_deg is not None else 0
    valid = np.isfinite(index) & (index >= 0) & (index < n)
    if rows and valid.all():
        x, label = np.asarray(d.tilt_deg, float)[index.astype(int)], "tilt angle (°)"
    else:
        x, label = index, "tilt row"
    figures = {k: _floats([r.get(k) for r in rows]) for k in ("cc_input", "cc_refined", "z", "signal_z")}
    return x, label, [verdict_key(r.get("verdict")) for r in rows], figures


@_figure
def fig_validation(d: TomoData) -> str:
    """Held-out CC per tilt at the input and the refined geometry, coloured by verdict, tilts
    rolled back or without signal shaded; next to it the significance (z) per tilt."""
    plt = _plt()
    x, xlabel, verdicts, fig_data = _validation_columns(d)
    has_z = np.isfinite(fig_data["z"]).any() or np.isfinite(fig_data["signal_z"]).any()
    fig, axes = plt.subplots(1, 2 if has_z else 1, figsize=(11, 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1]} if has_z else None)
    _margins(fig)
    ax = axes[0, 0]
    distinct = np.unique(x[np.isfinite(x)])
    step = float(np.min(np.diff(distinct))) if len(distinct) > 1 else 1.0
    for key in ("rolled_back", "no_signal"):  # shade the tilts whose input geometry stays
        for k, xv in enumerate(x[[v == key for v in verdicts]]):
            ax.axvspan(xv - step / 2, xv + step / 2, color=COLOURS[key], alpha=0.15, lw=0,
                       label=f"{TILT_VERDICTS[key]}" if k == 0 else None)
    ax.vlines(x, fig_data["cc_input"], fig_data["cc_refined"], color="#bbbbbb", lw=1)
    ax.scatter(x, fig_data["cc_input"], s=18, color=COLOURS["input"], label="input geometry", zorder=3)
    known = [k for k in TILT_VERDICTS if k in verdicts] + sorted(set(verdicts) - set(TILT_VERDICTS))
    for key in known:
        sel = np.array([v == key for v in verdicts])
        ax.scatter(x[sel], fig_data["cc_refined"][sel], s=30, marker="D", zorder=4,
                   color=COLOURS.get(key, "#9467bd"), label=f"refined: {key.replace('_', ' ')}")
    ax.set(title="Held-out CC per tilt (particles not used to fit)", xlabel=xlabel, ylabel="held-out CC")
    ax.legend(fontsize=8, frameon=True, framealpha=0.85, loc="best")
    if has_z:
        az = axes[0, 1]
        az.bar(x, np.nan_to_num(fig_data["z"]), width=0.8 * step, zorder=2,
               label="improvement z (colour: verdict)", color=[COLOURS.get(v, "#9467bd") for v in verdicts])
        az.scatter(x, fig_data["signal_z"], marker="x", s=22, color="k", zorder=3, label="signal z")
        az.axhline(0, color="k", lw=0.6)
        az.set(title="Significance per tilt (held-out)", xlabel=xlabel, ylabel="z (standard errors)")
        az.legend(fontsize=8, frameon=False)
    return _png(fig)


@_figure
def fig_fsc(fsc: dict) -> str:
    """Half-map FSC before/after with the 0.143 threshold."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    _margins(fig)
    freq = fsc.get("frequency_per_ang")
    x = _floats(freq if freq else fsc.get("shell") or range(len(fsc["before"])))
    for key, lab in (("before", "input geometry"), ("after", "refined geometry")):
        res = fsc.get(f"resolution_{key}_ang")
        txt = f" ({res:.1f} Å)" if isinstance(res, (int, float)) else ""
        ax.plot(x, _floats(fsc[key]), "-", lw=1.8, color=COLOURS["input" if key == "before" else "refined"],
                label=lab + txt)
    ax.axhline(0.143, color="k", ls="--", lw=0.8, label="0.143")
    ax.set(title="Half-map FSC", ylabel="FSC", ylim=(-0.1, 1.05),
           xlabel="spatial frequency (1/Å)" if freq else "Fourier shell (index)")
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def _nice(x: float) -> float:
    """The largest 1-2-5 step ≤ x (at least 1)."""
    if not np.isfinite(x) or x <= 1:
        return 1.0
    e = 10.0 ** np.floor(np.log10(x))
    return float(max(m * e for m in (1, 2, 5) if m * e <= x))


@_figure
def fig_trajectories(d: TomoData, scale: float | None = None) -> str:
    """XY tracks (displacements × scale; default: the 90th-percentile track at ~12 % of the
    particles' spread) coloured by dose rank, and the RMS per dose rank."""
    plt = _plt()
    from matplotlib.collections import LineCollection

    traj = d.trajectories_px[:, d.dose_order]  # (N, F, 3) by dose rank
    if scale is None:
        spread = float(np.ptp(d.positions_px[:, :2], axis=0).max()) if len(traj) > 1 else 100.0
        longest = float(np.percentile(np.linalg.norm(traj[..., :2], axis=-1).max(axis=1), 90))
        scale = _nice(0.12 * spread / longest) if longest > 0 else 1.0
    pts = d.positions_px[:, None, :2] + scale * traj[..., :2]
    n, f = pts.shape[:2]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.2, 1]})
    _margins(fig)
    seg = np.stack([pts[:, :-1], pts[:, 1:]], axis=2).reshape(-1, 2, 2)
    lc = LineCollection(seg, cmap="viridis", linewidths=1.2)
    lc.set_array(np.tile(np.arange(f - 1), n))
    a1.add_collection(lc)
    a1.plot(pts[:, 0, 0], pts[:, 0, 1], "k.", ms=2)
    a1.set_aspect("equal", adjustable="datalim")
    a1.autoscale_view()
    a1.set(title=f"Particle tracks, XY (displacements ×{scale:g})", xlabel="X (px)", ylabel="Y (px)")
    fig.colorbar(lc, ax=a1, label="dose rank")
    rms = np.sqrt(np.mean(np.sum(traj**2, -1), 0))
    a2.plot(np.arange(f), rms, "o-", ms=3, color=COLOURS["refined"])
    a2.set(title="Trajectory RMS per tilt (0 at the lowest dose)", xlabel="dose rank",
           ylabel="3D displacement RMS (px)")
    a2.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


@_figure
def fig_deformation(d: TomoData, max_panels: int = 8, steps: int = 48) -> str:
    """Deformation magnitude maps (px) with arrows, one panel per distinct tilt deformation."""
    plt = _plt()
    from polish3d.score import evaluate_deformation

    w, h = d.image_size_px
    coeffs = np.asarray(d.deformation.coefficients)
    _, first = np.unique(coeffs, axis=0, return_index=True)
    rows = np.sort(first)
    rows = rows[np.linspace(0, len(rows) - 1, min(max_panels, len(rows))).astype(int)]
    gx, gy = np.meshgrid(np.linspace(0, w - 1, steps), np.linspace(0, h - 1, steps))
    grid = np.stack([gx.ravel(), gy.ravel()], -1)
    fields = [evaluate_deformation(d.deformation, (w, h), grid, int(j)).reshape(steps, steps, 2)
              for j in rows]
    vmax = max(float(np.max(np.linalg.norm(fd, axis=-1))) for fd in fields) or 1.0
    ncol = min(4, len(rows))
    nrow = -(-len(rows) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol + 1.6, 3.0 * nrow + 0.9), squeeze=False)
    _margins(fig, right_in=1.6, top_in=0.75)
    for k, (ax, j, fd) in enumerate(zip(axes.ravel(), rows, fields, strict=False)):
        im = ax.imshow(np.linalg.norm(fd, axis=-1), extent=(0, w, h, 0), vmin=0, vmax=vmax, cmap="magma")
        s = slice(2, None, 5)
        ax.quiver(gx[s, s], gy[s, s], fd[s, s, 0], fd[s, s, 1], color="white", angles="xy", width=0.006)
        title = f"row {j}, tilt {round(d.tilt_deg[j]):d}°" if len(first) > 1 else "all tilts (one per series)"
        ax.set(title=title, xlabel="x (px)" if k >= len(rows) - ncol else "",
               ylabel="" if k % ncol else "y (px)")
        ax.grid(False)
    for ax in axes.ravel()[len(rows):]:
        ax.set_visible(False)
    right = 1 - 1.6 / fig.get_size_inches()[0]
    bar = fig.add_axes((right + 0.15 / fig.get_size_inches()[0], 0.15, 0.2 / fig.get_size_inches()[0], 0.7))
    fig.colorbar(im, cax=bar, label="|deformation| (px)")
    fig.suptitle("2D deformation of the tilt images (arrows: direction; colour: magnitude)")
    return _png(fig)
