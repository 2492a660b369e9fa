"""Multi-host training proven on one machine: 2 processes x 4 CPU devices.

The two processes form one 8-device mesh through `jax.distributed` (gloo CPU
collectives), each feeding its half of every global batch. Their run must be
the same computation as one process driving 8 devices.
"""

import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from colddiff_jax import checkpointing
from colddiff_jax import train
from conftest import REPO
from conftest import cli_env
from train_test import TINY_FLAGS
from train_test import _final_params
from train_test import tiny_config

pytestmark = [pytest.mark.usefixtures("fast_compiles"), pytest.mark.slow]

NUM_STEPS = 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch_two_processes(workdir: str, *flags: str, timeout: int = 900):
  """Runs the CLI as processes 0 and 1 of a 2-process job; returns their logs."""
  port = _free_port()
  env = cli_env(devices=4)
  procs = [subprocess.Popen(
      [sys.executable, "-m", "colddiff_jax.main", "--config=configs/quickstart.py:smoke",
       *TINY_FLAGS, "--config.train.keep=5",
       "--config.train.log_every=1", f"--config.train.num_steps={NUM_STEPS}",
       *flags, f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
       "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
  return logs


def _losses(log: str) -> dict[int, str]:
  """{step: loss as logged} from a process's metric lines."""
  return {int(m.group(1)): m.group(2)
          for m in re.finditer(r"\] \[(\d+)\] .*?loss=([-0-9.e+naif]+)", log)}


def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  logs = _launch_two_processes(multi)

  # Both processes ran every step and saw the same (global) losses.
  losses = [_losses(log) for log in logs]
  assert sorted(losses[0]) == list(range(1, NUM_STEPS + 1)), logs[0][-3000:]
  assert losses[0] == losses[1]
  # Only process 0 wrote the shared files; both took part in every save.
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["2", "4"]
  assert sorted(os.listdir(os.path.join(multi, "samples"))) == [
      "step_00000002.png", "step_00000004.png"]
  assert os.path.exists(os.path.join(multi, "eval", "metrics.json"))

  # The checkpoint restores in a single process (8 devices here) ...
  config = tiny_config(num_steps=NUM_STEPS)
  multi_state, multi_data = _final_params(multi, config)
  assert int(multi_state["step"]) == NUM_STEPS
  # ... and equals one process driving the same 8 devices.
  assert jax.device_count() == 8
  result = train.train_and_evaluate(config, single)
  single_state, single_data = _final_params(single, config)
  assert multi_data == single_data
  for name in ("params", "ema", "opt_state"):
    a, b = jax.tree.leaves(multi_state[name]), jax.tree.leaves(single_state[name])
    assert len(a) == len(b)
    for x, y in zip(a, b):
      np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
  assert float(losses[0][NUM_STEPS]) == pytest.approx(result["loss"], abs=1e-5)
  assert checkpointing.Checkpointer(single, keep=5).all_steps() == [2, 4]
