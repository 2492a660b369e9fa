"""Restoration evaluation (Degraded / Direct / Sampled) and image grids.

For a clean test batch x0 the degradation gives x_T; "direct" is the one-shot
reconstruction R(x_T, T-1) and "sampled" is the output x_0 of the configured
sampler (Algorithm 2 by default). Every test image is used once: the last
partial batch is padded to a full, evenly sharded batch and the padding is
dropped from the metrics. Metrics follow the official conventions (images
mapped to [0, 1] with (x+1)/2, unclamped; global RMSE; mean SSIM).
"""

from __future__ import annotations

import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from colddiff_jax import parallel
from colddiff_jax import paths
from colddiff_jax import sampling
from colddiff_jax.metrics import ssim as ssim_lib

KINDS = ("degraded", "direct", "sampled")


def make_restorer(apply_fn, deg, method: str, sample_steps: int | None = None):
  """jitted (params, x0, aux) -> (x_T, direct, sampled), all [-1, 1] scale.

  `sample_steps` < T runs the sampler on that many evenly spaced steps.
  """
  direct = sampling.make_param_sampler(apply_fn, deg, "direct")
  sampler = sampling.make_param_sampler(apply_fn, deg, method,
                                        sample_steps=sample_steps)

  @jax.jit
  def start(x0, aux):
    return deg.initial_state(x0, aux)

  def run(params, x0, aux):
    x_T = start(x0, aux)
    return x_T, direct(params, x_T, aux), sampler(params, x_T, aux)

  return run


@jax.jit
def _metric_sums(x0, outputs, valid):
  """Σ squared error and Σ SSIM over the first `valid` images, per output.

  Reduced on device, so the results are replicated scalars every process can
  read, however the batch is sharded.
  """
  keep = jnp.arange(x0.shape[0]) < valid
  clean = (x0 + 1.0) / 2.0
  sums = []
  for out in outputs:
    out = (out + 1.0) / 2.0
    sums.append((jnp.sum(jnp.where(keep, ssim_lib.squared_errors(clean, out), 0.0)),
                 jnp.sum(jnp.where(keep, ssim_lib.ssim(clean, out), 0.0))))
  return sums


def evaluate_restoration(restorer, params, deg, images: np.ndarray, batch_size: int,
                         rng: jax.Array, mesh, partners: np.ndarray | None = None,
                         fid=None) -> dict:
  """RMSE and SSIM (and FID) of degraded / direct / sampled against every image.

  Args:
    restorer: from `make_restorer`.
    params: the network weights `restorer` applies.
    deg: the degradation.
    images: every test image, float32 [N,H,W,C] in [-1,1], the same array on
      every process.
    batch_size: global images per chunk (divisible by the devices of `mesh`).
    rng: PRNG key of the aux draws (chunk i uses fold_in(rng, i)).
    mesh: the device mesh; chunks are split over its 'data' axis (and over
      processes).
    partners: for 'mix', the x_T end image of each test image.
    fid: an object with `distance(images_a, images_b)` (metrics.fid.FID), or
      None to skip FID.

  Returns:
    {kind: {'rmse', 'ssim'[, 'fid']} for kind in KINDS, 'num_images': N}.
  """
  sq_err = {k: 0.0 for k in KINDS}
  ssim_sum = {k: 0.0 for k in KINDS}
  kept = {k: [] for k in KINDS}  # [0,1] outputs, only when FID is computed
  n = len(images)
  for i, start in enumerate(range(0, n, batch_size)):
    valid = min(batch_size, n - start)
    x0 = parallel.shard_rows(images[start:start + valid], mesh, batch_size)
    if partners is not None:
      aux = deg.make_aux(parallel.shard_rows(partners[start:start + valid], mesh,
                                             batch_size))
    else:
      aux = parallel.replicate(deg.sample_aux(jax.random.fold_in(rng, i), batch_size), mesh)
    outputs = restorer(params, x0, aux)
    for kind, (se, ss) in zip(KINDS, _metric_sums(x0, outputs, valid)):
      sq_err[kind] += float(se)
      ssim_sum[kind] += float(ss)
    if fid is not None:
      for kind, out in zip(KINDS, outputs):
        kept[kind].append(parallel.gather(out)[:valid])
  elements = images[:, :, :, :1].size * 3  # metrics see 3-channel images
  metrics = {kind: {"rmse": float(np.sqrt(sq_err[kind] / elements)),
                    "ssim": ssim_sum[kind] / n} for kind in KINDS}
  if fid is not None:
    for kind in KINDS:
      metrics[kind]["fid"] = float(fid.distance(np.concatenate(kept[kind]), images))
  return metrics | {"num_images": n}


