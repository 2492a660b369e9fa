"""Animorphosis / demixing (the official DM package).

D(x0, s) = sqrt(abar[s-1]) * x0 + sqrt(1 - abar[s-1]) * z with the cosine
schedule of the hot-noise baseline, where x0 is the target-domain image (CelebA)
and z an independently paired partner image from the start domain (AFHQ). The
fully degraded state is (almost exactly) the partner image, where sampling
starts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from colddiff_jax.degradations import base
from colddiff_jax.degradations import noise


@base.register("mix")
class Mix(noise.CosineInterpolation):
  """Cosine interpolation towards a partner image; aux = {'z': partner}."""

  def sample_aux(self, rng: jax.Array, batch_size: int) -> base.Aux:
    """Not available: the partner images come from a data set, not a PRNG."""
    del rng, batch_size
    raise ValueError(
        "degradation.name='mix' needs partner images (the start-domain batch, "
        "e.g. AFHQ) that cannot be drawn from a PRNG key; build aux with "
        "deg.make_aux(partner) from a batch of partner images instead.")

  def make_aux(self, partner: jax.Array) -> base.Aux:
    """Wraps a partner batch [B, H, W, C] in [-1, 1] as the aux of `apply`."""
    partner = jnp.asarray(partner, dtype=jnp.float32)
    expected = (self.image_size, self.image_size, self.channels)
    if partner.ndim != 4 or tuple(partner.shape[1:]) != expected:
      raise ValueError(
          f"mix partner images must have shape [B, {expected[0]}, {expected[1]}, "
          f"{expected[2]}], got {tuple(partner.shape)}.")
    return {"z": partner}
