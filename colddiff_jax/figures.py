"""Figures of the reverse process (--mode=sample).

  sample_figures(config, workdir)

degrades the first test images to x_T, runs `sample.method` from there with the
EMA weights of the latest checkpoint, keeps the whole trajectory, and writes
into workdir/samples/ (<step> = the checkpoint's step, 8 digits):

  sample_<step>.png          the paper's grid; rows: degraded x_T, direct
                             R(x_T, T-1), sampled x_0, original.
  trajectory_<step>.png      one row per image; columns: the states x_s at
                             evenly spaced steps s from T down to 1, then the
                             sampler's output x_0.
  trajectory_x0hat_<step>.png  the same for the network's estimates
                             x̂0 = R(x_s, s-1), then x_0.
  reverse_<step>.gif         the reverse process, one frame per sampler step
                             (top row x_s, bottom row x̂0; the last frame
                             shows x_0), at most MAX_GIF_FRAMES frames.

With `sample.steps` = k < T the sampler and the figures follow its k strided
steps.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image

from colddiff_jax import evaluate
from colddiff_jax import generation
from colddiff_jax import input_pipeline
from colddiff_jax import parallel
from colddiff_jax import paths
from colddiff_jax import train

#: Images shown in every figure (the first test images).
FIGURE_IMAGES = 8
#: State columns of the trajectory strips (plus the final x_0).
STRIP_COLUMNS = 8
#: Frames of the GIF at most; longer trajectories are subsampled evenly.
MAX_GIF_FRAMES = 100
#: Milliseconds per GIF frame, and for the last frame (the result).
FRAME_MS = 100
LAST_FRAME_MS = 1500


def evenly_spaced(count: int, num: int) -> np.ndarray:
  """`min(num, count)` distinct indices in 0..count-1, evenly spaced, both
  ends included."""
  num = max(1, min(num, count))
  return np.unique(np.floor(np.linspace(0, count - 1, num) + 0.5).astype(int))


def trajectory_strip(sequence: np.ndarray, final: np.ndarray,
                     columns: np.ndarray) -> np.ndarray:
  """uint8 grid: row i = sequence[columns, i] followed by final[i].

  Args:
    sequence: [S, B, H, W, C] in [-1, 1] (states or estimates per step).
    final: [B, H, W, C], the sampler's output.
    columns: indices into the S steps.
  """
  rows = np.concatenate([np.asarray(sequence)[columns], np.asarray(final)[None]], axis=0)
  return evaluate.image_grid(list(np.swapaxes(rows, 0, 1)))


def gif_frames(x_in: np.ndarray, x0_hat: np.ndarray, final: np.ndarray,
               max_frames: int = MAX_GIF_FRAMES) -> list[np.ndarray]:
  """uint8 frames of the reverse process: rows (x_s, x̂0) per step, then (x_0, last x̂0).

  The S steps plus the result are S + 1 frames, subsampled evenly (first and
  last kept) to at most `max_frames`.
  """
  num_steps = len(x_in)
  frames = []
  for j in evenly_spaced(num_steps + 1, max_frames):
    if j < num_steps:
      frames.append(evaluate.image_grid([x_in[j], x0_hat[j]]))
    else:
      frames.append(evaluate.image_grid([final, x0_hat[-1]]))
  return frames


def save_gif(path: str, frames: list[np.ndarray], frame_ms: int = FRAME_MS,
             last_frame_ms: int = LAST_FRAME_MS) -> None:
  """Writes an endlessly looping GIF atomically (temporary file, then rename)."""
  images = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
  durations = [frame_ms] * (len(images) - 1) + [last_frame_ms]
  paths.save_image(path, images[0], "GIF", save_all=True, append_images=images[1:],
                   duration=durations, loop=0)


def _aux_for(deg, split: dict, seed: int, n: int):
  """The aux of the figure images: the partner images for 'mix', else drawn."""
  if "partner" in split:
    return deg.make_aux(split["partner"])
  if deg.config.name == "mix":
    raise ValueError(
        "degradation.name='mix' starts from partner images: set "
        "data.partner_folder to the start-domain image folder (AFHQ).")
  aux = deg.sample_aux(jax.random.PRNGKey(seed + 3), n)
  return None if aux is None else jax.tree.map(np.asarray, aux)


def sample_figures(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes the grid, the trajectory strips and the GIF (module doc).

  Returns:
    {'grid', 'trajectory', 'trajectory_x0hat', 'gif'}: the paths written.
  """
  mesh, deg, model, state = train.restore_trained(config, workdir)
  workdir = paths.resolve(workdir)
  n = min(FIGURE_IMAGES, config.sample.batch_size)
  split = input_pipeline.eval_split(config.data, n, split=config.eval.split)
  images = split["image"][:n]
  n = len(images)
  aux = _aux_for(deg, split, config.seed, n)
  # Pad to a multiple of the devices so that the batch shards evenly.
  devices = mesh.devices.size
  padded = -(-n // devices) * devices
  x0 = parallel.shard_rows(images, mesh, padded)
  aux = jax.tree.map(lambda v: parallel.shard_rows(v, mesh, padded), aux)
  x_T = jax.jit(deg.initial_state)(x0, aux)
  sampler = generation.make_sampler(train.make_apply_fn(model), deg, config,
                                    return_trajectory=True)
  final, traj = sampler(state["ema"], x_T, aux)
  x_T = parallel.gather(x_T)[:n]
  final = parallel.gather(final)[:n]
  x_in = parallel.gather(traj["x_in"])[:, :n]
  x0_hat = parallel.gather(traj["x0_hat"])[:, :n]

  step = int(state["step"])
  folder = os.path.join(workdir, "samples")
  written = {
      "grid": os.path.join(folder, f"sample_{step:08d}.png"),
      "trajectory": os.path.join(folder, f"trajectory_{step:08d}.png"),
      "trajectory_x0hat": os.path.join(folder, f"trajectory_x0hat_{step:08d}.png"),
      "gif": os.path.join(folder, f"reverse_{step:08d}.gif"),
  }
  if jax.process_index() == 0:
    evaluate.save_png(written["grid"],
                      evaluate.image_grid([x_T, x0_hat[0], final, images]))
    columns = evenly_spaced(len(x_in), STRIP_COLUMNS)
    evaluate.save_png(written["trajectory"], trajectory_strip(x_in, final, columns))
    evaluate.save_png(written["trajectory_x0hat"],
                      trajectory_strip(x0_hat, final, columns))
    save_gif(written["gif"], gif_frames(x_in, x0_hat, final))
  logging.info("Wrote %s (rows: degraded, direct, %s, original), trajectory "
               "strips and %s (%d sampler steps).", written["grid"],
               config.sample.method, written["gif"], len(x_in))
  return written
