"""Input pipeline throughput: images/s the grain pipeline delivers.

What is measured. `input_pipeline.train_dataset` exactly as training builds
it (decode, official transform, float conversion, batching, the grain
iterator), for these sources:

* celeba_aligned  1024 random 178x218 JPEGs (the size of tfds celeb_a /
                  CelebA aligned), written to a temporary image folder, read
                  with the data config of configs/celeba_blur.py: S = 128,
                  'aug1' (resize to 143 square, random 128 crop, flip);
* celeba_hq       1024 random 128x128 JPEGs (the files of the CelebA-HQ-128
                  folder the CelebA experiments use), same config;
* afhq            256 random 512x512 JPEGs (AFHQ v1's size), the data config
                  of configs/afhq_noise.py (S = 128, 'aug1');
* mnist_embedded  the 5,000 embedded digits with the data config of
                  configs/mnist_blur.py (S = 32, 'aug1': 28 -> 35, crop, flip).
JPEGs are written at quality 95 from smooth random images (noise would make
them unrealistically large and slow to decode). grain's shuffle pays a fixed
setup cost per epoch (about 55 ms here), which a folder of a few hundred
files would overstate; the real folders hold 14,600-30,000.

Each source runs under several worker settings (--settings):
  sync    data.num_workers = 0, data.prefetch = 0: one thread, no overlap;
          the images/s of one CPU core;
  threads num_workers = 0, prefetch = 2: two threads in the training process;
  w1, w2  num_workers = 1 or 2 grain worker processes, prefetch = 2 each.

How it is timed. The pipeline is built and its first batch read (startup_s:
listing files, spawning workers); then batches are read for --seconds and
img/s = images read / wall time. Batch 32 (the official micro-batch). On a
machine shared with other work the wall-clock rates move with the load, so
the in-process settings also report img/s per CPU-second of this process
(img_per_cpu_s, threads included): what one dedicated core delivers. For
worker settings cpu_s is the training process's own share only (the cost of
receiving batches), and img_per_cpu_s is not given.

Compared with. The images/s the train step consumes on the same machine
(benchmarks/results/train_step.json: mnist_blur and celeba_blur, read if
present): the issue asks the pipeline to exceed it. The 'sync' rate is the
worst case (one core, no overlap), so it is the one compared.

TPU host estimate. One worker process, given a core of its own, delivers
about the 'sync' img_per_cpu_s (a worker adds only a shared-memory copy per
batch). A TPU host's chips consume
chips x MFU x peak FLOP/s / (FLOPs per image), with FLOPs per image of the
celeba_blur train step from train_step.json (XLA's count: forward, backward
and optimizer, per image). The script prints the workers that rate needs for
the assumptions --tpu-peak-tflops (default 459, TPU v5p bf16), --tpu-mfu
(0.4) and --chips-per-host (4). This is arithmetic on CPU measurements, not
a TPU measurement.

Run (about 3 minutes on 2 CPU cores):
  python -m benchmarks.input_pipeline
  python -m benchmarks.input_pipeline --quick        # tiny smoke run
  python -m benchmarks.input_pipeline --sources celeba_hq --settings sync w1 w2 w4
Results are printed as a table and written to benchmarks/results/
input_pipeline.json (--out to change), with the environment and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import pathlib
import tempfile
import time
from typing import Sequence

import numpy as np
from PIL import Image

from benchmarks import common
from colddiff_jax import input_pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "input_pipeline.json"
TRAIN_STEP_JSON = REPO / "benchmarks" / "results" / "train_step.json"
BATCH = 32


@dataclasses.dataclass(frozen=True)
class Source:
  config: str                  # configs/<config>.py gives data.*
  files: int                   # JPEGs written (0: not a folder source)
  width: int = 0
  height: int = 0
  train_step_case: str | None = None  # train_step.json case it feeds


SOURCES = {
    "celeba_aligned": Source("celeba_blur", 1024, 178, 218, "celeba_blur"),
    "celeba_hq": Source("celeba_blur", 1024, 128, 128, "celeba_blur"),
    "afhq": Source("afhq_noise", 256, 512, 512),
    "mnist_embedded": Source("mnist_blur", 0, train_step_case="mnist_blur"),
}
SETTINGS = {"sync": (0, 0), "threads": (0, 2), "w1": (1, 2), "w2": (2, 2),
            "w4": (4, 2), "w8": (8, 2)}
DEFAULT_SETTINGS = ("sync", "threads", "w1", "w2")
QUICK_FILES, QUICK_SECONDS = 16, 0.5


def write_jpegs(folder: pathlib.Path, n: int, width: int, height: int,
                seed: int = 0) -> None:
  """n smooth random RGB JPEGs (quality 95): upsampled 8x8 colour noise."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    noise = rng.integers(-8, 9, (height, width, 3))
    pixels = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=95)


