"""RefineConfig: every default once, checked when made; the command line maps its flags onto it."""

from __future__ import annotations

import dataclasses

import pytest
import typer
from typer.testing import CliRunner

from polish3d.cli import FLAG_OF_OPTION, OPTION_OF_FLAG, app, refine_config
from polish3d.config import OptionError, RefineConfig, default
from polish3d.errors import InputError
from polish3d.refine.deformation import DeformationConfig
from polish3d.refine.motion import MotionConfig
from polish3d.refine.tomogram import AlignConfig


def _cli_defaults() -> dict:
    """``{parameter: default}`` of ``polish3d align`` as the command line declares them."""
    command = typer.main.get_command(app).commands["align"]
    return {p.name: p.default for p in command.params}


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"r": 13.0}, "tomogram.r"),
        ({"r": float("nan")}, "tomogram.r"),
        ({"r": 0.0}, "tomogram.r"),
        ({"it": 0}, "tomogram.it"),
        ({"it": 2.5}, "tomogram.it"),
        ({"outer": 0}, "tomogram.outer"),
        ({"exact_passes": -1}, "tomogram.exact_passes"),
        ({"cutoff_fract": 1.5}, "tomogram.cutoff_fract"),
        ({"range_reg": -1.0}, "tomogram.range_reg"),
        ({"min_frame": -1}, "tomogram.min_frame"),
        ({"max_frame": -2}, "tomogram.max_frame"),
        ({"min_frame": 5, "max_frame": 2}, "tomogram.min_frame"),
        ({"threads": 0}, "threads"),
        ({"workers": -1}, "workers"),
        ({"workers": 2, "scheduler": "tcp://x:8786"}, "scheduler"),
        ({"fsc_thresh_width_shells": -1.0}, "fsc_thresh_width_shells"),
        ({"motion": MotionConfig(s_vel=-1.0)}, "motion.s_vel"),
        ({"motion": MotionConfig(max_ed=-2)}, "motion.max_ed"),
        ({"deformation": DeformationConfig(reg=-1.0)}, "deformation.reg"),
        ({"shift_only": True, "motion": True}, "tomogram.shift_only"),
        ({"const_a": True, "const_p": True, "const_s": True}, "tomogram.const_s"),
    ],
)
def test_bad_values_name_the_option(options, path):
    with pytest.raises(OptionError) as e:
        RefineConfig.build(32, **{"r": 8.0, **options})
    assert isinstance(e.value, InputError)
    assert path in e.value.names and path in str(e.value)
    # the command line writes the same error with its flags
    worded = e.value.worded(FLAG_OF_OPTION.get)
    assert worded.startswith(FLAG_OF_OPTION[e.value.names[0]]) and FLAG_OF_OPTION[path] in worded
    assert not any(f"{section}." in worded for section in ("tomogram", "motion", "deformation"))


def test_box_must_be_even_and_positive():
    for box in (0, -2, 33):
        with pytest.raises(OptionError, match=rf"tomogram.box {box}: .*even"):
            RefineConfig.build(box)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="radius"):
        RefineConfig.build(32, radius=8)


def test_numbers_get_the_types_of_their_defaults():
    config = RefineConfig(AlignConfig(box=32, r=8, blur_px=[2, 0]), motion=MotionConfig(s_vel=1))
    assert isinstance(config.tomogram.r, float) and config.tomogram.blur_px == (2, 0)
    assert isinstance(config.motion.s_vel, float)
    assert hash(config) == hash(RefineConfig.build(32, r=8.0, blur_px=(2, 0), motion=MotionConfig(s_vel=1.0)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threads = 2


def test_cli_and_api_defaults_are_the_dataclass_defaults():
    flags = {**_cli_defaults(), "b": 32, "r": 8.0}
    assert refine_config(flags) == RefineConfig.build(32, r=8.0)
    flags.update(motion=True, deformation=True)
    assert refine_config(flags) == RefineConfig.build(32, r=8.0, motion=True, deformation=True)
    assert _cli_defaults()["s_vel"] == MotionConfig().s_vel == default("motion.s_vel")


def test_flag_table_names_real_options():
    records = {"tomogram": AlignConfig, "motion": MotionConfig, "deformation": DeformationConfig,
               "": RefineConfig}
    for path in FLAG_OF_OPTION:
        section, _, name = path.rpartition(".")
        if path != "device":  # (not an option of the config: polish3d.api.select_device)
            assert name in {f.name for f in dataclasses.fields(records[section])}, path
    assert all(flag[2:].lower() in _cli_defaults() for flag in OPTION_OF_FLAG)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--s_vel", "-1"], "--s_vel -1: expected a positive velocity sigma"),  # checked with --motion off
        (["--j", "0"], "--j 0: expected a number of threads >= 1"),
        (["--r", "13"], "--r 13: the CC window must fit in the box (--r < --b/2 − 3 = 13 for --b 32)"),
        (["--def_w", "1", "--def_model", "linear"], "--def_w/--def_h (1, 3): expected at least 2"),
        (["--workers", "2", "--scheduler", "tcp://x:8786"], "--workers and --scheduler: give one"),
    ],
)
def test_cli_words_option_errors_as_flags(tmp_path, flags, needle):
    args = ["align", "--i", str(tmp_path / "none.star"), "--b", "32", "--r", "8", *flags,
            "--o", str(tmp_path / "out")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "tomogram." not in res.output and "motion." not in res.output
