"""One job per tomogram: refine it (here or as a Dask task) and keep the result in the resume store.

A :class:`TomogramJob` holds everything one tomogram's refinement needs and is picklable, so it
runs unchanged in the driver's process or on a Dask worker (:mod:`polish3d.scale`). Either way
the result goes to ``<o>/temp/<tomo>.npz`` (:mod:`polish3d.io.resume`) together with the record
of the options and inputs it was made with (:func:`result_record`), and the driver reads it back
from there: where or in which order a tomogram ran does not change the answer, and
``--only_do_unfinished`` reuses exactly the results whose record still matches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from polish3d.errors import InputError
from polish3d.model import TomogramResult
from polish3d.output_folder import error_summary
from polish3d.progress import log_progress

if TYPE_CHECKING:
    from polish3d.config import RefineConfig

log = logging.getLogger("polish3d")

#: the options a refined tomogram depends on besides its sections (run-level options do not count)
_RESULT_OPTIONS = ("freq_cutoff_ang", "fsc_thresh_width_shells", "use_snr_weight")


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


def result_record(options: dict, input_sums: dict, ts, parts) -> dict:
    """What a tomogram's result depends on: options, this tomogram's inputs, the references."""
    from polish3d.io.resume import array_checksum

    rec = dict(options)
    rec.update(input_sums)
    rec["tilt series (geometry, CTF, dose, image files)"] = array_checksum(*_flatten("ts", ts))
    rec["particles of this tomogram"] = array_checksum(*_flatten("particles", parts))
    return _jsonable(rec)


def options_record(config: RefineConfig) -> dict:
    """The options a tomogram's result depends on, by their path in ``config`` (JSON values)."""
    rec: dict[str, Any] = {}
    for section in ("tomogram", "motion", "deformation"):
        value = getattr(config, section)
        if section != "tomogram":
            rec[section] = value is not None
        if value is not None:
            rec.update({f"{section}.{k}": v for k, v in dataclasses.asdict(value).items()})
    rec.update({name: getattr(config, name) for name in _RESULT_OPTIONS})
    return rec


# ---------------------------------------------------------------------------------------------
# the jobs


@dataclasses.dataclass
class TomogramJob:
    """Everything one tomogram's refinement needs (picklable: it may run on a Dask worker).

    Attributes:
        ts, parts: the tomogram's tilt series and particles (:mod:`polish3d.model`).
        record: :func:`result_record`, stored with the result.
        refs_ft: ``(2, s, s, s//2+1)`` Fourier transforms of the prepared half maps.
        fsc_idx, fsc: the reference FSC (spectral index, value) the envelope is made from.
        config: the run's options.
        out_dir: the output folder (absolute), whose resume store receives the result.
        number, total: the job's position in the run (for the log).
    """

    ts: Any
    parts: Any
    record: dict
    refs_ft: Any
    fsc_idx: Any
    fsc: Any
    config: RefineConfig
    out_dir: Path
    number: int
    total: int

    @property
    def name(self) -> str:
        return self.ts.name


def run_job(job: TomogramJob, envelopes: dict | None = None,
            report: Callable[..., None] | None = None) -> str:
    """Refine one tomogram and store the result in the resume store of ``job.out_dir``.

    Returns ``""`` when stored, else why the tomogram keeps its input geometry. Runs in the
    driver (serial) or on a Dask worker; the driver reads the result back from the store.
    ``envelopes`` caches the reference envelope per pixel size across the jobs of one process;
    ``report`` receives the progress events (default: plain log lines, as on a Dask worker).
    """
    from polish3d.io.resume import save_result

    log.info("Tomogram %d / %d: %s (%d particles, %d tilts, %d×%d px)", job.number, job.total, job.name,
             job.parts.n_particles, job.ts.n_tilts, *job.ts.image_size_px)
    res = _refine_from_files(job, {} if envelopes is None else envelopes, report)
    if res is None:
        return f"{job.name}: every tilt image is entirely non-finite"
    arrays = (res.projections, res.positions_px, res.trajectories_px)
    if any(a is not None and not np.all(np.isfinite(a)) for a in arrays):
        why = f"{job.name}: the refinement produced non-finite geometry; input geometry kept"
        log.warning("  %s", why)
        return why
    save_result(job.out_dir, res, job.record)
    return ""


