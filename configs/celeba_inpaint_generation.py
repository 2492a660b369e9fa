"""Inpainting-based generation on CelebA-HQ 128x128 (spec §7 row 10).

Official: defading-generation-diffusion-pytorch/celebA_128.py. T=750; the image
is blended toward a random flat colour (per channel U[-0.5, 0.5)) through
reversed Gaussian masks with sigma_i = 0.05 (i + 1), so generation reveals the
face from the centre outwards. 6400 samples from random colours (batches of 32)
are scored by FID.

  python -m colddiff_jax.main --config=configs/celeba_inpaint_generation.py \
      --config.data.folder=/path/to/celeba_hq_128
"""

from configs import default


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = default.get_config()
  config.workdir = "runs/celeba_inpaint_generation"
  default.set_dataset(config, "celeba_hq")
  # initial_mask: training uses 1; the README test command omits it and would
  # build the model's process with the default 11 (spec §8.16). We keep 1.
  config.degradation.update(dict(
      name="mask_generation", time_steps=750, reverse=True, kernel_std=0.05,
      initial_mask=1))
  default.set_generation(config, batch_size=32)
  return default.apply_variant(config, arg)
