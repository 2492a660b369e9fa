"""Convolution layers with a fast CPU path.

XLA:CPU runs grouped convolutions (`feature_group_count > 1`) through a slow
generic kernel: a 7x7 depthwise convolution of the ConvNeXt blocks costs ~30x
more there than on the arithmetic it does, and dominates a CPU training step.
On CPU `DepthwiseConv` therefore computes the same convolution as a sum of 49
shifted, scaled copies (forward and input gradient) and takes the kernel
gradient as an FFT cross-correlation. On GPU/TPU it is a plain `nnx.Conv`.
`PointwiseConv` runs a 1x1 convolution as a matmul on every backend.

Both subclass `nnx.Conv`: same parameters, same initialisation, same checkpoint
layout; only `__call__` differs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _shift_correlate(x: jax.Array, w: jax.Array) -> jax.Array:
  """'same' depthwise cross-correlation of x [B,H,W,C] with w [k,k,C]."""
  k = w.shape[0]
  p = k // 2
  h, wd = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out = jnp.zeros_like(x)
  for i in range(k):
    for j in range(k):
      out = out + xp[:, i:i + h, j:j + wd, :] * w[i, j]
  return out


@jax.custom_vjp
def depthwise_same(x: jax.Array, w: jax.Array) -> jax.Array:
  """Depthwise 'same' cross-correlation (odd square kernel w [k,k,C], zero pad)."""
  return _shift_correlate(x, w)


def _fwd(x, w):
  return _shift_correlate(x, w), (x, w)


def _bwd(res, g):
  x, w = res
  k = w.shape[0]
  p = k // 2
  # dL/dx: correlate the cotangent with the kernel flipped in both axes.
  gx = _shift_correlate(g, w[::-1, ::-1])
  # dL/dw[i, j, c] = sum_{b,h,w} xpad[b, h+i, w+j, c] * g[b, h, w, c]: a
  # cross-correlation over space summed over the batch, done with FFTs.
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))).astype(jnp.float32)
  size = (xp.shape[1], xp.shape[2])
  gp = jnp.pad(g.astype(jnp.float32),
               ((0, 0), (0, size[0] - g.shape[1]), (0, size[1] - g.shape[2]), (0, 0)))
  spectrum = jnp.sum(jnp.fft.rfft2(xp, axes=(1, 2)) *
                     jnp.conj(jnp.fft.rfft2(gp, axes=(1, 2))), axis=0)
  gw = jnp.fft.irfft2(spectrum, s=size, axes=(0, 1))[:k, :k]
  return gx, gw.astype(w.dtype)


depthwise_same.defvjp(_fwd, _bwd)


class DepthwiseConv(nnx.Conv):
  """A depthwise ('same', stride 1, odd kernel) conv with a fast CPU path."""

  def __call__(self, x: jax.Array) -> jax.Array:
    if jax.default_backend() != "cpu":
      return super().__call__(x)
    dtype = self.dtype or x.dtype
    kernel = self.kernel[...].astype(dtype)[:, :, 0, :]
    y = depthwise_same(x.astype(dtype), kernel)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class PointwiseConv(nnx.Conv):
  """A 1x1 conv computed as a matmul over the channel axis."""

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype)[0, 0])
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y
