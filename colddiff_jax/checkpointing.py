"""Orbax checkpoints of a training run: save, resume, preemption.

A checkpoint holds two items: 'state' (parameters, optimizer state, EMA, step,
PRNG key) and 'data' (the position of the training data iterator, as JSON), so
a resumed run continues with exactly the batches it would have seen. Orbax
writes each step to a temporary folder and renames it when complete, so an
interrupted save never leaves a checkpoint that looks valid.

`restore_latest` walks back from the newest step: a checkpoint that cannot be
read (truncated file, missing item) is logged, moved to
`<workdir>/checkpoints_corrupt/` and the previous one is tried; a checkpoint
whose shapes do not fit the config is an error naming the first mismatch,
never a silent fresh start.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from colddiff_jax import paths


class CheckpointMismatchError(ValueError):
  """A checkpoint whose parameter tree does not fit the current config."""


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_shapes(tree) -> dict[str, tuple]:
  """{'params/downs/0/.../kernel/value': shape} of a state or its metadata."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in flat}


def first_mismatch(saved: dict, expected: dict) -> str | None:
  """Describes the first (sorted) name whose shape differs, or None."""
  for name in sorted(set(saved) | set(expected)):
    if saved.get(name) != expected.get(name):
      return (f"{name}: checkpoint {saved.get(name, 'missing')}, this config "
              f"{expected.get(name, 'missing')}")
  return None


def check_writable(workdir: str) -> None:
  """Fails early, naming the folder, when `workdir` cannot be written."""
  if paths.is_remote(workdir):
    return  # object stores have no cheap probe; orbax reports write errors
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    reason = {errno.ENOSPC: "the disk is full",
              errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied"}.get(e.errno, e.strerror)
    raise OSError(e.errno, f"cannot write to the workdir {workdir} ({reason}); "
                  f"free space, fix its permissions or pass another "
                  f"--workdir") from e


def one_replica(state):
  """`state` with each replicated array cut to its first copy, on one CPU host.

  Every device of a single-process CPU run is the same host memory, so the
  copies are identical bytes. Orbax would otherwise save replicated arrays
  "replica-parallel" (each device writes a slice), which on CPU only adds a
  slicing program per shape: 8.4 s for the first save of the smoke state over
  8 devices and 2.6 s for later ones, against 1.0 s for the first replica
  (taking it is a view, not a copy). Restoring uses the template's shardings,
  so the run gets its replicated arrays back. Accelerators and multi-host runs
  keep orbax's default.
  """
  if jax.process_count() > 1:
    return state

  def first(x):
    if (isinstance(x, jax.Array) and x.is_fully_replicated
        and len(x.sharding.device_set) > 1
        and all(d.platform == "cpu" for d in x.sharding.device_set)):
      return x.addressable_shards[0].data
    return x

  return jax.tree.map(first, state)


class Checkpointer:
  """Thin wrapper around `ocp.CheckpointManager` for one run's workdir."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(paths.resolve(workdir), "checkpoints")
    # Explicit handlers (not just item names): a fresh manager can then read
    # the saved items' metadata, which restore checks before loading.
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    """Saves asynchronously; call `wait` before exiting the process."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(one_replica(state)),
        data=ocp.args.JsonSave(data_state)), force=True)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def check_compatible(self, step: int, state_template) -> None:
    """Raises CheckpointMismatchError naming the first differing leaf."""
    saved = self.manager.item_metadata(step)["state"]
    if saved is None:
      raise FileNotFoundError(f"checkpoint {step} has no 'state' item")
    mismatch = first_mismatch(leaf_shapes(getattr(saved, "tree", saved)),
                              leaf_shapes(state_template))
    if mismatch:
      raise CheckpointMismatchError(
          f"the checkpoint at step {step} in {self.directory} does not fit this "
          f"config; first mismatch: {mismatch}. Use the config it was trained "
          f"with (see config.json beside it), or a new --workdir.")

  def restore(self, state_template, step: int | None = None):
    """Restores (state, data_state) with the template's shapes and shardings.

    Raises CheckpointMismatchError if the shapes differ from the template's.
    """
    step = self.latest_step() if step is None else step
    self.check_compatible(step, state_template)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"] or {}

  def restore_latest(self, state_template):
    """Restores the newest readable checkpoint, moving unreadable ones aside.

    Returns:
      (state, data_state, step), or None when no checkpoint could be read
      (after logging a warning for each one that failed).

    Raises:
      CheckpointMismatchError: a readable checkpoint of a different config.
    """
    for step in reversed(self.all_steps()):
      try:
        state, data_state = self.restore(state_template, step)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # Anything else is a damaged checkpoint (truncated array file, missing
        # item, unreadable metadata): set it aside and try the previous one.
        moved = self._set_aside(step)
        logging.warning("Checkpoint %d in %s is unreadable (%s: %s); moved it "
                        "to %s and trying the previous one.", step,
                        self.directory, type(e).__name__, str(e)[:300], moved)
        continue
      return state, data_state, step
    return None

  def _set_aside(self, step: int) -> str:
    """Moves a damaged step folder out of the manager's view."""
    target = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt",
                          f"{step}.{int(time.time())}")
    if jax.process_index() == 0:
      paths.makedirs(os.path.dirname(target))
      epath.Path(self.directory, str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"colddiff_set_aside_{step}")
    self.manager.reload()
    return target

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class StopSignal:
  """Turns SIGTERM (and SIGINT) into a flag the training loop polls.

  The loop saves a checkpoint and exits cleanly when `requested` is set, instead
  of dying mid-step. Handlers are only installed from the main thread.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self.requested = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
