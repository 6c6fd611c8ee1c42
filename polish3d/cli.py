"""Command-line interface: ``polish3d align | simulate | score | fiducials``.

Flags of ``polish3d align`` mirror ``relion_tomo_align`` one for one (same names, same
defaults). This module only parses options and calls the library; bad input becomes one clear
line on stderr and exit code 2 (a traceback only with ``--verbose``).
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from polish3d import __version__
from polish3d.errors import InputError

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
# align
# ----------------------------------------------------------------------------------------------

Opt = typer.Option


@app.command(
    "align",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def align_cmd(
    ctx: typer.Context,
    i: Annotated[str, Opt("--i", help="Optimisation set (optimisation_set.star).")] = "",
    p: Annotated[str, Opt("--p", help="Particle set (overrides the one in --i).")] = "",
    t: Annotated[str, Opt("--t", help="Tomogram set (overrides the one in --i).")] = "",
    mot: Annotated[str, Opt("--mot", help="Trajectory set motion.star (overrides --i).")] = "",
    ref1: Annotated[str, Opt("--ref1", help="Reference half map 1.")] = "",
    ref2: Annotated[str, Opt("--ref2", help="Reference half map 2.")] = "",
    mask: Annotated[str, Opt("--mask", help="Reference mask (multiplied into both halves).")] = "",
    fsc: Annotated[str, Opt("--fsc", help="FSC table (postprocess.star, table fsc).")] = "",
    freq_cutoff: Annotated[
        float, Opt("--freq_cutoff", help="Explicit resolution cutoff in Å (negative: off).")
    ] = -1.0,
    fsc_thresh_width: Annotated[
        float, Opt("--fsc_thresh_width", help="Cosine fall-off width after the last shell (shells).")
    ] = 5.0,
    use_snr_weight: Annotated[
        bool, Opt("--use_SNR_weight", help="Weight shells by the reference SNR (else flat).")
    ] = False,
    b: Annotated[int, Opt("--b", help="Box size in tilt-series pixels (required).")] = 0,
    r: Annotated[float, Opt("--r", help="Max. 2D position error in pixels (CC window).")] = 20.0,
    j: Annotated[int, Opt("--j", help="CPU threads.")] = 6,
    o: Annotated[str, Opt("--o", help="Output directory (required).")] = "",
    only_do_unfinished: Annotated[
        bool, Opt("--only_do_unfinished", help="Skip tomograms already finished in --o.")
    ] = False,
    per_frame_noise: Annotated[
        bool, Opt("--per_frame_noise", help="Whiten each tilt with its own noise spectrum.")
    ] = False,
    diag: Annotated[bool, Opt("--diag", help="Write diagnostic images.")] = False,
    shift_only: Annotated[bool, Opt("--shift_only", help="Only a rigid 2D shift per tilt.")] = False,
    shift_only_by_particles: Annotated[
        bool, Opt("--shift_only_by_particles", help="Shift-only from summed particle CCs.")
    ] = False,
    const_p: Annotated[bool, Opt("--const_p", help="Keep particle positions constant.")] = False,
    const_a: Annotated[bool, Opt("--const_a", help="Keep the per-tilt angles constant.")] = False,
    const_s: Annotated[bool, Opt("--const_s", help="Keep the per-tilt shifts constant.")] = False,
    range_reg: Annotated[
        float, Opt("--range_reg", help="Penalty weight for 2D displacements beyond --r.")
    ] = 0.0,
    aniso: Annotated[bool, Opt("--aniso", help="(RELION: no effect) rejected.")] = False,
    per_tilt_aniso: Annotated[bool, Opt("--per_tilt_aniso", help="(RELION: no effect) rejected.")] = False,
    it: Annotated[int, Opt("--it", help="Max. L-BFGS iterations.")] = 10000,
    motion: Annotated[bool, Opt("--motion", help="Estimate per-particle 3D motion (GP prior).")] = False,
    s_vel: Annotated[float, Opt("--s_vel", help="Velocity sigma, Å per e⁻/Å² of dose.")] = 0.5,
    s_div: Annotated[float, Opt("--s_div", help="Divergence sigma (correlation length), Å.")] = 5000.0,
    abs_params: Annotated[
        bool, Opt("--abs_params", help="Do not scale the motion sigmas by the per-tilt dose.")
    ] = False,
    sq_exp_ker: Annotated[
        bool, Opt("--sq_exp_ker", help="Squared-exponential instead of exponential kernel.")
    ] = False,
    max_ed: Annotated[int, Opt("--max_ed", help="Max. eigen-deformations kept (-1: all).")] = -1,
    deformation: Annotated[bool, Opt("--deformation", help="Estimate 2D image deformations.")] = False,
    def_w: Annotated[int, Opt("--def_w", help="Deformation grid points horizontally.")] = 3,
    def_h: Annotated[int, Opt("--def_h", help="Deformation grid points vertically.")] = 3,
    def_model: Annotated[
        str, Opt("--def_model", help="Deformation model: linear, spline or Fourier.")
    ] = "spline",
    def_reg: Annotated[float, Opt("--def_reg", help="Deformation regulariser weight.")] = 0.0,
    per_frame_deformation: Annotated[
        bool, Opt("--per_frame_deformation", help="One deformation per tilt.")
    ] = False,
    def_shrink: Annotated[
        float,
        Opt("--def_shrink", help="polish3d: shrinkage of the deformation update at the particles (0: off)."),
    ] = 0.01,
    pad: Annotated[int, Opt("--pad", help="Fourier padding factor of the CC maps.")] = 1,
    no_whiten: Annotated[bool, Opt("--no_whiten", help="Do not whiten (weights 1).")] = False,
    whiten_abs: Annotated[bool, Opt("--whiten_abs", help="(RELION: no effect) ignored.")] = False,
    hp: Annotated[float, Opt("--hp", help="Gaussian high-pass sigma in Fourier pixels (<=0 off).")] = -1.0,
    srp: Annotated[float, Opt("--srp", help="Whitening weight × (i/N)^srp.")] = 0.0,
    min_frame: Annotated[int, Opt("--min_frame", help="First dose rank used.")] = 0,
    max_frame: Annotated[int, Opt("--max_frame", help="Last dose rank used (-1: last).")] = -1,
    cutoff_fract: Annotated[
        float, Opt("--cutoff_fract", help="Ignore Fourier pixels with relative weight below this.")
    ] = 0.02,
    theme: Annotated[str, Opt("--theme", help="Accepted for RELION compatibility; ignored.")] = "",
    outer: Annotated[
        int,
        Opt("--outer", help="polish3d: max. CC-map passes (2nd+ at the refined geometry; 1: RELION-like)."),
    ] = 3,
    exact_passes: Annotated[
        int,
        Opt("--exact_passes", help="polish3d: passes of the final stage on the exact CC after the outer "
            "iterations (no grid pins the result to the start; 0: off)."),
    ] = 2,
    device: Annotated[str, Opt("--device", help="polish3d: JAX platform: cpu, gpu or tpu.")] = "",
    fsc_check: Annotated[
        bool,
        Opt("--fsc_check", help="polish3d: reconstruct the half maps from the input and the refined "
            "geometry and report both FSCs (about doubles the run time)."),
    ] = False,
    workers: Annotated[
        int,
        Opt("--workers", help="polish3d: refine tomograms as tasks on a local Dask cluster of this many "
            "worker processes, each with --j threads (0: in this process)."),
    ] = 0,
    scheduler: Annotated[
        str,
        Opt("--scheduler", help="polish3d: address of a running Dask scheduler (tcp://host:8786) whose "
            "workers refine the tomograms."),
    ] = "",
    pipeline_control: Annotated[
        str, Opt("--pipeline_control", help="RELION pipeline control directory.")
    ] = "",
) -> None:
    """Refine per-tilt 5-DOF projections and particle positions (relion_tomo_align)."""
    from polish3d.align import run_from_cli  # (``polish3d.align`` is the API function)

    options = {k: v for k, v in locals().items() if k not in ("ctx", "run_from_cli")}
    _run(lambda: run_from_cli(options, ctx.args, sys.argv))


def _run(fn) -> None:
    """Run a command; every failure becomes one line on stderr and an exit code (see docs/cli.md).

    2: bad input, flag or output folder (:class:`InputError`); 1: a file-system error or an
    internal error; 130: SIGINT; 143: SIGTERM. ``--verbose`` re-raises (traceback).
    """
    import click

    from polish3d.align import error_summary
    from polish3d.errors import Terminated

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
