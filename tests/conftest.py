"""Test setup: 8 fake CPU devices (set before JAX initialises) and fixture access."""

import os
import pathlib
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(
    os.environ.get("COLDDIFF_FIXTURES",
                   REPO.parent / "shared" / "fixtures" / "official"))


def load_fixture(name: str) -> dict:
  """Loads an official fixture .npz as a dict of numpy arrays.

  The fixtures live in ../shared/fixtures/official beside the checkout (override
  with COLDDIFF_FIXTURES). A missing file is an error, not a skip: parity with
  the official code is what these tests prove.
  """
  path = FIXTURES / name
  if not path.exists():
    raise FileNotFoundError(
        f"official fixture {path} not found; set COLDDIFF_FIXTURES to the "
        f"folder holding the official .npz files")
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture
def fixture():
  return load_fixture


_CACHE_FLAGS = {
    "jax_disable_most_optimizations": True,
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
}


@pytest.fixture(scope="session")
def _jax_cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def fast_compiles(_jax_cache_dir):
  """Compile time dominates these tests: skip XLA's slow optimisation passes and
  share compiled programs between the runs (and CLI subprocesses) of all such
  modules through one persistent compilation cache for the session."""
  cache = _jax_cache_dir
  flags = dict(_CACHE_FLAGS, jax_compilation_cache_dir=cache)
  previous = {}
  for k in flags:
    try:
      previous[k] = jax.config.read(k)
    except AttributeError:  # flags with a context manager are read as attributes
      previous[k] = getattr(jax.config, k)
  for k, v in flags.items():
    jax.config.update(k, v)
  os.environ["COLDDIFF_TEST_JAX_CACHE"] = cache
  try:
    yield
  finally:
    for k, v in previous.items():
      jax.config.update(k, v)


def run_cli(*args, module="colddiff_jax.main", timeout=600):
  """Runs `python -m <module> args...` from the repository root with the test
  devices and, inside a `fast_compiles` module, its compilation cache."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=cli_env(),
                        capture_output=True, text=True, timeout=timeout)


def cli_env(devices: int = 8) -> dict:
  """Environment of a CLI subprocess: `devices` fake CPU devices and, inside a
  `fast_compiles` module, the same compiler settings and cache as the tests
  (so its programs, and their float results, are the tests' own)."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  if "COLDDIFF_TEST_JAX_CACHE" in os.environ:
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ["COLDDIFF_TEST_JAX_CACHE"]
    env.update({k.upper(): str(v) for k, v in _CACHE_FLAGS.items()})
  return env
