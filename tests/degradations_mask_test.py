"""Tests of the Gaussian-mask families `mask` (DF) and `mask_generation` (DG).

Parity with the official fixtures, a slow step-by-step reference for every s,
and the interface contract (D(x, 0) = x, per-example s, jit, aux draws,
discrete quantisation, config validation).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from colddiff_jax import degradations
from colddiff_jax.degradations import mask
from conftest import load_fixture

TOL = 1e-5


def _config(name, **kw):
  return ml_collections.ConfigDict(dict(name=name, **kw))


def _mask_config(**kw):
  base = dict(time_steps=50, kernel_std=0.1, initial_mask=11,
              fade_routine="Incremental", discrete=False)
  base.update(kw)
  return _config("mask", **base)


def _gen_config(**kw):
  base = dict(time_steps=50, kernel_std=0.15, initial_mask=11, reverse=False)
  base.update(kw)
  return _config("mask_generation", **base)


def _official_style_mask(size, sigma):
  """Per-step mask built the official way (independent of the closed form).

  (size+1)-point normalised 1-D Gaussian, outer product, peak divided out,
  1 - that, first row and column dropped.
  """
  k = size + 1
  g = np.exp(-(np.arange(k) - k // 2) ** 2 / (2.0 * sigma ** 2))
  g /= g.sum()
  g2 = np.outer(g, g)
  g2 /= g2.max()
  return (1.0 - g2)[1:, 1:]


def _slow_mask_reference(x0, s, offsets, sigmas, random):
  """D(x0, s) by multiplying the (cropped) per-step masks one step at a time."""
  x0 = np.asarray(x0, np.float64)
  n = x0.shape[1]
  out = np.empty_like(x0)
  for b in range(x0.shape[0]):
    x = x0[b].copy()
    for i in range(int(s[b])):
      if random:
        m = _official_style_mask(2 * n, sigmas[i])
        r, c = offsets[b]
        m = m[r:r + n, c:c + n]
      else:
        m = _official_style_mask(n, sigmas[i])
      x = x * m[:, :, None]
    out[b] = x
  return out


def _official_quantize(x):
  x = np.asarray(x)
  return ((x + 1) / 2 * 255).astype(int) / 255 * 2 - 1


# --------------------------------------------------------------------------
# Official fixtures.

MASK_FIXTURES = {
    "mask_mnist_random_incremental.npz": dict(
        time_steps=50, kernel_std=0.1, initial_mask=11,
        fade_routine="Random_Incremental", discrete=True),
    "mask_cifar_random_incremental.npz": dict(
        time_steps=50, kernel_std=0.1, initial_mask=11,
        fade_routine="Random_Incremental", discrete=True),
    "mask_celeba_incremental_train.npz": dict(
        time_steps=100, kernel_std=0.2, initial_mask=11,
        fade_routine="Incremental", discrete=False),
    "mask_celeba_incremental_test.npz": dict(
        time_steps=100, kernel_std=0.2, initial_mask=1,
        fade_routine="Incremental", discrete=False),
    "mask_constant.npz": dict(
        time_steps=10, kernel_std=3.0, initial_mask=11, fade_routine="Constant",
        discrete=False),
}


@pytest.mark.parametrize("name", sorted(MASK_FIXTURES))
def test_mask_matches_official_fixture(name):
  f = load_fixture(name)
  x0 = f["x0"]
  b, n, _, c = x0.shape
  deg = degradations.build(_mask_config(**MASK_FIXTURES[name]), n, c)
  steps = f["s"]
  table_key = "fade_kernels_2N" if deg.random else "fade_kernels"
  np.testing.assert_allclose(deg.step_masks[steps - 1], f[table_key], rtol=0,
                             atol=TOL)

  # All stored entries in one call: entry (k, b) has its own step and window.
  x = jnp.asarray(np.concatenate([x0] * len(steps)))
  s = jnp.asarray(np.repeat(steps, b), jnp.int32)
  aux = None
  if deg.random:
    offset = np.stack([f["rand_x"].reshape(-1), f["rand_y"].reshape(-1)], -1)
    aux = {"offset": jnp.asarray(offset, jnp.int32)}
  # Discrete fixtures store the quantised training input.
  out = deg.train_input(x, s, aux) if deg.discrete else deg.apply(x, s, aux)
  assert out.shape == x.shape  # 1-channel input stays 1-channel (bug 14 fixed)
  expected = f["xs"].reshape((-1,) + f["xs"].shape[2:])
  # The official MNIST output has 3 equal channels; ours is compared with each.
  out = np.broadcast_to(np.asarray(out), expected.shape)
  np.testing.assert_allclose(out, expected, rtol=0, atol=TOL)


GEN_FIXTURES = {
    "inpaint_gen_reverse.npz": dict(
        time_steps=750, kernel_std=0.05, initial_mask=1, reverse=True),
    "inpaint_gen_forward_default.npz": dict(
        time_steps=50, kernel_std=0.15, initial_mask=11, reverse=False),
}


@pytest.mark.parametrize("name", sorted(GEN_FIXTURES))
def test_mask_generation_matches_official_fixture(name):
  f = load_fixture(name)
  x0 = f["x0"]
  b, n, _, c = x0.shape
  deg = degradations.build(_gen_config(**GEN_FIXTURES[name]), n, c)
  steps = f["s"]
  np.testing.assert_allclose(deg.alphas[steps - 1], f["alphas"], rtol=0, atol=TOL)
  x = jnp.asarray(np.concatenate([x0] * len(steps)))
  s = jnp.asarray(np.repeat(steps, b), jnp.int32)
  aux = {"colour": jnp.asarray(np.concatenate([f["colour"]] * len(steps)))}
  out = deg.apply(x, s, aux)
  expected = f["xs"].reshape((-1,) + f["xs"].shape[2:])
  np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=TOL)


# --------------------------------------------------------------------------
# Slow reference for every s.


@pytest.mark.parametrize("routine,channels", [
    ("Incremental", 3), ("Constant", 3), ("Random_Incremental", 3),
    ("Random_Incremental", 1)])
def test_mask_equals_step_by_step_reference(routine, channels):
  n, t = 16, 12
  cfg = _mask_config(time_steps=t, kernel_std=0.4, initial_mask=2,
                     fade_routine=routine)
  deg = degradations.build(cfg, n, channels)
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (t + 1, n, n, channels)).astype(np.float32)
  s = np.arange(t + 1)
  offsets = rng.integers(0, n + 1, (t + 1, 2))
  aux = {"offset": jnp.asarray(offsets, jnp.int32)} if deg.random else None
  out = deg.apply(jnp.asarray(x0), jnp.asarray(s, jnp.int32), aux)
  if routine == "Constant":
    sigmas = np.full(t, 0.4)
  else:
    sigmas = 0.4 * (np.arange(t) + 2)
  ref = _slow_mask_reference(x0, s, offsets, sigmas, deg.random)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("reverse", [False, True])
def test_mask_generation_equals_step_by_step_reference(reverse):
  n, t, c = 16, 15, 3
  deg = degradations.build(
      _gen_config(time_steps=t, kernel_std=0.5, initial_mask=1, reverse=reverse),
      n, c)
  # P_j = prod_{i<j} m_i, built one multiplication at a time.
  prods = [np.ones((n, n))]
  for i in range(t):
    prods.append(prods[-1] * _official_style_mask(n, 0.5 * (i + 1)))
  if reverse:
    rev = prods[:t][::-1]  # [P_{T-1}, ..., P_0]
    alphas = [1.0 - rev[k] for k in range(t)]
  else:
    alphas = [prods[k + 1] for k in range(t)]
  rng = np.random.default_rng(1)
  x0 = rng.uniform(-1, 1, (t + 1, n, n, c)).astype(np.float32)
  colour = (rng.uniform(0, 1, (t + 1, c)) - 0.5).astype(np.float32)
  s = np.arange(t + 1)
  out = deg.apply(jnp.asarray(x0), jnp.asarray(s, jnp.int32),
                  {"colour": jnp.asarray(colour)})
  for k in s:
    alpha = np.ones((n, n)) if k == 0 else alphas[k - 1]
    ref = alpha[:, :, None] * x0[k] + (1 - alpha[:, :, None]) * colour[k]
    np.testing.assert_allclose(np.asarray(out[k]), ref, rtol=0, atol=TOL)
  if reverse:  # x_T is the flat colour exactly.
    np.testing.assert_array_equal(
        np.asarray(out[t]), np.broadcast_to(colour[t], (n, n, c)))


def test_random_window_places_hole_centre():
  """Hole centre lands at (N-1-row_offset, N-1-col_offset) (spec §3.2)."""
  n = 16
  deg = degradations.build(
      _mask_config(time_steps=3, kernel_std=1.0, initial_mask=1,
                   fade_routine="Random_Incremental"), n, 1)
  offsets = jnp.asarray([[0, 0], [3, 7], [15, 2], [1, 15]], jnp.int32)
  masks = np.asarray(deg.masks(jnp.ones(4, jnp.int32), {"offset": offsets}, 4))
  for m, (r, c) in zip(masks, np.asarray(offsets)):
    assert np.unravel_index(np.argmin(m), m.shape) == (n - 1 - r, n - 1 - c)
    assert m.min() == 0.0


def test_centred_mask_is_half_a_pixel_off_centre():
  n = 32
  deg = degradations.build(_mask_config(time_steps=2), n, 3)
  m = deg.step_masks[0]
  assert np.unravel_index(np.argmin(m), m.shape) == (15, 15)
  assert m[15, 15] == 0.0


# --------------------------------------------------------------------------
# Interface contract.


def _families():
  return [
      _mask_config(time_steps=8, fade_routine="Incremental"),
      _mask_config(time_steps=8, fade_routine="Constant", kernel_std=3.0),
      _mask_config(time_steps=8, fade_routine="Random_Incremental"),
      _gen_config(time_steps=8, reverse=False),
      _gen_config(time_steps=8, reverse=True, kernel_std=0.5, initial_mask=1),
  ]


@pytest.mark.parametrize("cfg", _families(), ids=lambda c: f"{c.name}")
def test_contract(cfg):
  n, c, b = 16, 3, 4
  deg = degradations.build(cfg, n, c)
  t = deg.num_steps
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (b, n, n, c), minval=-1, maxval=1)
  aux = deg.sample_aux(jax.random.PRNGKey(1), b)
  assert (aux is not None) == deg.random

  # D(x, 0) == x exactly.
  out0 = deg.apply(x0, jnp.zeros(b, jnp.int32), aux)
  np.testing.assert_array_equal(np.asarray(out0), np.asarray(x0))

  # Per-example steps in one batch equal separate calls; jit gives the same.
  s = jnp.asarray([0, 1, t // 2, t], jnp.int32)
  mixed = deg.apply(x0, s, aux)
  jitted = jax.jit(deg.apply)(x0, s, aux)
  for i in range(b):
    single = deg.apply(x0, jnp.full(b, s[i], jnp.int32), aux)
    np.testing.assert_allclose(np.asarray(mixed[i]), np.asarray(single[i]),
                               rtol=0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(mixed), rtol=0,
                             atol=1e-6)
  # A scalar step is broadcast to the batch.
  np.testing.assert_array_equal(
      np.asarray(deg.apply(x0, t, aux)),
      np.asarray(deg.apply(x0, jnp.full(b, t, jnp.int32), aux)))

  if deg.random:
    with pytest.raises(ValueError, match="aux"):
      deg.apply(x0, s, None)
    again = deg.sample_aux(jax.random.PRNGKey(1), b)
    other = deg.sample_aux(jax.random.PRNGKey(2), b)
    (k,) = aux.keys()
    np.testing.assert_array_equal(np.asarray(aux[k]), np.asarray(again[k]))
    assert not np.array_equal(np.asarray(aux[k]), np.asarray(other[k]))


def test_offset_draws_cover_zero_to_n_inclusive():
  n = 8
  deg = degradations.build(_mask_config(fade_routine="Random_Incremental"), n, 3)
  off = np.asarray(deg.sample_aux(jax.random.PRNGKey(0), 4000)["offset"])
  assert off.dtype == np.int32 and off.shape == (4000, 2)
  assert off.min() == 0 and off.max() == n
  assert set(np.unique(off[:, 0])) == set(range(n + 1))


def test_colour_draws():
  deg = degradations.build(_gen_config(), 8, 3)
  col = np.asarray(deg.sample_aux(jax.random.PRNGKey(0), 4000)["colour"])
  assert col.dtype == np.float32 and col.shape == (4000, 3)
  assert col.min() >= -0.5 and col.max() < 0.5
  assert abs(col.mean()) < 0.02


@pytest.mark.parametrize("routine", ["Incremental", "Random_Incremental"])
def test_discrete_train_input_is_official_truncation(routine):
  n, c, b = 16, 1, 6
  deg = degradations.build(
      _mask_config(time_steps=10, fade_routine=routine, discrete=True), n, c)
  assert deg.discrete
  x0 = jax.random.uniform(jax.random.PRNGKey(3), (b, n, n, c), minval=-1, maxval=1)
  s = jnp.asarray([0, 1, 2, 5, 9, 10], jnp.int32)
  aux = deg.sample_aux(jax.random.PRNGKey(4), b)
  raw = np.asarray(deg.apply(x0, s, aux))
  q = np.asarray(deg.train_input(x0, s, aux))
  np.testing.assert_allclose(q, _official_quantize(raw), rtol=0, atol=1e-6)
  assert not np.allclose(q, raw)

  plain = degradations.build(_mask_config(time_steps=10, fade_routine=routine),
                             n, c)
  assert not plain.discrete
  np.testing.assert_array_equal(np.asarray(plain.train_input(x0, s, aux)),
                                np.asarray(plain.apply(x0, s, aux)))


def test_zero_initial_mask_zeroes_only_the_centre_first():
  deg = degradations.build(_mask_config(time_steps=3, initial_mask=0), 8, 1)
  m = deg.step_masks[0]
  assert m[3, 3] == 0.0 and np.sum(m != 1.0) == 1
  assert np.all(np.isfinite(deg.step_masks))


def test_wrong_image_shape_is_rejected():
  deg = degradations.build(_mask_config(), 16, 3)
  with pytest.raises(ValueError, match="data.channels"):
    deg.apply(jnp.zeros((2, 16, 16, 1)), jnp.ones(2, jnp.int32))


# --------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize("cfg,key", [
    (_mask_config(fade_routine="Spiral"), "degradation.fade_routine"),
    (_mask_config(time_steps=0), "degradation.time_steps"),
    (_mask_config(kernel_std=0.0), "degradation.kernel_std"),
    (_mask_config(kernel_std=-0.1), "degradation.kernel_std"),
    (_mask_config(initial_mask=-1), "degradation.initial_mask"),
    (_mask_config(discrete="yes"), "degradation.discrete"),
    (_gen_config(time_steps=0), "degradation.time_steps"),
    (_gen_config(kernel_std=-1.0), "degradation.kernel_std"),
    (_gen_config(initial_mask=-0.5), "degradation.initial_mask"),
    (_gen_config(reverse="True"), "degradation.reverse"),
])
def test_bad_config_names_the_key(cfg, key):
  cls = mask.GaussianMask if cfg.name == "mask" else mask.MaskGeneration
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    cls(cfg, image_size=16, channels=3)
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    degradations.build(cfg, 16, 3)


def test_bad_channels_names_the_key():
  with pytest.raises(ValueError, match=r"data\.channels"):
    mask.GaussianMask(_mask_config(), image_size=16, channels=0)
