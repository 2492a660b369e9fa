"""Training throughput: the jitted train step against the official PyTorch code.

What is measured. The train step that `colddiff_jax.train` runs, built from the
same pieces (`make_optimizer`, `create_state`, `make_apply_fn`,
`make_train_step`, `jit_train_step`, `to_micro_batches`, the data mesh of
`parallel`), for three configs:

* mnist_blur   configs/mnist_blur.py: the full ConvNeXt U-Net (56.6M
               parameters), 1 channel, 32x32, T = 20, batch 32 per
               micro-batch and grad_accum 2 (the official recipe), so 64
               images per optimizer step;
* celeba_blur  configs/celeba_blur.py: the same U-Net on 128x128x3, T = 200,
               batch 8 per micro-batch, grad_accum as configured (2);
* cifar10_blur configs/cifar10_blur.py: the DDPM U-Net (35.7M parameters),
               3 channels, 32x32, T = 50, batch 32 per micro-batch and
               grad_accum as configured (2).

One step is the whole official iteration: per micro-batch, draw t, degrade
D(x0, t+1) on device, U-Net forward and backward, L1 loss; average the
gradients, one Adam step, the EMA update. The inputs are random images in
[-1, 1] (no data loading is timed), put on the mesh with
`parallel.global_batch` exactly as the training loop does.

Reported per config: compile time, the median wall time of one step, img/s
counting every image of the step (batch x grad_accum per step), peak memory,
and the official PyTorch code's img/s measured on the same 2-core CPU
(CASES below) with our ratio to it. The issue's goal is a ratio >= 1.2.
The JSON also gives the process's CPU time per step (cpu_s_per_step, all
threads): on a machine shared with other work it moves less than wall time.
With --dtype bfloat16 the U-Net computes in bfloat16 (parameters stay
float32), as `train.dtype = 'bfloat16'` does; the official figure is float32.

How it is timed. The step is compiled ahead of time with
`jit_train_step(...).lower(state, batch).compile()` (compile_s), run once as a
warm-up, then run up to --repeats times (fewer if that would take longer than
--budget seconds) and the median wall time is reported, each run ending with
`block_until_ready`. A step whose warm-up alone takes longer than --budget is
not run again: that one, already compiled, run is its time (runs = 1 in the
JSON). The step donates its state, so each run is fed the state the previous
one returned.

FLOPs. `compiled.cost_analysis()['flops']` of the step is recorded on every
backend (XLA's count for the partitioned program of one device). On a GPU,
with --peak-tflops (the dense peak of one device in the chosen dtype, e.g. 989
for an H100 SXM in bfloat16), the model-FLOP utilisation is
flops / step time / peak.

Peak memory. Each config runs in its own fresh Python process (--in-process
to run them here instead), so one config's buffers and allocator caches do not
blur the next one's figure.
* CPU: the process's peak resident set (`resource.getrusage` ru_maxrss)
  during the timed steps, less the resident set before the model was built:
  parameters, Adam moments, EMA, the batch and XLA's temporaries, plus what
  the compiler leaves resident (its freed heap is handed back with
  malloc_trim first), not the Python/JAX runtime loaded before. Where Linux
  allows it (/proc/self/clear_refs) the peak is reset after compiling, so the
  compiler's own transient peak is reported apart (compile_peak_mib);
  otherwise the figure may be that peak (memory_includes_compile in the
  JSON). The JSON also splits the step's own need: live_mib_before_steps (the
  state and batch arrays) and step_rss_growth_mib (the RSS peak's growth
  during the steps).
* GPU/TPU: `device.memory_stats()['peak_bytes_in_use']`, the largest over the
  mesh's devices (this process holds nothing else on them).
The JSON's memory_source names the method used. xla_temp_mib is XLA's own
count of the step's scratch memory (`compiled.memory_analysis()`:
activations, gradients and other intermediates, not the state), the same
on every run and backend; --remat (`train.remat`) is the lever for it.

--quick is a smoke run of the script, not a measurement: the configs'
`smoke` U-Nets cut to one level (dim 8 / ch 32), 16x16 MNIST and CIFAR-10
and 32x32 CelebA images (T unchanged), batch 16, grad_accum 1, compiled with
jax_disable_most_optimizations, all configs in about 30 s.

Malloc. Like the CLI (config.transparent_huge_pages), the script first
restarts itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 where the kernel
gives transparent huge pages on request, and its per-config processes inherit
that; --no-huge-pages keeps malloc's defaults. The JSON's glibc_tunables says
which.

Run (about 8 minutes on 2 CPU cores; one CelebA step takes about a minute):
  python -m benchmarks.train_step
  python -m benchmarks.train_step --quick          # tiny smoke run
  python -m benchmarks.train_step --cases mnist_blur --dtype bfloat16
  python -m benchmarks.train_step --remat           # rematerialised blocks
  python -m benchmarks.train_step --peak-tflops 989   # MFU on a GPU
Results are printed as a table and written to benchmarks/results/
train_step.json (--out to change), with the JAX version, backend, device
kind, CPU count, load average and date.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import importlib
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from benchmarks import common
from flax import nnx

from colddiff_jax import degradations
from colddiff_jax import models
from colddiff_jax import parallel
from colddiff_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "train_step.json"


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmarked config and the official code's throughput on it."""
  config: str          # configs/<config>.py
  batch: int           # images per micro-batch (train.batch_size)
  official_img_s: float  # official PyTorch img/s, same CPU, same batch
  official_batch: int
  official_grad_accum: int = 2  # the official gradient_accumulate_every


