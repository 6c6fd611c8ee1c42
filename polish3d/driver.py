"""The driver of ``polish3d align``: files in → refined files out (the one module that mixes I/O and
compute).

:func:`align` reads and checks every input before anything is written, refuses and locks the
output folder (:mod:`polish3d.output_folder`), runs one job per tomogram
(:mod:`polish3d.tomogram_jobs`, here or on Dask), then writes the RELION 5 outputs, ``note.txt``,
``metrics.json``, ``polish3d.log`` and ``report.html``. Options come as one
:class:`polish3d.config.RefineConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from logging.handlers import MemoryHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from polish3d import output_folder, tomogram_jobs
from polish3d.errors import InputError
from polish3d.model import TomogramResult

if TYPE_CHECKING:
    from polish3d.config import RefineConfig

log = logging.getLogger("polish3d")

__all__ = ["AlignInputs", "AlignOutcome", "align", "check_reference_maps"]

#: the input files whose checksums enter every tomogram's resume record
_REFERENCE_FILES = ("reference half map 1", "reference half map 2", "mask", "FSC table")


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


@dataclasses.dataclass
class RunInputs:
    """Every input of a run, read and checked (what :func:`read_inputs` returns).

    Attributes:
        tset, pset, trajectories: tomogram set, particle set, input trajectories (or ``None``).
        names: tomograms with particles, in file order.
        plans: ``{name: (tilt series, particles, why it cannot be refined or "")}``.
        half1, half2, mask: reference maps ``[z, y, x]`` (mask or ``None``).
        map_names: how the maps are named in messages (their files).
        ref_px: the half maps' pixel size in Å from the MRC header, or ``None``.
        fsc_file, motion_file, particles_file: those input files (or ``None``).
        input_files: ``{what it is: path}`` of every input file (the output folder must miss them).
        tilt_outputs: the per-tilt STARs (relative paths) the run will write in the output folder.
    """

    tset: Any
    pset: Any
    trajectories: dict | None
    names: list[str]
    plans: dict[str, tuple]
    half1: np.ndarray
    half2: np.ndarray
    mask: np.ndarray | None
    map_names: tuple[str, str, str]
    ref_px: float | None
    fsc_file: Path | None
    motion_file: Path | None
    particles_file: Path
    input_files: dict[str, Path | None]
    tilt_outputs: list[str]


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




def plan_tomogram(ts, parts, config: RefineConfig) -> str:
    """Why nothing of this tomogram can be refined ("" when something can).

    Raises:
        OptionError: the options cannot work for this tomogram at all (the box does not fit in its
            images, ``tomogram.min_frame`` beyond its tilts).
    """
    from polish3d import geometry
    from polish3d.config import OptionError
    from polish3d.refine.tomogram import _visible
    from polish3d.score import project_particles

    w, h = ts.image_size_px
    t = config.tomogram
    if t.box >= min(w, h):
        raise OptionError(f"{{0}} {t.box}: the box must be smaller than the tilt images; "
                          f"{ts.name} has {w}×{h} px", "tomogram.box")
    f = ts.n_tilts
    if t.min_frame > f - 1:
        raise OptionError(f"{{0}} {t.min_frame}: {ts.name} has {f} tilts (dose ranks "
                          f"0…{f - 1})", "tomogram.min_frame")
    if parts.n_particles == 0:
        return f"{ts.name}: no particles"
    rank = np.empty(f, int)
    rank[geometry.dose_order(ts.pre_exposure_e_per_ang2)] = np.arange(f)
    kmax = f - 1 if t.max_frame < 0 else min(t.max_frame, f - 1)
    frame_ok = (rank >= t.min_frame) & (rank <= kmax)
    vis = _visible(project_particles(ts, parts), ts.image_size_px, t.box) & frame_ok[None, :]
    if not vis.any():
        return (
            f"{ts.name}: none of its {parts.n_particles} particles projects inside the tilt images "
            f"({w}×{h} px, box {t.box} px) on the tilts used; are the coordinates in this tomogram?"
        )
    return ""


# ---------------------------------------------------------------------------------------------
# reading the inputs


def read_inputs(inputs: AlignInputs, config: RefineConfig) -> RunInputs:
    """Read and check every input of a run (writes nothing).

    Raises:
        InputError: a missing or bad input file, or nothing that could be refined.
    """
    from polish3d.io import mrc, relion

    files = _input_files(inputs)
    log.info("Initialising:")
    tset = relion.read_tomogram_set(files["tomogram set"])
    pset = relion.read_particle_set(files["particle set"])
    if len(pset.particles) == 0:
        raise InputError(f"{files['particle set']}: the particle table lists no particles; nothing to refine")
    pset.check_tomograms(tset.names)
    trajectories = relion.read_trajectories(files["trajectories"]) if files["trajectories"] else None
    ref1, ref2, mask_file = files["reference half map 1"], files["reference half map 2"], files["mask"]
    half1, vs1 = mrc.read_map(ref1)
    half2, _ = mrc.read_map(ref2)
    mask = mrc.read_map(mask_file)[0] if mask_file else None
    map_names = (str(ref1), str(ref2), f"mask {mask_file}")
    check_reference_maps(half1, half2, mask, names=map_names)
    if files["FSC table"]:
        mrc.read_fsc(files["FSC table"])  # fail now on a bad table, not after the first tomogram
    in_particles = set(pset.tomogram_names())
    names = [n for n in tset.names if n in in_particles]
    plans = _plan_tomograms(tset, pset, trajectories, names, config, files)
    if names and all(why for _, _, why in plans.values()):
        raise InputError("nothing to refine: " + "; ".join(why for _, _, why in plans.values()))
    tilt_outputs = []
    for name in tset.names:
        default = f"tilt_series/{name}.star"
        entry = tset.tilt_file_entries.get(name, default)
        tilt_outputs += [relion._pipeline_post(entry) or default, default]
    return RunInputs(
        tset, pset, trajectories, names, plans, half1, half2, mask, map_names,
        ref_px=float(vs1) if vs1 and vs1 > 0 else None, fsc_file=files["FSC table"],
        motion_file=files["trajectories"], particles_file=files["particle set"], input_files=files,
        tilt_outputs=tilt_outputs,
    )


def _input_files(inputs: AlignInputs) -> dict[str, Path | None]:
    """``{what it is: path}``: each input from its flag, else from the optimisation set ``i``."""
    from polish3d.io import relion

    opt = relion.read_optimisation_set(inputs.i) if inputs.i else relion.OptimisationSet()

    def pick(flag_value, from_set, what, required):
        if flag_value:
            return Path(flag_value)
        if from_set is not None:
            return Path(from_set)
        if required:
            raise InputError(f"no {what}: give it with the flag or in the optimisation set --i")
        return None

    return {
        "optimisation set": Path(inputs.i) if inputs.i else None,
        "particle set": pick(inputs.p, opt.particles_file, "particle set (--p)", True),
        "tomogram set": pick(inputs.t, opt.tomograms_file, "tomogram set (--t)", True),
        "trajectories": pick(inputs.mot, opt.trajectories_file, "trajectories (--mot)", False),
        "reference half map 1": pick(inputs.ref1, opt.ref1, "reference half map 1 (--ref1)", True),
        "reference half map 2": pick(inputs.ref2, opt.ref2, "reference half map 2 (--ref2)", True),
        "mask": pick(inputs.mask, opt.mask, "mask", False),
        "FSC table": pick(inputs.fsc, opt.fsc, "FSC", False),
    }


def _plan_tomograms(tset, pset, trajectories, names, config, files) -> dict[str, tuple]:
    """``{name: (ts, parts, why not)}``; adds each tomogram's tilt STAR and images to ``files``."""
    plans = {}
    for name in names:
        ts = tset.tilt_series(name)
        parts = pset.for_tomogram(ts, trajectories)
        plans[name] = (ts, parts, plan_tomogram(ts, parts, config))
        tilt_file = tset.tilt_files.get(name)
        if tilt_file is not None:
            files[f"tilt-series STAR of {name}"] = Path(tilt_file)
        for j, (img, _) in enumerate(dict.fromkeys(ts.image_files)):
            files[f"tilt image file {j + 1} of {name}"] = Path(img)
    return plans


