"""Device mesh and shardings for data-parallel training (no pmap).

One mesh axis, 'data'. Parameters, optimizer state and EMA are replicated;
batches are split along their batch axis. On several hosts every process feeds
its own slice of the global batch and `global_batch` stitches the slices into
one global `jax.Array`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(mesh_config=None, devices=None) -> Mesh:
  """The 1-D ('data',) mesh over `mesh_config.data` devices (-1 = all)."""
  devices = list(jax.devices() if devices is None else devices)
  size = -1 if mesh_config is None else int(mesh_config.data)
  if size == -1:
    size = len(devices)
  if not 1 <= size <= len(devices):
    raise ValueError(
        f"mesh.data={size} must be -1 (all) or between 1 and the "
        f"{len(devices)} available devices.")
  return Mesh(np.asarray(devices[:size]), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of anything every device holds whole (state, scalars)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Sharding that splits axis `batch_axis` of an array across 'data'."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA))


def check_global_batch(batch_size: int, mesh: Mesh, key: str = "train.batch_size") -> None:
  """Raises ValueError unless the global batch splits evenly over devices/hosts."""
  devices = mesh.devices.size
  if batch_size % devices:
    raise ValueError(
        f"{key}={batch_size} must be divisible by the {devices} devices of the "
        f"mesh (each device gets an equal share); use a multiple of {devices} "
        f"or set mesh.data to a divisor of {batch_size}.")
  if batch_size % jax.process_count():
    raise ValueError(
        f"{key}={batch_size} must be divisible by the {jax.process_count()} "
        f"processes.")


def process_batch_size(global_batch_size: int) -> int:
  """Rows of the global batch this process loads."""
  return global_batch_size // jax.process_count()


def global_batch(local: np.ndarray, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
  """Builds the global array from this process's slice of the batch."""
  return jax.make_array_from_process_local_data(
      batch_sharding(mesh, batch_axis), local)


def process_rows(global_rows: np.ndarray) -> np.ndarray:
  """This process's slice of a host array every process holds whole.

  The mesh lists devices process by process, so process p feeds the p-th of
  `process_count` equal blocks of the batch axis (the layout
  `global_batch` stitches back together).
  """
  rows = len(global_rows) // jax.process_count()
  start = jax.process_index() * rows
  return global_rows[start:start + rows]


def pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
  """`rows` [n, ...] padded to [size, ...] by repeating the last row (callers
  drop the padding from their results)."""
  rows = np.asarray(rows)
  if len(rows) == size:
    return rows
  return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)])


def shard_rows(rows: np.ndarray, mesh: Mesh, size: int | None = None) -> jax.Array:
  """A host batch every process holds whole (padded to `size` rows) as a
  global array split over `mesh`."""
  rows = np.asarray(rows) if size is None else pad_rows(rows, size)
  return global_batch(process_rows(rows), mesh)


def replicate(tree, mesh: Mesh):
  """Puts small host values (PRNG keys, aux draws) on every device of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def gather(x: jax.Array) -> np.ndarray:
  """The whole value of a (possibly multi-process) array, on every host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
