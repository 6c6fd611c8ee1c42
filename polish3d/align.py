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


class _StackView:
    """``(F, H, W)`` view over tilt images stored as sections of one or several MRC files."""

    def __init__(self, image_files: list[tuple[str, int]]):
        from polish3d.io import mrc

        self._files = {}
        for path, _ in image_files:
            if path not in self._files:
                self._files[path] = mrc.open_stack(path)
        self._items = [(self._files[p], i) for p, i in image_files]
        first = self._items[0][0]
        self.shape = (len(self._items), first.shape[1], first.shape[2])
        single = len(self._files) == 1
        self._single = first if single else None
        self._index = np.array([i for _, i in image_files]) if single else None

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            arr, i = self._items[int(key)]
            return arr[i]
        if self._single is not None and isinstance(key, tuple):
            fi = np.asarray(key[0])
            return self._single[(self._index[fi],) + tuple(key[1:])]
        fi = np.broadcast_to(np.asarray(key[0]), np.broadcast_shapes(*[np.shape(k) for k in key]))
        out = np.empty(fi.shape, np.float32)
        iy = np.broadcast_to(key[1], fi.shape)
        ix = np.broadcast_to(key[2], fi.shape)
        for j in np.unique(fi):
            m = fi == j
            arr, i = self._items[int(j)]
            out[m] = arr[i][iy[m], ix[m]]
        return out


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
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_temp(out_dir: Path, res: TomogramResult) -> None:
    temp = out_dir / "temp"
    temp.mkdir(exist_ok=True)
    tmp = temp / f"{res.name}.npz.tmp"
    arrays = {"projections": res.projections}
    if res.positions_px is not None:
        arrays["positions_px"] = res.positions_px
    if res.trajectories_px is not None:
        arrays["trajectories_px"] = res.trajectories_px
    if res.deformation is not None:
        arrays["deformation_coefficients"] = res.deformation.coefficients
        arrays["deformation_grid"] = np.asarray(res.deformation.grid_size)
        arrays["deformation_model"] = np.asarray(res.deformation.model)
    with open(tmp, "wb") as fh:
        np.savez(fh, metrics=np.asarray(json.dumps(res.metrics)), **arrays)
    os.replace(tmp, temp / f"{res.name}.npz")


