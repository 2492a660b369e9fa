"""Convolution and normalisation layers with fast CPU paths.

The networks are written with plain Flax convolutions; on XLA:CPU several of
them compile to slow kernels. The layers here compute exactly the same
functions (same parameters, initialisation and checkpoint layout; only
`__call__` differs) through formulations XLA:CPU runs well. On GPU/TPU, and on
CPU inside `fast_cpu_paths(False)`, they are the plain Flax layers.

What is slow on XLA:CPU, and what replaces it:

* YNNPACK. XLA:CPU hands dense convolutions and matmuls to YNNPACK by
  default, which runs the kernel gradient of a convolution (a convolution
  whose "kernel" is the 32x32 output cotangent) 3-11x slower than the forward
  pass: ~45% of a ConvNeXt U-Net training step. Importing the package sets
  the XLA flag that gives them to Eigen instead (`xla_cpu.py`), which runs
  that gradient at forward-pass speed and was faster on every network
  pass measured. Where YNNPACK still runs the convolutions (the flag was set
  too late, or overridden), `Conv` takes dL/dW as one matmul per kernel tap
  instead (`conv_nhwc`).
* Grouped (depthwise 7x7) convolutions run through a generic kernel 13-30x
  slower than their arithmetic, with either backend. `DepthwiseConv` computes
  them as a sum of 49 shifted, scaled copies (forward and input gradient) and
  the kernel gradient as an FFT cross-correlation. Their inputs and outputs
  are materialised (`materialize`): fused into their producers or consumers,
  these 49-fold readers would recompute the producers 49 times.
* A transposed convolution lowers to a convolution over a zero-dilated input:
  4x the arithmetic of a stride-2, 4x4 transposed convolution, and ~10x the
  time. `ConvTranspose` computes each of the four output phases as a 2x2
  convolution of the input.
* `nearest_upsample_conv`: nearest x2 upsampling followed by a 3x3 convolution
  is, per output phase, a 2x2 convolution of the un-upsampled input with
  summed kernel taps (4x less arithmetic; the DDPM U-Net's `Upsample`).
* Normalisation gradients: XLA recomputes the cotangent's producers inside
  each reduction of a GroupNorm / LayerNorm backward pass; `affine_norm`
  writes that backward pass out over a materialised cotangent. GroupNorm
  takes per-(sample, channel) statistics (`_group_normalize`): broadcast
  from a [B, H, W, groups, C / groups] view, its elementwise passes
  vectorise over only C / groups lanes.
* Bias, norm-scale and time-embedding gradients are column sums, which the
  Eigen build runs 5-30x slower than a blocked sum (`sum_leading`,
  `sum_spatial`, `bias_add`, `add_per_sample`).

`PointwiseConv` runs a 1x1 convolution as a matmul on every backend.

`call` runs a block as a rematerialised segment (`train.remat`), with a
form of `jax.checkpoint` that XLA:CPU honours.

The ConvNeXt U-Net also reformulates its linear attention on CPU
(`unet.LinearAttention`). Every fast path is checked against the plain Flax
computation in tests/layers_test.py (gradients included).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
from flax import nnx

_NHWC = ("NHWC", "HWIO", "NHWC")
_fast_cpu_paths = True

@contextlib.contextmanager
def fast_cpu_paths(enabled: bool):
  """Turns the CPU fast paths on or off for functions traced in the context.

  The switch is read when a layer is traced, so jit a function inside the
  context (a function jitted earlier keeps the paths it was traced with).
  Used by the tests and benchmarks to compare against the plain Flax layers.
  """
  global _fast_cpu_paths
  previous = _fast_cpu_paths
  _fast_cpu_paths = enabled
  try:
    yield
  finally:
    _fast_cpu_paths = previous


def use_fast_paths() -> bool:
  """True when the layers take their CPU formulations (CPU backend, enabled)."""
  return _fast_cpu_paths and jax.default_backend() == "cpu"


@functools.cache
def ynn_runs_convolutions() -> bool:
  """Whether this process's XLA:CPU gives dense convolutions to YNNPACK.

  Compiles a small convolution once and looks for a YNNPACK fusion in it. With
  YNNPACK, `Conv` takes its kernel gradient as matmuls (`conv_nhwc`); with
  Eigen (see `xla_cpu.prefer_eigen_on_cpu`), XLA's own kernel gradient is faster.
  """
  x = jax.ShapeDtypeStruct((2, 8, 8, 32), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)
  hlo = jax.jit(lambda x, w: _conv(x, w, (1, 1), ((1, 1), (1, 1)))).lower(
      x, w).compile().as_text()
  return "__ynn_fusion" in hlo


def _pair(value, default: int = 1) -> tuple[int, ...]:
  """A Flax stride/dilation argument (None, int or sequence) as a tuple."""
  if value is None:
    value = default
  if isinstance(value, int):
    return (value, value)
  return tuple(value)


def materialize(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """The arrays unchanged, but computed into buffers of their own.

  XLA fuses an elementwise producer into each of its consumers. When a
  consumer reads many shifted windows of it (the 9 taps of a kernel
  gradient, the 49 of a depthwise convolution), the producer - a GELU, a
  normalisation, another 49-tap sum - is recomputed once per window.
  `lax.optimization_barrier` would stop that, but XLA:CPU removes barriers
  before fusing; fusion never crosses a conditional, so the arrays pass
  through one. Its predicate, popcount(bits of a float32) <= 32, is true for
  every value (NaN and inf included) but opaque to XLA, which therefore keeps
  the conditional; the never-taken branch returns zeros.
  """
  first = arrays[0].reshape(-1)[0].astype(jnp.float32)
  always = lax.population_count(lax.bitcast_convert_type(first, jnp.uint32)) <= 32
  return lax.cond(always, lambda *a: a,
                  lambda *a: tuple(jnp.zeros_like(v) for v in a), *arrays)


def _sum_rows(x: jax.Array) -> jax.Array:
  """x [B, N, C] summed over N, in float32: [B, C].

  XLA:CPU's Eigen build emits the plain column sum (a bias or norm-scale
  gradient) as one strided pass per channel, 5-30x slower than summing
  32-row blocks of [N/32, 32 C] first and then the 32 partial sums. The
  partial sums are materialised: XLA would otherwise merge the two sums, and
  any sum of the result (over the batch, a group), back into one column sum.
  """
  b, n, c = x.shape
  x = x.astype(jnp.float32)
  if n % 32 or n <= 32:
    return jnp.sum(x, axis=1)
  (partial,) = materialize(jnp.sum(x.reshape(b, n // 32, 32 * c), axis=1))
  return partial.reshape(b, 32, c).sum(axis=1)


def sum_leading(x: jax.Array) -> jax.Array:
  """x [..., C] summed over every axis but the last, in float32 (`_sum_rows`)."""
  c = x.shape[-1]
  return _sum_rows(x.reshape(1, x.size // c, c))[0]


def sum_spatial(x: jax.Array) -> jax.Array:
  """x [B, H, W, C] summed over H and W, in float32: [B, C] (`_sum_rows`)."""
  b, h, w, c = x.shape
  return _sum_rows(x.reshape(b, h * w, c))


@jax.custom_vjp
def bias_add(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias over the last axis; the bias gradient is `sum_leading`."""
  return y + bias


