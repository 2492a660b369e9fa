"""Gaussian blur (official deblurring package), every `blur_routine`.

Step i convolves each channel with a k×k Gaussian (outer product of a 1-D
kernel) after circular or reflect padding; D(x, s) chains steps 0..s-1, each
re-padding its own input. Both the kernel and the padding are separable, so the
chain is stored as one [T+1, N, N] per-axis operator table (see operators.py):
exact to float rounding with either padding, two matmuls per apply.

`discrete` (the generation runs): the state after T steps is replaced by its
per-image, per-channel spatial mean, and training inputs are quantised to 8 bit.

Difference from the official code (spec §8 bug 3): for `Individual_Incremental`
the official samplers degrade with the single kernel s-1 while training chains
all kernels; we chain in both, so sampling matches training.
"""

from __future__ import annotations

import math

import numpy as np

from colddiff_jax.degradations import base
from colddiff_jax.degradations import operators

ROUTINES = ("Incremental", "Constant", "Constant_reflect", "Exponential",
            "Exponential_reflect", "Individual_Incremental", "Special_6_routine")


def kernel_schedule(routine: str, size: int, std: float,
                    num_steps: int) -> list[tuple[int, float, str]]:
  """(kernel size, sigma, numpy pad mode) of every step i = 0..T-1 (spec §3.1)."""
  steps = []
  for i in range(num_steps):
    if routine == "Incremental":
      steps.append((size, std * (i + 1), "wrap"))
    elif routine == "Constant":
      steps.append((size, std, "wrap"))
    elif routine == "Constant_reflect":
      steps.append((size, std, "reflect"))
    elif routine == "Exponential":
      # `blur_std` is a growth rate here: sigma_0 = 1.
      steps.append((size, math.exp(std * i), "wrap"))
    elif routine == "Exponential_reflect":
      steps.append((size, math.exp(std * i), "reflect"))
    elif routine == "Individual_Incremental":
      steps.append((2 * i + 1, 2.0 * (2 * i + 1), "wrap"))
    elif routine == "Special_6_routine":
      # Ignores blur_size and blur_std (spec §7 row 2).
      steps.append((11, 0.35 + i / 100, "reflect"))
  return steps


def kernel_2d(size: int, sigma: float) -> np.ndarray:
  """The k×k kernel of one step (what the official depthwise conv holds)."""
  g = operators.gaussian_1d(size, sigma)
  return np.outer(g, g)


@base.register("blur")
class Blur(operators.SeparableDegradation):
  """Cumulative Gaussian blur; deterministic (no aux)."""

  def __init__(self, config, image_size, channels):
    super().__init__(config, image_size, channels)
    routine = config.blur_routine
    base.check_choice("blur_routine", routine, ROUTINES)
    base.check_positive_int("blur_size", config.blur_size)
    if routine not in ("Individual_Incremental", "Special_6_routine"):
      if config.blur_size % 2 != 1:
        raise ValueError(
            f"degradation.blur_size={config.blur_size} must be odd (the Gaussian "
            f"is centred on a pixel).")
      if not config.blur_std > 0:
        raise ValueError(f"degradation.blur_std={config.blur_std} must be > 0.")
    self.discrete = bool(config.discrete)
    self.schedule = kernel_schedule(routine, config.blur_size, config.blur_std,
                                    self.num_steps)
    largest = max(size for size, _, _ in self.schedule)
    if largest > image_size:
      raise ValueError(
          f"degradation.blur_size: blur_routine={routine!r} uses a {largest}×"
          f"{largest} kernel, larger than data.image_size={image_size}; use a "
          f"smaller kernel (or fewer time_steps for Individual_Incremental).")
    n = image_size
    steps = [operators.conv_operator(operators.gaussian_1d(k, sigma), n, mode)
             for k, sigma, mode in self.schedule]
    table = operators.cumulative(steps, n)
    if self.discrete:
      # D(x, T) := spatial mean of the chained state, per image and channel.
      table[-1] = operators.mean_operator(n) @ table[-1]
    self._set_table(table)

  def kernels(self) -> list[np.ndarray]:
    """The T per-step 2-D kernels, for inspection and parity tests."""
    return [kernel_2d(k, sigma) for k, sigma, _ in self.schedule]
