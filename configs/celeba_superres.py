"""Super-resolution on CelebA-HQ 128x128 (spec §7 rows 13 and 14).

Official: resolution-diffusion-pytorch/celebA_128.py. T=4 halvings
128 -> 64 -> 32 -> 16 -> 8 (bicubic down, nearest up), ConvNeXt U-Net.

Row 13, conditional restoration:
  python -m colddiff_jax.main --config=configs/celeba_superres.py \
      --config.data.folder=/path/to/celeba_hq_128
Row 14, generation from a GMM prior over x_T (same trained model; the official
script's default is 10 components):
  python -m colddiff_jax.main --config=configs/celeba_superres.py \
      --config.data.folder=/path/to/celeba_hq_128 --mode=evaluate \
      --config.sample.generation=True --config.sample.gmm_components=10 \
      --config.eval.metrics="('fid',)"
"""

from configs import default


def get_config(arg=None):
  """Returns this experiment's config; `arg` names a variant (see default)."""
  config = default.get_config()
  config.workdir = "runs/celeba_superres"
  default.set_dataset(config, "celeba_hq")
  config.degradation.update(dict(
      name="resolution", time_steps=4,
      resolution_routine="Incremental_factor_2"))
  # The official test script hard-codes the augmenting dataset (§8.24); we
  # evaluate on centre-cropped test images (default test_transform).
  config.eval.batch_size = 200  # The official resolution metric chunk.
  return default.apply_variant(config, arg)
