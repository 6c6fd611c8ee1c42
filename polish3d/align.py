"""``polish3d align``: files in → refined files out (the only module that mixes I/O and compute).

Per tomogram: read its tilt series and particles, refine (:mod:`polish3d.refine.tomogram`),
keep the result in ``<o>/temp/<tomo>.npz`` (the restart point for ``--only_do_unfinished``);
at the end write the RELION 5 outputs: ``optimisation_set.star``, ``tomograms.star`` +
``tilt_series/<tomo>.star``, ``particles.star``, ``motion.star`` (when there is motion),
``note.txt``, ``metrics.json``, ``polish3d.log`` and ``RELION_OUTPUT_NODES.star``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from polish3d.errors import InputError
from polish3d.model import TomogramResult

log = logging.getLogger("polish3d")

__all__ = ["AlignInputs", "AlignOutcome", "align", "run_from_cli"]

NODE_TYPES = {
    "optimisation_set.star": "TomoOptimisationSet.star.relion.tomo.polish",
    "tomograms.star": "TomogramGroupMetadata.star.relion.tomo.polish",
    "particles.star": "ParticleGroupMetadata.star.relion.tomo.polish",
    "motion.star": "TomoTrajectoryData.star.relion.polish",
}


@dataclasses.dataclass
class AlignInputs:
    """Input files of an alignment (any may come from the optimisation set ``i``).

    Attributes mirror the flags ``--i --p --t --mot --ref1 --ref2 --mask --fsc``.
    """

    i: str = ""
    p: str = ""
    t: str = ""
    mot: str = ""
    ref1: str = ""
    ref2: str = ""
    mask: str = ""
    fsc: str = ""


@dataclasses.dataclass
class AlignOutcome:
    """What :func:`align` did: output paths, per-tomogram results and status."""

    out_dir: Path
    optimisation_set: Path
    results: dict[str, TomogramResult]
    skipped: list[str]
    seconds: float
    status: str = "ok"


# ---------------------------------------------------------------------------------------------
# helpers


def _setup_log_file(out_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(out_dir / "polish3d.log", mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    return handler


def _progress_printer(name: str) -> Callable[..., None]:
    def report(event, **k):
        if event == "coarse_shift":
            log.info("    coarse per-tilt shift search: max |shift| %.2f px (%.1f s)",
                     k["max_shift_px"], k["seconds"])
        elif event == "iteration":
            log.debug("      outer %d  iteration %5d  cost %.10g", k["outer"], k["iteration"], k["cost"])
        elif event == "outer":
            log.info(
                "    outer %d: cost %.6g → %.6g in %d L-BFGS iterations (%s); CC %.1f s, "
                "L-BFGS %.1f s; 2D moves RMS %.3f px, max %.3f px",
                k["outer"], k["cost_initial"], k["cost_final"], k["iterations"],
                "converged" if k["converged"] else "not converged", k["cc_seconds"],
                k["lbfgs_seconds"], k["move_rms_px"], k["move_max_px"],
            )
        elif event == "rescue":
            log.info("    %d particle(s) left behind: re-searched in 3D (%.1f s)", k["particles"],
                     k["seconds"])
        elif event == "motion":
            log.info("    %s", k.get("message", ""))
        elif event == "deformation":
            (log.warning if k.get("warning") else log.info)("    %s", k.get("message", ""))

    return report


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# the output folder: never an input, one run at a time, errors into its log

LOCK_NAME = ".polish3d.lock"
LOG_NAME = "polish3d.log"
MARKERS = ("RELION_JOB_EXIT_SUCCESS", "RELION_JOB_EXIT_FAILURE")
#: files ``align`` writes directly in ``--o`` (plus ``tilt_series/…`` and the folders below)
_OUTPUT_FILES = (
    "optimisation_set.star", "tomograms.star", "particles.star", "motion.star", "note.txt",
    "metrics.json", LOG_NAME, "RELION_OUTPUT_NODES.star", LOCK_NAME, *MARKERS,
)
_OUTPUT_DIRS = ("temp", "plots", "Trajectories")


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


class _Held:
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


def _log_error_line(out_dir: Path, exc: BaseException) -> None:
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


def _write_marker(out_dir: Path, ok: bool) -> None:
    """RELION's exit marker (and remove the other one)."""
    if not out_dir.is_dir():
        return
    for m in MARKERS:
        (out_dir / m).unlink(missing_ok=True)
    (out_dir / MARKERS[0 if ok else 1]).touch()


# ---------------------------------------------------------------------------------------------
# checks of what could be refined (before anything is written)


def check_reference_maps(half1, half2, mask=None, names=("half map 1", "half map 2", "mask")) -> None:
    """Refuse reference maps that hold non-finite voxels or carry no signal.

    Raises:
        InputError: naming the map: NaN/inf voxels, a constant map (all zero, say), a mask that
            is zero everywhere or not finite.
    """
    for arr, name in ((half1, names[0]), (half2, names[1])):
        a = np.asarray(arr)
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise InputError(
                f"{name}: {bad} of {a.size} voxels are not finite (NaN or inf); the reference map "
                "must be finite"
            )
        if a.size == 0 or float(a.max()) == float(a.min()):
            value = float(a.flat[0]) if a.size else 0.0
            raise InputError(
                f"{name}: the reference map is constant ({value:g} everywhere); there is nothing "
                "to align against"
            )
    if mask is not None:
        m = np.asarray(mask)
        if not np.all(np.isfinite(m)):
            raise InputError(f"{names[2]}: the mask holds non-finite voxels (NaN or inf)")
        if not np.any(m != 0):
            raise InputError(f"{names[2]}: the mask is zero everywhere; it would remove the whole reference")


