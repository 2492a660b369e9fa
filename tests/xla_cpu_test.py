"""colddiff_jax.xla_cpu.reuse_freed_memory, in fresh processes (malloc
settings apply to the whole process, and only before JAX's backend starts)."""

import os
import platform
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


def _python(code, *args, **env):
  """Runs `python -c code args` from the repository root in a fresh process
  (JAX_PLATFORMS unset unless given); returns its stdout."""
  env = {**{k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"},
         "PYTHONPATH": str(REPO), **env}
  out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  return out.stdout


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc settings")
def test_reuse_freed_memory_reuses_pages_instead_of_faulting():
  reason, faults = _python(_PROBE, "reuse").split()
  assert reason == "None"
  # 256 MiB are 65536 pages of 4 KiB: faulted in again without the setting,
  # taken from the kept heap with it.
  assert int(faults) < 1000
  reason, faults = _python(_PROBE, "off").split()
  assert int(faults) > 30000


def test_reuse_freed_memory_only_before_the_backend_and_only_for_cpu():
  call = ("from colddiff_jax import xla_cpu\n"
          "print(repr(xla_cpu.reuse_freed_memory()))")
  started = _python("import jax; jax.devices()\n" + call)
  assert "JAX's backend has already started" in started
  accelerator = _python(call, JAX_PLATFORMS="cuda")
  assert "an accelerator backend is installed" in accelerator


def test_cli_applies_it_first_when_the_config_asks():
  # A config error stops the run right after: the setting comes first.
  out = run_cli("--config=configs/quickstart.py:smoke",
                "--config.reuse_freed_memory=true", "--config.train.loss=l3",
                timeout=300)
  assert out.returncode != 0 and "train.loss='l3'" in out.stderr
  applied = ("config.reuse_freed_memory: malloc keeps freed memory for reuse"
             if platform.libc_ver()[0] == "glibc" else
             "config.reuse_freed_memory: not applied")
  assert applied in out.stderr, out.stderr[-3000:]
  out = run_cli("--config=configs/quickstart.py:smoke", "--config.train.loss=l3",
                timeout=300)
  assert "config.reuse_freed_memory" not in out.stderr