def _load_temp(out_dir: Path, name: str) -> TomogramResult | None:
    from polish3d.model import Deformation

    path = out_dir / "temp" / f"{name}.npz"
    if not path.exists():
        return None
    z = np.load(path)
    deformation = None
    if "deformation_coefficients" in z:
        deformation = Deformation(
            model=str(z["deformation_model"]),
            grid_size=tuple(int(v) for v in z["deformation_grid"]),
            coefficients=z["deformation_coefficients"],
        )
    return TomogramResult(
        name=name,
        projections=z["projections"],
        positions_px=z["positions_px"] if "positions_px" in z else None,
        trajectories_px=z["trajectories_px"] if "trajectories_px" in z else None,
        deformation=deformation,
        metrics=json.loads(str(z["metrics"])),
    )


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
) -> AlignOutcome:
    """Refine every tomogram of an optimisation set and write RELION 5 outputs to ``out_dir``.

    Args:
        inputs: input files (``--i`` and/or the individual components).
        out_dir: output folder (created).
        config: :class:`polish3d.refine.tomogram.AlignConfig`.
        motion: motion options (``polish3d.refine.motion.MotionConfig``) or ``None``.
        deformation: deformation options (``polish3d.refine.deformation.DeformationConfig``) or
            ``None``.
        only_do_unfinished: reuse results already in ``out_dir/temp``.
        threads: CPU threads (informational; set ``XLA_FLAGS`` before JAX starts to limit).
        command_line: written to ``note.txt``.
        freq_cutoff_ang, fsc_thresh_width, use_snr_weight: reference envelope options.
        write_note: write ``note.txt`` (RELION skips it under pipeline control).

    Returns:
        an :class:`AlignOutcome`.
    """

    from polish3d.io import mrc, relion
    from polish3d.refine import tomogram as tomo_refine

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = _setup_log_file(out_dir)
    try:
        if write_note and command_line:
            _atomic_write_text(out_dir / "note.txt", f"Command:\n\n{command_line}\n")
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

        log.info("polish3d align → %s", out_dir)
        log.info("Initialising:")
        tset = relion.read_tomogram_set(tomograms_file)
        pset = relion.read_particle_set(particles_file)
        pset.check_tomograms(tset.names)
        trajectories = relion.read_trajectories(motion_file) if motion_file else None

        box = config.box
        half1, vs1 = mrc.read_map(ref1)
        half2, _ = mrc.read_map(ref2)
        mask = mrc.read_map(mask_file)[0] if mask_file else None
        refs_ft, (idx, fsc) = tomo_refine.prepare_references(
            half1, half2, box, mask, names=(str(ref1), str(ref2), f"mask {mask_file}")
        )
        if half1.shape[0] < box:
            log.info("  Padding reference from %d to %d", half1.shape[0], box)
        if fsc_file:
            idx, fsc = mrc.read_fsc(fsc_file)
        ref_px = float(vs1) if vs1 and vs1 > 0 else None

        names = [n for n in tset.names if n in set(pset.tomogram_names())]
        log.info("Configuration:")
        log.info("  particle motion %s", "considered" if motion is not None else "not considered")
        log.info("  frame angles %s", "constant" if config.const_a or config.shift_only else "variable")
        log.info("  frame shifts %s", "constant" if config.const_s else "variable")
        log.info("  particle positions %s", "constant" if config.const_p or config.shift_only else "variable")
        results: dict[str, TomogramResult] = {}
        skipped: list[str] = []
        envelopes: dict[float, np.ndarray] = {}
        for k, name in enumerate(names):
            ts = tset.tilt_series(name)
            if ref_px is not None and abs(ref_px - ts.pixel_size_ang) > 0.01 * ts.pixel_size_ang:
                log.warning(
                    "  reference pixel size %.4g Å differs from the tilt series' %.4g Å "
                    "(RELION does not check; the maps must be at the tilt-series pixel size)",
                    ref_px, ts.pixel_size_ang,
                )
            if only_do_unfinished:
                done = _load_temp(out_dir, name)
                if done is not None:
                    log.info("Tomogram %d / %d: %s already finished; skipped", k + 1, len(names), name)
                    results[name] = done
                    skipped.append(name)
                    continue
            parts = pset.for_tomogram(ts, trajectories)
            log.info(
                "Tomogram %d / %d: %s (%d particles, %d tilts, %d×%d px)",
                k + 1, len(names), name, parts.n_particles, ts.n_tilts, *ts.image_size_px,
            )
            stack = _StackView(ts.image_files)
            if stack.shape[0] != ts.n_tilts:
                raise InputError(f"{name}: {stack.shape[0]} images for {ts.n_tilts} tilts")
            key = round(ts.pixel_size_ang, 6)
            if key not in envelopes:  # once per pixel size, not per tomogram
                envelopes[key] = tomo_refine.reference_envelope(
                    idx, fsc, box, ts.pixel_size_ang, freq_cutoff_ang=freq_cutoff_ang,
                    width=fsc_thresh_width, use_snr=use_snr_weight,
                )
            envelope = envelopes[key]
            res = tomo_refine.refine_tomogram(
                ts, parts, stack, refs_ft, envelope, config, motion=motion, deformation=deformation,
                progress=_progress_printer(name),
            )
            res.metrics["particle_names"] = parts.names
            log.info(
                "  done in %.1f s: 2D positions moved RMS %.3f px, max %.3f px",
                res.metrics["seconds"], res.metrics["displacement_rms_px"],
                res.metrics["displacement_max_px"],
            )
            _save_temp(out_dir, res)
            results[name] = res

        opt_path = _write_outputs(
            out_dir, tset, pset, results, trajectories, motion_file, particles_file, config,
            has_motion=motion is not None,
        )
        seconds = time.perf_counter() - t_start
        metrics = {
            "seconds": seconds,
            "config": dataclasses.asdict(config),
            "tomograms": {n: r.metrics for n, r in results.items()},
            "skipped": skipped,
        }
        _atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1, default=float))
        log.info("Finished %d tomograms in %.1f s; wrote %s", len(results), seconds, opt_path)
        return AlignOutcome(out_dir, opt_path, results, skipped, seconds)
    finally:
        log.removeHandler(handler)
        handler.close()


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
    """User ``--label value`` pairs of a RELION External job (unknown flags: warned, as RELION)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(extra):
        tok = extra[i]
        if tok.startswith("--"):
            val = extra[i + 1] if i + 1 < len(extra) and not extra[i + 1].startswith("--") else ""
            out[tok[2:]] = val
            i += 2 if val else 1
        else:
            i += 1
    return out


def run_from_cli(options: dict, extra_args: list[str], argv: list[str]) -> AlignOutcome:
    """Validate the ``polish3d align`` flags, run :func:`align`, write the pipeline markers."""
    from polish3d.refine.tomogram import AlignConfig

    o = dict(options)
    extra = _parse_extra(extra_args)
    # RELION External job inputs
    for key in ("in_parts", "in_3dref", "in_mask", "in_coords", "in_mics", "in_movies"):
        if key in extra and key not in o:
            o[key] = extra.pop(key)
    if extra:
        log.warning("unknown options ignored: %s", " ".join("--" + k for k in extra))
    out_dir = o.get("o") or ""
    pipeline = bool(o.get("pipeline_control")) or any(o.get(k) for k in ("in_parts", "in_3dref"))
    if not out_dir:
        raise InputError("--o (output directory) is required")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for marker in ("RELION_JOB_EXIT_SUCCESS", "RELION_JOB_EXIT_FAILURE"):
        (out / marker).unlink(missing_ok=True)
    try:
        outcome = _run_validated(o, argv, AlignConfig, pipeline)
    except BaseException:
        if pipeline:
            (out / "RELION_JOB_EXIT_FAILURE").touch()
        raise
    if pipeline:
        (out / "RELION_JOB_EXIT_SUCCESS").touch()
    return outcome


def _run_validated(o: dict, argv: list[str], AlignConfig, pipeline: bool) -> AlignOutcome:
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

    b = int(o.get("b") or 0)
    if b <= 0:
        raise InputError("--b (box size in pixels) is required and must be positive")
    if b % 2:
        raise InputError(f"--b {b}: the box size must be even")
    if o.get("aniso") or o.get("per_tilt_aniso"):
        raise InputError(
            "--aniso/--per_tilt_aniso have no effect in RELION 5 and are not implemented in "
            "polish3d; drop the flag (per-tilt magnification is refined by `polish3d fiducials`)"
        )
    if o.get("shift_only") and o.get("motion"):
        raise InputError("--shift_only cannot be combined with --motion (as in RELION)")
    if float(o.get("r", 20)) <= 0:
        raise InputError(f"--r {o.get('r')}: must be positive")
    if float(o.get("r", 20)) + 3 > b / 2:
        raise InputError(f"--r {o.get('r')}: the CC window must fit in the box (--r < --b/2 − 3)")
    if int(o.get("pad", 1)) != 1:
        log.warning(
            "--pad %s: polish3d interpolates the CC maps with an exact bicubic kernel; Fourier "
            "padding is not needed and is ignored (RELION's --pad != 1 is biased, see docs)",
            o.get("pad"),
        )
    if o.get("whiten_abs"):
        log.warning("--whiten_abs has no effect (as in RELION)")
    device = o.get("device") or ""
    if device:
        import jax

        try:
            jax.config.update("jax_platforms", device)
        except Exception as exc:  # pragma: no cover - depends on the machine
            raise InputError(f"--device {device}: {exc}") from None
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
    )
    motion = _motion_config(o)
    deformation = _deformation_config(o)
    threads = int(o.get("j") or 1)
    cmd = " ".join(shlex.quote(a) for a in (["polish3d"] + list(argv[1:])))
    return align(
        inputs, o["o"], config, motion=motion, deformation=deformation,
        only_do_unfinished=bool(o.get("only_do_unfinished")), threads=threads, command_line=cmd,
        freq_cutoff_ang=float(o.get("freq_cutoff", -1.0)),
        fsc_thresh_width=float(o.get("fsc_thresh_width", 5.0)),
        use_snr_weight=bool(o.get("use_snr_weight")), write_note=not o.get("pipeline_control"),
    )


def _motion_config(o: dict):
    if not o.get("motion"):
        return None
    from polish3d.refine.motion import MotionConfig

    return MotionConfig(
        s_vel=float(o.get("s_vel", 0.5)), s_div=float(o.get("s_div", 5000.0)),
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