def check_config(config, motion=None, deformation=None) -> None:
    """Refuse option combinations under which nothing can be refined (the API and the CLI)."""
    if 0 <= config.max_frame < config.min_frame:
        raise InputError(
            f"--min_frame {config.min_frame} --max_frame {config.max_frame}: no dose rank is used; "
            "expected --min_frame <= --max_frame (or --max_frame -1: up to the last)"
        )
    if config.min_frame < 0:
        raise InputError(f"--min_frame {config.min_frame}: expected a dose rank >= 0")
    if config.max_frame < -1:
        raise InputError(f"--max_frame {config.max_frame}: expected a dose rank >= 0, or -1 (the last)")
    angles = config.const_a or config.shift_only
    positions = config.const_p or config.shift_only
    if angles and positions and config.const_s and motion is None and deformation is None:
        raise InputError(
            "--const_a/--shift_only, --const_p and --const_s together leave nothing to refine; "
            "drop one of them (or add --motion/--deformation)"
        )


def _plan_tomogram(ts, parts, config) -> str:
    """Why nothing of this tomogram can be refined ("" when something can); InputError when the
    options cannot work for it at all."""
    from polish3d import geometry
    from polish3d.refine.tomogram import _visible
    from polish3d.score import project_particles

    w, h = ts.image_size_px
    box = config.box
    if box >= min(w, h):
        raise InputError(
            f"--b {box}: the box must be smaller than the tilt images; {ts.name} has {w}×{h} px"
        )
    f = ts.n_tilts
    if config.min_frame > f - 1:
        raise InputError(
            f"--min_frame {config.min_frame}: {ts.name} has {f} tilts (dose ranks 0…{f - 1})"
        )
    if parts.n_particles == 0:
        return f"{ts.name}: no particles"
    rank = np.empty(f, int)
    rank[geometry.dose_order(ts.pre_exposure_e_per_ang2)] = np.arange(f)
    kmax = f - 1 if config.max_frame < 0 else min(config.max_frame, f - 1)
    frame_ok = (rank >= config.min_frame) & (rank <= kmax)
    vis = _visible(project_particles(ts, parts), ts.image_size_px, box) & frame_ok[None, :]
    if not vis.any():
        return (
            f"{ts.name}: none of its {parts.n_particles} particles projects inside the tilt images "
            f"({w}×{h} px, box {box} px) on the tilts used; are the coordinates in this tomogram?"
        )
    return ""


def _flatten(prefix: str, obj) -> list:
    """Values of a dataclass (recursively) for a checksum."""
    out = []
    for fld in dataclasses.fields(obj):
        v = getattr(obj, fld.name)
        if dataclasses.is_dataclass(v):
            out += _flatten(f"{prefix}.{fld.name}", v)
        elif isinstance(v, (list, tuple)):
            out += [f"{prefix}.{fld.name}", repr(v)]
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out += [f"{prefix}.{fld.name}", repr(v)]
        else:
            out += [f"{prefix}.{fld.name}", np.asarray(v)]
    return out


