"""Test setup: 8 fake CPU devices (set before JAX initialises) and fixture access."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
