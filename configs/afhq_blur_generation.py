"""Blur-based generation on AFHQ 128x128 (spec §7 row 5).

Official: deblurring-diffusion-pytorch/AFHQ_128.py --discrete; everything as
celeba_blur_generation (row 4) but trained on all of AFHQ v1 afhq/train.

  python -m colddiff_jax.main --config=configs/afhq_blur_generation.py \
      --config.data.folder=/path/to/afhq/train
"""

from configs import celeba_blur_generation
from configs import default


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = celeba_blur_generation.get_config()
  config.workdir = "runs/afhq_blur_generation"
  default.set_dataset(config, "afhq")
  return default.apply_variant(config, arg)
