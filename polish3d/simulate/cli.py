"""``polish3d simulate``: command-line flags → :class:`SimulationConfig` → :func:`simulate`.

The flags are one table (:data:`FLAGS`, in ``--help`` order); a flag's type and default are
those of the configuration field it sets, so every default lives once, in the configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from polish3d.clitable import add_table_command
from polish3d.simulate.config import SimulationConfig

__all__ = ["FLAGS", "config_from_flags", "option_rows", "register_cli"]

# flag (without "--") → (SimulationConfig field it sets, or "" for none; help)
FLAGS: dict[str, tuple[str, str]] = {
    "o": ("", "Output directory (required)."),
    "n_tomograms": ("n_tomograms", "Tilt series."),
    "n_particles": ("n_particles", "Listed particles per tomogram."),
    "n_unlisted": ("n_unlisted", "Extra particles in the images, not listed."),
    "tilt_min": ("tilt_min_deg", "Lowest tilt (deg)."),
    "tilt_max": ("tilt_max_deg", "Highest tilt (deg)."),
    "tilt_step": ("tilt_step_deg", "Tilt step (deg)."),
    "sequential": ("dose_symmetric", "Sequential instead of dose-symmetric order."),
    "dose": ("dose_per_tilt_e_per_ang2", "Dose per tilt (e/A^2)."),
    "angpix": ("pixel_size_ang", "Pixel size (A)."),
    "box": ("box_px", "Box size (px)."),
    "image_size": ("image_size_px", "Square tilt-image size (px)."),
    "thickness": ("tomo_thickness_px", "Tomogram thickness (px)."),
    "snr": ("snr", "Per-pixel SNR over the particle."),
    "tilt_axis": ("tilt_axis_deg", "ZRot (deg)."),
    "x_tilt_err": ("x_tilt_err_deg", "XTilt error sigma (deg)."),
    "y_tilt_err": ("y_tilt_err_deg", "YTilt error sigma (deg)."),
    "z_rot_err": ("z_rot_err_deg", "ZRot error sigma (deg)."),
    "shift_err": ("shift_err_px", "Per-tilt shift error sigma (px)."),
    "position_err": ("position_err_px", "3D position error sigma (px)."),
    "s_vel": ("s_vel", "Motion velocity sigma (A per e/A^2); 0 = off."),
    "s_div": ("s_div", "Motion correlation length."),
    "deformation": ("deformation_amplitude_px", "2D deformation amplitude (px); 0 = off."),
    "aniso_percent": ("aniso_percent", "Anisotropic magnification per tilt (%, random axis); 0 = off."),
    "series_aniso_percent": ("series_aniso_percent", "Anisotropic magnification per series (%); 0 = off."),
    "defocus": ("defocus_ang", "Mean defocus (A)."),
    "reference": ("", "Reference MRC instead of the built-in phantom."),
    "seed": ("seed", "Random seed."),
}

# flags whose value is not the field's own: flag → (type, default, flag value → field value)
_CONVERTED: dict[str, tuple[type, Any, Callable[[Any], Any]]] = {
    "sequential": (bool, False, lambda sequential: not sequential),
    "image_size": (int, SimulationConfig().image_size_px[0], lambda side: (side, side)),
}


def option_rows() -> dict[str, tuple[type, Any, str]]:
    """:data:`FLAGS` as ``{flag: (type, default, help)}``."""
    defaults = SimulationConfig()
    rows = {}
    for flag, (field_name, help_text) in FLAGS.items():
        if flag in _CONVERTED:
            kind, default = _CONVERTED[flag][:2]
        elif field_name:
            default = getattr(defaults, field_name)
            kind = type(default)
        else:
            kind, default = str, ""
        rows[flag] = (kind, default, help_text)
    return rows


def config_from_flags(values: dict[str, Any]) -> SimulationConfig:
    """The configuration that the flag values ``{flag: value}`` (every flag of :data:`FLAGS`
    that sets a field) describe."""
    fields = {}
    for flag, (field_name, _) in FLAGS.items():
        if field_name:
            convert = _CONVERTED[flag][2] if flag in _CONVERTED else (lambda value: value)
            fields[field_name] = convert(values[flag])
    return SimulationConfig(**fields)


def register_cli(app, run) -> None:
    """Add ``polish3d simulate`` to the typer ``app``; ``run(fn)`` maps errors to exit codes."""
    add_table_command(app, "simulate", option_rows(), _simulate_from_flags, run,
                      "Simulate a synthetic optimisation set with ground truth (truth/ subfolder).")


def _simulate_from_flags(values: dict[str, Any]) -> None:
    from polish3d.errors import InputError
    from polish3d.simulate.core import simulate

    if not values["o"]:
        raise InputError("--o (output directory) is required")
    cfg = config_from_flags(values)
    try:
        res = simulate(cfg, values["o"], reference=values["reference"] or None)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    typer.echo(
        f"simulated {cfg.n_tomograms} tilt series x {cfg.n_particles} particles in "
        f"{res.seconds:.1f} s -> {res.optimisation_set} "
        f"(truth: {res.truth_optimisation_set})"
    )
