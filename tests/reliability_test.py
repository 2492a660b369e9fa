"""Fault injection: kill -9, damaged checkpoints, NaN, SIGTERM, bad input.

Each test injects one fault and checks what survives: finished steps are never
lost, a resumed run is bit-identical to an uninterrupted one, and bad input is
refused with a message naming the key or file and the fix, before compiling.
"""

import errno
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from colddiff_jax import checkpointing
from colddiff_jax import evaluate
from colddiff_jax import input_pipeline
from colddiff_jax import train
from conftest import REPO
from conftest import cli_env
from conftest import run_cli
from train_test import TINY_FLAGS
from train_test import _final_params
from train_test import tiny_config

pytestmark = pytest.mark.usefixtures("fast_compiles")

SMOKE = "--config=configs/quickstart.py:smoke"


def _assert_states_equal(a, b):
  for name in ("params", "ema", "opt_state", "step", "rng"):
    leaves_a, leaves_b = jax.tree.leaves(a[name]), jax.tree.leaves(b[name])
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 6-step run (checkpoint every step) to compare against."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = tiny_config(num_steps=6, ckpt_every=1, keep=10)
  train.train_and_evaluate(config, workdir)
  return workdir, config


# ------------------------------------------------------------ kill -9 -----

def _cli_command(workdir, num_steps=6):
  return [sys.executable, "-m", "colddiff_jax.main", SMOKE, *TINY_FLAGS,
          "--config.train.keep=10",
          "--config.train.log_every=1", "--config.train.ckpt_every=1",
          f"--config.train.num_steps={num_steps}", f"--workdir={workdir}"]


