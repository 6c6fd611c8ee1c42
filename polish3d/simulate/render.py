"""Noise-free tilt images: every particle's CTF-weighted, dose-weighted central slice, pasted
(dark) at its true 2D position (the forward model of :mod:`polish3d.imaging`)."""

from __future__ import annotations

import numpy as np

from polish3d.model import TiltSeriesData
from polish3d.simulate.config import SimulationConfig

__all__ = ["Renderer"]


def _render_fn(cfg: SimulationConfig, particle_radius_px: float):
    """Jitted renderer of one tilt series' clean images (closure over the static sizes)."""
    import jax
    import jax.numpy as jnp

    from polish3d import imaging as im

    box = cfg.box_px
    w, h = (int(v) for v in cfg.image_size_px)
    px = float(cfg.pixel_size_ang)
    mask, _ = im.circle_mask(box)
    g = np.arange(box) - box // 2

    def one_particle(ref_ft, rot, u, du, dv, ang, dose):
        ctf = im.ctf_2d(box, px, du, dv, ang, cfg.voltage_kv, cfg.cs_mm, cfg.amplitude_contrast)
        s = im.central_slice(ref_ft, rot, box) * ctf * dose
        s = s.at[0, 0].set(0.0)
        r = jnp.floor(u + 0.5)
        d = u - r
        patch = -im.irfft2c(s * im.shift_phase(box, d), box) * mask
        rr = (g[None, :] - d[0]) ** 2 + (g[:, None] - d[1]) ** 2
        disc = rr <= particle_radius_px**2
        power = jnp.sum(jnp.where(disc, patch * patch, 0.0)) / jnp.maximum(jnp.sum(disc), 1)
        return patch, r.astype(jnp.int32) - box // 2, power

    def one_tilt(ref_ft, args):
        rots, uv, du, dv, ang, pre = args
        dose = im.dose_weights(box, px, pre)
        patches, corners, power = jax.vmap(one_particle, in_axes=(None, 0, 0, 0, 0, None, None))(
            ref_ft, rots, uv, du, dv, ang, dose
        )
        ar = jnp.arange(box)
        iy = corners[:, 1, None, None] + ar[None, :, None]
        ix = corners[:, 0, None, None] + ar[None, None, :]
        iy = jnp.broadcast_to(iy, patches.shape)
        ix = jnp.broadcast_to(ix, patches.shape)
        img = jnp.zeros((h, w), jnp.float32).at[iy, ix].add(patches, mode="drop")
        return img, power

    @jax.jit
    def render(ref_ft, rots, uv, du, dv, ang, pre):
        return jax.lax.map(lambda a: one_tilt(ref_ft, a), (rots, uv, du, dv, ang, pre))

    return render


class Renderer:
    """Renders the clean images of one tilt series at a time (one jitted function, compiled once
    per simulation)."""

    def __init__(self, cfg: SimulationConfig, vol: np.ndarray, particle_radius_px: float):
        import jax.numpy as jnp

        from polish3d import imaging as im

        self._ref_ft = im.prepare_reference(jnp.asarray(vol), int(cfg.box_px))
        self._render = _render_fn(cfg, particle_radius_px)

    def __call__(self, ts: TiltSeriesData, rotations: np.ndarray, uv_px: np.ndarray,
                 depth_defocus_ang: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(images (F, H, W), power (F, N))`` for the particles' ``rotations`` ``(N, 3, 3)``
        at 2D positions ``uv_px`` ``(F, N, 2)`` with defocus offsets ``depth_defocus_ang``
        ``(F, N)``; ``power`` is each patch's mean squared signal within the particle radius."""
        import jax.numpy as jnp

        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        cam_rots = np.einsum("fij,njk->fnik", ts.projections[:, :3, :3], rotations)
        clean, power = self._render(
            self._ref_ft,
            f32(cam_rots),
            f32(uv_px),
            f32(ts.defocus_u_ang[:, None] + depth_defocus_ang),
            f32(ts.defocus_v_ang[:, None] + depth_defocus_ang),
            f32(ts.defocus_angle_deg),
            f32(ts.pre_exposure_e_per_ang2),
        )
        return np.asarray(clean), np.asarray(power)