def data_config(source: Source, folder: str | None, num_workers: int, prefetch: int):
  config = importlib.import_module(f"configs.{source.config}").get_config()
  data = config.data
  if source.config == "mnist_blur":
    data.name = "mnist_embedded"
  else:
    data.folder = folder
    data.test_fraction = 0.0  # read every file as training data
  data.num_workers, data.prefetch = num_workers, prefetch
  return data


def time_pipeline(data, seconds: float, batch: int) -> dict:
  """startup_s (build + first batch), img/s over the next `seconds`, and the
  CPU time of this process (all its threads) meanwhile."""
  tic = time.perf_counter()
  iterator = iter(input_pipeline.train_dataset(data, batch, seed=0))
  first = next(iterator)
  startup = time.perf_counter() - tic
  shape = list(first["image"].shape)
  images, tic, cpu = 0, time.perf_counter(), time.process_time()
  while True:
    next(iterator)
    images += batch
    elapsed = time.perf_counter() - tic
    if elapsed >= seconds:
      break
  cpu = time.process_time() - cpu
  iterator.close()
  in_process = data.num_workers == 0
  return {"startup_s": startup, "images": images, "seconds": elapsed,
          "img_per_s": images / elapsed, "cpu_s": cpu,
          "img_per_cpu_s": images / cpu if in_process and cpu > 0 else None,
          "batch_shape": shape}


def train_step_rates(path: pathlib.Path) -> dict:
  """{case: (img/s, FLOPs per image)} from a train_step.json, {} if absent."""
  if not path.exists():
    return {}
  data = json.loads(path.read_text())
  if data.get("quick"):
    return {}
  return {r["case"]: (r["img_per_s"], (r.get("flops_per_step") or 0)
                      / r["images_per_step"] or None)
          for r in data["results"]}


