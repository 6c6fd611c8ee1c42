"""``polish3d reconstruct``: the command line of :func:`polish3d.reconstruct.reconstruct`
(flags named as ``relion_tomo_reconstruct_particle``'s)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polish3d.errors import InputError
from polish3d.reconstruct.halfmaps import format_fsc_table, reconstruct, write_reconstruction
from polish3d.reconstruct.options import ReconstructOptions

__all__ = ["register_cli"]

Opt = typer.Option


def _read_mask(path: str, box: int):
    """The ``--mask`` map, checked against the output box (px)."""
    from polish3d.io import read_map

    m = read_map(path)[0]
    if m.shape != (box,) * 3:
        raise InputError(f"--mask {path}: shape {m.shape}, expected the output box {(box,) * 3}")
    return m


def register_cli(app, run) -> None:
    """Add ``polish3d reconstruct`` to the typer ``app``; ``run(fn)`` maps errors to exit codes."""

    @app.command("reconstruct")
    def reconstruct_cmd(
        i: Annotated[str, Opt("--i", help="Optimisation set (optimisation_set.star).")] = "",
        b: Annotated[int, Opt("--b", help="Box size (output pixels, even; required).")] = 0,
        o: Annotated[str, Opt("--o", help="Output directory (required).")] = "",
        crop: Annotated[int, Opt("--crop", help="Also crop the maps to this size (px).")] = -1,
        binning: Annotated[float, Opt("--bin", help="Binning factor (output px / tilt px).")] = 1.0,
        snr: Annotated[float, Opt("--SNR", help="Wiener SNR (1/SNR added to the weights); "
                                  "<=0: heuristic.")] = -1.0,
        max_dose: Annotated[float, Opt("--max_dose", help="Use only tilts with pre-exposure <= this "
                                       "(e/A^2).")] = -1.0,
        cutoff_fract: Annotated[float, Opt("--cutoff_fract", help="Ignore frequencies with dose weight "
                                           "below this.")] = 0.01,
        taper: Annotated[float, Opt("--taper", help="Final spherical taper width (px).")] = 10.0,
        mask: Annotated[str, Opt("--mask", help="Mask (MRC) applied to the half maps for the FSC.")] = "",
        chunk: Annotated[int, Opt("--chunk", help="polish3d: particle-tilt pairs per batch "
                                  "(0: automatic).")] = 0,
        j: Annotated[int, Opt("--j", help="Accepted for RELION compatibility (JAX threads).")] = 1,
        device: Annotated[str, Opt("--device", help="polish3d: JAX platform: cpu, gpu or tpu.")] = "",
    ) -> None:
        """Reconstruct the half maps of the particles (relion_tomo_reconstruct_particle) + FSC."""

        def go():
            for flag, missing in (("--i (optimisation set)", not i), ("--o (output directory)", not o),
                                  ("--b (box size in pixels)", b <= 0)):
                if missing:
                    raise InputError(f"{flag} is required")
            if j < 1:
                raise InputError(f"--j {j}: must be at least 1")
            if device:
                from polish3d.api import set_device

                set_device(device)
            options = ReconstructOptions(
                box=b, crop=crop, binning=binning, snr=snr, max_dose=max_dose,
                cutoff_fract=cutoff_fract, taper_px=taper, chunk=chunk,
            )
            rec = reconstruct(i, options, mask=_read_mask(mask, options.out_box) if mask else None)
            write_reconstruction(rec, o)
            typer.echo(format_fsc_table(rec))
            typer.echo(f"wrote {Path(o) / 'half1.mrc'}, half2.mrc, merged.mrc, fsc.star")

        run(go)
