"""Pieces every benchmark script shares: run environment, number cells, JSON."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Sequence

import jax

from colddiff_jax import xla_cpu

#: The flag with which a benchmark script keeps malloc's default pages.
NO_HUGE_PAGES = "--no-huge-pages"


def add_huge_pages_flag(parser) -> None:
  """Adds NO_HUGE_PAGES to a benchmark script's argparse parser."""
  parser.add_argument(
      NO_HUGE_PAGES, action="store_true",
      help="keep malloc's default 4 KiB pages. Otherwise the script first "
      "restarts itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as the CLI "
      "does (config.transparent_huge_pages), where that changes anything.")


def start(argv: Sequence[str]) -> None:
  """First thing a benchmark script does as a program: measure what the CLI
  runs, so restart with transparent huge pages (xla_cpu) unless argv has
  NO_HUGE_PAGES. Not called when a test imports the script."""
  if NO_HUGE_PAGES not in argv:
    xla_cpu.restart_with_huge_pages()


def environment() -> dict:
  """JAX version, backend, device, CPU count, load and date of this run."""
  device = jax.devices()[0]
  try:
    load = list(os.getloadavg())
  except OSError:
    load = None
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "jax_version": jax.__version__,
      "jaxlib_version": jax.lib.__version__,
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "load_average": load,
      "python": platform.python_version(),
      "machine": platform.machine(),
      # glibc.malloc.hugetlb=1 where the script restarted with huge pages.
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
  }


def xla_flops(compiled) -> float | None:
  """XLA's flop count of a compiled executable (None if not reported)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # backend without it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  flops = float(analysis["flops"])
  return flops if flops > 0 else None


def time_compiled(compiled, args_: Sequence, repeats: int,
                  donate_first: bool = False) -> dict:
  """Warm-up, then `repeats` timed runs: medians of wall and CPU time.

  With `donate_first`, each call gets the first output of the previous one as
  its first argument (a donated train state).
  """
  args_ = list(args_)
  out = jax.block_until_ready(compiled(*args_))
  walls, cpus = [], []
  for _ in range(repeats):
    if donate_first:
      args_[0] = out[0]
    start, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(compiled(*args_))
    walls.append(time.perf_counter() - start)
    cpus.append(time.process_time() - cpu)
  return {"median_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
          "times_s": walls, "runs": repeats, "out": out}


def fmt(value, spec: str) -> str:
  """A table cell: '-' for a missing value."""
  return "-" if value is None else format(value, spec)


def write_json(path: pathlib.Path, result: dict) -> None:
  """Writes the result JSON (creating the folder) and says where."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {path}")
