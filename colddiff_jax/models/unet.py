"""The ConvNeXt U-Net of the official Cold Diffusion code, in Flax NNX (NHWC).

This is the `Unet` every non-CIFAR run of the official implementation trains
(lucidrains' mid-2022 `denoising-diffusion-pytorch` design, spec §2.1). It is
reproduced quirk for quirk so that the official PyTorch checkpoints load into it
(`colddiff_jax.convert`) and give the same outputs:

* LayerNorm normalises over the channel axis only (biased variance, eps 1e-5,
  parameters `g`, `b` of shape [C]).
* LinearAttention does not softmax q; k is softmaxed over the spatial
  positions; channels are head-major (channel = head * 32 + c).
* The first block of the first down stage has no LayerNorm.
* Every down stage pushes a skip, but only the last len(dim_mults)-1 are
  concatenated on the way up: the full-resolution skip is never used.
* The head ConvNeXt block gets no time embedding.
* The time index enters the sinusoidal embedding raw (0-based, not rescaled).

Initialisation follows PyTorch's defaults (the networks were trained from
them): every conv/linear weight and bias is U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
with fan_in = in_channels / groups * kernel area (for the transposed conv,
PyTorch's rule gives out_channels * kernel area); norm gains are 1, offsets 0.
The draws come from threefry in fixed-size chunks (`torch_uniform`), so eager
construction compiles one kernel, not one per parameter shape, and gives the
same values as construction under `jax.jit`.

Mixed precision: parameters are stored in `param_dtype`; convolutions and
matmuls run in `dtype`; normalisation statistics, the attention softmax and the
time embedding's sinusoids run in float32; the output is float32.

The helpers at the top (initialisers, conv/linear factories, the sinusoidal
embedding) are shared with `ddpm_unet`.

Each module class names the PyTorch submodule behind each of its attributes in
`TORCH_NAMES`; `colddiff_jax.convert` walks those to map checkpoint keys.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from colddiff_jax.models import layers

Dtype = Any

# ------------------------------------------------------------ shared helpers --


# Random draws are made in fixed-size chunks so that eager initialisation
# compiles one threefry kernel in total instead of one per parameter shape
# (each costs ~1 s of XLA compile time on CPU; a U-Net has ~100 shapes).
_CHUNK = 1 << 16


@jax.jit
def _uniform_chunk(key: jax.Array, index: jax.Array,
                   bound: jax.Array) -> jax.Array:
  return jax.random.uniform(jax.random.fold_in(key, index), (_CHUNK,),
                            jnp.float32, -bound, bound)


def _chunked_uniform(key: jax.Array, shape, bound: float) -> jax.Array:
  """U(-bound, bound) of `shape`: chunk i is drawn from fold_in(key, i).

  Eagerly the chunks come from one compiled kernel; under a trace (jit,
  nnx.eval_shape) they are one vmapped draw. Both give the same values.
  """
  n = math.prod(shape)
  chunks = -(-n // _CHUNK)
  bound = jnp.float32(bound)
  if isinstance(key, jax.core.Tracer):
    flat = jax.vmap(lambda i: _uniform_chunk(key, i, bound))(
        jnp.arange(chunks, dtype=jnp.uint32)).reshape(-1)
    return flat[:n].reshape(shape)
  flat = np.concatenate([np.asarray(_uniform_chunk(key, np.uint32(i), bound))
                         for i in range(chunks)])
  return jnp.asarray(flat[:n].reshape(shape))


def torch_uniform(fan_in: int) -> nnx.initializers.Initializer:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for conv/linear.

  PyTorch draws weights with kaiming_uniform(a=sqrt(5)) and biases uniformly
  with the same bound; both reduce to this distribution.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return _chunked_uniform(key, tuple(shape), bound).astype(dtype)

  return init


def conv(in_ch: int, out_ch: int, kernel: int, *, rngs: nnx.Rngs,
         stride: int = 1, padding: Any = "SAME", groups: int = 1,
         use_bias: bool = True, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32) -> nnx.Conv:
  """A 2-D NHWC convolution with PyTorch's default initialisation.

  `padding="SAME"` equals PyTorch's `padding=k // 2` for the odd kernels and
  stride 1 used here; strided convolutions pass explicit pairs.
  """
  init = torch_uniform(in_ch // groups * kernel * kernel)
  if groups == in_ch == out_ch and groups > 1 and stride == 1:
    cls = layers.DepthwiseConv
  elif kernel == 1 and stride == 1 and groups == 1:
    cls = layers.PointwiseConv
  else:
    cls = layers.Conv
  return cls(in_ch, out_ch, (kernel, kernel), strides=stride,
                  padding=padding, feature_group_count=groups,
                  use_bias=use_bias, kernel_init=init, bias_init=init,
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs,
           dtype: Dtype = jnp.float32,
           param_dtype: Dtype = jnp.float32) -> nnx.Linear:
  """A dense layer with PyTorch's default initialisation."""
  init = torch_uniform(in_features)
  return nnx.Linear(in_features, out_features, kernel_init=init,
                    bias_init=init, dtype=dtype, param_dtype=param_dtype,
                    rngs=rngs)


