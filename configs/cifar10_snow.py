"""Desnowification on CIFAR-10, conditional restoration (spec §7 row 15).

Official: snowification/train.py --dataset cifar10. T=200 steps of ImageNet-C
snow at level 3 with a fresh pattern per batch (random_snow) and no darkening
(fix_brightness), ConvNeXt U-Net, no augmentation at all.

  python -m colddiff_jax.main --config=configs/cifar10_snow.py
"""

from configs import default


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = default.get_config()
  config.workdir = "runs/cifar10_snow"
  default.set_dataset(config, "cifar10")
  config.data.train_transform = "center_crop_only"
  config.data.test_transform = "center_crop_only"
  config.degradation.update(dict(
      name="snow", time_steps=200, snow_level=3, random_snow=True,
      fix_brightness=True))
  config.train.ckpt_every = 5000  # The official snowification cadence.
  config.train.sample_every = 5000
  # The official test scores an unseeded random subset of 1000-2000 test
  # images (§5.2); we score the whole test split (num_images=None).
  config.eval.batch_size = 16  # The official snowification metric chunk.
  return default.apply_variant(config, arg)
