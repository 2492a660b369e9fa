"""Restoring the user's own degraded images (--mode=restore).

  restore_files(config, workdir, input_path, output_dir, restore_from_step)

reads every image under `input_path` (one file, or a folder searched
recursively for jpg/jpeg/png/bmp/webp), fits it to the model (shorter side
resized to data.image_size with PIL bilinear, then a centre crop; images
already of that size are used as they are; converted to data.channels, so
grayscale and RGB inputs both work), and restores it with the EMA weights of
the latest checkpoint in `workdir`: the direct reconstruction R(x_s, s-1) and
the sampler `sample.method` (Algorithm 2 by default), both started from the
state after s = `restore_from_step` steps (default T: a fully degraded input).

For each input `<name>.<ext>` it writes `<name>_restored.png` into
`output_dir`, under the same relative subfolder: three panels side by side,
the input as fed to the model, the direct and the sampled reconstruction.
Files that cannot be read are reported in one warning each and skipped.

The samplers re-degrade their estimates with the family's D(·, s), so they
need what the degradation drew for the image (`aux`), which a user's photo
does not come with. Per family:

  blur, resolution, decolor, mask (fixed holes), snow (fixed pattern)
      deterministic given the config: nothing to guess.
  mask, Random_Incremental
      the hole is assumed to be centred (the window of the fixed routines).
  mask_generation
      the flat colour c is estimated from the input as the (1-alpha)-weighted
      mean of its pixels, alpha being the image weight at the input's severity.
  noise, mix
      the hidden image (noise / partner) is estimated from the input and the
      direct reconstruction, z = (x_s - sqrt(abar)·x0_hat) / sqrt(1 - abar),
      and then held fixed ('ddim' re-estimates it at every step anyway).
  snow with random_snow
      no pattern can be assumed: only sample.method='direct' is accepted.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from colddiff_jax import degradations
from colddiff_jax import evaluate
from colddiff_jax import generation
from colddiff_jax import input_pipeline
from colddiff_jax import parallel
from colddiff_jax import sampling
from colddiff_jax import train
from colddiff_jax.degradations import mask
from colddiff_jax.degradations import noise

#: File name endings searched for in an input folder (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SUFFIX = "_restored.png"


# ------------------------------------------------------------------ files ----

def find_images(input_path: str, exclude: str | None = None) -> list[tuple[str, str]]:
  """(path, path relative to the input folder) of every image to restore.

  A file is taken as is, whatever its extension; a folder is searched
  recursively (sorted, so the order is reproducible) for IMAGE_EXTENSIONS,
  skipping anything under `exclude` (the output folder, when it lies inside
  the input folder).

  Raises:
    FileNotFoundError: naming --input when the path does not exist.
  """
  if os.path.isfile(input_path):
    return [(input_path, os.path.basename(input_path))]
  if not os.path.isdir(input_path):
    raise FileNotFoundError(f"--input={input_path!r}: no such file or folder.")
  exclude = os.path.abspath(exclude) if exclude else None
  found = []
  for root, dirs, files in os.walk(input_path):
    dirs.sort()
    if exclude and os.path.abspath(root) == exclude:
      dirs[:] = []
      continue
    for name in sorted(files):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        path = os.path.join(root, name)
        found.append((path, os.path.relpath(path, input_path)))
  return found


def output_names(relative_paths: list[str]) -> list[str]:
  """`<dir>/<stem>_restored.png` per input, unique even when stems collide.

  Inputs differing only by extension (photo.jpg, photo.png) would both map to
  photo_restored.png; those keep their extension in the name instead
  (photo_jpg_restored.png, photo_png_restored.png), and any name still taken
  gets a counter, so no output overwrites another.
  """
  plain = [os.path.splitext(rel)[0] for rel in relative_paths]
  counts = {}
  for p in plain:
    counts[p] = counts.get(p, 0) + 1
  names, taken = [], set()
  for rel, p in zip(relative_paths, plain):
    if counts[p] > 1:
      stem, ext = os.path.splitext(rel)
      p = f"{stem}_{ext.lstrip('.').lower()}"
    name, k = p + SUFFIX, 1
    while name in taken:  # e.g. a.JPG and a.jpg, or an input named a_jpg.png
      k += 1
      name = f"{p}_{k}{SUFFIX}"
    taken.add(name)
    names.append(name)
  return names


def read_image(path: str, size: int, channels: int) -> np.ndarray:
  """An image file fitted to the model: float32 [size, size, channels] in [-1, 1].

  The shorter side is resized to `size` and the longer one centre-cropped
  (`input_pipeline.fit_image(..., 'resize')`): the whole image height or width
  is kept, without distortion; an image of the model's size is used as is.

  Raises:
    ValueError: naming the file when it is not a readable image.
  """
  image = input_pipeline.load_image_file(path, channels)
  return input_pipeline.to_float(input_pipeline.fit_image(image, size, "resize"))


# -------------------------------------------------------------------- aux ----

def check_restore_from_step(restore_from_step, num_steps: int) -> int:
  """The severity s to start from (T when None); ValueError naming the flag."""
  if restore_from_step is None:
    return num_steps
  if (isinstance(restore_from_step, bool)
      or not isinstance(restore_from_step, (int, np.integer))
      or not 1 <= restore_from_step <= num_steps):
    raise ValueError(
        f"--restore_from_step={restore_from_step!r} must be an integer in "
        f"1..{num_steps} (degradation.time_steps): the number of degradation "
        f"steps the inputs have undergone, T={num_steps} for fully degraded "
        f"inputs.")
  return int(restore_from_step)


def estimate_colour(deg, x_s: jax.Array, s: int) -> jax.Array:
  """mask_generation: the flat colour [B, C] behind states x_s [B, N, N, C].

  x_s = alpha·x0 + (1 - alpha)·c with alpha = alpha_{s-1}; the weighted mean
  of x_s with weights 1 - alpha is c exactly wherever alpha = 0 (all of x_T
  with reverse masks) and leans on the most faded pixels otherwise.
  """
  weight = 1.0 - deg.table[s][None, :, :, None]
  total = jnp.maximum(jnp.sum(weight), 1e-12)
  return jnp.sum(weight * x_s, axis=(1, 2)) / total


def make_aux_fn(deg, method: str):
  """(x_s, direct x0_hat, s) -> aux for restoring user images (module doc).

  Raises:
    ValueError: naming sample.method when the family's aux cannot be assumed
      and the method needs it.
  """
  if method == "direct" or not deg.random:
    return lambda x_s, x0_hat, s: None
  if isinstance(deg, noise.CosineInterpolation):
    def estimate(x_s, x0_hat, s):
      steps = jnp.full((x_s.shape[0],), s, jnp.int32)
      return deg.estimate_aux(x_s, x0_hat, steps)
    return estimate
  if isinstance(deg, mask.MaskGeneration):
    return lambda x_s, x0_hat, s: {"colour": estimate_colour(deg, x_s, s)}
  if isinstance(deg, mask.GaussianMask):
    centre = deg.image_size // 2  # the fixed routines' hole position
    return lambda x_s, x0_hat, s: {
        "offset": jnp.full((x_s.shape[0], 2), centre, jnp.int32)}
  raise ValueError(
      f"sample.method={method!r} re-degrades its estimates with the "
      f"{deg.config.name!r} pattern that produced the input, which cannot be "
      f"inferred from a user image for this config (e.g. random_snow); use "
      f"--config.sample.method=direct.")


# ---------------------------------------------------------------- restore ----

def make_restore_fn(apply_fn, deg, config, num_steps: int):
  """(params, x_s) -> (direct, sampled), both started after `num_steps` steps."""
  method = config.sample.method
  aux_fn = make_aux_fn(deg, method)
  direct = sampling.make_param_sampler(apply_fn, deg, "direct", num_steps=num_steps)
  sampler = generation.make_sampler(apply_fn, deg, config, num_steps=num_steps)
  aux_of = jax.jit(lambda x, x0_hat: aux_fn(x, x0_hat, num_steps))

  def run(params, x_s):
    x0_hat = direct(params, x_s, None)
    if method == "direct":
      return x0_hat, x0_hat
    return x0_hat, sampler(params, x_s, aux_of(x_s, x0_hat))

  return run


def restore_files(config: ml_collections.ConfigDict, workdir: str, input_path: str,
                  output_dir: str, restore_from_step: int | None = None) -> dict:
  """Restores every image under `input_path` into `output_dir` (module doc).

  Returns:
    {'written': [output paths], 'skipped': [(input path, reason)],
     'restore_from_step': s, 'method': sample.method, 'step': checkpoint step}.

  Raises:
    ValueError / FileNotFoundError, naming the flag or key, before the model is
    loaded: --restore_from_step out of 1..T, --input missing or holding no
    image, a method that needs an aux this family cannot assume; ValueError
    when no input file could be read.
  """
  # Everything checkable is checked before the checkpoint is loaded.
  sampling.check_method(config.sample.method)
  probe = degradations.build(config.degradation, config.data.image_size,
                             config.data.channels)
  s = check_restore_from_step(restore_from_step, probe.num_steps)
  make_aux_fn(probe, config.sample.method)
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise ValueError(f"--output={output_dir!r} is a file; give a folder.")
  files = find_images(input_path, exclude=output_dir)
  if not files:
    raise ValueError(
        f"--input={input_path!r} holds no image file (searched recursively for "
        f"{', '.join(IMAGE_EXTENSIONS)}).")

  size, channels = config.data.image_size, config.data.channels
  images, kept, skipped = [], [], []
  for path, rel in files:
    try:
      images.append(read_image(path, size, channels))
      kept.append(rel)
    except Exception as e:  # pylint: disable=broad-except
      # load_image_file raises ValueError for what PIL reports as unreadable;
      # some decoders fail on corrupt data with other errors (EOFError,
      # struct.error, ...). Either way only this file is skipped.
      reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
      logging.warning("Skipping %s: %s", path, reason)
      skipped.append((path, reason))
  if not images:
    raise ValueError(f"none of the {len(files)} files under --input={input_path!r} "
                     f"could be read as an image.")

  mesh, deg, model, state = train.restore_trained(config, workdir)
  batch = config.sample.batch_size
  parallel.check_global_batch(batch, mesh, key="sample.batch_size")
  run = make_restore_fn(train.make_apply_fn(model), deg, config, s)
  inputs = np.stack(images)
  direct_out, sampled_out = [], []
  for start in range(0, len(inputs), batch):
    chunk = inputs[start:start + batch]
    x_s = parallel.shard_rows(chunk, mesh, batch)
    direct, sampled = run(state["ema"], x_s)
    direct_out.append(parallel.gather(direct)[:len(chunk)])
    sampled_out.append(parallel.gather(sampled)[:len(chunk)])
  direct_out, sampled_out = np.concatenate(direct_out), np.concatenate(sampled_out)

  written = []
  for k, name in enumerate(output_names(kept)):
    path = os.path.join(output_dir, name)
    if jax.process_index() == 0:
      row = np.stack([inputs[k], direct_out[k], sampled_out[k]])
      evaluate.save_png(path, evaluate.image_grid([row]))
    written.append(path)
  logging.info("Restored %d images from step %d/%d (direct and %s) into %s%s.",
               len(written), s, deg.num_steps, config.sample.method, output_dir,
               f"; skipped {len(skipped)} unreadable" if skipped else "")
  return {"written": written, "skipped": skipped, "restore_from_step": s,
          "method": config.sample.method, "step": int(state["step"])}
