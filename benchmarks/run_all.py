"""Every benchmark of the performance issue, in one process, on one backend.

  python -m benchmarks.run_all            # full size (~25 minutes on 2 CPU cores)
  python -m benchmarks.run_all --quick    # tiny smoke run of every section

prints one table with the official PyTorch figures beside ours and the ratio,
and writes benchmarks/results/<backend>.json (<backend>-quick.json with
--quick; --out to change).

Sections (each one `--sections` name):

* train    the jitted train step of benchmarks/train_step.py (`run_case`) for
           mnist_blur (ConvNeXt U-Net 56.6M, 32x32x1, batch 32 x grad_accum
           2), cifar10_blur (DDPM U-Net 35.7M, 32x32x3, 32 x 2) and
           celeba_blur (ConvNeXt U-Net, 128x128x3, 8 x 2): compile time,
           median step time, img/s (every image of the step), peak memory,
           the process's CPU time per step, XLA's FLOPs per step and the
           utilisation against the peak below, XLA's scratch memory
           (xla_temp_mib). On a GPU in float32 and bfloat16 (--dtypes);
           with --remat each case again with rematerialised blocks.
* convs    the convolution floor of each train case (benchmarks/conv_floor.py,
           first dtype, without remat, on one device): every convolution
           the step runs - forward, input and kernel gradients - compiled and
           timed alone at its shapes, summed with its count. images / floor
           is the most img/s the step could reach if everything else were
           free; the table gives it below the step's row, as a ratio to the
           official figure.
* sample   Algorithm 2 (`sampling.sample`, method 'tacos': one `lax.scan`
           in one jit) with a randomly initialised network: MNIST T=20 batch
           64, CIFAR-10 T=50 batch 64, CelebA-128 T=200 batch 4. A full run
           is T network calls; with --sample-steps k < T (the default on CPU,
           where a CelebA run takes ~15 minutes) the timed program runs the
           last k steps of the loop (`num_steps=k`, the same per-step work)
           and the T-step time is extrapolated as T x (k-step time / k); the
           table marks such rows 'extrapolated'.
* degrade  D(x0, T) for the blur configs: the table form colddiff_jax runs
           (`deg.apply`) against the official step-by-step chain ported to one
           jitted lax.scan (benchmarks/degradations.py), and for CelebA-128
           at batch 4 against the official code's 1.1 s per call.
* input    images/s of `input_pipeline.train_dataset` (one core, no
           overlap: the 'sync' setting of benchmarks/input_pipeline.py) for
           the embedded MNIST digits and a folder of 128x128 JPEGs, beside the
           img/s the train step consumes.

Like the CLI (config.transparent_huge_pages), the script first restarts itself
with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 where the kernel gives transparent
huge pages on request; --no-huge-pages keeps malloc's defaults.

Timing: every function is compiled ahead of time (not timed), run once as a
warm-up, then --repeats (default 5) times; the median wall time is reported.
A row's 'cpu_s' is the CPU time of this process (all threads) over the same
runs: on a machine shared with other work it is the steadier figure.

FLOPs are XLA's cost analysis of the compiled program
(`compiled.cost_analysis()['flops']`; for a sampler, XLA counts the loop body
once, i.e. one step). Utilisation = FLOPs / time / peak, with the peak:
* CPU: cores x FMA units per core x fp32 lanes per FMA x 2 FLOP x clock,
  read from /proc/cpuinfo ('cpu MHz', the AVX2 / AVX-512 flags) and
  os.sched_getaffinity; 2 FMA units per core (every AVX2 x86 core since
  Haswell / Zen 2; an assumption, not something /proc/cpuinfo states). The
  clock is the nominal one; a core running above it (turbo) can exceed
  "100%".
* GPU: the vendor's dense peak of the device in the step's dtype (a table
  of known devices, or --peak-tflops).

One process: peak memory of the train rows is the growth of the process's
peak RSS over the RSS before each model was built, with the peak reset after
compiling (see benchmarks/train_step.py); buffers of an earlier row that the
allocator keeps can blur it. benchmarks/train_step.py isolates each config in
its own process for cleaner figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import pathlib
import sys
import tempfile
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common
from benchmarks import conv_floor
from benchmarks import degradations as deg_bench
from benchmarks import train_step
from colddiff_jax import degradations
from colddiff_jax import models
from colddiff_jax import sampling
from colddiff_jax import train
from colddiff_jax import xla_cpu
from colddiff_jax.models import layers

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SECTIONS = ("train", "convs", "sample", "degrade", "input")
TRAIN_CASES = ("mnist_blur", "cifar10_blur", "celeba_blur")
# The targets, as multiples of the official figure.
TRAIN_TARGET, SAMPLE_TARGET, DEGRADE_TARGET = 1.2, 2.0, 20.0


@dataclasses.dataclass(frozen=True)
class SampleCase:
  """One Algorithm-2 row and the official code's time for it (if measured)."""
  config: str
  batch: int
  official_s: float | None
  target: float | None = None  # required multiple of the official speed


