"""Unconditional generation: the sampler started from a prior over x_T (spec §5.3).

  generate(config, workdir)

loads the EMA weights of the latest checkpoint in `workdir`, draws
`sample.num_samples` fully degraded images x_T from the prior of the
degradation family, runs `sample.method` from each of them and writes one PNG
per sample plus a grid to workdir/generated/ (and the FID against the
`eval.split` images when Inception weights are configured).

Priors, one per family (the official generation test types):

  blur             'blur_gmm': a Gaussian mixture (`sample.gmm_components`,
                   full covariance) over the per-channel spatial means of the
                   training images; each draw is a flat colour image, taken
                   through D(·, T) (the discrete blur's "mean at T").
  resolution       'resolution_gmm': a Gaussian mixture over the fully degraded
                   training images D(x0, T), area-downsampled to the last
                   resolution of the schedule; draws are upsampled back with
                   nearest-exact.
  mask_generation  'random_colour': x_T is the random flat colour c the model
                   was trained to reach (Uniform[-0.5, 0.5) per channel).
  noise            'hot_noise': x_T ~ N(0, I). 'tacos' keeps z = x_T fixed
                   ("fixed noise"), 'ddim' re-estimates it every step
                   ("estimated noise").
  mix              'animorphosis': x_T is a partner-domain image (AFHQ), which
                   also stays the fixed partner z of the sampler.

`sample.noise_level` > 0 adds N(0, noise_level²) per pixel to x_T after the
prior ("broken symmetry", 0.002 in the paper); the colour / partner that the
sampler re-degrades with stays noise free, and, as in the official `gen_sample`
whose samples were scored, the noise is not subtracted from the output.

The priors are small pure functions (`channel_means`, `fit_gmm`, `sample_gmm`,
`flat_images`, `resolution_features`, `upsample`, `break_symmetry`) so that
tests can check them directly.
"""

from __future__ import annotations

import os
import time

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from sklearn import mixture

from colddiff_jax import degradations
from colddiff_jax import evaluate
from colddiff_jax import input_pipeline
from colddiff_jax import parallel
from colddiff_jax import paths
from colddiff_jax import sampling
from colddiff_jax import train
from colddiff_jax.degradations import base
from colddiff_jax.degradations import operators

#: degradation.name -> the prior over x_T used to generate with it.
GENERATORS = {
    "blur": "blur_gmm",
    "resolution": "resolution_gmm",
    "mask_generation": "random_colour",
    "noise": "hot_noise",
    "mix": "animorphosis",
}
#: Covariance regulariser of the GMM priors: scikit-learn's default for the
#: 3-d channel means; the official 1e-4 for the high-dimensional image GMM.
REG_COVAR = {"blur_gmm": 1e-6, "resolution_gmm": 1e-4}
#: Samples shown in generated/grid.png (8 per row).
GRID_SAMPLES = 64
GRID_COLUMNS = 8
# Images per chunk when features are computed from the training set.
_CHUNK = 256


# ----------------------------------------------------------------- priors ----

def channel_means(images: np.ndarray) -> np.ndarray:
  """Per-image, per-channel spatial means [N, C] of images [N, H, W, C] (float64)."""
  return np.asarray(images, np.float64).mean(axis=(1, 2))


def fit_gmm(features: np.ndarray, n_components: int, seed: int,
            reg_covar: float = 1e-6) -> mixture.GaussianMixture:
  """Fits a full-covariance Gaussian mixture to features [N, D] (scikit-learn).

  The official fit (pycave, convergence tolerance 1e-3) has the same model; a
  fixed `random_state` makes the fit reproducible.

  Raises:
    ValueError: naming `sample.gmm_components` when it is not an integer in
      1..N.
  """
  features = np.asarray(features, np.float64)
  n = len(features)
  if (isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer))
      or not 1 <= n_components <= n):
    raise ValueError(
        f"sample.gmm_components={n_components!r} must be an integer between 1 "
        f"and the {n} images the prior is fitted on.")
  gmm = mixture.GaussianMixture(
      n_components=int(n_components), covariance_type="full", tol=1e-3,
      reg_covar=reg_covar, random_state=int(seed))
  return gmm.fit(features)


def sample_gmm(gmm: mixture.GaussianMixture, num_samples: int, seed: int) -> np.ndarray:
  """Draws [num_samples, D] float64 vectors from a fitted mixture.

  Components are drawn per sample (not grouped by component as
  `GaussianMixture.sample` returns them), from a generator seeded by `seed`.
  """
  rng = np.random.default_rng(seed)
  weights = np.asarray(gmm.weights_, np.float64)
  comp = rng.choice(len(weights), size=num_samples, p=weights / weights.sum())
  z = rng.standard_normal((num_samples, gmm.means_.shape[1]))
  out = np.empty_like(z)
  for k in range(len(weights)):
    idx = comp == k
    chol = np.linalg.cholesky(gmm.covariances_[k])
    out[idx] = gmm.means_[k] + z[idx] @ chol.T
  return out


