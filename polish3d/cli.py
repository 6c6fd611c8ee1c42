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


def _flag(kind: type, name: str, text: str):
    return Annotated[kind, typer.Option(name, help=text)]


I = _flag(str, "--i", "Optimisation set (optimisation_set.star).")
P = _flag(str, "--p", "Particle set (overrides the one in --i).")
T = _flag(str, "--t", "Tomogram set (overrides the one in --i).")
Mot = _flag(str, "--mot", "Trajectory set motion.star (overrides --i).")
Ref1 = _flag(str, "--ref1", "Reference half map 1.")
Ref2 = _flag(str, "--ref2", "Reference half map 2.")
Mask = _flag(str, "--mask", "Reference mask (multiplied into both halves).")
Fsc = _flag(str, "--fsc", "FSC table (postprocess.star, table fsc).")
FreqCutoff = _flag(float, "--freq_cutoff", "Explicit resolution cutoff in Å (negative: off).")
FscThreshWidth = _flag(float, "--fsc_thresh_width", "Cosine fall-off width after the last shell (shells).")
UseSnrWeight = _flag(bool, "--use_SNR_weight", "Weight shells by the reference SNR (else flat).")
B = _flag(int, "--b", "Box size in tilt-series pixels (required).")
R = _flag(float, "--r", "Max. 2D position error in pixels (CC window).")
J = _flag(int, "--j", "CPU threads.")
O = _flag(str, "--o", "Output directory (required).")
OnlyDoUnfinished = _flag(bool, "--only_do_unfinished", "Skip tomograms already finished in --o.")
PerFrameNoise = _flag(bool, "--per_frame_noise", "Whiten each tilt with its own noise spectrum.")
Diag = _flag(bool, "--diag", "Write diagnostic images.")
ShiftOnly = _flag(bool, "--shift_only", "Only a rigid 2D shift per tilt.")
ShiftOnlyByParticles = _flag(bool, "--shift_only_by_particles", "Shift-only from summed particle CCs.")
ConstP = _flag(bool, "--const_p", "Keep particle positions constant.")
ConstA = _flag(bool, "--const_a", "Keep the per-tilt angles constant.")
ConstS = _flag(bool, "--const_s", "Keep the per-tilt shifts constant.")
RangeReg = _flag(float, "--range_reg", "Penalty weight for 2D displacements beyond --r.")
Aniso = _flag(bool, "--aniso", "(RELION: no effect) rejected.")
PerTiltAniso = _flag(bool, "--per_tilt_aniso", "(RELION: no effect) rejected.")
It = _flag(int, "--it", "Max. L-BFGS iterations.")
Motion = _flag(bool, "--motion", "Estimate per-particle 3D motion (GP prior).")
SVel = _flag(float, "--s_vel", "Velocity sigma, Å per e⁻/Å² of dose.")
SDiv = _flag(float, "--s_div", "Divergence sigma (correlation length), Å.")
AbsParams = _flag(bool, "--abs_params", "Do not scale the motion sigmas by the per-tilt dose.")
SqExpKer = _flag(bool, "--sq_exp_ker", "Squared-exponential instead of exponential kernel.")
MaxEd = _flag(int, "--max_ed", "Max. eigen-deformations kept (-1: all).")
Deformation = _flag(bool, "--deformation", "Estimate 2D image deformations.")
DefW = _flag(int, "--def_w", "Deformation grid points horizontally.")
DefH = _flag(int, "--def_h", "Deformation grid points vertically.")
DefModel = _flag(str, "--def_model", "Deformation model: linear, spline or Fourier.")
DefReg = _flag(float, "--def_reg", "Deformation regulariser weight.")
PerFrameDeformation = _flag(bool, "--per_frame_deformation", "One deformation per tilt.")
DefShrink = _flag(float, "--def_shrink",
                  "polish3d: shrinkage of the deformation update at the particles (0: off).")
Pad = _flag(int, "--pad", "Fourier padding factor of the CC maps.")
NoWhiten = _flag(bool, "--no_whiten", "Do not whiten (weights 1).")
WhitenAbs = _flag(bool, "--whiten_abs", "(RELION: no effect) ignored.")
Hp = _flag(float, "--hp", "Gaussian high-pass sigma in Fourier pixels (<=0 off).")
Srp = _flag(float, "--srp", "Whitening weight × (i/N)^srp.")
MinFrame = _flag(int, "--min_frame", "First dose rank used.")
MaxFrame = _flag(int, "--max_frame", "Last dose rank used (-1: last).")
CutoffFract = _flag(float, "--cutoff_fract", "Ignore Fourier pixels with relative weight below this.")
Theme = _flag(str, "--theme", "Accepted for RELION compatibility; ignored.")
Outer = _flag(int, "--outer",
              "polish3d: max. CC-map passes (2nd+ at the refined geometry; 1: RELION-like).")
ExactPasses = _flag(int, "--exact_passes",
                    "polish3d: passes of the final stage on the exact CC after the outer iterations "
                    "(no grid pins the result to the start; 0: off).")
Device = _flag(str, "--device", "polish3d: JAX platform: cpu, gpu or tpu.")
FscCheck = _flag(bool, "--fsc_check",
                 "polish3d: reconstruct the half maps from the input and the refined geometry and "
                 "report both FSCs (about doubles the run time).")