# ---------------------------------------------------------------------------------------------
# the run


def align(
    inputs: AlignInputs,
    out_dir,
    config: RefineConfig,
    *,
    only_do_unfinished: bool = False,
    command_line: str | None = None,
    write_note: bool = True,
    pipeline_markers: bool = False,
) -> AlignOutcome:
    """Refine every tomogram of an optimisation set and write RELION 5 outputs to ``out_dir``.

    Every input is read and checked before anything is written; ``out_dir`` is refused when an
    output would overwrite an input, and is locked while the run writes it (one run per folder).

    Args:
        inputs: input files (``--i`` and/or the individual components).
        out_dir: output folder (created).
        config: every option of the run (:class:`polish3d.config.RefineConfig`): the refinement,
            motion, deformation, reference envelope, Dask workers, ``fsc_check``.
        only_do_unfinished: reuse results already in ``out_dir/temp`` made with the same options
            and inputs (others are recomputed, with the reason in the log).
        command_line: written to ``note.txt``.
        write_note: write ``note.txt`` (RELION skips it under pipeline control).
        pipeline_markers: write ``RELION_JOB_EXIT_SUCCESS``/``RELION_JOB_EXIT_FAILURE``.

    Returns:
        an :class:`AlignOutcome`.

    Raises:
        InputError: bad or inconsistent inputs, or nothing that could be refined.
        OutputRefused: ``out_dir`` would overwrite an input, is a file, cannot be written, or is
            locked by another run.
    """
    t_start = time.perf_counter()
    shown, out_dir = os.fspath(out_dir), Path(out_dir)
    early = MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)  # until the log file exists
    early.setLevel(logging.DEBUG)
    log.addHandler(early)
    try:
        run = read_inputs(inputs, config)
        output_folder.check_output_folder(out_dir, run.input_files, run.tilt_outputs, shown=shown)
        from polish3d.refine.tomogram import prepare_references

        references = prepare_references(run.half1, run.half2, config.box, run.mask, names=run.map_names)
        if run.half1.shape[0] < config.box:
            log.info("  Padding reference from %d to %d", run.half1.shape[0], config.box)
        lock = output_folder.OutputLock(out_dir).__enter__()
    except BaseException:
        log.removeHandler(early)
        early.close()
        raise
    with output_folder.Held(lock):
        if pipeline_markers:
            for m in output_folder.MARKERS:
                (out_dir / m).unlink(missing_ok=True)
        log.removeHandler(early)
        handler = output_folder.setup_log_file(out_dir)
        early.setTarget(handler)
        early.close()
        try:
            if write_note and command_line:
                output_folder.atomic_write_text(out_dir / "note.txt", f"Command:\n\n{command_line}\n")
            outcome = _refine_and_write(inputs, run, references, out_dir, config, only_do_unfinished,
                                        t_start, pipeline=pipeline_markers)
            if pipeline_markers:
                output_folder.write_marker(out_dir, True)
            return outcome
        except BaseException as exc:
            log.removeHandler(handler)
            handler.close()
            output_folder.log_error_line(out_dir, exc)
            if pipeline_markers:
                output_folder.write_marker(out_dir, False)
            raise
        finally:
            log.removeHandler(handler)
            handler.close()