def _jsonable(value):
    """Plain JSON values (tuples → lists, numpy scalars → Python) so that records compare."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def _result_record(options: dict, input_sums: dict, ts, parts) -> dict:
    """What a tomogram's result depends on: options, this tomogram's inputs, the references."""
    from polish3d.io.resume import array_checksum

    rec = dict(options)
    rec.update(input_sums)
    rec["tilt series (geometry, CTF, dose, image files)"] = array_checksum(*_flatten("ts", ts))
    rec["particles of this tomogram"] = array_checksum(*_flatten("particles", parts))
    return _jsonable(rec)


def _options_record(config, motion, deformation, freq_cutoff_ang, fsc_thresh_width, use_snr_weight) -> dict:
    flag = {"box": "--b", "whiten": "--no_whiten (inverted)"}
    rec = {flag.get(k, f"--{k}"): v for k, v in dataclasses.asdict(config).items()}
    rec["--motion"] = motion is not None
    if motion is not None:
        rec.update({f"motion {k}": v for k, v in dataclasses.asdict(motion).items()})
    rec["--deformation"] = deformation is not None
    if deformation is not None:
        rec.update({f"deformation {k}": v for k, v in dataclasses.asdict(deformation).items()})
    rec["--freq_cutoff"] = freq_cutoff_ang
    rec["--fsc_thresh_width"] = fsc_thresh_width
    rec["--use_SNR_weight"] = use_snr_weight
    return rec


# ---------------------------------------------------------------------------------------------
# the run


def align(
    inputs: AlignInputs,
    out_dir,
    config,
    *,
    motion=None,
    deformation=None,
    only_do_unfinished: bool = False,
    threads: int | None = None,
    command_line: str | None = None,
    freq_cutoff_ang: float = -1.0,
    fsc_thresh_width: float = 5.0,
    use_snr_weight: bool = False,
    write_note: bool = True,
    pipeline_markers: bool = False,
    cluster=None,
    fsc_check: bool = False,
) -> AlignOutcome:
    """Refine every tomogram of an optimisation set and write RELION 5 outputs to ``out_dir``.

    Every input is read and checked before anything is written; ``out_dir`` is refused when an
    output would overwrite an input, and is locked while the run writes it (one run per folder).

    Args:
        inputs: input files (``--i`` and/or the individual components).
        out_dir: output folder (created).
        config: :class:`polish3d.refine.tomogram.AlignConfig`.
        motion: motion options (``polish3d.refine.motion.MotionConfig``) or ``None``.
        deformation: deformation options (``polish3d.refine.deformation.DeformationConfig``) or
            ``None``.
        only_do_unfinished: reuse results already in ``out_dir/temp`` made with the same options
            and inputs (others are recomputed, with the reason in the log).
        threads: CPU threads (informational; set ``XLA_FLAGS`` before JAX starts to limit).
        command_line: written to ``note.txt``.
        freq_cutoff_ang, fsc_thresh_width, use_snr_weight: reference envelope options.
        write_note: write ``note.txt`` (RELION skips it under pipeline control).
        pipeline_markers: write ``RELION_JOB_EXIT_SUCCESS``/``RELION_JOB_EXIT_FAILURE``.
        cluster: :class:`polish3d.scale.ClusterOptions` to refine the tomograms as Dask tasks;
            ``None`` (or no workers and no scheduler): one after another in this process.
        fsc_check: reconstruct the half maps (``polish3d reconstruct``) from the input and from the
            refined geometry and report both FSCs and resolutions (log, ``metrics.json`` ``fsc``,
            report); about doubles the run time.

    Returns:
        an :class:`AlignOutcome`.

    Raises:
        InputError: bad or inconsistent inputs, or nothing that could be refined.
        OutputRefused: ``out_dir`` would overwrite an input, is a file, cannot be written, or is
            locked by another run.
    """
    from logging.handlers import MemoryHandler

    from polish3d.io import mrc
    from polish3d.io.resume import file_checksum
    from polish3d.refine import tomogram as tomo_refine

    t_start = time.perf_counter()
    shown = os.fspath(out_dir)
    out_dir = Path(out_dir)
    early = MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
    early.setLevel(logging.DEBUG)
    log.addHandler(early)
    try:
        prepared = _read_inputs(inputs, config, motion, deformation)
        tset, pset, trajectories = prepared["tset"], prepared["pset"], prepared["trajectories"]
        check_output_folder(out_dir, prepared["input_files"], prepared["tilt_outputs"], shown=shown)
        box = config.box
        half1, ref_px = prepared["half1"], prepared["ref_px"]
        refs_ft, (idx, fsc) = tomo_refine.prepare_references(
            half1, prepared["half2"], box, prepared["mask"], names=prepared["map_names"]
        )
        if half1.shape[0] < box:
            log.info("  Padding reference from %d to %d", half1.shape[0], box)
        lock = OutputLock(out_dir).__enter__()
    except BaseException:
        log.removeHandler(early)
        early.close()
        raise

    with _Held(lock):
        if pipeline_markers:
            for m in MARKERS:
                (out_dir / m).unlink(missing_ok=True)
        log.removeHandler(early)
        handler = _setup_log_file(out_dir)
        early.setTarget(handler)
        early.close()
        try:
            if write_note and command_line:
                _atomic_write_text(out_dir / "note.txt", f"Command:\n\n{command_line}\n")
            names, plans = prepared["names"], prepared["plans"]
            if prepared["fsc_file"]:
                idx, fsc = mrc.read_fsc(prepared["fsc_file"])
            options = _options_record(config, motion, deformation, freq_cutoff_ang, fsc_thresh_width,
                                      use_snr_weight)
            input_sums = {
                f"{what} (checksum)": file_checksum(p)
                for what, p in prepared["input_files"].items()
                if p and what in ("reference half map 1", "reference half map 2", "mask", "FSC table")
            }
            log.info("Configuration:")
            log.info("  particle motion %s", "considered" if motion is not None else "not considered")
            log.info("  frame angles %s", "constant" if config.const_a or config.shift_only else "variable")
            log.info("  frame shifts %s", "constant" if config.const_s else "variable")
            log.info("  particle positions %s",
                     "constant" if config.const_p or config.shift_only else "variable")
            results: dict[str, TomogramResult] = {}
            skipped: list[str] = []
            not_refined: dict[str, str] = {}
            pending = []
            for k, name in enumerate(names):
                ts, parts, why = plans[name]
                if why:
                    log.warning("Tomogram %d / %d: %s; left as it is", k + 1, len(names), why)
                    not_refined[name] = why
                    continue
                if ref_px is not None and abs(ref_px - ts.pixel_size_ang) > 0.01 * ts.pixel_size_ang:
                    log.warning(
                        "  reference pixel size %.4g Å differs from the tilt series' %.4g Å "
                        "(RELION does not check; the maps must be at the tilt-series pixel size)",
                        ref_px, ts.pixel_size_ang,
                    )
                record = _result_record(options, input_sums, ts, parts)
                if only_do_unfinished:
                    from polish3d.io.resume import load_result

                    done, reason = load_result(out_dir, name, record)
                    if done is not None:
                        log.info("Tomogram %d / %d: %s already finished; skipped", k + 1, len(names), name)
                        results[name] = done
                        skipped.append(name)
                        continue
                    if reason:
                        log.warning("Tomogram %d / %d: %s: %s; recomputing", k + 1, len(names), name, reason)
                pending.append(_TomogramJob(
                    ts, parts, record, np.asarray(refs_ft), idx, fsc, config, motion, deformation,
                    (freq_cutoff_ang, fsc_thresh_width, use_snr_weight), out_dir.resolve(), k + 1, len(names),
                ))
            refined, failed = _run_jobs(pending, cluster)
            results.update(refined)
            not_refined.update(failed)

            if not results:
                raise InputError("nothing was refined: " + "; ".join(not_refined.values()))
            opt_path = _write_outputs(
                out_dir, tset, pset, results, trajectories, prepared["motion_file"],
                prepared["particles_file"], config, has_motion=motion is not None,
            )
            seconds = time.perf_counter() - t_start
            metrics = {
                "seconds": seconds,
                "config": dataclasses.asdict(config),
                "tomograms": {n: r.metrics for n, r in results.items()},
                "skipped": skipped,
                "not_refined": not_refined,
                "inputs": _inputs_record(prepared),
            }
            if fsc_check:
                metrics["fsc"] = _fsc_before_after(inputs.i, opt_path, config.box)
            from polish3d.io.jsonsafe import json_safe as _json_safe

            # strict JSON: an undefined figure (NaN) is written as null
            _atomic_write_text(out_dir / "metrics.json",
                               json.dumps(_json_safe(metrics), indent=1, allow_nan=False, default=str))
            if not_refined:
                log.warning("%d tomogram(s) could not be refined and keep their input geometry: %s",
                            len(not_refined), ", ".join(not_refined))
            log.info("Finished %d tomograms in %.1f s; wrote %s", len(results), seconds, opt_path)
            _write_report(out_dir)
            if pipeline_markers:
                _write_marker(out_dir, True)
            return AlignOutcome(out_dir, opt_path, results, skipped, seconds,
                                status="ok" if not not_refined else "partial")
        except BaseException as exc:
            log.removeHandler(handler)
            handler.close()
            _log_error_line(out_dir, exc)
            if pipeline_markers:
                _write_marker(out_dir, False)
            raise
        finally:
            log.removeHandler(handler)
            handler.close()


def _inputs_record(prepared: dict) -> dict:
    """Absolute paths of the input geometry, for ``metrics.json`` (the report reads them)."""

    def absolute(path):
        return os.fspath(Path(path).resolve()) if path else None

    return {
        "tomograms": absolute(prepared["input_files"]["tomogram set"]),
        "particles": absolute(prepared["particles_file"]),
        "trajectories": absolute(prepared["motion_file"]),
        "project_dir": os.fspath(Path.cwd().resolve()),
    }


def _fsc_before_after(input_set, refined_set, box: int) -> dict:
    """Half-map FSC of the particles from the input (when given as an optimisation set) and from
    the refined geometry, as :func:`polish3d.reconstruct.half_map_fsc` (same box and options)."""
    from polish3d.reconstruct import half_map_fsc

    t0 = time.perf_counter()
    after, res_after = half_map_fsc(refined_set, box)
    rec = {"shell": list(range(len(after))), "after": after.tolist(), "resolution_after_ang": res_after}
    if input_set:
        before, res_before = half_map_fsc(input_set, box)
        rec.update(before=before.tolist(), resolution_before_ang=res_before)
        log.info("Half-map FSC 0.143: %.1f Å from the input geometry → %.1f Å refined (%.1f s)",
                 res_before, res_after, time.perf_counter() - t0)
    else:
        log.info("Half-map FSC 0.143: %.1f Å refined (no --i: the input geometry is not scored; %.1f s)",
                 res_after, time.perf_counter() - t0)
    return rec


def _write_report(out_dir: Path) -> None:
    """Write ``report.html``; the refined files are already out, so a failure here is a warning."""
    from polish3d.report import write_report

    try:
        path = write_report(out_dir)
    except Exception as exc:  # noqa: BLE001 - the run's results stand without the report
        log.warning("could not write the report (%s); run `polish3d report %s` to retry", exc, out_dir)
        return
    log.info("Report: %s", path)


def _read_inputs(inputs: AlignInputs, config, motion, deformation) -> dict:
    """Read and check every input of a run (writes nothing)."""
    from polish3d.io import mrc, relion

    check_config(config, motion, deformation)
    opt = relion.read_optimisation_set(inputs.i) if inputs.i else relion.OptimisationSet()

    def pick(flag_value, from_set, what, required):
        if flag_value:
            return Path(flag_value)
        if from_set is not None:
            return Path(from_set)
        if required:
            raise InputError(f"no {what}: give it with the flag or in the optimisation set --i")
        return None

    particles_file = pick(inputs.p, opt.particles_file, "particle set (--p)", True)
    tomograms_file = pick(inputs.t, opt.tomograms_file, "tomogram set (--t)", True)
    motion_file = pick(inputs.mot, opt.trajectories_file, "trajectories (--mot)", False)
    ref1 = pick(inputs.ref1, opt.ref1, "reference half map 1 (--ref1)", True)
    ref2 = pick(inputs.ref2, opt.ref2, "reference half map 2 (--ref2)", True)
    mask_file = pick(inputs.mask, opt.mask, "mask", False)
    fsc_file = pick(inputs.fsc, opt.fsc, "FSC", False)

    log.info("Initialising:")
    tset = relion.read_tomogram_set(tomograms_file)
    pset = relion.read_particle_set(particles_file)
    if len(pset.particles) == 0:
        raise InputError(f"{particles_file}: the particle table lists no particles; nothing to refine")
    pset.check_tomograms(tset.names)
    trajectories = relion.read_trajectories(motion_file) if motion_file else None

    half1, vs1 = mrc.read_map(ref1)
    half2, _ = mrc.read_map(ref2)
    mask = mrc.read_map(mask_file)[0] if mask_file else None
    map_names = (str(ref1), str(ref2), f"mask {mask_file}")
    check_reference_maps(half1, half2, mask, names=map_names)
    if fsc_file:
        mrc.read_fsc(fsc_file)  # fail now on a bad table, not after the first tomogram

    in_particles = set(pset.tomogram_names())
    names = [n for n in tset.names if n in in_particles]
    plans = {}
    input_files = {
        "optimisation set": Path(inputs.i) if inputs.i else None, "particle set": particles_file,
        "tomogram set": tomograms_file, "trajectories": motion_file, "reference half map 1": ref1,
        "reference half map 2": ref2, "mask": mask_file, "FSC table": fsc_file,
    }
    tilt_outputs = []
    for name in names:
        ts = tset.tilt_series(name)
        parts = pset.for_tomogram(ts, trajectories)
        plans[name] = (ts, parts, _plan_tomogram(ts, parts, config))
        tilt_file = tset.tilt_files.get(name)
        if tilt_file is not None:
            input_files[f"tilt-series STAR of {name}"] = Path(tilt_file)
        for j, (img, _) in enumerate(dict.fromkeys(ts.image_files)):
            input_files[f"tilt image file {j + 1} of {name}"] = Path(img)
    for name in tset.names:
        entry = tset.tilt_file_entries.get(name, f"tilt_series/{name}.star")
        default = f"tilt_series/{name}.star"
        tilt_outputs += [relion._pipeline_post(entry) or default, default]
    if names and all(why for _, _, why in plans.values()):
        raise InputError("nothing to refine: " + "; ".join(why for _, _, why in plans.values()))
    return {
        "tset": tset, "pset": pset, "trajectories": trajectories, "names": names, "plans": plans,
        "half1": half1, "half2": half2, "mask": mask, "map_names": map_names,
        "ref_px": float(vs1) if vs1 and vs1 > 0 else None, "fsc_file": fsc_file,
        "motion_file": motion_file, "particles_file": particles_file,
        "input_files": input_files, "tilt_outputs": tilt_outputs,
    }


@dataclasses.dataclass
class _TomogramJob:
    """Everything one tomogram's refinement needs (picklable: it may run on a Dask worker)."""

    ts: Any
    parts: Any
    record: dict
    refs_ft: Any
    fsc_idx: Any
    fsc: Any
    config: Any
    motion: Any
    deformation: Any
    envelope_options: tuple  # (freq_cutoff_ang, fsc_thresh_width, use_snr_weight)
    out_dir: Path
    number: int
    total: int

    @property
    def name(self) -> str:
        return self.ts.name


