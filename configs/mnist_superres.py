"""Super-resolution on MNIST, conditional restoration (spec §7 row 11).

Official: resolution-diffusion-pytorch/mnist_train.py. 32x32, T=3 halvings
32 -> 16 -> 8 -> 4 (bicubic down, nearest up), ConvNeXt U-Net, no augmentation.

  python -m colddiff_jax.main --config=configs/mnist_superres.py
"""

from configs import default


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = default.get_config()
  config.workdir = "runs/mnist_superres"
  default.set_dataset(config, "mnist")
  config.data.train_transform = "center"  # RS `Dataset`: 35 -> centre 32.
  config.degradation.update(dict(
      name="resolution", time_steps=3,
      resolution_routine="Incremental_factor_2"))
  config.eval.batch_size = 200  # The official resolution metric chunk.
  return default.apply_variant(config, arg)
