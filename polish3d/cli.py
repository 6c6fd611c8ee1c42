"""Command-line interface: ``polish3d align | simulate | score | fiducials``.

Flags of ``polish3d align`` mirror ``relion_tomo_align`` one for one (same names, same
defaults). This module only parses options and calls the library; bad input becomes one clear
line on stderr and exit code 2 (a traceback only with ``--verbose``).
"""

from __future__ import annotations

import os

# The host-side linear algebra is small (L-BFGS vectors, tiny dense solves): a multi-threaded
# OpenBLAS only adds contention with XLA's own threads (measured 10-100x slower L-BFGS steps on
# a busy 2-core machine). OpenBLAS reads this when NumPy loads, so it is set before anything here
# imports NumPy (``import polish3d`` does not). Dask workers get it from the nanny's
# ``pre-spawn-environ`` (see polish3d.scale).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import logging  # noqa: E402
import sys  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Annotated  # noqa: E402

import typer  # noqa: E402

from polish3d import __version__  # noqa: E402
from polish3d.config import default  # noqa: E402
from polish3d.errors import InputError  # noqa: E402

app = typer.Typer(
    name="polish3d",
    no_args_is_help=True,
    add_completion=False,
    help="Refine cryo-ET tilt-series geometry and particle positions against a reference "
    "(a faster relion_tomo_align with RELION 5 files in and out).",
    context_settings={"help_option_names": ["--help", "-h"]},
)