def flat_images(colours: np.ndarray, image_size: int) -> np.ndarray:
  """Flat images [N, S, S, C] float32 of per-image colours [N, C]."""
  colours = np.asarray(colours, np.float32)
  return np.broadcast_to(colours[:, None, None, :],
                         (len(colours), image_size, image_size, colours.shape[1])).copy()


def resolution_operators(deg) -> tuple[np.ndarray, np.ndarray]:
  """(P [m, N], U [N, m]) of a resolution degradation with final size m.

  P maps an image to the m×m content of its fully degraded state:
  area-downsample(D(x, T)) = P X Pᵀ per channel (exact for the factor-2
  routines, whose D(x, T) is made of m×m constant blocks); U is the
  nearest-exact upsampling back to N×N.
  """
  n = deg.image_size
  m = deg.sizes[-1]
  full = np.asarray(deg.table[deg.num_steps], np.float64)
  return operators.area_operator(n, m) @ full, operators.nearest_exact_operator(m, n)


def resolution_features(images: np.ndarray, p: np.ndarray) -> np.ndarray:
  """Flattened low-resolution content [N, m·m·C] (float64) of images [N, S, S, C]."""
  images = np.asarray(images, np.float64)
  low = np.einsum("ij,bjkc,lk->bilc", p, images, p, optimize=True)
  return low.reshape(len(images), -1)


def upsample(features: np.ndarray, u: np.ndarray, channels: int) -> np.ndarray:
  """Images [N, S, S, C] float32 from flattened m×m features via U·X·Uᵀ."""
  m = u.shape[1]
  low = np.asarray(features, np.float64).reshape(len(features), m, m, channels)
  return np.einsum("ij,bjkc,lk->bilc", u, low, u, optimize=True).astype(np.float32)


def break_symmetry(x_T: jax.Array, noise_level: float, key: jax.Array) -> jax.Array:
  """x_T + noise_level · N(0, I) (the paper's "broken symmetry"); exact x_T at 0."""
  if noise_level == 0:
    return x_T
  x_T = jnp.asarray(x_T, jnp.float32)
  return x_T + noise_level * jax.random.normal(key, x_T.shape, jnp.float32)


# --------------------------------------------------------------- checking ----

def generator_name(deg) -> str:
  """The prior used for `deg`'s family; ValueError for conditional families."""
  name = deg.config.name
  if name not in GENERATORS:
    raise ValueError(
        f"degradation.name={name!r} is a conditional restoration task with no "
        f"prior over its fully degraded images; --mode=generate works with "
        f"{', '.join(GENERATORS)} (use --mode=evaluate or --mode=restore for "
        f"{name!r}).")
  return GENERATORS[name]


def check_config(config) -> None:
  """Validates the sample keys generation reads, before anything is loaded."""
  sampling.check_method(config.sample.method)
  for key in ("num_samples", "batch_size", "gmm_components"):
    value = config.sample[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"sample.{key}={value!r} must be an integer >= 1.")
  noise = config.sample.noise_level
  if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (
      np.isfinite(noise) and noise >= 0):
    raise ValueError(f"sample.noise_level={noise!r} must be a finite number >= 0.")


def _check_method_for(deg, method: str) -> None:
  if method == "ddim" and type(deg).estimate_aux is base.Degradation.estimate_aux:
    raise ValueError(
        f"sample.method='ddim' re-estimates the hidden image, which "
        f"degradation.name={deg.config.name!r} does not have; use 'tacos'.")


# ------------------------------------------------------------------ data ----

def training_features(data_config, fn) -> tuple[np.ndarray, int]:
  """fn over every training image, test transform; (features, image count).

  The official fit iterated the training folder with the no-augmentation
  dataset (resize + centre crop), i.e. our `test_transform`. Images are
  streamed in chunks, so memory holds the features only.
  """
  features = [fn(batch["image"]) for batch in
              input_pipeline.eval_batches(data_config, _CHUNK, split="train")]
  features = np.concatenate(features)
  return features, len(features)


def reference_images(config) -> np.ndarray:
  """The FID reference: `eval.split` images, test transform, float [-1, 1]."""
  return input_pipeline.eval_split(config.data, config.eval.num_images,
                                   split=config.eval.split)["image"]


def partner_source(data_config):
  """The animorphosis start domain (data.partner_folder), a random-access source."""
  if not data_config.get("partner_folder"):
    raise ValueError(
        "degradation.name='mix' generation starts from partner images: set "
        "data.partner_folder to the start-domain image folder (AFHQ).")
  return input_pipeline.load_partner(data_config)


