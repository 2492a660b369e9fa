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

import json
import os
import signal
import time

from absl import logging
from clu import parameter_overview
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
from colddiff_jax import paths
from colddiff_jax import xla_cpu
from colddiff_jax.models import layers

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
  if not isinstance(config.train.remat, bool):
    raise ValueError(f"train.remat={config.train.remat!r} must be True or False.")
  for key in ("batch_size", "num_steps", "ckpt_every", "log_every", "sample_every",
              "keep", "ema_every"):
    value = config.train[key]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"train.{key}={value!r} must be an integer >= 1.")
  if not isinstance(config.optim.grad_accum, int) or config.optim.grad_accum < 1:
    raise ValueError(f"optim.grad_accum={config.optim.grad_accum!r} must be an "
                     f"integer >= 1.")
  if config.optim.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule={config.optim.schedule!r} must be one of "
                     f"{', '.join(SCHEDULES)}.")
  if not isinstance(config.optim.warmup_steps, int) or config.optim.warmup_steps < 0:
    raise ValueError(f"optim.warmup_steps={config.optim.warmup_steps!r} must be an "
                     f"integer >= 0.")
  if not 0.0 <= config.train.ema_decay <= 1.0:
    raise ValueError(f"train.ema_decay={config.train.ema_decay} must be in [0, 1].")
  if config.train.train_routine != "Final":
    raise ValueError(f"train.train_routine={config.train.train_routine!r}: only "
                     f"'Final' (x0 prediction, every official README run) is "
                     f"supported.")


SCHEDULES = ("constant", "cosine")


def learning_rate(optim_config, num_steps: int):
  """The lr (constant, official) or schedule (warm-up + cosine to 0)."""
  if optim_config.schedule == "constant":
    return optim_config.learning_rate
  return optax.warmup_cosine_decay_schedule(
      0.0, optim_config.learning_rate, optim_config.warmup_steps,
      max(num_steps, optim_config.warmup_steps + 1))


