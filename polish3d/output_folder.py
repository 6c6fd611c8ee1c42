"""The output folder (``--o``) of ``polish3d align``: never an input, one run at a time, RELION's
exit markers, errors into its log, and the RELION 5 files written into it.

Writes: ``optimisation_set.star``, ``tomograms.star`` + ``tilt_series/<tomo>.star``,
``particles.star``, ``motion.star`` (when there is motion), ``RELION_OUTPUT_NODES.star``,
``Trajectories/*.ply`` and ``plots/*.png``; the driver adds ``note.txt``, ``metrics.json`` and
``polish3d.log`` with :func:`atomic_write_text` and :func:`setup_log_file`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("polish3d")

NODE_TYPES = {
    "optimisation_set.star": "TomoOptimisationSet.star.relion.tomo.polish",
    "tomograms.star": "TomogramGroupMetadata.star.relion.tomo.polish",
    "particles.star": "ParticleGroupMetadata.star.relion.tomo.polish",
    "motion.star": "TomoTrajectoryData.star.relion.polish",
}


LOCK_NAME = ".polish3d.lock"
LOG_NAME = "polish3d.log"
MARKERS = ("RELION_JOB_EXIT_SUCCESS", "RELION_JOB_EXIT_FAILURE")
#: files ``align`` writes directly in ``--o`` (plus ``tilt_series/…`` and the folders below)
_OUTPUT_FILES = (
    "optimisation_set.star", "tomograms.star", "particles.star", "motion.star", "note.txt",
    "metrics.json", LOG_NAME, "RELION_OUTPUT_NODES.star", LOCK_NAME, *MARKERS,
)
_OUTPUT_DIRS = ("temp", "plots", "Trajectories")


def setup_log_file(out_dir: Path) -> logging.Handler:
    """Send the ``polish3d`` log (DEBUG and up) to ``<o>/polish3d.log`` too; returns the handler."""
    handler = logging.FileHandler(out_dir / LOG_NAME, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    return handler


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _file_id(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def check_output_folder(out_dir, input_files: dict[str, Path], tilt_outputs=(), *, shown: str = "") -> None:
    """Refuse an output folder whose outputs would overwrite an input file.

    Paths are compared after resolving ``.``/``..``, symbolic links and trailing slashes, and by
    device and inode (hard links). Nothing is written.

    Args:
        out_dir: ``--o``.
        input_files: ``{what it is: path}`` of every input file (STARs, maps, images).
        tilt_outputs: relative paths of the per-tilt STARs that will be written in ``out_dir``.
        shown: how ``--o`` was written (for the message).

    Raises:
        OutputRefused: ``out_dir`` is a file, an input, or would overwrite an input.
    """
    from polish3d.errors import OutputRefused

    out = Path(out_dir)
    out_dir = shown or os.fspath(out_dir)
    inputs = [(what, Path(p)) for what, p in input_files.items() if p]
    out_id = _file_id(out)
    for what, p in inputs:
        if out_id is not None and _file_id(p) == out_id:
            raise OutputRefused(f"--o {out_dir}: that is the input {what} ({p}); give an output folder")
    if out.exists() and not out.is_dir():
        raise OutputRefused(f"--o {out_dir}: is an existing file, not a folder; give a folder")
    root = out.resolve()
    by_path = {p.resolve(): (what, p) for what, p in inputs}
    by_id = {fid: (what, p) for what, p in inputs if (fid := _file_id(p)) is not None}
    planned = [root / name for name in _OUTPUT_FILES] + [root / rel for rel in tilt_outputs]
    for q in planned:
        hit = by_path.get(q.resolve()) or by_id.get(_file_id(q))
        if hit is not None:
            what, p = hit
            raise OutputRefused(
                f"--o {out_dir}: the output {q.relative_to(root).as_posix()} would overwrite the "
                f"input {what} {p}; inputs are never written: choose another output folder"
            )
    for d in _OUTPUT_DIRS:
        sub = (root / d).resolve()
        for resolved, (what, p) in by_path.items():
            if resolved.is_relative_to(sub):
                raise OutputRefused(
                    f"--o {out_dir}: the input {what} {p} lies in {d}/ of the output folder, which "
                    "polish3d writes; choose another output folder"
                )


_HELD_LOCKS: dict[Path, int] = {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLock:
    """``<o>/.polish3d.lock`` created with ``O_EXCL`` and holding ``pid host``: one run per folder.

    A lock left by a process that no longer exists on this host is taken over (with a warning).
    Re-entrant within one process. Creates the folder.

    Raises:
        OutputRefused: another live run holds the lock, or the folder cannot be created/written.
    """

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._key = None

    def __enter__(self):
        import socket

        from polish3d.errors import OutputRefused

        key = self.out_dir.resolve()
        if _HELD_LOCKS.get(key):
            _HELD_LOCKS[key] += 1
            self._key = key
            return self
        host = socket.gethostname()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(3):
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    owner = self._owner()
                    if owner is None or owner[1] != host or _pid_alive(owner[0]):
                        who = "an unreadable lock" if owner is None else f"pid {owner[0]} on {owner[1]}"
                        raise OutputRefused(
                            f"--o {self.out_dir}: another polish3d run is writing this folder "
                            f"({who}; lock file {self.path}); wait for it, or remove the lock file "
                            "if that run is gone"
                        ) from None
                    log.warning("removing a stale lock %s (pid %d has exited)", self.path, owner[0])
                    self.path.unlink(missing_ok=True)
                    continue
                with os.fdopen(fd, "w") as fh:
                    fh.write(f"{os.getpid()} {host}\n")
                break
            else:
                raise OutputRefused(f"--o {self.out_dir}: could not take the lock {self.path}")
        except OSError as exc:
            raise OutputRefused(
                f"--o {self.out_dir}: cannot write in this folder ({exc.strerror or exc})"
            ) from None
        _HELD_LOCKS[key] = 1
        self._key = key
        return self

    def _owner(self):
        try:
            pid, host = self.path.read_text().split()[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc):
        _HELD_LOCKS[self._key] -= 1
        if _HELD_LOCKS[self._key] == 0:
            del _HELD_LOCKS[self._key]
            owner = self._owner()
            if owner is not None and owner[0] == os.getpid():
                self.path.unlink(missing_ok=True)
        return False


class Held:
    """Release an already taken :class:`OutputLock` when the block ends."""

    def __init__(self, lock: OutputLock):
        self.lock = lock

    def __enter__(self):
        return self.lock

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def error_summary(exc: BaseException) -> str:
    """The one-line summary of an error as the command line prints it."""
    from polish3d.errors import InputError, Terminated

    if isinstance(exc, InputError):
        text = str(exc)
    elif isinstance(exc, Terminated):
        text = f"{exc} (SIGTERM)"
    elif isinstance(exc, KeyboardInterrupt):
        text = "interrupted (SIGINT)"
    elif isinstance(exc, OSError):
        text = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
    else:
        text = f"internal error: {type(exc).__name__}: {exc}"
    return " ".join(text.split())


def log_error_line(out_dir: Path, exc: BaseException) -> None:
    """Append the error's one-line summary to ``<o>/polish3d.log`` (never into a refused folder)."""
    from polish3d.errors import OutputRefused

    if getattr(exc, "_polish3d_logged", False) or isinstance(exc, OutputRefused):
        return
    try:
        if out_dir.is_dir():
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with open(out_dir / LOG_NAME, "a") as fh:
                fh.write(f"{stamp} ERROR {error_summary(exc)}\n")
            exc._polish3d_logged = True
    except OSError:
        pass