def _run_job(job: _TomogramJob, envelopes: dict | None = None) -> str:
    """Refine one tomogram and store the result in the resume store of ``job.out_dir``.

    Returns ``""`` when stored, else why the tomogram keeps its input geometry. Runs in the
    driver (serial) or on a Dask worker; the driver reads the result back from the store.
    """
    from polish3d.io.resume import save_result

    log.info("Tomogram %d / %d: %s (%d particles, %d tilts, %d×%d px)", job.number, job.total, job.name,
             job.parts.n_particles, job.ts.n_tilts, *job.ts.image_size_px)
    res = _refine_one(job.ts, job.parts, job.refs_ft, job.fsc_idx, job.fsc,
                      {} if envelopes is None else envelopes, job.config, job.motion, job.deformation,
                      *job.envelope_options)
    if res is None:
        return f"{job.name}: every tilt image is entirely non-finite"
    arrays = (res.projections, res.positions_px, res.trajectories_px)
    if any(a is not None and not np.all(np.isfinite(a)) for a in arrays):
        why = f"{job.name}: the refinement produced non-finite geometry; input geometry kept"
        log.warning("  %s", why)
        return why
    save_result(job.out_dir, res, job.record)
    return ""


def _run_jobs(jobs: list[_TomogramJob], cluster) -> tuple[dict[str, TomogramResult], dict[str, str]]:
    """Run the jobs, one after another here or as Dask tasks; results come from the resume store."""
    from polish3d.io.resume import load_result

    why: dict[str, str] = {}
    if cluster is None or not cluster.distributed or not jobs:
        envelopes: dict = {}
        for job in jobs:
            why[job.name] = _run_job(job, envelopes)
    else:
        why = _run_jobs_on_dask(jobs, cluster)
    results, failed = {}, {}
    for job in jobs:
        if why[job.name]:
            failed[job.name] = why[job.name]
            continue
        res, reason = load_result(job.out_dir, job.name, job.record)
        if res is None:  # pragma: no cover - the store was just written
            raise RuntimeError(f"{job.name}: the stored result could not be read back ({reason})")
        results[job.name] = res
    return results, failed