Workers = _flag(int, "--workers",
                "polish3d: refine tomograms as tasks on a local Dask cluster of this many worker "
                "processes, each with --j threads (0: in this process).")
Scheduler = _flag(str, "--scheduler",
                  "polish3d: address of a running Dask scheduler (tcp://host:8786) whose workers "
                  "refine the tomograms.")
PipelineControl = _flag(str, "--pipeline_control", "RELION pipeline control directory.")


@app.command("align", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def align_cmd(
    ctx: typer.Context,
    i: I = "", p: P = "", t: T = "", mot: Mot = "", ref1: Ref1 = "", ref2: Ref2 = "", mask: Mask = "",
    fsc: Fsc = "",
    freq_cutoff: FreqCutoff = default("freq_cutoff_ang"),
    fsc_thresh_width: FscThreshWidth = default("fsc_thresh_width_shells"),
    use_snr_weight: UseSnrWeight = default("use_snr_weight"),
    b: B = 0,
    r: R = default("tomogram.r"),
    j: J = default("threads"),
    o: O = "",
    only_do_unfinished: OnlyDoUnfinished = False,
    per_frame_noise: PerFrameNoise = default("tomogram.per_frame_noise"),
    diag: Diag = False,
    shift_only: ShiftOnly = default("tomogram.shift_only"),
    shift_only_by_particles: ShiftOnlyByParticles = default("tomogram.shift_only_by_particles"),
    const_p: ConstP = default("tomogram.const_p"),
    const_a: ConstA = default("tomogram.const_a"),
    const_s: ConstS = default("tomogram.const_s"),
    range_reg: RangeReg = default("tomogram.range_reg"),
    aniso: Aniso = False,
    per_tilt_aniso: PerTiltAniso = False,
    it: It = default("tomogram.it"),
    motion: Motion = default("motion") is not None,
    s_vel: SVel = default("motion.s_vel"),
    s_div: SDiv = default("motion.s_div"),
    abs_params: AbsParams = default("motion.abs_params"),
    sq_exp_ker: SqExpKer = default("motion.sq_exp_ker"),
    max_ed: MaxEd = default("motion.max_ed"),
    deformation: Deformation = default("deformation") is not None,
    def_w: DefW = default("deformation.grid")[0],
    def_h: DefH = default("deformation.grid")[1],
    def_model: DefModel = default("deformation.model"),
    def_reg: DefReg = default("deformation.reg"),
    per_frame_deformation: PerFrameDeformation = default("deformation.per_tilt"),
    def_shrink: DefShrink = default("deformation.shrink"),
    pad: Pad = 1,
    no_whiten: NoWhiten = not default("tomogram.whiten"),
    whiten_abs: WhitenAbs = False,
    hp: Hp = default("tomogram.hp"),
    srp: Srp = default("tomogram.srp"),
    min_frame: MinFrame = default("tomogram.min_frame"),
    max_frame: MaxFrame = default("tomogram.max_frame"),
    cutoff_fract: CutoffFract = default("tomogram.cutoff_fract"),
    theme: Theme = "",
    outer: Outer = default("tomogram.outer"),
    exact_passes: ExactPasses = default("tomogram.exact_passes"),
    device: Device = "",
    fsc_check: FscCheck = default("fsc_check"),
    workers: Workers = default("workers"),
    scheduler: Scheduler = default("scheduler"),
    pipeline_control: PipelineControl = "",
) -> None:
    """Refine per-tilt 5-DOF projections and particle positions (relion_tomo_align)."""
    from polish3d.relion_job import run_job

    flags = dict(ctx.params)
    _run(lambda: run_job(o, bool(pipeline_control), ctx.args, lambda job, mode: _align(flags, job, mode)))


#: flags that set an option of :class:`polish3d.config.RefineConfig` one to one: flag → option path
#: (``--no_whiten``, ``--def_w``/``--def_h``, ``--motion`` and ``--deformation`` are mapped in
#: :func:`refine_config`)
OPTION_OF_FLAG = {
    "--b": "tomogram.box", "--r": "tomogram.r", "--const_p": "tomogram.const_p",
    "--const_a": "tomogram.const_a", "--const_s": "tomogram.const_s", "--range_reg": "tomogram.range_reg",
    "--it": "tomogram.it", "--per_frame_noise": "tomogram.per_frame_noise", "--srp": "tomogram.srp",
    "--hp": "tomogram.hp", "--cutoff_fract": "tomogram.cutoff_fract", "--min_frame": "tomogram.min_frame",
    "--max_frame": "tomogram.max_frame", "--shift_only": "tomogram.shift_only",
    "--shift_only_by_particles": "tomogram.shift_only_by_particles", "--outer": "tomogram.outer",
    "--exact_passes": "tomogram.exact_passes",
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
    "tomogram.whiten": "--no_whiten", "deformation.grid": "--def_w/--def_h", "motion": "--motion",
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
    if flags["aniso"] or flags["per_tilt_aniso"]:
        raise InputError(
            "--aniso/--per_tilt_aniso have no effect in RELION 5 and are not implemented in "
            "polish3d; drop the flag (per-tilt magnification is refined by `polish3d fiducials`)"
        )
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
