"""Command-line entry point.

  python -m colddiff_jax.main --config=configs/<experiment>.py [--workdir=DIR]
      [--mode=train|sample|evaluate|generate|restore]
      [--config.train.num_steps=1000 ...]
  python -m colddiff_jax.main --config=... --mode=restore --input=DIR_OR_FILE
      --output=DIR [--restore_from_step=S]

`--config` takes an ml_collections config file, optionally with a variant
(`configs/mnist_blur.py:smoke`); `--config.a.b=v` overrides any existing key
(an unknown key is an error). `--workdir` defaults to `config.workdir`.

Multi-process runs (TPU pods, multi-node GPU, local CPU processes) call
`jax.distributed.initialize()` first. It is triggered by the flags
--coordinator_address / --num_processes / --process_id, by the coordinator
variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or by
COLDDIFF_MULTIHOST=1 (TPU pods, where JAX finds the peers itself).
"""

import collections
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

from colddiff_jax import xla_cpu  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/<name>.py[:variant]).",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: config.workdir).")
flags.DEFINE_enum(
    "mode", "train", ["train", "sample", "evaluate", "generate", "restore"],
    "train: train (resuming if possible), then evaluate; "
    "sample: grids, trajectory strips and a GIF from the latest checkpoint; "
    "evaluate: the Degraded/Direct/Sampled metric table over the test split; "
    "generate: unconditional samples from a prior over x_T; "
    "restore: restore the user's own degraded images (--input, --output).")
flags.DEFINE_string("input", None, "restore: an image file or a folder of images.")
flags.DEFINE_string("output", None, "restore: folder for the restored images.")
flags.DEFINE_integer("restore_from_step", None,
                     "restore: severity s of the inputs, i.e. the sampler starts "
                     "from the state after s steps (default: T).")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-process: host:port of process 0 (else "
                    "JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: index of this process.")
flags.mark_flags_as_required(["config"])


def _initialize_distributed() -> None:
  """Joins the multi-controller runtime when this is one of several processes."""
  explicit = FLAGS.coordinator_address is not None
  if not (explicit or os.environ.get("COLDDIFF_MULTIHOST") == "1"
          or "JAX_COORDINATOR_ADDRESS" in os.environ):
    return
  # CPU devices of different processes need a collective backend to talk
  # (local multi-process runs); the setting does not touch GPU/TPU backends.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  else:  # TPU pods and the JAX_* variables: JAX reads them itself.
    jax.distributed.initialize()


def _use_compilation_cache(path: str) -> str | None:
  """Points JAX's persistent compilation cache at `path` (config.compilation_cache).

  Runs before anything compiles: JAX decides once per process whether to use
  the cache. A cache folder already set (JAX_COMPILATION_CACHE_DIR) wins.

  Returns:
    The folder in use, or None: turned off ('') or not writable (a warning;
    the run then compiles as usual).
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if not path:
    return None
  from colddiff_jax import paths  # pylint: disable=g-import-not-at-top
  if not paths.is_remote(path):  # gs:// and the like JAX opens itself
    path = os.path.abspath(os.path.expanduser(path))
    try:
      os.makedirs(path, exist_ok=True)
      problem = None if os.access(path, os.W_OK) else "is not writable"
    except OSError as e:
      problem = f"cannot be created ({e})"
    if problem:
      logging.warning("config.compilation_cache=%r %s; compiling without a "
                      "cache. Point it at a writable folder, or set it to '' "
                      "to turn it off.", path, problem)
      return None
  jax.config.update("jax_compilation_cache_dir", path)
  return path


class _CacheCounter:
  """Counts JAX's compilation-cache events (jax.monitoring) for a summary."""

  def __init__(self):
    self.events = collections.Counter()
    self.saved_s = 0.0
    jax.monitoring.register_event_listener(self._event)
    jax.monitoring.register_event_duration_secs_listener(self._duration)

  def _event(self, event, **kwargs):
    del kwargs
    if event.startswith("/jax/compilation_cache/"):
      self.events[event.rsplit("/", 1)[-1]] += 1

  def _duration(self, event, duration_secs, **kwargs):
    del kwargs
    if event.endswith("/compile_time_saved_sec"):
      self.saved_s += duration_secs

  def summary(self, path: str) -> str:
    return (f"XLA compilation cache {path}: {self.events['cache_hits']} of "
            f"{self.events['compile_requests_use_cache']} programs loaded from "
            f"it ({max(self.saved_s, 0.0):.0f} s of compiling saved).")


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO lines of orbax's checkpoint internals (dozens per save)."""

  def filter(self, record):
    return (record.levelno > logging.logging.INFO
            or "/orbax/" not in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  for handler in logging.logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  if FLAGS.mode == "restore" and not (FLAGS.input and FLAGS.output):
    raise app.UsageError("--mode=restore needs --input=FILE_OR_DIR and --output=DIR.")
  config = FLAGS.config
  # Only as the running program (not when imported): it re-executes itself.
  if config.transparent_huge_pages and __name__ == "__main__":
    logging.info("config.transparent_huge_pages: %s.",
                 xla_cpu.restart_with_huge_pages())
  if config.reuse_freed_memory:  # before anything starts JAX's backend
    skipped = xla_cpu.reuse_freed_memory()
    logging.info("config.reuse_freed_memory: %s.",
                 f"not applied ({skipped})" if skipped else
                 "malloc keeps freed memory for reuse (one arena, no mmap)")
  _initialize_distributed()
  workdir = FLAGS.workdir or config.workdir
  cache = _use_compilation_cache(config.compilation_cache)
  counter = _CacheCounter() if cache else None
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())
  try:
    _run_mode(config, workdir)
  finally:
    if counter:
      logging.info(counter.summary(cache))


def _run_mode(config, workdir) -> None:
  """Runs --mode on the config and workdir."""
  # Imported late so `--help` and flag errors stay fast.
  # pylint: disable=g-import-not-at-top
  if FLAGS.mode == "train":
    from colddiff_jax import train
    result = train.train_and_evaluate(config, workdir)
    if result["stopped_early"]:  # SIGTERM / preemption, after saving
      sys.exit(train.PREEMPTED_EXIT_CODE)
  elif FLAGS.mode == "sample":
    from colddiff_jax import figures
    figures.sample_figures(config, workdir)
  elif FLAGS.mode == "evaluate":
    from colddiff_jax import evaluate
    evaluate.evaluate_checkpoint(config, workdir)
  elif FLAGS.mode == "generate":
    from colddiff_jax import generation
    generation.generate(config, workdir)
  else:
    from colddiff_jax import restore
    restore.restore_files(config, workdir, FLAGS.input, FLAGS.output,
                          FLAGS.restore_from_step)


if __name__ == "__main__":
  app.run(main)
