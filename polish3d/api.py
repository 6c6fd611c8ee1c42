"""The Python API of polish3d: two layers, files → files and arrays → arrays.

* :func:`align` refines every tomogram of an optimisation set and writes RELION 5 files (what
  ``polish3d align`` does); its options are one :class:`polish3d.config.RefineConfig` (or the
  keywords :meth:`RefineConfig.build <polish3d.config.RefineConfig.build>` takes).
* :func:`refine_tilt_series` refines one tomogram from in-memory records and arrays; it reads and
  writes no file.
* :func:`read_optimisation_set` loads an optimisation set into those records, so that the array
  layer can be used on real data; :func:`simulate` makes a synthetic set with ground truth and
  :func:`score` measures a refined set against it; :func:`align_fiducials` aligns a tilt series
  from tracked gold beads.

Nothing here prints: results come back as objects with a status and statistics, progress goes to
``logging`` (logger ``"polish3d"``) or an optional callback. Bad input raises
:class:`polish3d.InputError` (the command line turns it into exit code 2).

Units: pixels are tilt-series pixels (``rlnTomoTiltSeriesPixelSize``), lengths in Å, angles in
degrees, doses in e⁻/Å²; frames are those of :mod:`polish3d.geometry` (see
``docs/conventions.md``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from polish3d.driver import AlignInputs, AlignOutcome
from polish3d.errors import InputError
from polish3d.fiducials import FiducialOptions, FiducialResult, align_fiducials
from polish3d.model import Deformation, ParticleData, TiltSeriesData, TomogramResult

if TYPE_CHECKING:
    from polish3d.config import RefineConfig

__all__ = [
    "AlignInputs",
    "AlignOutcome",
    "Deformation",
    "FiducialOptions",
    "FiducialResult",
    "OptimisationSetData",
    "ParticleData",
    "ScoreResult",
    "TiltSeriesData",
    "TomogramResult",
    "align",
    "align_fiducials",
    "read_optimisation_set",
    "refine_tilt_series",
    "score",
    "set_device",
    "simulate",
]

log = logging.getLogger("polish3d")

PathLike = str | os.PathLike

# ---------------------------------------------------------------------------------------------
# device


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk so later runs skip most of the JIT compilation.

    ``POLISH3D_JAX_CACHE`` names the folder (default ``~/.cache/polish3d/jax``); ``off`` disables.
    """
    where = os.environ.get("POLISH3D_JAX_CACHE", str(Path.home() / ".cache" / "polish3d" / "jax"))
    if not where or where.lower() == "off":
        return
    try:
        import jax

        Path(where).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", where)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    except Exception:  # pragma: no cover - a cache is an optimisation, never a failure
        log.debug("no JAX compilation cache at %s", where)


def set_device(platform: Literal["cpu", "gpu", "tpu"]) -> str:
    """Select the JAX platform polish3d computes on.

    Must be called **before any JAX computation** in the process (JAX picks its backend on first
    use; later calls have no effect on arrays already created and may fail). Equivalent to the
    environment variable ``JAX_PLATFORMS`` and to ``polish3d align --device``.

    Args:
        platform: ``"cpu"``, ``"gpu"`` (CUDA or ROCm) or ``"tpu"``.

    Returns:
        The platform JAX computes on from now on (``"cpu"``, ``"gpu"`` or ``"tpu"``).

    Raises:
        InputError: unknown platform, no device of that kind on this machine, or JAX already
            initialised on another platform.
    """
    backend = select_device(platform)
    if backend != platform:
        raise InputError(
            f"device {platform!r}: JAX already computes on {backend!r}; call set_device before "
            "any JAX computation (or set JAX_PLATFORMS before starting Python)"
        )
    return backend