SAMPLE_CASES = {
    "mnist_blur": SampleCase("mnist_blur", 64, 46.8),
    "cifar10_blur": SampleCase("cifar10_blur", 64, None),
    "celeba_blur": SampleCase("celeba_blur", 4, 816.0, SAMPLE_TARGET),
}
# The official blur chain D(x0, T) at CelebA-128 (T = 200), batch 4: seconds
# per call (the measurement on this CPU).
OFFICIAL_CELEBA_CHAIN_S = 1.1
OFFICIAL_CELEBA_CHAIN_BATCH = 4
# (config, image size, batch) of the degradation rows.
DEGRADE_CASES = (("celeba_blur", 128, OFFICIAL_CELEBA_CHAIN_BATCH),
                 ("cifar10_blur", 32, 64),
                 ("mnist_blur", 32, 64))
# Dense peak TFLOP/s by device kind (substring match, lower case) and dtype.
GPU_PEAKS = {
    "h200": {"float32": 66.9, "bfloat16": 989.4},
    "h100": {"float32": 66.9, "bfloat16": 989.4},
    "a100": {"float32": 19.5, "bfloat16": 312.0},
    "l4": {"float32": 30.3, "bfloat16": 121.0},
}
QUICK = {"image_size": {"mnist_blur": 16, "cifar10_blur": 16,
                        "celeba_blur": 32},
         "sample_batch": 8, "sample_steps": 2, "degrade_size": 16,
         "degrade_batch": 8, "input_seconds": 0.5, "input_files": 16}


# -------------------------------------------------------------------- peak ----


def cpu_peak() -> dict:
  """The CPU's fp32 peak from /proc/cpuinfo and the CPUs this process may use."""
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count())
  mhz, flags, model = None, set(), None
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "cpu MHz" and mhz is None:
          mhz = float(value)
        elif key == "flags" and not flags:
          flags = set(value.split())
        elif key == "model name" and model is None:
          model = value.strip()
  except OSError:
    pass
  lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
  fma_units = 2 if {"fma", "avx512f"} & flags else 1
  flops_per_cycle = fma_units * lanes * 2
  peak = cores * flops_per_cycle * mhz * 1e6 if mhz else None
  formula = (f"{cores} cores x {fma_units} FMA units x {lanes} fp32 lanes "
             f"({'AVX-512' if lanes == 16 else 'AVX2' if lanes == 8 else 'SSE'})"
             f" x 2 FLOP x {mhz:.0f} MHz" if mhz else "unknown clock")
  return {"kind": "cpu", "model": model, "cores": cores, "mhz": mhz,
          "flops_per_cycle_per_core": flops_per_cycle, "peak_flops": peak,
          "formula": formula}


def gpu_peak(device_kind: str, dtype: str, override: float | None) -> dict:
  """The device's dense peak in `dtype` (override: --peak-tflops)."""
  if override:
    return {"kind": "gpu", "peak_flops": override * 1e12,
            "formula": f"--peak-tflops {override:g}"}
  for key, peaks in GPU_PEAKS.items():
    if key in device_kind.lower():
      return {"kind": "gpu", "peak_flops": peaks[dtype] * 1e12,
              "formula": f"{key.upper()} dense {dtype} peak "
                         f"{peaks[dtype]:g} TFLOP/s (vendor sheet)"}
  return {"kind": "gpu", "peak_flops": None,
          "formula": f"unknown device {device_kind!r}: pass --peak-tflops"}