def run_jobs(jobs: list[TomogramJob], config: RefineConfig, progress=None
             ) -> tuple[dict[str, TomogramResult], dict[str, str]]:
    """Run the jobs, one after another here or as Dask tasks (``config.workers``/``config.scheduler``).

    Returns ``({name: result}, {name: why not refined})``; the results are read from the store.
    ``progress`` (a :class:`polish3d.progress.Progress`) shows them as they run and finish.
    """
    from polish3d.io.resume import load_result

    why: dict[str, str] = {}
    if not (config.workers or config.scheduler) or not jobs:
        envelopes: dict = {}
        for job in jobs:
            t0 = time.perf_counter()
            report = progress.tomogram(job.name) if progress is not None else None
            why[job.name] = run_job(job, envelopes, report)
            if progress is not None:
                progress.done(job.name, time.perf_counter() - t0)
    else:
        why = _run_jobs_on_dask(jobs, config, progress)
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


def _run_jobs_on_dask(jobs: list[TomogramJob], config: RefineConfig, progress=None) -> dict[str, str]:
    """Tomograms as Dask tasks, the largest first; a data error fails the run after the other
    tomograms finished."""
    from polish3d.scale import ClusterOptions, run_tasks

    cluster = ClusterOptions(config.workers, config.scheduler, config.threads)
    where = cluster.scheduler or f"{cluster.workers} local worker(s)"
    log.info("Refining %d tomogram(s) as Dask tasks on %s", len(jobs), where)
    t0, t0_wall = time.perf_counter(), time.time()

    def done(outcome, n_done, n_total):
        counts = f"{n_done} / {n_total} finished, {time.perf_counter() - t0:.1f} s"
        if outcome.ok:  # when the task started: seconds since the submission (the worker's clock)
            task = outcome.value
            log.info("  tomogram %s done (refined in %.1f s from %.1f s; %s)", outcome.key, task["seconds"],
                     task["started"] - t0_wall, counts)
        else:
            log.info("  tomogram %s FAILED: %s (%s)", outcome.key, error_summary(outcome.error), counts)
        if progress is not None:
            progress.done(outcome.key)

    largest_first = sorted(jobs, key=lambda job: -job.parts.n_particles * job.ts.n_tilts)
    tasks = {job.name: (_with_absolute_paths(job),) for job in largest_first}
    outcomes = run_tasks(run_task, tasks, cluster, on_done=done)
    errors = {k: o.error for k, o in outcomes.items() if not o.ok}
    if errors:
        first = next(iter(errors.values()))
        log.error("%d tomogram(s) failed: %s", len(errors), ", ".join(errors))
        raise first
    return {k: o.value["why"] for k, o in outcomes.items()}


def run_task(job: TomogramJob) -> dict:
    """:func:`run_job` as a Dask task: ``{"why": run_job's answer, "started": wall-clock time the
    task started (s since the epoch), "seconds": how long it ran}``."""
    started = time.time()
    why = run_job(job)
    return {"why": why, "started": started, "seconds": time.time() - started}


def _with_absolute_paths(job: TomogramJob) -> TomogramJob:
    """The job with its image files as absolute paths: a worker of an external cluster does not
    start in the driver's folder (the project must be seen under the same path everywhere)."""
    files = [(str(Path(path).absolute()), index) for path, index in job.ts.image_files]
    return dataclasses.replace(job, ts=dataclasses.replace(job.ts, image_files=files),
                               out_dir=Path(job.out_dir).absolute())


