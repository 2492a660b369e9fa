"""Training: sharded step parity, EMA, loss, checkpoints/resume, CLI."""

import glob
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colddiff_jax import checkpointing
from colddiff_jax import degradations
from colddiff_jax import input_pipeline
from colddiff_jax import models
from colddiff_jax import parallel
from colddiff_jax import train
from conftest import REPO
from conftest import run_cli

sys.path.insert(0, str(REPO))
from configs import quickstart  # noqa: E402  pylint: disable=g-import-not-at-top


pytestmark = pytest.mark.usefixtures("fast_compiles")


def tiny_config(**train):
  config = quickstart.get_config("smoke")
  config.degradation.time_steps = 4
  config.optim.grad_accum = 2
  config.optim.learning_rate = 1e-3
  config.eval.num_images = 16
  config.train.update(dict(num_steps=4, ckpt_every=2, sample_every=2, log_every=1,
                           keep=5, ema_start=2, ema_every=1))
  config.train.update(train)
  return config


def _setup(config, mesh):
  deg = degradations.build(config.degradation, config.data.image_size, config.data.channels)
  model = models.build(config.model, config.data.channels, config.data.image_size,
                       rngs=nnx.Rngs(config.seed))
  tx = train.make_optimizer(config.optim)
  apply_fn = train.make_apply_fn(model)
  state = jax.device_put(train.create_state(config, model, tx), parallel.replicated(mesh))
  step = train.jit_train_step(train.make_train_step(config, deg, apply_fn, tx), mesh)
  return state, step


def _batch(config, mesh, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (config.optim.grad_accum, config.train.batch_size, 32, 32, 1))
  return {"image": parallel.global_batch(x.astype(np.float32), mesh, batch_axis=1)}


def test_step_on_8_devices_equals_step_on_1():
  assert jax.device_count() == 8
  config = tiny_config()
  results = []
  for devices in (jax.devices(), jax.devices()[:1]):
    mesh = parallel.make_mesh(None, devices)
    state, step = _setup(config, mesh)
    batch = _batch(config, mesh)
    assert batch["image"].sharding.num_devices == len(devices)
    for _ in range(2):
      state, metrics = step(state, batch)
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (s8, m8), (s1, m1) = results
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s8["params"]), jax.tree.leaves(s1["params"])):
    np.testing.assert_allclose(a, b, atol=1e-5)
  for a, b in zip(jax.tree.leaves(s8["ema"]), jax.tree.leaves(s1["ema"])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_loss_decreases():
  config = tiny_config()
  mesh = parallel.make_mesh(None)
  state, step = _setup(config, mesh)
  digits = input_pipeline.eval_images(config.data, 16).reshape(2, 8, 32, 32, 1)
  batch = {"image": parallel.global_batch(digits, mesh, batch_axis=1)}
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("name,expected", [
    ("l1", lambda x: np.mean(np.abs(x))),
    ("l2", lambda x: np.mean(x * x)),
    ("sqrt", lambda x: np.sqrt(np.mean(np.abs(x))))])
def test_train_step_uses_the_configured_loss(name, expected):
  """With a network that predicts 0 the loss is LOSSES[name](-x0), averaged
  over the micro-batches."""
  config = tiny_config()
  config.train.loss = name
  deg = degradations.build(config.degradation, config.data.image_size, config.data.channels)
  model = models.build(config.model, config.data.channels, config.data.image_size,
                       rngs=nnx.Rngs(0))
  tx = train.make_optimizer(config.optim)
  state = train.create_state(config, model, tx)
  zero_net = lambda params, x, t, dropout_rng=None: jnp.zeros_like(x)
  x0 = np.random.default_rng(0).uniform(-1, 1, (2, 4, 32, 32, 1)).astype(np.float32)
  _, metrics = jax.jit(train.make_train_step(config, deg, zero_net, tx))(
      state, {"image": x0})
  np.testing.assert_allclose(float(metrics["loss"]),
                             np.mean([expected(micro) for micro in x0]), rtol=1e-6)


def test_ema_semantics_are_official():
  ema = {"w": jnp.array([1.0, 2.0])}
  params = {"w": jnp.array([3.0, 5.0])}
  kw = dict(decay=0.995, every=10, start=2000)
  # Before start_step, every 10th step copies the weights.
  np.testing.assert_array_equal(train.ema_update(ema, params, 0, **kw)["w"], [3.0, 5.0])
  np.testing.assert_array_equal(train.ema_update(ema, params, 1990, **kw)["w"], [3.0, 5.0])
  # Off-cadence steps leave it alone.
  np.testing.assert_array_equal(train.ema_update(ema, params, 2005, **kw)["w"], [1.0, 2.0])
  # From start_step on, it decays.
  np.testing.assert_allclose(train.ema_update(ema, params, 2000, **kw)["w"],
                             [0.995 * 1 + 0.005 * 3, 0.995 * 2 + 0.005 * 5], rtol=1e-7)


def test_batch_must_divide_devices():
  config = tiny_config(batch_size=12)
  with pytest.raises(ValueError, match="train.batch_size=12"):
    train.train_and_evaluate(config, "/nonexistent/never/written")


def _final_params(workdir, config):
  mesh = parallel.make_mesh(None)
  model = models.build(config.model, 1, 32, rngs=nnx.Rngs(0))
  template = jax.device_put(
      train.create_state(config, model, train.make_optimizer(config.optim)),
      parallel.replicated(mesh))
  ckpt = checkpointing.Checkpointer(workdir, keep=5)
  state, data_state = ckpt.restore(template)
  ckpt.close()
  return jax.device_get(state), data_state


def test_checkpoint_writes_one_replica_on_cpu_and_restores_replicated(tmp_path):
  mesh = parallel.make_mesh(None)
  assert mesh.devices.size == 8
  state = {"w": jax.device_put(np.arange(6.0).reshape(2, 3), parallel.replicated(mesh)),
           "x": jax.device_put(np.arange(16.0), parallel.batch_sharding(mesh)),
           "key": jax.device_put(np.arange(2), jax.devices()[3])}
  light = checkpointing.one_replica(state)
  assert light["w"].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
  # Sharded and single-device arrays are written as they are.
  assert light["x"] is state["x"] and light["key"] is state["key"]
  expected = jax.device_get(state)
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1)
  ckpt.save(5, state, {"position": 7})
  # Like the train step, overwrite the donated state while the save runs on:
  # the checkpoint keeps the values it was given (JAX does not donate buffers
  # the save still reads; it writes the results elsewhere).
  overwrite = jax.jit(lambda tree: jax.tree.map(lambda v: v * 0 + 99, tree),
                      donate_argnums=0)
  given = {"w": state["w"], "x": state["x"]}
  state = dict(state, **jax.block_until_ready(overwrite(overwrite(given))))
  ckpt.wait()
  restored, data_state = ckpt.restore(state)
  ckpt.close()
  assert data_state == {"position": 7}
  for name in state:
    assert restored[name].sharding == state[name].sharding
    np.testing.assert_array_equal(restored[name], expected[name])


