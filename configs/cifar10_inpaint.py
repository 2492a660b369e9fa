"""Gaussian-mask inpainting on CIFAR-10, conditional (spec §7 row 8).

Official: defading-diffusion-pytorch/cifar10_train.py. As mnist_inpaint (row 7)
but RGB, trained with pad-4 random crops and flips, on the DDPM ResNet U-Net
(dropout 0.1). The official code keeps dropout on at test time (§8.25); we
evaluate without it.

  python -m colddiff_jax.main --config=configs/cifar10_inpaint.py
"""

from configs import default
from configs import mnist_inpaint


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = mnist_inpaint.get_config()
  config.workdir = "runs/cifar10_inpaint"
  default.set_dataset(config, "cifar10")
  config.data.train_transform = "cifar_pad_crop"
  config.model.name = "ddpm"
  return default.apply_variant(config, arg)
