"""``polish3d fiducials``: files in (tracks, tilt angles or a tomogram set) → files out."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer

from polish3d.clitable import add_table_command
from polish3d.errors import InputError
from polish3d.fiducials._align import FiducialOptions, FiducialResult, align_fiducials
from polish3d.fiducials._files import (
    read_nominal_tilts_star,
    read_tilt_angles,
    read_tracks,
    write_beads_csv,
    write_projections_star,
    write_tlt,
    write_xf,
)
from polish3d.fiducials._report import report_dict, report_text
from polish3d.io.star import atomic_write_text

__all__ = ["register_cli", "run_fiducials"]

log = logging.getLogger("polish3d.fiducials")


def _ints(text: str, n: int, flag: str) -> tuple[int, ...] | None:
    if not text:
        return None
    parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    try:
        vals = tuple(int(round(float(p))) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != n or min(vals) <= 0:
        raise InputError(f"{flag} {text!r}: expected {n} positive integers separated by commas")
    return vals


def _refuse_overwriting_inputs(inputs, planned, tree_out=None, tree_inputs=()) -> None:
    """InputError when an output would replace an input file (any spelling of the same path),
    or when the tomogram set written into ``tree_out`` could land on its own input tables
    (``tree_inputs``: the input ``tomograms.star`` and per-tilt STAR files)."""
    def key(p):
        return Path(p).expanduser().resolve()

    ins = {key(p): p for p in inputs if str(p)}
    for p in planned:
        if key(p) in ins:
            raise InputError(f"--o {p.parent}: writing {p.name} there would overwrite the input "
                             f"{ins[key(p)]}; choose another output folder")
    if tree_out is not None:
        root = key(tree_out)
        for p in tree_inputs:
            if key(p).is_relative_to(root):
                raise InputError(f"--o {tree_out}: the tomogram set written there could overwrite "
                                 f"the input {p}; choose an output folder that holds no input")


def run_fiducials(
    *,
    tracks: str,
    out_dir: str,
    tlt: str = "",
    tomograms: str = "",
    tomo: str = "",
    tilt_axis_deg: float | None = None,
    image_size: str = "",
    tomo_size: str = "",
    pixel_size_ang: float | None = None,
    options: FiducialOptions | None = None,
    name: str = "",
) -> tuple[FiducialResult, dict]:
    """Run a fiducial alignment from files and write every output into ``out_dir``.

    Writes ``<name>.xf``, ``<name>.tlt``, ``<name>_beads.csv``, ``<name>_residuals.csv``,
    ``<name>_projections.star``, ``report.json``, ``report.txt`` and, with a tomogram set,
    ``tomograms.star`` + ``tilt_series/<name>.star`` (the tilt series' geometry replaced).

    Returns:
        ``(result, report)``.
    """
    if not tracks:
        raise InputError("--tracks is required (IMOD .fid/.mod, or CSV/STAR with bead, tilt, x, y)")
    if not out_dir:
        raise InputError("--o (output directory) is required")
    df = read_tracks(tracks)
    image_px = _ints(image_size, 2, "--image_size")
    tomo_px = _ints(tomo_size, 3, "--tomo_size")
    tset = nominal = None
    if tomograms:
        tset, tomo, tsd, nominal, tilt_axis_deg = _from_tomogram_set(tomograms, tomo, tilt_axis_deg)
        image_px = image_px or tuple(tsd.image_size_px)
        tomo_px = tomo_px or tuple(tsd.tomo_size_px)
        pixel_size_ang = pixel_size_ang or tsd.pixel_size_ang
    if tlt:
        nominal = read_tilt_angles(tlt)
    if nominal is None:
        raise InputError("give the tilt angles: --tlt (IMOD .tlt or tilt-series STAR) or --t")
    if image_px is None:
        raise InputError("--image_size W,H is required without --t")
    if tilt_axis_deg is None:
        raise InputError("--tilt_axis (degrees from the image y axis, counter-clockwise) is "
                         "required when the tilt-series STAR does not give it")
    name = name or tomo or Path(tracks).stem
    out = Path(out_dir)
    tree_inputs = [] if tset is None else \
        [Path(tomograms)] + [Path(v) for v in tset.tilt_files.values()]
    inputs = [Path(tracks)] + ([Path(tlt)] if tlt else []) + tree_inputs
    _refuse_overwriting_inputs(inputs, _planned_outputs(out, name, tset is not None),
                               out if tset is not None else None, tree_inputs)
    result = align_fiducials(df, nominal, tilt_axis_deg, image_px, options=options or FiducialOptions(),
                             tomo_size_px=tomo_px, pixel_size_ang=pixel_size_ang)
    rep = _write_outputs(out, name, result, tset, tomo)
    log.info("fiducials %s: residual RMS %.3f px (inliers %.3f px), %d beads, %d tilts → %s",
             name, rep["rms_px"], rep["rms_inliers_px"], rep["n_beads"], rep["n_tilts"], out)
    return result, rep


def _from_tomogram_set(tomograms: str, tomo: str, tilt_axis_deg: float | None):
    """``(tomogram set, tomo, tilt series, nominal angles, tilt axis)`` for tilt series ``tomo``
    of ``tomograms`` (the only one when ``tomo`` is empty); the tilt axis is ``tilt_axis_deg``,
    else the table's ``rlnTomoNominalTiltAxisAngle`` or ``rlnTomoZRot`` (``None`` without)."""
    from polish3d.io.relion import read_tomogram_set

    tset = read_tomogram_set(tomograms)
    names = tset.names
    if not tomo:
        if len(names) != 1:
            raise InputError(f"{tomograms} holds {len(names)} tilt series: choose one with --tomo")
        tomo = names[0]
    if tomo not in names:
        raise InputError(f"--tomo {tomo!r} is not in {tomograms} ({', '.join(names)})")
    tsd = tset.tilt_series(tomo, load_images=False)
    table = tset.tilt_tables[tomo]
    nominal = read_nominal_tilts_star(tset.tilt_files.get(tomo, tomograms), table)
    if tilt_axis_deg is None:
        tilt_axis_deg = next((float(table[lab].to_numpy(float)[0])
                              for lab in ("rlnTomoNominalTiltAxisAngle", "rlnTomoZRot")
                              if lab in table.columns), None)
    return tset, tomo, tsd, nominal, tilt_axis_deg


def _planned_outputs(out: Path, name: str, with_tomogram_set: bool) -> list[Path]:
    """The files :func:`run_fiducials` writes into ``out`` (the tilt-series STAR files of a
    tomogram set aside)."""
    planned = [out / f"{name}{sfx}" for sfx in (".xf", ".tlt", "_beads.csv", "_residuals.csv",
                                                "_projections.star")]
    planned += [out / "report.json", out / "report.txt"]
    if with_tomogram_set:
        planned.append(out / "tomograms.star")
    return planned


def _write_outputs(out: Path, name: str, result: FiducialResult, tset, tomo: str) -> dict:
    """Write every output file into ``out``; returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    write_xf(out / f"{name}.xf", result)
    write_tlt(out / f"{name}.tlt", result.tilt_deg)
    write_beads_csv(out / f"{name}_beads.csv", result)
    atomic_write_text(out / f"{name}_residuals.csv",
                      result.residuals.to_csv(index=False, float_format="%.4f"))
    write_projections_star(out / f"{name}_projections.star", result, name)
    if tset is not None:
        # the matrices are written as well when magnification, stretch or skew make them more
        # than rotations (with_tilt_series decides)
        tset.with_tilt_series(tomo, projections=result.projections,
                              image_size_px=result.image_size_px).write(out)
    rep = report_dict(result)
    atomic_write_text(out / "report.json", json.dumps(rep, indent=1))
    atomic_write_text(out / "report.txt", report_text(rep))
    return rep


MODES_HELP = "fixed, global, grouped or per_tilt"

# option (flag without "--") → (type, default, help), in --help order
OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "tracks": (str, "", "Bead tracks: IMOD .fid/.mod (needs imodmodel) or CSV/STAR with bead, "
                        "tilt, x, y (px); bead_id/contour, view/tilt_row/z, x_px/y_px also "
                        "accepted."),
    "tlt": (str, "", "Nominal tilt angles: IMOD .tlt or tilt-series STAR "
                     "(rlnTomoNominalStageTiltAngle)."),
    "t": (str, "", "Tomogram set (tomograms.star): angles, sizes, pixel size; its geometry is "
                   "replaced in the output."),
    "tomo": (str, "", "rlnTomoName in --t."),
    "tilt_axis": (float | None, None, "Tilt-axis angle, degrees from the image y axis, "
                                      "counter-clockwise."),
    "image_size": (str, "", "Tilt-image size W,H (px)."),
    "tomo_size": (str, "", "Tomogram size w,h,d (px) the projection matrices refer to."),
    "pixel_size": (float | None, None, "Å per pixel."),
    "o": (str, "", "Output directory."),
    "rotation": (str, "per_tilt", f"In-plane rotation: {MODES_HELP}."),
    "tilt": (str, "per_tilt", f"Tilt angles: {MODES_HELP}."),
    "mag": (str, "per_tilt", f"Magnification: {MODES_HELP}."),
    "stretch": (str, "fixed", f"X-stretch (tiltalign's dmag, XStretchOption): {MODES_HELP}."),
    "skew": (str, "fixed", f"Skew (tiltalign's SkewOption): {MODES_HELP}."),
    "group_size": (int, 5, "Tilts per group (grouped), for every parameter without its own size."),
    "rotation_group": (int, 0, "Tilts per rotation group; 0: --group_size."),
    "tilt_group": (int, 0, "Tilts per tilt-angle group; 0: --group_size."),
    "mag_group": (int, 0, "Tilts per magnification group; 0: --group_size."),
    "stretch_group": (int, 0, "Tilts per X-stretch group; 0: --group_size."),
    "skew_group": (int, 0, "Tilts per skew group; 0: --group_size."),
    "cosine_groups": (bool, False, "Tilt groups ∝ cos θ and X-stretch groups ∝ cos^1.5 θ "
                                   "(tiltalign's automapping)."),
    "stretch_ref_tilt": (int, -1, "Tilt index whose X-stretch and skew are 0; -1: they sum to 0."),
    "robust": (bool, False, "Tukey re-weighting of outliers."),
    "ref_tilt": (int, -1, "Reference tilt index (mag 1); -1: lowest |tilt|."),
    "name": (str, "", "Output file stem (default --tomo or the tracks file name)."),
}


def options_from_flags(values: dict[str, Any]) -> FiducialOptions:
    """The :class:`FiducialOptions` of the command-line values ``{option: value}`` (group sizes
    0 and tilt indices −1 mean "not given")."""
    groups = FiducialOptions.GROUPS.values()  # the group options are named like the fields
    for flag in ("group_size", *groups):
        v = values[flag]
        if v < 0 or (v == 0 and flag == "group_size"):
            raise InputError(f"--{flag} {v}: expected a positive number of tilts")
    return FiducialOptions(
        **{field_name: values[flag[2:]] for field_name, flag in FiducialOptions.FLAGS.items()},
        group_size=values["group_size"],
        **{g: values[g] or None for g in groups},
        ref_tilt=None if values["ref_tilt"] < 0 else values["ref_tilt"],
        stretch_ref_tilt=None if values["stretch_ref_tilt"] < 0 else values["stretch_ref_tilt"],
        cosine_groups=values["cosine_groups"], robust="tukey" if values["robust"] else "none")


def _fiducials_from_flags(values: dict[str, Any]) -> None:
    _, rep = run_fiducials(
        tracks=values["tracks"], out_dir=values["o"], tlt=values["tlt"], tomograms=values["t"],
        tomo=values["tomo"], tilt_axis_deg=values["tilt_axis"], image_size=values["image_size"],
        tomo_size=values["tomo_size"], pixel_size_ang=values["pixel_size"],
        options=options_from_flags(values), name=values["name"])
    typer.echo(f"residual RMS {rep['rms_px']:.3f} px ({rep['rms_ang']:.2f} Å), inliers "
               f"{rep['rms_inliers_px']:.3f} px; {rep['n_beads']} beads, "
               f"{rep['n_tilts']} tilts; report: {Path(values['o']) / 'report.txt'}")


def register_cli(app, run) -> None:
    """Add the ``fiducials`` command to the typer ``app``; ``run(fn)`` maps errors to exit 2."""
    add_table_command(app, "fiducials", OPTIONS, _fiducials_from_flags, run,
                      "Align a tilt series from tracked gold beads (bundle adjustment like "
                      "tiltalign).")