def _run_jobs_on_dask(jobs: list[_TomogramJob], cluster) -> dict[str, str]:
    """Tomograms as Dask tasks; a data error fails the run after the other tomograms finished."""
    from polish3d.scale import run_tasks

    where = cluster.scheduler or f"{cluster.workers} local worker(s)"
    log.info("Refining %d tomogram(s) as Dask tasks on %s", len(jobs), where)
    t0 = time.perf_counter()

    def done(outcome, n_done, n_total):
        state = "done" if outcome.ok else f"FAILED: {error_summary(outcome.error)}"
        log.info("  tomogram %s %s (%d / %d finished, %.1f s)", outcome.key, state, n_done, n_total,
                 time.perf_counter() - t0)

    outcomes = run_tasks(_run_job, {job.name: (job,) for job in jobs}, cluster, on_done=done)
    errors = {k: o.error for k, o in outcomes.items() if not o.ok}
    if errors:
        first = next(iter(errors.values()))
        log.error("%d tomogram(s) failed: %s", len(errors), ", ".join(errors))
        raise first
    return {k: o.value for k, o in outcomes.items()}


def _refine_one(ts, parts, refs_ft, idx, fsc, envelopes, config, motion, deformation, freq_cutoff_ang,
                fsc_thresh_width, use_snr_weight):
    """One tomogram: open its images (non-finite pixels masked and counted), refine."""
    from polish3d.io.stacks import StackView
    from polish3d.refine import tomogram as tomo_refine
    from polish3d.score import project_particles

    name = ts.name
    stack = StackView(ts.image_files)
    if stack.shape[0] != ts.n_tilts:
        raise InputError(f"{name}: {stack.shape[0]} images for {ts.n_tilts} tilts")
    if stack.non_finite:
        per_image = stack.shape[1] * stack.shape[2]
        total = sum(stack.non_finite.values())
        log.warning(
            "  %s: %d non-finite pixel(s) (NaN/inf) in %d tilt image(s) masked with the tilt's finite "
            "mean: %s", name, total, len(stack.non_finite),
            ", ".join(f"tilt {j + 1}: {c}" for j, c in sorted(stack.non_finite.items())),
        )
        if all(stack.non_finite.get(j) == per_image for j in range(ts.n_tilts)):
            log.warning("  %s: every tilt image is entirely non-finite; not refined", name)
            return None
        left_out = int(np.count_nonzero(~stack.usable(project_particles(ts, parts), config.box)))
        if left_out:
            log.warning("  %s: %d particle–tilt box(es) lie mostly (> 50 %%) in masked pixels and are "
                        "left out", name, left_out)
    key = round(ts.pixel_size_ang, 6)
    if key not in envelopes:  # once per pixel size, not per tomogram
        envelopes[key] = tomo_refine.reference_envelope(
            idx, fsc, config.box, ts.pixel_size_ang, freq_cutoff_ang=freq_cutoff_ang,
            width=fsc_thresh_width, use_snr=use_snr_weight,
        )
    res = tomo_refine.refine_tomogram(
        ts, parts, stack, refs_ft, envelopes[key], config, motion=motion, deformation=deformation,
        progress=_progress_printer(name),
    )
    res.metrics["particle_names"] = parts.names
    res.metrics["non_finite_pixels"] = {str(j + 1): c for j, c in sorted(stack.non_finite.items())}
    log.info(
        "  done in %.1f s: 2D positions moved RMS %.3f px, max %.3f px",
        res.metrics["seconds"], res.metrics["displacement_rms_px"], res.metrics["displacement_max_px"],
    )
    return res


