"""Loads the official PyTorch checkpoints into the NNX networks, without torch.

The official `Trainer.save()` writes `torch.save({'step', 'model', 'ema'})`:
a zip archive holding `<name>/data.pkl` (a pickle whose tensors refer to
storages by key) and one raw little-endian file per storage,
`<name>/data/<key>`. `load_torch_checkpoint` reads it with numpy and a
restricted unpickler that resolves only the handful of globals a state dict
needs, so no arbitrary code from the file can run and torch is not required.

The `model`/`ema` entries are state dicts of the diffusion wrapper: network
weights under `denoise_fn.*` (`module.denoise_fn.*` when saved under
DataParallel) next to tensors that are not network weights (the blur kernels
`gaussian_kernels.<i>.weight`, ...). `denoise_fn_state` keeps the former.

`load_into(model, state)` then copies them into a `Unet` or `DDPMUnet`. The
PyTorch name of every NNX parameter is derived by walking the module tree:
each model class maps its attribute names to the official submodule names in a
`TORCH_NAMES` class attribute. Layouts are converted on the way:

* Conv2d weight (O, I/groups, kh, kw) -> HWIO kernel (kh, kw, I/groups, O).
* Linear weight (out, in) -> kernel (in, out).
* ConvTranspose2d weight (in, out, kh, kw) -> the (kh, kw, in, out) kernel of a
  dilated convolution, flipped in space (PyTorch's transposed convolution is
  the adjoint of its convolution; ours is a forward convolution over the
  stride-dilated input).
* Norm gains/offsets and biases are copied as they are.

Any PyTorch key left unused, any NNX parameter without a key, or any shape
mismatch raises a ValueError listing them.
"""

from __future__ import annotations

import collections
import pathlib
import pickle
import zipfile
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from colddiff_jax.models.ddpm_unet import DDPMUnet
from colddiff_jax.models.unet import Unet