def _refine_and_write(inputs, run: RunInputs, references, out_dir: Path, config: RefineConfig,
                      only_do_unfinished: bool, t_start: float, pipeline: bool = False) -> AlignOutcome:
    """Refine what is not finished yet, write the outputs, ``metrics.json`` and the report."""
    from polish3d.io import mrc
    from polish3d.io.jsonsafe import json_safe
    from polish3d.progress import Progress

    refs_ft, (idx, fsc) = references
    if run.fsc_file:
        idx, fsc = mrc.read_fsc(run.fsc_file)
    _log_configuration(config)
    jobs, results, skipped, not_refined = _plan_jobs(run, np.asarray(refs_ft), idx, fsc, out_dir, config,
                                                     only_do_unfinished)
    with Progress(len(jobs), pipeline=pipeline) as progress:
        refined, failed = tomogram_jobs.run_jobs(jobs, config, progress)
    results.update(refined)
    not_refined.update(failed)
    if not results:
        raise InputError("nothing was refined: " + "; ".join(not_refined.values()))
    opt_path = output_folder.write_outputs(
        out_dir, run.tset, run.pset, results, run.trajectories, run.particles_file,
        shift_only=config.tomogram.shift_only, has_motion=config.motion is not None,
    )
    seconds = time.perf_counter() - t_start
    metrics = {
        "seconds": seconds,
        "config": dataclasses.asdict(config.tomogram),
        "tomograms": {n: r.metrics for n, r in results.items()},
        "skipped": skipped,
        "not_refined": not_refined,
        "inputs": _inputs_record(run),
    }
    if config.fsc_check:
        metrics["fsc"] = _fsc_before_after(inputs.i, opt_path, config.box)
    # strict JSON: an undefined figure (NaN) is written as null
    output_folder.atomic_write_text(
        out_dir / "metrics.json", json.dumps(json_safe(metrics), indent=1, allow_nan=False, default=str)
    )
    if not_refined:
        log.warning("%d tomogram(s) could not be refined and keep their input geometry: %s",
                    len(not_refined), ", ".join(not_refined))
    log.info("Finished %d tomograms in %.1f s; wrote %s", len(results), seconds, opt_path)
    _write_report(out_dir)
    return AlignOutcome(out_dir, opt_path, results, skipped, seconds,
                        status="ok" if not not_refined else "partial")


