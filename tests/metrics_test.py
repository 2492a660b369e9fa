"""SSIM / RMSE against the official metric code."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_fixture
from colddiff_jax.metrics import ssim as ssim_lib


@pytest.mark.parametrize("name", ["metrics_ssim_rmse_32x32x3.npz",
                                  "metrics_ssim_rmse_64x64x1.npz"])
def test_ssim_and_rmse_match_official(name):
  data = load_fixture(name)
  for p in range(len(data["ssim"])):
    a, b = jnp.asarray(data["a"][p]), jnp.asarray(data["b"][p])
    per_image = ssim_lib.ssim(a, b)
    np.testing.assert_allclose(per_image, data["ssim_per_image"][p], atol=1e-5)
    np.testing.assert_allclose(per_image.mean(), data["ssim"][p], atol=1e-5)
    np.testing.assert_allclose(ssim_lib.rmse(a, b), data["rmse"][p], rtol=1e-5, atol=1e-7)
