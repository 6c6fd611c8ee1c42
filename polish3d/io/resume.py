"""The restart store of ``polish3d align``: ``<o>/temp/<tomo>.npz``, one file per tomogram.

Each file holds one tomogram's refined geometry and, next to it, a *record* of what that result
depends on: the options that change the answer and checksums of the inputs (the tomogram's
particles and tilt series, the reference maps, mask and FSC table). ``--only_do_unfinished``
reuses a stored result only when its record equals the current one; otherwise it says which
entries differ and the tomogram is recomputed. An unreadable file (truncated, not an ``.npz``, an
older layout) is likewise recomputed, with the reason. (No JAX here.)
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from polish3d.model import Deformation, TomogramResult

__all__ = ["RECORD_VERSION", "array_checksum", "file_checksum", "load_result", "save_result"]

#: bumped whenever the stored layout or the meaning of a record entry changes
RECORD_VERSION = 2


def file_checksum(path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def array_checksum(*items) -> str:
    """SHA-256 over arrays, strings and numbers (shape and dtype included; ``None`` allowed)."""
    h = hashlib.sha256()
    for item in items:
        if item is None:
            h.update(b"<none>")
        elif isinstance(item, str):
            h.update(b"s" + item.encode())
        else:
            a = np.ascontiguousarray(np.asarray(item))
            if a.dtype.kind in "OU":
                h.update(b"u" + "\x00".join(map(str, a.ravel())).encode())
            else:
                h.update(f"{a.dtype.str}{a.shape}".encode())
                h.update(a.tobytes())
        h.update(b"|")
    return h.hexdigest()


def _path(out_dir, name: str) -> Path:
    return Path(out_dir) / "temp" / f"{name}.npz"


def save_result(out_dir, res: TomogramResult, record: dict) -> Path:
    """Store ``res`` with its ``record`` in ``<out_dir>/temp/<name>.npz`` (temp name + rename)."""
    temp = Path(out_dir) / "temp"
    temp.mkdir(exist_ok=True)
    final = _path(out_dir, res.name)
    tmp = final.with_name(final.name + ".tmp")
    arrays = {"projections": res.projections, "particle_names": np.asarray(res.particle_names, str),
              "status": np.asarray(res.status)}
    if res.positions_px is not None:
        arrays["positions_px"] = res.positions_px
    if res.trajectories_px is not None:
        arrays["trajectories_px"] = res.trajectories_px
    if res.deformation is not None:
        arrays["deformation_coefficients"] = res.deformation.coefficients
        arrays["deformation_grid"] = np.asarray(res.deformation.grid_size)
        arrays["deformation_model"] = np.asarray(res.deformation.model)
    record = dict(record, record_version=RECORD_VERSION)
    try:
        with open(tmp, "wb") as fh:
            np.savez(
                fh, metrics=np.asarray(json.dumps(res.metrics, default=float)),
                record=np.asarray(json.dumps(record, sort_keys=True)), **arrays,
            )
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def load_result(out_dir, name: str, record: dict) -> tuple[TomogramResult | None, str]:
    """The stored result of tomogram ``name`` if its record equals ``record``.

    Returns:
        ``(result, "")`` when it can be reused; ``(None, "")`` when nothing is stored;
        ``(None, reason)`` when a stored file exists but cannot be used (``reason`` says why:
        unreadable, no record, or which record entries differ).
    """
    path = _path(out_dir, name)
    if not path.exists():
        return None, ""
    rel = f"temp/{path.name}"
    if not zipfile.is_zipfile(path):
        return None, f"{rel} is not an .npz archive (truncated or damaged)"
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        stored = json.loads(str(data["record"])) if "record" in data else None
        metrics = json.loads(str(data["metrics"]))
        projections = np.asarray(data["projections"], np.float64)
    except Exception as exc:  # noqa: BLE001 - any damage means "recompute"
        return None, f"{rel} is unreadable ({type(exc).__name__}: {exc})"
    if stored is None:
        return None, f"{rel} has no record of the options and inputs it was made with"
    want = dict(record, record_version=RECORD_VERSION)
    differ = sorted(k for k in set(want) | set(stored) if stored.get(k) != want.get(k))
    if differ:
        return None, f"{rel} was made with other {', '.join(differ)}"
    deformation = None
    if "deformation_coefficients" in data:
        deformation = Deformation(
            model=str(data["deformation_model"]),
            grid_size=tuple(int(v) for v in data["deformation_grid"]),
            coefficients=data["deformation_coefficients"],
        )
    res = TomogramResult(
        name=name,
        projections=projections,
        positions_px=data.get("positions_px"),
        trajectories_px=data.get("trajectories_px"),
        deformation=deformation,
        metrics=metrics,
        particle_names=tuple(str(v) for v in data.get("particle_names", ())),
        status=str(data.get("status", "converged")),
    )
    arrays = [res.projections, res.positions_px, res.trajectories_px]
    if any(a is not None and not np.all(np.isfinite(a)) for a in arrays):
        return None, f"{rel} holds non-finite values"
    return res, ""
