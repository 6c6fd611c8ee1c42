"""The information limit of the default accuracy scenario: Cramér–Rao bound of the reprojection RMS.

Usage::

    python benchmarks/bench_information_limit.py [--work DIR] [--snr 0.5,0.05]

For the default simulation of ``bench_accuracy.py`` (``polish3d simulate`` defaults; one run per
SNR) and each tomogram, at the **true** geometry:

* every listed particle–tilt pair whose box lies in the image contributes the Fisher information
  of its 2D position ``u_pf``: the exact particle image of the simulator (the phantom's central
  slice × CTF at depth × dose, masked as rendered) is differentiated with ``jax.jacfwd`` with
  respect to its sub-pixel shift, ``I_pf = Σ_k c_k θ_k θ_kᵀ w(k) |S_pf(k)|²`` (``θ = 2πk/s``, unitary
  FFT, ``c_k`` the half-plane multiplicity);
* the pairs' positions depend on the parameters (per tilt 3 small rotations about the projected
  tomogram centre + 2 shifts; per particle its 3D position): ``G = ∂u/∂θ`` from ``jax.jacfwd`` of
  the forward model (:func:`polish3d.refine.forward.predict`);
* ``F = Σ_pf G_pfᵀ I_pf G_pf`` over all parameters. ``F`` has the 6-dimensional null space of the
  gauge (a rigid motion of all particles compensated by all tilts); the pseudo-inverse fixes it
  (every pair's ``u`` is gauge-invariant, so ``G F⁺ Gᵀ`` does not depend on how it is fixed);
* the predicted RMS is ``sqrt(mean_pf trace(G_pf Cov G_pfᵀ))`` over every listed pair (the
  figure ``polish3d score`` reports), for the full refinement and for the *oracle* (true tilts,
  positions only: ``Cov_p = (Σ_f G_pfᵀ I_pf G_pf)⁻¹`` per particle).

Three noise models:

* ``crb``: the data's own noise (white, the simulator's σ per pixel: ``w = 1/σ²``), the exact
  particle signal: the Cramér–Rao bound, what no unbiased estimator beats on these images;
* ``model``: the final stage's likelihood — noise power = the estimated spectra
  (``imaging.noise_spectra``, tilt average; they include the particles' own power), only the
  frequencies the weights keep;
* ``polish3d``: the asymptotic covariance of the estimator polish3d actually runs (it maximises
  the CC ``Re Σ_k W_f(k) Y(k) conj S(k)`` with its weights ``W_f``: whitening by the estimated
  spectra × FSC envelope × cutoffs) on data with the true white noise: the sandwich ``A⁺ B A⁺`` with
  ``A = Σ Gᵀ (Σ_k c θθᵀ W |S|²) G`` and ``B = σ² Σ Gᵀ (Σ_k c θθᵀ W² |S|²) G``.

None of them includes what the independent-pair model leaves out (neighbours overlapping in the
boxes, noise in the reference half maps, the reference's own errors): the difference between
the ``polish3d`` figure and the measured RMS is that part.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _simulation(work: Path, snr: float):
    from polish3d.simulate import SimulationConfig, simulate

    out = work / f"snr{snr:g}"
    if not (out / "truth" / "truth.npz").exists():
        simulate(SimulationConfig(snr=snr), out)
    return out


def _config_from(npz):
    from polish3d.simulate import SimulationConfig

    raw = json.loads(str(npz["config_json"]))
    return SimulationConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def pair_spectra(cfg, npz, name: str, projections: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """``(N, F, s, s//2+1)`` unitary spectra of every listed particle's exact image in every tilt,
    rendered as the simulator renders it (dark, masked, at a whole-pixel position)."""
    from polish3d import imaging as im
    from polish3d.simulate.reference import load_reference

    box, px = int(cfg.box_px), float(cfg.pixel_size_ang)
    ref_ft = im.prepare_reference(jnp.asarray(load_reference(None, cfg)), box)
    mask = jnp.asarray(im.circle_mask(box)[0])
    n = rotations.shape[0]
    dz = np.asarray(npz[f"{name}/depth_defocus_ang"])[:, :n]  # (F, N)
    du = np.asarray(npz[f"{name}/defocus_u_ang"])[:, None] + dz
    dv = np.asarray(npz[f"{name}/defocus_v_ang"])[:, None] + dz
    ang = np.asarray(npz[f"{name}/defocus_angle_deg"])
    pre = np.asarray(npz["pre_exposure"])

    def one(rot, du_, dv_, ang_, dose):
        ctf = im.ctf_2d(box, px, du_, dv_, ang_, cfg.voltage_kv, cfg.cs_mm, cfg.amplitude_contrast)
        s = (im.central_slice(ref_ft, rot, box) * ctf * dose).at[0, 0].set(0.0)
        patch = -im.irfft2c(s, box) * mask
        return jnp.fft.rfft2(patch, norm="ortho")

    @jax.jit
    def tilt(rots, du_, dv_, ang_, pre_):
        dose = im.dose_weights(box, px, pre_)
        return jax.vmap(one, in_axes=(0, 0, 0, None, None))(rots, du_, dv_, ang_, dose)

    cam = np.einsum("fij,njk->fnik", projections[:, :3, :3], rotations).astype(np.float32)
    out = [np.asarray(tilt(cam[j], du[j].astype(np.float32), dv[j].astype(np.float32),
                           np.float32(ang[j]), np.float32(pre[j]))) for j in range(len(pre))]
    return np.stack(out, axis=1)  # (N, F, s, sh)


def _shift_moments(box: int):
    """``(s, sh, 2, 2)``: ``c_k θ θᵀ`` of every half-plane frequency (``θ = 2πk/s``; Nyquist 0)."""
    kx = np.arange(box // 2 + 1, dtype=np.float64)
    ky = np.fft.fftfreq(box) * box
    c = np.full(kx.shape, 2.0)
    c[0] = 1.0
    c[-1] = 0.0
    c = c[None, :] * (np.abs(ky) < box / 2)[:, None]
    th = np.stack(np.broadcast_arrays(2 * np.pi * kx[None, :] / box, 2 * np.pi * ky[:, None] / box), -1)
    return c[..., None, None] * th[..., :, None] * th[..., None, :]


def pair_information(spectra: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``(N, F, 2, 2)``: ``Σ_k c_k θθᵀ w_f(k) |S_pf(k)|²`` (``weight (F, s, sh)`` or ``(s, sh)``).

    The information about a pair's 2D shift of Gaussian noise of power ``1/w``; the same sum is the
    curvature (``w = W``) and the gradient variance (``w = σ²W²``) of a weighted CC."""
    mom = _shift_moments(spectra.shape[-2])
    w = np.broadcast_to(weight, spectra.shape[1:])
    return np.einsum("nfyx,fyx,yxab->nfab", np.abs(spectra) ** 2, w, mom)


def geometry_jacobian(projections: np.ndarray, positions: np.ndarray, centre: np.ndarray,
                      angle_unit: float) -> np.ndarray:
    """``(N, F, 2, 5F + 3N)``: ``∂u_pf/∂(tilt angles, tilt shifts, positions)`` at the given geometry
    (the forward model :func:`polish3d.refine.forward.predict`; per tilt 3 small rotations of the
    camera frame about the projected tomogram centre, in units of ``angle_unit`` rad, + 2 shifts)."""
    from polish3d.refine import forward

    f, n = projections.shape[0], positions.shape[0]
    p = np.asarray(projections, np.float64)
    c_cam = np.einsum("fij,j->fi", p[:, :3, :3], np.asarray(centre, np.float64)) + p[:, :3, 3]

    def u_of(theta):
        omega = theta[: 3 * f].reshape(f, 3) * angle_unit
        shift = theta[3 * f : 5 * f].reshape(f, 2)
        x = positions + theta[5 * f :].reshape(n, 3)
        u, depth = forward.predict(p, jnp.broadcast_to(x[:, None, :], (n, f, 3)))
        q = jnp.concatenate([u, depth[..., None]], -1) - c_cam[None]
        return u + jnp.cross(jnp.broadcast_to(omega[None], q.shape), q)[..., :2] + shift[None]

    with jax.enable_x64(True):
        return np.asarray(jax.jacfwd(u_of)(jnp.zeros(5 * f + 3 * n, jnp.float64)), np.float64)


def _pinv(a: np.ndarray, gauge: int = 6) -> np.ndarray:
    """Pseudo-inverse of a symmetric PSD matrix without its ``gauge`` smallest eigen-directions."""
    vals, vecs = np.linalg.eigh(a)
    if not vals[gauge - 1] < 1e-9 * vals[-1] < vals[gauge]:
        raise RuntimeError(f"expected a {gauge}-dimensional gauge null space; eigenvalues {vals[:gauge + 2]}")
    keep = np.arange(len(vals)) >= gauge
    return (vecs[:, keep] / vals[keep]) @ vecs[:, keep].T


def predicted_rms(jac: np.ndarray, info: np.ndarray, noise: np.ndarray | None = None) -> tuple[float, float]:
    """``(full, positions only)`` predicted reprojection RMS (px).

    ``info (N, F, 2, 2)``: per-pair curvature; ``noise``: per-pair gradient covariance for the
    sandwich ``A⁺ B A⁺`` (``None``: the Fisher case, ``B = A``)."""
    n, f = info.shape[:2]
    g = jac.reshape(n * f, 2, -1)
    rows = g.reshape(2 * n * f, -1)  # one row per pair and axis

    def gram(m):  # Σ_pf G_pfᵀ m_pf G_pf
        return rows.T @ np.einsum("kab,kbj->kaj", m.reshape(n * f, 2, 2), g).reshape(2 * n * f, -1)

    a_inv = _pinv(gram(info))
    cov = a_inv if noise is None else a_inv @ gram(noise) @ a_inv
    full = float(np.sqrt(np.sum((rows @ cov) * rows) / (n * f)))
    gp = jac[..., 5 * f :].reshape(n, f, 2, n, 3)[np.arange(n), :, :, np.arange(n), :]  # (N, F, 2, 3)
    ap = np.einsum("nfai,nfab,nfbj->nij", gp, info, gp)
    ap_inv = np.linalg.inv(ap)
    cp = ap_inv if noise is None else ap_inv @ np.einsum("nfai,nfab,nfbj->nij", gp, noise, gp) @ ap_inv
    oracle = float(np.sqrt(np.einsum("nfai,nij,nfaj->", gp, cp, gp) / (n * f)))
    return full, oracle


def tomogram_bounds(project: Path, name: str) -> dict:
    """The three predicted RMS pairs (full, oracle) of one simulated tomogram."""
    import polish3d.api as api
    from polish3d import geometry, imaging
    from polish3d.config import RefineConfig
    from polish3d.refine import forward, stages
    from polish3d.refine.tomogram import prepare_references, prepare_tomogram_constants
    from polish3d.tomogram_jobs import envelope

    npz = np.load(project / "truth" / "truth.npz")
    cfg = _config_from(npz)
    box = int(cfg.box_px)
    truth = api.read_optimisation_set(project / "truth" / "optimisation_set.star", project_dir=project)
    ts, parts = truth.tilt_series[name], truth.particles[name]
    stack = np.asarray(truth.stack(name))
    sigma = float(npz[f"{name}/noise_sigma"])
    proj = np.asarray(ts.projections, np.float64)
    x = np.asarray(parts.positions_px, np.float64)
    # the refinement's weights, as the driver builds them for this set
    rc = RefineConfig.build(box=box, r=20)
    refs_ft, (idx, fsc) = prepare_references(*truth.half_maps(), box, truth.mask())
    if truth.fsc() is not None:
        idx, fsc = truth.fsc()
    env = envelope(rc, idx, fsc, ts.pixel_size_ang)
    const = prepare_tomogram_constants(ts, stack, refs_ft, env, rc.tomogram)
    weights = np.asarray(const.weights, np.float64)  # (F, s, sh)
    mean_power = imaging.noise_spectra(stack, box).mean(0).astype(np.float32)
    noise_hat = np.asarray(imaging.radial_expand(mean_power, box), np.float64)  # (s, sh)

    spectra = pair_spectra(cfg, npz, name, proj, np.asarray(parts.rotations, np.float64))
    u, _ = forward.predict_host(proj, np.broadcast_to(x[:, None], (len(x), ts.n_tilts, 3)))
    visible = stages.visible_boxes(u, ts.image_size_px, box)  # (N, F)
    radius = 0.5 * float(np.hypot(*ts.image_size_px))
    jac = geometry_jacobian(proj, x, geometry.tomogram_centre_px(ts.tomo_size_px), 1.0 / radius)
    vis = visible[..., None, None]
    info_true = pair_information(spectra, np.full(weights.shape[1:], 1.0 / sigma**2)) * vis
    info_model = pair_information(spectra, np.where(weights > 0, 1.0 / noise_hat[None], 0.0)) * vis
    curv = pair_information(spectra, weights) * vis
    grad_var = pair_information(spectra, sigma**2 * weights**2) * vis
    return {
        "crb": predicted_rms(jac, info_true),
        "model": predicted_rms(jac, info_model),
        "polish3d": predicted_rms(jac, curv, grad_var),
        "pairs": int(visible.sum()),
        "sigma": sigma,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench_information_limit_work")
    ap.add_argument("--snr", default="0.5,0.05")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'snr':>6} {'tomogram':>9} {'pairs':>6} {'sigma':>7} | predicted RMS px (full / oracle): "
          f"{'crb':>15} {'model':>15} {'polish3d':>15} | s", flush=True)
    for snr in (float(s) for s in args.snr.split(",")):
        project = _simulation(work, snr)
        rows = []
        for name in ("TS_01", "TS_02"):
            t0 = time.perf_counter()
            r = tomogram_bounds(project, name)
            rows.append(r)
            print(f"{snr:>6g} {name:>9} {r['pairs']:>6} {r['sigma']:>7.3f} | " + " ".join(
                f"{r[k][0]:>7.4f}/{r[k][1]:.4f}" for k in ("crb", "model", "polish3d"))
                + f" | {time.perf_counter() - t0:.0f}", flush=True)
        both = {k: tuple(float(np.sqrt(np.mean([r[k][i] ** 2 for r in rows]))) for i in (0, 1))
                for k in ("crb", "model", "polish3d")}
        print(f"{snr:>6g} {'all':>9} {'':>6} {'':>7} | " + " ".join(
            f"{both[k][0]:>7.4f}/{both[k][1]:.4f}" for k in ("crb", "model", "polish3d")), flush=True)


if __name__ == "__main__":
    main()