def _write_outputs(out_dir, tset, pset, results, trajectories, motion_file, particles_file, config, *,
                   has_motion):
    from polish3d.io import relion

    for name, res in results.items():
        tset = tset.with_tilt_series(name, projections=res.projections, deformation=res.deformation)
    tomo_path = tset.write(out_dir)
    _plot_deformations(out_dir, tset, results)
    new_particles = Path(particles_file)
    if not config.shift_only:
        for name, res in results.items():
            if res.positions_px is not None:
                ts = tset.tilt_series(name, load_images=False)
                pset = pset.with_positions(ts, res.metrics["particle_names"], res.positions_px)
        new_particles = pset.write(out_dir / "particles.star")
    traj_path = None
    any_traj = any(r.trajectories_px is not None for r in results.values())
    if has_motion or trajectories is not None or any_traj:
        merged = dict(trajectories or {})
        for name, res in results.items():
            if res.trajectories_px is None:
                continue
            ts = tset.tilt_series(name, load_images=False)
            for i, pname in enumerate(res.metrics["particle_names"]):
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
    if not config.shift_only:
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


# ---------------------------------------------------------------------------------------------
# CLI glue


def _swap_half(path: str) -> str:
    for a, b in (("half1", "half2"), ("half2", "half1")):
        if a in Path(path).name:
            return str(Path(path).with_name(Path(path).name.replace(a, b)))
    raise InputError(f"--in_3dref {path}: cannot find the other half map (no 'half1'/'half2' in the name)")


def _is_optimisation_set(path: str) -> bool:
    from polish3d.io.star import read_star

    blocks = read_star(path)
    for b in blocks.values():
        keys = b.keys() if isinstance(b, dict) else getattr(b, "columns", [])
        if any(str(k).startswith("rlnTomoParticlesFile") or str(k) == "rlnTomoTomogramsFile" for k in keys):
            return True
    return False


def _parse_extra(extra: list[str]) -> dict[str, str]:
    """User ``--label value`` pairs of a RELION External job (unknown flags: warned, as RELION).

    Raises:
        InputError: a single-dash option (``-i``: flags take two dashes) or a stray argument that
            follows no ``--label`` — neither is dropped silently.
    """
    out: dict[str, str] = {}
    i = 0
    while i < len(extra):
        tok = extra[i]
        if tok.startswith("--") and len(tok) > 2:
            val = extra[i + 1] if i + 1 < len(extra) and not extra[i + 1].startswith("--") else ""
            if val.startswith("-") and not _is_number(val):
                val = ""
            out[tok[2:]] = val
            i += 2 if val else 1
        elif tok.startswith("-") and not _is_number(tok):
            raise InputError(
                f"{tok}: unknown option; polish3d flags take two dashes (did you mean -{tok}?)"
            )
        else:
            raise InputError(
                f"unexpected argument {tok!r}: every input is given with a flag (--i, --p, --t, …)"
            )
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _handle_sigterm(signum, frame):
    from polish3d.errors import Terminated

    raise Terminated(signum)


