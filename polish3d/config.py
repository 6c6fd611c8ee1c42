"""One configuration of a refinement run: :class:`RefineConfig`, every default once, self-checking.

A :class:`RefineConfig` composes the engine's own option records and adds the run-level options:

* ``tomogram``: :class:`polish3d.refine.tomogram.AlignConfig` (box, CC window, what is refined,
  frequency weights, outer passes; pixels are tilt-series pixels);
* ``motion``: :class:`polish3d.refine.motion.MotionConfig` or ``None`` (no motion);
* ``deformation``: :class:`polish3d.refine.deformation.DeformationConfig` or ``None``;
* the reference envelope (``freq_cutoff_ang``, ``fsc_thresh_width_shells``, ``use_snr_weight``)
  and where the tomograms run (``threads``, ``workers``, ``scheduler``, ``fsc_check``).

Defaults live in those dataclasses only; the command line and the API read them from there
(:func:`default`). A config checks itself when it is made and raises :class:`OptionError`, which
names the offending fields by their path in the config (``tomogram.r``, ``motion.s_vel``); the
command line rewrites those names as its flags (``--r``, ``--s_vel``).

Importing this module imports JAX (the engine's records live with the engine).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any

from polish3d.errors import InputError
from polish3d.refine.deformation import DeformationConfig
from polish3d.refine.motion import MotionConfig
from polish3d.refine.tomogram import AlignConfig

__all__ = ["OptionError", "RefineConfig", "check_deformation", "check_motion", "default"]

#: the engine record behind each section of a :class:`RefineConfig`
SECTIONS: dict[str, type] = {
    "tomogram": AlignConfig,
    "motion": MotionConfig,
    "deformation": DeformationConfig,
}


class OptionError(InputError):
    """An option value that cannot work, naming the option(s) by their path in the config.

    The message is a template in which ``{0}``, ``{1}``, … stand for the option paths ``names``
    (``"tomogram.r"``, ``"threads"``, …); ``str(error)`` shows the paths, :meth:`worded` any other
    spelling of them (the command line's flags).
    """

    def __init__(self, template: str, *names: str):
        self.template = template
        self.names = names
        super().__init__(self.worded(str))

    def worded(self, name_of: Callable[[str], str]) -> str:
        """The message with every option path written as ``name_of(path)``."""
        text = self.template
        for k, name in enumerate(self.names):
            text = text.replace(f"{{{k}}}", name_of(name))
        return text


def default(path: str) -> Any:
    """The default of an option given by its path: ``"tomogram.r"``, ``"motion.s_vel"``, ``"threads"``."""
    section, _, name = path.rpartition(".")
    cls = SECTIONS[section] if section else RefineConfig
    fld = {f.name: f for f in dataclasses.fields(cls)}[name]
    if fld.default is not dataclasses.MISSING:
        return fld.default
    if fld.default_factory is not dataclasses.MISSING:
        return fld.default_factory()
    raise KeyError(f"{path} has no default")


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """Every option of one refinement run (frozen, hashable, checked when made).

    Attributes:
        tomogram: the per-tomogram refinement (``AlignConfig``; ``box`` and ``r`` in pixels).
        motion: the GP motion model (``MotionConfig``; sigmas in Å), or ``None``: no motion.
        deformation: the 2D image deformation (``DeformationConfig``), or ``None``: none.
        freq_cutoff_ang: explicit resolution cutoff of the reference envelope, Å (negative: off).
        fsc_thresh_width_shells: cosine fall-off of the envelope after the last FSC shell, in
            Fourier shells.
        use_snr_weight: weight shells by the reference SNR (else flat up to the cutoff).
        threads: CPU threads per process (and per Dask worker).
        workers: local Dask worker processes to refine the tomograms on (0: this process).
        scheduler: address of a running Dask scheduler (``tcp://host:8786``); empty: none.
        fsc_check: reconstruct half maps from the input and the refined geometry and report both
            FSCs (about doubles the run time).

    Raises:
        OptionError: a value or combination under which nothing can be refined.
    """

    tomogram: AlignConfig
    motion: MotionConfig | None = None
    deformation: DeformationConfig | None = None
    freq_cutoff_ang: float = -1.0
    fsc_thresh_width_shells: float = 5.0
    use_snr_weight: bool = False
    threads: int = 6
    workers: int = 0
    scheduler: str = ""
    fsc_check: bool = False

    def __post_init__(self) -> None:
        for section in SECTIONS:
            value = getattr(self, section)
            if value is not None:
                object.__setattr__(self, section, _typed(value, section))
        self._check_combinations()
        _check_tomogram(self.tomogram)
        if self.motion is not None:
            check_motion(self.motion)
        if self.deformation is not None:
            check_deformation(self.deformation)
        self._check_run()

    @property
    def box(self) -> int:
        """Box size, tilt-series pixels (``tomogram.box``)."""
        return self.tomogram.box

    @classmethod
    def build(cls, box: int, *, motion: bool | MotionConfig = False,
              deformation: bool | DeformationConfig = False, **options) -> RefineConfig:
        """A config from keywords: the fields of ``AlignConfig`` and of this class by name.

        Args:
            box: ``tomogram.box``, box size in tilt-series pixels (even).
            motion: ``True`` (default motion model), a ``MotionConfig``, or ``False``.
            deformation: ``True`` (default deformation model), a ``DeformationConfig``, or ``False``.
            **options: ``AlignConfig`` fields (``r=8``, ``outer=2``, ``const_a=True``,
                ``blur_px=(2.0,)``…) and run-level fields (``freq_cutoff_ang``, ``threads``…).

        Raises:
            TypeError: an unknown option name.
            OptionError: invalid values.
        """
        tomo_names = {f.name for f in dataclasses.fields(AlignConfig)} - {"box"}
        own_names = {f.name for f in dataclasses.fields(cls)} - set(SECTIONS)
        unknown = sorted(set(options) - tomo_names - own_names)
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)}; expected fields of AlignConfig "
                f"({', '.join(sorted(tomo_names))}) or of RefineConfig ({', '.join(sorted(own_names))})"
            )
        if "blur_px" in options and not isinstance(options["blur_px"], (tuple, list)):
            options["blur_px"] = (options["blur_px"],)
        tomogram = AlignConfig(box=box, **{k: v for k, v in options.items() if k in tomo_names})
        return cls(
            tomogram,
            motion=MotionConfig() if motion is True else (motion or None),
            deformation=DeformationConfig() if deformation is True else (deformation or None),
            **{k: v for k, v in options.items() if k in own_names},
        )

    def _check_combinations(self) -> None:
        t = self.tomogram
        if t.shift_only and self.motion is not None:
            raise OptionError("{0} cannot be combined with {1} (as in RELION)", "tomogram.shift_only",
                              "motion")
        if t.aniso and t.per_tilt_aniso:
            raise OptionError("{0} and {1}: give one (one image distortion per tilt series, or one per "
                              "tilt)", "tomogram.aniso", "tomogram.per_tilt_aniso")
        if (t.aniso or t.per_tilt_aniso) and t.shift_only:
            raise OptionError("{0} refines only per-tilt shifts; it cannot be combined with {1}",
                              "tomogram.shift_only", "tomogram.per_tilt_aniso" if t.per_tilt_aniso
                              else "tomogram.aniso")
        fixed = (t.const_a or t.shift_only) and (t.const_p or t.shift_only) and t.const_s
        fixed = fixed and not (t.aniso or t.per_tilt_aniso)
        if fixed and self.motion is None and self.deformation is None:
            raise OptionError(
                "{0}/{1}, {2} and {3} together leave nothing to refine; drop one of them (or add {4}/{5})",
                "tomogram.const_a", "tomogram.shift_only", "tomogram.const_p", "tomogram.const_s",
                "motion", "deformation",
            )

    def _check_run(self) -> None:
        _finite(self, "freq_cutoff_ang", "fsc_thresh_width_shells")
        _require(self.fsc_thresh_width_shells >= 0, "fsc_thresh_width_shells",
                 self.fsc_thresh_width_shells, "a number of shells >= 0")
        _require(self.threads >= 1, "threads", self.threads, "a number of threads >= 1")
        _require(self.workers >= 0, "workers", self.workers, "a number of workers >= 0")
        if self.workers and self.scheduler:
            raise OptionError("{0} and {1}: give one (a local cluster, or an existing one)",
                              "workers", "scheduler")


# ---------------------------------------------------------------------------------------------
# the checks, one per section (the command line also runs them on sections that are off, so that
# a bad value is never silently ignored)


def _check_tomogram(t: AlignConfig) -> None:
    s = "tomogram"
    if t.box <= 0 or t.box % 2:
        raise OptionError(f"{{0}} {t.box}: the box size must be a positive, even number of pixels",
                          f"{s}.box")
    _finite(t, "r", "range_reg", "cutoff_fract", "srp", "hp", section=s)
    _require(t.r > 0, f"{s}.r", t.r, "a positive CC window half-width (pixels)")
    if not t.r < t.box / 2 - 3:
        raise OptionError(
            f"{{0}} {t.r:g}: the CC window must fit in the box ({{0}} < {{1}}/2 − 3 = "
            f"{t.box / 2 - 3:g} for {{1}} {t.box})", f"{s}.r", f"{s}.box",
        )
    _require(t.it >= 1, f"{s}.it", t.it, "a number of iterations >= 1")
    _require(t.outer >= 1, f"{s}.outer", t.outer, "a number of CC-map passes >= 1")
    _require(t.exact_passes >= 0, f"{s}.exact_passes", t.exact_passes, "a number >= 0")
    _require(len(t.validate_z) == 3 and all(math.isfinite(z) and z > 0 for z in t.validate_z),
             f"{s}.validate_z", t.validate_z, "three positive thresholds (signal, worse, improved)")
    _require(t.range_reg >= 0, f"{s}.range_reg", t.range_reg, "a weight >= 0")
    _require(0 <= t.cutoff_fract < 1, f"{s}.cutoff_fract", t.cutoff_fract, "a fraction in [0, 1)")
    _require(t.min_frame >= 0, f"{s}.min_frame", t.min_frame, "a dose rank >= 0")
    _require(t.max_frame >= -1, f"{s}.max_frame", t.max_frame, "a dose rank >= 0, or -1 (the last)")
    if 0 <= t.max_frame < t.min_frame:
        raise OptionError(
            f"{{0}} {t.min_frame} {{1}} {t.max_frame}: no dose rank is used; expected {{0}} <= {{1}} "
            "(or {1} -1: up to the last)",
            f"{s}.min_frame", f"{s}.max_frame",
        )


def check_motion(m: MotionConfig) -> None:
    """Refuse motion options that cannot work (:class:`OptionError` naming ``motion.<field>``)."""
    _finite(m, "s_vel", "s_div", section="motion")
    _require(m.s_vel > 0, "motion.s_vel", m.s_vel, "a positive velocity sigma (Å per e⁻/Å²)")
    _require(m.s_div > 0, "motion.s_div", m.s_div, "a positive divergence sigma (Å)")
    _require(m.max_ed >= -1, "motion.max_ed", m.max_ed, "a number of eigen-deformations >= 0, or -1 (all)")


def check_deformation(d: DeformationConfig) -> None:
    """Refuse deformation options that cannot work (:class:`OptionError` naming ``deformation.<field>``)."""
    _finite(d, "reg", "shrink", section="deformation")
    _require(d.reg >= 0, "deformation.reg", d.reg, "a weight >= 0")
    _require(d.shrink >= 0, "deformation.shrink", d.shrink, "a weight >= 0")
    _require(min(d.grid) >= 2, "deformation.grid", d.grid, "at least 2 grid points each way")


def _require(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        raise OptionError(f"{{0}} {shown}: expected {expected}", name)


def _finite(record, *names: str, section: str = "") -> None:
    for name in names:
        value = float(getattr(record, name))
        path = f"{section}.{name}" if section else name
        _require(math.isfinite(value), path, value, "a finite number")


def _typed(record, section: str):
    """``record`` with numbers of the types its defaults have (``r=8`` → ``8.0``; lists → tuples).

    Raises:
        OptionError: a whole number was expected and the value has a fraction (or is no number).
    """
    changes = {}
    for fld in dataclasses.fields(record):
        value = getattr(record, fld.name)
        kind = type(fld.default) if fld.default is not dataclasses.MISSING else {"int": int}.get(fld.type)
        try:
            if kind is bool:
                typed = bool(value)
            elif kind is int:
                typed = operator.index(value) if not isinstance(value, float) else _whole(value)
            elif kind is float:
                typed = float(value)
            elif isinstance(value, list):
                typed = tuple(value)
            else:
                continue
        except (TypeError, ValueError):
            expected = "a whole number" if kind is int else "a number"
            raise OptionError(f"{{0}} {value}: expected {expected}",
                              f"{section}.{fld.name}") from None
        if typed is not value:
            changes[fld.name] = typed
    return dataclasses.replace(record, **changes) if changes else record


def _whole(value: float) -> int:
    if not value.is_integer():
        raise ValueError(value)
    return int(value)