# The official PyTorch code (deblurring-diffusion-pytorch), timed on this
# project's 2-core CPU: img/s of its training loop with these batches.
CASES = {
    "mnist_blur": Case("mnist_blur", batch=32, official_img_s=11.3,
                       official_batch=32),
    "celeba_blur": Case("celeba_blur", batch=8, official_img_s=0.45,
                        official_batch=8),
    # The DDPM U-Net (35.7M parameters) of every CIFAR-10 run.
    "cifar10_blur": Case("cifar10_blur", batch=32, official_img_s=3.6,
                         official_batch=32),
}
# The goal: at least this many times the official img/s.
TARGET_RATIO = 1.2
# --quick: the smoke variant's tiny U-Net (configs/default.py) on small images.
QUICK_SIZES = {"mnist_blur": 16, "celeba_blur": 32, "cifar10_blur": 16}
QUICK_BATCH = 16  # divisible by the 8 fake CPU devices of the tests
_MIB = 1 << 20


# ----------------------------------------------------------------- memory ----


def _reset_peak_rss() -> bool:
  """Resets the process's peak RSS to the current RSS (Linux); True if done."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _trim_heap() -> None:
  """Returns freed heap (the compiler's, mostly) to the OS where glibc can."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _max_rss_bytes() -> int:
  """The process's peak resident set so far (ru_maxrss)."""
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return maxrss if sys.platform == "darwin" else maxrss * 1024


def _current_rss_bytes() -> int:
  """The process's resident set now (falls back to the peak off Linux)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError):
    return _max_rss_bytes()


def _device_peak_bytes(devices) -> int | None:
  """Largest peak_bytes_in_use over `devices`, None where not reported."""
  peaks = []
  for d in devices:
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


# ------------------------------------------------------------------ config ----


def make_config(case: Case, args: argparse.Namespace):
  """The case's experiment config with the benchmark's overrides applied."""
  module = importlib.import_module(f"configs.{case.config}")
  config = module.get_config("smoke" if args.quick else None)
  if args.quick:
    config.data.image_size = QUICK_SIZES[case.config]
    # One level: the smoke U-Nets compile slowly.
    config.model.dim_mults = config.model.ch_mult = (1,)
  config.train.batch_size = args.batch or (QUICK_BATCH if args.quick
                                           else case.batch)
  # The smoke variant's grad_accum is 1 (each extra micro-batch is one more
  # unrolled forward/backward to compile); the full run keeps the config's.
  if args.grad_accum:
    config.optim.grad_accum = args.grad_accum
  config.train.dtype = args.dtype
  config.train.remat = args.remat
  if args.mesh_data is not None:
    config.mesh.data = args.mesh_data
  config.seed = args.seed
  train.check_config(config)
  return config


@contextlib.contextmanager
def _fast_compiles(enabled: bool):
  """With --quick: skip XLA's slow optimisation passes (compile time dominates
  a smoke run; its timings mean nothing anyway). Restored on exit."""
  flag = "jax_disable_most_optimizations"
  if not enabled:
    yield
    return
  previous = jax.config.read(flag)
  jax.config.update(flag, True)
  try:
    yield
  finally:
    jax.config.update(flag, previous)


def _temp_bytes(compiled) -> int | None:
  """XLA's scratch memory of a compiled executable (its `memory_analysis`):
  activations, gradients and other intermediates, without the arguments
  and outputs. Deterministic, unlike an RSS or allocator peak."""
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # backend without it
    return None


# --------------------------------------------------------------- benchmark ----


@dataclasses.dataclass
class BuiltStep:
  """A case's train step, unjitted, with a state and a batch on the mesh."""
  mesh: jax.sharding.Mesh
  num_steps: int      # T of the degradation
  num_params: int
  step: Callable      # train.make_train_step's (state, batch) -> ...
  state: Any
  batch: dict


