"""The CPU fast paths of colddiff_jax/models/layers.py equal the plain layers.

Each optimised formulation (per-tap kernel gradient, shift-add depthwise
convolution with FFT kernel gradient, phase-decomposed transposed convolution,
phase-decomposed nearest-upsample + conv, written-out normalisation gradient,
blocked bias gradient, `materialize`) is compared with the plain Flax
computation, `fast_cpu_paths(False)`, on values and on gradients with respect
to the input and every parameter; then the ConvNeXt U-Net as a whole (its
CPU linear attention included).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colddiff_jax import xla_cpu
from colddiff_jax.models import Unet
from colddiff_jax.models import layers

pytestmark = pytest.mark.usefixtures("fast_compiles")

TOL = dict(rtol=1e-4, atol=1e-4)


def _value_and_grads(module, x, fast: bool, call=None):
  """(y, d<y·r>/dx, d<y·r>/dparams) with the fast paths on or off."""
  graphdef, params = nnx.split(module)
  call = call or (lambda m, v: m(v))

  def f(params, x):
    return call(nnx.merge(graphdef, params), x)

  shape = jax.eval_shape(f, params, x)
  r = jax.random.normal(jax.random.key(7), shape.shape, shape.dtype)

  def loss(params, x):
    y = f(params, x)
    return jnp.sum(y * r), y

  with layers.fast_cpu_paths(fast):
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                               has_aux=True))(params, x)
  return y, grads


def _assert_same(module, x, call=None):
  fast = _value_and_grads(module, x, True, call)
  plain = _value_and_grads(module, x, False, call)
  leaves_fast, tree_fast = jax.tree.flatten(fast)
  leaves_plain, tree_plain = jax.tree.flatten(plain)
  assert tree_fast == tree_plain
  for a, b in zip(leaves_fast, leaves_plain):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


def _x(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape, jnp.float32, -1, 1)


@pytest.fixture(params=[False, True], ids=["eigen", "ynnpack"])
def ynn(request, monkeypatch):
  """Runs a test as if XLA:CPU gave convolutions to Eigen / to YNNPACK."""
  monkeypatch.setattr(layers, "ynn_runs_convolutions", lambda: request.param)
  return request.param


def test_fast_paths_are_taken_on_cpu_and_can_be_switched_off(ynn):
  assert jax.default_backend() == "cpu" and layers.use_fast_paths()
  with layers.fast_cpu_paths(False):
    assert not layers.use_fast_paths()
  assert layers.use_fast_paths()
  conv = layers.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  jaxpr = str(jax.make_jaxpr(lambda v: conv(v))(_x((1, 8, 8, 3))))
  # bias_add, and the per-tap kernel gradient only where YNNPACK runs the
  # convolutions.
  assert jaxpr.count("custom_vjp_call") == (2 if ynn else 1)
  with layers.fast_cpu_paths(False):
    jaxpr = str(jax.make_jaxpr(lambda v: conv(v))(_x((1, 8, 8, 3))))
  assert "custom_vjp_call" not in jaxpr


def test_this_process_gives_convolutions_to_eigen():
  """conftest sets XLA_FLAGS before JAX starts; importing the package adds the
  flag."""
  import os  # pylint: disable=g-import-not-at-top
  assert xla_cpu.YNN_FLAG + "=" in os.environ["XLA_FLAGS"].split()
  assert not layers.ynn_runs_convolutions()
  assert not xla_cpu.prefer_eigen_on_cpu()  # already set: left alone


@pytest.mark.parametrize("kernel,stride,padding", [
    (3, 1, ((1, 1), (1, 1))),    # ConvNeXt / DDPM 3x3
    (4, 2, ((1, 1), (1, 1))),    # ConvNeXt down-sampler
    (3, 2, ((0, 1), (0, 1))),    # DDPM down-sampler
    (1, 1, ((0, 0), (0, 0))),
    (2, 1, ((0, 0), (0, 0))),    # the phases of ConvTranspose
])
def test_conv_kernel_gradient_by_taps(kernel, stride, padding):
  x = _x((2, 10, 9, 5))
  w = _x((kernel, kernel, 5, 6), seed=1)
  strides = (stride, stride)

  def run(conv):
    y, vjp = jax.vjp(lambda a, b: conv(a, b, strides, padding), x, w)
    return (y,) + vjp(_x(y.shape, seed=2))

  fast = jax.jit(lambda: run(layers.conv_nhwc))()
  plain = jax.jit(lambda: run(layers._conv))()  # pylint: disable=protected-access
  for a, b in zip(fast, plain):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


def test_conv_layer(ynn):
  conv = layers.Conv(5, 6, (4, 4), strides=2, padding=((1, 1), (1, 1)),
                     rngs=nnx.Rngs(1))
  _assert_same(conv, _x((2, 10, 10, 5)))


# FFT lengths: H + 3 x W + 3 = 12 x 14 (the least that is exact, wrapping
# onto the leading zeros) for (9, 11); (19 -> 20) x 14 for (16, 11).
@pytest.mark.parametrize("shape", [(2, 9, 11, 6), (2, 16, 11, 6)])
def test_depthwise_conv_shift_add_and_fft_gradient(shape):
  conv = layers.DepthwiseConv(6, 6, (7, 7), feature_group_count=6,
                              padding="SAME", rngs=nnx.Rngs(2))
  _assert_same(conv, _x(shape))


def test_fft_length_is_the_next_7_smooth_length():
  lengths = {n: layers.fft_length(n) for n in range(1, 300)}
  assert [lengths[n] for n in (7, 11, 19, 35, 67, 131)] == [
      7, 12, 20, 35, 70, 135]
  for n, m in lengths.items():
    rest = m
    for factor in (2, 3, 5, 7):
      while rest % factor == 0:
        rest //= factor
    assert rest == 1 and m >= n
    assert all(layers.fft_length(k) == m for k in range(n, m + 1))


def test_conv_transpose_by_phases():
  conv = layers.ConvTranspose(5, 4, (4, 4), strides=(2, 2),
                              padding=((2, 2), (2, 2)), rngs=nnx.Rngs(3))
  x = _x((2, 5, 6, 5))
  assert conv(x).shape == (2, 10, 12, 4)
  _assert_same(conv, x)


def test_nearest_upsample_conv_by_phases():
  conv = layers.Conv(4, 5, (3, 3), padding="SAME", rngs=nnx.Rngs(4))
  x = _x((2, 5, 6, 4))
  y = layers.nearest_upsample_conv(conv, x)
  with layers.fast_cpu_paths(False):
    reference = conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
  np.testing.assert_allclose(np.asarray(y), np.asarray(reference), **TOL)
  _assert_same(conv, x, call=layers.nearest_upsample_conv)


def test_materialize_is_the_identity_for_every_value():
  x = jnp.array([[np.nan, np.inf], [-np.inf, -0.0]], jnp.float32)
  y = jnp.arange(3, dtype=jnp.int32)
  out = jax.jit(layers.materialize)(x, y)
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(x))
  assert np.signbit(np.asarray(out[0])[1, 1])
  np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(y))
  grad = jax.grad(lambda v: jnp.sum(layers.materialize(v)[0] * 3.0))(
      jnp.ones((2, 2)))
  np.testing.assert_array_equal(np.asarray(grad), 3.0)
  # XLA keeps the conditional (else the arrays would be fused through).
  hlo = jax.jit(lambda v: layers.materialize(v * 2.0)[0] + 1.0).lower(
      jnp.ones((4,))).compile().as_text()
  assert "conditional" in hlo


def test_whole_network_equals_the_plain_layers():
  """The ConvNeXt U-Net as trained here (depthwise, transposed and dense
  convolutions together): output and every gradient, fast paths on vs off."""
  x = _x((2, 8, 8, 3))
  t = jnp.array([0, 5])
  unet = Unet(channels=3, dim=8, dim_mults=(1, 2), attn_heads=2,
              attn_dim_head=4, rngs=nnx.Rngs(5))
  _assert_same(unet, x, call=lambda m, v: m(v, t))


@pytest.mark.parametrize("groups,axes,shape", [
    (2, (1, 2, 4), (2, 5, 6, 8)), (4, (1, 2, 4), (2, 8, 8, 8)),
    (1, (1, 2, 4), (2, 8, 8, 8)), (1, (4,), (2, 5, 6, 8))],
    ids=["group_norm", "group_norm_blocked_sums", "one_group",
         "channel_layer_norm"])
def test_affine_norm_gradient(groups, axes, shape):
  x = _x(shape) * 3.0 + 0.5
  scale, bias = _x(shape[-1:], seed=1), _x(shape[-1:], seed=2)
  r = _x(shape, seed=3)

  def plain(x, scale, bias):
    return layers._normalize(x, scale, bias, groups, 1e-5, axes)[0]  # pylint: disable=protected-access

  def fast(x, scale, bias):
    return layers.affine_norm(x, scale, bias, groups, 1e-5, axes, jnp.float32)

  np.testing.assert_allclose(np.asarray(jax.jit(fast)(x, scale, bias)),
                             np.asarray(plain(x, scale, bias)), **TOL)
  grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * r),
                            argnums=(0, 1, 2)))(x, scale, bias)
           for f in (plain, fast)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


def test_bias_add_and_sum_leading():
  g = _x((4, 6, 8, 5))
  np.testing.assert_allclose(np.asarray(jax.jit(layers.sum_leading)(g)),
                             np.asarray(jnp.sum(g, axis=(0, 1, 2))), **TOL)
  odd = _x((3, 5))  # rows not a multiple of 32: the plain sum
  np.testing.assert_allclose(np.asarray(layers.sum_leading(odd)),
                             np.asarray(odd.sum(0)), **TOL)
  b = _x((5,), seed=1)
  y, vjp = jax.vjp(layers.bias_add, g, b)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(g + b))
  gy, gb = vjp(g)
  np.testing.assert_array_equal(np.asarray(gy), np.asarray(g))
  np.testing.assert_allclose(np.asarray(gb), np.asarray(g.sum((0, 1, 2))),
                             **TOL)


@pytest.mark.parametrize("shape", [(3, 8, 8, 5), (2, 5, 3, 4)],
                         ids=["blocked", "rows_not_a_multiple_of_32"])
def test_sum_spatial_and_add_per_sample(shape):
  g = _x(shape)
  np.testing.assert_allclose(np.asarray(jax.jit(layers.sum_spatial)(g)),
                             np.asarray(g.sum((1, 2))), **TOL)
  v = _x((shape[0], shape[-1]), seed=1)
  y, vjp = jax.vjp(jax.jit(layers.add_per_sample), g, v)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(g + v[:, None, None]))
  gy, gv = vjp(g * 2.0)
  np.testing.assert_array_equal(np.asarray(gy), np.asarray(g * 2.0))
  np.testing.assert_allclose(np.asarray(gv), np.asarray(2.0 * g.sum((1, 2))),
                             **TOL)
