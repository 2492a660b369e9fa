"""Command-line entry point.

  python -m colddiff_jax.main --config=configs/<experiment>.py [--workdir=DIR]
      [--mode=train|sample] [--config.train.num_steps=1000 ...]

`--config` takes an ml_collections config file, optionally with a variant
(`configs/mnist_blur.py:smoke`); `--config.a.b=v` overrides any existing key
(an unknown key is an error). `--workdir` defaults to `config.workdir`.

Multi-process runs (TPU pods, multi-node GPU) call `jax.distributed.initialize()`
first; it is triggered by COLDDIFF_MULTIHOST=1 or by the coordinator variables
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
"""

import os
import sys

# Config files import `configs.default`: make the repository root importable
# wherever the command is run from.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/<name>.py[:variant]).",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: config.workdir).")
flags.DEFINE_enum("mode", "train", ["train", "sample"],
                  "train: train (resuming if possible), then evaluate; "
                  "sample: write sample grids from the latest checkpoint.")
flags.mark_flags_as_required(["config"])


def _multihost() -> bool:
  return (os.environ.get("COLDDIFF_MULTIHOST") == "1"
          or "JAX_COORDINATOR_ADDRESS" in os.environ)


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO lines of orbax's checkpoint internals (dozens per save)."""

  def filter(self, record):
    return record.levelno > logging.INFO or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  for handler in logging.logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  if _multihost():
    jax.distributed.initialize()
  config = FLAGS.config
  workdir = FLAGS.workdir or config.workdir
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())
  # Imported late so `--help` and flag errors stay fast.
  from colddiff_jax import train  # pylint: disable=g-import-not-at-top
  if FLAGS.mode == "train":
    train.train_and_evaluate(config, workdir)
  else:
    train.sample_from_checkpoint(config, workdir)


if __name__ == "__main__":
  app.run(main)
