"""XLA:CPU settings that must be in place before JAX's CPU backend starts.

Imported by the package's `__init__`, so any `import colddiff_jax...` (the
CLI, the tests, the benchmarks, a notebook) applies them before the first JAX
computation. No JAX import at import time: the settings are environment variables
that the backend reads once, at start-up. Two malloc settings are applied by
the CLI and the benchmark scripts instead: `restart_with_huge_pages` (glibc
reads its tunables only when a process starts, so the program re-executes
itself) and `reuse_freed_memory` (which must precede the backend's threads).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Mapping

#: The XLA:CPU flag that routes convolutions and matmuls to YNNPACK (its
#: default) or, empty, to XLA's Eigen kernels.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def prefer_eigen_on_cpu() -> bool:
  """Appends `--xla_cpu_experimental_ynn_fusion_type=` to XLA_FLAGS.

  XLA:CPU hands dense convolutions and matmuls to YNNPACK by default. On
  these networks Eigen, XLA's other CPU backend, is faster: YNNPACK runs the
  kernel gradient of a convolution (a convolution with a 32x32 "kernel") ~10x
  slower, and measured over a whole ConvNeXt U-Net training step, a DDPM U-Net
  forward pass and a 128x128 ConvNeXt forward pass, the Eigen build was
  faster in each (the quickstart trains at 7.6 instead of 5.2 steps/s). The
  flag takes effect only if the CPU backend has not started yet, and a user's
  own setting of it is left alone. Called when the package is imported.

  Returns:
    True if the flag was added.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if YNN_FLAG.lstrip("-") in flags:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()
  return True


def _glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library on Linux with glibc, else None (the
  malloc settings here are glibc's)."""
  libc, version = platform.libc_ver()
  if platform.system() != "Linux" or libc != "glibc":
    return None
  major, minor = version.split(".")[:2]
  return int(major), int(minor)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def accelerator_plugin_installed(environ: Mapping[str, str] | None = None) -> bool:
  """Whether JAX will likely start a GPU/TPU backend, judged without starting one.

  JAX_PLATFORMS (in `environ`, default os.environ) decides when set;
  otherwise an installed PJRT plugin (the `jax_plugins` entry points or
  namespace package of jax[cuda*] / jax[rocm]) or libtpu means an accelerator.
  """
  platforms = (os.environ if environ is None else environ).get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() != "cpu"
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  return any(importlib.util.find_spec(name) is not None
             for name in ("jax_plugins", "libtpu"))


def reuse_freed_memory() -> str | None:
  """Makes glibc's malloc keep and reuse freed memory; None if applied, else why not.

  Each run of a compiled XLA:CPU program allocates its scratch memory (GBs for
  the full-size train steps) from the backend's worker threads, and glibc
  serves such blocks as fresh `mmap`ed pages and unmaps them when freed: every
  step page-faults and zero-fills its whole working set again (~816k faults
  and 3 s of kernel time per CelebA-128 step at batch 8). One arena, no
  `mmap` and no trimming (`mallopt`, the run-time form of MALLOC_ARENA_MAX=1
  MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_) make the steps reuse the same
  pages: the CelebA-128 step took 12.4 instead of 14.0 s, the MNIST step
  ~3 % less (a 2-core AMD EPYC). Costs: compiling takes ~25 % longer, small
  networks train slower (the quickstart 10-30 %: its threads contend for the
  one arena), and memory freed by the process stays with it. On a 2-core
  Intel Xeon (AVX-512) all three full-size train steps ran 13-27 % slower
  with it, so it is an option (off by default), not a rule.

  Only threads that allocate after the call use the one arena, so it must
  run before JAX's backend starts (the CLI calls it first thing when
  `config.reuse_freed_memory` is set). Nothing is done for accelerator
  backends (device memory is not malloc's) or without glibc.
  """
  if _glibc_version() is None:
    return "not glibc"
  if "jax" in sys.modules:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      return "JAX's backend has already started"
  if accelerator_plugin_installed():
    return "an accelerator backend is installed"
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # A trim threshold of -1 reads as SIZE_MAX: never return the heap's top.
  for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                       (_M_TRIM_THRESHOLD, -1)):
    if mallopt(param, value) != 1:
      return f"mallopt({param}, {value}) failed"
  return None


#: The glibc tunable that makes malloc ask for transparent huge pages
#: (madvise(MADV_HUGEPAGE) on the memory it maps; glibc >= 2.35).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
#: Where Linux says when it backs memory with transparent huge pages.
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(setting: str = THP_SETTING) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise' or
  'never': the bracketed word of `setting`), None where it cannot be read."""
  try:
    with open(setting) as f:
      words = f.read().split()
  except OSError:
    return None
  return next((w[1:-1] for w in words if w.startswith("[")), None)


def huge_pages_unneeded(environ: Mapping[str, str],
                        setting: str = THP_SETTING) -> str | None:
  """Why restarting with HUGE_PAGES_TUNABLE would change nothing; None if it would.

  Each run of a compiled XLA:CPU program takes its scratch memory (GBs for
  the full-size train steps) as fresh `mmap`ed pages from malloc, and the
  kernel faults them in 4 KiB at a time, every step. With the tunable, malloc
  asks for 2 MiB pages: 512x fewer faults. Measured on a 2-core Intel Xeon
  (AVX-512) in interleaved runs: train steps MNIST -3 to -9 %, CIFAR-10
  -2.5 %, CelebA-128 -6.5 %; on a 2-core AMD EPYC the step did not move.
  The tunable is read once, when a process starts, hence the restart
  (`restart_with_huge_pages`). It matters only where the kernel gives huge
  pages on request ('madvise' mode), and only for the CPU backend (device
  memory is not malloc's).
  """
  version = _glibc_version()
  if version is None:
    return "not glibc"
  if version < (2, 35):
    return (f"glibc {'.'.join(map(str, version))} has no "
            "glibc.malloc.hugetlb (2.35+)")
  if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
    return f"GLIBC_TUNABLES={environ['GLIBC_TUNABLES']}"
  mode = thp_mode(setting)
  if mode != "madvise":
    return (f"transparent huge pages are '{mode}' ({setting})" if mode else
            f"{setting} unreadable")
  if accelerator_plugin_installed(environ):
    return "an accelerator backend is installed"
  return None


def with_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
  """`environ` with HUGE_PAGES_TUNABLE added to GLIBC_TUNABLES."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  return {**environ,
          "GLIBC_TUNABLES": ":".join(filter(None, (tunables, HUGE_PAGES_TUNABLE)))}


def restart_with_huge_pages() -> str:
  """Re-executes this program with malloc asking for transparent huge pages.

  The same interpreter, options and arguments (`sys.orig_argv`), the same
  process id, with HUGE_PAGES_TUNABLE added to the environment. Does not
  return when it restarts; otherwise returns why it did not
  (`huge_pages_unneeded`), which in the restarted process names the tunable.
  Call it first thing in a program's main, before any work worth keeping.
  """
  reason = huge_pages_unneeded(os.environ)
  if reason is not None:
    return reason
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
            with_huge_pages(os.environ))