def build_step(config) -> BuiltStep:
  """The pieces `colddiff_jax.train` builds for `config`, on its mesh.

  The batch holds random images in [-1, 1], split into grad_accum
  micro-batches and put on the mesh as the training loop does.
  """
  mesh = parallel.make_mesh(config.mesh)
  parallel.check_global_batch(config.train.batch_size, mesh)
  size, channels = config.data.image_size, config.data.channels
  deg = degradations.build(config.degradation, size, channels)
  model = models.build(config.model, channels, size,
                       rngs=nnx.Rngs(config.seed),
                       dtype=train.DTYPES[config.train.dtype],
                       remat=config.train.remat)
  num_params = models.count_params(model)
  apply_fn = train.make_apply_fn(model)
  tx = train.make_optimizer(config.optim)
  state = jax.device_put(train.create_state(config, model, tx),
                         parallel.replicated(mesh))
  accum, batch_size = config.optim.grad_accum, config.train.batch_size
  images = np.random.default_rng(config.seed).uniform(
      -1.0, 1.0, (accum * batch_size, size, size, channels)).astype(np.float32)
  batch = train.to_micro_batches({"image": images}, accum)
  batch = {k: parallel.global_batch(v, mesh, batch_axis=1)
           for k, v in batch.items()}
  return BuiltStep(mesh, deg.num_steps, num_params,
                   train.make_train_step(config, deg, apply_fn, tx), state,
                   batch)


def comparable(config, case: Case, args: argparse.Namespace) -> bool:
  """Full size (not --quick), with the official measurement's batch and
  grad_accum: the only rows whose ratio to the official figure means
  anything."""
  return (not args.quick and config.train.batch_size == case.official_batch
          and config.optim.grad_accum == case.official_grad_accum)