def run_from_cli(options: dict, extra_args: list[str], argv: list[str]) -> AlignOutcome:
    """Validate the ``polish3d align`` flags, run :func:`align`, write the pipeline markers.

    On any error (SIGINT and SIGTERM included) the one-line summary is appended to
    ``<o>/polish3d.log`` and, in pipeline mode, ``RELION_JOB_EXIT_FAILURE`` is written — unless
    the folder was refused (it would overwrite an input, or another run holds its lock).
    """
    import signal
    import threading

    from polish3d.errors import OutputRefused

    o = dict(options)
    out_dir = o.get("o") or ""
    pipeline = bool(o.get("pipeline_control"))
    if not out_dir:
        raise InputError("--o (output directory) is required")
    out = Path(out_dir)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _handle_sigterm)
    try:
        extra = _parse_extra(extra_args)
        # RELION External job inputs
        for key in ("in_parts", "in_3dref", "in_mask", "in_coords", "in_mics", "in_movies"):
            if key in extra and key not in o:
                o[key] = extra.pop(key)
        pipeline = pipeline or any(o.get(k) for k in ("in_parts", "in_3dref"))
        if extra:
            log.warning("unknown options ignored: %s", " ".join("--" + k for k in extra))
        return _run_validated(o, argv, pipeline)
    except BaseException as exc:
        if not isinstance(exc, OutputRefused):
            if pipeline:  # RELION waits for a marker in the job folder: make sure there is one
                try:
                    out.mkdir(parents=True, exist_ok=True)
                except OSError:
                    pass
                _write_marker(out, False)
            _log_error_line(out, exc)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _require(cond: bool, flag: str, value, expected: str) -> None:
    if not cond:
        raise InputError(f"{flag} {value}: expected {expected}")


def check_window(r: float, b: int, flag_r: str = "--r", flag_b: str = "--b") -> None:
    """The CC window rule, as stated and as applied: ``0 < r < b/2 − 3``."""
    if not r > 0:
        raise InputError(f"{flag_r} {r:g}: must be positive")
    if not r < b / 2 - 3:
        raise InputError(
            f"{flag_r} {r:g}: the CC window must fit in the box ({flag_r} < {flag_b}/2 − 3 = {b / 2 - 3:g} "
            f"for {flag_b} {b})"
        )


def _check_flags(o: dict) -> None:
    """Values of the ``polish3d align`` flags (names the flag and what was expected)."""
    import math

    for flag in ("r", "s_vel", "s_div", "range_reg", "def_reg", "def_shrink", "cutoff_fract",
                 "fsc_thresh_width", "srp", "hp", "freq_cutoff"):
        if flag in o and not math.isfinite(float(o[flag])):
            raise InputError(f"--{flag} {o[flag]}: expected a finite number")
    _require(int(o.get("j", 1)) >= 1, "--j", o.get("j"), "a number of threads >= 1")
    _require(int(o.get("it", 1)) >= 1, "--it", o.get("it"), "a number of iterations >= 1")
    _require(int(o.get("outer", 1)) >= 1, "--outer", o.get("outer"), "a number of CC-map passes >= 1")
    _require(float(o.get("s_vel", 0.5)) > 0, "--s_vel", o.get("s_vel"),
             "a positive velocity sigma (Å per e⁻/Å²)")
    _require(float(o.get("s_div", 5000)) > 0, "--s_div", o.get("s_div"), "a positive divergence sigma (Å)")
    _require(int(o.get("max_ed", -1)) >= -1, "--max_ed", o.get("max_ed"),
             "a number of eigen-deformations >= 0, or -1 (all)")
    _require(float(o.get("range_reg", 0)) >= 0, "--range_reg", o.get("range_reg"), "a weight >= 0")
    _require(float(o.get("def_reg", 0)) >= 0, "--def_reg", o.get("def_reg"), "a weight >= 0")
    _require(float(o.get("def_shrink", 0.01)) >= 0, "--def_shrink", o.get("def_shrink"), "a weight >= 0")
    _require(0 <= float(o.get("cutoff_fract", 0.02)) < 1, "--cutoff_fract", o.get("cutoff_fract"),
             "a fraction in [0, 1)")
    _require(float(o.get("fsc_thresh_width", 5)) >= 0, "--fsc_thresh_width", o.get("fsc_thresh_width"),
             "a number of shells >= 0")
    _require(int(o.get("pad", 1)) >= 1, "--pad", o.get("pad"), "a padding factor >= 1")
    for flag in ("def_w", "def_h"):
        if o.get("deformation"):
            _require(int(o.get(flag, 3)) >= 2, f"--{flag}", o.get(flag), "at least 2 grid points")
    device = o.get("device") or ""
    if device and device not in ("cpu", "gpu", "tpu"):
        raise InputError(f"--device {device}: expected cpu, gpu or tpu")


def select_device(device: str, flag: str = "--device") -> str:
    """Make JAX compute on ``device``; InputError listing the platforms present when it is absent."""
    import jax

    if device not in ("cpu", "gpu", "tpu"):
        raise InputError(f"{flag} {device}: expected cpu, gpu or tpu")
    previous = jax.config.jax_platforms
    try:
        jax.config.update("jax_platforms", device)
        jax.devices(device)
    except Exception:  # noqa: BLE001 - JAX says "Unable to initialize backend 'rocm'" and the like
        jax.config.update("jax_platforms", previous)
        present = []
        for platform in ("cpu", "gpu", "tpu"):
            try:
                if jax.devices(platform):
                    present.append(platform)
            except Exception:  # noqa: BLE001
                pass
        raise InputError(
            f"{flag} {device}: no {device} device is usable on this machine; available: "
            f"{', '.join(present) or 'none'}"
        ) from None
    return jax.default_backend()