_STATE = {"verbose": False}


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"polish3d {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version."),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Debug output; tracebacks on error.")] = False,
) -> None:
    _STATE["verbose"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    # JAX looks for a TPU and says so at WARNING level on every CPU/GPU machine
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    from polish3d.api import enable_compilation_cache

    enable_compilation_cache()


# ----------------------------------------------------------------------------------------------
# align: one option type per flag (defaults: polish3d.config.default, read from the dataclasses)
# ----------------------------------------------------------------------------------------------


#: every flag of ``polish3d align``: its type and help (the defaults are in the signature below)
_FLAGS: dict[str, tuple[type, str]] = {
    "--i": (str, "Optimisation set (optimisation_set.star)."),
    "--p": (str, "Particle set (overrides the one in --i)."),
    "--t": (str, "Tomogram set (overrides the one in --i)."),
    "--mot": (str, "Trajectory set motion.star (overrides --i)."),
    "--ref1": (str, "Reference half map 1."),
    "--ref2": (str, "Reference half map 2."),
    "--mask": (str, "Reference mask (multiplied into both halves)."),
    "--fsc": (str, "FSC table (postprocess.star, table fsc)."),
    "--freq_cutoff": (float, "Explicit resolution cutoff in Å (negative: off)."),
    "--fsc_thresh_width": (float, "Cosine fall-off width after the last shell (shells)."),
    "--use_SNR_weight": (bool, "Weight shells by the reference SNR (else flat)."),
    "--b": (int, "Box size in tilt-series pixels (required)."),
    "--r": (float, "Max. 2D position error in pixels (CC window)."),
    "--j": (int, "CPU threads."),
    "--o": (str, "Output directory (required)."),
    "--only_do_unfinished": (bool, "Skip tomograms already finished in --o."),
    "--per_frame_noise": (bool, "Whiten each tilt with its own noise spectrum."),
    "--diag": (bool, "Write diagnostic images."),
    "--shift_only": (bool, "Only a rigid 2D shift per tilt."),
    "--shift_only_by_particles": (bool, "Shift-only from summed particle CCs."),
    "--const_p": (bool, "Keep particle positions constant."),
    "--const_a": (bool, "Keep the per-tilt angles constant."),
    "--const_s": (bool, "Keep the per-tilt shifts constant."),
    "--range_reg": (float, "Penalty weight for 2D displacements beyond --r."),
    "--aniso": (bool, "Refine one 2x2 image distortion (anisotropic magnification, skew) per tilt series."),
    "--per_tilt_aniso": (bool, "Refine one 2x2 image distortion (anisotropic magnification, skew) per tilt."),
    "--it": (int, "Max. L-BFGS iterations."),
    "--motion": (bool, "Estimate per-particle 3D motion (GP prior)."),
    "--s_vel": (float, "Velocity sigma, Å per e⁻/Å² of dose."),
    "--s_div": (float, "Divergence sigma (correlation length), Å."),
    "--abs_params": (bool, "Do not scale the motion sigmas by the per-tilt dose."),
    "--sq_exp_ker": (bool, "Squared-exponential instead of exponential kernel."),
    "--max_ed": (int, "Max. eigen-deformations kept (-1: all)."),
    "--deformation": (bool, "Estimate 2D image deformations."),
    "--def_w": (int, "Deformation grid points horizontally."),
    "--def_h": (int, "Deformation grid points vertically."),
    "--def_model": (str, "Deformation model: linear, spline or Fourier."),
    "--def_reg": (float, "Deformation regulariser weight."),
    "--per_frame_deformation": (bool, "One deformation per tilt."),
    "--def_shrink": (float, "polish3d: shrinkage of the deformation update at the particles (0: off)."),
    "--pad": (int, "Fourier padding factor of the CC maps."),
    "--no_whiten": (bool, "Do not whiten (weights 1)."),
    "--whiten_abs": (bool, "(RELION: no effect) ignored."),
    "--hp": (float, "Gaussian high-pass sigma in Fourier pixels (<=0 off)."),
    "--srp": (float, "Whitening weight × (i/N)^srp."),
    "--min_frame": (int, "First dose rank used."),
    "--max_frame": (int, "Last dose rank used (-1: last)."),
    "--cutoff_fract": (float, "Ignore Fourier pixels with relative weight below this."),
    "--theme": (str, "Accepted for RELION compatibility; ignored."),
    "--outer": (int, "polish3d: max. CC-map passes (2nd+ at the refined geometry; 1: RELION-like)."),
    "--exact_passes": (int, "polish3d: passes of the final stage on the exact CC after the outer iterations "
        "(no grid pins the result to the start; 0: off)."),
    "--no_validation": (bool, "polish3d: skip the held-out validation (every tilt's new geometry judged on "
        "particles that did not fit it; tilts the data do not support keep their input geometry)."),
    "--device": (str, "polish3d: JAX platform: cpu, gpu or tpu."),
    "--fsc_check": (bool, "polish3d: reconstruct the half maps from the input and the refined geometry and "
        "report both FSCs (about doubles the run time)."),
    "--workers": (int, "polish3d: refine tomograms as tasks on a local Dask cluster of this many worker "
        "processes, each with --j threads (0: in this process)."),
    "--scheduler": (str, "polish3d: address of a running Dask scheduler (tcp://host:8786) whose workers "
        "refine the tomograms."),
    "--pipeline_control": (str, "RELION pipeline control directory."),
}
#: ``Flag.r``: the type of the parameter ``r`` of :func:`align_cmd` (the option ``--r``)
Flag = SimpleNamespace(**{
    name[2:].lower(): Annotated[kind, typer.Option(name, help=text)] for name, (kind, text) in _FLAGS.items()
})


@app.command("align", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def align_cmd(
    ctx: typer.Context,
    i: Flag.i = "",
    p: Flag.p = "",
    t: Flag.t = "",
    mot: Flag.mot = "",
    ref1: Flag.ref1 = "",
    ref2: Flag.ref2 = "",
    mask: Flag.mask = "",
    fsc: Flag.fsc = "",
    freq_cutoff: Flag.freq_cutoff = default("freq_cutoff_ang"),
    fsc_thresh_width: Flag.fsc_thresh_width = default("fsc_thresh_width_shells"),
    use_snr_weight: Flag.use_snr_weight = default("use_snr_weight"),
    b: Flag.b = 0,
    r: Flag.r = default("tomogram.r"),
    j: Flag.j = default("threads"),
    o: Flag.o = "",
    only_do_unfinished: Flag.only_do_unfinished = False,
    per_frame_noise: Flag.per_frame_noise = default("tomogram.per_frame_noise"),
    diag: Flag.diag = False,
    shift_only: Flag.shift_only = default("tomogram.shift_only"),
    shift_only_by_particles: Flag.shift_only_by_particles = default("tomogram.shift_only_by_particles"),
    const_p: Flag.const_p = default("tomogram.const_p"),
    const_a: Flag.const_a = default("tomogram.const_a"),
    const_s: Flag.const_s = default("tomogram.const_s"),
    range_reg: Flag.range_reg = default("tomogram.range_reg"),
    aniso: Flag.aniso = default("tomogram.aniso"),
    per_tilt_aniso: Flag.per_tilt_aniso = default("tomogram.per_tilt_aniso"),
    it: Flag.it = default("tomogram.it"),
    motion: Flag.motion = default("motion") is not None,
    s_vel: Flag.s_vel = default("motion.s_vel"),
    s_div: Flag.s_div = default("motion.s_div"),
    abs_params: Flag.abs_params = default("motion.abs_params"),
    sq_exp_ker: Flag.sq_exp_ker = default("motion.sq_exp_ker"),
    max_ed: Flag.max_ed = default("motion.max_ed"),
    deformation: Flag.deformation = default("deformation") is not None,
    def_w: Flag.def_w = default("deformation.grid")[0],
    def_h: Flag.def_h = default("deformation.grid")[1],
    def_model: Flag.def_model = default("deformation.model"),
    def_reg: Flag.def_reg = default("deformation.reg"),
    per_frame_deformation: Flag.per_frame_deformation = default("deformation.per_tilt"),
    def_shrink: Flag.def_shrink = default("deformation.shrink"),
    pad: Flag.pad = 1,
    no_whiten: Flag.no_whiten = not default("tomogram.whiten"),
    whiten_abs: Flag.whiten_abs = False,
    hp: Flag.hp = default("tomogram.hp"),
    srp: Flag.srp = default("tomogram.srp"),
    min_frame: Flag.min_frame = default("tomogram.min_frame"),
    max_frame: Flag.max_frame = default("tomogram.max_frame"),
    cutoff_fract: Flag.cutoff_fract = default("tomogram.cutoff_fract"),
    theme: Flag.theme = "",
    outer: Flag.outer = default("tomogram.outer"),
    exact_passes: Flag.exact_passes = default("tomogram.exact_passes"),
    no_validation: Flag.no_validation = not default("tomogram.validate"),
    device: Flag.device = "",
    fsc_check: Flag.fsc_check = default("fsc_check"),
    workers: Flag.workers = default("workers"),
    scheduler: Flag.scheduler = default("scheduler"),
    pipeline_control: Flag.pipeline_control = "",
) -> None:
    """Refine per-tilt 5-DOF projections and particle positions (relion_tomo_align)."""
    from polish3d.relion_job import run_job

    flags = dict(ctx.params)
    _run(lambda: run_job(o, bool(pipeline_control), ctx.args, lambda job, mode: _align(flags, job, mode)))


#: flags that set an option of :class:`polish3d.config.RefineConfig` one to one: flag → option path
#: (``--no_whiten``, ``--no_validation``, ``--def_w``/``--def_h``, ``--motion`` and
#: ``--deformation`` are mapped in :func:`refine_config`)
OPTION_OF_FLAG = {
    "--b": "tomogram.box", "--r": "tomogram.r", "--const_p": "tomogram.const_p",
    "--const_a": "tomogram.const_a", "--const_s": "tomogram.const_s", "--range_reg": "tomogram.range_reg",
    "--it": "tomogram.it", "--per_frame_noise": "tomogram.per_frame_noise", "--srp": "tomogram.srp",
    "--hp": "tomogram.hp", "--cutoff_fract": "tomogram.cutoff_fract", "--min_frame": "tomogram.min_frame",
    "--max_frame": "tomogram.max_frame", "--shift_only": "tomogram.shift_only",
    "--shift_only_by_particles": "tomogram.shift_only_by_particles", "--outer": "tomogram.outer",
    "--exact_passes": "tomogram.exact_passes", "--aniso": "tomogram.aniso",
    "--per_tilt_aniso": "tomogram.per_tilt_aniso",
    "--s_vel": "motion.s_vel", "--s_div": "motion.s_div", "--abs_params": "motion.abs_params",
    "--sq_exp_ker": "motion.sq_exp_ker", "--max_ed": "motion.max_ed",
    "--def_model": "deformation.model", "--def_reg": "deformation.reg",
    "--per_frame_deformation": "deformation.per_tilt", "--def_shrink": "deformation.shrink",
    "--freq_cutoff": "freq_cutoff_ang", "--fsc_thresh_width": "fsc_thresh_width_shells",
    "--use_SNR_weight": "use_snr_weight", "--j": "threads", "--workers": "workers",
    "--scheduler": "scheduler", "--fsc_check": "fsc_check",
}
#: how an option path is written in a message of the command line
FLAG_OF_OPTION = {
    **{path: flag for flag, path in OPTION_OF_FLAG.items()},
    "tomogram.whiten": "--no_whiten", "tomogram.validate": "--no_validation",
    "deformation.grid": "--def_w/--def_h", "motion": "--motion",
    "deformation": "--deformation", "device": "--device",
}


def refine_config(flags: dict):
    """The :class:`polish3d.config.RefineConfig` of the ``polish3d align`` flags (parameter names).

    Motion and deformation options are checked even when ``--motion``/``--deformation`` are off,
    so that a bad value is never ignored silently.

    Raises:
        OptionError: a bad value (naming the option path; :func:`_align` words it as the flag).
        InputError: an unknown ``--def_model`` or a grid it cannot use.
    """
    from polish3d.config import SECTIONS, RefineConfig, check_deformation, check_motion

    values: dict[str, dict] = {"": {}, **{section: {} for section in SECTIONS}}
    for flag, path in OPTION_OF_FLAG.items():
        section, _, name = path.rpartition(".")
        values[section][name] = flags[flag[2:].lower()]
    values["tomogram"]["whiten"] = not flags["no_whiten"]
    values["tomogram"]["validate"] = not flags["no_validation"]
    values["deformation"]["grid"] = (flags["def_w"], flags["def_h"])
    motion = SECTIONS["motion"](**values["motion"])
    try:
        deformation = SECTIONS["deformation"](**values["deformation"])
    except ValueError as exc:
        raise InputError(f"--def_model/--def_w/--def_h: {exc}") from None
    check_motion(motion)
    check_deformation(deformation)
    return RefineConfig(
        SECTIONS["tomogram"](**values["tomogram"]),
        motion=motion if flags["motion"] else None,
        deformation=deformation if flags["deformation"] else None,
        **values[""],
    )


def _align(flags: dict, job: dict[str, str], pipeline: bool):
    """Check the flags that are not options, make the config, run :func:`polish3d.driver.align`."""
    import shlex

    from polish3d.config import OptionError
    from polish3d.driver import AlignInputs, align
    from polish3d.relion_job import job_inputs

    inputs = job_inputs(AlignInputs(**{k: flags[k] for k in ("i", "p", "t", "mot", "ref1", "ref2", "mask",
                                                             "fsc")}), job)
    if not (inputs.i or inputs.p or inputs.t):
        raise InputError("no input: give --i optimisation_set.star (or --p, --t, --ref1, --ref2)")
    if flags["b"] <= 0:
        raise InputError(f"--b {flags['b']}: the box size in pixels is required and must be positive")
    _warn_ignored(flags)
    try:
        config = refine_config(flags)
        if flags["device"]:
            from polish3d.api import select_device

            select_device(flags["device"])
        command = " ".join(shlex.quote(a) for a in ["polish3d", *sys.argv[1:]])
        return align(inputs, flags["o"], config, only_do_unfinished=flags["only_do_unfinished"],
                     command_line=command, write_note=not flags["pipeline_control"],
                     pipeline_markers=pipeline)
    except OptionError as exc:
        raise InputError(exc.worded(lambda path: FLAG_OF_OPTION.get(path, path))) from None


def _warn_ignored(flags: dict) -> None:
    if flags["pad"] < 1:
        raise InputError(f"--pad {flags['pad']}: expected a padding factor >= 1")
    if flags["pad"] != 1:
        logging.getLogger("polish3d").warning(
            "--pad %s: polish3d interpolates the CC maps with an exact bicubic kernel; Fourier "
            "padding is not needed and is ignored (RELION's --pad != 1 is biased, see docs)", flags["pad"],
        )
    if flags["whiten_abs"]:
        logging.getLogger("polish3d").warning("--whiten_abs has no effect (as in RELION)")


def _run(fn) -> None:
    """Run a command; every failure becomes one line on stderr and an exit code (see docs/cli.md).

    2: bad input, flag or output folder (:class:`InputError`); 1: a file-system error or an
    internal error; 130: SIGINT; 143: SIGTERM. ``--verbose`` re-raises (traceback).
    """
    import click

    from polish3d.errors import Terminated
    from polish3d.output_folder import error_summary

    try:
        fn()
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise
    except NotImplementedError as exc:
        typer.echo(f"polish3d: {exc}", err=True)
        raise typer.Exit(2) from None
    except (InputError, OSError, Exception) as exc:
        if _STATE["verbose"]:
            raise
        code = 2 if isinstance(exc, InputError) else 1
        hint = "" if isinstance(exc, (InputError, OSError)) else " (--verbose shows the traceback)"
        typer.echo(f"polish3d: error: {error_summary(exc)}{hint}", err=True)
        raise typer.Exit(code) from None
    except Terminated as exc:
        typer.echo(f"polish3d: {error_summary(exc)}", err=True)
        raise typer.Exit(128 + exc.signum) from None
    except KeyboardInterrupt:
        typer.echo("polish3d: interrupted (SIGINT)", err=True)
        raise typer.Exit(130) from None


# ----------------------------------------------------------------------------------------------
# simulate / score / fiducials: commands are registered by their modules' CLI functions below.
# ----------------------------------------------------------------------------------------------


def main() -> None:
    """Console entry point."""
    app()


def _register_optional_commands() -> None:
    for module in ("polish3d.simulate", "polish3d.score", "polish3d.fiducials", "polish3d.reconstruct",
                   "polish3d.report"):
        try:
            mod = __import__(module, fromlist=["register_cli"])
        except ImportError:
            continue
        register = getattr(mod, "register_cli", None)
        if register is not None:
            register(app, _run)


_register_optional_commands()


if __name__ == "__main__":
    main()