def peak_for(dtype: str, args: argparse.Namespace) -> dict:
  if jax.default_backend() == "cpu":
    return cpu_peak()
  return gpu_peak(jax.devices()[0].device_kind, dtype, args.peak_tflops)


def _utilisation(flops, seconds, peak: dict):
  if not flops or not seconds or not peak.get("peak_flops"):
    return None
  return flops / seconds / peak["peak_flops"]


# ------------------------------------------------------------------- train ----


def run_train(args: argparse.Namespace) -> list[dict]:
  """The train-step rows (benchmarks/train_step.run_case, in this process)."""
  rows = []
  for dtype in args.dtypes:
    for remat in (False, True) if args.remat else (False,):
      targs = train_step.parse_args(
          (["--quick"] if args.quick else []) + (["--remat"] if remat else [])
          + ["--dtype", dtype, "--repeats", str(args.repeats),
             "--budget", "1e9", "--seed", str(args.seed)])
      rows += _train_rows(args, targs, dtype, remat)
  return rows


def _train_rows(args: argparse.Namespace, targs: argparse.Namespace,
                dtype: str, remat: bool) -> list[dict]:
  """The train cases' rows with one dtype and remat setting."""
  rows = []
  peak = peak_for(dtype, args)
  for name in args.train_cases:
    print(f"  train {name} ({dtype}{', remat' if remat else ''}) ...",
          flush=True)
    row = train_step.run_case(name, targs)
    row["utilisation"] = _utilisation(row["flops_per_step"], row["step_s"],
                                      peak)
    row["peak"] = peak
    rows.append(row)
    print(f"    compile {row['compile_s']:.1f} s, step {row['step_s']:.2f} s, "
          f"{row['img_per_s']:.2f} img/s (official "
          f"{row['official_img_per_s']:g}), cpu {row['cpu_s_per_step']:.1f} s"
          f"/step", flush=True)
  return rows


# ------------------------------------------------------------------ sample ----


def _network(config):
  """A randomly initialised network of `config` and its apply function."""
  model = models.build(config.model, config.data.channels,
                       config.data.image_size, rngs=nnx.Rngs(config.seed),
                       dtype=train.DTYPES[config.train.dtype])
  _, params, _ = nnx.split(model, nnx.Param, ...)
  return train.make_apply_fn(model), params


def run_sample(args: argparse.Namespace) -> list[dict]:
  """Algorithm 2 rows: k timed steps of the scan, extrapolated to T."""
  rows = []
  for name in args.sample_cases:
    case = SAMPLE_CASES[name]
    config = importlib.import_module(f"configs.{case.config}").get_config(
        "smoke" if args.quick else None)
    if args.quick:
      config.data.image_size = QUICK["image_size"][name]
      config.model.dim_mults = config.model.ch_mult = (1,)
    batch = QUICK["sample_batch"] if args.quick else case.batch
    size, channels = config.data.image_size, config.data.channels
    deg = degradations.build(config.degradation, size, channels)
    t_total = deg.num_steps
    k = t_total if args.sample_steps is None else min(args.sample_steps,
                                                      t_total)
    print(f"  sample {name}: T={t_total}, batch {batch}, timing {k} "
          f"step(s) ...", flush=True)
    apply_fn, params = _network(config)
    k_x, k_aux = jax.random.split(jax.random.key(args.seed))
    shape = (batch, size, size, channels)
    x0 = jax.random.uniform(k_x, shape, jnp.float32, -1.0, 1.0)
    aux = deg_bench.make_aux(config.degradation.name, deg, k_aux, batch, shape)
    x_t = jax.jit(deg.apply)(x0, jnp.full((batch,), k, jnp.int32), aux)

    def run(params, x_t, aux, k=k):
      return sampling.sample(lambda x, s: apply_fn(params, x, s), deg, x_t,
                             aux, method="tacos", num_steps=k)

    start = time.perf_counter()
    compiled = jax.jit(run).lower(params, x_t, aux).compile()
    compile_s = time.perf_counter() - start
    timing = common.time_compiled(compiled, (params, x_t, aux),
                                  args.repeats)
    out = np.asarray(timing.pop("out"))
    if not np.all(np.isfinite(out)):
      raise FloatingPointError(f"sampler {name}: non-finite output.")
    per_step = timing["median_s"] / k
    total = per_step * t_total
    flops_step = common.xla_flops(compiled)  # XLA counts the loop body once
    peak = peak_for(config.train.dtype, args)
    official = None if args.quick else case.official_s
    rows.append({
        "case": name, "config": case.config, "image_size": size,
        "channels": channels, "time_steps": t_total, "batch": batch,
        "timed_steps": k, "extrapolated": k < t_total,
        "compile_s": compile_s, "run_s": timing["median_s"],
        "run_times_s": timing["times_s"], "runs": timing["runs"],
        "cpu_s": timing["cpu_s"], "step_s": per_step, "total_s": total,
        "flops_per_step": flops_step,
        "utilisation": _utilisation(flops_step, per_step, peak), "peak": peak,
        "official_s": official,
        "speedup": official / total if official else None,
        "target": case.target,
    })
    print(f"    compile {compile_s:.1f} s, {per_step:.2f} s/step -> "
          f"{total:.1f} s for T={t_total}"
          + (f" (official {official:g} s)" if official else ""), flush=True)
  return rows


