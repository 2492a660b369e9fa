"""colddiff_jax.xla_cpu.reuse_freed_memory, in fresh processes (malloc
settings apply to the whole process, and only before JAX's backend starts)."""

import subprocess
import sys

import pytest

from conftest import REPO
from conftest import run_cli

# Allocates (malloc + memset), frees and allocates again 256 MiB from the
# main thread, counting the page faults of the second allocation. (Not with
# numpy: it asks for transparent huge pages, which hide the faults.)
_PROBE = """
import ctypes, resource, sys
from colddiff_jax import xla_cpu
reason = xla_cpu.reuse_freed_memory() if sys.argv[1] == "reuse" else "off"
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def touch():
  p = libc.malloc(256 << 20)
  ctypes.memset(p, 1, 256 << 20)
  return p
libc.free(touch())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(reason, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(mode, code=_PROBE, **env):
  out = subprocess.run([sys.executable, "-c", code, mode], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env={**_env(), **env})
  assert out.returncode == 0, out.stderr
  return out.stdout.split()


def _env():
  import os  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)
  env["PYTHONPATH"] = str(REPO)
  return env


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="glibc malloc settings")
def test_reuse_freed_memory_reuses_pages_instead_of_faulting():
  reason, faults = _probe("reuse")
  assert reason == "None"
  # 256 MiB are 65536 pages of 4 KiB: faulted in again without the setting,
  # taken from the kept heap with it.
  assert int(faults) < 1000
  reason, faults = _probe("off")
  assert int(faults) > 30000


def test_reuse_freed_memory_only_before_the_backend_and_only_for_cpu():
  started = ("import jax; jax.devices()\n"
             "from colddiff_jax import xla_cpu\n"
             "print(repr(xla_cpu.reuse_freed_memory()))")
  out = subprocess.run([sys.executable, "-c", started], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env=_env())
  assert "JAX's backend has already started" in out.stdout, out.stderr
  accelerator = ("from colddiff_jax import xla_cpu\n"
                 "print(repr(xla_cpu.reuse_freed_memory()))")
  out = subprocess.run([sys.executable, "-c", accelerator], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env={**_env(), "JAX_PLATFORMS": "cuda"})
  assert "an accelerator backend is installed" in out.stdout, out.stderr


def test_cli_applies_it_first_when_the_config_asks():
  # A config error stops the run right after: the setting comes first.
  out = run_cli("--config=configs/quickstart.py:smoke",
                "--config.reuse_freed_memory=true", "--config.train.loss=l3",
                timeout=300)
  assert out.returncode != 0 and "train.loss='l3'" in out.stderr
  applied = ("config.reuse_freed_memory: malloc keeps freed memory for reuse"
             if sys.platform.startswith("linux") else
             "config.reuse_freed_memory: not applied")
  assert applied in out.stderr, out.stderr[-3000:]
  out = run_cli("--config=configs/quickstart.py:smoke", "--config.train.loss=l3",
                timeout=300)
  assert "config.reuse_freed_memory" not in out.stderr
