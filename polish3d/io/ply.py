"""Trajectory outputs: meshes ``Trajectories/<tomo>_x1.ply``, ``_x8.ply`` (spec §5.7) and plots.

RELION's documentation lists these files, but only its pre-release ``polish`` program wrote them;
polish3d writes the same legacy geometry so that the promised outputs exist: for every particle
and every consecutive dose-rank pair ``(k, k+1)`` an open prism ("bar") from
``a = X + S·m_k`` to ``b = X + S·m_{k+1}`` (``X`` the particle position and ``m`` its trajectory,
tomogram voxel frame, **pixels**; ``S`` = 1 or 8), radius 0.1 px, 7 sides: 14 vertices (a ring
at ``a`` and the same ring moved by ``b − a``), 14 triangles, no caps. Vertex colours are grey
levels: 255 for the first segment, then 168 / 84 for even / odd segments (``⌊255·0.66⌋``,
``⌊255·0.33⌋``). The ring frame is RELION's: ``q = normalise(d × e)`` with ``e = x̂`` if
``|d_x| < |d_y|`` else ``ŷ``, ``r = normalise(q × d)``, ``d = b − a``; for a zero-length segment
(no motion) ``q = x̂``, ``r = ŷ`` (RELION would produce NaNs).

File layout (ASCII PLY, readable by ``plyfile`` and mesh viewers): ``ply``, ``format ascii 1.0``,
``element vertex V`` with ``property float32 x/y/z`` and ``property uint8 red/green/blue``,
``element face M`` with ``property list uint8 int32 vertex_index``, ``end_header``, then one
``x y z r g b`` line per vertex and one ``3 i j k`` line per triangle. Files are written
atomically. No JAX here.

:func:`plot_trajectories` draws the XY/XZ/YZ projections of the exaggerated trajectories
(RELION's ``<tomo>_tracks_{XY,XZ,YZ}.eps``, as one PNG; matplotlib, Agg backend).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from polish3d.io.star import atomic_write_text, publish

__all__ = [
    "SIDES", "plot_trajectories", "ply_text", "trajectory_mesh", "write_ply", "write_trajectory_meshes",
]

SIDES = 7
RADIUS_PX = 0.1


def _ring_frames(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors ``q, r`` ``(S, 3)`` perpendicular to the segment directions ``d (S, 3)``."""
    use_x = np.abs(d[:, 0]) < np.abs(d[:, 1])
    e = np.where(use_x[:, None], np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]))
    q = np.cross(d, e)
    nq = np.linalg.norm(q, axis=1, keepdims=True)
    r = np.cross(q, d)
    nr = np.linalg.norm(r, axis=1, keepdims=True)
    ok = (nq[:, 0] > 0) & (nr[:, 0] > 0)
    q = np.where(ok[:, None], q / np.where(nq > 0, nq, 1.0), np.array([1.0, 0.0, 0.0]))
    r = np.where(ok[:, None], r / np.where(nr > 0, nr, 1.0), np.array([0.0, 1.0, 0.0]))
    return q, r


