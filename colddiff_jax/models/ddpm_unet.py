"""The DDPM ResNet U-Net (`Model` of the official code), in Flax NNX (NHWC).

Ho et al.'s CIFAR-10 architecture as ported to PyTorch and used by the official
Cold Diffusion code for every CIFAR-10 blur, inpainting and super-resolution
run (spec §2.2):

* time embedding: sinusoids(t, ch) -> Linear(ch, 4ch) -> swish -> Linear.
* ResnetBlock: GN -> swish -> conv3x3 -> + Linear(swish(temb)) -> GN -> swish
  -> dropout -> conv3x3, plus a 1x1 conv shortcut when the width changes.
  GroupNorm has 32 groups and eps 1e-6.
* AttnBlock: GN -> 1x1 q, k, v -> single-head softmax attention with scale
  C^-1/2 -> 1x1 projection -> residual.
* Downsample: zero-pad right and bottom by one, 3x3 conv with stride 2 and no
  padding (or 2x2 average pooling without conv). Upsample: nearest x2, then a
  3x3 conv.
* Down levels push every block output (and the downsampled map) as skips; each
  up level runs num_res_blocks + 1 blocks, each on concat(h, skip).

Initialisation follows PyTorch's defaults, like `unet.Unet`; GroupNorm scales
are 1 and offsets 0. Mixed precision follows `unet.Unet` too: GroupNorm
statistics and the attention softmax run in float32.

Dropout is functional: it is active only when `__call__` gets a `dropout_rng`
key; without one the network is deterministic (the official eval() mode).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from colddiff_jax.models import layers
from colddiff_jax.models.unet import conv, linear, sinusoidal_embedding

Dtype = Any


def swish(x: jax.Array) -> jax.Array:
  """x * sigmoid(x), the official `nonlinearity`."""
  return x * jax.nn.sigmoid(x)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout (PyTorch semantics); the identity when `rng` is None."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype),
                   jnp.zeros_like(x))


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm over NHWC, statistics in float32 (biased variance)."""

  TORCH_NAMES = {"scale": "weight", "bias": "bias"}

  def __init__(self, channels: int, *, groups: int = 32, eps: float = 1e-6,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    if channels % groups:
      raise ValueError(f"GroupNorm: {channels} channels are not divisible by "
                       f"{groups} groups.")
    self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))
    self.groups = groups
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.normalize(x, self.scale[...], self.bias[...], self.groups,
                            self.eps, layers.GROUP_NORM_AXES, self.dtype)