def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Transformer sinusoids of the raw time index, sin half first, float32.

  Frequencies are exp(-j * ln(10000) / (dim/2 - 1)), j = 0..dim/2-1, as in both
  official networks (ConvNeXt `SinusoidalPosEmb` and DDPM
  `get_timestep_embedding`). An odd `dim` gets a trailing zero column (DDPM).

  Args:
    t: [B] integer (or float) time indices, used as given.
    dim: embedding width; dim // 2 must be at least 2.

  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32)
                  * jnp.float32(-math.log(10000.0) / (half - 1)))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, PyTorch's `nn.GELU()` default: x (1 + erf(x / sqrt 2)) / 2.

  Written with erf, as PyTorch's kernels write it, not through
  `jax.nn.gelu(approximate=False)`: that one takes erfc, whose XLA expansion
  (two polynomials and selects) made the forward pass 1.5x and forward plus
  backward 1.3-2x slower at the networks' shapes on CPU. Equal to it within
  ~1e-6.
  """
  half = jnp.asarray(0.5, x.dtype)
  return half * x * (1 + lax.erf(x * jnp.asarray(np.sqrt(0.5), x.dtype)))


# ------------------------------------------------------------------ layers --


class ChannelLayerNorm(nnx.Module):
  """The official ConvNeXt LayerNorm: per pixel, over channels only.

  (x - mean_c) / sqrt(var_c + eps) * g + b with the biased variance. Statistics
  are computed in float32 whatever the compute dtype.
  """

  TORCH_NAMES = {}

  def __init__(self, channels: int, *, eps: float = 1e-5,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    self.g = nnx.Param(jnp.ones((channels,), param_dtype))
    self.b = nnx.Param(jnp.zeros((channels,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.normalize(x, self.g[...], self.b[...], 1, self.eps, (4,),
                            self.dtype)


class ConvNextBlock(nnx.Module):
  """depthwise 7x7 (+ time) -> [LN] -> 3x3 (2*out) -> GELU -> 3x3, + shortcut.

  The time projection is GELU then Linear(time_dim -> in), added per channel
  after the depthwise conv. The shortcut is a 1x1 conv when in != out.
  """

  TORCH_NAMES = {"time_proj": "mlp.1", "ds_conv": "ds_conv", "norm": "net.0",
                 "conv1": "net.1", "conv2": "net.3", "res_conv": "res_conv"}

  def __init__(self, in_ch: int, out_ch: int, *, time_dim: int | None,
               norm: bool = True, mult: int = 2, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.time_proj = (linear(time_dim, in_ch, rngs=rngs, **kw)
                      if time_dim is not None else None)
    self.ds_conv = conv(in_ch, in_ch, 7, groups=in_ch, rngs=rngs, **kw)
    self.norm = ChannelLayerNorm(in_ch, **kw) if norm else None
    self.conv1 = conv(in_ch, out_ch * mult, 3, rngs=rngs, **kw)
    self.conv2 = conv(out_ch * mult, out_ch, 3, rngs=rngs, **kw)
    self.res_conv = (conv(in_ch, out_ch, 1, rngs=rngs, **kw)
                     if in_ch != out_ch else None)

  def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
    h = self.ds_conv(x)
    if self.time_proj is not None and temb is not None:
      h = h + self.time_proj(gelu(temb))[:, None, None, :]
    if self.norm is not None:
      h = self.norm(h)
    h = self.conv2(gelu(self.conv1(h)))
    return h + (self.res_conv(x) if self.res_conv is not None else x)


class LinearAttention(nnx.Module):
  """x + LinearAttention(LN(x)), the official pre-norm residual wrapper.

  Linear attention with 4 heads of 32 channels whatever the block width: q is
  scaled by 32^-1/2 but NOT softmaxed, k is softmaxed over the H*W positions,
  context[d, e] = sum_n k[d, n] v[e, n] and
  out[e, n] = sum_d context[d, e] q[d, n].
  Channels of q, k, v and of the output are head-major (head * 32 + c), the
  layout of the PyTorch `rearrange('b (h c) x y -> b h c (x y)')`.
  """

  TORCH_NAMES = {"norm": "fn.norm", "to_qkv": "fn.fn.to_qkv",
                 "to_out": "fn.fn.to_out"}

  def __init__(self, channels: int, *, heads: int = 4, dim_head: int = 32,
               dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    hidden = heads * dim_head
    self.heads = heads
    self.dim_head = dim_head
    self.dtype = dtype
    self.norm = ChannelLayerNorm(channels, **kw)
    self.to_qkv = conv(channels, 3 * hidden, 1, use_bias=False, rngs=rngs, **kw)
    self.to_out = conv(hidden, channels, 1, rngs=rngs, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    if layers.use_fast_paths():
      return x + self.to_out(self._attend_cpu(self.norm(x)))
    b, h, w, _ = x.shape
    qkv = self.to_qkv(self.norm(x)).reshape(b, h * w, 3, self.heads,
                                            self.dim_head)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, d]
    q = q * jnp.asarray(self.dim_head ** -0.5, q.dtype)
    k = jax.nn.softmax(k.astype(jnp.float32), axis=1).astype(self.dtype)
    context = jnp.einsum("bnhd,bnhe->bhde", k, v)
    out = jnp.einsum("bhde,bnhd->bnhe", context, q)
    out = out.reshape(b, h, w, self.heads * self.dim_head)
    return x + self.to_out(out)

  def _attend_cpu(self, xn: jax.Array) -> jax.Array:
    """The same attention in the [B, N, channels] layout, for XLA:CPU.

    The per-head einsums above make XLA:CPU transpose q, k, v and the output
    to put the head axis first (the attention block then runs ~2x slower,
    forward and backward). Here q, k and v come from three matmuls with
    column blocks of the to_qkv kernel, and both contractions run over all
    heads x dim_head channels at once: context[b, c, c'] = sum_n k v, with
    the cross-head entries zeroed, then out = q context. The zeroed entries
    add exact zeros, so only the summation order differs.
    """
    b, h, w, c = xn.shape
    hidden = self.heads * self.dim_head
    kernel = self.to_qkv.kernel[...].astype(self.dtype)[0, 0]
    flat = xn.astype(self.dtype).reshape(b * h * w, c)
    q, k, v = (jnp.dot(flat, kernel[:, i * hidden:(i + 1) * hidden]).reshape(
        b, h * w, hidden) for i in range(3))
    q = q * jnp.asarray(self.dim_head ** -0.5, q.dtype)
    k = jax.nn.softmax(k.astype(jnp.float32), axis=1).astype(self.dtype)
    head = np.arange(hidden) // self.dim_head
    same_head = jnp.asarray(head[:, None] == head[None, :], self.dtype)
    context = jnp.einsum("bnc,bne->bce", k, v) * same_head
    out = jnp.einsum("bnc,bce->bne", q, context)
    return out.reshape(b, h, w, hidden)


class Stage(nnx.Module):
  """One U-Net level: two ConvNeXt blocks, attention, then a resampler.

  `resample` is the strided 4x4 conv (down path), the 4x4 transposed conv (up
  path) or None (identity, the last down stage).
  """

  TORCH_NAMES = {"block1": "0", "block2": "1", "attn": "2", "resample": "3"}

  def __init__(self, block1: ConvNextBlock, block2: ConvNextBlock,
               attn: LinearAttention, resample: nnx.Module | None):
    self.block1 = block1
    self.block2 = block2
    self.attn = attn
    self.resample = resample


# -------------------------------------------------------------------- Unet --


class Unet(nnx.Module):
  """The official ConvNeXt U-Net (spec §2.1), NHWC.

  Channel list [C, dim*m for m in dim_mults]; down stage i maps dims[i] ->
  dims[i+1] at resolution R / 2**i and halves the resolution except at the
  last stage; the middle is block, attention, block at the widest width; each
  of the len(dim_mults) - 1 up stages concatenates [x, skip], runs two blocks
  and attention and doubles the resolution; the head is a ConvNeXt block
  without time embedding and a 1x1 conv to `out_dim` channels.
  """

  TORCH_NAMES = {"time_fc1": "time_mlp.1", "time_fc2": "time_mlp.3",
                 "downs": "downs", "ups": "ups", "mid_block1": "mid_block1",
                 "mid_attn": "mid_attn", "mid_block2": "mid_block2",
                 "final_block": "final_conv.0", "final_conv": "final_conv.1"}

  def __init__(self, *, channels: int, dim: int = 64,
               dim_mults: Sequence[int] = (1, 2, 4, 8),
               with_time_emb: bool = True, residual: bool = False,
               out_dim: int | None = None, attn_heads: int = 4,
               attn_dim_head: int = 32, remat: bool = False,
               dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    """Builds the network.

    Args:
      channels: image channels C of the input.
      dim: base width; also the time-embedding width.
      dim_mults: width multiplier per resolution level.
      with_time_emb: condition on the time index (time MLP + per-block
        projections); False removes them all.
      residual: add the input image to the output.
      out_dim: output channels (default `channels`).
      attn_heads: heads of every LinearAttention (official: 4).
      attn_dim_head: channels per head (official: 32, whatever the width).
      remat: recompute each block's activations in the backward pass
        instead of storing them (`layers.call`); same function and
        gradients, less memory, up to ~1.3x the training step's time.
      dtype: compute dtype (e.g. jnp.bfloat16); the output is float32.
      param_dtype: parameter storage dtype.
      rngs: PRNG streams for initialisation (`params`).
    """
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    attn_kw = dict(heads=attn_heads, dim_head=attn_dim_head)
    self.channels = channels
    self.dim = dim
    self.residual = residual
    self.dtype = dtype
    self.with_time_emb = with_time_emb
    self.remat = remat
    dims = [channels] + [dim * m for m in dim_mults]
    in_out = list(zip(dims[:-1], dims[1:]))
    n = len(in_out)

    time_dim = dim if with_time_emb else None
    if with_time_emb:
      self.time_fc1 = linear(dim, dim * 4, rngs=rngs, **kw)
      self.time_fc2 = linear(dim * 4, dim, rngs=rngs, **kw)
    else:
      self.time_fc1 = self.time_fc2 = None

    def block(i, o, norm=True):
      return ConvNextBlock(i, o, time_dim=time_dim, norm=norm, rngs=rngs, **kw)

    downs = []
    for i, (d_in, d_out) in enumerate(in_out):
      # The very first block sees the raw image: the official code builds it
      # without LayerNorm.
      block1, block2 = block(d_in, d_out, norm=i != 0), block(d_out, d_out)
      attn = LinearAttention(d_out, rngs=rngs, **attn_kw, **kw)
      down = (conv(d_out, d_out, 4, stride=2, padding=((1, 1), (1, 1)),
                   rngs=rngs, **kw) if i < n - 1 else None)
      downs.append(Stage(block1, block2, attn, down))
    self.downs = nnx.List(downs)

    mid = dims[-1]
    self.mid_block1 = block(mid, mid)
    self.mid_attn = LinearAttention(mid, rngs=rngs, **attn_kw, **kw)
    self.mid_block2 = block(mid, mid)

    ups = []
    for d_in, d_out in reversed(in_out[1:]):
      # The official `is_last` test compares against len(dim_mults) - 1 but
      # only len(dim_mults) - 1 up stages exist, so every one upsamples.
      up = layers.ConvTranspose(
          d_in, d_in, (4, 4), strides=(2, 2),
          # PyTorch ConvTranspose2d(k=4, s=2, p=1) == dilate by 2, pad k-1-p.
          padding=((2, 2), (2, 2)),
          # PyTorch's fan_in for ConvTranspose2d is out_channels * k * k.
          kernel_init=torch_uniform(d_in * 16),
          bias_init=torch_uniform(d_in * 16), rngs=rngs, **kw)
      ups.append(Stage(block(2 * d_out, d_in), block(d_in, d_in),
                       LinearAttention(d_in, rngs=rngs, **attn_kw, **kw), up))
    self.ups = nnx.List(ups)

    self.final_block = ConvNextBlock(dim, dim, time_dim=None, rngs=rngs, **kw)
    self.final_conv = conv(dim, out_dim or channels, 1, rngs=rngs, **kw)

  def time_embedding(self, t: jax.Array) -> jax.Array:
    """Sinusoids of t -> Linear(dim, 4 dim) -> GELU -> Linear(4 dim, dim)."""
    emb = sinusoidal_embedding(t, self.dim).astype(self.dtype)
    return self.time_fc2(gelu(self.time_fc1(emb)))

  def __call__(self, x: jax.Array, t: jax.Array, *,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """Predicts the network output for a batch.

    Args:
      x: [B, H, W, C] images; H and W divisible by 2**(len(dim_mults) - 1).
      t: [B] integer time indices (the official 0-based index, used raw).
      dropout_rng: ignored (this network has no dropout); accepted so that
        both model classes share one call signature.

    Returns:
      [B, H, W, out_dim] float32.
    """
    del dropout_rng
    run = functools.partial(layers.call, remat=self.remat)
    h = x.astype(self.dtype)
    temb = self.time_embedding(t) if self.with_time_emb else None
    skips = []
    for stage in self.downs:
      h = run(stage.block1, h, temb)
      h = run(stage.block2, h, temb)
      h = run(stage.attn, h)
      skips.append(h)
      if stage.resample is not None:
        h = stage.resample(h)
    h = run(self.mid_block1, h, temb)
    h = run(self.mid_attn, h)
    h = run(self.mid_block2, h, temb)
    for stage in self.ups:
      # Pops the deepest skips first; skips[0] (full resolution) is left over.
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = run(stage.block1, h, temb)
      h = run(stage.block2, h, temb)
      h = run(stage.attn, h)
      h = stage.resample(h)
    out = self.final_conv(run(self.final_block, h, None)).astype(jnp.float32)
    if self.residual:
      out = out + x.astype(jnp.float32)
    return out
