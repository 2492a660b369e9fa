"""Tests of `decolor`: official fixtures, step-by-step reference, contract."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from colddiff_jax import degradations
from colddiff_jax.degradations import decolor
from conftest import load_fixture

TOL = 1e-5


def _config(**kw):
  base = dict(name="decolor", time_steps=20, decolor_routine="Linear",
              decolor_ema_factor=0.9, decolor_total_remove=False)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _slow_reference(x0, s, num_steps, routine, ema, total_remove):
  """Applies x <- f_i x + (1 - f_i) mean_c(x) one step at a time, in float64."""
  factors = []
  remaining = 1.0
  for i in range(num_steps):
    if routine == "Constant":
      f = ema
    else:
      f = 1.0 - (1.0 / num_steps) / remaining
      remaining *= f
    factors.append(f)
  if total_remove:
    factors[-1] = 0.0
  out = []
  for b in range(x0.shape[0]):
    x = np.asarray(x0[b], np.float64)
    for i in range(int(s[b])):
      x = factors[i] * x + (1 - factors[i]) * x.mean(-1, keepdims=True)
    out.append(x)
  return np.stack(out)


FIXTURES = {
    "decolor_linear_total_remove.npz": ("Linear", True),
    "decolor_constant_total_remove.npz": ("Constant", True),
    "decolor_constant.npz": ("Constant", False),
    "decolor_linear.npz": ("Linear", False),
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_matches_official_fixture(name):
  routine, total_remove = FIXTURES[name]
  f = load_fixture(name)
  x0 = f["x0"]
  b, n, _, c = x0.shape
  deg = degradations.build(
      _config(decolor_routine=routine, decolor_total_remove=total_remove), n, c)
  np.testing.assert_allclose(deg.step_matrices, f["kernels"], rtol=0, atol=TOL)
  steps = f["s"]
  x = jnp.asarray(np.concatenate([x0] * len(steps)))
  s = jnp.asarray(np.repeat(steps, b), jnp.int32)
  out = deg.apply(x, s)
  expected = f["xs"].reshape((-1,) + f["xs"].shape[2:])
  np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=TOL)
  np.testing.assert_allclose(np.asarray(deg.total_forward(jnp.asarray(x0))),
                             f["total_forward"], rtol=0, atol=TOL)


@pytest.mark.parametrize("routine,total_remove,channels", [
    ("Linear", False, 3), ("Linear", True, 3), ("Constant", False, 3),
    ("Constant", True, 3), ("Constant", False, 4), ("Linear", False, 1)])
def test_equals_step_by_step_reference(routine, total_remove, channels):
  t, n = 20, 6
  deg = degradations.build(
      _config(time_steps=t, decolor_routine=routine, decolor_ema_factor=0.8,
              decolor_total_remove=total_remove), n, channels)
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (t + 1, n, n, channels)).astype(np.float32)
  s = np.arange(t + 1)
  out = deg.apply(jnp.asarray(x0), jnp.asarray(s, jnp.int32))
  ref = _slow_reference(x0, s, t, routine, 0.8, total_remove)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=TOL)


def test_linear_closed_form_and_total_forward():
  """Linear: D(x, s) = (1 - s/T) x + (s/T) gray(x); D(x, T) = total_forward(x)."""
  t, n, c = 10, 5, 3
  deg = degradations.build(_config(time_steps=t), n, c)
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (t + 1, n, n, c), minval=-1,
                          maxval=1)
  s = jnp.arange(t + 1, dtype=jnp.int32)
  out = np.asarray(deg.apply(x0, s))
  gray = np.asarray(deg.total_forward(x0))
  frac = (np.arange(t + 1) / t)[:, None, None, None]
  np.testing.assert_allclose(out, (1 - frac) * np.asarray(x0) + frac * gray,
                             rtol=0, atol=TOL)
  np.testing.assert_allclose(out[t], gray[t], rtol=0, atol=TOL)
  assert deg.factors[-1] == pytest.approx(0.0, abs=1e-12)


def test_contract():
  t, n, c, b = 20, 8, 3, 4
  deg = degradations.build(_config(decolor_routine="Constant"), n, c)
  assert not deg.random and deg.sample_aux(jax.random.PRNGKey(0), b) is None
  x0 = jax.random.uniform(jax.random.PRNGKey(1), (b, n, n, c), minval=-1, maxval=1)
  np.testing.assert_array_equal(
      np.asarray(deg.apply(x0, jnp.zeros(b, jnp.int32))), np.asarray(x0))
  s = jnp.asarray([0, 3, 11, t], jnp.int32)
  mixed = deg.apply(x0, s)
  np.testing.assert_allclose(np.asarray(jax.jit(deg.apply)(x0, s)),
                             np.asarray(mixed), rtol=0, atol=1e-6)
  for i in range(b):
    single = deg.apply(x0, jnp.full(b, s[i], jnp.int32))
    np.testing.assert_allclose(np.asarray(mixed[i]), np.asarray(single[i]),
                               rtol=0, atol=1e-7)
  # The channel mean is preserved by every step.
  np.testing.assert_allclose(np.asarray(mixed).mean(-1), np.asarray(x0).mean(-1),
                             rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match=r"data\.channels"):
    deg.apply(jnp.zeros((b, n, n, 1)), s)


@pytest.mark.parametrize("cfg,key", [
    (_config(decolor_routine="Exponential"), "degradation.decolor_routine"),
    (_config(time_steps=0), "degradation.time_steps"),
    (_config(decolor_ema_factor=1.5), "degradation.decolor_ema_factor"),
    (_config(decolor_ema_factor=-0.1), "degradation.decolor_ema_factor"),
    (_config(decolor_total_remove="no"), "degradation.decolor_total_remove"),
])
def test_bad_config_names_the_key(cfg, key):
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    decolor.Decolorization(cfg, image_size=8, channels=3)
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    degradations.build(cfg, 8, 3)


def test_bad_channels_names_the_key():
  with pytest.raises(ValueError, match=r"data\.channels"):
    decolor.Decolorization(_config(), image_size=8, channels=0)
