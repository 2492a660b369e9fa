"""Gaussian-mask inpainting: conditional (DF) and random-colour generation (DG).

Per-step masks are m_i(p) = 1 - exp(-|p - c|^2 / (2 sigma_i^2)) on an M x M grid
with the centre c = (M/2 - 1, M/2 - 1): the official code builds an (M+1)-point
Gaussian, normalises its peak to 1 and drops the first row and column, so the
hole sits half a pixel off the true image centre (spec bug 8; reproduced).

* `mask` (DF): D(x0, s) = (prod_{i<s} m_i) * x0, shared by all channels. With
  `Random_Incremental` the masks are 2N x 2N and each example sees its own
  N x N window at offsets (row, col) in {0..N}^2 (the hole centre can land one
  pixel outside the image, as officially).
* `mask_generation` (DG): D(x0, s) = alpha_{s-1} * x0 + (1 - alpha_{s-1}) * c
  with a per-example flat colour c; `reverse` reveals the image from the centre
  outwards during generation (spec §3.3).

All cumulative products are precomputed in float64 as [T+1, M, M] tables (index
0 = no degradation) and gathered per example, so `apply` costs O(1) in s.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from colddiff_jax.degradations import base

FADE_ROUTINES = ("Incremental", "Constant", "Random_Incremental")








def gaussian_masks(size: int, sigmas: np.ndarray) -> np.ndarray:
  """Per-step masks 1 - exp(-|p - c|^2 / (2 sigma^2)) with c = size/2 - 1.

  sigma = 0 (kernel_std * initial_mask with initial_mask 0) is taken as its
  limit: only the centre pixel is zeroed. The official code needs an even size
  (its Gaussian has size + 1 taps, which must be odd); an odd size gets the
  same formula with a half-integer centre.

  Args:
    size: side M of the square masks.
    sigmas: [S] per-step standard deviations (pixels).

  Returns:
    float64 [S, M, M], one mask per entry of `sigmas`.
  """
  sigmas = np.asarray(sigmas, dtype=np.float64)
  grid = np.arange(size, dtype=np.float64) - (size / 2.0 - 1.0)
  dist2 = grid[:, None] ** 2 + grid[None, :] ** 2
  var2 = 2.0 * sigmas[:, None, None] ** 2
  safe_var2 = np.where(var2 > 0, var2, 1.0)
  bump = np.where(var2 > 0, np.exp(-dist2 / safe_var2),
                  (dist2 == 0).astype(np.float64))
  return 1.0 - bump


def cumulative_masks(step_masks: np.ndarray) -> np.ndarray:
  """[T+1, M, M] table P_s = prod_{i<s} m_i, P_0 = ones (float64).

  The factors are first rounded to float32, as the official per-step masks
  are: far from the hole many m_i lie within 2^-25 of 1 and are exactly 1.0
  there, while their float64 product is 1 - 1e-7, which would make the 8-bit
  truncation of `discrete` drop a white pixel by one level.
  """
  steps = step_masks.astype(np.float32).astype(np.float64)
  ones = np.ones((1,) + steps.shape[1:], dtype=np.float64)
  return np.concatenate([ones, np.cumprod(steps, axis=0)], axis=0)


class _MaskBase(base.Degradation):
  """Shared validation and input checks of the two mask families."""

  def __init__(self, config, image_size: int, channels: int,
               default_std: float, default_initial: float):
    base.check_positive_int("time_steps", config.time_steps)
    base.check_positive_int("image_size", image_size, prefix="data.")
    base.check_positive_int("channels", channels, prefix="data.")
    self.kernel_std = base.check_real(
        "kernel_std", base.option(config, "kernel_std", default_std), 0.0, strict=True)
    self.initial_mask = base.check_real(
        "initial_mask", base.option(config, "initial_mask", default_initial), 0.0,
        strict=False)
    super().__init__(config, image_size, channels)


  def incremental_sigmas(self) -> np.ndarray:
    """sigma_i = kernel_std * (i + initial_mask), i = 0..T-1."""
    return self.kernel_std * (np.arange(self.num_steps, dtype=np.float64)
                              + self.initial_mask)


@base.register("mask")
class GaussianMask(_MaskBase):
  """Conditional inpainting (DF): cumulative Gaussian masks, fixed or random windows.

  Attributes:
    step_masks: float64 [T, M, M] per-step masks m_i (M = 2N for
      Random_Incremental, else N); the official `fade_kernels`.
    cumulative: float32 device table [T+1, M, M] of prod_{i<s} m_i.
  """

  def __init__(self, config, image_size: int, channels: int):
    super().__init__(config, image_size, channels, default_std=0.1,
                     default_initial=11)
    self.fade_routine = base.option(config, "fade_routine", "Incremental")
    base.check_choice("fade_routine", self.fade_routine, FADE_ROUTINES)
    self.discrete = base.check_bool("discrete", base.option(config, "discrete", False))
    self.random = self.fade_routine == "Random_Incremental"
    n = self.image_size
    if self.fade_routine == "Constant":
      sigmas = np.full(self.num_steps, self.kernel_std)
    else:
      sigmas = self.incremental_sigmas()
    self.mask_size = 2 * n if self.random else n
    self.step_masks = gaussian_masks(self.mask_size, sigmas)
    self.cumulative = base.as_device_table(cumulative_masks(self.step_masks))

  def sample_aux(self, rng: jax.Array, batch_size: int) -> base.Aux:
    """Random_Incremental: {'offset': int32 [B, 2]} (row, col) in 0..N; else None."""
    if not self.random:
      return None
    n = self.image_size
    return {"offset": jax.random.randint(rng, (batch_size, 2), 0, n + 1,
                                         dtype=jnp.int32)}

  def masks(self, s: jax.Array, aux: base.Aux, batch: int) -> jax.Array:
    """The cumulative masks prod_{i<s} m_i seen by each example, [B, N, N]."""
    s = base.broadcast_steps(s, batch)
    if not self.random:
      return base.gather_steps(self.cumulative, s)
    self.check_aux(aux)
    n = self.image_size
    offset = jnp.broadcast_to(jnp.asarray(aux["offset"], jnp.int32), (batch, 2))

    # Slice the N x N window straight out of the [T+1, 2N, 2N] table: no
    # per-example copy of the 2N x 2N masks is materialised.
    def crop(step, off):
      window = jax.lax.dynamic_slice(self.cumulative, (step, off[0], off[1]),
                                     (1, n, n))
      return window[0]

    return jax.vmap(crop)(s, offset)

  def apply(self, x0: jax.Array, s: jax.Array, aux: base.Aux = None) -> jax.Array:
    """Returns (prod_{i<s} m_i) * x0, the mask shared by all channels."""
    self.check_input(x0)
    return self.masks(s, aux, x0.shape[0])[..., None] * x0

  def initial_state(self, x0: jax.Array, aux: base.Aux = None) -> jax.Array:
    """x_T; the official inpainting evaluation quantises it when discrete."""
    return self.quantize(super().initial_state(x0, aux))


@base.register("mask_generation")
class MaskGeneration(_MaskBase):
  """Inpainting-based generation (DG): interpolation towards a random flat colour.

  D(x0, s) = alpha_{s-1} * x0 + (1 - alpha_{s-1}) * c, alpha for s = 0 = ones.
  reverse=False: alpha_k = prod_{i<=k} m_i. reverse=True: 1 - alpha_k =
  P_{T-1-k} with P_j = prod_{i<j} m_i, so alpha_{T-1} = 0 (x_T = c exactly).

  Attributes:
    step_masks: float64 [T, N, N] per-step masks m_i.
    alphas: float64 [T, N, N], the official buffer alphas[k], k = 0..T-1.
    table: float32 device table [T+1, N, N], index s -> alpha_{s-1} (ones at 0).
  """

  random = True

  def __init__(self, config, image_size: int, channels: int):
    super().__init__(config, image_size, channels, default_std=0.15,
                     default_initial=11)
    self.reverse = base.check_bool("reverse", base.option(config, "reverse", False))
    self.step_masks = gaussian_masks(self.image_size, self.incremental_sigmas())
    prods = cumulative_masks(self.step_masks)  # P_0..P_T
    t = self.num_steps
    if self.reverse:
      # alpha_k = 1 - P_{T-1-k}: P_{T-1}, ..., P_0 in reverse order.
      self.alphas = 1.0 - prods[t - 1::-1]
    else:
      self.alphas = prods[1:]
    ones = np.ones((1, self.image_size, self.image_size), dtype=np.float64)
    self.table = base.as_device_table(np.concatenate([ones, self.alphas]))

  def sample_aux(self, rng: jax.Array, batch_size: int) -> base.Aux:
    """{'colour': float32 [B, C]} ~ Uniform[0, 1) - 0.5, as the official trainer."""
    colour = jax.random.uniform(rng, (batch_size, self.channels), dtype=jnp.float32)
    return {"colour": colour - 0.5}

  def apply(self, x0: jax.Array, s: jax.Array, aux: base.Aux = None) -> jax.Array:
    """Returns alpha_{s-1} * x0 + (1 - alpha_{s-1}) * colour (x0 at s = 0)."""
    self.check_input(x0)
    self.check_aux(aux)
    s = base.broadcast_steps(s, x0.shape[0])
    alpha = base.gather_steps(self.table, s)[..., None]
    colour = jnp.asarray(aux["colour"], jnp.float32)[:, None, None, :]
    return alpha * x0 + (1.0 - alpha) * colour
