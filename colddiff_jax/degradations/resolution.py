"""Super-resolution degradation (official resolution package).

Step i down-samples the current N×N image to N - d_i pixels per side with
PyTorch's bicubic / bilinear / area interpolation (align_corners=False, no
antialias) and up-samples it back with nearest-exact; the `_with_blur` variants
add a 3×3 σ=0.5 reflect-padded blur before the down- and after the up-sampling.
D(x, s) chains steps 0..s-1. Every piece is a separable linear map, so the chain
is one [T+1, N, N] operator table, identical to the official chain up to float
rounding (jax.image.resize would not be: its cubic uses a=-0.5 and antialias).

Official quirk kept (spec §8 bug 2): with the `Incremental*` routines d_0 = 0, so
step 0 is the identity.
"""

from __future__ import annotations

from colddiff_jax.degradations import base
from colddiff_jax.degradations import operators

_DOWN = {
    "bicubic": operators.bicubic_operator,
    "bilinear": operators.bilinear_operator,
    "area": operators.area_operator,
}

# routine -> (down-sampling mode, factor-2 sizes?, blur around each step?)
ROUTINES = {
    "Incremental": ("bicubic", False, False),
    "Incremental_bilinear": ("bilinear", False, False),
    "Incremental_area": ("area", False, False),
    "Incremental_factor_2": ("bicubic", True, False),
    "Incremental_bilinear_factor_2": ("bilinear", True, False),
    "Incremental_area_factor_2": ("area", True, False),
    "Incremental_bicubic_with_blur": ("bicubic", False, True),
    "Incremental_bilinear_with_blur": ("bilinear", False, True),
    "Incremental_area_with_blur": ("area", False, True),
}


def down_sizes(routine: str, image_size: int, num_steps: int) -> list[int]:
  """Intermediate size of every step i = 0..T-1."""
  _, factor_2, _ = ROUTINES[routine]
  if factor_2:
    return [image_size // 2**(i + 1) for i in range(num_steps)]
  return [image_size - i for i in range(num_steps)]


@base.register("resolution")
class Resolution(operators.SeparableDegradation):
  """Cumulative down/up-sampling; deterministic (no aux)."""

  def __init__(self, config, image_size, channels):
    super().__init__(config, image_size, channels)
    routine = config.resolution_routine
    base.check_choice("resolution_routine", routine, tuple(ROUTINES))
    mode, factor_2, with_blur = ROUTINES[routine]
    n = image_size
    if factor_2 and n % 2**self.num_steps:
      raise ValueError(
          f"degradation.time_steps={self.num_steps}: {routine} halves the image "
          f"at every step, so data.image_size={n} must be divisible by "
          f"2**time_steps; use at most {_max_halvings(n)} steps.")
    if not factor_2 and self.num_steps > n - 1:
      raise ValueError(
          f"degradation.time_steps={self.num_steps}: {routine} removes one pixel "
          f"per step, so it allows at most data.image_size-1={n - 1} steps.")
    self.sizes = down_sizes(routine, n, self.num_steps)
    blur = operators.conv_operator(operators.gaussian_1d(3, 0.5), n, "reflect")
    up_of = {}
    steps = []
    for size in self.sizes:
      if size not in up_of:
        op = operators.nearest_exact_operator(size, n) @ _DOWN[mode](n, size)
        up_of[size] = blur @ op @ blur if with_blur else op
      steps.append(up_of[size])
    self._set_table(operators.cumulative(steps, n))


def _max_halvings(n: int) -> int:
  count = 0
  while n % 2 == 0:
    n //= 2
    count += 1
  return count