def test_train_writes_outputs_and_resumes_exactly(tmp_path):
  resumed_dir, straight_dir = str(tmp_path / "resumed"), str(tmp_path / "straight")
  first = train.train_and_evaluate(tiny_config(num_steps=4), resumed_dir)
  assert first["step"] == 4 and first["start_step"] == 0
  assert sorted(os.listdir(os.path.join(resumed_dir, "checkpoints"))) == ["2", "4"]
  assert glob.glob(os.path.join(resumed_dir, "events.out.tfevents.*"))
  assert sorted(os.listdir(os.path.join(resumed_dir, "samples"))) == [
      "step_00000002.png", "step_00000004.png"]
  with open(os.path.join(resumed_dir, "config.json")) as f:
    assert json.load(f)["train"]["num_steps"] == 4
  with open(os.path.join(resumed_dir, "eval", "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["num_images"] == 16 and set(metrics) >= {"degraded", "direct", "sampled"}

  second = train.train_and_evaluate(tiny_config(num_steps=6), resumed_dir)
  assert second["start_step"] == 4 and second["step"] == 6
  train.train_and_evaluate(tiny_config(num_steps=6), straight_dir)

  resumed, resumed_data = _final_params(resumed_dir, tiny_config())
  straight, straight_data = _final_params(straight_dir, tiny_config())
  assert int(resumed["step"]) == int(straight["step"]) == 6
  assert resumed_data == straight_data
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)


def test_preemption_saves_and_stops(tmp_path, monkeypatch):
  monkeypatch.setattr(checkpointing.Checkpointer, "reached_preemption",
                      lambda self, step: step == 1)
  result = train.train_and_evaluate(tiny_config(num_steps=4), str(tmp_path))
  assert result["stopped_early"] and result["step"] == 1
  assert os.listdir(tmp_path / "checkpoints") == ["1"]


def test_sigterm_sets_the_stop_flag():
  stop = checkpointing.StopSignal()
  try:
    os.kill(os.getpid(), 15)
    assert stop.requested
  finally:
    stop.restore()


_cli = run_cli


def test_cli_unknown_key_fails_with_its_name(tmp_path):
  out = _cli("--config=configs/quickstart.py:smoke", "--config.train.num_stepz=3",
             f"--workdir={tmp_path}")
  assert out.returncode != 0
  assert "num_stepz" in out.stderr


# The overrides that turn the smoke config into `tiny_config()`, so that the CLI
# runs reuse the programs the in-process tests compiled (persistent cache).
TINY_FLAGS = ("--config.degradation.time_steps=4", "--config.optim.grad_accum=2",
              "--config.optim.learning_rate=1e-3", "--config.eval.num_images=16",
              "--config.train.ema_start=2", "--config.train.ema_every=1",
              "--config.train.sample_every=2")


def test_cli_trains_with_overrides_then_samples(tmp_path):
  # 3 steps (the smoke config runs 4) with the programs compiled by the tests above.
  out = _cli("--config=configs/quickstart.py:smoke", "--config.train.num_steps=3",
             *TINY_FLAGS, f"--workdir={tmp_path}")
  assert out.returncode == 0, out.stderr[-3000:]
  # The CLI starts JAX's backend before importing the models: the package
  # import must still have given the convolutions to Eigen.
  assert "XLA:CPU convolutions: Eigen." in out.stderr
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["train"]["num_steps"] == 3
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
  out = _cli("--config=configs/quickstart.py:smoke", *TINY_FLAGS, "--mode=sample",
             f"--workdir={tmp_path}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "sample_00000003.png" in os.listdir(tmp_path / "samples")
  # The sampler programs the training run compiled come from the persistent
  # compilation cache (here the tests' own, JAX_COMPILATION_CACHE_DIR).
  found = re.search(r"XLA compilation cache \S+: (\d+) of \d+ programs loaded", out.stderr)
  assert found and int(found.group(1)) >= 1, out.stderr[-3000:]


def test_compilation_cache_folder_from_config_env_or_off(tmp_path, caplog):
  # pylint: disable=protected-access,g-import-not-at-top
  from colddiff_jax import main
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    assert main._use_compilation_cache("") is None
    (tmp_path / "file").write_text("")
    bad = str(tmp_path / "file" / "xla")
    assert main._use_compilation_cache(bad) is None
    assert "config.compilation_cache" in caplog.text and bad in caplog.text
    assert jax.config.jax_compilation_cache_dir is None
    folder = str(tmp_path / "cache" / "xla")
    assert main._use_compilation_cache(folder) == folder
    assert os.path.isdir(folder) and jax.config.jax_compilation_cache_dir == folder
    # A folder already set (JAX_COMPILATION_CACHE_DIR) wins over the config.
    assert main._use_compilation_cache(str(tmp_path / "other")) == folder
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)


def test_cosine_schedule_warms_up_then_decays_to_zero():
  config = tiny_config()
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 10
  lr = train.learning_rate(config.optim, num_steps=110)
  assert float(lr(0)) == 0.0
  assert float(lr(10)) == pytest.approx(1e-3)
  assert float(lr(60)) == pytest.approx(0.5e-3, rel=1e-5)
  assert float(lr(110)) == pytest.approx(0.0, abs=1e-12)
  config.optim.schedule = "constant"
  assert train.learning_rate(config.optim, 110) == 1e-3
  config.optim.schedule = "linear"
  with pytest.raises(ValueError, match="optim.schedule='linear'"):
    train.check_config(config)


def test_train_remat_is_checked_and_may_change_on_resume(tmp_path):
  config = tiny_config()
  with config.ignore_type():
    config.train.remat = 1
  with pytest.raises(ValueError, match=r"train\.remat=1 must be True or False"):
    train.check_config(config)
  # Rematerialisation changes how the step computes, not the experiment: a
  # run may resume with it switched (e.g. after running out of memory).
  config.train.remat = False
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  config.train.remat = True
  train.check_workdir(config, str(tmp_path))
  _, _, model = train._build(config)  # pylint: disable=protected-access
  assert model.remat is True
  config.model.dim *= 2
  with pytest.raises(ValueError, match="different experiment: model.dim"):
    train.check_workdir(config, str(tmp_path))
