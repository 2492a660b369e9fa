"""Blur-based generation on CelebA-HQ 128x128 (spec §7 row 4).

Official: deblurring-diffusion-pytorch/celebA_128.py --discrete, sampled with
celebA_128_test.py. T=300 steps of a 27x27 Gaussian with sigma_i = exp(0.01 i)
(circular padding); D(x, T) is the per-channel mean and training inputs are
8-bit quantised. Samples start from a 1-component GMM over the channel means of
the training images, plus noise of std 0.002 ("broken symmetry"); 6400 samples
in batches of 64 are scored by FID.

  python -m colddiff_jax.main --config=configs/celeba_blur_generation.py \
      --config.data.folder=/path/to/celeba_hq_128
"""

from configs import default


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = default.get_config()
  config.workdir = "runs/celeba_blur_generation"
  default.set_dataset(config, "celeba_hq")
  config.degradation.update(dict(
      name="blur", time_steps=300, blur_routine="Exponential", blur_size=27,
      blur_std=0.01, discrete=True))
  # The paper reports both noise 0.0 ("perfect symmetry") and 0.002 ("broken
  # symmetry"); 0.002 is the better one. --config.sample.noise_level=0.0 gives
  # the other column.
  default.set_generation(config, batch_size=64, noise_level=0.002)
  config.sample.gmm_components = 1  # README --gmm_cluster 1 (script: 10).
  return default.apply_variant(config, arg)