def run_case(name: str, args: argparse.Namespace) -> dict:
  """Builds, compiles and times one case's train step; a JSON-ready row."""
  case = CASES[name]
  config = make_config(case, args)
  on_cpu = jax.default_backend() == "cpu"

  gc.collect()
  can_reset = on_cpu and _reset_peak_rss()
  rss_base = _current_rss_bytes() if can_reset else _max_rss_bytes()

  built = build_step(config)
  mesh, state, batch = built.mesh, built.state, built.batch
  size, channels = config.data.image_size, config.data.channels
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  accum, batch_size = config.optim.grad_accum, config.train.batch_size
  step_fn = train.jit_train_step(built.step, mesh)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  flops = common.xla_flops(compiled)
  temp_bytes = _temp_bytes(compiled)
  compile_peak = (_max_rss_bytes() - rss_base) if on_cpu else None
  if on_cpu:
    _trim_heap()
    if can_reset:
      _reset_peak_rss()
  rss_before_steps = _current_rss_bytes()
  live_bytes = sum(x.nbytes for x in jax.tree.leaves((state, batch)))

  start, cpu_start = time.perf_counter(), time.process_time()
  state, metrics = jax.block_until_ready(compiled(state, batch))
  first_s = time.perf_counter() - start
  times, cpu_times = [first_s], [time.process_time() - cpu_start]
  if first_s < args.budget:
    runs = max(1, min(args.repeats, int(args.budget / max(first_s, 1e-9))))
    times, cpu_times = [], []
    for _ in range(runs):
      start, cpu_start = time.perf_counter(), time.process_time()
      state, metrics = jax.block_until_ready(compiled(state, batch))
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
  step_s = statistics.median(times)

  step_growth = None
  if on_cpu:
    peak = _max_rss_bytes() - rss_base
    if can_reset:
      step_growth = _max_rss_bytes() - rss_before_steps
    memory_source = "cpu: ru_maxrss growth over the RSS before building"
    if can_reset:
      memory_source += " (peak reset after compiling)"
  else:
    peak = _device_peak_bytes(mesh.devices.flat)
    memory_source = f"{jax.default_backend()}: memory_stats peak_bytes_in_use"
  loss = float(jax.device_get(metrics["loss"]))
  if not math.isfinite(loss):
    raise FloatingPointError(f"{name}: loss is {loss} after the timed steps.")

  images_per_step = accum * batch_size
  img_s = images_per_step / step_s
  tflops = flops / step_s / 1e12 if flops else None
  mfu = None
  if (jax.default_backend() == "gpu" and args.peak_tflops and tflops
      is not None):
    mfu = tflops / args.peak_tflops
  return {
      "case": name,
      "config": case.config,
      "image_size": size,
      "channels": channels,
      "time_steps": built.num_steps,
      "num_params": built.num_params,
      "dtype": config.train.dtype,
      "remat": config.train.remat,
      "batch": batch_size,
      "grad_accum": accum,
      "images_per_step": images_per_step,
      "mesh_devices": int(mesh.devices.size),
      "compile_s": compile_s,
      "first_step_s": first_s,
      "step_s": step_s,
      "step_times_s": times,
      # CPU time of this process (all its threads) per step, median.
      "cpu_s_per_step": statistics.median(cpu_times),
      "runs": len(times),
      "img_per_s": img_s,
      "loss": loss,
      "flops_per_step": flops,
      "tflop_per_s": tflops,
      "mfu": mfu,
      "peak_memory_mib": None if peak is None else peak / _MIB,
      "compile_peak_mib": (None if compile_peak is None
                           else compile_peak / _MIB),
      "memory_includes_compile": on_cpu and not can_reset,
      "memory_source": memory_source,
      "state_mib": state_bytes / _MIB,
      "xla_temp_mib": None if temp_bytes is None else temp_bytes / _MIB,
      # Arrays alive when the timed steps start (state + batch), and the
      # growth of the peak RSS during the steps over the RSS just before
      # them: together, what the step itself needs, without the runtime and
      # compiler memory the RSS delta above also counts.
      "live_mib_before_steps": live_bytes / _MIB,
      "step_rss_growth_mib": (None if step_growth is None
                              else step_growth / _MIB),
      "official_img_per_s": case.official_img_s,
      "official_batch": case.official_batch,
      "ratio": img_s / case.official_img_s,
      "comparable": comparable(config, case, args),
  }


def _worker_argv(args: argparse.Namespace, name: str, out: str) -> list[str]:
  """This script's command line for one case in a fresh process."""
  argv = [sys.executable, "-m", "benchmarks.train_step", "--cases", name,
          "--worker-out", out, "--dtype", args.dtype,
          "--repeats", str(args.repeats), "--budget", str(args.budget),
          "--seed", str(args.seed)]
  if args.quick:
    argv.append("--quick")
  if args.remat:
    argv.append("--remat")
  for flag, value in (("--batch", args.batch),
                      ("--grad-accum", args.grad_accum),
                      ("--mesh-data", args.mesh_data),
                      ("--peak-tflops", args.peak_tflops)):
    if value is not None:
      argv += [flag, str(value)]
  return argv


