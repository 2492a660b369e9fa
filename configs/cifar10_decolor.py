"""Decolorization on CIFAR-10, conditional restoration (spec §7 row 17).

Official: decolor-diffusion/train.py --forward_process_type Decolorization
--decolor_routine Linear --decolor_total_remove. T=20 with
x_s = (1 - s/20) x + (s/20) mean_c(x), ConvNeXt U-Net, no augmentation.

  python -m colddiff_jax.main --config=configs/cifar10_decolor.py
"""

from configs import default


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = default.get_config()
  config.workdir = "runs/cifar10_decolor"
  default.set_dataset(config, "cifar10")
  config.data.train_transform = "center_crop_only"
  config.data.test_transform = "center_crop_only"
  config.degradation.update(dict(
      name="decolor", time_steps=20, decolor_routine="Linear",
      decolor_total_remove=True))
  config.train.ckpt_every = 5000  # The official snowification cadence.
  config.train.sample_every = 5000
  config.eval.batch_size = 16  # The official snowification metric chunk.
  return default.apply_variant(config, arg)