def trajectory_mesh(
    positions_px: np.ndarray,
    trajectories_px: np.ndarray,
    dose_order: np.ndarray,
    scale: float = 1.0,
    radius_px: float = RADIUS_PX,
    sides: int = SIDES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The legacy trajectory mesh of one tomogram.

    Args:
        positions_px: ``(N, 3)`` particle positions (tomogram pixels; the lowest-dose tilt's).
        trajectories_px: ``(N, F, 3)`` displacements (pixels, per tilt in file order).
        dose_order: ``(F,)`` file index of each dose rank (``geometry.dose_order``).
        scale: displacement magnification ``S``.
        radius_px: bar radius (pixels; not scaled).
        sides: number of sides of each bar.

    Returns:
        ``(vertices (V, 3) float, colours (V, 3) uint8, faces (M, 3) int)`` with
        ``V = 2·sides·N·(F−1)`` and ``M = 2·sides·N·(F−1)``; bars ordered by particle, then by
        dose step.
    """
    x = np.asarray(positions_px, np.float64)
    t = np.asarray(trajectories_px, np.float64)[:, np.asarray(dose_order)]  # (N, F, 3) by rank
    n, f = t.shape[:2]
    nseg = max(f - 1, 0)
    pts = x[:, None, :] + scale * t
    a = pts[:, :-1].reshape(-1, 3)
    d = (pts[:, 1:] - pts[:, :-1]).reshape(-1, 3)
    q, r = _ring_frames(d)
    phi = np.arange(sides) * 2.0 * np.pi / sides
    cos, sin = np.cos(phi)[None, :, None], np.sin(phi)[None, :, None]
    ring = radius_px * (cos * q[:, None, :] + sin * r[:, None, :])
    v0 = a[:, None, :] + ring  # (S, sides, 3)
    v1 = v0 + d[:, None, :]
    verts = np.stack([v0, v1], axis=2).reshape(-1, 3)  # per bar: 2s at a, 2s+1 at b
    s = np.arange(sides)
    s1 = (s + 1) % sides
    ia, ib, ic, id_ = 2 * s, 2 * s + 1, 2 * s1 + 1, 2 * s1
    tri = np.stack([np.stack([ia, ib, ic], -1), np.stack([ia, ic, id_], -1)], 1).reshape(-1, 3)
    offs = (np.arange(n * nseg) * 2 * sides)[:, None, None]
    faces = (tri[None] + offs).reshape(-1, 3)
    step = np.tile(np.arange(nseg), n)
    grey = np.where(step == 0, 1.0, 0.66 - 0.33 * (step % 2))
    level = (255.0 * grey).astype(np.uint8)
    colours = np.repeat(np.repeat(level, 2 * sides)[:, None], 3, axis=1)
    return verts, colours, faces


def ply_text(vertices: np.ndarray, faces: np.ndarray, colours: np.ndarray | None = None) -> str:
    """ASCII PLY text of a triangle mesh (vertex coordinates in pixels)."""
    v = np.asarray(vertices, np.float64).reshape(-1, 3)
    fc = np.asarray(faces, np.int64).reshape(-1, 3)
    head = ["ply", "format ascii 1.0", f"element vertex {len(v)}"]
    head += [f"property float32 {c}" for c in "xyz"]
    if colours is not None:
        head += [f"property uint8 {c}" for c in ("red", "green", "blue")]
    head += [f"element face {len(fc)}", "property list uint8 int32 vertex_index", "end_header"]
    # one C-level format of the whole table (3x faster than np.savetxt's row loop, same text)
    if colours is not None:
        rows = np.concatenate([v, np.asarray(colours, np.float64).reshape(-1, 3)], 1)
        vertex_lines = ("%.6f %.6f %.6f %d %d %d\n" * len(v)) % tuple(rows.ravel().tolist())
    else:
        vertex_lines = ("%.6f %.6f %.6f\n" * len(v)) % tuple(v.ravel().tolist())
    face_lines = ("3 %d %d %d\n" * len(fc)) % tuple(fc.ravel().tolist())
    return "\n".join(head) + "\n" + vertex_lines + face_lines


def write_ply(path, vertices: np.ndarray, faces: np.ndarray, colours: np.ndarray | None = None) -> Path:
    """Write an ASCII PLY mesh atomically (see the module docstring)."""
    return atomic_write_text(path, ply_text(vertices, faces, colours))


def write_trajectory_meshes(
    folder,
    tomo_name: str,
    positions_px: np.ndarray,
    trajectories_px: np.ndarray,
    dose_order: np.ndarray,
    scales: tuple[float, ...] = (1.0, 8.0),
) -> list[Path]:
    """Write ``<folder>/<tomo_name>_x<S>.ply`` for every scale ``S`` (default 1 and 8).

    Args:
        folder: output folder (created), normally ``<o>/Trajectories``.
        tomo_name: ``rlnTomoName``.
        positions_px: ``(N, 3)`` positions (tomogram pixels).
        trajectories_px: ``(N, F, 3)`` displacements (pixels, file order).
        dose_order: ``(F,)`` file index of each dose rank.
        scales: magnifications of the displacements.

    Returns:
        the written paths.
    """
    out = []
    for s in scales:
        verts, cols, faces = trajectory_mesh(positions_px, trajectories_px, dose_order, s)
        label = f"{s:g}"
        out.append(write_ply(Path(folder) / f"{tomo_name}_x{label}.ply", verts, faces, cols))
    return out


def plot_trajectories(
    positions_px: np.ndarray,
    trajectories_px: np.ndarray,
    dose_order: np.ndarray,
    path,
    *,
    scale: float = 8.0,
    title: str = "",
) -> Path:
    """PNG of the trajectories in the XY, XZ and YZ planes (tomogram pixels), written atomically.

    Each particle is drawn as the polyline ``X + scale·m_k`` over the dose ranks ``k`` (lines
    coloured by dose rank, the lowest-dose point marked), like RELION's ``_tracks_*.eps``.

    Args:
        positions_px: ``(N, 3)`` positions (pixels).
        trajectories_px: ``(N, F, 3)`` displacements (pixels, file order).
        dose_order: ``(F,)`` file index of each dose rank.
        path: destination ``.png`` (folder created).
        scale: displacement magnification.
        title: figure title (e.g. the tomogram name).
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure  # no pyplot: nothing global is touched

    x = np.asarray(positions_px, np.float64)
    t = np.asarray(trajectories_px, np.float64)[:, np.asarray(dose_order)]
    pts = x[:, None, :] + scale * t  # (N, F, 3) by dose rank
    n, f = pts.shape[:2]
    rms = float(np.sqrt(np.mean(np.sum(t**2, -1)))) if t.size else 0.0
    fig = Figure(figsize=(15, 5.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    cmap = matplotlib.colormaps["viridis"]
    for ax, (i, j), lab in zip(axes, ((0, 1), (0, 2), (1, 2)), ("XY", "XZ", "YZ"), strict=True):
        if f > 1 and n:
            seg = np.stack([pts[:, :-1][..., [i, j]], pts[:, 1:][..., [i, j]]], axis=2).reshape(-1, 2, 2)
            colours = cmap(np.tile(np.arange(f - 1), n) / max(f - 2, 1))
            ax.add_collection(LineCollection(seg, colors=colours, linewidths=1.0))
        ax.plot(pts[:, 0, i], pts[:, 0, j], "k.", markersize=1.5)
        ax.set_xlabel("XYZ"[i] + " (px)")
        ax.set_ylabel("XYZ"[j] + " (px)")
        ax.set_title(f"{lab} (displacements ×{scale:g}" + (")" if lab == "XY" else "; axes not to scale)"))
        if lab == "XY":
            ax.set_aspect("equal", adjustable="datalim")
        ax.autoscale_view()
    fig.suptitle(f"{title}: {n} particles, {f} tilts; trajectory RMS {rms:.3f} px (colour: dose rank)")
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.1, top=0.88, wspace=0.25)  # (one draw)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp.png", dir=p.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, pil_kwargs={"compress_level": 1})  # fast to encode
        publish(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p