def _bias_add_fwd(y, bias):
  return y + bias, jnp.zeros((0,), bias.dtype)


def _bias_add_bwd(bias_like, g):
  return g, sum_leading(g).astype(bias_like.dtype)


bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)


@jax.custom_vjp
def _add_per_sample(x: jax.Array, v: jax.Array) -> jax.Array:
  return x + v[:, None, None, :]


def _add_per_sample_fwd(x, v):
  return x + v[:, None, None, :], jnp.zeros((0,), v.dtype)


def _add_per_sample_bwd(v_like, g):
  return g, sum_spatial(g).astype(v_like.dtype)


_add_per_sample.defvjp(_add_per_sample_fwd, _add_per_sample_bwd)


def add_per_sample(x: jax.Array, v: jax.Array) -> jax.Array:
  """x [B, H, W, C] + v [B, C] broadcast over H and W (a time embedding);
  on the CPU fast path v's gradient is the blocked `sum_spatial`."""
  if use_fast_paths():
    return _add_per_sample(x, v)
  return x + v[:, None, None, :]


# ------------------------------------------------------ dense convolution ----


def _pad_nhwc(x: jax.Array, padding) -> jax.Array:
  """Spatial (lo, hi) padding of an NHWC array; negative values crop."""
  (top, bottom), (left, right) = padding
  zero = jnp.zeros((), x.dtype)
  return lax.pad(x, zero, ((0, 0, 0), (top, bottom, 0), (left, right, 0),
                           (0, 0, 0)))


