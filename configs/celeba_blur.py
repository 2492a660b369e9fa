"""Deblurring CelebA-HQ 128x128, conditional restoration (spec §7 row 3).

Official: deblurring-diffusion-pytorch/celebA_128.py. T=200 steps of a 15x15
Gaussian with sigma_i = exp(0.01 i) and reflect padding, ConvNeXt U-Net.
The CelebA-HQ-128 folder is split 90/10 into train/test.

  python -m colddiff_jax.main --config=configs/celeba_blur.py \
      --config.data.folder=/path/to/celeba_hq_128
"""

from configs import default


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = default.get_config()
  config.workdir = "runs/celeba_blur"
  default.set_dataset(config, "celeba_hq")
  config.degradation.update(dict(
      name="blur", time_steps=200, blur_routine="Exponential_reflect",
      blur_size=15, blur_std=0.01))
  return default.apply_variant(config, arg)