def _log_configuration(config: RefineConfig) -> None:
    t = config.tomogram
    log.info("Configuration:")
    log.info("  particle motion %s", "considered" if config.motion is not None else "not considered")
    log.info("  frame angles %s", "constant" if t.const_a or t.shift_only else "variable")
    log.info("  frame shifts %s", "constant" if t.const_s else "variable")
    log.info("  particle positions %s", "constant" if t.const_p or t.shift_only else "variable")


def _plan_jobs(run: RunInputs, refs_ft, idx, fsc, out_dir: Path, config: RefineConfig,
               only_do_unfinished: bool):
    """The jobs to run, and what needs none: ``(jobs, reused results, skipped names, not refined)``."""
    from polish3d.io.resume import file_checksum, load_result

    options = tomogram_jobs.options_record(config)
    input_sums = {f"{what} (checksum)": file_checksum(p) for what, p in run.input_files.items()
                  if p and what in _REFERENCE_FILES}
    jobs, results, skipped, not_refined = [], {}, [], {}
    total = len(run.names)
    for k, name in enumerate(run.names):
        ts, parts, why = run.plans[name]
        if why:
            log.warning("Tomogram %d / %d: %s; left as it is", k + 1, total, why)
            not_refined[name] = why
            continue
        if run.ref_px is not None and abs(run.ref_px - ts.pixel_size_ang) > 0.01 * ts.pixel_size_ang:
            log.warning("  reference pixel size %.4g Å differs from the tilt series' %.4g Å (RELION does "
                        "not check; the maps must be at the tilt-series pixel size)", run.ref_px,
                        ts.pixel_size_ang)
        record = tomogram_jobs.result_record(options, input_sums, ts, parts)
        if only_do_unfinished:
            done, reason = load_result(out_dir, name, record)
            if done is not None:
                log.info("Tomogram %d / %d: %s already finished; skipped", k + 1, total, name)
                results[name] = done
                skipped.append(name)
                continue
            if reason:
                log.warning("Tomogram %d / %d: %s: %s; recomputing", k + 1, total, name, reason)
        jobs.append(tomogram_jobs.TomogramJob(ts, parts, record, refs_ft, idx, fsc, config,
                                              out_dir.resolve(), k + 1, total))
    return jobs, results, skipped, not_refined


def _inputs_record(run: RunInputs) -> dict:
    """Absolute paths of the input geometry, for ``metrics.json`` (the report reads them)."""

    def absolute(path):
        return os.fspath(Path(path).resolve()) if path else None

    return {
        "tomograms": absolute(run.input_files["tomogram set"]),
        "particles": absolute(run.particles_file),
        "trajectories": absolute(run.motion_file),
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


