"""Picture of a 2D tilt-image deformation (:mod:`polish3d.refine.deformation`) as a PNG."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from polish3d.model import Deformation
from polish3d.refine.deformation import evaluate_per_tilt

__all__ = ["plot_deformation"]

_evaluate_jit = jax.jit(evaluate_per_tilt, static_argnums=(0, 1, 2))  # one program, not one per operation


def _nice_scale(raw: float) -> float:
    """The largest of 1, 2, 5 × 10^k not above ``raw`` (at least 1)."""
    if raw <= 1.0:
        return 1.0
    e = 10.0 ** math.floor(math.log10(raw))
    return max(m * e for m in (1.0, 2.0, 5.0, 10.0) if m * e <= raw)


def _grid_lines(deformation: Deformation, w: float, h: float, subdiv: int, steps: int) -> list:
    """``[(points (steps, 2) px, main line?)]``: the lines of the node grid (``gw × gh``, or
    3 × 3 for ``linear``), ``subdiv`` lines per cell, vertical ones first."""
    gw, gh = deformation.grid_size if deformation.model != "linear" else (3, 3)
    gw, gh = max(int(gw), 2), max(int(gh), 2)
    lines = []
    t = np.linspace(0.0, 1.0, steps)
    for i in range((gw - 1) * subdiv + 1):
        x = i / subdiv * w / (gw - 1)
        lines.append((np.stack([np.full_like(t, x), t * h], -1), i % subdiv == 0))
    for i in range((gh - 1) * subdiv + 1):
        y = i / subdiv * h / (gh - 1)
        lines.append((np.stack([t * w, np.full_like(t, y)], -1), i % subdiv == 0))
    return lines


def _panel_collections(lines, field: np.ndarray, scale: float, offset) -> list:
    """One panel's four line collections (main and thin lines; undeformed light, moved by
    ``scale·field`` dark), shifted by ``offset`` (px, for a mosaic)."""
    from matplotlib.collections import LineCollection

    ends = np.cumsum([len(p) for p, _ in lines])[:-1]
    off = np.asarray(offset, np.float64)
    moved = np.split(np.concatenate([p for p, _ in lines]) + scale * field + off, ends)
    out = []
    for group, (light, light_lw, dark, dark_lw) in ((True, ((0.6, 0.6, 1.0), 0.6, "k", 0.9)),
                                                    (False, ((0.8, 0.8, 1.0), 0.3, "0.45", 0.4))):
        chosen = [k for k, (_, main) in enumerate(lines) if main == group]
        out.append(LineCollection([lines[k][0] + off for k in chosen], colors=[light], linewidths=light_lw))
        out.append(LineCollection([moved[k] for k in chosen], colors=[dark], linewidths=dark_lw))
    return out


def _rms(field: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum(field**2, -1))))


def plot_deformation(deformation: Deformation, image_size_px, path, *, scale: float | None = None,
                     title: str = "", subdiv: int = 4, steps: int = 100) -> Path:
    """Draw the deformed node grid (exaggerated) over the undeformed one, as a PNG.

    One panel per distinct coefficient row (a per-series deformation gives one panel, a per-tilt
    one a panel per tilt, labelled with the file-order tilt index). Grid lines follow RELION's
    picture (``temp/<tomo>_deformations.eps``): main lines at the nodes (``gw × gh``, or 3 × 3
    for ``linear``), ``subdiv`` thinner lines per cell, each deformed by ``scale·def(u)``.

    Args:
        deformation: the deformation (coefficients per tilt).
        image_size_px: ``(W, H)``.
        path: the PNG to write (folders are created).
        scale: exaggeration factor; default: so that the largest displacement of all panels is
            drawn as about 15 % of the smaller image side (at least 1), rounded down to 1–2–5
            steps.
        title: title prefix (e.g. the tomogram name).
        subdiv, steps: thin lines per cell, points per line.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: nothing global is touched

    w, h = (float(v) for v in image_size_px)
    rows, index = np.unique(np.asarray(deformation.coefficients, np.float64), axis=0, return_index=True)
    order = np.argsort(index)
    rows, index = rows[order], index[order]
    lines = _grid_lines(deformation, w, h, subdiv, steps)
    pts = np.concatenate([p for p, _ in lines])
    with jax.enable_x64(True):  # every row at once: (points, rows, 2) → rows × (points, 2)
        at = jnp.broadcast_to(jnp.asarray(pts)[:, None], (len(pts), len(rows), 2))
        grid = tuple(int(g) for g in deformation.grid_size)
        fields = list(np.moveaxis(np.asarray(
            _evaluate_jit(deformation.model, grid, (w, h), jnp.asarray(rows), at)), 1, 0))
    dmax = max((float(np.max(np.linalg.norm(fd, axis=-1))) for fd in fields), default=0.0)
    if scale is None:
        scale = _nice_scale(0.15 * min(w, h) / dmax) if dmax > 0 else 1.0
    n = len(rows)
    head = f"{title}: " if title else ""
    grid_txt = tuple(int(v) for v in deformation.grid_size)
    suptitle = f"{head}{deformation.model} deformation {grid_txt}, displacements ×{scale:g}"
    if n == 1:
        fig = Figure(figsize=(6.0, 6.0 * h / w + 0.95))
        ax = fig.add_subplot()
        for c in _panel_collections(lines, fields[0], scale, (0.0, 0.0)):
            ax.add_collection(c)
        ax.set(xlim=(-0.08 * w, 1.08 * w), ylim=(1.08 * h, -0.08 * h), xlabel="x (px)", ylabel="y (px)",
               title=f"all tilts: RMS {_rms(fields[0]):.2f} px")  # y down, as in the image
        ax.set_aspect("equal")
        fig.subplots_adjust(left=0.9 / 6.0, right=1 - 0.15 / 6.0, bottom=0.7 / fig.get_size_inches()[1],
                            top=1 - 0.75 / fig.get_size_inches()[1])
        dpi = 100
    else:  # one axes, the panels side by side in it (41 axes took most of the drawing time)
        ncol = math.ceil(math.sqrt(n))
        nrow = math.ceil(n / ncol)
        gap_x, gap_y = 0.16 * w, 0.16 * h + 0.1 * w  # room for each panel's label
        cell_w, cell_h = w + gap_x, h + gap_y
        fig = Figure(figsize=(3.2 * ncol, 3.2 * ncol * (nrow * cell_h) / (ncol * cell_w) + 0.6))
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - 0.6 / fig.get_size_inches()[1]))
        for k in range(n):
            x0, y0 = (k % ncol) * cell_w + 0.5 * gap_x, (k // ncol) * cell_h + gap_y - 0.04 * h
            for c in _panel_collections(lines, fields[k], scale, (x0, y0)):
                ax.add_collection(c)
            ax.text(x0 + 0.5 * w, y0 - 0.05 * h, f"tilt {int(index[k]) + 1}: RMS {_rms(fields[k]):.2f} px",
                    ha="center", va="bottom", fontsize=9)
        ax.set(xlim=(0.0, ncol * cell_w), ylim=(nrow * cell_h, 0.0))  # y down, as in the image
        ax.set_aspect("equal")
        ax.axis("off")
        dpi = 80
    fig.suptitle(suptitle)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, pil_kwargs={"compress_level": 1})  # ~5x faster to encode than 6
    return path