def select_device(device: str) -> str:
    """Make JAX compute on ``device``; returns the backend JAX uses from now on.

    Raises:
        OptionError: ``device`` is not cpu, gpu or tpu, or no such device is usable here (the
            message lists the platforms present).
    """
    import jax

    from polish3d.config import OptionError

    if device not in ("cpu", "gpu", "tpu"):
        raise OptionError(f"{{0}} {device}: expected cpu, gpu or tpu", "device")
    previous = jax.config.jax_platforms
    try:
        jax.config.update("jax_platforms", device)
        jax.devices(device)
    except Exception:  # noqa: BLE001 - JAX says "Unable to initialize backend 'rocm'" and the like
        jax.config.update("jax_platforms", previous)
        present = []
        for platform in ("cpu", "gpu", "tpu"):
            try:
                if jax.devices(platform):
                    present.append(platform)
            except Exception:  # noqa: BLE001
                pass
        raise OptionError(
            f"{{0}} {device}: no {device} device is usable on this machine; available: "
            f"{', '.join(present) or 'none'}", "device",
        ) from None
    return jax.default_backend()


def _config(config: RefineConfig | None, options: Mapping[str, Any]) -> RefineConfig:
    """``config``, or the one :meth:`RefineConfig.build` makes of the keyword options."""
    from polish3d.config import RefineConfig

    if config is None:
        if "box" not in options:
            raise TypeError("give a RefineConfig, or the options by name with at least box=…")
        return RefineConfig.build(**options)
    if options:
        raise TypeError(f"option(s) {', '.join(options)} given with a RefineConfig: set them in the config")
    return config


# ---------------------------------------------------------------------------------------------
# files