def write_marker(out_dir: Path, ok: bool) -> None:
    """RELION's exit marker (and remove the other one)."""
    if not out_dir.is_dir():
        return
    for m in MARKERS:
        (out_dir / m).unlink(missing_ok=True)
    (out_dir / MARKERS[0 if ok else 1]).touch()




# ---------------------------------------------------------------------------------------------
# the RELION 5 files


def write_outputs(out_dir: Path, tset, pset, results, trajectories, particles_file, *, shift_only: bool,
                  has_motion: bool) -> Path:
    """Write the refined RELION 5 set into ``out_dir``; returns the ``optimisation_set.star`` path.

    Args:
        tset, pset: the input tomogram and particle sets (:mod:`polish3d.io.relion`).
        results: ``{tomogram name: TomogramResult}`` of the refined tomograms (others unchanged).
        trajectories: the input trajectories ``{particle name: (F, 3) Å}`` or ``None``.
        particles_file: the input particle set (named in the output when positions are kept).
        shift_only: positions were not refined: no ``particles.star`` is written.
        has_motion: motion was refined (``motion.star`` is written even if empty).
    """
    from polish3d.io import relion

    for name, res in results.items():
        tset = tset.with_tilt_series(name, projections=res.projections, deformation=res.deformation)
    tomo_path = tset.write(out_dir)
    _plot_deformations(out_dir, tset, results)
    new_particles = Path(particles_file)
    if not shift_only:
        for name, res in results.items():
            if res.positions_px is not None:
                ts = tset.tilt_series(name, load_images=False)
                pset = pset.with_positions(ts, list(res.particle_names), res.positions_px)
        new_particles = pset.write(out_dir / "particles.star")
    traj_path = None
    any_traj = any(r.trajectories_px is not None for r in results.values())
    if has_motion or trajectories is not None or any_traj:
        merged = dict(trajectories or {})
        for name, res in results.items():
            if res.trajectories_px is None:
                continue
            ts = tset.tilt_series(name, load_images=False)
            for i, pname in enumerate(res.particle_names):
                merged[pname] = np.asarray(res.trajectories_px[i]) * ts.pixel_size_ang
        # order: tomograms of the set, then particles within each tomogram (RELION's order)
        ordered = {}
        for pname in pset.particles["rlnTomoParticleName"].astype(str):
            if pname in merged:
                ordered[pname] = merged[pname]
        traj_path = relion.write_trajectories(out_dir / "motion.star", ordered)
    _write_motion_extras(out_dir, tset, pset, results)
    opt = relion.OptimisationSet(
        particles_file=new_particles, tomograms_file=tomo_path, trajectories_file=traj_path
    )
    opt_path = relion.write_optimisation_set(out_dir / "optimisation_set.star", opt)
    nodes = [("optimisation_set.star", opt_path), ("tomograms.star", tomo_path)]
    if not shift_only:
        nodes.append(("particles.star", new_particles))
    if traj_path is not None:
        nodes.append(("motion.star", traj_path))
    _write_nodes(out_dir, nodes)
    return opt_path