# ----------------------------------------------------------------- priors ----

def make_prior(config, deg):
  """The prior over x_T of `deg`'s family as `draw(start, count) -> (x_T, aux)`.

  `draw` returns the samples start..start+count-1 of one fixed sequence
  (numpy float32 [count, S, S, C] and the sampler's aux, numpy or None), so
  the result does not depend on how the samples are batched.
  """
  kind = generator_name(deg)
  seed, n = config.seed, config.sample.num_samples
  size, channels = deg.image_size, deg.channels
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 5)

  if kind in ("blur_gmm", "resolution_gmm"):
    tic = time.time()
    if kind == "blur_gmm":
      if not getattr(deg, "discrete", False):
        logging.warning(
            "degradation.discrete=False: this blur model was not trained to "
            "reach flat images at T, so generating from flat colours is off "
            "its training distribution (the paper's generation runs use "
            "discrete=True).")
      features, count = training_features(config.data, channel_means)
    else:
      p, u = resolution_operators(deg)
      features, count = training_features(
          config.data, lambda x: resolution_features(x, p))
    gmm = fit_gmm(features, config.sample.gmm_components, seed, REG_COVAR[kind])
    draws = sample_gmm(gmm, n, seed)
    logging.info("Fitted a %d-component GMM on %d training images (%d features) "
                 "in %.1fs.", config.sample.gmm_components, count,
                 features.shape[1], time.time() - tic)
    if kind == "blur_gmm":
      # D(·, T) of the flat image (the discrete blur's mean at T), as gen_sample.
      start_state = jax.jit(deg.initial_state)
      def draw(start, count):
        flat = flat_images(draws[start:start + count], size)
        return np.asarray(start_state(jnp.asarray(flat))), None
    else:
      def draw(start, count):
        return upsample(draws[start:start + count], u, channels), None
    return kind, draw

  if kind in ("random_colour", "hot_noise"):
    # One aux draw per sample index, so batching does not change the samples.
    aux_of = jax.jit(jax.vmap(lambda i: jax.tree.map(
        lambda v: v[0], deg.sample_aux(jax.random.fold_in(key, i), 1))))

    def draw(start, count):
      aux = jax.tree.map(np.asarray, aux_of(jnp.arange(start, start + count)))
      if kind == "random_colour":
        return flat_images(aux["colour"], size), aux
      return aux["z"], aux  # fixed noise: z = x_T
    return kind, draw

  # animorphosis: a seeded selection of partner images (cycled if too few),
  # decoded per batch through the test transform.
  partners = partner_source(config.data)
  order = np.resize(np.random.default_rng(seed).permutation(len(partners)), n)
  transform = config.data.test_transform

  def draw(start, count):
    x = np.stack([input_pipeline.to_float(input_pipeline.apply_transform(
        partners[int(i)], transform, size)) for i in order[start:start + count]])
    return x, {"z": x}

  return kind, draw


# ------------------------------------------------------------- generation ----

def make_sampler(apply_fn, deg, config, return_trajectory: bool = False,
                 num_steps: int | None = None):
  """The jitted `(params, x_s, aux) -> x_0` of `sample.method` / `sample.steps`.

  Started after `num_steps` steps (default T). When that is fewer steps than
  `sample.steps` network calls, every step is taken (one call each).
  """
  sample_steps = config.sample.steps
  if (num_steps is not None and sample_steps is not None
      and sample_steps > num_steps):
    logging.info("sample.steps=%d > %d steps to undo: taking all %d.",
                 sample_steps, num_steps, num_steps)
    sample_steps = num_steps
  return sampling.make_param_sampler(
      apply_fn, deg, config.sample.method, return_trajectory=return_trajectory,
      num_steps=num_steps, sample_steps=sample_steps)


def generate_images(config, deg, apply_fn, params, mesh) -> tuple[str, np.ndarray]:
  """Draws `sample.num_samples` images; returns (prior name, uint8 [N,S,S,C])."""
  kind, draw = make_prior(config, deg)
  sampler = make_sampler(apply_fn, deg, config)
  n, batch = config.sample.num_samples, config.sample.batch_size
  noise_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 6)
  out = []
  for i, start in enumerate(range(0, n, batch)):
    count = min(batch, n - start)
    x_T, aux = draw(start, count)
    x_T = np.asarray(break_symmetry(x_T, config.sample.noise_level,
                                    jax.random.fold_in(noise_key, i)))
    x_T = parallel.shard_rows(x_T, mesh, batch)
    aux = jax.tree.map(lambda v: parallel.shard_rows(v, mesh, batch), aux)
    x0 = sampler(params, x_T, aux)
    out.append(evaluate.to_uint8(parallel.gather(x0)[:count]))
    logging.info("Generated %d/%d images.", start + count, n)
  return kind, np.concatenate(out)