def _conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=_NHWC)


def conv_kernel_grad(x: jax.Array, g: jax.Array, kernel_size: Sequence[int],
                     strides: Sequence[int], padding) -> jax.Array:
  """dL/dW of y = conv(x, W) (NHWC/HWIO, no dilation) as per-tap matmuls.

  dL/dW[i, j] = sum_{b,h,w} xpad[b, s_h h + i, s_w w + j, :]^T g[b, h, w, :]:
  for each tap one [Cin, N] x [N, Cout] matmul over the N = B Ho Wo output
  positions, accumulated in float32.

  Args:
    x: [B, H, W, Cin] input of the convolution.
    g: [B, Ho, Wo, Cout] cotangent of its output.
    kernel_size: (kh, kw).
    strides: (s_h, s_w).
    padding: ((top, bottom), (left, right)) of the convolution.

  Returns:
    [kh, kw, Cin, Cout] float32.
  """
  kh, kw = kernel_size
  sh, sw = strides
  b, ho, wo, cout = g.shape
  cin = x.shape[-1]
  xp, g = materialize(_pad_nhwc(x, padding), g)
  g2 = g.reshape(-1, cout)
  rows = []
  for i in range(kh):
    taps = []
    for j in range(kw):
      window = lax.slice(xp, (0, i, j, 0),
                         (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin),
                         (1, sh, sw, 1))
      taps.append(lax.dot_general(window.reshape(-1, cin), g2,
                                  (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32))
    rows.append(jnp.stack(taps))
  return jnp.stack(rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x: jax.Array, w: jax.Array, strides: tuple[int, int],
              padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """lax.conv_general_dilated (NHWC, HWIO) whose kernel gradient is matmuls.

  Forward and input gradient are XLA's; dL/dW is `conv_kernel_grad`.
  `padding` is explicit ((top, bottom), (left, right)).
  """
  return _conv(x, w, strides, padding)


def _conv_nhwc_fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _conv_nhwc_bwd(strides, padding, res, g):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, strides, padding), x)
  (gx,) = vjp_x(g)
  gw = conv_kernel_grad(x, g, w.shape[:2], strides, padding)
  return gx, gw.astype(w.dtype)


conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def dense_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
               padding) -> jax.Array:
  """A dense NHWC convolution, by `conv_nhwc` where YNNPACK runs them."""
  if use_fast_paths() and ynn_runs_convolutions():
    return conv_nhwc(x, w, strides, padding)
  return _conv(x, w, strides, padding)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None,
                         **kwargs):
  """Drop-in `lax.conv_general_dilated` taking `conv_nhwc` where it applies.

  The fast path covers the dense 2-D NHWC convolutions of the networks (any
  stride and padding, no dilation, no groups) on CPU when YNNPACK runs them;
  everything else is `lax.conv_general_dilated` itself.
  """
  fast = (use_fast_paths() and ynn_runs_convolutions() and lhs.ndim == 4
          and feature_group_count == 1
          and batch_group_count == 1 and precision is None
          and preferred_element_type is None
          and kwargs.get("out_sharding") is None
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and all(d == 1 for d in (rhs_dilation or (1, 1)))
          and dimension_numbers == lax.conv_dimension_numbers(
              lhs.shape, rhs.shape, _NHWC))
  if not fast:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type, **kwargs)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides,
                                  padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return conv_nhwc(lhs, rhs, strides, padding)


