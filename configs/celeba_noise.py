"""Hot (Gaussian-noise) diffusion baseline, CelebA-HQ 128x128 (spec §7 row 19).

Official: denoising-diffusion-pytorch/celebA_noise_128.py. T=200 cosine
schedule (s = 0.008), x0-prediction with the L1 loss, ConvNeXt U-Net. 6400
samples from N(0, I) (batches of 128) are scored by FID.

  python -m colddiff_jax.main --config=configs/celeba_noise.py \
      --config.data.folder=/path/to/celeba_hq_128
"""

from configs import default


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = default.get_config()
  config.workdir = "runs/celeba_noise"
  default.set_dataset(config, "celeba_hq")
  config.degradation.update(dict(name="noise", time_steps=200))
  default.set_generation(config, batch_size=128)
  # The paper reports 'ddim' ("estimated noise", the better column) and
  # 'tacos' with the noise fixed to x_T ("fixed noise");
  # --config.sample.method=tacos gives the other one.
  config.sample.method = "ddim"
  return default.apply_variant(config, arg)
