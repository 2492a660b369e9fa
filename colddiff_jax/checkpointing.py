"""Orbax checkpoints of a training run: save, resume, preemption.

A checkpoint holds two items: 'state' (parameters, optimizer state, EMA, step,
PRNG key) and 'data' (the position of the training data iterator, as JSON), so
a resumed run continues with exactly the batches it would have seen. Orbax
writes each step to a temporary folder and renames it when complete, so an
interrupted save never leaves a checkpoint that looks valid.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper around `ocp.CheckpointManager` for one run's workdir."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    """Saves asynchronously; call `wait` before exiting the process."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, state_template, step: int | None = None):
    """Restores (state, data_state) with the template's shapes and shardings."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise ValueError(
          f"the checkpoint at step {step} in {self.directory} does not fit this "
          f"config (different model or optimizer settings?): {e}. Use the "
          f"config it was trained with, or a new --workdir.") from e
    return restored["state"], restored["data"]

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
