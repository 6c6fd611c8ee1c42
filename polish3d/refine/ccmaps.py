"""Stage 1: per-particle, per-tilt cross-correlation windows (the FFT-heavy part).

For particle ``p`` and tilt ``f`` (RELION §2.5, on RELION's scale):

* observation ``Y``: the ``s × s`` window around the predicted position ``u0`` (corner
  ``round(u0) − s//2``, clamped), minus the mean of its pixels outside radius ``s/2``, times a
  5-px soft circular mask, unitary FFT with the exact position ``u0`` at the phase origin;
* prediction ``S``: central slice of the particle's own half map at rotation ``P_f · M_p``, times
  the CTF at the particle's depth and the dose weights of the tilt (divided by ``sqrt(s)`` so it
  equals RELION's unscaled slice);
* ``C(d) = Σ_k −W_f(k) · Y(k) · conj S(k) · exp(+2πi k·d/s)`` over the full plane, the DC term
  removed, frequencies beyond the row limits (``--cutoff_fract``) removed; ``C`` peaks at the
  displacement ``d`` of the observed particle from ``u0``.

Computed in fixed-size particle chunks by one jitted function (static box and window), so
memory is bounded by the chunk size and a tomogram compiles once. Tilt images are gathered on
the host from (memory-mapped) stacks: only the boxes needed are read. With several devices each
chunk is split across them (:mod:`polish3d.refine.devices`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from polish3d import imaging
from polish3d.imaging.extract import observe_windows
from polish3d.imaging.fourier import crop_half, radius_2d, row_signs, uncrop_half
from polish3d.refine import devices

__all__ = [
    "CCInputs",
    "PairGeometry",
    "aligned_zeros",
    "blur_windows",
    "cc_spectra",
    "cc_support",
    "cc_tilt_sums",
    "compute_cc_windows",
    "frequency_weights",
    "gather_pairs",
    "observe_windows",
    "one_behind",
    "pair_batches",
    "pass_weights",
    "spectra",
    "weight_extent",
]


def frequency_weights(
    noise_power: np.ndarray,
    envelope: np.ndarray,
    dose: np.ndarray,
    *,
    box: int,
    whiten: bool = True,
    per_frame_noise: bool = False,
    srp: float = 0.0,
    hp: float = -1.0,
    cutoff_fract: float = 0.02,
) -> np.ndarray:
    """Per-tilt frequency weights ``W_f`` ``(F, s, s//2+1)`` (RELION §2.4, float32).

    Args:
        noise_power: ``(F, s//2+1)`` radial noise power of each tilt (``imaging.noise_power``).
        envelope: ``(s, s//2+1)`` reference envelope (``imaging.fsc_envelope``).
        dose: ``(F, s, s//2+1)`` dose weights (only used for the cutoff mask).
        box: box size ``s``.
        whiten: divide by the noise power (``--no_whiten`` turns it off).
        per_frame_noise: per-tilt noise power instead of the tilt average.
        srp: multiply the whitening weight by ``(i/sh)^srp``.
        hp: Gaussian high-pass sigma in Fourier pixels (≤ 0: off).
        cutoff_fract: zero where ``W/mean(W)`` or the dose weight is below this.
    """
    f = noise_power.shape[0]
    sh = box // 2 + 1
    rad = radius_2d(box)
    if whiten:
        power = np.asarray(noise_power, np.float64)
        if not per_frame_noise:
            power = np.broadcast_to(power.mean(0, keepdims=True), power.shape)
        prof = 1.0 / np.maximum(power, 1e-30)
        if srp != 0:
            prof = prof * (np.arange(sh) / sh)[None, :] ** srp
        w = np.stack([np.asarray(imaging.radial_expand(p, box)) for p in prof])
    else:
        w = np.ones((f, box, sh))
    if hp > 0:
        w = w * (1.0 - np.exp(-(rad**2) / (2.0 * hp * hp)))[None]
    w = w * np.asarray(envelope, np.float64)[None]
    w[:, 0, 0] = 0.0
    w[:, rad > box / 2.0] = 0.0
    mean = w.mean(axis=(1, 2), keepdims=True)
    keep = (w / np.maximum(mean, 1e-30) > cutoff_fract) & (np.asarray(dose) > cutoff_fract)
    return np.where(keep, w, 0.0).astype(np.float32)


def gather_pairs(stack, positions_px: np.ndarray, tilts: np.ndarray, box: int) -> np.ndarray:
    """Raw ``s × s`` windows of particle–tilt pairs: ``positions_px (P, 2)``, ``tilts (P,)``.

    RELION's extraction window: corner ``round(u) − s//2`` (round half up), indices clamped to
    the image (edge replication); one tilt image read per distinct tilt. Returns ``(P, s, s)``
    float32.
    """
    f, h, w = stack.shape
    corner = np.floor(np.asarray(positions_px) + 0.5).astype(np.int64) - box // 2
    out = np.empty((len(tilts), box, box), np.float32)
    inside = (corner[:, 0] >= 0) & (corner[:, 1] >= 0) & (corner[:, 0] + box <= w) & (corner[:, 1] + box <= h)
    ar = np.arange(box)
    for j in np.unique(tilts):
        img = stack[int(j)]
        sel = tilts == j
        ok = sel & inside
        if ok.any():
            view = np.lib.stride_tricks.sliding_window_view(img, (box, box))
            out[ok] = view[corner[ok, 1], corner[ok, 0]]
        edge = sel & ~inside
        if edge.any():
            c = corner[edge]
            iy = np.clip(c[:, 1, None] + ar, 0, h - 1)
            ix = np.clip(c[:, 0, None] + ar, 0, w - 1)
            out[edge] = np.asarray(img)[iy[:, :, None], ix[:, None, :]]
    return out


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "refs", "weights", "dose", "defocus_u", "defocus_v", "defocus_angle", "phase_shift",
        "bfactor", "ctf_scale", "pixel_size", "voltage", "cs", "q0", "hand_slope_px",
    ],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class CCInputs:
    """Per-tomogram constants of the CC stage (a pytree of JAX arrays, float32).

    Attributes:
        refs: ``(2, s, s, s//2+1)`` prepared half maps.
        weights: ``(F, s, s//2+1)`` frequency weights.
        dose: ``(F, s, s//2+1)`` dose weights (0 where the weights are).
        defocus_u, defocus_v: ``(F,)`` Å; defocus_angle, phase_shift: ``(F,)`` degrees;
            bfactor: ``(F,)`` Å²; ctf_scale: ``(F,)``.
        pixel_size: Å per pixel of the box; voltage: kV; cs: mm; q0: amplitude contrast.
        hand_slope_px: hand · defocus slope · pixel size (defocus change per pixel of depth, Å).
    """

    refs: jax.Array
    weights: jax.Array
    dose: jax.Array
    defocus_u: jax.Array
    defocus_v: jax.Array
    defocus_angle: jax.Array
    phase_shift: jax.Array
    bfactor: jax.Array
    ctf_scale: jax.Array
    pixel_size: jax.Array
    voltage: jax.Array
    cs: jax.Array
    q0: jax.Array
    hand_slope_px: jax.Array


@dataclasses.dataclass(frozen=True)
class PairGeometry:
    """Host-side predictions of a tomogram's particle–tilt pairs: where the CC stage looks.

    Attributes:
        u_px: ``(N, F, 2)`` predicted image positions (window centres, pixels).
        cam_rot: ``(N, F, 3, 3)`` ``P_f[:3,:3] · M_p`` (particle orientation in the camera frame).
        depth_px: ``(N, F)`` particle depth ``P_f[2]·[X;1]`` (pixels).
        centre_depth_px: ``(F,)`` depth of the tomogram centre (pixels).
        half_set: ``(N,)`` 1 or 2.
        visible: ``(N, F)`` true where the pair is used (box inside the image, tilt in range).
    """

    u_px: np.ndarray
    cam_rot: np.ndarray
    depth_px: np.ndarray
    centre_depth_px: np.ndarray
    half_set: np.ndarray
    visible: np.ndarray

    def subset(self, particles) -> PairGeometry:
        """The pairs of the particles ``particles`` (indices or a boolean mask)."""
        return dataclasses.replace(
            self, u_px=self.u_px[particles], cam_rot=self.cam_rot[particles],
            depth_px=self.depth_px[particles], half_set=np.asarray(self.half_set)[particles],
            visible=self.visible[particles],
        )


def blur_windows(windows, sigma_px: float) -> jax.Array:
    """Gaussian low-pass (standard deviation ``sigma_px``) of CC windows ``(..., D, D)``.

    Equivalent to multiplying the CC spectrum by ``exp(−2π²σ²|k|²/s²)`` away from the window
    edges (zero outside the window); widens each peak's basin of attraction for the coarse
    stage-2 runs. Separable: ``G · C · Gᵀ`` with a ``D × D`` Gaussian matrix.
    """
    d = windows.shape[-1]
    x = np.arange(d, dtype=np.float64)
    g = np.exp(-0.5 * ((x[:, None] - x[None, :]) / sigma_px) ** 2)
    g /= np.sqrt(2 * np.pi) * sigma_px
    return _blur(jnp.asarray(windows, jnp.float32), jnp.asarray(g, jnp.float32))


@jax.jit
def _blur(w, g):
    # one particle's (F, D, D) windows at a time, 16 particles per step: the result is the only
    # array of the windows' size (a whole-array einsum held an intermediate of that size too)
    flat = w.reshape((-1,) + w.shape[-3:])
    out = jax.lax.map(lambda a: jnp.einsum("ij,...jk,lk->...il", g, a, g), flat, batch_size=16)
    return out.reshape(w.shape)


def aligned_zeros(shape, dtype=np.float32, align: int = 64) -> np.ndarray:
    """``np.zeros`` on a ``align``-byte boundary: :func:`jax.device_put` of such an array on the
    CPU shares its memory instead of copying it (the CC window store, hundreds of MB)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.zeros(n + align, np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off : off + n].view(dtype).reshape(shape)


def _window_indices(box: int, half_width: int) -> np.ndarray:
    return np.mod(np.arange(-half_width, half_width + 1), box)


def cc_spectra(windows, frac, cam_rot, depth, tilt, half, valid, weight, const, k_max: int | None = None):
    """CC spectra ``g (P, s, s//2+1)`` of a batch of particle–tilt pairs of one half set.

    ``C(d) = irfft2(g)[d]`` is the CC at the integer displacement ``d`` (pixels); the same
    ``g`` evaluated as a trigonometric polynomial gives it at any real ``d``
    (:mod:`polish3d.refine.likelihood`). ``windows (P, s, s)``, ``frac (P, 2)``,
    ``cam_rot (P, 3, 3)``, ``depth (P,)`` (depth minus the tomogram centre's depth, pixels),
    ``tilt (P,)`` file index, ``half`` 1 or 2, ``valid (P,)`` 0 for padding, ``weight`` the
    per-tilt weights of :func:`pass_weights` (traceable; not jitted here). With ``k_max`` (static,
    ``< s/2``; the weights must be 0 beyond it, see :func:`cc_support`) only ``|kx|, |ky| ≤ k_max``
    are computed: ``g (P, 2K+1, K+1)`` in the layout of :func:`polish3d.imaging.fourier.crop_half` (the
    reference slice and the CTF, most of the cost, on that grid alone).
    """
    box = windows.shape[-1]
    y = observe_windows(windows, frac, k_max)  # (P, s, sh) or cropped
    dz = const.hand_slope_px * depth
    # one half map per batch (the host groups pairs by half set): selecting the map per pair
    # inside vmap would materialise a 3D map per pair
    ref = jax.lax.dynamic_index_in_dim(const.refs, half - 1, axis=0, keepdims=False)

    def one(rot, j, dz_):
        sl = imaging.central_slice(ref, rot, box, k_max)
        ctf = imaging.ctf_2d(
            box, const.pixel_size, const.defocus_u[j] + dz_, const.defocus_v[j] + dz_,
            const.defocus_angle[j], const.voltage, const.cs, const.q0,
            const.phase_shift[j], const.bfactor[j], const.ctf_scale[j], k_max=k_max,
        )
        return sl * ctf

    s = jax.vmap(one)(cam_rot, tilt, dz)
    return (-float(box * box) / np.sqrt(box)) * (valid[:, None, None] * weight[tilt]) * y * jnp.conj(s)


@functools.partial(jax.jit, static_argnames=("k_max",))
def pass_weights(const: CCInputs, blur=None, k_max: int | None = None) -> jax.Array:
    """The per-tilt weights of :func:`cc_spectra` for one pass: frequency weight × dose (× ``blur``
    ``(s, s//2+1)`` if given), ``(F, s, s//2+1)``, cropped to ``k_max`` if given (computed once
    per pass: inside the pairs' computation the crop would be redone for every pair)."""
    w = const.weights * const.dose if blur is None else const.weights * const.dose * blur[None]
    return w if k_max is None else crop_half(w, k_max)


#: :func:`cc_spectra` compiled on its own. Its consumers (the inverse FFT of the CC windows, the
#: Taylor moments' matrix product) are separate calls: fused with them, XLA lays the spectra out
#: frequency-major for the product and the reference slices' gathers, pair after pair at every
#: frequency, miss the cache (measured 1.5x slower at box 96).
spectra = jax.jit(cc_spectra, static_argnames=("k_max",))


def weight_extent(weights, box: int) -> int:
    """The largest ``|kx|`` or ``|ky|`` (Fourier pixels) where any tilt's weight ``(F, s, s//2+1)``
    is non-zero (0 if none is)."""
    nz = np.any(np.asarray(weights) != 0, axis=0)  # (s, sh)
    ky = np.abs(np.fft.fftfreq(box) * box).astype(int)
    k = np.maximum(ky[:, None], np.arange(box // 2 + 1)[None, :])
    return int(k[nz].max()) if nz.any() else 0


def cc_support(const: CCInputs, box: int) -> int | None:
    """The ``k_max`` for :func:`cc_spectra`: :func:`weight_extent` of frequency weight × dose, or
    ``None`` when that reaches ``s/2`` (no crop)."""
    k_used = weight_extent(np.asarray(const.weights) * np.asarray(const.dose), box)
    return k_used if k_used < box // 2 else None


def _full_maps(g, box: int):
    """Real CC maps ``(..., s, s)`` (zero displacement at index 0, periodic) from spectra of
    :func:`spectra`, cropped or not (traceable; ``box`` even, as the refinement's boxes are)."""
    if g.shape[-2] == box:
        return jnp.fft.irfft2(g, s=(box, box))
    # cropped: put back modulated (one pad, no reordering), then undo the modulation
    cc = jnp.fft.irfft2(uncrop_half(g, box, modulated=True), s=(box, box))
    return cc * row_signs(box)[:, None]


@functools.partial(jax.jit, static_argnames=("box", "half_width"))
def _cc_windows(g, box: int, half_width: int):
    """CC windows ``(P, D, D)`` from the spectra of :func:`spectra` (cropped or not)."""
    idx = _window_indices(box, half_width)
    return _full_maps(g, box)[..., idx[:, None], idx[None, :]]


@functools.partial(jax.jit, static_argnames=("n_tilts",))
def _tilt_sums(g, tilt, n_tilts: int):
    return jax.ops.segment_sum(g, tilt, num_segments=n_tilts)


_full_maps_jit = jax.jit(_full_maps, static_argnames=("box",))


def padded_pair_chunks(stack, u, pi, ti, batch: int, size: int):
    """Particle–tilt pairs ``(pi, ti)`` in chunks of exactly ``batch`` (one compiled shape).

    Yields ``(p_idx, t_idx, m, padded, windows, frac, valid)``: ``m`` real pairs, ``padded(a)``
    pads a per-pair array to ``batch`` by repeating its first row, ``windows`` the ``size²``
    boxes gathered at the rounded positions ``u[pi, ti]`` (padded), ``frac`` the sub-pixel rest
    (padded), ``valid`` 1 for real pairs and 0 for padding.
    """
    for start in range(0, len(pi), batch):
        p_b, t_b = pi[start : start + batch], ti[start : start + batch]
        m = len(p_b)
        pad = batch - m

        def padded(a, pad=pad):
            a = np.asarray(a)
            return np.concatenate([a, np.repeat(a[:1], pad, 0)], 0) if pad else a

        uu = u[p_b, t_b]
        valid = np.zeros(batch, np.float32)
        valid[:m] = 1.0
        yield (p_b, t_b, m, padded, padded(gather_pairs(stack, uu, t_b, size)),
               padded(uu - np.floor(uu + 0.5)), valid)


def pair_batches(stack, geom: PairGeometry, todo, *, box: int, chunk: int):
    """Host side of the CC stage: fixed-size batches of the pairs ``todo (N, F)`` of ``geom``.

    Pairs are grouped by half set, ``chunk × F`` per batch and device (split across the devices
    of :mod:`polish3d.refine.devices` when there are several; the last one padded by repeating its
    first pair, flagged invalid), boxes gathered from the stack. Yields ``(p_idx, t_idx, m,
    args)`` with ``m`` the number of real pairs and ``args`` the JAX arguments
    ``(windows, frac, cam_rot, depth, tilt, half, valid)`` of :func:`cc_spectra`.
    """
    f = geom.u_px.shape[1]
    half_set = np.asarray(geom.half_set)
    n_devices = devices.count()
    batch = max(1, chunk) * f * n_devices  # chunk × F pairs per device: a multiple of the devices
    put = jnp.asarray if n_devices == 1 else _split_pairs
    rel_depth = geom.depth_px - geom.centre_depth_px[None, :]
    for h in (1, 2):
        in_half = (half_set == 2) if h == 2 else (half_set != 2)
        pi, ti = np.nonzero(todo & in_half[:, None])
        for p_b, t_b, m, padded, win, frac, valid in padded_pair_chunks(stack, geom.u_px, pi, ti, batch, box):
            args = (
                put(win), put(frac, jnp.float32),
                put(padded(geom.cam_rot[p_b, t_b]), jnp.float32),
                put(padded(rel_depth[p_b, t_b]), jnp.float32),
                put(padded(t_b), jnp.int32), jnp.int32(h), put(valid),
            )
            yield p_b, t_b, m, args


def one_behind(items):
    """Yield the items of an iterator one step late: the host prepares (and dispatches) batch
    ``i + 1`` before the caller reads batch ``i``'s results, so gathering boxes on the host overlaps
    the device's work on the previous batch (JAX dispatches asynchronously)."""
    pending = sentinel = object()
    for item in items:
        if pending is not sentinel:
            yield pending
        pending = item
    if pending is not sentinel:
        yield pending


def _split_pairs(a, dtype=None) -> jax.Array:
    """A batch's per-pair array split across the devices (:mod:`polish3d.refine.devices`)."""
    return devices.shard_rows(np.asarray(a, dtype))


def compute_cc_windows(
    stack,
    geom: PairGeometry,
    const: CCInputs,
    *,
    box: int,
    half_width: int,
    chunk: int = 8,
    blur_px: float = 0.0,
    pairs: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """CC windows of the visible particle–tilt pairs of a tomogram.

    Only visible pairs are computed (the windows of the others are 0), in batches of
    ``chunk × F`` pairs of one half set, so memory is bounded and one compilation serves the
    tomogram.

    Args:
        stack: ``(F, H, W)`` tilt images (numpy or memmap).
        geom: the pairs' predictions (window centres ``geom.u_px``; only ``geom.visible`` pairs).
        const: the CC constants.
        box: box size ``s``.
        half_width: window half-width ``hw`` in pixels (the window is ``2·hw+1`` wide).
        chunk: batch size in particles' worth of pairs (``chunk × F`` pairs per call and device).
        blur_px: Gaussian low-pass of the CC maps (standard deviation in pixels; 0: none).
        pairs: optional boolean ``(N, F)``: compute only these pairs (and visible).
        out: optional ``(≥N, F, D, D)`` array to write into (pairs not computed are kept; rows
            beyond ``N``, e.g. padding, are left alone).

    Returns:
        ``(N, F, D, D)`` float32 windows (``out`` if given).
    """
    n, f = geom.u_px.shape[:2]
    d = 2 * half_width + 1
    rad = radius_2d(box)
    blur = np.exp(-2.0 * (np.pi * blur_px * rad / box) ** 2).astype(np.float32)
    if out is None:
        out = np.zeros((n, f, d, d), np.float32)
    visible = np.asarray(geom.visible, bool)
    todo = visible if pairs is None else (visible & pairs)
    if pairs is not None:
        out[:n][np.asarray(pairs, bool) & ~visible] = 0.0
    k_max = cc_support(const, box)  # frequencies without weight are skipped (exact)
    blur, const = devices.replicate((jnp.asarray(blur), const))  # (on every device, if several)
    batches = pair_batches(stack, geom, todo, box=box, chunk=chunk)
    weight = pass_weights(const, blur, k_max)
    for p_b, t_b, m, w in one_behind(
        (p_b, t_b, m, _cc_windows(spectra(*args, weight, const, k_max), box, half_width))
        for p_b, t_b, m, args in batches
    ):
        out[p_b, t_b] = np.asarray(w)[:m]
    return out


def cc_tilt_sums(stack, geom: PairGeometry, const: CCInputs, *, box: int, chunk: int = 8) -> np.ndarray:
    """Per-tilt sums ``(F, s, s)`` (float64) of the full CC maps of the visible pairs of ``geom``
    (zero displacement at index 0, periodic): the per-tilt shift search.

    The sum of the maps is the map of the summed spectra: spectra are summed per tilt as the
    batches come, and each tilt needs one inverse FFT instead of one per pair.
    """
    f = geom.u_px.shape[1]
    k_max = cc_support(const, box)
    const = devices.replicate(const)
    weight = pass_weights(const, k_max=k_max)
    total = None
    for _, _, _, args in pair_batches(stack, geom, np.asarray(geom.visible, bool), box=box, chunk=chunk):
        sums = np.asarray(_tilt_sums(spectra(*args, weight, const, k_max), args[4], f), np.complex128)
        total = sums if total is None else total + sums
    if total is None:
        return np.zeros((f, box, box))
    return np.asarray(_full_maps_jit(jnp.asarray(total, jnp.complex64), box), np.float64)
