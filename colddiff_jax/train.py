"""Training: x0-prediction with a jitted, data-parallel train step.

  train_and_evaluate(config, workdir)

builds the degradation, the U-Net and the optimizer, resumes from the latest
checkpoint in `workdir` if there is one, runs the training loop (logging,
sample grids, checkpoints, clean exit on SIGTERM / preemption) and ends with a
restoration evaluation of the EMA weights.

The step follows the official recipe (spec §1.3): for each of `grad_accum`
micro-batches draw t ~ U{0..T-1} per image, degrade on device to D(x0, t+1)
(8-bit quantised when discrete), predict x0 with R(·, t), take the L1 (or L2)
loss; average the gradients, take one Adam step; every `ema_every` steps copy
the weights into the EMA before `ema_start`, decay it after.
"""

from __future__ import annotations

import os
import time

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from colddiff_jax import checkpointing
from colddiff_jax import degradations
from colddiff_jax import evaluate
from colddiff_jax import input_pipeline
from colddiff_jax import models
from colddiff_jax import parallel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Official loss_type values: mean |e|, mean e², sqrt(mean |e|) (snow package).
LOSSES = {
    "l1": lambda err: jnp.mean(jnp.abs(err)),
    "l2": lambda err: jnp.mean(err * err),
    "sqrt": lambda err: jnp.sqrt(jnp.mean(jnp.abs(err))),
}


# ------------------------------------------------------------------ setup ----

def check_config(config) -> None:
  """Validates the training keys before anything is built or compiled."""
  if config.train.loss not in LOSSES:
    raise ValueError(f"train.loss={config.train.loss!r} must be one of "
                     f"{', '.join(LOSSES)}.")
  if config.train.dtype not in DTYPES:
    raise ValueError(f"train.dtype={config.train.dtype!r} must be one of "
                     f"{', '.join(DTYPES)}.")
  for key in ("batch_size", "num_steps", "ckpt_every", "log_every", "sample_every",
              "keep", "ema_every"):
    value = config.train[key]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"train.{key}={value!r} must be an integer >= 1.")
  if not isinstance(config.optim.grad_accum, int) or config.optim.grad_accum < 1:
    raise ValueError(f"optim.grad_accum={config.optim.grad_accum!r} must be an "
                     f"integer >= 1.")
  if not 0.0 <= config.train.ema_decay <= 1.0:
    raise ValueError(f"train.ema_decay={config.train.ema_decay} must be in [0, 1].")
  if config.train.train_routine != "Final":
    raise ValueError(f"train.train_routine={config.train.train_routine!r}: only "
                     f"'Final' (x0 prediction, every official README run) is "
                     f"supported.")


def make_optimizer(optim_config) -> optax.GradientTransformation:
  """Adam with PyTorch's defaults (official: lr 2e-5, no schedule, no clipping)."""
  adam = optax.adam(optim_config.learning_rate, b1=optim_config.b1,
                    b2=optim_config.b2, eps=optim_config.eps)
  if optim_config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), adam)
  return adam


def ema_update(ema, params, step, *, decay: float, every: int, start: int):
  """Official EMA after the optimizer step numbered `step` (0-based).

  Every `every` steps: before `start` the EMA is reset to the weights, from
  `start` on it becomes decay·ema + (1-decay)·weights; otherwise unchanged.
  """
  due = step % every == 0
  warm = step < start

  def one(e, p):
    mixed = decay * e + (1.0 - decay) * p
    return jnp.where(due, jnp.where(warm, p, mixed), e)

  return jax.tree.map(one, ema, params)


def create_state(config, model, tx):
  """The train state: step, params, optimizer state, EMA and PRNG key."""
  _, params, _ = nnx.split(model, nnx.Param, ...)
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": tx.init(params),
      "ema": jax.tree.map(jnp.copy, params),
      "rng": jax.random.PRNGKey(config.seed),
  }


def make_apply_fn(model):
  """(params, x, t, dropout_rng=None) -> x0 estimate, for a split NNX model."""
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def apply_fn(params, x, t, dropout_rng=None):
    return nnx.merge(graphdef, params, rest)(x, t, dropout_rng=dropout_rng)

  return apply_fn


# ------------------------------------------------------------- train step ----

