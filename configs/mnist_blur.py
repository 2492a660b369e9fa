"""Deblurring MNIST, conditional restoration (spec §7 row 1).

Official: deblurring-diffusion-pytorch/mnist_train.py. 32x32 (resized from 28),
T=20 steps of a fixed 11x11 Gaussian (sigma 7, circular padding), ConvNeXt
U-Net, test images centre-cropped (mnist_test.py).

  python -m colddiff_jax.main --config=configs/mnist_blur.py
"""

from configs import default


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = default.get_config()
  config.workdir = "runs/mnist_blur"
  # Official Dataset_Aug1 flips MNIST digits too; kept for parity.
  default.set_dataset(config, "mnist")
  config.degradation.update(dict(
      name="blur", time_steps=20, blur_routine="Constant", blur_size=11,
      blur_std=7.0))
  return default.apply_variant(config, arg)