def _plot_deformations(out_dir: Path, tset, results) -> None:
    """``<o>/plots/<tomo>_deformation.png``: the deformation grid, exaggerated (never fatal)."""
    for name, res in results.items():
        if res.deformation is None:
            continue
        try:
            from polish3d.refine.deformation import plot_deformation

            size = tset.tilt_series(name, load_images=False).image_size_px
            plot_deformation(res.deformation, size, out_dir / "plots" / f"{name}_deformation.png", title=name)
        except Exception as exc:  # noqa: BLE001 - a picture must not fail the run
            log.warning("  %s: could not draw the deformation (%s)", name, exc)


def _write_motion_extras(out_dir: Path, tset, pset, results) -> None:
    """``<o>/Trajectories/<tomo>_x1.ply``, ``_x8.ply`` and ``<o>/plots/<tomo>_motion.png`` for every
    tomogram with trajectories (positions: the refined ones, else the input's; pixels)."""
    from polish3d import geometry
    from polish3d.io import ply

    for name, res in results.items():
        if res.trajectories_px is None:
            continue
        ts = tset.tilt_series(name, load_images=False)
        pos = res.positions_px
        if pos is None:
            pos = pset.for_tomogram(ts, require_half_set=False).positions_px
        order = geometry.dose_order(ts.pre_exposure_e_per_ang2)
        ply.write_trajectory_meshes(out_dir / "Trajectories", name, pos, res.trajectories_px, order)
        try:
            ply.plot_trajectories(pos, res.trajectories_px, order, out_dir / "plots" / f"{name}_motion.png",
                                  scale=8.0, title=name)
        except Exception as exc:  # noqa: BLE001 - a picture must not fail the run
            log.warning("  %s: could not draw the trajectories (%s)", name, exc)


def _write_nodes(out_dir: Path, nodes) -> None:
    import pandas as pd

    from polish3d.io.star import write_star

    table = pd.DataFrame(
        {
            "rlnPipeLineNodeName": [Path(os.path.relpath(p)).as_posix() for _, p in nodes],
            "rlnPipeLineNodeTypeLabel": [NODE_TYPES[k] for k, _ in nodes],
        }
    )
    write_star(out_dir / "RELION_OUTPUT_NODES.star", {"output_nodes": table})

