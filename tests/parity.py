"""Helpers shared by the parity tests against the official fixtures."""

import jax.numpy as jnp
import ml_collections
import numpy as np

LSB = 2.0 / 255.0  # one 8-bit level on the [-1, 1] scale


def config(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kw)


def max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_quantized_matches(deg, state, expected, tol=1e-5, boundary=2e-4,
                             max_flip_fraction=0.02):
  """Checks deg.quantize(state) against the official quantised values.

  Truncation to 8 bit is discontinuous: a state that sits on a level boundary
  (e.g. a saturated pixel blurred to 0.99999994) flips by one level under float
  rounding differences of 1e-7. Those pixels are allowed to differ by exactly
  one level; every other pixel must match to `tol`.
  """
  state = np.asarray(state, np.float64)
  ours = np.asarray(deg.quantize(jnp.asarray(state, jnp.float32)), np.float64)
  diff = np.abs(ours - expected)
  level = (state + 1.0) / 2.0 * 255.0
  near = np.abs(level - np.round(level)) < boundary * 255.0 / 2.0
  assert diff[~near].max(initial=0.0) <= tol, diff[~near].max()
  flips = diff > tol
  assert np.all(np.abs(diff[flips] - LSB) < 1e-5)
  assert flips.mean() <= max_flip_fraction, flips.mean()