class ResnetBlock(nnx.Module):
  """The DDPM residual block with a per-channel time projection."""

  TORCH_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "temb_proj",
                 "norm2": "norm2", "conv2": "conv2",
                 "nin_shortcut": "nin_shortcut"}

  def __init__(self, in_ch: int, out_ch: int, *, temb_ch: int, dropout: float,
               dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = GroupNorm(in_ch, **kw)
    self.conv1 = conv(in_ch, out_ch, 3, rngs=rngs, **kw)
    self.temb_proj = linear(temb_ch, out_ch, rngs=rngs, **kw)
    self.norm2 = GroupNorm(out_ch, **kw)
    self.conv2 = conv(out_ch, out_ch, 3, rngs=rngs, **kw)
    self.nin_shortcut = (conv(in_ch, out_ch, 1, rngs=rngs, **kw)
                         if in_ch != out_ch else None)
    self.dropout = dropout

  def __call__(self, x: jax.Array, temb: jax.Array,
               rng: jax.Array | None) -> jax.Array:
    h = self.conv1(swish(self.norm1(x)))
    h = layers.add_per_sample(h, self.temb_proj(swish(temb)))
    h = self.conv2(dropout(swish(self.norm2(h)), self.dropout, rng))
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nnx.Module):
  """Single-head spatial self-attention with a residual connection."""

  TORCH_NAMES = {"norm": "norm", "q": "q", "k": "k", "v": "v",
                 "proj_out": "proj_out"}

  def __init__(self, channels: int, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm = GroupNorm(channels, **kw)
    self.q = conv(channels, channels, 1, rngs=rngs, **kw)
    self.k = conv(channels, channels, 1, rngs=rngs, **kw)
    self.v = conv(channels, channels, 1, rngs=rngs, **kw)
    self.proj_out = conv(channels, channels, 1, rngs=rngs, **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    hn = self.norm(x)
    q = self.q(hn).reshape(b, h * w, c)
    k = self.k(hn).reshape(b, h * w, c)
    v = self.v(hn).reshape(b, h * w, c)
    # Logits leave the matmul in float32: rounding them to bf16 would perturb
    # the softmax weights by ~1% for logits of magnitude ~10.
    logits = jnp.einsum("bic,bjc->bij", q, k,
                        preferred_element_type=jnp.float32) * (c ** -0.5)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bij,bjc->bic", weights.astype(self.dtype), v)
    return x + self.proj_out(out.reshape(b, h, w, c))


class Downsample(nnx.Module):
  """Halves H and W: right/bottom zero pad + 3x3 stride-2 conv, or avg pool."""

  TORCH_NAMES = {"conv": "conv"}

  def __init__(self, channels: int, *, with_conv: bool, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    # Padding (0, 1) per axis with a VALID stride-2 conv is exactly the
    # official F.pad(x, (0, 1, 0, 1)) followed by Conv2d(3, stride 2, pad 0).
    self.conv = (conv(channels, channels, 3, stride=2,
                      padding=((0, 1), (0, 1)), rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype) if with_conv else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.conv is not None:
      return self.conv(x)
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Upsample(nnx.Module):
  """Doubles H and W: nearest-neighbour repeat, then an optional 3x3 conv."""

  TORCH_NAMES = {"conv": "conv"}

  def __init__(self, channels: int, *, with_conv: bool, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    self.conv = (conv(channels, channels, 3, rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype) if with_conv else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.conv is not None:
      # The same function; on CPU without materialising the upsampled map.
      return layers.nearest_upsample_conv(self.conv, x)
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Level(nnx.Module):
  """One resolution level: ResNet blocks, their attention blocks, resampler."""

  TORCH_NAMES = {"block": "block", "attn": "attn", "downsample": "downsample",
                 "upsample": "upsample"}

  def __init__(self, blocks, attns, *, downsample=None, upsample=None):
    self.block = nnx.List(blocks)
    self.attn = nnx.List(attns)
    self.downsample = downsample
    self.upsample = upsample


class DDPMUnet(nnx.Module):
  """The DDPM ResNet U-Net of Ho et al. (official `Model`, spec §2.2), NHWC."""

  TORCH_NAMES = {"temb_dense0": "temb.dense.0", "temb_dense1": "temb.dense.1",
                 "conv_in": "conv_in", "down": "down", "mid_block_1":
                 "mid.block_1", "mid_attn_1": "mid.attn_1", "mid_block_2":
                 "mid.block_2", "up": "up", "norm_out": "norm_out",
                 "conv_out": "conv_out"}

  def __init__(self, *, ch: int, out_ch: int,
               ch_mult: Sequence[int] = (1, 2, 4, 8),
               num_res_blocks: int, attn_resolutions: Sequence[int],
               dropout: float = 0.0, resamp_with_conv: bool = True,
               in_channels: int, resolution: int, remat: bool = False,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    """Builds the network (argument names as in the official `Model`).

    Args:
      ch: base width (a multiple of 32: GroupNorm has 32 groups).
      out_ch: output channels.
      ch_mult: width multiplier per resolution level.
      num_res_blocks: ResNet blocks per down level (up levels get one more).
      attn_resolutions: feature-map sides at which attention blocks follow the
        ResNet blocks.
      dropout: dropout rate inside the ResNet blocks (used only when a
        dropout key is passed to `__call__`).
      resamp_with_conv: convolutions in the down/upsamplers.
      in_channels: input channels.
      resolution: input side; the official network asserts H == W == it.
      remat: recompute each block's activations in the backward pass
        instead of storing them (`layers.call`); same function and
        gradients, less memory, up to ~1.3x the training step's time.
      dtype: compute dtype; the output is float32.
      param_dtype: parameter storage dtype.
      rngs: PRNG streams for initialisation (`params`).
    """
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.ch = ch
    self.num_res_blocks = num_res_blocks
    self.resolution = resolution
    self.dtype = dtype
    self.remat = remat
    temb_ch = 4 * ch
    n = len(ch_mult)
    self.num_resolutions = n

    self.temb_dense0 = linear(ch, temb_ch, rngs=rngs, **kw)
    self.temb_dense1 = linear(temb_ch, temb_ch, rngs=rngs, **kw)
    self.conv_in = conv(in_channels, ch, 3, rngs=rngs, **kw)

    def res(i, o):
      return ResnetBlock(i, o, temb_ch=temb_ch, dropout=dropout, rngs=rngs,
                         **kw)

    def attn(c):
      return AttnBlock(c, rngs=rngs, **kw)

    in_ch_mult = (1,) + tuple(ch_mult)
    curr_res = resolution
    down = []
    for i_level in range(n):
      blocks, attns = [], []
      block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
      for _ in range(num_res_blocks):
        blocks.append(res(block_in, block_out))
        block_in = block_out
        if curr_res in attn_resolutions:
          attns.append(attn(block_in))
      ds = None
      if i_level != n - 1:
        ds = Downsample(block_in, with_conv=resamp_with_conv, rngs=rngs, **kw)
        curr_res //= 2
      down.append(Level(blocks, attns, downsample=ds))
    self.down = nnx.List(down)

    self.mid_block_1 = res(block_in, block_in)
    self.mid_attn_1 = attn(block_in)
    self.mid_block_2 = res(block_in, block_in)

    up = [None] * n
    for i_level in reversed(range(n)):
      blocks, attns = [], []
      block_out = ch * ch_mult[i_level]
      skip_in = ch * ch_mult[i_level]
      for i_block in range(num_res_blocks + 1):
        if i_block == num_res_blocks:
          # The last skip of a level is the map that entered it.
          skip_in = ch * in_ch_mult[i_level]
        blocks.append(res(block_in + skip_in, block_out))
        block_in = block_out
        if curr_res in attn_resolutions:
          attns.append(attn(block_in))
      us = None
      if i_level != 0:
        us = Upsample(block_in, with_conv=resamp_with_conv, rngs=rngs, **kw)
        curr_res *= 2
      # Stored by level index (up[0] is full resolution), as in the official
      # `self.up.insert(0, up)`, so checkpoint keys line up.
      up[i_level] = Level(blocks, attns, upsample=us)
    self.up = nnx.List(up)

    self.norm_out = GroupNorm(block_in, **kw)
    self.conv_out = conv(block_in, out_ch, 3, rngs=rngs, **kw)

  def time_embedding(self, t: jax.Array) -> jax.Array:
    """Sinusoids(t, ch) -> Linear(ch, 4ch) -> swish -> Linear(4ch, 4ch)."""
    emb = sinusoidal_embedding(t, self.ch).astype(self.dtype)
    return self.temb_dense1(swish(self.temb_dense0(emb)))

  def __call__(self, x: jax.Array, t: jax.Array, *,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """Predicts the network output for a batch.

    Args:
      x: [B, resolution, resolution, in_channels] images.
      t: [B] integer time indices (the official 0-based index, used raw).
      dropout_rng: PRNG key enabling dropout (training); None = deterministic.

    Returns:
      [B, resolution, resolution, out_ch] float32.

    Raises:
      ValueError: if the spatial size is not `resolution` (the attention
        placement depends on it).
    """
    if x.shape[1] != self.resolution or x.shape[2] != self.resolution:
      raise ValueError(f"DDPMUnet built for {self.resolution}x"
                       f"{self.resolution} inputs got {x.shape[1:3]}.")
    keys = iter(jax.random.split(dropout_rng, self._num_res_blocks_total())
                if dropout_rng is not None else [])

    run = functools.partial(layers.call, remat=self.remat)

    def block(b, h):
      return run(b, h, temb, next(keys, None))

    temb = self.time_embedding(t)
    hs = [self.conv_in(x.astype(self.dtype))]
    for level in self.down:
      for i_block in range(self.num_res_blocks):
        h = block(level.block[i_block], hs[-1])
        if len(level.attn):
          h = run(level.attn[i_block], h)
        hs.append(h)
      if level.downsample is not None:
        hs.append(level.downsample(hs[-1]))
    h = hs[-1]
    h = block(self.mid_block_1, h)
    h = run(self.mid_attn_1, h)
    h = block(self.mid_block_2, h)
    for i_level in reversed(range(self.num_resolutions)):
      level = self.up[i_level]
      for i_block in range(self.num_res_blocks + 1):
        h = block(level.block[i_block],
                  jnp.concatenate([h, hs.pop()], axis=-1))
        if len(level.attn):
          h = run(level.attn[i_block], h)
      if level.upsample is not None:
        h = level.upsample(h)
    h = self.conv_out(swish(self.norm_out(h)))
    return h.astype(jnp.float32)

  def _num_res_blocks_total(self) -> int:
    """ResNet blocks in the network: one dropout key each."""
    n = self.num_resolutions
    return n * self.num_res_blocks + 2 + n * (self.num_res_blocks + 1)