def make_train_step(config, deg, apply_fn, tx):
  """The pure train step (state, batch) -> (state, metrics); jit it outside."""
  use_dropout = config.model.name == "ddpm" and config.model.dropout > 0
  loss = LOSSES[config.train.loss]
  ema_kwargs = dict(decay=config.train.ema_decay, every=config.train.ema_every,
                    start=config.train.ema_start)
  T = deg.num_steps

  def loss_fn(params, micro, key):
    x0 = micro["image"]
    k_t, k_aux, k_drop = jax.random.split(key, 3)
    batch = x0.shape[0]
    t = jax.random.randint(k_t, (batch,), 0, T)
    if "partner" in micro:  # animorphosis: the end image comes with the data
      aux = deg.make_aux(micro["partner"])
    else:
      aux = deg.sample_aux(k_aux, batch)
    x_t = deg.train_input(x0, t + 1, aux)
    pred = apply_fn(params, x_t, t, dropout_rng=k_drop if use_dropout else None)
    return loss(pred.astype(jnp.float32) - x0)

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(state, batch):
    params = state["params"]
    accum = jax.tree.leaves(batch)[0].shape[0]
    keys = jax.random.split(jax.random.fold_in(state["rng"], state["step"]), accum)
    # The micro-batch loop is unrolled (accum is small and static): inside a
    # lax.scan, XLA:CPU runs the U-Net's backward pass ~8x slower.
    grads, loss = None, 0.0
    for i in range(accum):
      micro = jax.tree.map(lambda v, i=i: v[i], batch)
      l, g = grad_fn(params, micro, keys[i])
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
      loss = loss + l
    grads = jax.tree.map(lambda g: g / accum, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {
        "step": state["step"] + 1,
        "params": new_params,
        "opt_state": opt_state,
        "ema": ema_update(state["ema"], new_params, state["step"], **ema_kwargs),
        "rng": state["rng"],
    }
    metrics = {"loss": loss / accum, "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  return train_step


def jit_train_step(train_step, mesh):
  """jit with explicit shardings: state replicated and donated, batch split."""
  repl = parallel.replicated(mesh)
  return jax.jit(train_step,
                 in_shardings=(repl, parallel.batch_sharding(mesh, batch_axis=1)),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def to_micro_batches(batch: dict, accum: int) -> dict:
  """[A·b, ...] host batch -> [A, b, ...] (micro-batch axis first)."""
  return {k: v.reshape((accum, v.shape[0] // accum) + v.shape[1:]) for k, v in batch.items()}


# ------------------------------------------------------------------- loop ----

def _build(config):
  """Everything the loop needs, validated in order of cheapness."""
  check_config(config)
  mesh = parallel.make_mesh(config.mesh)
  parallel.check_global_batch(config.train.batch_size, mesh)
  parallel.check_global_batch(config.eval.batch_size, mesh, key="eval.batch_size")
  deg = degradations.build(config.degradation, config.data.image_size, config.data.channels)
  model = models.build(config.model, config.data.channels, config.data.image_size,
                       rngs=nnx.Rngs(config.seed), dtype=DTYPES[config.train.dtype])
  return mesh, deg, model


def _write_grid(path, restorer, params, deg, images, rng):
  x0 = jnp.asarray(images)
  aux = deg.sample_aux(rng, len(images))
  x_T, direct, sampled = restorer(params, x0, aux)
  grid = evaluate.image_grid([np.asarray(x_T), np.asarray(direct),
                              np.asarray(sampled), images])
  evaluate.save_png(path, grid)
  return grid


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming if possible) and evaluates; returns the final metrics.

  Returns:
    {'step': last step, 'start_step': step it resumed from (0 if fresh),
     'loss': last logged loss, 'eval': metrics or None, 'stopped_early': True
     if SIGTERM/preemption ended the run}.
  """
  mesh, deg, model = _build(config)
  is_main = jax.process_index() == 0
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  apply_fn = make_apply_fn(model)
  tx = make_optimizer(config.optim)
  repl = parallel.replicated(mesh)
  state = jax.device_put(create_state(config, model, tx), repl)

  accum = config.optim.grad_accum
  local_batch = parallel.process_batch_size(config.train.batch_size)
  train_ds = input_pipeline.train_dataset(
      config.data, local_batch * accum, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = iter(train_ds)

  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep)
  start_step = 0
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(state)
    train_iter.set_state(data_state)
    start_step = int(state["step"])
    logging.info("Resumed from checkpoint at step %d.", start_step)

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  if start_step == 0:
    parameter_overview.log_parameter_overview(state["params"].to_pure_dict())
    writer.write_scalars(0, {"num_params": models.count_params(model)})
  num_steps = config.train.num_steps
  progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                             every_steps=config.train.log_every)

  step_fn = jit_train_step(make_train_step(config, deg, apply_fn, tx), mesh)
  restorer = evaluate.make_restorer(apply_fn, deg, config.sample.method)
  eval_images = input_pipeline.eval_images(config.data, config.eval.num_images)
  grid_images = eval_images[:min(8, len(eval_images))]
  grid_rng = jax.random.PRNGKey(config.seed + 1)

  stop = checkpointing.StopSignal()
  last_loss, stopped = None, False
  step = start_step
  tic, tic_step = time.time(), step
  try:
    while step < num_steps:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = to_micro_batches(next(train_iter), accum)
        batch = {k: parallel.global_batch(v, mesh, batch_axis=1) for k, v in batch.items()}
        state, metrics = step_fn(state, batch)
      step += 1
      progress(step)
      if step % config.train.log_every == 0 or step == num_steps:
        metrics = jax.device_get(metrics)
        last_loss = float(metrics["loss"])
        if not np.isfinite(last_loss):
          raise FloatingPointError(f"loss is {last_loss} at step {step}; stopping "
                                   f"(the last checkpoint is kept).")
        elapsed = max(time.time() - tic, 1e-9)
        rate = (step - tic_step) / elapsed
        writer.write_scalars(step, {
            "loss": last_loss, "grad_norm": float(metrics["grad_norm"]),
            "steps_per_sec": rate,
            "img_per_sec": rate * config.train.batch_size * accum})
        tic, tic_step = time.time(), step
      if step % config.train.sample_every == 0 or step == num_steps:
        grid = _write_grid(os.path.join(workdir, "samples", f"step_{step:08d}.png"),
                           restorer, state["ema"], deg, grid_images, grid_rng)
        writer.write_images(step, {"samples": grid[None]})
      preempted = ckpt.reached_preemption(step)
      if (step % config.train.ckpt_every == 0 or step == num_steps or preempted
          or stop.requested):
        ckpt.save(step, state, train_iter.get_state())
      if preempted or stop.requested:
        logging.warning("Stopping at step %d (%s); checkpoint saved.", step,
                        "preemption" if preempted else "SIGTERM")
        stopped = True
        break
  finally:
    ckpt.close()
    stop.restore()
    writer.flush()

  result = {"step": step, "start_step": start_step, "loss": last_loss, "eval": None,
            "stopped_early": stopped}
  if not stopped:
    metrics = evaluate.evaluate_restoration(
        restorer, state["ema"], deg, eval_images, config.eval.batch_size,
        jax.random.PRNGKey(config.seed + 2), mesh)
    result["eval"] = metrics
    if is_main:
      evaluate.write_json(os.path.join(workdir, "eval", "metrics.json"), metrics)
    logging.info("Evaluation of the EMA weights at step %d on %d images:\n%s", step,
                 metrics["num_images"], evaluate.format_table(metrics))
  writer.flush()
  return result


def restore_trained(config: ml_collections.ConfigDict, workdir: str):
  """The model of a trained run, for inference (sample/evaluate/generate/restore).

  Returns:
    (mesh, deg, model, state): `state` is the train state of the latest
    checkpoint in `workdir`, replicated over `mesh`; `state['ema']` holds the
    EMA weights (what every inference mode uses) and `model` is the network
    whose `make_apply_fn(model)` applies them.

  Raises:
    FileNotFoundError: naming the checkpoint folder when it holds no
      checkpoint.
  """
  mesh, deg, model = _build(config)
  ckpt = checkpointing.Checkpointer(os.path.abspath(workdir), keep=config.train.keep)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(
          f"no checkpoint in {ckpt.directory}; train first (--mode=train), "
          f"import an official one (python -m colddiff_jax.convert) or pass "
          f"the --workdir of a trained run.")
    template = jax.device_put(create_state(config, model, make_optimizer(config.optim)),
                              parallel.replicated(mesh))
    state, _ = ckpt.restore(template)
  finally:
    ckpt.close()
  return mesh, deg, model, state


def sample_from_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes a sample grid from the EMA weights of the latest checkpoint.

  Returns:
    The path of the PNG written (workdir/samples/sample_<step>.png).
  """
  _, deg, model, state = restore_trained(config, workdir)
  workdir = os.path.abspath(workdir)
  restorer = evaluate.make_restorer(make_apply_fn(model), deg, config.sample.method)
  images = input_pipeline.eval_images(config.data, config.sample.batch_size)
  step = int(state["step"])
  path = os.path.join(workdir, "samples", f"sample_{step:08d}.png")
  _write_grid(path, restorer, state["ema"], deg, images, jax.random.PRNGKey(config.seed + 3))
  logging.info("Wrote %s (rows: degraded, direct, %s, original).", path,
               config.sample.method)
  return path
