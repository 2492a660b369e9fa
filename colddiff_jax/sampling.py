"""Cold Diffusion samplers, each one `lax.scan` inside one `jit`.

With the network R called as R(x_s, s-1) (the official 0-based index), the loop
runs s = T, T-1, ..., 1 and updates the state x by

  direct : x̂0 = R(x_T, T-1), returned at once (one network call);
  naive  : x ← D(x̂0, s-1)                      (Algorithm 1);
  tacos  : x ← x - D(x̂0, s) + D(x̂0, s-1)      (Algorithm 2, "x0_step_down");
  ddim   : as naive, with the hidden image (noise / mix partner) re-estimated
           from (x, x̂0) at every step, i.e. deterministic DDIM for hot noise.

With `sample_steps` = k < T network calls the same updates run on k evenly
spaced states s_0 = T > s_1 > ... > s_k = 0, with s-1 replaced by the next
state (x ← x - D(x̂0, s_i) + D(x̂0, s_{i+1}) for tacos): the effect-of-T study.

All degradations use the same `aux` (mask window, colour, noise, ...) that
produced x_T. Nothing is clamped, as in the official code. The whole loop is one
XLA program: one compilation per shape, one dispatch, no Python per step.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from colddiff_jax.degradations import base

METHODS = ("direct", "naive", "tacos", "ddim")

RestoreFn = Callable[[jax.Array, jax.Array], jax.Array]


def check_method(method: str) -> None:
  """Raises ValueError naming `sample.method` for an unknown sampler."""
  if method not in METHODS:
    raise ValueError(
        f"sample.method={method!r} is not a sampler; use one of "
        f"{', '.join(METHODS)}.")


def schedule(start: int, sample_steps: int | None = None) -> np.ndarray:
  """The states s_0 = start > s_1 > ... > s_k = 0 a sampler visits (k+1 ints).

  k = `sample_steps` (default: every step, k = start); strided schedules are
  evenly spaced, rounded half up.
  """
  k = start if sample_steps is None else sample_steps
  if not 1 <= k <= start:
    raise ValueError(f"sample.steps={k} must be in 1..{start} (the number of "
                     f"network calls; at most the number of degradation steps).")
  return np.floor(np.linspace(start, 0, k + 1) + 0.5).astype(np.int32)


def _step(restore_fn, deg, method, aux, x, s, s_next):
  """One update from the state after s steps to the state after s_next < s.

  Returns (new x, x̂0). Without striding s_next = s - 1.
  """
  x0_hat = restore_fn(x, s - 1)
  if method == "naive":
    x = deg.apply(x0_hat, s_next, aux)
  elif method == "tacos":
    x = x - deg.apply(x0_hat, s, aux) + deg.apply(x0_hat, s_next, aux)
  elif method == "ddim":
    # At s_next = 0 the estimated hidden image is multiplied by zero
    # (D(·, 0) = id).
    x = deg.apply(x0_hat, s_next, deg.estimate_aux(x, x0_hat, s))
  return x.astype(x0_hat.dtype), x0_hat


def sample(restore_fn: RestoreFn,
           deg: base.Degradation,
           x_T: jax.Array,
           aux: base.Aux = None,
           method: str = "tacos",
           return_trajectory: bool = False,
           num_steps: int | None = None,
           sample_steps: int | None = None):
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
    sample_steps: network calls k (default num_steps): a strided sampler over
      `schedule(num_steps, k)`.

  Returns:
    x_0 [B,H,W,C], or (x_0, {'x_in': [S,B,H,W,C], 'x0_hat': [S,B,H,W,C]}) with
    S = sample_steps (S = 1 for 'direct'); x_in[0] = x_T, x0_hat[0] = the
    direct reconstruction R(x_T, T-1).
  """
  check_method(method)
  steps = deg.num_steps if num_steps is None else num_steps
  if not 1 <= steps <= deg.num_steps:
    raise ValueError(f"num_steps={steps} must be in 1..{deg.num_steps}.")
  if method != "direct":
    deg.check_aux(aux)
  batch = x_T.shape[0]
  states = schedule(steps, 1 if method == "direct" else sample_steps)
  pairs = jnp.asarray(np.stack([states[:-1], states[1:]], axis=1))

  def body(x, pair):
    s_b = jnp.full((batch,), pair[0], jnp.int32)
    s_next_b = jnp.full((batch,), pair[1], jnp.int32)
    x_next, x0_hat = _step(restore_fn, deg, method, aux, x, s_b, s_next_b)
    if method == "direct":
      x_next = x0_hat
    out = (x, x0_hat) if return_trajectory else None
    return x_next, out

  x0, traj = jax.lax.scan(body, x_T, pairs)
  if return_trajectory:
    return x0, {"x_in": traj[0], "x0_hat": traj[1]}
  return x0


def make_sampler(restore_fn: RestoreFn, deg: base.Degradation,
                 method: str = "tacos", return_trajectory: bool = False,
                 num_steps: int | None = None, sample_steps: int | None = None):
  """A jitted `(x_T, aux) -> x_0` for a fixed restorer, degradation and method.

  `restore_fn` should take its parameters as closure constants or be a pure
  function of (x, k); pass parameters explicitly with `make_param_sampler` when
  they change between calls (e.g. EMA weights during training).
  """
  check_method(method)
  return jax.jit(functools.partial(
      sample, restore_fn, deg, method=method,
      return_trajectory=return_trajectory, num_steps=num_steps,
      sample_steps=sample_steps))


def make_param_sampler(apply_fn: Callable[[object, jax.Array, jax.Array], jax.Array],
                       deg: base.Degradation, method: str = "tacos",
                       return_trajectory: bool = False,
                       num_steps: int | None = None,
                       sample_steps: int | None = None):
  """A jitted `(params, x_T, aux) -> x_0` with R(x, k) = apply_fn(params, x, k).

  Parameters are traced arguments, so new weights reuse the compiled program.
  `num_steps` / `sample_steps` are as in `sample`.
  """
  check_method(method)
  if sample_steps is not None:  # fail before compiling
    schedule(deg.num_steps if num_steps is None else num_steps, sample_steps)

  def run(params, x_T, aux):
    return sample(lambda x, k: apply_fn(params, x, k), deg, x_T, aux,
                  method=method, return_trajectory=return_trajectory,
                  num_steps=num_steps, sample_steps=sample_steps)

  return jax.jit(run)