@dataclass
class OptimisationSetData:
    """An optimisation set loaded into the records the array layer takes.

    Attributes:
        files: the paths of the set (:class:`polish3d.io.OptimisationSet`).
        tilt_series: ``{rlnTomoName: TiltSeriesData}`` in file order (tomograms with particles).
        particles: ``{rlnTomoName: ParticleData}`` (input motion included when the set has a
            ``motion.star``).
        project_dir: the folder relative paths were resolved against (``None``: the cwd).
    """

    files: Any
    tilt_series: dict[str, TiltSeriesData]
    particles: dict[str, ParticleData]
    project_dir: Path | None = None

    @property
    def names(self) -> list[str]:
        """Tomogram names, in file order."""
        return list(self.tilt_series)

    def stack(self, name: str):
        """``(F, H, W)`` float32 tilt images of one tomogram in file order (memory-mapped view)."""
        from polish3d.io.stacks import StackView

        ts = self.tilt_series[name]
        if not ts.image_files:
            raise InputError(f"{name}: no tilt images listed")
        return StackView(ts.image_files)

    def half_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """The two reference half maps ``[z, y, x]`` (``rlnTomoReferenceMap1/2File``)."""
        from polish3d.io import read_map

        if self.files.ref1 is None or self.files.ref2 is None:
            raise InputError(f"{self.files.source}: no reference half maps in the optimisation set")
        return read_map(self.files.ref1)[0], read_map(self.files.ref2)[0]

    def mask(self) -> np.ndarray | None:
        """The reference mask (``rlnTomoReferenceMaskFile``) or ``None``."""
        from polish3d.io import read_map

        return None if self.files.mask is None else read_map(self.files.mask)[0]

    def fsc(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(rlnSpectralIndex, rlnFourierShellCorrelationCorrected)`` or ``None``."""
        from polish3d.io import read_fsc

        return None if self.files.fsc is None else read_fsc(self.files.fsc)


def read_optimisation_set(
    path: PathLike, *, project_dir: PathLike | None = None, load_images: bool = True
) -> OptimisationSetData:
    """Read a RELION optimisation set (RELION 5, or RELION 4 tomogram sets) into typed records.

    Args:
        path: ``optimisation_set.star``.
        project_dir: the RELION project folder relative paths are relative to (default: the
            current working directory, as RELION; a path not found there is also looked up next
            to the STAR file that names it).
        load_images: require the tilt images and read the image size from their headers (else
            fall back to the tomogram size when images are missing).

    Returns:
        :class:`OptimisationSetData`; positions in tilt-series pixels (tomogram voxels),
        projections ``(F, 4, 4)`` tomogram voxel → tilt-image pixel.

    Raises:
        InputError: missing files, tables or columns (the message names the file).
    """
    from polish3d.io import relion

    pdir = Path(project_dir) if project_dir is not None else None
    opt = relion.read_optimisation_set(path, project_dir=pdir)
    if opt.tomograms_file is None or opt.particles_file is None:
        raise InputError(f"{path}: needs rlnTomoTomogramsFile and rlnTomoParticlesFile")
    tset = relion.read_tomogram_set(opt.tomograms_file, project_dir=pdir)
    pset = relion.read_particle_set(opt.particles_file)
    pset.check_tomograms(tset.names)
    traj = relion.read_trajectories(opt.trajectories_file) if opt.trajectories_file else None
    with_particles = set(pset.tomogram_names())
    tilt_series, particles = {}, {}
    for name in tset.names:
        if name not in with_particles:
            continue
        ts = tset.tilt_series(name, load_images=load_images)
        tilt_series[name] = ts
        particles[name] = pset.for_tomogram(ts, traj, require_half_set=False)
    return OptimisationSetData(opt, tilt_series, particles, pdir)


def align(
    optimisation_set: PathLike | AlignInputs,
    out_dir: PathLike,
    config: RefineConfig | None = None,
    *,
    only_do_unfinished: bool = False,
    **options,
) -> AlignOutcome:
    """Refine every tomogram of an optimisation set and write RELION 5 files to ``out_dir``.

    The same as ``polish3d align --i optimisation_set --o out_dir --b box …``: writes
    ``optimisation_set.star``, ``tomograms.star`` + ``tilt_series/*.star``, ``particles.star``
    (not with ``shift_only``), ``motion.star`` (with motion), ``metrics.json``,
    ``polish3d.log``, ``temp/<tomo>.npz`` and ``RELION_OUTPUT_NODES.star``. Paths inside the
    written STAR files are relative to the current working directory (run from the RELION
    project folder, as RELION does). No pipeline markers are written (the command line does).

    Args:
        optimisation_set: ``optimisation_set.star`` (with the references in it or next to it as
            ``rlnTomoReferenceMap1File``…), or :class:`AlignInputs` naming every file as the
            flags ``--i --p --t --mot --ref1 --ref2 --mask --fsc`` do.
        out_dir: output folder (created).
        config: every option of the run (:class:`polish3d.RefineConfig`); or leave it out and give
            the options by name: ``box`` (pixels, even) and any keyword of
            :meth:`RefineConfig.build <polish3d.config.RefineConfig.build>` (``r=12`` px,
            ``outer=3``, ``const_a=True``, ``motion=polish3d.MotionConfig(s_vel=0.2)``,
            ``freq_cutoff_ang=20``, ``workers=2``…).
        only_do_unfinished: reuse per-tomogram results already in ``out_dir/temp``.

    Returns:
        :class:`AlignOutcome`: ``optimisation_set`` (path written), ``results``
        (``{tomo: TomogramResult}`` with ``metrics``), ``skipped``, ``seconds``, ``status``.

    Raises:
        InputError: invalid options or input files (nothing is refined then); an option is named
            by its path in the config (``tomogram.r``).
        TypeError: an unknown option name, or options given with a ``config``.
    """
    from polish3d.driver import align as align_files

    inputs = (
        optimisation_set
        if isinstance(optimisation_set, AlignInputs)
        else AlignInputs(i=str(optimisation_set))
    )
    outcome = align_files(inputs, out_dir, _config(config, options),
                          only_do_unfinished=only_do_unfinished, write_note=False)
    if any(r.status != "converged" for r in outcome.results.values()):
        outcome.status = "not_converged"
    return outcome


# ---------------------------------------------------------------------------------------------
# arrays


def refine_tilt_series(
    ts: TiltSeriesData,
    particles: ParticleData,
    stack,
    half_maps: tuple[np.ndarray, np.ndarray],
    config: RefineConfig | None = None,
    *,
    mask: np.ndarray | None = None,
    fsc: tuple[np.ndarray, np.ndarray] | np.ndarray | None = None,
    progress: Callable[..., None] | None = None,
    **options,
) -> TomogramResult:
    """Refine the geometry of one tilt series against a reference: arrays in, arrays out.

    Refines every tilt's 5-DOF projection and every particle's 3D position (optionally motion
    and 2D deformation) exactly as :func:`align` does for one tomogram, without reading or
    writing files.

    Args:
        ts: the tilt series (``projections`` tomogram voxel → tilt-image pixel, CTF, dose).
        particles: its particles (positions in tomogram voxels, rotations reference →
            tomogram, ``half_set`` 1/2).
        stack: ``(F, H, W)`` tilt images in the row order of ``ts`` (any array-like supporting
            ``stack[j]`` and fancy indexing, e.g. a NumPy array or memmap).
        half_maps: the two reference half maps ``[z, y, x]`` at the tilt-series pixel size, side
            ``≤ box``.
        config: the options (:class:`polish3d.RefineConfig`; its Dask and ``fsc_check`` options
            do not apply here), or leave it out and give them by name as for :func:`align`:
            ``box`` (pixels, even), ``r`` (pixels, half-width of the CC window), …
        mask: optional soft mask (same shape as the half maps), multiplied into both halves.
        fsc: the reference FSC: ``(spectral_index, fsc)`` or the ``fsc`` column alone
            (shells 0…N−1); ``None``: computed from the (masked) half maps.
        progress: optional callback ``progress(event, **figures)`` (events ``coarse_shift``,
            ``iteration``, ``outer``).

    Returns:
        :class:`TomogramResult`: refined ``projections`` ``(F, 4, 4)``, ``positions_px``
        ``(N, 3)`` (``None`` with ``shift_only``), ``trajectories_px``, ``deformation`` and
        ``status`` (``"converged"`` or ``"not_converged"``) and ``metrics`` (per outer iteration
        cost, L-BFGS iterations, 2D moves in px; per-tilt CC; ``displacement_rms_px``,
        ``seconds``).

    Raises:
        InputError: inconsistent shapes or invalid options.
        TypeError: an unknown option name.
    """
    from polish3d.driver import check_reference_maps
    from polish3d.refine.tomogram import prepare_references
    from polish3d.tomogram_jobs import envelope, refine_arrays

    config = _config(config, options)
    if tuple(np.shape(stack)) != (ts.n_tilts, ts.image_size_px[1], ts.image_size_px[0]):
        raise InputError(
            f"stack is {tuple(np.shape(stack))}, expected (F, H, W) = "
            f"({ts.n_tilts}, {ts.image_size_px[1]}, {ts.image_size_px[0]})"
        )
    if particles.n_particles == 0:
        raise InputError(f"{ts.name}: no particles")
    check_reference_maps(*half_maps, mask)
    refs_ft, (idx, fsc_v) = prepare_references(*half_maps, config.box, mask)
    if isinstance(fsc, tuple):
        idx, fsc_v = (np.asarray(a, np.float64) for a in fsc)
    elif fsc is not None:
        fsc_v = np.asarray(fsc, np.float64)
        idx = np.arange(len(fsc_v))
    weights = envelope(config, idx, fsc_v, ts.pixel_size_ang)
    return refine_arrays(ts, particles, stack, refs_ft, weights, config, progress=progress)


# ---------------------------------------------------------------------------------------------
# simulate / score


def simulate(out_dir: PathLike, *, config=None, reference=None, **options):
    """Simulate a RELION 5 optimisation set with ground truth (``polish3d simulate``).

    Args:
        out_dir: output folder; it becomes a self-contained project (paths relative to it):
            ``optimisation_set.star`` (nominal geometry, references included),
            ``truth/optimisation_set.star`` (true geometry), ``truth/truth.npz``.
        config: a :class:`polish3d.simulate.SimulationConfig`; ``options`` replace its fields.
        reference: optional map (MRC path or ``[z, y, x]`` array at the pixel size, side
            ``≤ box_px``) instead of the built-in ribosome-like phantom.
        **options: fields of :class:`~polish3d.simulate.SimulationConfig` (units in the names),
            e.g. ``n_tomograms=1, n_particles=10, box_px=32, image_size_px=(128, 128),
            tilt_min_deg=-30, tilt_max_deg=30, tilt_step_deg=10, snr=0.05, seed=0``.

    Returns:
        :class:`polish3d.simulate.SimulationResult` (paths, nominal and true records).
    """
    from polish3d.simulate import SimulationConfig
    from polish3d.simulate import simulate as simulate_files

    cfg = config or SimulationConfig()
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"unknown simulation option(s) {', '.join(unknown)}; expected {sorted(fields)}")
    if "image_size_px" in options and np.ndim(options["image_size_px"]) == 0:
        options["image_size_px"] = (int(options["image_size_px"]),) * 2
    cfg = dataclasses.replace(cfg, **options)
    return simulate_files(cfg, out_dir, reference=reference)


@dataclass
class ScoreResult:
    """Reprojection error of a refined set against the truth (:func:`score`).

    Attributes:
        overall: ``{rms, median, p95, max, n}`` of ``|u_refined − u_true|`` over all listed
            particles × tilts (pixels).
        angle_error_deg: the same for the per-tilt camera rotation error after rigid alignment
            of the refined frame to the true one (degrees).
        position_error_px: the same for the 3D particle positions after that alignment (px).
        tomograms: per tomogram (``reprojection``, ``per_tilt_rms``, ``euler_error_deg``, …).
        status: ``"ok"``, or ``"incomplete"`` when some true particles are missing.
    """

    overall: dict
    angle_error_deg: dict
    position_error_px: dict
    tomograms: dict = field(default_factory=dict)
    status: str = "ok"

    @property
    def rms_px(self) -> float:
        """Overall RMS reprojection error (pixels)."""
        return float(self.overall["rms"])

    @property
    def median_px(self) -> float:
        """Overall median reprojection error (pixels)."""
        return float(self.overall["median"])

    def as_dict(self) -> dict:
        """The result as JSON-serialisable dict (the format of ``polish3d score --json``)."""
        return {
            "overall": self.overall,
            "angle_error_deg": self.angle_error_deg,
            "position_error_px": self.position_error_px,
            "tomograms": self.tomograms,
        }

    def table(self) -> str:
        """A short human-readable table (what ``polish3d score`` prints)."""
        from polish3d.score import format_table

        return format_table(self.as_dict())


def score(refined: PathLike, truth: PathLike) -> ScoreResult:
    """Score a refined optimisation set against the ground truth (``polish3d score``).

    Projected 2D positions are compared per particle (matched by ``rlnTomoParticleName``) and
    tilt (matched by row); this is gauge-invariant. See :mod:`polish3d.score`.

    Args:
        refined: the refined ``optimisation_set.star``.
        truth: the true one (``<simulation>/truth/optimisation_set.star``).

    Returns:
        :class:`ScoreResult` (pixels; angles in degrees). Identical sets score exactly 0.
    """
    from polish3d.score import score as score_files

    try:
        d = score_files(refined, truth)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    missing = any(t.get("n_missing", 0) for t in d["tomograms"].values())
    return ScoreResult(
        overall=d["overall"],
        angle_error_deg=d["angle_error_deg"],
        position_error_px=d["position_error_px"],
        tomograms=d["tomograms"],
        status="incomplete" if missing else "ok",
    )

