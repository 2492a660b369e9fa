"""colddiff_jax.xla_cpu's malloc settings (reuse_freed_memory, transparent
huge pages), in fresh processes: they apply to the whole process, and only
before JAX's backend starts (huge pages: only from a process's start)."""

import os
import platform
import subprocess
import sys

import pytest

from colddiff_jax import xla_cpu
from conftest import REPO
from conftest import cli_env
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


# ------------------------------------------------- transparent huge pages ----

_HUGE_PAGES_APPLY = xla_cpu.huge_pages_unneeded({"JAX_PLATFORMS": "cpu"}) is None


def test_huge_pages_unneeded_says_why_and_the_tunable_is_appended(tmp_path,
                                                                  monkeypatch):
  setting = tmp_path / "enabled"
  monkeypatch.setattr(platform, "system", lambda: "Linux")
  monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
  monkeypatch.setattr(xla_cpu, "accelerator_plugin_installed", lambda environ=None: False)
  setting.write_text("always [madvise] never\n")
  assert xla_cpu.thp_mode(str(setting)) == "madvise"
  assert xla_cpu.huge_pages_unneeded({}, str(setting)) is None
  tuned = xla_cpu.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
                                   "HOME": "/root"})
  assert tuned == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" +
                   xla_cpu.HUGE_PAGES_TUNABLE, "HOME": "/root"}
  assert xla_cpu.with_huge_pages({}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  # Once restarted (or set by the user): nothing more to do, and no loop.
  assert xla_cpu.huge_pages_unneeded(tuned, str(setting)) == (
      "GLIBC_TUNABLES=glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  for text, mode in (("[always] madvise never", "always"),
                     ("always madvise [never]", "never")):
    setting.write_text(text)
    assert xla_cpu.huge_pages_unneeded({}, str(setting)) == (
        f"transparent huge pages are '{mode}' ({setting})")
  missing = str(tmp_path / "missing")
  assert xla_cpu.thp_mode(missing) is None
  assert xla_cpu.huge_pages_unneeded({}, missing) == f"{missing} unreadable"
  setting.write_text("always [madvise] never\n")
  monkeypatch.setattr(xla_cpu, "accelerator_plugin_installed", lambda environ=None: True)
  assert xla_cpu.huge_pages_unneeded({}, str(setting)) == (
      "an accelerator backend is installed")
  monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.31"))
  assert xla_cpu.huge_pages_unneeded({}, str(setting)) == (
      "glibc 2.31 has no glibc.malloc.hugetlb (2.35+)")
  monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
  assert xla_cpu.huge_pages_unneeded({}, str(setting)) == "not glibc"


# The page faults of one fresh 256 MiB malloc + memset.
_FRESH_FAULTS = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(256 << 20), 1, 256 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not _HUGE_PAGES_APPLY,
                    reason="needs glibc and transparent huge pages in 'madvise' mode")
def test_huge_pages_tunable_faults_memory_in_2_mib_pages():
  plain = int(_python(_FRESH_FAULTS, GLIBC_TUNABLES=""))
  huge = int(_python(_FRESH_FAULTS, GLIBC_TUNABLES=xla_cpu.HUGE_PAGES_TUNABLE))
  # 65536 pages of 4 KiB, or 128 of 2 MiB (more where the kernel had to
  # fall back to small pages for some of them).
  assert plain > 30000
  assert huge < plain / 8, (huge, plain)


_START = """
import os, sys
from benchmarks import common
common.start(sys.argv[1:])
print(repr(os.environ.get("GLIBC_TUNABLES", "")))
"""


def test_benchmark_scripts_restart_once_with_huge_pages_unless_told_not_to():
  env = {"GLIBC_TUNABLES": "", "JAX_PLATFORMS": "cpu"}
  assert _python(_START, **env).strip() == (
      repr(xla_cpu.HUGE_PAGES_TUNABLE) if _HUGE_PAGES_APPLY else "''")
  assert _python(_START, "--no-huge-pages", **env).strip() == "''"


def test_cli_restarts_itself_with_huge_pages_first():
  # A config error stops the run right after: the restart comes first, once.
  out = run_cli("--config=configs/quickstart.py:smoke", "--config.train.loss=l3",
                timeout=300)
  assert out.returncode != 0 and "train.loss='l3'" in out.stderr
  env = cli_env()
  reason = xla_cpu.huge_pages_unneeded(env)
  state = (f"GLIBC_TUNABLES={xla_cpu.with_huge_pages(env)['GLIBC_TUNABLES']}"
           if reason is None else reason)
  assert out.stderr.count("config.transparent_huge_pages:") == 1, out.stderr[-3000:]
  assert f"config.transparent_huge_pages: {state}." in out.stderr
  out = run_cli("--config=configs/quickstart.py:smoke", "--config.train.loss=l3",
                "--config.transparent_huge_pages=false", timeout=300)
  assert "config.transparent_huge_pages" not in out.stderr