# ----------------------------------------------------------------- degrade ----


def run_degrade(args: argparse.Namespace) -> list[dict]:
  """Table form vs the ported official chain, and vs the official 1.1 s."""
  rows = []
  cases = DEGRADE_CASES
  if args.quick:  # T = 20 (an XLA-unoptimised 200-step chain takes ~15 s)
    cases = (("mnist_blur", QUICK["degrade_size"], QUICK["degrade_batch"]),)
  for config_name, size, batch in cases:
    print(f"  degrade blur {config_name} {size}x{size} batch {batch} ...",
          flush=True)
    row = deg_bench.run_case("blur", config_name, size, size, batch,
                             args.repeats, 1e9, args.seed)
    official = (OFFICIAL_CELEBA_CHAIN_S
                if (config_name == "celeba_blur" and size == 128
                    and batch == OFFICIAL_CELEBA_CHAIN_BATCH and not args.quick)
                else None)
    row["official_chain_ms"] = official * 1e3 if official else None
    row["speedup_vs_official"] = (official * 1e3 / row["table_ms"]
                                  if official else None)
    rows.append(row)
    print(f"    table {row['table_ms']:.3f} ms, chain {row['chain_ms']:.1f} ms"
          f" ({row['speedup']:.0f}x)", flush=True)
  return rows


# ------------------------------------------------------------------- input ----


def run_input(args: argparse.Namespace, train_rows: list[dict]) -> list[dict]:
  """'sync' img/s of the input pipeline (benchmarks/input_pipeline.py)."""
  try:
    pipe = importlib.import_module("benchmarks.input_pipeline")
    sources, data_config = pipe.SOURCES, pipe.data_config
    write_jpegs, time_pipeline = pipe.write_jpegs, pipe.time_pipeline
  except (ImportError, AttributeError) as e:
    print(f"  input pipeline: skipped ({e})", flush=True)
    return [{"source": None, "skipped": f"benchmarks/input_pipeline.py: {e}"}]
  consumed = {r["case"]: r["img_per_s"] for r in train_rows
              if r["dtype"] == "float32" and not r.get("remat")}
  seconds = QUICK["input_seconds"] if args.quick else args.input_seconds
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in ("mnist_embedded", "celeba_hq"):
      source = sources[name]
      folder = None
      if source.files:
        folder = pathlib.Path(tmp) / name
        n = QUICK["input_files"] if args.quick else min(source.files, 256)
        write_jpegs(folder, n, source.width, source.height)
      data = data_config(source, str(folder) if folder else None, 0, 0)
      if args.quick:
        data.image_size = min(data.image_size, 32)
      print(f"  input {name} ...", flush=True)
      row = {"source": name, "setting": "sync", "image_size": data.image_size,
             "transform": data.train_transform, "skipped": None}
      row |= time_pipeline(data, seconds, 32)
      step = consumed.get(source.train_step_case)
      row["train_step_case"] = source.train_step_case
      row["train_step_img_per_s"] = step
      row["ratio"] = row["img_per_s"] / step if step else None
      rows.append(row)
      print(f"    {row['img_per_s']:.0f} img/s", flush=True)
  return rows