def format_table(metrics: dict) -> str:
  """The metrics as the paper's table: one row per kind, FID when measured."""
  columns = [c for c in ("fid", "ssim", "rmse") if c in metrics[KINDS[0]]]
  lines = [f"{'':10s}" + "".join(f" {c.upper():>8s}" for c in columns)]
  for kind in KINDS:
    lines.append(f"{kind.capitalize():10s}"
                 + "".join(f" {metrics[kind][c]:8.4f}" for c in columns))
  return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
  """Writes JSON atomically (temporary file, then rename); local or gs://."""
  paths.write_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1,1] float -> uint8 like torchvision.save_image (clamp, x*255+0.5)."""
  return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
  """Stacks rows of images [n,H,W,C] into one uint8 grid [rows·H, n·W, C]."""
  rows = [to_uint8(r) for r in rows]
  n, h, w, c = rows[0].shape
  grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, image in enumerate(row):
      top, left = pad + i * (h + pad), pad + j * (w + pad)
      grid[top:top + h, left:left + w] = image
  return grid


def save_png(path: str, grid: np.ndarray) -> None:
  """Writes a uint8 [H,W,C] image as PNG atomically; local or gs://."""
  image = grid[..., 0] if grid.shape[-1] == 1 else grid
  paths.save_image(path, Image.fromarray(image), "PNG")


def make_fid(config, mesh):
  """The FID metric of `config.eval`, or None (with a notice) when it is off."""
  if "fid" not in config.eval.metrics:
    return None
  if not config.eval.inception_weights:
    logging.warning(
        "FID columns skipped: no Inception weights configured. Set "
        "--config.eval.inception_weights=/path/to/pt_inception-2015-12-05.pth "
        "(or the .npz converted from it; see the README).")
    return None
  from colddiff_jax.metrics import fid as fid_lib  # pylint: disable=g-import-not-at-top
  return fid_lib.FID(config.eval.inception_weights, mesh, config.eval.batch_size)


def evaluate_checkpoint(config, workdir: str) -> dict:
  """--mode=evaluate: the paper's Degraded / Direct / Sampled table.

  Restores the EMA weights of the latest checkpoint in `workdir`, restores
  every image of the test split (config.eval.num_images caps it) with the
  direct reconstruction and `config.sample.method` (on `config.sample.steps`
  steps when set), and writes FID / SSIM / RMSE to workdir/eval/metrics.json.

  Returns:
    The metrics dict written.
  """
  # Imported here: train imports this module.
  from colddiff_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from colddiff_jax import train  # pylint: disable=g-import-not-at-top
  if config.sample.generation:
    raise ValueError(
        "sample.generation=True: this is a generation experiment, which has no "
        "ground truth per sample; use --mode=generate (FID of generated images).")
  mesh, deg, model, state = train.restore_trained(config, workdir)
  fid = make_fid(config, mesh)
  split = input_pipeline.eval_split(config.data, config.eval.num_images,
                                    split=config.eval.split)
  restorer = make_restorer(train.make_apply_fn(model), deg, config.sample.method,
                           config.sample.steps)
  metrics = evaluate_restoration(
      restorer, state["ema"], deg, split["image"], config.eval.batch_size,
      jax.random.PRNGKey(config.seed + 2), mesh, partners=split.get("partner"),
      fid=fid)
  metrics |= {"step": int(state["step"]), "method": config.sample.method,
              "sample_steps": config.sample.steps or deg.num_steps}
  path = os.path.join(paths.resolve(workdir), "eval", "metrics.json")
  if jax.process_index() == 0:
    write_json(path, metrics)
  table = format_table(metrics)
  logging.info("Evaluation at step %d on %d images (%s, %d steps):\n%s",
               metrics["step"], metrics["num_images"], metrics["method"],
               metrics["sample_steps"], table)
  print(table, flush=True)
  return metrics
