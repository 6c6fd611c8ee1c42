"""Pins for statements of docs/conventions.md that no other test pins.

* the particle rotation ``M`` maps reference → tomogram and ``P_j[:3,:3]·M`` reference → tilt
  image; particles are dark, so the CC ``−Y·conj(S)`` is positive at the true position
  (checked on the convention-check fixture, a RELION 5 project whose images RELION aligns;
  tests/data/convention-check holds its five lowest-dose tilt images and cropped maps);
* tilt stacks are indexed ``[j, y, x]``;
* RELION's own Euler writer (float centres) drifts for odd sizes, polish3d's writer does not;
* the Fourier layout: ``rfft`` order, phase origin at ``s//2``, unitary scaling.
* every test the docs cite exists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from polish3d import geometry as g

CC = Path(__file__).resolve().parent / "data" / "convention-check"


@pytest.fixture(scope="module")
def fixture_truth():
    """Truth geometry, ``{tilt row: image}`` of the bundled low-dose tilts, half map, mask."""
    from polish3d.io import open_stack, read_map, read_optimisation_set, read_particle_set, read_tomogram_set

    opt = read_optimisation_set(CC / "Truth/optimisation_set.star", project_dir=CC)
    ts = read_tomogram_set(opt.tomograms_file, project_dir=CC).tilt_series("TS_01", load_images=False)
    parts = read_particle_set(opt.particles_file).for_tomogram(ts)
    # the stack holds the images of the lowest-dose rows, in table order
    low = open_stack(CC / "tilt_series/TS_01_lowdose.mrcs")
    rows = np.sort(g.dose_order(ts.pre_exposure_e_per_ang2)[: low.shape[0]])
    images = {int(j): np.asarray(low[k], np.float32) for k, j in enumerate(rows)}
    half1 = read_map(CC / "reference/half1.mrc")[0]
    mask = read_map(CC / "reference/mask.mrc")[0]
    return ts, parts, images, half1, mask


def _mean_cc(ts, parts, stack, half1, mask, rotations, tilts, positions=None) -> float:
    """Mean normalised CC ``Re Σ −Y·conj(S) / (|Y||S|)`` (low-passed) over particles × tilts."""
    import jax
    import jax.numpy as jnp

    from polish3d import imaging as im

    box = 64
    ref = im.prepare_reference(half1, box, mask)
    k = np.asarray(im.radius_2d(box))
    lowpass = (k > 1) & (k < box * ts.pixel_size_ang / 25.0)  # 25 Å
    uv = g.project_points(ts.projections, parts.positions_px) if positions is None else positions
    slicer = jax.jit(jax.vmap(im.central_slice, in_axes=(None, 0, None)), static_argnums=2)
    out = []
    for j in tilts:
        rot = np.einsum("ij,njk->nik", ts.projections[j, :3, :3], rotations)
        ctf = im.ctf_2d(box, ts.pixel_size_ang, ts.defocus_u_ang[j], ts.defocus_v_ang[j],
                        ts.defocus_angle_deg[j], ts.voltage_kv, ts.cs_mm, ts.amplitude_contrast)
        s = slicer(ref, jnp.asarray(rot, jnp.float32), box) * ctf
        img = np.asarray(stack[j], np.float32)
        for n in range(len(rot)):
            y = np.asarray(im.extract_observation(img, uv[j, n], box))[lowpass]
            sn = np.asarray(s[n])[lowpass]
            norm = np.sqrt(np.sum(np.abs(y) ** 2) * np.sum(np.abs(sn) ** 2))
            out.append(np.real(np.sum(-y * np.conj(sn))) / norm)
    return float(np.mean(out))


def test_particle_orientation_and_cc_sign_on_fixture(fixture_truth):
    """``P·M`` (not ``P·Mᵀ``) predicts the particle; the CC with the minus sign is positive."""
    ts, parts, stack, half1, mask = fixture_truth
    tilts = sorted(stack)  # the bundled low-dose tilts
    assert len(tilts) == 5
    sub = slice(0, 12)
    p = parts.replace(positions_px=parts.positions_px[sub], rotations=parts.rotations[sub])
    right = _mean_cc(ts, p, stack, half1, mask, p.rotations, tilts)
    transposed = _mean_cc(ts, p, stack, half1, mask, np.swapaxes(p.rotations, -1, -2), tilts)
    assert right > 0.05, right
    assert right > 2.0 * abs(transposed), (right, transposed)
    # [y, x] indexing: reading the stack as [x, y] (positions swapped) loses the signal
    uv = g.project_points(ts.projections, p.positions_px)
    swapped = _mean_cc(ts, p, stack, half1, mask, p.rotations, tilts, positions=uv[..., ::-1])
    assert right > 2.0 * abs(swapped), (right, swapped)


def _relion_writer_shifts(p, *, pixel_size_ang, image_size_px, tomo_size_px):
    """RELION 5's ``getProjectionAnglesFromMatrix`` shifts: float tomogram centre (issue #1280)."""
    e = g.projection_to_euler(p, pixel_size_ang=pixel_size_ang, image_size_px=image_size_px,
                              tomo_size_px=tomo_size_px)
    c = np.asarray(tomo_size_px, float) / 2.0
    r = g.rot_z(e["rlnTomoZRot"]) @ g.rot_y(e["rlnTomoYTilt"]) @ g.rot_x(e["rlnTomoXTilt"])
    c_img = np.array([image_size_px[0] // 2, image_size_px[1] // 2, 0.0])
    # S = P · T(c) · R⁻¹ · T(−c_img); (sx, sy) = px · S[:2, 3]
    s = [p[k] @ _t(c) @ _r4(r[k].T) @ _t(-c_img) for k in range(len(p))]
    return e, np.array([m[:2, 3] for m in s]) * pixel_size_ang


def _t(v):
    m = np.eye(4)
    m[:3, 3] = v
    return m


def _r4(r):
    m = np.eye(4)
    m[:3, :3] = r
    return m


@pytest.mark.parametrize(("tomo", "drift"), [((256, 256, 128), False), ((255, 257, 77), True)])
def test_relion_writer_drifts_for_odd_sizes_polish3d_does_not(tomo, drift):
    kw = dict(pixel_size_ang=8.0, image_size_px=(256, 256), tomo_size_px=tomo)
    f = 11
    rng = np.random.default_rng(0)
    p = g.projection_from_euler(rng.normal(0, 1, f), np.linspace(-60, 60, f), 85 + rng.normal(0, 1, f),
                                rng.normal(0, 40, f), rng.normal(0, 40, f), **kw)
    x = np.array([[40.0, 200.0, 30.0], [128.0, 128.0, 64.0]])
    labels = ("rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot", "rlnTomoXShiftAngst", "rlnTomoYShiftAngst")
    # polish3d: write (P → columns) then read (columns → P) is exact for any size
    ours = g.projection_to_euler(p, **kw)
    p_ours = g.projection_from_euler(*(ours[k] for k in labels), **kw)
    np.testing.assert_allclose(g.project_points(p_ours, x), g.project_points(p, x), atol=1e-9)
    # RELION's writer: exact for even sizes, moves projected points by up to 0.5 px per odd axis
    e, s = _relion_writer_shifts(p, **kw)
    p_rel = g.projection_from_euler(e["rlnTomoXTilt"], e["rlnTomoYTilt"], e["rlnTomoZRot"],
                                    s[:, 0], s[:, 1], **kw)
    moved = np.abs(g.project_points(p_rel, x) - g.project_points(p, x)).max()
    if drift:
        assert 0.1 < moved <= 0.5 * np.sqrt(3) + 1e-9
    else:
        assert moved < 1e-9


def test_fourier_layout_phase_origin_and_unitary():
    """``rfft2c`` = unitary ``numpy.fft.rfft2`` with the phase origin moved to pixel ``s//2``."""
    from polish3d import imaging as im

    s = 16
    rng = np.random.default_rng(1)
    img = rng.normal(size=(s, s)).astype(np.float32)
    f = np.asarray(im.rfft2c(img))
    assert f.shape == (s, s // 2 + 1)
    kx = np.arange(s // 2 + 1)[None, :]
    ky = (np.fft.fftfreq(s) * s)[:, None]  # [ky, kx] in fftfreq order
    np.testing.assert_allclose(f, np.fft.rfft2(img, norm="ortho") * (-1.0) ** (kx + ky), atol=1e-5)
    # a delta at the box centre (s//2, s//2) has a flat, real spectrum 1/s
    delta = np.zeros((s, s), np.float32)
    delta[s // 2, s // 2] = 1.0
    np.testing.assert_allclose(np.asarray(im.rfft2c(delta)), np.full((s, s // 2 + 1), 1.0 / s), atol=1e-7)
    # unitary: Parseval on the full plane (half-plane columns 1..s/2−1 count twice)
    w = np.ones(s // 2 + 1)
    w[1 : s // 2] = 2.0
    assert np.sum(w * np.abs(f) ** 2) == pytest.approx(np.sum(img.astype(np.float64) ** 2), rel=1e-5)


def test_docs_name_existing_tests():
    """Every ``tests/<file>::<test>`` that docs/*.md cite as a pin exists."""
    import re

    root = Path(__file__).resolve().parents[1]
    refs = set()
    for md in (root / "docs").glob("*.md"):
        refs |= set(re.findall(r"tests/(test_\w+\.py)::(\w+)", md.read_text()))
    assert len(refs) >= 30
    missing = [f"{f}::{t}" for f, t in sorted(refs)
               if not re.search(rf"^def {t}\(", (root / "tests" / f).read_text(), re.M)]
    assert not missing, missing
