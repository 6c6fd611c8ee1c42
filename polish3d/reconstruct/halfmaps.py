"""Half maps of an optimisation set: the tomograms inserted one after another, the maps
finished, their FSC; :func:`half_map_fsc` for before/after comparisons; writing the maps and
``fsc.star``."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from polish3d.errors import InputError
from polish3d.reconstruct.insertion import backproject_tomogram, new_accumulators
from polish3d.reconstruct.maps import finish_map, fsc_resolution_ang, masked_fsc
from polish3d.reconstruct.options import Reconstruction, ReconstructOptions

__all__ = ["format_fsc_table", "half_map_fsc", "reconstruct", "with_results", "write_reconstruction"]

log = logging.getLogger("polish3d")


def _load(source, project_dir=None):
    from polish3d.api import OptimisationSetData, read_optimisation_set

    if isinstance(source, OptimisationSetData):
        return source
    p = Path(source)
    if not p.is_file():
        raise InputError(f"--i {source}: optimisation set not found")
    return read_optimisation_set(p, project_dir=project_dir)


def _insert_all(data, options: ReconstructOptions):
    """Every tomogram of ``data`` inserted into one pair of half-set accumulators.

    Returns ``(accumulators, pairs per half (2,), particles per half (2,), pixel size Å)``.

    Raises:
        InputError: tomograms of different pixel sizes, or no pair visible at all.
    """
    acc = new_accumulators(options.box)
    pairs = np.zeros(2, int)
    parts = np.zeros(2, int)
    px = None
    for name, ts in data.tilt_series.items():
        part = data.particles[name]
        if part.n_particles == 0:
            continue
        if px is not None and abs(ts.pixel_size_ang - px) > 1e-6 * px:
            raise InputError(
                f"{name}: rlnTomoTiltSeriesPixelSize {ts.pixel_size_ang:g} differs from "
                f"{px:g} Å of the other tomograms; reconstruct them separately"
            )
        px = ts.pixel_size_ang
        acc, n_pairs, n_parts = backproject_tomogram(ts, part, data.stack(name), options, acc)
        pairs += n_pairs
        parts += n_parts
        log.info(
            "%s: %d particles, %d + %d particle-tilt pairs inserted", name, part.n_particles,
            *n_pairs,
        )
    if px is None or pairs.sum() == 0:
        raise InputError(
            "no particle is visible in any tilt (box --b too large for the images, or no particles)"
        )
    return acc, pairs, parts, px


def _finish_halves(acc, options: ReconstructOptions):
    """``(half1, half2, merged, full)`` maps from the accumulators (``full``: the uncropped
    maps by name when ``crop`` is set, else empty)."""
    shape = (options.box, options.box, options.box // 2 + 1)
    a = np.asarray(acc).reshape(2, *shape, 3)
    acc_d = a[..., 0] + 1j * a[..., 1].astype(np.complex128)
    acc_w = a[..., 2]
    h1, f1 = finish_map(acc_d[0], acc_w[0], options)
    h2, f2 = finish_map(acc_d[1], acc_w[1], options)
    mg, fm = finish_map(acc_d[0] + acc_d[1], acc_w[0] + acc_w[1], options)
    full = {"half1": f1, "half2": f2, "merged": fm} if options.crop > 0 else {}
    return h1, h2, mg, full


def reconstruct(
    source,
    options: ReconstructOptions | None = None,
    *,
    mask: np.ndarray | None = None,
    project_dir=None,
    **kwargs,
) -> Reconstruction:
    """Reconstruct the two half maps (and their merge) of every particle of an optimisation set.

    Args:
        source: ``optimisation_set.star`` (tilt series, particles, optional motion), or an
            :class:`polish3d.api.OptimisationSetData` — e.g. one whose ``tilt_series`` /
            ``particles`` were replaced by refined geometry (``dataclasses.replace``).
        options: :class:`ReconstructOptions`; or give its fields as keywords (``box=64``,
            ``snr=…``).
        mask: optional real-space mask (``out_box³``) multiplied into both half maps before
            the FSC (the written maps are not masked).
        project_dir: folder relative paths are resolved against (default: the cwd, then next
            to the STAR file naming them).

    Returns:
        :class:`Reconstruction` (maps in output pixels, FSC and resolution at 0.143).

    Raises:
        InputError: bad options, missing files, no particle visible in any tilt.
    """
    t0 = time.perf_counter()
    if options is None:
        options = ReconstructOptions(**kwargs)
    elif kwargs:
        options = dataclasses.replace(options, **kwargs)
    acc, pairs, parts, px = _insert_all(_load(source, project_dir), options)
    h1, h2, mg, full = _finish_halves(acc, options)
    out_px = px * options.binning
    n_out = options.out_box
    if pairs[0] > 0 and pairs[1] > 0:
        fsc = masked_fsc(h1, h2, mask)
        res = fsc_resolution_ang(fsc, n_out, out_px)
    else:
        log.warning("one half set is empty (rlnRandomSubset): no FSC")
        fsc = np.full(n_out // 2 + 1, np.nan)
        res = float("nan")
    return Reconstruction(
        half1=h1, half2=h2, merged=mg, pixel_size_ang=float(out_px), fsc=fsc,
        resolution_ang=res, n_pairs=(int(pairs[0]), int(pairs[1])),
        n_particles=(int(parts[0]), int(parts[1])), seconds=time.perf_counter() - t0, full=full,
    )


def with_results(data, results):
    """``data`` (:class:`polish3d.api.OptimisationSetData`) with the refined geometry of
    ``results`` (``{rlnTomoName: TomogramResult}``, as ``polish3d align`` produces): projections,
    and where not ``None`` positions, trajectories and deformation. Tomograms without a result
    keep their input geometry; ``data`` itself is not modified."""
    tilt_series = dict(data.tilt_series)
    particles = dict(data.particles)
    for name, res in results.items():
        if name not in tilt_series:
            raise InputError(f"tomogram {name!r} of the results is not in {data.files.source}")
        ts = tilt_series[name].replace(projections=np.asarray(res.projections, np.float64))
        if res.deformation is not None:
            ts = ts.replace(deformation=res.deformation)
        part = particles[name]
        if res.positions_px is not None:
            part = part.replace(positions_px=np.asarray(res.positions_px, np.float64))
        if res.trajectories_px is not None:
            part = part.replace(trajectories_px=np.asarray(res.trajectories_px, np.float64))
        tilt_series[name], particles[name] = ts, part
    return dataclasses.replace(data, tilt_series=tilt_series, particles=particles)


def half_map_fsc(
    source, box: int, *, results=None, mask: np.ndarray | None = None, project_dir=None,
    **options,
) -> tuple[np.ndarray, float]:
    """Half-map FSC of the particles of an optimisation set (for before/after reports).

    Reconstructs both half maps exactly as ``polish3d reconstruct`` does and returns the FSC
    per shell (``box//2 + 1`` values, shell ``k`` at ``k / (box · px)`` Å⁻¹) and the resolution
    (Å) at FSC 0.143. With the same ``box`` and options, a better geometry gives a higher FSC.

    Args:
        source: ``optimisation_set.star`` or :class:`polish3d.api.OptimisationSetData` (replace
            its ``tilt_series`` / ``particles`` to score in-memory geometry).
        box: box size (px, even).
        results: optional ``{rlnTomoName: TomogramResult}``: score this refined geometry
            instead of the set's own (see :func:`with_results`).
        mask: optional ``(box, box, box)`` real-space mask applied before the FSC.
        project_dir: see :func:`reconstruct`.
        **options: other :class:`ReconstructOptions` fields (``snr``, ``max_dose``, ``chunk``…).

    Returns:
        ``(fsc, resolution_ang)``.
    """
    if results is not None:
        source = with_results(_load(source, project_dir), results)
    rec = reconstruct(source, ReconstructOptions(box=int(box), **options), mask=mask,
                      project_dir=project_dir)
    return rec.fsc, rec.resolution_ang


def write_reconstruction(rec: Reconstruction, out_dir) -> dict[str, Path]:
    """Write ``half1.mrc``, ``half2.mrc``, ``merged.mrc`` (and ``*_full.mrc`` after ``crop``) and
    ``fsc.star`` (table ``fsc``: ``rlnSpectralIndex``, ``rlnResolution`` Å⁻¹,
    ``rlnAngstromResolution``, ``rlnFourierShellCorrelation``; table ``general``:
    ``rlnFinalResolution`` Å at 0.143), all atomically, pixel size in the MRC headers.

    Returns:
        ``{name: path}`` of the files written.
    """
    import pandas as pd

    from polish3d.io import write_map
    from polish3d.io.star import write_star

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    px = rec.pixel_size_ang
    paths = {}
    for tag in ("half1", "half2", "merged"):
        paths[tag] = write_map(out / f"{tag}.mrc", getattr(rec, tag), px)
    for tag, vol in rec.full.items():
        paths[tag + "_full"] = write_map(out / f"{tag}_full.mrc", vol, px)
    k = rec.shells
    n = len(rec.half1)
    with np.errstate(divide="ignore"):
        res = np.where(k > 0, n * px / np.maximum(k, 1), 999.0)
    general = {
        "rlnFinalResolution": float(rec.resolution_ang),
        "rlnPixelSize": float(px),
        "rlnImageSize": int(n),
    }
    paths["fsc"] = write_star(
        out / "fsc.star",
        {
            "general": general,
            "fsc": pd.DataFrame(
                {
                    "rlnSpectralIndex": k.astype(int),
                    "rlnResolution": k / (n * px),
                    "rlnAngstromResolution": res,
                    "rlnFourierShellCorrelation": np.asarray(rec.fsc, np.float64),
                }
            ),
        },
    )
    return paths


def format_fsc_table(rec: Reconstruction) -> str:
    """The FSC per shell as a short text table, then the resolution line."""
    lines = [f"{'shell':>5} {'1/A':>9} {'A':>8} {'FSC':>7}"]
    n = len(rec.half1)
    for k, v in zip(rec.shells, rec.fsc, strict=True):
        res = n * rec.pixel_size_ang / k if k else float("inf")
        lines.append(f"{k:>5d} {k / (n * rec.pixel_size_ang):>9.5f} {res:>8.2f} {v:>7.4f}")
    lines.append(
        f"resolution at FSC 0.143: {rec.resolution_ang:.2f} A  ({rec.n_pairs[0]} + "
        f"{rec.n_pairs[1]} particle-tilt pairs, {rec.seconds:.1f} s)"
    )
    return "\n".join(lines)
