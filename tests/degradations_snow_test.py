"""Snow degradation vs the official fixtures and a slow float64 reference."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from colddiff_jax import degradations
from colddiff_jax.degradations import snow
from conftest import load_fixture

TOL = 1e-5
FIXTURES = [(f"snow_L{lv}_fb{fb}.npz", lv, bool(fb), False)
            for lv in (1, 2, 3, 4) for fb in (0, 1)]
FIXTURES.append(("snow_random_cifar.npz", 3, True, True))


def make(time_steps=200, snow_level=3, random_snow=False, fix_brightness=True,
         single_snow=False, image_size=32, channels=3):
  cfg = ml_collections.ConfigDict(
      dict(name="snow", time_steps=time_steps, snow_level=snow_level,
           random_snow=random_snow, fix_brightness=fix_brightness,
           single_snow=single_snow))
  return degradations.build(cfg, image_size=image_size, channels=channels)


@pytest.mark.parametrize("name,level,fix_brightness,random_snow", FIXTURES)
def test_matches_official_fixture(name, level, fix_brightness, random_snow):
  d = load_fixture(name)
  deg = make(snow_level=level, random_snow=random_snow,
             fix_brightness=fix_brightness)
  assert deg.random == random_snow
  np.testing.assert_array_equal(deg.thresholds, d["snow_thres_list"])
  np.testing.assert_array_equal(deg.sigmas, d["mb_sigma_list"])
  np.testing.assert_array_equal(deg.brightness, d["br_coef_list"])
  if random_snow:
    aux = deg.aux_from_base(d["base_raw"], d["vertical"].astype(bool))
    # The jit-able JAX path gives the same field.
    aux_jax = deg.aux_from_base(jnp.asarray(d["base_raw"]),
                                jnp.asarray(d["vertical"], bool))
    np.testing.assert_allclose(aux_jax["base"], aux["base"], atol=TOL, rtol=0)
  else:
    raw, uniform = deg.seeded_draw(1)
    np.testing.assert_allclose(raw[0], d["base_raw"], atol=TOL, rtol=0)
    np.testing.assert_allclose(uniform, d["orientation_uniform"], atol=1e-6)
    aux = deg.fixed_aux(1)
  assert bool(aux["vertical"][0]) == bool(d["vertical"])
  np.testing.assert_allclose(aux["base"][0], d["base_zoomed"], atol=TOL, rtol=0)

  layer = np.asarray(deg.snow_layer(d["s"], aux))
  assert d["snow"][-1].max() > 0  # The fixture is not trivially snow-free.
  np.testing.assert_allclose(layer, d["snow"], atol=TOL, rtol=0)
  np.testing.assert_allclose(layer[:, ::-1, ::-1], d["snow_rot"], atol=TOL,
                             rtol=0)

  x0 = jnp.asarray(d["x0"])
  for k, s in enumerate(d["s"]):
    out = deg.apply(x0, jnp.full((x0.shape[0],), s), aux)
    np.testing.assert_allclose(out, d["xs"][k], atol=TOL, rtol=0)
    if not random_snow:  # aux=None means the fixed official pattern.
      np.testing.assert_array_equal(deg.apply(x0, s), out)


def _clipped_zoom(img, factor):
  """The ImageNet-C clipped_zoom, written out directly."""
  h = img.shape[0]
  ch = int(math.ceil(h / factor))
  top = (h - ch) // 2
  img = ndimage.zoom(img[top:top + ch, top:top + ch], (factor, factor, 1),
                     order=1)
  trim = (img.shape[0] - h) // 2
  return img[trim:trim + h, trim:trim + h]


def _reference(x0, s, raw, vertical, consts, time_steps, fix_brightness):
  """Slow float64 D(x0, s) for one image [H, W, 3]: the official recipe."""
  if s == 0:
    return x0
  zoom, k, thr, sigma, bright = consts
  i = s - 1
  layer = _clipped_zoom(raw[..., None], zoom)[..., 0]
  layer[layer < np.linspace(*thr, time_steps)[i]] = 0
  layer = np.clip(layer, 0, 1)
  x = np.arange(k) - k // 2
  g = np.exp(-x**2 / (2 * np.linspace(*sigma, time_steps)[i]**2))
  kernel = np.zeros((k, k))
  kernel[k // 2] = g / g.sum()
  if vertical:
    kernel = np.rot90(kernel)
  layer = ndimage.correlate(layer, kernel, mode="constant", cval=0.0)
  layer_rot = np.rot90(layer, 2)
  r = (x0 + 1) / 2
  if not fix_brightness:
    b = np.linspace(*bright, time_steps)[i]
    lum = r @ np.array([0.299, 0.587, 0.114])
    r = b * r + (1 - b) * np.maximum(r, 1.5 * lum[..., None] + 0.5)
  return 2 * np.clip(r + layer[..., None] + layer_rot[..., None], 0, 1) - 1


# (level, image size, zoom, kernel, thr, sigma, brightness). Size 16 with zoom 3
# zooms a 6x6 crop to 18 and trims one row/column each side.
_REF_CASES = [(1, 16, (3.0, 5, (0.7, 0.3), (0.5, 5.0), (0.95, 0.7))),
              (3, 24, (2.5, 11, (1.15, 0.7), (0.05, 16.0), (0.95, 0.4)))]


@pytest.mark.parametrize("vertical", [False, True])
@pytest.mark.parametrize("fix_brightness", [False, True])
@pytest.mark.parametrize("level,n,consts", _REF_CASES)
def test_matches_slow_reference(level, n, consts, fix_brightness, vertical):
  t = 20
  deg = make(time_steps=t, snow_level=level, random_snow=True,
             fix_brightness=fix_brightness, image_size=n)
  rs = np.random.RandomState(level + 10 * n)
  mean, std = snow.LEVELS[level].mean, snow.LEVELS[level].std
  raw = rs.normal(mean, std, size=(n, n))
  x0 = rs.uniform(-1, 1, size=(n, n, 3))
  aux = deg.aux_from_base(raw, vertical)
  s = np.arange(t + 1)
  out = np.asarray(deg.apply(jnp.asarray(np.repeat(x0[None], t + 1, 0),
                                         jnp.float32), s, aux))
  layers = np.asarray(deg.snow_layer(s, aux))
  assert layers[-1].max() > 0.05  # Enough snow for the check to mean something.
  for k in s:
    ref = _reference(x0, k, raw, vertical, consts, t, fix_brightness)
    np.testing.assert_allclose(out[k], ref, atol=TOL, rtol=0, err_msg=f"s={k}")


def test_identity_at_zero_and_per_example_steps():
  deg = make(time_steps=20, snow_level=2, fix_brightness=False)
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 32, 32, 3), minval=-1,
                         maxval=1)
  np.testing.assert_array_equal(deg.apply(x, jnp.zeros(3, jnp.int32)), x)
  s = jnp.array([0, 7, 20], jnp.int32)
  batch = deg.apply(x, s)
  for i in range(3):
    np.testing.assert_allclose(batch[i], deg.apply(x[i:i + 1], s[i])[0],
                               atol=1e-6, rtol=0)
  assert not np.allclose(batch[2], x[2])


def test_jit_and_sample_aux():
  deg = make(time_steps=20, random_snow=True)
  assert deg.random
  key = jax.random.PRNGKey(1)
  sample = jax.jit(deg.sample_aux, static_argnums=1)
  aux = sample(key, 2)
  assert aux["base"].shape == (1, 32, 32) and aux["vertical"].shape == (1,)
  same = deg.sample_aux(key, 2)
  np.testing.assert_allclose(aux["base"], same["base"], atol=1e-6, rtol=0)
  np.testing.assert_array_equal(aux["vertical"], same["vertical"])
  other = deg.sample_aux(jax.random.PRNGKey(2), 2)
  assert not np.allclose(other["base"], aux["base"])
  x = jnp.zeros((2, 32, 32, 3))
  s = jnp.array([5, 20], jnp.int32)
  np.testing.assert_allclose(jax.jit(deg.apply)(x, s, aux),
                             deg.apply(x, s, aux), atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match="sample_aux"):
    deg.apply(x, s)
  # Non-random: the fixed pattern under jit, and no aux to sample.
  fixed = make(time_steps=20)
  assert not fixed.random and fixed.sample_aux(key, 2) is None
  np.testing.assert_allclose(jax.jit(fixed.apply)(x, s), fixed.apply(x, s),
                             atol=1e-6, rtol=0)


def test_orientations_are_each_others_transpose():
  deg = make(time_steps=20, random_snow=True)
  raw = np.random.RandomState(0).normal(0.55, 0.3, size=(32, 32))
  s = jnp.array([20])
  horizontal = deg.snow_layer(s, deg.aux_from_base(raw, False))
  vertical = deg.snow_layer(s, deg.aux_from_base(raw.T.copy(), True))
  np.testing.assert_allclose(vertical[0], horizontal[0].T, atol=1e-6, rtol=0)


@pytest.mark.parametrize("random_snow", [False, True])
def test_single_snow_gives_one_pattern_per_example(random_snow):
  deg = make(time_steps=20, random_snow=random_snow, single_snow=True)
  aux = (deg.sample_aux(jax.random.PRNGKey(3), 4) if random_snow
         else deg.fixed_aux(4))
  assert aux["base"].shape == (4, 32, 32) and aux["vertical"].shape == (4,)
  x = jnp.zeros((4, 32, 32, 3))
  out = np.asarray(deg.apply(x, jnp.full((4,), 20), aux))
  for i in range(1, 4):
    assert not np.allclose(out[0], out[i])
  # Without single_snow the whole batch shares one pattern.
  shared = make(time_steps=20, random_snow=random_snow)
  aux = shared.sample_aux(jax.random.PRNGKey(3), 4) if random_snow else None
  out = np.asarray(shared.apply(x, jnp.full((4,), 20), aux))
  np.testing.assert_array_equal(out[1:], np.broadcast_to(out[0], out[1:].shape))


def test_one_channel_with_fix_brightness():
  deg = make(time_steps=20, fix_brightness=True, channels=1)
  x = jnp.zeros((2, 32, 32, 1))
  assert deg.apply(x, jnp.array([0, 20])).shape == (2, 32, 32, 1)


@pytest.mark.parametrize("overrides,key", [
    (dict(snow_level=5), "degradation.snow_level"),
    (dict(snow_level=True), "degradation.snow_level"),
    (dict(time_steps=0), "degradation.time_steps"),
    (dict(random_snow="yes"), "degradation.random_snow"),
    (dict(fix_brightness=None), "degradation.fix_brightness"),
    (dict(single_snow=1), "degradation.single_snow"),
    (dict(fix_brightness=False, channels=1), "data.channels"),
])
def test_bad_config_names_the_key(overrides, key):
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    make(**overrides)