def tpu_estimate(per_worker: float | None, flops_per_image: float | None,
                 args: argparse.Namespace) -> dict | None:
  """Images/s a TPU host's chips consume and the workers that takes."""
  if not per_worker or not flops_per_image:
    return None
  per_chip = args.tpu_mfu * args.tpu_peak_tflops * 1e12 / flops_per_image
  host = per_chip * args.chips_per_host
  return {"assumed_peak_tflops": args.tpu_peak_tflops, "assumed_mfu": args.tpu_mfu,
          "chips_per_host": args.chips_per_host,
          "flops_per_image": flops_per_image, "host_img_per_s": host,
          "per_worker_img_per_s": per_worker,
          "workers_needed": math.ceil(host / per_worker)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help=f"smoke run: {QUICK_FILES} small files per source, "
                           f"{QUICK_SECONDS} s per measurement")
  parser.add_argument("--sources", nargs="+", choices=list(SOURCES),
                      default=list(SOURCES))
  parser.add_argument("--settings", nargs="+", choices=list(SETTINGS),
                      default=list(DEFAULT_SETTINGS))
  parser.add_argument("--seconds", type=float, default=None,
                      help="timed reading per measurement (default 5)")
  parser.add_argument("--tpu-peak-tflops", type=float, default=459.0)
  parser.add_argument("--tpu-mfu", type=float, default=0.4)
  parser.add_argument("--chips-per-host", type=int, default=4)
  parser.add_argument("--train-step-json", type=pathlib.Path, default=TRAIN_STEP_JSON)
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  seconds = args.seconds or (QUICK_SECONDS if args.quick else 5.0)
  consumed = train_step_rates(args.train_step_json)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.sources:
      source = SOURCES[name]
      folder = None
      if source.files:
        folder = pathlib.Path(tmp) / name
        n = QUICK_FILES if args.quick else source.files
        size = ((min(source.width, 64), min(source.height, 64)) if args.quick
                else (source.width, source.height))
        write_jpegs(folder, n, *size)
      for setting in args.settings:
        workers, prefetch = SETTINGS[setting]
        data = data_config(source, str(folder) if folder else None, workers, prefetch)
        if args.quick:
          data.image_size = min(data.image_size, 32)
        row = {"source": name, "setting": setting, "num_workers": workers,
               "prefetch": prefetch, "config": source.config,
               "image_size": data.image_size, "transform": data.train_transform,
               "file_size": [source.width, source.height] if source.files else None}
        row |= time_pipeline(data, seconds, BATCH)
        step = consumed.get(source.train_step_case)
        row["train_step_img_per_s"] = step[0] if step else None
        row["ratio"] = row["img_per_s"] / step[0] if step else None
        rows.append(row)
        print(f"  {name:15s} {setting:8s} {row['img_per_s']:9.1f} img/s", flush=True)

  print()
  print(f"{'source':15s} {'setting':8s} {'workers':>7s} {'startup_s':>9s} "
        f"{'img/s':>9s} {'img/cpu-s':>9s} {'step img/s':>10s} {'ratio':>8s}")
  for r in rows:
    print(f"{r['source']:15s} {r['setting']:8s} {r['num_workers']:7d} "
          f"{r['startup_s']:9.2f} {r['img_per_s']:9.1f} "
          f"{common.fmt(r['img_per_cpu_s'], '9.1f')} "
          f"{common.fmt(r['train_step_img_per_s'], '10.2f')} "
          f"{common.fmt(r['ratio'], '8.0f')}")

  # The target: even one core without overlap ('sync') outruns the
  # train step. Conclusive only for full-size runs with train-step figures.
  targets = []
  for case in sorted({SOURCES[s].train_step_case for s in args.sources} - {None}):
    sync = [r for r in rows if SOURCES[r["source"]].train_step_case == case
            and r["setting"] == "sync" and r["ratio"] is not None]
    if sync:
      worst = min(sync, key=lambda r: r["ratio"])
      targets.append({"case": case, "source": worst["source"],
                      "ratio": worst["ratio"], "met": worst["ratio"] > 1.0,
                      "conclusive": not args.quick})
      print(f"Target {case}: pipeline ('sync', {worst['source']}) "
            f"{worst['img_per_s']:.1f} img/s vs train step "
            f"{worst['train_step_img_per_s']:.2f} img/s: "
            f"{'met' if worst['ratio'] > 1 else 'NOT met'} "
            f"({worst['ratio']:.0f}x)")

  estimates = {}
  flops = (consumed.get("celeba_blur") or (None, None))[1]
  for name in ("celeba_hq", "celeba_aligned", "afhq"):
    per_worker = next((r["img_per_cpu_s"] for r in rows if r["source"] == name
                       and r["setting"] == "sync"), None)
    est = tpu_estimate(per_worker, flops, args)
    if est:
      estimates[name] = est
      print(f"TPU host ({args.chips_per_host} chips x {args.tpu_peak_tflops:g} "
            f"TFLOP/s x MFU {args.tpu_mfu:g}) on {name}: about "
            f"{est['host_img_per_s']:.0f} img/s -> {est['workers_needed']} "
            f"worker(s) at {per_worker:.0f} img/s each.")

  result = {"benchmark": "input_pipeline"} | common.environment() | {
      "quick": args.quick, "seconds": seconds, "batch": BATCH,
      "results": rows, "targets": targets, "tpu_host_estimates": estimates}
  common.write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