def _run_validated(o: dict, argv: list[str], pipeline: bool) -> AlignOutcome:
    from polish3d.refine.tomogram import AlignConfig

    inputs = AlignInputs(
        i=o.get("i", ""), p=o.get("p", ""), t=o.get("t", ""), mot=o.get("mot", ""),
        ref1=o.get("ref1", ""), ref2=o.get("ref2", ""), mask=o.get("mask", ""), fsc=o.get("fsc", ""),
    )
    if o.get("in_parts"):
        if _is_optimisation_set(o["in_parts"]):
            inputs.i = inputs.i or o["in_parts"]
        else:
            inputs.p = inputs.p or o["in_parts"]
    if o.get("in_3dref"):
        ref = o["in_3dref"]
        if "half2" in Path(ref).name:
            inputs.ref2 = inputs.ref2 or ref
            inputs.ref1 = inputs.ref1 or _swap_half(ref)
        else:
            inputs.ref1 = inputs.ref1 or ref
            inputs.ref2 = inputs.ref2 or _swap_half(ref)
    if o.get("in_mask"):
        inputs.mask = inputs.mask or o["in_mask"]
    if not (inputs.i or inputs.p or inputs.t):
        raise InputError("no input: give --i optimisation_set.star (or --p, --t, --ref1, --ref2)")

    b = int(o.get("b") or 0)
    if b <= 0:
        raise InputError(f"--b {b}: the box size in pixels is required and must be positive")
    if b % 2:
        raise InputError(f"--b {b}: the box size must be even")
    if o.get("aniso") or o.get("per_tilt_aniso"):
        raise InputError(
            "--aniso/--per_tilt_aniso have no effect in RELION 5 and are not implemented in "
            "polish3d; drop the flag (per-tilt magnification is refined by `polish3d fiducials`)"
        )
    if o.get("shift_only") and o.get("motion"):
        raise InputError("--shift_only cannot be combined with --motion (as in RELION)")
    _check_flags(o)
    check_window(float(o.get("r", 20)), b)
    if int(o.get("pad", 1)) != 1:
        log.warning(
            "--pad %s: polish3d interpolates the CC maps with an exact bicubic kernel; Fourier "
            "padding is not needed and is ignored (RELION's --pad != 1 is biased, see docs)",
            o.get("pad"),
        )
    if o.get("whiten_abs"):
        log.warning("--whiten_abs has no effect (as in RELION)")
    config = AlignConfig(
        box=b,
        r=float(o.get("r", 20.0)),
        const_p=bool(o.get("const_p")),
        const_a=bool(o.get("const_a")),
        const_s=bool(o.get("const_s")),
        range_reg=float(o.get("range_reg", 0.0)),
        it=int(o.get("it", 10000)),
        whiten=not o.get("no_whiten"),
        per_frame_noise=bool(o.get("per_frame_noise")),
        srp=float(o.get("srp", 0.0)),
        hp=float(o.get("hp", -1.0)),
        cutoff_fract=float(o.get("cutoff_fract", 0.02)),
        min_frame=int(o.get("min_frame", 0)),
        max_frame=int(o.get("max_frame", -1)),
        shift_only=bool(o.get("shift_only")),
        shift_only_by_particles=bool(o.get("shift_only_by_particles")),
        outer=int(o.get("outer", 3)),
        exact_passes=int(o.get("exact_passes", 2)),
    )
    motion = _motion_config(o)
    deformation = _deformation_config(o)
    check_config(config, motion, deformation)
    if o.get("device"):
        select_device(o["device"])
    threads = int(o.get("j") or 1)
    _require(int(o.get("exact_passes", 2)) >= 0, "--exact_passes", o.get("exact_passes"), "a number >= 0")
    _require(int(o.get("workers") or 0) >= 0, "--workers", o.get("workers"), "a number of workers >= 0")
    if o.get("workers") and o.get("scheduler"):
        raise InputError("--workers and --scheduler: give one (a local cluster, or an existing one)")
    from polish3d.scale import ClusterOptions

    cluster = ClusterOptions(int(o.get("workers") or 0), str(o.get("scheduler") or ""), threads)
    cmd = " ".join(shlex.quote(a) for a in (["polish3d"] + list(argv[1:])))
    return align(
        inputs, o["o"], config, motion=motion, deformation=deformation,
        only_do_unfinished=bool(o.get("only_do_unfinished")), threads=threads, command_line=cmd,
        freq_cutoff_ang=float(o.get("freq_cutoff", -1.0)),
        fsc_thresh_width=float(o.get("fsc_thresh_width", 5.0)),
        use_snr_weight=bool(o.get("use_snr_weight")), write_note=not o.get("pipeline_control"),
        pipeline_markers=pipeline, cluster=cluster, fsc_check=bool(o.get("fsc_check")),
    )


def _motion_config(o: dict):
    if not o.get("motion"):
        return None
    from polish3d.refine.motion import MotionConfig

    s_vel, s_div = float(o.get("s_vel", 0.5)), float(o.get("s_div", 5000.0))
    _require(s_vel > 0, "--s_vel", f"{s_vel:g}", "a positive velocity sigma (Å per e⁻/Å²)")
    _require(s_div > 0, "--s_div", f"{s_div:g}", "a positive divergence sigma (Å)")
    return MotionConfig(
        s_vel=s_vel, s_div=s_div,
        abs_params=bool(o.get("abs_params")), sq_exp_ker=bool(o.get("sq_exp_ker")),
        max_ed=int(o.get("max_ed", -1)),
    )


def _deformation_config(o: dict):
    if not o.get("deformation"):
        return None
    model = o.get("def_model", "spline")
    if model not in ("linear", "spline", "Fourier"):
        raise InputError(f"--def_model {model}: expected linear, spline or Fourier (case-sensitive)")
    from polish3d.refine.deformation import DeformationConfig

    try:
        return DeformationConfig(
            model=model, grid=(int(o.get("def_w", 3)), int(o.get("def_h", 3))),
            reg=float(o.get("def_reg", 0.0)), per_tilt=bool(o.get("per_frame_deformation")),
            shrink=float(o.get("def_shrink", 0.01)),
        )
    except ValueError as exc:
        raise InputError(f"--def_model/--def_w/--def_h: {exc}") from None
