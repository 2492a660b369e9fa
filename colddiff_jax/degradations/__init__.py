"""Forward degradations of Cold Diffusion, one module per family.

Usage:
  from colddiff_jax import degradations
  deg = degradations.build(config.degradation, image_size=32, channels=3)
  aux = deg.sample_aux(rng, batch_size)   # None for deterministic families
  x_s = deg.apply(x0, s, aux)             # s int32 [B] in 0..T
"""

from colddiff_jax.degradations import blur  # noqa: F401  (registers families)
from colddiff_jax.degradations import decolor  # noqa: F401
from colddiff_jax.degradations import mask  # noqa: F401
from colddiff_jax.degradations import mix  # noqa: F401
from colddiff_jax.degradations import noise  # noqa: F401
from colddiff_jax.degradations import resolution  # noqa: F401
from colddiff_jax.degradations import snow  # noqa: F401
from colddiff_jax.degradations.base import Aux, Degradation, build, families

__all__ = ["Aux", "Degradation", "build", "families"]