# ------------------------------------------------------------------- convs ----


def run_convs(args: argparse.Namespace) -> list[dict]:
  """The convolution floor of each train case (benchmarks/conv_floor.py):
  its convolutions timed alone, and the img/s they would allow."""
  targs = train_step.parse_args(
      (["--quick"] if args.quick else [])
      + ["--dtype", args.dtypes[0], "--repeats", str(args.repeats),
         "--seed", str(args.seed), "--mesh-data", "1"])
  rows = []
  for name in args.train_cases:
    print(f"  convolutions of train {name} ...", flush=True)
    row = conv_floor.train_step_floor(name, targs)
    print(f"    {row['executions']} ({row['distinct']} distinct): "
          f"{row['floor_s']:.2f} s per step -> at most "
          f"{row['bound_img_per_s']:.2f} img/s", flush=True)
    rows.append(row)
  return rows


# ------------------------------------------------------------------- table ----


def _x(value) -> str:
  return "-" if value is None else f"{value:.2f}x"


def _conv_line(r: dict) -> dict:
  """The summary line of a convolution-floor row (run_convs)."""
  top = r["convs"][0]
  return {
      "workload": f"  its convolutions alone: {r['case']} {r['batch']}x"
                  f"{r['grad_accum']} {r['dtype']}"
                  + (" remat" if r["remat"] else ""),
      "ours": f"{r['bound_img_per_s']:.2f} img/s",
      "official": f"{r['official_img_per_s']:g} img/s",
      "ratio": r["bound_ratio"] if r["comparable"] else None,
      "target": None,
      "note": (f"bound: {r['executions']} convolutions ({r['distinct']} "
               f"distinct) take {r['floor_s']:.2f} s per step timed alone; "
               f"costliest {1e3 * top['total_s']:.0f} ms: {top['count']} x "
               f"{top['conv'].split(' pad=')[0]}")}