def make_optimizer(optim_config, num_steps: int = 1) -> optax.GradientTransformation:
  """Adam with PyTorch's defaults (official: lr 2e-5, no schedule, no clipping).

  `num_steps` (train.num_steps) is the length of a 'cosine' schedule.
  """
  adam = optax.adam(learning_rate(optim_config, num_steps), b1=optim_config.b1,
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

# Exit status of a run stopped by SIGTERM or preemption after saving (EX_TEMPFAIL:
# "try again"), so schedulers can tell it from success (0) and failure (1).
PREEMPTED_EXIT_CODE = 75

# Config keys that must match between a workdir's config.json and a resuming
# run: they decide the parameter shapes or what the network learns.
EXPERIMENT_KEYS = ("model", "degradation", "data.name", "data.image_size",
                   "data.channels")


def _build(config):
  """Everything the loop needs, validated in order of cheapness."""
  check_config(config)
  mesh = parallel.make_mesh(config.mesh)
  parallel.check_global_batch(config.train.batch_size, mesh)
  parallel.check_global_batch(config.eval.batch_size, mesh, key="eval.batch_size")
  deg = degradations.build(config.degradation, config.data.image_size, config.data.channels)
  model = models.build(config.model, config.data.channels, config.data.image_size,
                       rngs=nnx.Rngs(config.seed), dtype=DTYPES[config.train.dtype],
                       remat=config.train.remat)
  return mesh, deg, model


def _log_cpu_convolutions() -> None:
  """On CPU, says which XLA kernels run the convolutions (Eigen is ~1.5x faster
  for these networks; see colddiff_jax/xla_cpu.py)."""
  if jax.default_backend() != "cpu":
    return
  if layers.ynn_runs_convolutions():
    logging.warning(
        "XLA:CPU convolutions: YNNPACK. Training runs ~1.5x slower than with "
        "Eigen: JAX's CPU backend started before colddiff_jax was imported, or "
        "XLA_FLAGS sets %s. Import colddiff_jax before using JAX, or set "
        "XLA_FLAGS=%s= yourself.", xla_cpu.YNN_FLAG, xla_cpu.YNN_FLAG)
  else:
    logging.info("XLA:CPU convolutions: Eigen.")


def _lookup(tree: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return "<missing>"
    tree = tree[part]
  return tree


def _differences(saved, current, prefix: str = ""):
  """Dotted keys whose values differ between two JSON-like config trees."""
  if isinstance(saved, dict) and isinstance(current, dict):
    for key in sorted(set(saved) | set(current)):
      yield from _differences(saved.get(key, "<missing>"), current.get(key, "<missing>"),
                              f"{prefix}.{key}" if prefix else key)
  elif saved != current:
    yield prefix, saved, current


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Fails before any compile when `workdir` is unwritable or holds another
  experiment (its config.json differs in a key of EXPERIMENT_KEYS)."""
  checkpointing.check_writable(workdir)
  path = os.path.join(workdir, "config.json")
  if not paths.exists(path):
    return
  try:
    saved = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    logging.warning("Cannot read %s (%s); not comparing configs.", path, e)
    return
  current = json.loads(config.to_json_best_effort())
  for key in EXPERIMENT_KEYS:
    for name, was, now in _differences(_lookup(saved, key), _lookup(current, key), key):
      raise ValueError(
          f"the workdir {workdir} holds a run of a different experiment: "
          f"{name} was {was!r} there, now {now!r}. Pass a new --workdir, or the "
          f"config that run used (its {path}).")


def _write_config(config, workdir: str) -> None:
  paths.write_atomic(os.path.join(workdir, "config.json"),
                     config.to_json_best_effort(indent=2))


def _resume(config, ckpt, state, train_iter):
  """Restores the newest good checkpoint into (state, iterator); returns its step."""
  if not ckpt.all_steps():
    return state, 0
  restored = ckpt.restore_latest(state)
  if restored is None:
    if not config.train.allow_restart_from_scratch:
      raise RuntimeError(
          f"no checkpoint in {ckpt.directory} could be read (the damaged ones "
          f"were moved to checkpoints_corrupt/ beside it). Set "
          f"--config.train.allow_restart_from_scratch=true to train from "
          f"scratch in this workdir, or pass another --workdir.")
    logging.warning("No readable checkpoint in %s; training from scratch "
                    "(train.allow_restart_from_scratch=True).", ckpt.directory)
    return state, 0
  state, data_state, step = restored
  if data_state:  # empty for imported checkpoints: a fresh data order
    train_iter.set_state(data_state)
  logging.info("Resumed from checkpoint at step %d.", step)
  return state, int(state["step"])


def _check_finite(step: int, metrics, last_saved: int | None) -> float:
  """The step's loss; raises FloatingPointError at the first non-finite one."""
  loss = float(jax.device_get(metrics["loss"]))
  if not np.isfinite(loss):
    kept = ("no checkpoint was written" if last_saved is None
            else f"the latest checkpoint is step {last_saved}")
    raise FloatingPointError(
        f"loss is {loss} at step {step}; stopping before anything else is "
        f"written ({kept}). Lower optim.learning_rate, set optim.grad_clip, or "
        f"check the data.")
  return loss


def _write_grid(path, restorer, params, deg, images, rng, mesh):
  """Rows degraded / direct / sampled / original of `images` (process 0 writes)."""
  x0 = parallel.replicate(np.asarray(images), mesh)
  aux = parallel.replicate(deg.sample_aux(rng, len(images)), mesh)
  rows = [parallel.gather(r) for r in restorer(params, x0, aux)]
  grid = evaluate.image_grid(rows + [np.asarray(images)])
  if jax.process_index() == 0:
    evaluate.save_png(path, grid)
  return grid


def _evaluation_data(config):
  """(images, partners or None) of the evaluation split."""
  split = input_pipeline.eval_split(config.data, config.eval.num_images,
                                    split=config.eval.split)
  return split["image"], split.get("partner")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming if possible) and evaluates; returns the final metrics.

  Returns:
    {'step': last step, 'start_step': step it resumed from (0 if fresh),
     'loss': last logged loss, 'eval': metrics or None, 'stopped_early': True
     if SIGTERM/preemption ended the run}.

  Raises:
    FloatingPointError: at the first non-finite loss (nothing is saved after
      the last finite checkpoint).
    ValueError / OSError / RuntimeError: bad config, unusable workdir, or no
      readable checkpoint; all before the first compile.
  """
  mesh, deg, model = _build(config)
  is_main = jax.process_index() == 0
  workdir = paths.resolve(workdir)
  check_workdir(config, workdir)
  # The data is opened (and probed) before anything is written, so a missing
  # dataset leaves no trace in the workdir.
  accum = config.optim.grad_accum
  local_batch = parallel.process_batch_size(config.train.batch_size)
  train_ds = input_pipeline.train_dataset(
      config.data, local_batch * accum, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      micro_batches=accum)
  eval_images, eval_partners = _evaluation_data(config)
  if is_main:
    _write_config(config, workdir)

  apply_fn = make_apply_fn(model)
  tx = make_optimizer(config.optim, config.train.num_steps)
  repl = parallel.replicated(mesh)
  state = jax.device_put(create_state(config, model, tx), repl)
  train_iter = iter(train_ds)

  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep)
  try:
    state, start_step = _resume(config, ckpt, state, train_iter)
  except BaseException:
    ckpt.close()
    raise

  # clu's writers import TensorFlow (seconds), so bad input is refused first.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  _log_cpu_convolutions()
  if start_step == 0:
    parameter_overview.log_parameter_overview(nnx.to_pure_dict(state["params"]))
    writer.write_scalars(0, {"num_params": models.count_params(model)})
  num_steps = config.train.num_steps
  progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                             every_steps=config.train.log_every)

  step_fn = jit_train_step(make_train_step(config, deg, apply_fn, tx), mesh)
  restorer = evaluate.make_restorer(apply_fn, deg, config.sample.method,
                                    config.sample.steps)
  grid_images = eval_images[:min(8, len(eval_images))]
  grid_rng = jax.random.PRNGKey(config.seed + 1)

  # One process: our SIGTERM flag. Several: JAX's preemption notifier catches
  # SIGTERM and `reached_preemption` makes every process stop at the same step;
  # a per-process flag would let them leave the loop at different steps and
  # deadlock in the next collective.
  stop = checkpointing.StopSignal(
      signals=(signal.SIGTERM,) if jax.process_count() == 1 else ())
  last_loss, stopped, last_saved = None, False, ckpt.latest_step()
  step = start_step
  pending = None  # (step, metrics) checked one step late, keeping dispatch async
  tic, tic_step = time.time(), step
  try:
    while step < num_steps:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = to_micro_batches(next(train_iter), accum)
        batch = {k: parallel.global_batch(v, mesh, batch_axis=1) for k, v in batch.items()}
        state, metrics = step_fn(state, batch)
      step += 1
      if pending is not None:
        _check_finite(*pending, last_saved)
      pending = (step, metrics)
      progress(step)
      if step % config.train.log_every == 0 or step == num_steps:
        last_loss = _check_finite(step, metrics, last_saved)
        elapsed = max(time.time() - tic, 1e-9)
        rate = (step - tic_step) / elapsed
        writer.write_scalars(step, {
            "loss": last_loss, "grad_norm": float(metrics["grad_norm"]),
            "steps_per_sec": rate,
            "img_per_sec": rate * config.train.batch_size * accum})
        tic, tic_step = time.time(), step
      preempted = ckpt.reached_preemption(step)
      save = (step % config.train.ckpt_every == 0 or step == num_steps or preempted
              or stop.requested)
      if save or step % config.train.sample_every == 0:
        _check_finite(step, metrics, last_saved)  # nothing non-finite is written
      if step % config.train.sample_every == 0 or step == num_steps:
        grid = _write_grid(os.path.join(workdir, "samples", f"step_{step:08d}.png"),
                           restorer, state["ema"], deg, grid_images, grid_rng, mesh)
        writer.write_images(step, {"samples": grid[None]})
      if save:
        logging.info("Saving checkpoint at step %d.", step)
        ckpt.save(step, state, train_iter.get_state())
        last_saved = step
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
        jax.random.PRNGKey(config.seed + 2), mesh, partners=eval_partners)
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
  ckpt = checkpointing.Checkpointer(paths.resolve(workdir), keep=config.train.keep)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(
          f"no checkpoint in {ckpt.directory}; train first (--mode=train), "
          f"import an official one (python -m colddiff_jax.convert) or pass "
          f"the --workdir of a trained run.")
    template = jax.device_put(create_state(config, model, make_optimizer(config.optim)),
                              parallel.replicated(mesh))
    restored = ckpt.restore_latest(template)
    if restored is None:
      raise FileNotFoundError(
          f"no readable checkpoint in {ckpt.directory} (damaged ones were moved "
          f"to checkpoints_corrupt/ beside it).")
    state = restored[0]
  finally:
    ckpt.close()
  return mesh, deg, model, state
