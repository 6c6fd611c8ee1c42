"""The stage-2 jit boundary and the host L-BFGS loop.

One jitted ``value_and_grad`` defined at module level, taking the free parameters, the fixed
parameters and the data as arguments (never closed over) and the options as a static argument,
so a dataset compiles once per padded shape bucket, not once per tomogram or iteration.
The optimiser is SciPy's L-BFGS-B in float64 on the host around the float32 JAX function
(history 6 as RELION's liblbfgs); each evaluation costs microseconds per particle–tilt.
With several devices the particle-indexed arrays of the data are split across them
(:func:`polish3d.refine.devices.split_particles`) and the same jitted function runs on all.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from polish3d.refine import devices
from polish3d.refine.objective import pair_positions, pair_values, total_cost

__all__ = ["StageOptions", "minimise", "pair_values_at", "value_and_grad"]

log = logging.getLogger(__name__)

#: L-BFGS history (corrections kept), RELION's liblbfgs default
LBFGS_HISTORY = 6


@dataclasses.dataclass(frozen=True)
class StageOptions:
    """Static options of the stage-2 objective (hashable; part of the jit cache key).

    Attributes:
        range_reg: weight of the quadratic penalty for 2D displacements beyond the window (``--range_reg``).
        fix_gauge_positions: remove the 3 translational gauge directions (mean position change).
        fix_gauge_angles: remove the 3 rotational gauge directions of the tilt angles.
        motion: motion model (``polish3d.refine.motion``) or ``None``.
        deformation: deformation model (``polish3d.refine.deformation``) or ``None``.
    """

    range_reg: float = 0.0
    fix_gauge_positions: bool = True
    fix_gauge_angles: bool = True
    motion: object | None = None
    deformation: object | None = None


def _split_cost(free: dict, fixed, data: dict, options: StageOptions):
    """The cost with the free blocks ``free`` (by name) put into the parameters ``fixed``."""
    return total_cost(dataclasses.replace(fixed, **free), data, options)


@functools.partial(jax.jit, static_argnames=("options",))
def value_and_grad(free: dict, fixed, data: dict, options: StageOptions):
    """Cost and gradient w.r.t. the free parameters (jitted once per shape bucket)."""
    return jax.value_and_grad(_split_cost)(free, fixed, data, options)


@functools.partial(jax.jit, static_argnames=("options",))
def _pair_values(params, data: dict, options: StageOptions):
    return pair_values(params, data, options)


@functools.partial(jax.jit, static_argnames=("options", "spec"))
def _flat_positions(x, fixed, data: dict, options: StageOptions, spec):
    """Predicted 2D positions ``(N_pad, F, 2)`` at the flat free-parameter vector ``x``."""
    return pair_positions(dataclasses.replace(fixed, **_unflatten(x, spec)), data, options)[0]


def _unflatten(x, spec):
    out, offset = {}, 0
    for key, shape in spec:
        size = int(np.prod(shape))
        out[key] = x[offset : offset + size].reshape(shape)
        offset += size
    return out


@functools.partial(jax.jit, static_argnames=("options", "spec"))
def _flat_value_and_grad(x, fixed, data: dict, options: StageOptions, spec):
    """Cost and flat gradient of the flat free-parameter vector (splitting and joining inside
    the compiled function: no per-evaluation host-side array ops)."""
    value, grads = jax.value_and_grad(_split_cost)(_unflatten(x, spec), fixed, data, options)
    return value, jnp.concatenate([grads[k].ravel() for k, _ in spec])


def pair_values_at(params, data: dict, options: StageOptions):
    """Interpolated CC value of every particle–tilt pair ``(N_pad, F)`` at ``params`` (jitted)."""
    return _pair_values(jax.tree_util.tree_map(jnp.asarray, params), _on_devices(data), options)


def _on_devices(tree, data: dict | None = None):
    """``tree`` with its particle-indexed arrays split across the devices (by the padded particle
    count of ``data``, default ``tree`` itself); unchanged with one device."""
    if devices.count() == 1:
        return tree
    n_pad = (tree if data is None else data)["particle_mask"].shape[0]
    return devices.split_particles(tree, n_pad)


def _split(params, free_keys):
    """The free blocks ``{name: array}`` of ``params`` and the rest (those blocks set to ``None``)."""
    missing = [k for k in free_keys if getattr(params, k, None) is None]
    if missing:
        names = [f.name for f in dataclasses.fields(params)]
        raise ValueError(f"free parameter blocks {missing} are not in the parameters (blocks: {names})")
    return {k: getattr(params, k) for k in free_keys}, dataclasses.replace(params, **dict.fromkeys(free_keys))


@dataclasses.dataclass
class MinimiseInfo:
    """Statistics of one L-BFGS run (``devices``: how many devices the data were split across)."""

    cost_initial: float
    cost_final: float
    iterations: int
    evaluations: int
    converged: bool
    message: str
    seconds: float
    devices: int = 1


class _MoveStop:
    """L-BFGS callback part: raise ``StopIteration`` once the predictions ``predict(x)`` of the
    ``weighted`` pairs moved less than ``tol_px`` RMS over the last ``every`` iterations.

    The cost can keep creeping down for thousands of iterations along near-degenerate directions
    (deformation fields the rigid parameters nearly reproduce) while the geometry, what the
    refinement delivers, no longer changes beyond noise."""

    def __init__(self, predict, weighted: np.ndarray, tol_px: float, every: int):
        self.predict, self.weighted, self.tol_px, self.every = predict, weighted, tol_px, every
        self.last, self.halted = None, False
        self.message = f"predictions moved < {tol_px:g} px RMS in {every} iterations"

    def __call__(self, iteration: int, x) -> None:
        if self.tol_px <= 0 or iteration % self.every or not self.weighted.any():
            return
        u = np.asarray(self.predict(x))[self.weighted]
        if self.last is not None:
            move = float(np.sqrt(np.mean(np.sum((u - self.last) ** 2, -1))))
            log.debug("L-BFGS iteration %d: predictions moved %.4f px RMS in the last %d",
                      iteration, move, self.every)
            if move < self.tol_px:
                self.halted = True
                raise StopIteration
        self.last = u


def minimise(
    params: dict,
    data: dict,
    options: StageOptions,
    *,
    free_keys: tuple[str, ...],
    max_iter: int = 10000,
    ftol: float = 1e-10,
    callback: Callable[[int, float], None] | None = None,
    move_tol_px: float = 0.0,
    move_every: int = 50,
) -> tuple[dict, MinimiseInfo]:
    """Minimise the stage-2 cost over the blocks ``free_keys`` of ``params``.

    Args:
        params: initial parameters (:class:`~polish3d.refine.stage2.Stage2Params`).
        data: the stage-2 data pytree.
        options: static options.
        free_keys: names of the parameter blocks to optimise (fields of ``params``, not
            ``None``); others stay fixed.
        max_iter: maximum L-BFGS iterations (``--it``).
        ftol: stop when the relative cost decrease of an iteration is below this.
        callback: called as ``callback(iteration, cost)`` after each iteration.
        move_tol_px: ``> 0``: also stop (converged) once the predicted 2D positions moved less
            than this RMS (px) over the last ``move_every`` iterations (:class:`_MoveStop`).

    Returns:
        the optimised parameters and a :class:`MinimiseInfo`.
    """
    t0 = time.perf_counter()
    # data-term baseline: CC values at the start (precision of the float32 cost, see objective)
    data = _on_devices(data)
    params = _on_devices(jax.tree_util.tree_map(jnp.asarray, params), data)
    free, fixed = _split(params, free_keys)
    base = _pair_values(params, data, options)
    data = {**data, "cc_base": base}
    offset = -float(np.sum(np.asarray(data["weight"], np.float64) * np.asarray(base, np.float64)))
    if not free:
        c, _ = value_and_grad({}, fixed, data, options)
        c = float(c) + offset
        return params, MinimiseInfo(c, c, 0, 1, True, "nothing to optimise", 0.0)
    dtype = jnp.result_type(*free.values())
    spec = tuple((k, tuple(free[k].shape)) for k in sorted(free))
    counter = {"n": 0, "it": 0}

    def fun(x):
        counter["n"] += 1
        value, g = _flat_value_and_grad(jnp.asarray(x, dtype), fixed, data, options, spec)
        g = np.asarray(g, dtype=np.float64)
        v = float(value)
        if not np.isfinite(v) or not np.all(np.isfinite(g)):
            return np.inf, np.zeros_like(g)
        return v, g

    x0 = np.concatenate([np.asarray(free[k], np.float64).ravel() for k, _ in spec])
    c0, _ = fun(x0)

    stop = _MoveStop(lambda x: _flat_positions(jnp.asarray(x, dtype), fixed, data, options, spec),
                     np.asarray(data["weight"]) > 0, move_tol_px, move_every)

    def cb(intermediate_result):
        counter["it"] += 1
        if callback is not None:
            callback(counter["it"], float(intermediate_result.fun) + offset)
        stop(counter["it"], intermediate_result.x)

    res = scipy.optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", callback=cb, options={
        "maxiter": int(max_iter), "maxcor": LBFGS_HISTORY, "ftol": float(ftol), "gtol": 1e-6})
    out = dataclasses.replace(params, **_unflatten(jnp.asarray(res.x, dtype), spec))
    info = MinimiseInfo(
        cost_initial=float(c0) + offset,
        cost_final=float(res.fun) + offset,
        iterations=int(res.nit),
        evaluations=counter["n"],
        converged=bool(res.success) or stop.halted,
        message=stop.message if stop.halted else str(res.message),
        seconds=time.perf_counter() - t0,
        devices=_device_count(data["weight"]),
    )
    return out, info


def _device_count(a) -> int:
    """On how many devices ``a`` lies (1 for a host array)."""
    sharding = getattr(a, "sharding", None)
    return 1 if sharding is None else len(sharding.device_set)