def summary(result: dict) -> list[dict]:
  """One line per workload: ours, official, ratio (higher = faster), target."""
  lines = []
  floors = {(f["case"], f["dtype"], f["remat"]): f for f in result["convs"]}
  for r in result["train"]:
    lines.append({
        "workload": f"train {r['case']} {r['image_size']}x{r['image_size']}x"
                    f"{r['channels']} {r['batch']}x{r['grad_accum']} "
                    f"{r['dtype']}" + (" remat" if r.get("remat") else ""),
        "ours": f"{r['img_per_s']:.2f} img/s",
        "official": f"{r['official_img_per_s']:g} img/s",
        "ratio": r["ratio"] if r["comparable"] else None,
        # The target is for the default (stored-activation) step.
        "target": None if r.get("remat") else TRAIN_TARGET,
        "note": (f"step {r['step_s']:.2f} s, compile {r['compile_s']:.0f} s, "
                 f"cpu {r['cpu_s_per_step']:.1f} s/step, peak "
                 f"{common.fmt(r['peak_memory_mib'], '.0f')} MiB (XLA temp "
                 f"{common.fmt(r.get('xla_temp_mib'), '.0f')} MiB), util "
                 f"{common.fmt(r['utilisation'] and 100 * r['utilisation'], '.1f')}%")})
    # The floor of this step right below it.
    floor = floors.pop((r["case"], r["dtype"], bool(r.get("remat"))), None)
    if floor:
      lines.append(_conv_line(floor))
  lines += [_conv_line(f) for f in floors.values()]
  for r in result["sample"]:
    lines.append({
        "workload": f"Algorithm 2 {r['case']} T={r['time_steps']} batch "
                    f"{r['batch']}",
        "ours": f"{r['total_s']:.1f} s",
        "official": "-" if r["official_s"] is None else f"{r['official_s']:g} s",
        "ratio": r["speedup"], "target": r["target"],
        "note": (("extrapolated from " if r["extrapolated"] else "")
                 + f"{r['timed_steps']} steps: {r['step_s']:.2f} s/step, util "
                 f"{common.fmt(r['utilisation'] and 100 * r['utilisation'], '.1f')}%")})
  for r in result["degrade"]:
    official = r["official_chain_ms"]
    lines.append({
        "workload": f"blur D(x0,T) {r['config']} {r['image_size']}x"
                    f"{r['image_size']} T={r['time_steps']} batch {r['batch']}",
        "ours": f"{r['table_ms']:.2f} ms",
        "official": "-" if official is None else f"{official:g} ms",
        "ratio": r["speedup_vs_official"],
        "target": DEGRADE_TARGET if official else None,
        "note": (f"JAX port of the official chain {r['chain_ms']:.1f} ms "
                 f"({r['speedup']:.0f}x)")})
  for r in result["input"]:
    if r.get("skipped"):
      lines.append({"workload": "input pipeline", "ours": "-", "official": "-",
                    "ratio": None, "target": None,
                    "note": f"skipped: {r['skipped']}"})
      continue
    lines.append({
        "workload": f"input {r['source']} {r['image_size']}px sync (1 core)",
        "ours": f"{r['img_per_s']:.0f} img/s", "official": "-", "ratio": None,
        "target": None,
        "note": ("" if r["train_step_img_per_s"] is None else
                 f"{r['ratio']:.0f}x the {r['train_step_case']} train step's "
                 f"{r['train_step_img_per_s']:.2f} img/s")})
  for line in lines:
    line["met"] = (None if line["ratio"] is None or line["target"] is None
                   else line["ratio"] >= line["target"])
  return lines


def format_table(lines: list[dict]) -> str:
  w = max(len(l["workload"]) for l in lines) if lines else 10
  header = (f"{'workload':<{w}} {'ours':>13} {'official':>12} {'ratio':>8} "
            f"{'target':>7} {'met':>4}  notes")
  out = [header, "-" * len(header)]
  for l in lines:
    met = "-" if l["met"] is None else ("yes" if l["met"] else "NO")
    out.append(f"{l['workload']:<{w}} {l['ours']:>13} {l['official']:>12} "
               f"{_x(l['ratio']):>8} {_x(l['target']):>7} {met:>4}  "
               f"{l['note']}")
  return "\n".join(out)