# Storage classes torch pickles by name, and the numpy dtype of their bytes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  """Stands in for a `torch.<X>Storage` class: only its dtype matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride,
                       requires_grad=False, backward_hooks=None,
                       metadata=None):
  """numpy twin of torch._utils._rebuild_tensor_v2: a strided view, copied."""
  del requires_grad, backward_hooks, metadata
  size, stride = tuple(size), tuple(stride)
  if len(size) != len(stride):
    raise ValueError(f"checkpoint tensor with size {size} and stride {stride}")
  if any(s == 0 for s in size):
    return np.zeros(size, storage.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if storage_offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
    raise ValueError(
        f"checkpoint tensor (offset {storage_offset}, size {size}, stride "
        f"{stride}) reads past its storage of {storage.size} elements")
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size,
      strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  """numpy twin of torch._utils._rebuild_parameter: the data itself."""
  del requires_grad, backward_hooks
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _CheckpointUnpickler(pickle.Unpickler):
  """Unpickler that only knows state-dict globals and reads storages lazily."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str,
               byteorder: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._byteorder = byteorder
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"checkpoint refers to {module}.{name}, which a plain state dict "
          f"does not need; refusing to load it") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    if key not in self._storages:
      raw = self._archive.read(f"{self._prefix}data/{key}")
      dtype = storage_type.dtype.newbyteorder(
          "<" if self._byteorder == "little" else ">")
      array = np.frombuffer(raw, dtype=dtype)
      if array.size != numel:
        raise ValueError(f"storage {key}: expected {numel} elements, the "
                         f"archive holds {array.size}")
      self._storages[key] = array.astype(storage_type.dtype, copy=False)
    return self._storages[key]


def _plain(obj):
  """OrderedDicts -> dicts, recursively (drops the state dicts' _metadata)."""
  if isinstance(obj, Mapping):
    return {k: _plain(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_plain(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_plain(v) for v in obj)
  return obj


def load_torch_checkpoint(path) -> dict:
  """Reads a `torch.save` zip checkpoint into nested dicts of numpy arrays.

  Args:
    path: the `.pt` file (the zip format of torch >= 1.6).

  Returns:
    The pickled object with every tensor as a numpy array and every
    OrderedDict as a dict; for the official checkpoints
    {'step': int, 'model': {name: array}, 'ema': {name: array}}.

  Raises:
    ValueError: if the file is not a zip checkpoint or is inconsistent.
    pickle.UnpicklingError: if it refers to anything but tensors and dicts.
  """
  path = pathlib.Path(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a zip-format torch checkpoint (legacy "
                     f"pre-1.6 checkpoints are not supported)")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist()
               if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one <name>/data.pkl, found "
                       f"{pickles}")
    prefix = pickles[0][:-len("data.pkl")]
    names = set(archive.namelist())
    byteorder = (archive.read(prefix + "byteorder").decode().strip()
                 if prefix + "byteorder" in names else "little")
    with archive.open(pickles[0]) as f:
      obj = _CheckpointUnpickler(f, archive, prefix, byteorder).load()
  return _plain(obj)


def denoise_fn_state(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The network weights of a wrapper state dict, keyed as in the network.

  Strips a DataParallel `module.` prefix, keeps `denoise_fn.*` without that
  prefix and drops everything else (blur kernels and other buffers).
  """
  out = {}
  for key, value in state_dict.items():
    if key.startswith("module."):
      key = key[len("module."):]
    if key.startswith("denoise_fn."):
      out[key[len("denoise_fn."):]] = np.asarray(value)
  if not out:
    raise ValueError("state dict has no denoise_fn.* keys; keys start with "
                     f"{sorted({k.split('.')[0] for k in state_dict})}")
  return out


# Leaf renames for the flax layers the models use directly.
_FLAX_TORCH_NAMES = {
    nnx.Conv: {"kernel": "weight", "bias": "bias"},
    nnx.ConvTranspose: {"kernel": "weight", "bias": "bias"},
    nnx.Linear: {"kernel": "weight", "bias": "bias"},
}


def _torch_names(obj) -> Mapping[str, str]:
  for cls, names in _FLAX_TORCH_NAMES.items():
    if isinstance(obj, cls):
      return names
  names = getattr(type(obj), "TORCH_NAMES", None)
  if names is None:
    raise TypeError(f"{type(obj).__name__} declares no TORCH_NAMES; cannot "
                    f"map its parameters to PyTorch names")
  return names


def torch_layout(owner, leaf: str, array: np.ndarray) -> np.ndarray:
  """Converts a PyTorch parameter to the layout of `owner.<leaf>`."""
  if leaf != "kernel":
    if array.ndim == 4 and array.shape[0] == 1 and array.shape[2:] == (1, 1):
      # Official LayerNorm gains/offsets are stored broadcastable to NCHW.
      return array.reshape(array.shape[1])
    return array
  if isinstance(owner, nnx.ConvTranspose):
    # (in, out, kh, kw) -> (kh, kw, in, out), flipped: the equivalent forward
    # convolution over the dilated input uses the kernel reversed in space.
    return np.ascontiguousarray(array.transpose(2, 3, 0, 1)[::-1, ::-1])
  if isinstance(owner, nnx.Conv):
    return array.transpose(2, 3, 1, 0)
  if isinstance(owner, nnx.Linear):
    return array.T
  raise TypeError(f"no layout rule for the kernel of {type(owner).__name__}")


def torch_key_map(model: nnx.Module) -> dict[tuple, tuple[str, Any, str]]:
  """Maps each NNX parameter path to (PyTorch key, owning layer, leaf name)."""
  out = {}
  for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    obj, parts = model, []
    for seg in path[:-1]:
      if isinstance(obj, nnx.List):
        parts.append(str(seg))
        obj = obj[int(seg)]
      else:
        parts.append(_torch_names(obj).get(seg, seg))
        obj = getattr(obj, seg)
    leaf = path[-1]
    parts.append(_torch_names(obj).get(leaf, leaf))
    out[tuple(path)] = (".".join(parts), obj, leaf)
  return out


def load_into(model: nnx.Module, state: Mapping[str, np.ndarray]) -> None:
  """Copies official network weights into `model` in place.

  Args:
    model: a `Unet` or `DDPMUnet` whose configuration matches the checkpoint.
    state: network weights keyed as inside `denoise_fn` (see
      `denoise_fn_state`).

  Raises:
    ValueError: listing every missing key, unused key and shape mismatch.
  """
  params = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(params))
  missing, mismatched, used = [], [], set()
  updates = {}
  for path, (key, owner, leaf) in torch_key_map(model).items():
    if key not in state:
      missing.append(key)
      continue
    used.add(key)
    value = torch_layout(owner, leaf, np.asarray(state[key]))
    target = flat[path].get_value()
    if value.shape != tuple(target.shape):
      mismatched.append(f"{key}: checkpoint {np.shape(state[key])} -> "
                        f"{value.shape}, model {tuple(target.shape)}")
      continue
    updates[path] = jnp.asarray(value, dtype=target.dtype)
  unused = sorted(set(state) - used)
  if missing or unused or mismatched:
    lines = []
    if missing:
      lines.append(f"missing from the checkpoint ({len(missing)}): "
                   f"{', '.join(missing)}")
    if unused:
      lines.append(f"unused checkpoint keys ({len(unused)}): "
                   f"{', '.join(unused)}")
    if mismatched:
      lines.append(f"shape mismatches ({len(mismatched)}): "
                   f"{'; '.join(mismatched)}")
    raise ValueError("checkpoint does not fit the model:\n  "
                     + "\n  ".join(lines))
  for path, value in updates.items():
    flat[path].set_value(value)
  nnx.update(model, params)


def unet_params_from_torch(state: Mapping[str, np.ndarray], model) -> None:
  """`load_into` for a ConvNeXt `Unet` (kept for symmetry with DDPM)."""
  if not isinstance(model, Unet):
    raise TypeError(f"expected a Unet, got {type(model).__name__}")
  load_into(model, state)


def ddpm_params_from_torch(state: Mapping[str, np.ndarray], model) -> None:
  """`load_into` for a `DDPMUnet`."""
  if not isinstance(model, DDPMUnet):
    raise TypeError(f"expected a DDPMUnet, got {type(model).__name__}")
  load_into(model, state)


def load_official(model: nnx.Module, path, which: str = "ema") -> int:
  """Loads the `which` ('ema' or 'model') weights of an official checkpoint.

  Returns:
    The checkpoint's training step.
  """
  ckpt = load_torch_checkpoint(path)
  if which not in ("ema", "model"):
    raise ValueError(f"which={which!r} must be 'ema' or 'model'")
  load_into(model, denoise_fn_state(ckpt[which]))
  return int(ckpt.get("step", 0))
