"""Desnowification on CelebA 128x128, conditional restoration (spec §7 row 16).

Official: snowification/train.py --dataset celebA. As cifar10_snow (row 15) at
snow level 4, 128x128 centre crops (no resize), batch 16.

  python -m colddiff_jax.main --config=configs/celeba_snow.py \
      --config.data.folder=/path/to/celeba_hq_128
"""

from configs import cifar10_snow
from configs import default


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = cifar10_snow.get_config()
  config.workdir = "runs/celeba_snow"
  # The snowification code reads a "celebA" image folder with CenterCrop(128)
  # and no resize; we point it at the CelebA-HQ-128 folder (crop = identity),
  # the 128x128 CelebA of every other package.
  default.set_dataset(config, "celeba_hq")
  config.degradation.snow_level = 4
  config.train.batch_size = 16
  return default.apply_variant(config, arg)