# -------------------------------------------------------------------- main ----


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="All benchmarks of the performance issue, one process.")
  parser.add_argument("--quick", action="store_true",
                      help="tiny networks and images: a smoke run of every "
                      "section (not a measurement).")
  parser.add_argument("--sections", nargs="+", choices=SECTIONS,
                      default=list(SECTIONS))
  parser.add_argument("--train-cases", nargs="+", choices=TRAIN_CASES,
                      default=list(TRAIN_CASES))
  parser.add_argument("--sample-cases", nargs="+", choices=list(SAMPLE_CASES),
                      default=list(SAMPLE_CASES))
  parser.add_argument("--dtypes", nargs="+", choices=sorted(train.DTYPES),
                      default=None, help="train-step compute dtypes (default: "
                      "float32 on CPU, float32 and bfloat16 elsewhere).")
  parser.add_argument("--remat", action="store_true",
                      help="also time every train case with train.remat "
                      "(blocks recomputed in the backward pass: less memory, "
                      "more compute).")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed runs after the warm-up (default 5; 2 with "
                      "--quick).")
  parser.add_argument("--sample-steps", type=int, default=None,
                      help="sampler steps timed per run, extrapolated to T "
                      "(default: 2 on CPU, all T elsewhere; 2 with --quick).")
  parser.add_argument("--input-seconds", type=float, default=5.0,
                      help="seconds of batches read per input-pipeline row.")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="device peak TFLOP/s for the utilisation (GPU "
                      "devices not in the built-in table).")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="JSON path (default benchmarks/results/"
                      "<backend>[-quick].json).")
  parser.add_argument("--reuse-freed-memory", action="store_true",
                      help="apply the CLI's config.reuse_freed_memory (one "
                      "malloc arena, no mmap; xla_cpu.reuse_freed_memory) "
                      "before the backend starts.")
  common.add_huge_pages_flag(parser)
  args = parser.parse_args(argv)
  # GLIBC_TUNABLES: glibc.malloc.hugetlb=1 after common.start's restart.
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  args.malloc = f"GLIBC_TUNABLES={tunables}" if tunables else "default"
  if args.reuse_freed_memory:  # before jax.default_backend() starts JAX
    skipped = xla_cpu.reuse_freed_memory()
    args.malloc += f" ({skipped})" if skipped else ", reuse freed memory"
  on_cpu = jax.default_backend() == "cpu"
  if args.repeats is None:
    args.repeats = 2 if args.quick else 5
  if args.dtypes is None:
    args.dtypes = ["float32"] if on_cpu else ["float32", "bfloat16"]
  if args.sample_steps is None and (on_cpu or args.quick):
    args.sample_steps = QUICK["sample_steps"] if args.quick else 2
  if args.repeats < 1 or (args.sample_steps or 1) < 1:
    parser.error("--repeats and --sample-steps must be >= 1.")
  if args.out is None:
    suffix = "-quick" if args.quick else ""
    args.out = RESULTS / f"{jax.default_backend()}{suffix}.json"
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the selected sections, prints the table, writes the JSON."""
  args = parse_args(argv)
  env = common.environment()
  print(f"jax {env['jax_version']} | backend {env['backend']} | "
        f"{env['device_kind']} x{env['device_count']} | {env['cpu_count']} "
        f"CPUs | load {common.fmt(env['load_average'] and env['load_average'][0], '.2f')}"
        f" | XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} | malloc "
        f"{args.malloc}" + (" | QUICK" if args.quick else ""), flush=True)
  start = time.perf_counter()
  result = {"benchmark": "run_all", **env, "quick": args.quick,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "malloc": args.malloc,
            "ynn_runs_convolutions": layers.ynn_runs_convolutions(),
            "repeats": args.repeats, "sample_steps": args.sample_steps,
            "seed": args.seed, "train": [], "convs": [], "sample": [],
            "degrade": [], "input": []}
  # --quick compiles without XLA's slow optimisation passes, as
  # benchmarks/train_step.py does.
  with train_step._fast_compiles(args.quick):  # pylint: disable=protected-access
    if "train" in args.sections:
      print("train step:", flush=True)
      result["train"] = run_train(args)
    if "convs" in args.sections:
      print("convolution floor of the train steps:", flush=True)
      result["convs"] = run_convs(args)
    if "sample" in args.sections:
      print("Algorithm 2:", flush=True)
      result["sample"] = run_sample(args)
    if "degrade" in args.sections:
      print("degradation:", flush=True)
      result["degrade"] = run_degrade(args)
  if "input" in args.sections:
    print("input pipeline:", flush=True)
    result["input"] = run_input(args, result["train"])
  result["load_average_end"] = list(os.getloadavg())
  result["wall_s"] = time.perf_counter() - start
  result["summary"] = summary(result)
  print()
  print(format_table(result["summary"]))
  print(f"ratio = ours / official speed (higher is faster); load average "
        f"{env['load_average'] and env['load_average'][0]:.2f} at the start, "
        f"{result['load_average_end'][0]:.2f} at the end; "
        f"{result['wall_s'] / 60:.1f} min.")
  peak = cpu_peak() if jax.default_backend() == "cpu" else None
  if peak:
    print(f"CPU peak {common.fmt(peak['peak_flops'] and peak['peak_flops'] / 1e9, '.1f')}"
          f" GFLOP/s = {peak['formula']}.")
  common.write_json(args.out, _jsonable(result))
  return result


def _jsonable(value):
  """Replaces non-finite floats (JSON has none) and numpy scalars."""
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.floating, np.integer)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


if __name__ == "__main__":
  common.start(sys.argv[1:])
  main(sys.argv[1:])
