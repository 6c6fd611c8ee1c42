"""MRC maps and tilt stacks, and FSC tables.

Arrays are indexed like the file, slowest axis first: maps ``(z, y, x)``, stacks
``(F, H, W)``. Pixel/voxel sizes are in Å (from the header's ``voxel_size.x``). Writes are atomic
(temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np

from polish3d.errors import InputError
from polish3d.io.star import atomic_write, read_star

__all__ = ["image_size", "open_stack", "read_fsc", "read_map", "write_map", "write_stack"]

log = logging.getLogger(__name__)


def _quiet(caught: list, p: Path) -> str:
    """Log mrcfile's (permissive-mode) warnings at debug level; return them as one line."""
    msgs = "; ".join(str(w.message) for w in caught)
    if msgs:
        log.debug("%s: %s", p, msgs)
    return msgs


def _check_file(path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"MRC file not found: {p}")
    return p


def _header(path):
    p = _check_file(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with mrcfile.open(p, mode="r", header_only=True, permissive=True) as m:
                header = None if m.header is None else m.header.copy()
        except Exception as exc:
            raise InputError(f"cannot read MRC header of {p}: {exc}") from exc
    why = _quiet(caught, p)
    if header is None:
        raise InputError(f"cannot read MRC header of {p}: not an MRC file ({why})")
    return p, header, int(header.nsymbt)


def image_size(path) -> tuple[int, int, int]:
    """``(W, H, F)``: width, height and number of sections, from the MRC header only."""
    _, h, _ = _header(path)
    return int(h.nx), int(h.ny), int(h.nz)


def open_stack(path) -> np.ndarray:
    """Memory-map a tilt stack (read-only) as ``(F, H, W)``; a 2D image gives ``F = 1``.

    The data are not copied: the returned array is a ``numpy.memmap`` over the file.

    Raises:
        InputError: missing file, unreadable header, unsupported mode, or a truncated file.
    """
    p, h, ext = _header(path)
    try:
        dtype = mrcfile.utils.data_dtype_from_header(h)
    except Exception as exc:
        raise InputError(f"unsupported MRC data mode in {p}: {exc}") from exc
    nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
    if min(nx, ny, nz) < 1:
        raise InputError(f"MRC file {p} has an invalid size {nx}×{ny}×{nz} in its header")
    offset = 1024 + ext
    need = offset + nx * ny * nz * dtype.itemsize
    if os.path.getsize(p) < need:
        raise InputError(
            f"MRC file {p} is truncated: header says {nx}×{ny}×{nz} ({need} bytes), "
            f"file has {os.path.getsize(p)} bytes"
        )
    return np.memmap(p, dtype=dtype, mode="r", offset=offset, shape=(nz, ny, nx))


def read_map(path) -> tuple[np.ndarray, float]:
    """Read a 3D map: ``(array (z, y, x) float32, voxel size Å)``.

    Raises:
        InputError: missing or unreadable file.
    """
    p = _check_file(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with mrcfile.open(p, mode="r", permissive=True) as m:
                if m.data is None:
                    raise ValueError("no data")
                data = np.array(m.data, dtype=np.float32)
                vs = float(m.voxel_size.x)
        except Exception as exc:
            why = " ".join(f"{exc} {_quiet(caught, p)}".split())
            raise InputError(f"cannot read MRC map {p}: {why}") from exc
    _quiet(caught, p)
    if data.ndim == 2:
        data = data[None]
    return data, vs


def _atomic_mrc(path, array: np.ndarray, voxel_size_ang: float, stack: bool) -> Path:
    def write(tmp: str) -> None:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(np.ascontiguousarray(array, dtype=np.float32))
            if stack:
                m.set_image_stack()
            else:
                m.set_volume()
            m.voxel_size = float(voxel_size_ang)
            m.update_header_stats()

    return atomic_write(path, write)


def write_map(path, array, voxel_size_ang: float) -> Path:
    """Write a 3D map ``(z, y, x)`` as float32 with voxel size ``voxel_size_ang`` (Å)."""
    a = np.asarray(array)
    if a.ndim != 3:
        raise ValueError(f"write_map expects a 3D (z, y, x) array, got shape {a.shape}")
    return _atomic_mrc(path, a, voxel_size_ang, stack=False)


def write_stack(path, array, pixel_size_ang: float) -> Path:
    """Write an image stack ``(F, H, W)`` as float32 (MRC image stack) with pixel size (Å)."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"write_stack expects a (F, H, W) array, got shape {a.shape}")
    return _atomic_mrc(path, a, pixel_size_ang, stack=True)


def read_fsc(path) -> tuple[np.ndarray, np.ndarray]:
    """Read an FSC table (``data_fsc`` of a RELION postprocess STAR file).

    Returns:
        ``(spectral_index (int), fsc)`` from ``rlnSpectralIndex`` and
        ``rlnFourierShellCorrelationCorrected``.

    Raises:
        InputError: missing file, no ``fsc`` table, or missing columns (named).
    """
    blocks = read_star(path)
    if "fsc" not in blocks or not hasattr(blocks["fsc"], "columns"):
        raise InputError(f"{path}: no data_fsc table (expected a RELION postprocess STAR file)")
    t = blocks["fsc"]
    missing = [c for c in ("rlnSpectralIndex", "rlnFourierShellCorrelationCorrected") if c not in t.columns]
    if missing:
        raise InputError(f"{path}: block data_fsc lacks column(s) {', '.join(missing)}")
    idx = t["rlnSpectralIndex"].to_numpy().astype(np.int64)
    fsc = t["rlnFourierShellCorrelationCorrected"].to_numpy(dtype=np.float64)
    return idx, fsc
