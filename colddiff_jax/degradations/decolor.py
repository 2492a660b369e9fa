"""Decolorization (the official SN `DeColorization` forward process).

Step i is a 1x1 channel-mixing matrix K_i = f_i * I + (1 - f_i) * (1/C) * ones,
i.e. x <- f_i * x + (1 - f_i) * mean_over_channels(x) (a plain channel average,
not luminance), applied cumulatively in [-1, 1] space:
D(x, s) = K_{s-1} ... K_0 x per pixel.

* `Constant`: f_i = decolor_ema_factor.
* `Linear`: f_i = 1 - (1/T) / r_i with r_0 = 1, r_{i+1} = r_i f_i, so the colour
  left after s steps is exactly 1 - s/T.
* `decolor_total_remove`: the last step uses f = 0 (fully grey).

The products K_{s-1} ... K_0 are precomputed as a [T+1, C, C] table.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from colddiff_jax.degradations import base

DECOLOR_ROUTINES = ("Constant", "Linear")




def decolor_factors(num_steps: int, routine: str, ema_factor: float,
                    total_remove: bool) -> np.ndarray:
  """Per-step colour-retention factors f_i, i = 0..T-1 (float64)."""
  if routine == "Constant":
    factors = np.full(num_steps, ema_factor, dtype=np.float64)
  else:  # Linear
    factors = np.empty(num_steps, dtype=np.float64)
    remaining = 1.0
    for i in range(num_steps):
      factors[i] = 1.0 - (1.0 / num_steps) / remaining
      remaining *= factors[i]
  if total_remove:
    factors[-1] = 0.0
  return factors


def step_matrices(factors: np.ndarray, channels: int) -> np.ndarray:
  """K_i = f_i I + (1 - f_i)/C * ones, float64 [T, C, C] (rows: output channel)."""
  eye = np.eye(channels, dtype=np.float64)
  mean = np.full((channels, channels), 1.0 / channels)
  f = factors[:, None, None]
  return f * eye + (1.0 - f) * mean


@base.register("decolor")
class Decolorization(base.Degradation):
  """Cumulative channel-averaging towards grey.

  Attributes:
    factors: float64 [T], per-step f_i.
    step_matrices: float64 [T, C_out, C_in], the official 1x1 conv weights.
    cumulative: float32 device table [T+1, C, C], index s -> K_{s-1} ... K_0.
  """

  def __init__(self, config, image_size: int, channels: int):
    base.check_positive_int("time_steps", config.time_steps)
    base.check_positive_int("image_size", image_size, prefix="data.")
    base.check_positive_int("channels", channels, prefix="data.")
    routine = base.option(config, "decolor_routine", "Constant")
    base.check_choice("decolor_routine", routine, DECOLOR_ROUTINES)
    ema = base.option(config, "decolor_ema_factor", 0.9)
    if (not isinstance(ema, numbers.Real) or isinstance(ema, bool)
        or not 0.0 <= ema <= 1.0):
      raise ValueError(
          f"degradation.decolor_ema_factor={ema!r} must be a number in [0, 1].")
    total_remove = base.option(config, "decolor_total_remove", False)
    if not isinstance(total_remove, (bool, np.bool_)):
      raise ValueError(
          f"degradation.decolor_total_remove={total_remove!r} must be True or False.")
    super().__init__(config, image_size, channels)
    self.decolor_routine = routine
    self.factors = decolor_factors(self.num_steps, routine, float(ema),
                                   bool(total_remove))
    self.step_matrices = step_matrices(self.factors, self.channels)
    table = [np.eye(self.channels)]
    for k in self.step_matrices:
      table.append(k @ table[-1])
    self.cumulative = base.as_device_table(np.stack(table))


  def apply(self, x0: jax.Array, s: jax.Array, aux: base.Aux = None) -> jax.Array:
    """Returns (K_{s-1} ... K_0) x0 per pixel; x0 itself at s = 0."""
    del aux
    self.check_input(x0)
    s = base.broadcast_steps(s, x0.shape[0])
    mats = base.gather_steps(self.cumulative, s)
    # HIGHEST: accelerators would otherwise contract float32 in reduced
    # precision (TF32/bf16 passes), far above the 1e-5 parity budget.
    y = jnp.einsum("boi,bhwi->bhwo", mats, x0,
                   precision=jax.lax.Precision.HIGHEST)
    # Guarantees D(x0, 0) == x0 bit for bit whatever the backend's contraction.
    return jnp.where((s == 0)[:, None, None, None], x0, y)

  def total_forward(self, x: jax.Array) -> jax.Array:
    """The official direct projection to grey: every channel := channel mean."""
    self.check_input(x)
    return jnp.broadcast_to(jnp.mean(x, axis=-1, keepdims=True), x.shape)