def _run_until(workdir, trigger: str, sig=signal.SIGKILL, delay=0.0, timeout=600):
  """Starts training and sends `sig` `delay` seconds after the first log line
  containing `trigger`.

  Returns (return code, log).
  """
  proc = subprocess.Popen(_cli_command(workdir), cwd=REPO, env=cli_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  lines, deadline = [], time.time() + timeout
  try:
    for line in proc.stdout:
      lines.append(line)
      if trigger in line:
        time.sleep(delay)
        proc.send_signal(sig)
        break
      assert time.time() < deadline, "".join(lines[-50:])
    rest, _ = proc.communicate(timeout=timeout)
    lines.append(rest)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return proc.returncode, "".join(lines)


@pytest.mark.slow
def test_kill_9_at_any_point_loses_nothing(reference, tmp_path):
  _, config = reference
  workdir = str(tmp_path / "killed")
  # Killed while step 2's checkpoint may still be in flight (save 1 is done:
  # a save waits for the previous one), then right after resuming, then while
  # step 5's checkpoint is being written (saves are asynchronous).
  for trigger, delay in (("Saving checkpoint at step 3", 0.0),
                         ("Resumed from checkpoint", 0.0),
                         ("Saving checkpoint at step 5", 0.3)):
    code, log = _run_until(workdir, trigger, delay=delay)
    assert code == -signal.SIGKILL, log[-3000:]
  saved = checkpointing.Checkpointer(workdir, keep=10).all_steps()
  assert saved and max(saved) < 6
  done = subprocess.run(_cli_command(workdir), cwd=REPO, env=cli_env(), text=True,
                        capture_output=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"Resumed from checkpoint at step {max(saved)}" in done.stderr
  # The reference: the same command, never interrupted (same process setup,
  # so the same compiled programs).
  straight = str(tmp_path / "straight")
  done = subprocess.run(_cli_command(straight), cwd=REPO, env=cli_env(), text=True,
                        capture_output=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  ours, _ = _final_params(workdir, config)
  theirs, _ = _final_params(straight, config)
  _assert_states_equal(ours, theirs)


# ------------------------------------------------- damaged checkpoints -----

def _copy_run(reference, tmp_path, upto: int):
  """A copy of the reference run's workdir with checkpoints 1..upto."""
  ref_dir, _ = reference
  workdir = str(tmp_path / "copy")
  os.makedirs(os.path.join(workdir, "checkpoints"))
  shutil.copy(os.path.join(ref_dir, "config.json"), workdir)
  for step in range(1, upto + 1):
    shutil.copytree(os.path.join(ref_dir, "checkpoints", str(step)),
                    os.path.join(workdir, "checkpoints", str(step)))
  return workdir


def _truncate_files(folder):
  """Cuts every non-empty file of a checkpoint item to half its size."""
  for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 1:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.slow  # shares the slow `reference` run
@pytest.mark.parametrize("damage", ["truncated", "missing_item"])
def test_damaged_latest_checkpoint_falls_back_to_previous(reference, tmp_path, damage,
                                                          caplog):
  ref_dir, config = reference
  workdir = _copy_run(reference, tmp_path, upto=5)
  latest = os.path.join(workdir, "checkpoints", "5")
  if damage == "truncated":
    _truncate_files(os.path.join(latest, "state"))
  else:
    shutil.rmtree(os.path.join(latest, "state"))
  # An unfinished save of a later step must be ignored as well.
  os.makedirs(os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp", "state"))
  with caplog.at_level(logging.WARNING):
    result = train.train_and_evaluate(config, workdir)
  assert result["start_step"] == 4 and result["step"] == 6
  assert any("Checkpoint 5" in r.getMessage() and "unreadable" in r.getMessage()
             for r in caplog.records)
  assert [os.path.basename(p).split(".")[0] for p in
          glob.glob(os.path.join(workdir, "checkpoints_corrupt", "*"))] == ["5"]
  ours, _ = _final_params(workdir, config)
  theirs, _ = _final_params(ref_dir, config)
  _assert_states_equal(ours, theirs)


@pytest.mark.slow  # shares the slow `reference` run
def test_no_readable_checkpoint_stops_unless_restart_allowed(reference, tmp_path):
  _, config = reference
  workdir = _copy_run(reference, tmp_path, upto=1)
  _truncate_files(os.path.join(workdir, "checkpoints", "1", "state"))
  with pytest.raises(RuntimeError, match="allow_restart_from_scratch=true"):
    train.train_and_evaluate(config, workdir)
  config = tiny_config(num_steps=1, ckpt_every=1, keep=10)
  config.train.allow_restart_from_scratch = True
  result = train.train_and_evaluate(config, workdir)
  assert result["start_step"] == 0 and result["step"] == 1


@pytest.mark.slow  # shares the slow `reference` run
def test_checkpoint_of_another_model_names_the_first_mismatch(reference, tmp_path):
  workdir = _copy_run(reference, tmp_path, upto=2)
  config = tiny_config()
  config.model.dim = 16
  # The workdir's config.json catches it first, before anything is built...
  with pytest.raises(ValueError, match=r"different experiment: model.dim was 8 there, now 16"):
    train.train_and_evaluate(config, workdir)
  # ... and without it the checkpoint's shapes do.
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"first mismatch: ema/.*: checkpoint \(\d.*\), this config"):
    train.train_and_evaluate(config, workdir)
  assert checkpointing.Checkpointer(workdir, keep=10).all_steps() == [1, 2]


# ------------------------------------------------------------------ NaN -----

def test_nan_loss_stops_at_its_step_and_writes_nothing_after(tmp_path, monkeypatch):
  real = input_pipeline.train_dataset
  batches = []

  class Poisoned:
    """The real iterator, except that batch 3 is all NaN."""

    def __init__(self, it):
      self.it = it

    def __next__(self):
      batch = next(self.it)
      batches.append(1)
      if len(batches) == 3:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      return batch

    def get_state(self):
      return self.it.get_state()

    def set_state(self, state):
      self.it.set_state(state)

  class Dataset:
    def __init__(self, ds):
      self.ds = ds

    def __iter__(self):
      return Poisoned(iter(self.ds))

  monkeypatch.setattr(input_pipeline, "train_dataset",
                      lambda *a, **k: Dataset(real(*a, **k)))
  config = tiny_config(num_steps=6, ckpt_every=2, sample_every=1, log_every=5)
  with pytest.raises(FloatingPointError, match="loss is nan at step 3.*latest checkpoint is step 2"):
    train.train_and_evaluate(config, str(tmp_path))
  assert checkpointing.Checkpointer(str(tmp_path), keep=5).all_steps() == [2]
  assert sorted(os.listdir(tmp_path / "samples")) == ["step_00000001.png",
                                                      "step_00000002.png"]
  state, _ = _final_params(str(tmp_path), config)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


# ------------------------------------------------------------- SIGTERM -----

@pytest.mark.slow
def test_sigterm_saves_exits_75_and_resumes_there(tmp_path):
  workdir = str(tmp_path)
  code, log = _run_until(workdir, "] [2] ", sig=signal.SIGTERM)
  assert code == train.PREEMPTED_EXIT_CODE == 75, log[-3000:]
  saved = checkpointing.Checkpointer(workdir, keep=10).all_steps()
  stopped_at = max(saved)
  assert stopped_at >= 2 and "Stopping at step" in log
  done = subprocess.run(_cli_command(workdir, num_steps=stopped_at + 1), cwd=REPO,
                        env=cli_env(), text=True, capture_output=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"Resumed from checkpoint at step {stopped_at}" in done.stderr


# ----------------------------------------------------------- bad input -----

@pytest.mark.parametrize("flag,message", [
    ("--config.train.num_stepz=3", "num_stepz"),
    ("--config.train.num_steps=abc", "num_steps"),
    ("--config.degradation.name=blurr", "degradation.name='blurr'"),
    ("--config.degradation.blur_routine=Gauss", "degradation.blur_routine='Gauss'"),
    ("--config.degradation.time_steps=0", "degradation.time_steps=0"),
    ("--config.train.batch_size=12", "train.batch_size=12 must be divisible by the 8 devices"),
    ("--config.data.image_size=33", "data.image_size=33"),
    ("--config.data.name=folder", "data.folder is not set"),
    ("--config.train.loss=l3", "train.loss='l3'"),
])
def test_bad_config_fails_fast_naming_the_key(tmp_path, flag, message):
  workdir = tmp_path / "run"
  out = run_cli(SMOKE, flag, f"--workdir={workdir}", timeout=300)
  assert out.returncode != 0
  assert message in out.stderr, out.stderr[-3000:]
  assert not workdir.exists() or not os.listdir(workdir)  # nothing half-written


def test_bad_config_is_refused_before_tensorflow_is_imported():
  """TensorFlow (clu's TensorBoard writer) takes seconds to import; a bad
  config must be refused without waiting for it."""
  code = ("import sys\n"
          "from colddiff_jax import train\n"
          "from configs import quickstart\n"
          "config = quickstart.get_config('smoke')\n"
          "config.train.loss = 'l3'\n"
          "try:\n"
          "  train.train_and_evaluate(config, '/nonexistent/never/written')\n"
          "except ValueError:\n"
          "  print('refused', 'tensorflow' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.stdout.split() == ["refused", "False"], out.stderr[-3000:]


def test_missing_and_empty_folders_name_the_path(tmp_path):
  config = tiny_config()
  config.data.name = "folder"
  config.data.folder = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=r"data.folder='.*nope' is not a directory"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  (tmp_path / "empty").mkdir()
  config.data.folder = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="holds no .jpg/.jpeg/.png file"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize("code,reason", [(errno.ENOSPC, "the disk is full"),
                                         (errno.EROFS, "read-only"),
                                         (errno.EACCES, "permission denied")])
def test_unwritable_workdir_fails_before_training(tmp_path, monkeypatch, code, reason):
  def refuse(*args, **kwargs):
    raise OSError(code, os.strerror(code))

  # Root ignores permissions, so the failing write is simulated.
  monkeypatch.setattr(checkpointing, "open", refuse, raising=False)
  with pytest.raises(OSError, match=f"cannot write to the workdir .*{reason}"):
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert not os.listdir(tmp_path)


# --------------------------------------------------------- determinism -----

@pytest.mark.slow  # shares the slow `reference` run
def test_same_seed_same_samples_and_metrics_other_seed_differs(reference, tmp_path):
  ref_dir, config = reference
  first = evaluate.evaluate_checkpoint(config, ref_dir)
  again = evaluate.evaluate_checkpoint(config, ref_dir)
  assert first == again
  with open(os.path.join(ref_dir, "eval", "metrics.json")) as f:
    assert json.load(f) == json.loads(json.dumps(first))
  runs = {}
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    config = tiny_config(num_steps=1, ckpt_every=1, sample_every=1)
    config.seed = seed
    runs[name] = train.train_and_evaluate(config, str(tmp_path / name))["eval"]
  grid = lambda name: (tmp_path / name / "samples" / "step_00000001.png").read_bytes()
  assert runs["a"] == runs["b"] and grid("a") == grid("b")
  assert runs["a"]["sampled"] != runs["c"]["sampled"] and grid("a") != grid("c")