def write_images(folder: str, images: np.ndarray) -> str:
  """Writes sample_<k:06d>.png per image and grid.png; returns the grid path.

  The samples and metrics.json of an earlier run in `folder` are removed
  first, so the folder holds exactly this run's samples (external FID tools
  read whole folders).
  """
  folder_path = epath.Path(folder)
  folder_path.mkdir(parents=True, exist_ok=True)
  for stale in [*folder_path.glob("sample_*.png"), *folder_path.glob("metrics.json")]:
    stale.unlink()
  for k, image in enumerate(images):
    evaluate.save_png(os.path.join(folder, f"sample_{k:06d}.png"), image)
  shown = images[:GRID_SAMPLES]
  rows = [shown[i:i + GRID_COLUMNS] for i in range(0, len(shown), GRID_COLUMNS)]
  if len(rows) > 1 and len(rows[-1]) < GRID_COLUMNS:  # pad the last row white
    fill = np.full((GRID_COLUMNS - len(rows[-1]),) + shown.shape[1:], 255, np.uint8)
    rows[-1] = np.concatenate([rows[-1], fill])
  # image_grid takes [-1, 1] images; uint8 v maps back to itself.
  grid = evaluate.image_grid([r.astype(np.float32) / 127.5 - 1.0 for r in rows])
  path = os.path.join(folder, "grid.png")
  evaluate.save_png(path, grid)
  return path


def generate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Generates `sample.num_samples` images into workdir/generated/.

  Returns:
    {'generator': prior name, 'method', 'noise_level', 'num_samples', 'step':
     checkpoint step, 'folder', 'grid': grid path, 'fid': float or None,
     'metrics': metrics.json path or None}.

  Raises:
    ValueError / FileNotFoundError naming the config key, before the
    checkpoint is loaded: a family without a prior, a sampler it cannot run,
    bad sample.* values, missing partner images or Inception weights.
  """
  check_config(config)
  probe = degradations.build(config.degradation, config.data.image_size,
                             config.data.channels)
  generator_name(probe)
  _check_method_for(probe, config.sample.method)
  if probe.config.name == "mix":
    partner_source(config.data)
  weights = config.eval.inception_weights
  if weights and not os.path.exists(weights):
    raise FileNotFoundError(
        f"eval.inception_weights={weights!r} does not exist; give the local "
        f"pt_inception-2015-12-05 weights file (README, FID) or unset it to "
        f"skip the FID.")
  mesh, deg, model, state = train.restore_trained(config, workdir)
  parallel.check_global_batch(config.sample.batch_size, mesh, key="sample.batch_size")
  scorer = None
  if weights:  # loaded before the long sampling, so a bad file fails first
    from colddiff_jax.metrics import fid  # pylint: disable=g-import-not-at-top
    scorer = fid.FID(weights, mesh, config.eval.batch_size)
  workdir = paths.resolve(workdir)
  folder = os.path.join(workdir, "generated")
  step = int(state["step"])
  tic = time.time()
  kind, images = generate_images(config, deg, train.make_apply_fn(model),
                                 state["ema"], mesh)
  logging.info("Generated %d images with the %s prior and %s sampling in %.1fs.",
               len(images), kind, config.sample.method, time.time() - tic)
  is_main = jax.process_index() == 0
  grid = os.path.join(folder, "grid.png")
  if is_main:
    grid = write_images(folder, images)
  summary = {"generator": kind, "method": config.sample.method,
             "noise_level": float(config.sample.noise_level),
             "num_samples": len(images), "step": step, "folder": folder,
             "grid": grid, "fid": None, "metrics": None}
  if scorer is None:
    logging.info("FID skipped: set --config.eval.inception_weights to a local "
                 "Inception-v3 weights file to score the samples.")
    return summary
  reference = reference_images(config)
  # FID of the images as saved (uint8), like the paper's PNG-folder FIDs.
  summary["fid"] = float(scorer.distance(input_pipeline.to_float(images), reference))
  summary["metrics"] = os.path.join(folder, "metrics.json")
  if is_main:
    evaluate.write_json(summary["metrics"], {
        "fid": summary["fid"], "num_samples": len(images),
        "reference_split": config.eval.split, "num_reference": len(reference),
        "generator": kind, "method": config.sample.method,
        "noise_level": summary["noise_level"], "step": step})
  logging.info("FID of %d generated vs %d %s images: %.3f", len(images),
               len(reference), config.eval.split, summary["fid"])
  return summary
