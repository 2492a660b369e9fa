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

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from colddiff_jax import parallel
from colddiff_jax import sampling
from colddiff_jax.metrics import ssim as ssim_lib

KINDS = ("degraded", "direct", "sampled")


def make_restorer(apply_fn, deg, method: str):
  """jitted (params, x0, aux) -> (x_T, direct, sampled), all [-1, 1] scale."""
  direct = sampling.make_param_sampler(apply_fn, deg, "direct")
  sampler = sampling.make_param_sampler(apply_fn, deg, method)

  @jax.jit
  def start(x0, aux):
    return deg.initial_state(x0, aux)

  def run(params, x0, aux):
    x_T = start(x0, aux)
    return x_T, direct(params, x_T, aux), sampler(params, x_T, aux)

  return run


def evaluate_restoration(restorer, params, deg, images: np.ndarray, batch_size: int,
                         rng: jax.Array, mesh) -> dict:
  """RMSE and SSIM of degraded / direct / sampled against every image."""
  sums = {k: 0.0 for k in KINDS}
  ssims = {k: [] for k in KINDS}
  n = len(images)
  sharding = parallel.batch_sharding(mesh)
  for i, start in enumerate(range(0, n, batch_size)):
    chunk = images[start:start + batch_size]
    valid = len(chunk)
    if valid < batch_size:  # pad, then drop the padding from the metrics
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, 0)])
    x0 = jax.device_put(jnp.asarray(chunk), sharding)
    aux = deg.sample_aux(jax.random.fold_in(rng, i), batch_size)
    outputs = dict(zip(KINDS, restorer(params, x0, aux)))
    clean = (x0[:valid] + 1.0) / 2.0
    for kind, out in outputs.items():
      out = (out[:valid] + 1.0) / 2.0
      sums[kind] += float(ssim_lib.squared_error_sum(clean, out))
      ssims[kind].append(np.asarray(ssim_lib.ssim(clean, out)))
  elements = images[:, :, :, :1].size * 3  # metrics see 3-channel images
  return {kind: {"rmse": float(np.sqrt(sums[kind] / elements)),
                 "ssim": float(np.concatenate(ssims[kind]).mean())}
          for kind in KINDS} | {"num_images": n}


def format_table(metrics: dict) -> str:
  """The metrics as a small text table (one row per kind)."""
  lines = [f"{'':10s} {'RMSE':>8s} {'SSIM':>8s}"]
  for kind in KINDS:
    lines.append(f"{kind.capitalize():10s} {metrics[kind]['rmse']:8.4f} "
                 f"{metrics[kind]['ssim']:8.4f}")
  return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
  """Writes JSON atomically (temporary file, then rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


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
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = grid[..., 0] if grid.shape[-1] == 1 else grid
  tmp = path + ".tmp.png"
  Image.fromarray(image).save(tmp)
  os.replace(tmp, path)
