"""SSIM and RMSE exactly as the official metric loop reports them.

Both take images on the [0, 1] scale, unclamped (the official code does not
clamp), NHWC. 1-channel images are repeated to 3 channels first, as the official
loop does; this changes neither metric but keeps the averaging identical.
"""

from __future__ import annotations

import dm_pix
import jax
import jax.numpy as jnp


def _rgb(x: jax.Array) -> jax.Array:
  return jnp.repeat(x, 3 // x.shape[-1], axis=-1) if x.shape[-1] == 1 else x


def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-image SSIM [B] of pytorch_msssim's defaults (11x11 Gaussian, σ=1.5,
  K=(0.01, 0.03), valid filtering, data range 1), which dm-pix implements."""
  return dm_pix.ssim(_rgb(a), _rgb(b), max_val=1.0, filter_size=11,
                     filter_sigma=1.5, k1=0.01, k2=0.03)


def squared_errors(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-image Σ (a - b)² [B], for a global RMSE accumulated over batches."""
  return jnp.sum(jnp.square(_rgb(a).astype(jnp.float32) - _rgb(b)), axis=(1, 2, 3))


def squared_error_sum(a: jax.Array, b: jax.Array) -> jax.Array:
  """Σ (a - b)² over a batch, for a global RMSE accumulated over batches."""
  return jnp.sum(squared_errors(a, b))


def rmse(a: jax.Array, b: jax.Array) -> jax.Array:
  """The official global RMSE: sqrt of the mean over every element of the set."""
  return jnp.sqrt(squared_error_sum(a, b) / _rgb(a).size)