def run_isolated(name: str, args: argparse.Namespace) -> dict:
  """run_case in a fresh Python process (clean peak memory); its row."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    proc = subprocess.run(_worker_argv(args, name, out), cwd=REPO,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not os.path.exists(out):
      raise RuntimeError(
          f"the {name} worker failed (exit {proc.returncode}):\n"
          f"{proc.stderr[-4000:]}")
    with open(out) as f:
      return json.load(f)


# ------------------------------------------------------------------ report ----



def _params(n: int) -> str:
  return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n / 1e3:.1f}k"


def format_table(rows: list[dict], with_mfu: bool) -> str:
  """The results as a fixed-width text table."""
  header = (f"{'config':<18} {'size':>8} {'T':>4} {'params':>7} {'dtype':>8} "
            f"{'batch':>6} {'compile s':>9} {'step s':>8} {'runs':>4} "
            f"{'img/s':>8} {'official':>8} {'ratio':>7} {'peak MiB':>9} "
            f"{'XLA tmp':>8}")
  if with_mfu:
    header += f" {'TFLOP/s':>8} {'MFU':>6}"
  lines = [header, "-" * len(header)]
  for r in rows:
    shape = f"{r['image_size']}x{r['channels']}"
    case = r["case"] + (" remat" if r.get("remat") else "")
    line = (f"{case:<18} {shape:>8} {r['time_steps']:>4} "
            f"{_params(r['num_params']):>7} {r['dtype']:>8} "
            f"{str(r['batch']) + 'x' + str(r['grad_accum']):>6} "
            f"{r['compile_s']:>9.1f} {r['step_s']:>8.3f} {r['runs']:>4} "
            f"{r['img_per_s']:>8.2f} {r['official_img_per_s']:>8.2f} "
            f"{r['ratio']:>6.2f}x {common.fmt(r['peak_memory_mib'], '9.0f'):>9} "
            f"{common.fmt(r.get('xla_temp_mib'), '8.0f'):>8}")
    if with_mfu:
      line += (f" {common.fmt(r['tflop_per_s'], '8.2f'):>8} "
               f"{common.fmt(r['mfu'] and 100 * r['mfu'], '5.1f') + '%':>6}")
    lines.append(line)
  lines.append("batch = images per micro-batch x grad_accum; img/s counts "
               "every image of a step; official = PyTorch img/s, same CPU; "
               "XLA tmp = the step's scratch MiB (memory_analysis).")
  return "\n".join(lines)


def check_target(rows: list[dict]) -> list[dict]:
  """The issue's goal (>= TARGET_RATIO x the official img/s) per config."""
  return [{
      "case": r["case"],
      "description": (f"img/s >= {TARGET_RATIO:g}x official "
                      f"({r['official_img_per_s']:g} img/s, batch "
                      f"{r['official_batch']})"),
      "required_ratio": TARGET_RATIO,
      "ratio": r["ratio"],
      "met": r["ratio"] >= TARGET_RATIO,
      "conclusive": r["comparable"],
  } for r in rows]