def _refine_from_files(job: TomogramJob, envelopes: dict, report=None) -> TomogramResult | None:
    """One tomogram: open its images (non-finite pixels masked and counted), refine.

    Returns ``None`` when every tilt image is entirely non-finite.
    """
    from polish3d.io.stacks import StackView

    ts, config = job.ts, job.config
    stack = StackView(ts.image_files)
    if stack.shape[0] != ts.n_tilts:
        raise InputError(f"{ts.name}: {stack.shape[0]} images for {ts.n_tilts} tilts")
    if stack.non_finite and not _report_non_finite(stack, ts, job.parts, config.box):
        return None
    n_devices = devices_used()
    if n_devices > 1:
        log.info("  particles split across %d devices", n_devices)
    key = round(ts.pixel_size_ang, 6)
    if key not in envelopes:  # once per pixel size, not per tomogram
        envelopes[key] = envelope(config, job.fsc_idx, job.fsc, ts.pixel_size_ang)
    res = refine_arrays(ts, job.parts, stack, job.refs_ft, envelopes[key], config,
                        progress=report or log_progress(ts.name))
    res.metrics["non_finite_pixels"] = {str(j + 1): c for j, c in sorted(stack.non_finite.items())}
    log.info(
        "  done in %.1f s: 2D positions moved RMS %.3f px, max %.3f px",
        res.metrics["seconds"], res.metrics["displacement_rms_px"], res.metrics["displacement_max_px"],
    )
    return res


def devices_used() -> int:
    """How many devices one tomogram's particles are split across in this process
    (:mod:`polish3d.refine.devices`; ``POLISH3D_DEVICES`` limits them)."""
    from polish3d.refine import devices

    return devices.count()


def _report_non_finite(stack, ts, parts, box: int) -> bool:
    """Log the non-finite pixels of a stack; False when every tilt image is entirely non-finite."""
    from polish3d.score import project_particles

    name = ts.name
    per_image = stack.shape[1] * stack.shape[2]
    log.warning(
        "  %s: %d non-finite pixel(s) (NaN/inf) in %d tilt image(s) masked with the tilt's finite "
        "mean: %s", name, sum(stack.non_finite.values()), len(stack.non_finite),
        ", ".join(f"tilt {j + 1}: {c}" for j, c in sorted(stack.non_finite.items())),
    )
    if all(stack.non_finite.get(j) == per_image for j in range(ts.n_tilts)):
        log.warning("  %s: every tilt image is entirely non-finite; not refined", name)
        return False
    left_out = int(np.count_nonzero(~stack.usable(project_particles(ts, parts), box)))
    if left_out:
        log.warning("  %s: %d particle–tilt box(es) lie mostly (> 50 %%) in masked pixels and are "
                    "left out", name, left_out)
    return True


# ---------------------------------------------------------------------------------------------
# arrays in, arrays out (also the API's refine_tilt_series)


def envelope(config: RefineConfig, fsc_idx, fsc, pixel_size_ang: float):
    """The reference envelope (frequency weights of the CC) for ``config`` at one pixel size (Å)."""
    from polish3d.refine.tomogram import reference_envelope

    return reference_envelope(
        fsc_idx, fsc, config.box, pixel_size_ang, freq_cutoff_ang=config.freq_cutoff_ang,
        width=config.fsc_thresh_width_shells, use_snr=config.use_snr_weight,
    )


def refine_arrays(ts, parts, stack, refs_ft, weights, config: RefineConfig,
                  progress: Callable[..., None] | None = None) -> TomogramResult:
    """Refine one tilt series held in arrays (:func:`polish3d.refine.tomogram.refine_tomogram`).

    ``weights`` is :func:`envelope`; the result carries the particles' names and, in
    ``metrics["devices"]``, how many devices its particles were split across.
    """
    from polish3d.refine.tomogram import refine_tomogram

    res = refine_tomogram(ts, parts, stack, refs_ft, weights, config.tomogram, motion=config.motion,
                          deformation=config.deformation, progress=progress)
    res.particle_names = tuple(parts.names)
    res.metrics["devices"] = devices_used()
    return res