class Conv(nnx.Conv):
  """`nnx.Conv` with the CPU paths: `conv_nhwc` where YNNPACK runs the
  convolution, and the bias added by `bias_add`."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("conv_general_dilated", conv_general_dilated)
    super().__init__(*args, **kwargs)

  def __call__(self, x: jax.Array) -> jax.Array:
    padding = self.padding
    explicit = (isinstance(padding, (tuple, list)) and len(padding) == 2
                and all(isinstance(p, (tuple, list)) and len(p) == 2
                        for p in padding))
    if not (use_fast_paths() and x.ndim == 4 and self.bias is not None
            and self.mask is None and self.preferred_element_type is None
            and (padding in ("SAME", "VALID") or explicit)):
      return super().__call__(x)
    x, kernel, bias = self.promote_dtype(
        (x, self.kernel[...], self.bias[...]), dtype=self.dtype)
    y = self.conv_general_dilated(
        x, kernel, _pair(self.strides),
        padding if isinstance(padding, str) else tuple(map(tuple, padding)),
        lhs_dilation=_pair(self.input_dilation),
        rhs_dilation=_pair(self.kernel_dilation),
        dimension_numbers=lax.conv_dimension_numbers(x.shape, kernel.shape,
                                                     _NHWC),
        feature_group_count=self.feature_group_count, precision=self.precision)
    return bias_add(y, bias)


# ------------------------------------------------------ rematerialisation ----


def _call(module: nnx.Module, *args):
  return module(*args)


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def _checkpoint_after_cotangent(f):
  """`jax.checkpoint(f)` that also holds on XLA:CPU.

  XLA:CPU removes the optimisation barriers `jax.checkpoint` relies on
  before scheduling, so it runs the recomputation as early as the original
  forward pass and keeps its activations as long: the MNIST network's
  gradient needed more scratch memory with `nnx.remat` than without (966 vs
  871 MiB at batch 32). Here the backward pass first passes the
  saved float inputs and the cotangent through `materialize` (a conditional,
  which XLA does not look through), so the recomputation cannot start
  before the cotangent exists or merge with the forward pass. Parameters
  (`state`) are read directly: they are live anyway.
  """

  @jax.custom_vjp
  def run(state, *args):
    return f(state, *args)

  def fwd(state, *args):
    return f(state, *args), (state, args)

  def bwd(res, g):
    state, args = res
    leaves, treedef = jax.tree.flatten((g, args))
    floats = [i for i, x in enumerate(leaves) if _is_float(x)]
    for i, x in zip(floats, materialize(*(leaves[i] for i in floats))):
      leaves[i] = x
    g, args = jax.tree.unflatten(treedef, leaves)
    _, vjp = jax.vjp(f, state, *args)
    return vjp(g)

  run.defvjp(fwd, bwd)
  return run


def call(module: nnx.Module, *args, remat: bool = False):
  """`module(*args)`; with `remat`, as one rematerialised segment.

  A rematerialised segment keeps only its inputs for the backward pass and
  recomputes its activations there: less memory for about one more forward
  pass of compute, same values and gradients. The networks wrap each
  residual block and attention block this way when built with `remat=True`
  (`config.train.remat`). `nnx.remat` (`jax.checkpoint`) on GPU/TPU and with
  the fast paths off; `_checkpoint_after_cotangent` on the CPU fast path.
  """
  if not remat:
    return module(*args)
  if not use_fast_paths():
    return nnx.remat(_call)(module, *args)
  graphdef, state = nnx.split(module)

  def pure(state, *args):
    return nnx.merge(graphdef, state)(*args)

  return _checkpoint_after_cotangent(pure)(state, *args)


# --------------------------------------------------- depthwise convolution ----


def _tree_sum(terms: list[jax.Array]) -> jax.Array:
  """Sum as a balanced tree (independent adds vectorise and pipeline better
  than one chain of k*k dependent ones)."""
  while len(terms) > 1:
    pairs = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
    terms = pairs + terms[len(pairs) * 2:]
  return terms[0]


def _shift_correlate(x: jax.Array, w: jax.Array) -> jax.Array:
  """'same' depthwise cross-correlation of x [B,H,W,C] with w [k,k,C].

  Sums each kernel row's k products, then the k row sums (1.3-1.7x faster on
  XLA:CPU than one running sum). The padded input and the result are
  materialised: each of the k*k shifted reads would otherwise recompute a
  fused producer, and every consumer (a normalisation reads its input
  several times) would recompute the sum.
  """
  k = w.shape[0]
  p = k // 2
  h, wd = x.shape[1], x.shape[2]
  (xp,) = materialize(jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))))
  rows = [_tree_sum([xp[:, i:i + h, j:j + wd, :] * w[i, j] for j in range(k)])
          for i in range(k)]
  (out,) = materialize(_tree_sum(rows))
  return out


def fft_length(n: int) -> int:
  """The smallest length >= n whose prime factors are all 2, 3, 5 or 7.

  XLA:CPU's FFTs are fastest at such lengths and slow down at large prime
  factors. The depthwise 7x7 kernel gradient (batch 32, 64 channels) took
  19.7 ms at 32x32 with length 35 against 48.8 ms with 38 = 2 x 19; at
  128x128 (batch 8) 130 ms with 135 against 204 ms with 134 = 2 x 67, and at
  64x64 72-78 ms with 68 or 70 against 123 ms with 67.
  """
  def smooth(m: int) -> bool:
    for factor in (2, 3, 5, 7):
      while m % factor == 0:
        m //= factor
    return m == 1

  while not smooth(n):
    n += 1
  return n


@jax.custom_vjp
def depthwise_same(x: jax.Array, w: jax.Array) -> jax.Array:
  """Depthwise 'same' cross-correlation (odd square kernel w [k,k,C], zero pad)."""
  return _shift_correlate(x, w)


def _depthwise_fwd(x, w):
  return _shift_correlate(x, w), (x, w)


def _depthwise_bwd(res, g):
  x, w = res
  k = w.shape[0]
  p = k // 2
  # dL/dx: correlate the cotangent with the kernel flipped in both axes.
  gx = _shift_correlate(g, w[::-1, ::-1])
  # dL/dw[i, j, c] = sum_{b,h,w} xpad[b, h+i, w+j, c] * g[b, h, w, c]: a
  # cross-correlation over space summed over the batch, done with FFTs. Any
  # length L >= H + p gives the lags 0..k-1 exactly: with the p zeros in
  # front of x, an index h + i >= L wraps onto one of them.
  size = tuple(fft_length(n + p) for n in x.shape[1:3])
  xp = jnp.pad(x.astype(jnp.float32),
               ((0, 0), (p, size[0] - x.shape[1] - p),
                (p, size[1] - x.shape[2] - p), (0, 0)))
  gp = jnp.pad(g.astype(jnp.float32),
               ((0, 0), (0, size[0] - g.shape[1]), (0, size[1] - g.shape[2]),
                (0, 0)))
  spectrum = jnp.sum(jnp.fft.rfft2(xp, axes=(1, 2)) *
                     jnp.conj(jnp.fft.rfft2(gp, axes=(1, 2))), axis=0)
  gw = jnp.fft.irfft2(spectrum, s=size, axes=(0, 1))[:k, :k]
  return gx, gw.astype(w.dtype)


depthwise_same.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nnx.Conv):
  """A depthwise ('same', stride 1, odd kernel) conv with a fast CPU path."""

  def __call__(self, x: jax.Array) -> jax.Array:
    if not use_fast_paths():
      return super().__call__(x)
    dtype = self.dtype or x.dtype
    kernel = self.kernel[...].astype(dtype)[:, :, 0, :]
    y = depthwise_same(x.astype(dtype), kernel)
    if self.bias is not None:
      y = bias_add(y, self.bias[...].astype(dtype))
    return y


class PointwiseConv(nnx.Conv):
  """A 1x1 conv computed as a matmul over the channel axis."""

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype)[0, 0])
    if self.bias is not None:
      bias = self.bias[...].astype(dtype)
      y = bias_add(y, bias) if use_fast_paths() else y + bias
    return y


# ------------------------------------------------------------ normalisation ----


def _norm_shape(x: jax.Array, groups: int) -> tuple[int, ...]:
  b, h, w, c = x.shape
  return (b, h, w, groups, c // groups)


def _normalize(x, scale, bias, groups, eps, axes):
  xg = x.astype(jnp.float32).reshape(_norm_shape(x, groups))
  mean = jnp.mean(xg, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
  rstd = lax.rsqrt(var + eps)
  xhat = ((xg - mean) * rstd).reshape(x.shape)
  y = xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y, xhat, rstd


#: The `axes` of a GroupNorm in `affine_norm`'s [B, H, W, groups, C / groups] view.
GROUP_NORM_AXES = (1, 2, 4)


def _group_sum(s: jax.Array, groups: int) -> jax.Array:
  """[B, C] -> [B, groups]: the sum over each group's channels."""
  b, c = s.shape
  return s.reshape(b, groups, c // groups).sum(axis=-1)


def _per_channel(v: jax.Array, channels: int) -> jax.Array:
  """[B, groups] -> [B, 1, 1, C]: each group's value on its channels.

  Materialised: fused into a full-size consumer, the expansion would index
  [B, groups] by c // (C / groups) per element, which XLA:CPU does not
  vectorise.
  """
  b, groups = v.shape
  return materialize(jnp.broadcast_to(v[:, :, None],
                                      (b, groups, channels // groups)
                                      ).reshape(b, 1, 1, channels))[0]


def _group_normalize(x, scale, bias, groups, eps):
  """GroupNorm over [B, H, W, C] with per-(sample, channel) statistics.

  The same function as `_normalize(..., axes=GROUP_NORM_AXES)`, written for
  XLA:CPU: the statistics are per-(sample, channel) spatial sums
  (`sum_spatial`) combined per group on [B, C] arrays, and every full-size
  operation broadcasts a [B, 1, 1, C] array over H and W. The
  [B, H, W, groups, C / groups] view instead leaves vector loops of C /
  groups (4-16) lanes. With the blocked sums, the DDPM U-Net's CIFAR-10 train
  step took 13.9-14.3 s instead of 14.7-15.4 s (2-core Intel Xeon).
  """
  b, h, w, c = x.shape
  count = h * w * (c // groups)
  x = x.astype(jnp.float32)
  mean = _group_sum(sum_spatial(x), groups) / count
  d = x - _per_channel(mean, c)
  var = _group_sum(sum_spatial(jnp.square(d)), groups) / count
  rstd = _per_channel(lax.rsqrt(var + eps), c)
  xhat = d * rstd
  y = xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y, xhat, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def affine_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
                eps: float, axes: tuple[int, ...], dtype) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias, statistics in float32.

  x [B, H, W, C] is viewed as [B, H, W, groups, C / groups] and the (biased)
  statistics are taken over `axes` of that view: (1, 2, 4) is GroupNorm
  (computed by `_group_normalize`), (4,) with one group is a per-pixel
  LayerNorm over channels. The result is cast to `dtype`.

  The backward pass is the textbook one, written out: XLA's own gradient
  recomputes the incoming cotangent's producers (sigmoids, erfs) inside each
  of its four reductions, which made the DDPM U-Net's GroupNorm gradients
  ~40% of its training step on XLA:CPU. Here the cotangent is materialised
  once and the reductions read it.
  """
  return _affine_norm_fwd(x, scale, bias, groups, eps, axes, dtype)[0]


def _affine_norm_fwd(x, scale, bias, groups, eps, axes, dtype):
  if axes == GROUP_NORM_AXES:
    y, xhat, rstd = _group_normalize(x, scale, bias, groups, eps)
  else:
    y, xhat, rstd = _normalize(x, scale, bias, groups, eps, axes)
  # Zero-size arrays carry the input dtypes (residuals must be arrays).
  return y.astype(dtype), (xhat, rstd, scale, jnp.zeros((0,), x.dtype),
                           jnp.zeros((0,), bias.dtype))


def _affine_norm_bwd(groups, eps, axes, dtype, res, g):
  del eps, dtype
  xhat, rstd, scale, x_like, bias_like = res
  x_dtype, bias_dtype = x_like.dtype, bias_like.dtype
  scale32 = scale.astype(jnp.float32)
  g, xhat = materialize(g.astype(jnp.float32), xhat)
  if axes == GROUP_NORM_AXES:
    # dx = rstd (g scale - m1 - xhat m2), m1 and m2 the group means of
    # g scale and g scale xhat, from per-(sample, channel) spatial sums.
    c = xhat.shape[-1]
    count = xhat.size // xhat.shape[0] // groups
    s1, s2 = sum_spatial(g), sum_spatial(g * xhat)
    dbias, dscale = s1.sum(axis=0), s2.sum(axis=0)
    m1 = _per_channel(_group_sum(s1 * scale32, groups) / count, c)
    m2 = _per_channel(_group_sum(s2 * scale32, groups) / count, c)
    dx = rstd * (g * scale32 - m1 - xhat * m2)
  else:
    shape = _norm_shape(xhat, groups)
    dbias = sum_leading(g)
    dscale = sum_leading(g * xhat)
    gx = (g * scale32).reshape(shape)
    xg = xhat.reshape(shape)
    m1 = jnp.mean(gx, axis=axes, keepdims=True)
    m2 = jnp.mean(gx * xg, axis=axes, keepdims=True)
    dx = (rstd * (gx - m1 - xg * m2)).reshape(xhat.shape)
  return (dx.astype(x_dtype), dscale.astype(scale.dtype),
          dbias.astype(bias_dtype))


affine_norm.defvjp(_affine_norm_fwd, _affine_norm_bwd)


def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
              eps: float, axes: tuple[int, ...], dtype) -> jax.Array:
  """The normalisation of `affine_norm` (GroupNorm, channel LayerNorm): with
  its written-out gradient on the CPU fast path, XLA's own gradient elsewhere."""
  if use_fast_paths():
    return affine_norm(x, scale, bias, groups, eps, axes, dtype)
  return _normalize(x, scale, bias, groups, eps, axes)[0].astype(dtype)


# --------------------------------------------------- transposed convolution ----


def _interleave_phases(phases) -> jax.Array:
  """[[y00, y01], [y10, y11]] of [B,H,W,C] -> [B,2H,2W,C], y[2m+a, 2n+b] = yab."""
  y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
  b, h, _, w, _, c = y.shape  # [B, H, 2 (a), W, 2 (b), C]
  return y.reshape(b, 2 * h, 2 * w, c)


class ConvTranspose(nnx.ConvTranspose):
  """`nnx.ConvTranspose`; the PyTorch-style 4x4, stride-2 case by phases on CPU.

  With kernel 4, stride 2 and padding ((2, 2), (2, 2)) (PyTorch's
  ConvTranspose2d(k=4, s=2, p=1)) and transpose_kernel=False, Flax computes
  y = corr(dilate_2(x), K) with 2 zeros of padding. Per axis, an even output
  2m gets x[m-1] K[0] + x[m] K[2] and an odd one 2m+1 gets x[m] K[1] +
  x[m+1] K[3]: output phase (a, b) is the VALID 2x2 correlation of the input
  padded by one, shifted by (a, b), with the kernel taps K[a::2, b::2].
  """

  def _phase_form(self) -> bool:
    return (use_fast_paths() and tuple(self.kernel_size) == (4, 4)
            and _pair(self.strides) == (2, 2)
            and self.padding == ((2, 2), (2, 2))
            and not self.transpose_kernel and self.mask is None
            and _pair(self.kernel_dilation) == (1, 1))

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or not self._phase_form():
      return super().__call__(x)
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((x, self.kernel[...], bias),
                                         dtype=self.dtype)
    h, w = x.shape[1:3]
    xq = _pad_nhwc(x, ((1, 1), (1, 1)))
    valid = ((0, 0), (0, 0))
    phases = [[dense_conv(xq[:, a:a + h + 1, b:b + w + 1], kernel[a::2, b::2],
                          (1, 1), valid) for b in (0, 1)] for a in (0, 1)]
    y = _interleave_phases(phases)
    if bias is not None:
      y = y + bias
    return y


# ----------------------------------------------- nearest upsample + conv ----


def nearest_upsample_conv(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """conv(nearest_upsample_2x(x)) for a 3x3, stride-1, 'SAME' `conv`.

  On CPU the four output phases are 2x2 convolutions of x itself: per axis,
  with u = upsample(x) (u[n] = x[n // 2]) and kernel taps K0, K1, K2,
  y[2m] = K0 x[m-1] + (K1 + K2) x[m] and y[2m+1] = (K0 + K1) x[m] + K2 x[m+1].
  Only the rounding of the summed taps differs from the plain computation.
  """
  fits = (use_fast_paths() and x.ndim == 4
          and tuple(conv.kernel_size) == (3, 3)
          and _pair(conv.strides) == (1, 1) and conv.padding == "SAME"
          and conv.feature_group_count == 1 and conv.mask is None
          and _pair(conv.kernel_dilation) == (1, 1)
          and _pair(conv.input_dilation) == (1, 1))
  if not fits:
    return conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
  bias = conv.bias[...] if conv.bias is not None else None
  x, kernel, bias = conv.promote_dtype((x, conv.kernel[...], bias),
                                       dtype=conv.dtype)
  # Per-axis 2-tap kernels of the two phases: phase 0 reads (m-1, m) with
  # (K0, K1 + K2), phase 1 reads (m, m+1) with (K0 + K1, K2).
  def fold(k, axis):
    k0, k1, k2 = (lax.index_in_dim(k, i, axis, keepdims=True)
                  for i in range(3))
    return (jnp.concatenate([k0, k1 + k2], axis),
            jnp.concatenate([k0 + k1, k2], axis))

  rows = fold(kernel, 0)
  h, w = x.shape[1:3]
  xq = _pad_nhwc(x, ((1, 1), (1, 1)))
  valid = ((0, 0), (0, 0))
  phases = []
  for a in (0, 1):
    cols = fold(rows[a], 1)
    phases.append([dense_conv(xq[:, a:a + h + 1, b:b + w + 1], cols[b],
                              (1, 1), valid) for b in (0, 1)])
  y = _interleave_phases(phases)
  if bias is not None:
    y = bias_add(y, bias)
  return y
