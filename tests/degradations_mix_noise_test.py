"""Tests of the cosine-interpolation families `noise` (hot baseline) and `mix`."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from colddiff_jax import degradations
from colddiff_jax.degradations import mix
from colddiff_jax.degradations import noise
from conftest import load_fixture

TOL = 1e-5


def _config(name, time_steps=200):
  return ml_collections.ConfigDict(dict(name=name, time_steps=time_steps))


def _reference_schedule(t, s=0.008):
  """Cosine schedule written out step by step, as described in spec §3.8."""
  f = [np.cos(((k / t + s) / (1 + s)) * np.pi / 2) ** 2 for k in range(t + 1)]
  abar_prime = [v / f[0] for v in f]
  out, prod = [], 1.0
  for k in range(t):
    beta = min(max(1 - abar_prime[k + 1] / abar_prime[k], 0.0), 0.999)
    prod *= 1 - beta
    out.append(prod)
  return np.asarray(out)


FIXTURES = {"hot_noise_cosine.npz": ("noise", "eps"),
            "demix_cosine.npz": ("mix", "z")}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_matches_official_fixture(name):
  family, z_key = FIXTURES[name]
  f = load_fixture(name)
  x0 = f["x0"]
  b, n, _, c = x0.shape
  deg = degradations.build(_config(family), n, c)
  for key in ("alphas_cumprod", "sqrt_alphas_cumprod",
              "sqrt_one_minus_alphas_cumprod"):
    np.testing.assert_allclose(getattr(deg, key), f[key], rtol=0, atol=TOL)
  steps = f["s"]
  x = jnp.asarray(np.concatenate([x0] * len(steps)))
  s = jnp.asarray(np.repeat(steps, b), jnp.int32)
  z = np.concatenate([f[z_key]] * len(steps))
  aux = deg.make_aux(z) if family == "mix" else {"z": jnp.asarray(z)}
  out = deg.apply(x, s, aux)
  expected = f["xs"].reshape((-1,) + f["xs"].shape[2:])
  np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=TOL)


def test_schedule_matches_reference_and_spec_values():
  abar = noise.cosine_alphas_cumprod(200)
  assert abar.dtype == np.float64 and abar.shape == (200,)
  np.testing.assert_allclose(abar, _reference_schedule(200), rtol=1e-12, atol=0)
  # Derived values quoted by the spec (§3.8).
  assert abar[0] == pytest.approx(0.99975, abs=1e-5)
  assert abar[99] == pytest.approx(0.494, abs=1e-3)
  assert abar[198] == pytest.approx(6.1e-5, rel=0.02)
  assert abar[199] == pytest.approx(6.1e-8, rel=0.02)
  assert np.all(np.diff(abar) < 0)


@pytest.mark.parametrize("family", ["noise", "mix"])
def test_equals_closed_form_for_every_step(family):
  t, n, c = 50, 4, 3
  deg = degradations.build(_config(family, t), n, c)
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (t + 1, n, n, c)).astype(np.float32)
  z = rng.uniform(-1, 1, (t + 1, n, n, c)).astype(np.float32)
  s = np.arange(t + 1)
  out = np.asarray(deg.apply(jnp.asarray(x0), jnp.asarray(s, jnp.int32),
                             {"z": jnp.asarray(z)}))
  abar = _reference_schedule(t)
  for k in s:
    if k == 0:
      ref = x0[0]
    else:
      ref = np.sqrt(abar[k - 1]) * x0[k] + np.sqrt(1 - abar[k - 1]) * z[k]
    np.testing.assert_allclose(out[k], ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("family", ["noise", "mix"])
def test_estimate_aux_recovers_z(family):
  t, n, c = 200, 8, 3
  deg = degradations.build(_config(family, t), n, c)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  b = t - 1
  x0 = jax.random.uniform(k1, (b, n, n, c), minval=-1, maxval=1)
  if family == "noise":
    z = deg.sample_aux(k2, b)["z"]
  else:
    z = deg.make_aux(jax.random.uniform(k2, (b, n, n, c), minval=-1, maxval=1))["z"]
  s = jnp.arange(1, t, dtype=jnp.int32)  # 1..T-1
  x_s = deg.apply(x0, s, {"z": z})
  z_hat = deg.estimate_aux(x_s, x0, s)["z"]
  np.testing.assert_allclose(np.asarray(z_hat), np.asarray(z), rtol=0, atol=TOL)
  # jit-able, and s = 0 (no trace of z) gives zeros rather than NaN.
  z0 = jax.jit(deg.estimate_aux)(x0[:2], x0[:2], jnp.zeros(2, jnp.int32))["z"]
  np.testing.assert_array_equal(np.asarray(z0), 0.0)


@pytest.mark.parametrize("family", ["noise", "mix"])
def test_contract(family):
  t, n, c, b = 20, 8, 3, 4
  deg = degradations.build(_config(family, t), n, c)
  assert deg.random
  x0 = jax.random.uniform(jax.random.PRNGKey(1), (b, n, n, c), minval=-1, maxval=1)
  z = jax.random.normal(jax.random.PRNGKey(2), (b, n, n, c))
  aux = {"z": z}
  np.testing.assert_array_equal(
      np.asarray(deg.apply(x0, jnp.zeros(b, jnp.int32), aux)), np.asarray(x0))
  s = jnp.asarray([0, 1, 10, t], jnp.int32)
  mixed = deg.apply(x0, s, aux)
  np.testing.assert_allclose(np.asarray(jax.jit(deg.apply)(x0, s, aux)),
                             np.asarray(mixed), rtol=0, atol=1e-6)
  for i in range(b):
    single = deg.apply(x0, jnp.full(b, s[i], jnp.int32), aux)
    np.testing.assert_allclose(np.asarray(mixed[i]), np.asarray(single[i]),
                               rtol=0, atol=1e-7)
  with pytest.raises(ValueError, match="aux"):
    deg.apply(x0, s, None)


def test_noise_sample_aux():
  deg = degradations.build(_config("noise", 10), 16, 3)
  a = deg.sample_aux(jax.random.PRNGKey(0), 64)["z"]
  b = deg.sample_aux(jax.random.PRNGKey(0), 64)["z"]
  other = deg.sample_aux(jax.random.PRNGKey(1), 64)["z"]
  assert a.shape == (64, 16, 16, 3) and a.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(other))
  assert abs(float(a.mean())) < 0.02 and abs(float(a.std()) - 1) < 0.02


def test_mix_needs_partner_images():
  deg = degradations.build(_config("mix", 200), 8, 3)
  with pytest.raises(ValueError, match="make_aux"):
    deg.sample_aux(jax.random.PRNGKey(0), 2)
  partner = np.zeros((2, 8, 8, 3), np.float32)
  aux = deg.make_aux(partner)
  assert aux["z"].dtype == jnp.float32 and aux["z"].shape == (2, 8, 8, 3)
  with pytest.raises(ValueError, match="partner"):
    deg.make_aux(np.zeros((2, 8, 8, 1), np.float32))
  # The end point is (almost) the partner image.
  x0 = jnp.ones((2, 8, 8, 3))
  out = deg.apply(x0, jnp.full(2, 200, jnp.int32), aux)
  assert float(jnp.max(jnp.abs(out))) < 1e-3


@pytest.mark.parametrize("family", ["noise", "mix"])
@pytest.mark.parametrize("steps", [0, -3])
def test_bad_config_names_the_key(family, steps):
  cls = noise.GaussianNoise if family == "noise" else mix.Mix
  with pytest.raises(ValueError, match=r"degradation\.time_steps"):
    cls(_config(family, steps), image_size=8, channels=3)
  with pytest.raises(ValueError, match=r"degradation\.time_steps"):
    degradations.build(_config(family, steps), 8, 3)
  with pytest.raises(ValueError, match=r"data\.channels"):
    cls(_config(family, 10), image_size=8, channels=0)
