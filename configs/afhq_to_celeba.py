"""Animorphosis AFHQ -> CelebA-HQ, 128x128 (spec §7 row 6).

Official: demixing-diffusion-pytorch/AFHQ_128_to_celebA_128.py. T=200;
x_t = sqrt(abar) * celeb + sqrt(1 - abar) * afhq with the cosine abar of the
noise baseline, CelebA (x0) and AFHQ (x_T) paired at random, both augmented.
Generation starts from 6400 augmented AFHQ training images (batches of 32).

  python -m colddiff_jax.main --config=configs/afhq_to_celeba.py \
      --config.data.folder=/path/to/celeba_hq_128 \
      --config.data.partner_folder=/path/to/afhq/train
"""

from configs import default


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = default.get_config()
  config.workdir = "runs/afhq_to_celeba"
  # data.folder is CelebA, the clean end (official --data_path_end);
  # data.partner_folder is AFHQ, where sampling starts (--data_path_start),
  # used whole as the official did.
  default.set_dataset(config, "celeba_hq")
  config.degradation.update(dict(name="mix", time_steps=200))
  default.set_generation(config, batch_size=32)
  return default.apply_variant(config, arg)
