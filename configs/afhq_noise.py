"""Hot (Gaussian-noise) diffusion baseline on AFHQ 128x128 (spec §7 row 20).

Official: denoising-diffusion-pytorch/AFHQ_noise_128.py; everything as
celeba_noise (row 19) but trained on all of AFHQ v1 afhq/train.

  python -m colddiff_jax.main --config=configs/afhq_noise.py \
      --config.data.folder=/path/to/afhq/train
"""

from configs import celeba_noise
from configs import default


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = celeba_noise.get_config()
  config.workdir = "runs/afhq_noise"
  default.set_dataset(config, "afhq")
  return default.apply_variant(config, arg)
