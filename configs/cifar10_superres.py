"""Super-resolution on CIFAR-10, conditional restoration (spec §7 row 12).

Official: resolution-diffusion-pytorch/cifar10_train.py. As mnist_superres
(row 11) but RGB with Aug1 augmentation, on the DDPM ResNet U-Net with dropout
0.1. The official test script rebuilds the model with dropout 0.01 and leaves
it on (§6); we evaluate the trained model without dropout.

  python -m colddiff_jax.main --config=configs/cifar10_superres.py
"""

from configs import default
from configs import mnist_superres


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = mnist_superres.get_config()
  config.workdir = "runs/cifar10_superres"
  default.set_dataset(config, "cifar10")
  config.data.train_transform = "aug1"
  config.model.name = "ddpm"
  return default.apply_variant(config, arg)