def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Time the jitted train step against the official code.")
  parser.add_argument("--quick", action="store_true",
                      help="tiny U-Net (the smoke variant), images and batch "
                      "(a smoke run).")
  parser.add_argument("--cases", nargs="+", choices=list(CASES),
                      default=list(CASES), help="configs to run (default all).")
  parser.add_argument("--dtype", choices=sorted(train.DTYPES),
                      default="float32", help="compute dtype (train.dtype).")
  parser.add_argument("--remat", action="store_true",
                      help="recompute each block's activations in the "
                      "backward pass (train.remat).")
  parser.add_argument("--batch", type=int, default=None,
                      help="images per micro-batch (default: 32 MNIST, 8 "
                      f"CelebA; {QUICK_BATCH} with --quick).")
  parser.add_argument("--grad-accum", type=int, default=None,
                      help="micro-batches per step (default: the config's, "
                      "2; 1 with --quick).")
  parser.add_argument("--repeats", type=int, default=None,
                      help="most timed steps per config (default 3; 2 with "
                      "--quick).")
  parser.add_argument("--budget", type=float, default=None,
                      help="seconds of timed steps per config (default 120; "
                      "1 with --quick); a slower warm-up is the only run.")
  parser.add_argument("--mesh-data", type=int, default=None,
                      help="devices on the data axis (default: the config's, "
                      "-1 = all).")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="peak TFLOP/s of one device in --dtype; with a GPU "
                      "backend, gives the model-FLOP utilisation.")
  parser.add_argument("--in-process", action="store_true",
                      help="run every config in this process (peak memory "
                      "then mixes configs).")
  parser.add_argument("--seed", type=int, default=0,
                      help="PRNG seed of the inputs and parameters.")
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                      help=f"JSON output path (default {DEFAULT_OUT}).")
  parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
  common.add_huge_pages_flag(parser)
  args = parser.parse_args(argv)
  if args.repeats is None:
    args.repeats = 2 if args.quick else 3
  if args.budget is None:
    args.budget = 1.0 if args.quick else 120.0
  if (args.repeats < 1 or args.budget <= 0 or (args.batch or 1) < 1
      or (args.grad_accum or 1) < 1 or (args.peak_tflops or 1) <= 0):
    parser.error("--batch, --grad-accum and --repeats must be >= 1, --budget "
                 "and --peak-tflops > 0.")
  return args


def main(argv: Sequence[str] | None = None) -> dict | None:
  """Runs the benchmark, prints the table and writes the JSON; returns it."""
  args = parse_args(argv)
  with _fast_compiles(args.quick):
    return _main(args)


def _main(args: argparse.Namespace) -> dict | None:
  if args.worker_out is not None:  # one case, for run_isolated
    (name,) = args.cases
    row = run_case(name, args)
    with open(args.worker_out, "w") as f:
      json.dump(row, f)
    return None

  env = common.environment()
  print(f"jax {env['jax_version']} | backend {env['backend']} | device "
        f"{env['device_kind']} x{env['device_count']} | {env['cpu_count']} "
        f"CPUs | load {common.fmt(env['load_average'] and env['load_average'][0], '.2f')}"
        f" | {args.dtype} | {env['date']}" + (" | QUICK" if args.quick else ""),
        flush=True)
  rows = []
  for name in args.cases:
    row = run_case(name, args) if args.in_process else run_isolated(name, args)
    rows.append(row)
    print(f"  {name:<12} compile {row['compile_s']:.1f} s  step "
          f"{row['step_s']:.3f} s  {row['img_per_s']:.2f} img/s", flush=True)

  with_mfu = any(r["mfu"] is not None for r in rows)
  print()
  print(format_table(rows, with_mfu))
  targets = check_target(rows)
  for t in targets:
    verdict = "MET" if t["met"] else "NOT MET"
    note = "" if t["conclusive"] else (
        " (not the official size/batch/grad_accum: indicative only)")
    print(f"Target {t['case']}: {t['description']}: {t['ratio']:.2f}x -> "
          f"{verdict}{note}")
  if rows:
    print(f"Peak memory: {rows[0]['memory_source']}.")

  result = {
      "benchmark": "train_step",
      **env,
      "quick": args.quick,
      # --quick compiles with jax_disable_most_optimizations.
      "xla_optimizations": not args.quick,
      "dtype": args.dtype,
      "repeats": args.repeats,
      "budget_s": args.budget,
      "seed": args.seed,
      "peak_tflops": args.peak_tflops,
      "isolated": not args.in_process,
      "results": rows,
      "targets": targets,
  }
  common.write_json(args.out, result)
  return result


if __name__ == "__main__":
  if "--worker-out" not in sys.argv:  # a worker keeps its parent's malloc
    common.start(sys.argv[1:])
  main(sys.argv[1:])
