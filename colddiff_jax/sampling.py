"""Cold Diffusion samplers, each one `lax.scan` inside one `jit`.

With the network R called as R(x_s, s-1) (the official 0-based index), the loop
runs s = T, T-1, ..., 1 and updates the state x by

  direct : x̂0 = R(x_T, T-1), returned at once (one network call);
  naive  : x ← D(x̂0, s-1)                      (Algorithm 1);
  tacos  : x ← x - D(x̂0, s) + D(x̂0, s-1)      (Algorithm 2, "x0_step_down");
  ddim   : as naive, with the hidden image (noise / mix partner) re-estimated
           from (x, x̂0) at every step, i.e. deterministic DDIM for hot noise.

All degradations use the same `aux` (mask window, colour, noise, ...) that
produced x_T. Nothing is clamped, as in the official code. The whole loop is one
XLA program: one compilation per shape, one dispatch, no Python per step.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from colddiff_jax.degradations import base

METHODS = ("direct", "naive", "tacos", "ddim")

RestoreFn = Callable[[jax.Array, jax.Array], jax.Array]


def check_method(method: str) -> None:
  """Raises ValueError naming `sample.method` for an unknown sampler."""
  if method not in METHODS:
    raise ValueError(
        f"sample.method={method!r} is not a sampler; use one of "
        f"{', '.join(METHODS)}.")


def _step(restore_fn, deg, method, aux, x, s):
  """One update from the state after s steps; returns (new x, x̂0)."""
  k = s - 1
  x0_hat = restore_fn(x, k)
  if method == "naive":
    x = deg.apply(x0_hat, k, aux)
  elif method == "tacos":
    x = x - deg.apply(x0_hat, s, aux) + deg.apply(x0_hat, k, aux)
  elif method == "ddim":
    # At s = 1 the estimated hidden image is multiplied by zero (D(·, 0) = id).
    x = deg.apply(x0_hat, k, deg.estimate_aux(x, x0_hat, s))
  return x.astype(x0_hat.dtype), x0_hat


def sample(restore_fn: RestoreFn,
           deg: base.Degradation,
           x_T: jax.Array,
           aux: base.Aux = None,
           method: str = "tacos",
           return_trajectory: bool = False,
           num_steps: int | None = None):
  """Runs a sampler from x_T; jit this (or call `make_sampler`) for one program.

  Args:
    restore_fn: R(x, k) with x [B,H,W,C] and k int32 [B] (0-based: a state
      after s steps is restored with k = s - 1). Close over the parameters.
    deg: the degradation that produced x_T.
    x_T: the fully degraded batch [B,H,W,C].
    aux: the per-example random choices behind x_T (None if deterministic).
    method: one of METHODS.
    return_trajectory: also return the network inputs and outputs per step.
    num_steps: start from the state after this many steps (default T).

  Returns:
    x_0 [B,H,W,C], or (x_0, {'x_in': [S,B,H,W,C], 'x0_hat': [S,B,H,W,C]}) with
    S = num_steps (S = 1 for 'direct'); x_in[0] = x_T, x0_hat[0] = the direct
    reconstruction R(x_T, T-1).
  """
  check_method(method)
  steps = deg.num_steps if num_steps is None else num_steps
  if not 1 <= steps <= deg.num_steps:
    raise ValueError(f"num_steps={steps} must be in 1..{deg.num_steps}.")
  if method != "direct":
    deg.check_aux(aux)
  batch = x_T.shape[0]
  s_all = jnp.arange(steps, 0, -1, dtype=jnp.int32)
  if method == "direct":
    s_all = s_all[:1]

  def body(x, s):
    s_b = jnp.full((batch,), s, jnp.int32)
    x_next, x0_hat = _step(restore_fn, deg, method, aux, x, s_b)
    if method == "direct":
      x_next = x0_hat
    out = (x, x0_hat) if return_trajectory else None
    return x_next, out

  x0, traj = jax.lax.scan(body, x_T, s_all)
  if return_trajectory:
    return x0, {"x_in": traj[0], "x0_hat": traj[1]}
  return x0


def make_sampler(restore_fn: RestoreFn, deg: base.Degradation,
                 method: str = "tacos", return_trajectory: bool = False):
  """A jitted `(x_T, aux) -> x_0` for a fixed restorer, degradation and method.

  `restore_fn` should take its parameters as closure constants or be a pure
  function of (x, k); pass parameters explicitly with `make_param_sampler` when
  they change between calls (e.g. EMA weights during training).
  """
  check_method(method)
  return jax.jit(functools.partial(
      sample, restore_fn, deg, method=method,
      return_trajectory=return_trajectory))


def make_param_sampler(apply_fn: Callable[[object, jax.Array, jax.Array], jax.Array],
                       deg: base.Degradation, method: str = "tacos",
                       return_trajectory: bool = False):
  """A jitted `(params, x_T, aux) -> x_0` with R(x, k) = apply_fn(params, x, k).

  Parameters are traced arguments, so new weights reuse the compiled program.
  """
  check_method(method)

  def run(params, x_T, aux):
    return sample(lambda x, k: apply_fn(params, x, k), deg, x_T, aux,
                  method=method, return_trajectory=return_trajectory)

  return jax.jit(run)
