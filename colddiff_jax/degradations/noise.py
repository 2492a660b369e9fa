"""Hot Gaussian noise (DN baseline) and the cosine interpolation shared with mix.

Both the hot-noise baseline and animorphosis degrade by the same cosine schedule
(Nichol & Dhariwal, s = 0.008):

  D(x0, s) = sqrt(abar[s-1]) * x0 + sqrt(1 - abar[s-1]) * z,   D(x0, 0) = x0,

where z is a standard normal draw (noise) or a partner image (mix). Note that
this is not a convex combination: the two weights sum to more than 1 mid-way,
exactly as in the official code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from colddiff_jax.degradations import base

#: Offset of the cosine schedule (Nichol & Dhariwal), hard-coded officially.
COSINE_S = 0.008
#: Official clip of the per-step beta.
MAX_BETA = 0.999


def cosine_alphas_cumprod(num_steps: int, s: float = COSINE_S) -> np.ndarray:
  """The official cosine schedule abar_k, k = 0..T-1, in float64.

  f(k) = cos(((k/T + s) / (1 + s)) * pi/2)^2 for k = 0..T, abar'_k = f(k)/f(0),
  beta_k = clip(1 - abar'_{k+1}/abar'_k, 0, 0.999), abar_k = prod_{j<=k}(1-beta_j).
  Index k holds the state after k + 1 noising steps.

  Args:
    num_steps: T >= 1.
    s: the schedule offset.

  Returns:
    float64 array [T] of cumulative alphas.
  """
  base.check_positive_int("time_steps", num_steps)
  k = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  f = np.cos((k + s) / (1.0 + s) * np.pi / 2.0) ** 2
  alphas_prime = f / f[0]
  # The clip matters only at the last step (beta_{T-1} would be 1: abar'_T = 0).
  betas = np.clip(1.0 - alphas_prime[1:] / alphas_prime[:-1], 0.0, MAX_BETA)
  return np.cumprod(1.0 - betas)


class CosineInterpolation(base.Degradation):
  """D(x0, s) = sqrt(abar[s-1]) x0 + sqrt(1 - abar[s-1]) z with aux = {'z': z}.

  Common base of `noise` (z ~ N(0, I)) and `mix` (z = a partner image).
  Attributes (host float64 copies, for inspection and tests):
    alphas_cumprod, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: [T],
      index k <-> state after k + 1 steps (the official buffers).
  """

  random = True

  def __init__(self, config, image_size: int, channels: int):
    base.check_positive_int("time_steps", config.time_steps)
    base.check_positive_int("image_size", image_size, prefix="data.")
    base.check_positive_int("channels", channels, prefix="data.")
    super().__init__(config, image_size, channels)
    t = self.num_steps
    self.alphas_cumprod = cosine_alphas_cumprod(t)
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
    # Tables indexed by s = 0..T; s = 0 gets weights (1, 0) so D(x0, 0) = x0
    # exactly (1 * x0 + 0 * z is exact for finite z).
    self._coef_x0 = base.as_device_table(
        np.concatenate([[1.0], self.sqrt_alphas_cumprod]))
    self._coef_z = base.as_device_table(
        np.concatenate([[0.0], self.sqrt_one_minus_alphas_cumprod]))

  def _coefs(self, s: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    s = base.broadcast_steps(s, batch)
    a = base.gather_steps(self._coef_x0, s)[:, None, None, None]
    b = base.gather_steps(self._coef_z, s)[:, None, None, None]
    return a, b

  def apply(self, x0: jax.Array, s: jax.Array, aux: base.Aux = None) -> jax.Array:
    """Returns sqrt(abar[s-1]) x0 + sqrt(1 - abar[s-1]) aux['z'] (x0 at s = 0)."""
    self.check_aux(aux)
    a, b = self._coefs(s, x0.shape[0])
    return a * x0 + b * aux["z"]

  def estimate_aux(self, x_s: jax.Array, x0_hat: jax.Array, s: jax.Array) -> base.Aux:
    """Re-estimates z from a state x_s and a clean estimate (the official 'ddim').

    z_hat = (x_s - sqrt(abar[s-1]) x0_hat) / sqrt(1 - abar[s-1]) for s >= 1. At
    s = 0 the state carries no trace of z, so zeros are returned there.
    """
    a, b = self._coefs(s, x_s.shape[0])
    safe_b = jnp.where(b > 0, b, 1.0)
    z = jnp.where(b > 0, (x_s - a * x0_hat) / safe_b, 0.0)
    return {"z": z}


@base.register("noise")
class GaussianNoise(CosineInterpolation):
  """Hot diffusion baseline: z is standard normal noise, drawn per example."""

  def sample_aux(self, rng: jax.Array, batch_size: int) -> base.Aux:
    """Draws {'z': N(0, I) float32 [B, H, W, C]}."""
    shape = (batch_size, self.image_size, self.image_size, self.channels)
    return {"z": jax.random.normal(rng, shape, dtype=jnp.float32)}
