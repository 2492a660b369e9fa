"""Pieces every benchmark script shares: run environment, number cells, JSON."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform

import jax


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
  }


def fmt(value, spec: str) -> str:
  """A table cell: '-' for a missing value."""
  return "-" if value is None else format(value, spec)


def write_json(path: pathlib.Path, result: dict) -> None:
  """Writes the result JSON (creating the folder) and says where."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {path}")
