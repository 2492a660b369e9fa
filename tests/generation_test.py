"""Generation: the priors over x_T (pure functions) and generate() end to end."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from colddiff_jax import checkpointing
from colddiff_jax import degradations
from colddiff_jax import generation
from colddiff_jax import models
from colddiff_jax import train
from conftest import REPO

sys.path.insert(0, str(REPO))
from configs import quickstart  # noqa: E402  pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.usefixtures("fast_compiles")


def tiny_config():
  config = quickstart.get_config("smoke")
  config.degradation.time_steps = 4
  config.eval.num_images = 16
  return config


def save_checkpoint(config, workdir, step=2):
  """A checkpoint of the freshly initialised model, as train would write it.

  Compiling a train step costs more than this whole module's budget on a
  shared CPU; these tests check what is done with the weights, not training.
  """
  model = models.build(config.model, config.data.channels, config.data.image_size,
                       rngs=nnx.Rngs(config.seed))
  state = train.create_state(config, model, train.make_optimizer(config.optim))
  state["step"] = jnp.asarray(step, jnp.int32)
  ckpt = checkpointing.Checkpointer(str(workdir), keep=config.train.keep)
  ckpt.save(step, state, {})
  ckpt.close()
  return str(workdir)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return save_checkpoint(tiny_config(), tmp_path_factory.mktemp("run"))


# ----------------------------------------------------------------- priors ----

def test_gmm_prior_reproduces_channel_mean_statistics():
  rng = np.random.default_rng(0)
  cov = np.array([[0.04, 0.01, 0.0], [0.01, 0.02, -0.005], [0.0, -0.005, 0.03]])
  means = rng.multivariate_normal([0.1, -0.2, 0.3], cov, size=3000)
  # Flat images with noise around their colour: the prior sees the means only.
  images = (means[:, None, None, :]
            + 0.1 * rng.standard_normal((3000, 4, 4, 3))).astype(np.float32)
  features = generation.channel_means(images)
  gmm = generation.fit_gmm(features, 1, seed=0)
  draws = generation.sample_gmm(gmm, 20000, seed=1)
  np.testing.assert_allclose(draws.mean(0), features.mean(0), atol=0.01)
  np.testing.assert_allclose(np.cov(draws, rowvar=False),
                             np.cov(features, rowvar=False), atol=0.003)
  # Seeded: same draws for the same seed, others for another.
  np.testing.assert_array_equal(draws, generation.sample_gmm(gmm, 20000, seed=1))
  assert not np.allclose(draws[:10], generation.sample_gmm(gmm, 10, seed=2))


def test_gmm_mixture_draws_every_component_in_proportion():
  rng = np.random.default_rng(0)
  features = np.concatenate([rng.normal(-1, 0.05, (3000, 2)),
                             rng.normal(1, 0.05, (1000, 2))])
  gmm = generation.fit_gmm(features, 2, seed=0)
  draws = generation.sample_gmm(gmm, 8000, seed=0)
  assert abs(np.mean(draws[:, 0] > 0) - 0.25) < 0.02
  # Components are interleaved, not grouped as GaussianMixture.sample returns.
  assert 0.1 < np.mean(draws[:100, 0] > 0) < 0.5


def test_gmm_components_out_of_range_names_the_key():
  with pytest.raises(ValueError, match="sample.gmm_components"):
    generation.fit_gmm(np.zeros((5, 3)), 6, seed=0)
  with pytest.raises(ValueError, match="sample.gmm_components"):
    generation.fit_gmm(np.zeros((5, 3)), 0, seed=0)


def test_broken_symmetry_adds_exactly_the_configured_noise():
  x_T = jnp.asarray(generation.flat_images(np.full((16, 3), 0.25), 32))
  key = jax.random.PRNGKey(3)
  noisy = generation.break_symmetry(x_T, 0.002, key)
  diff = np.asarray(noisy - x_T, np.float64)
  assert abs(diff.std() - 0.002) < 0.00005  # 49k draws
  assert abs(diff.mean()) < 0.00005
  np.testing.assert_array_equal(noisy, generation.break_symmetry(x_T, 0.002, key))
  assert not np.array_equal(noisy, generation.break_symmetry(x_T, 0.002,
                                                             jax.random.PRNGKey(4)))
  # Perfect symmetry: x_T exactly.
  np.testing.assert_array_equal(generation.break_symmetry(x_T, 0.0, key), x_T)


def test_resolution_prior_is_exact_on_fully_degraded_images():
  config = tiny_config().degradation
  config.update(dict(name="resolution", time_steps=3,
                     resolution_routine="Incremental_factor_2"))
  deg = degradations.build(config, 32, 3)
  p, u = generation.resolution_operators(deg)
  assert p.shape == (4, 32) and u.shape == (32, 4)
  x0 = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
  x_T = np.asarray(deg.apply(jnp.asarray(x0), jnp.full((5,), 3, jnp.int32)))
  features = generation.resolution_features(x0, p)
  assert features.shape == (5, 4 * 4 * 3)
  # Features of x0 describe D(x0, T), and upsampling them gives it back.
  np.testing.assert_allclose(generation.upsample(features, u, 3), x_T, atol=1e-5)


def _prior(name, **deg_options):
  config = tiny_config()
  config.degradation.update(dict(name=name, **deg_options))
  config.data.channels = 3
  deg = degradations.build(config.degradation, 32, 3)
  return generation.make_prior(config, deg)


def test_random_colour_prior_is_the_flat_colour_the_sampler_reuses():
  kind, draw = _prior("mask_generation", reverse=True, kernel_std=0.5, initial_mask=1)
  assert kind == "random_colour"
  x_T, aux = draw(0, 6)
  assert x_T.shape == (6, 32, 32, 3)
  np.testing.assert_array_equal(x_T, np.broadcast_to(aux["colour"][:, None, None],
                                                     x_T.shape))
  assert np.all(aux["colour"] >= -0.5) and np.all(aux["colour"] < 0.5)
  # Samples do not depend on the batching.
  x_a, _ = draw(0, 2)
  x_b, _ = draw(2, 4)
  np.testing.assert_array_equal(np.concatenate([x_a, x_b]), x_T)


def test_hot_noise_prior_fixes_the_noise_to_x_T():
  kind, draw = _prior("noise")
  assert kind == "hot_noise"
  x_T, aux = draw(0, 4)
  np.testing.assert_array_equal(x_T, aux["z"])
  assert abs(x_T.std() - 1.0) < 0.05


def test_animorphosis_prior_starts_from_partner_images(tmp_path):
  for i in range(3):
    Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
  config = tiny_config()
  config.degradation.update(dict(name="mix"))
  config.data.channels = 3
  config.data.partner_folder = str(tmp_path)
  config.sample.num_samples = 5
  deg = degradations.build(config.degradation, 32, 3)
  kind, draw = generation.make_prior(config, deg)
  assert kind == "animorphosis"
  x_T, aux = draw(0, 5)
  assert x_T.shape == (5, 32, 32, 3)
  np.testing.assert_array_equal(x_T, aux["z"])
  levels = sorted({round(float(v), 4) for v in x_T[:, 0, 0, 0]})
  assert levels == [round(60 * i / 127.5 - 1, 4) for i in range(3)]  # all 3, cycled


def test_conditional_family_cannot_generate(tmp_path):
  config = tiny_config()
  config.degradation.name = "decolor"
  with pytest.raises(ValueError, match="degradation.name='decolor'.*--mode=evaluate"):
    generation.generate(config, str(tmp_path))  # fails before any checkpoint


def test_missing_inception_weights_fail_before_sampling(tmp_path):
  config = tiny_config()
  config.eval.inception_weights = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
    generation.generate(config, str(tmp_path))


# ------------------------------------------------------------- end to end ----

class _FakeFID:
  """Stands in for metrics.fid.FID (its own tests cover Inception)."""
  calls = []

  weights = []

  def __init__(self, weights_path, mesh, batch_size):
    del mesh, batch_size
    _FakeFID.weights.append(weights_path)

  def distance(self, generated, reference):
    _FakeFID.calls.append((np.asarray(generated), np.asarray(reference)))
    return 12.5


def test_generate_writes_samples_grid_and_fid(workdir, monkeypatch):
  from colddiff_jax.metrics import fid  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(fid, "FID", _FakeFID)
  config = tiny_config()
  config.degradation.discrete = True  # the paper's blur-generation setting
  config.sample.num_samples = 10  # two batches of 8, the last one padded
  config.sample.noise_level = 0.002
  weights = os.path.join(workdir, "inception.npz")  # read by the fake only
  open(weights, "wb").close()
  config.eval.inception_weights = weights
  # A stale sample of an earlier, larger run is removed.
  os.makedirs(os.path.join(workdir, "generated"), exist_ok=True)
  Image.fromarray(np.zeros((32, 32), np.uint8)).save(
      os.path.join(workdir, "generated", "sample_000099.png"))

  summary = generation.generate(config, workdir)

  folder = os.path.join(workdir, "generated")
  samples = sorted(f for f in os.listdir(folder) if f.startswith("sample_"))
  assert samples == [f"sample_{k:06d}.png" for k in range(10)]
  assert Image.open(os.path.join(folder, samples[0])).size == (32, 32)
  grid = Image.open(summary["grid"])
  assert grid.size == (8 * 34 + 2, 2 * 34 + 2)  # 8 per row, 2 rows
  assert summary["generator"] == "blur_gmm" and summary["num_samples"] == 10
  assert summary["step"] == 2 and summary["fid"] == 12.5
  assert _FakeFID.weights == [weights]
  generated, reference = _FakeFID.calls[-1]
  assert generated.shape == (10, 32, 32, 1) and reference.shape == (16, 32, 32, 1)
  # FID sees the samples as saved (uint8 levels).
  saved = np.asarray(Image.open(os.path.join(folder, samples[3])), np.float32)
  np.testing.assert_allclose(generated[3, ..., 0], saved / 127.5 - 1.0, atol=1e-6)
  with open(os.path.join(folder, "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["fid"] == 12.5 and metrics["num_samples"] == 10
  assert metrics["reference_split"] == "test" and metrics["num_reference"] == 16
