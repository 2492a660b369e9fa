"""Imports official PyTorch checkpoints, without torch.

  python -m colddiff_jax.convert --checkpoint=model.pt \
      --config=configs/<experiment>.py[:variant] [--config.a.b=v ...] \
      --workdir=DIR [--use_ema=false]

writes an orbax checkpoint into DIR that `python -m colddiff_jax.main
--mode=sample|evaluate|generate|restore|train --workdir=DIR` (same config)
uses directly: 'params' = the checkpoint's 'model' weights, 'ema' = its 'ema'
weights (with --use_ema=false the raw 'model' weights, in both), 'step' = its
step, a fresh Adam state (the official checkpoints hold none; the official
Trainer.load did not restore one either).

The official `Trainer.save()` writes `torch.save({'step', 'model', 'ema'})`:
a zip archive holding `<name>/data.pkl` (a pickle whose tensors refer to
storages by key) and one raw file per storage, `<name>/data/<key>`.
`load_torch_checkpoint` reads it with numpy and a restricted unpickler that
resolves only the handful of globals a state dict needs, so no code from the
file can run and torch is not required.

The `model`/`ema` entries are state dicts of the diffusion wrapper: network
weights under `denoise_fn.*` (`module.denoise_fn.*` when saved under
DataParallel) next to tensors that are not network weights (the blur kernels
`gaussian_kernels.<i>.weight`, schedule buffers, ...). `split_state_dict`
separates them.

`load_into(model, state)` then copies the weights into a `Unet` or `DDPMUnet`.
The PyTorch name of every NNX parameter is derived by walking the module tree:
each model class maps its attribute names to the official submodule names in a
`TORCH_NAMES` class attribute. Layouts are converted on the way:

* Conv2d weight (O, I/groups, kh, kw) -> HWIO kernel (kh, kw, I/groups, O).
* Linear weight (out, in) -> kernel (in, out).
* ConvTranspose2d weight (in, out, kh, kw) -> the (kh, kw, in, out) kernel of a
  dilated convolution, flipped in space (PyTorch's transposed convolution is
  the adjoint of its convolution; ours is a forward convolution over the
  stride-dilated input).
* Norm gains/offsets and biases are copied as they are.
* The attention heads need no reordering: both implementations split the
  qkv channels as (q|k|v, head, channel) in that order.

Any PyTorch key left unused, any NNX parameter without a key, or any shape
mismatch raises an `ArchitectureMismatch` naming the first one;
`convert_checkpoint` adds the config keys that describe the checkpoint's
network.
"""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import re
import sys
import zipfile
import zlib
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from flax import nnx

from colddiff_jax import checkpointing
from colddiff_jax import models
from colddiff_jax.models.ddpm_unet import DDPMUnet
from colddiff_jax.models.unet import Unet


class CheckpointError(ValueError):
  """An official checkpoint that cannot be read or does not fit the config."""


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The checkpoint's pickle refers to a global a state dict does not need."""


class ArchitectureMismatch(CheckpointError):
  """The checkpoint's network is not the network of the config.

  Attributes:
    first: the first mismatching key, with both shapes, in words.
  """

  def __init__(self, message: str, first: str):
    super().__init__(message)
    self.first = first


# ------------------------------------------------------------ zip + pickle --

# Storage classes torch pickles by name, and the numpy dtype of their bytes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
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
  if not isinstance(storage, np.ndarray):
    raise CheckpointError(f"tensor rebuilt from {type(storage).__name__}, "
                          f"not from a storage")
  size, stride = tuple(size), tuple(stride)
  if len(size) != len(stride):
    raise CheckpointError(
        f"checkpoint tensor with size {size} and stride {stride}")
  if any(s == 0 for s in size):
    return np.zeros(size, storage.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if storage_offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
    raise CheckpointError(
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


# Everything a saved state dict refers to. Anything else (os.system,
# builtins.eval, a module class, ...) is refused before it is resolved.
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
      raise UnsafeCheckpointError(
          f"the checkpoint's pickle refers to {module}.{name}, which a plain "
          f"state dict does not need; refusing to load it (nothing from the "
          f"file was run)") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise CheckpointError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    if key not in self._storages:
      raw = self._archive.read(f"{self._prefix}data/{key}")
      dtype = storage_type.dtype.newbyteorder(
          "<" if self._byteorder == "little" else ">")
      if len(raw) % dtype.itemsize:
        raise CheckpointError(f"storage {key} holds {len(raw)} bytes, not a "
                              f"multiple of {dtype.itemsize}")
      array = np.frombuffer(raw, dtype=dtype)
      if array.size != numel:
        raise CheckpointError(f"storage {key}: expected {numel} elements, the "
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


def _not_a_zip(path: pathlib.Path) -> CheckpointError:
  """The error for a file that is not a complete zip archive."""
  with open(path, "rb") as f:
    head = f.read(4)
  if not head:
    return CheckpointError(f"{path} is empty.")
  if head.startswith(b"PK"):
    # A zip archive's directory is at its end: a cut-off copy loses it.
    return CheckpointError(
        f"{path} is truncated or corrupt: it starts as a zip archive but its "
        f"end (the zip directory) is missing. Copy or download it again.")
  if head.startswith(b"\x80"):
    return CheckpointError(
        f"{path} is a legacy (torch < 1.6, non-zip) checkpoint, which is not "
        f"supported; re-save it with torch >= 1.6: "
        f"torch.save(torch.load(path), new_path).")
  return CheckpointError(f"{path} is not a torch checkpoint (not a zip "
                         f"archive).")


def load_torch_checkpoint(path) -> dict:
  """Reads a `torch.save` zip checkpoint into nested dicts of numpy arrays.

  Args:
    path: the `.pt` file (the zip format of torch >= 1.6).

  Returns:
    The pickled object with every tensor as a numpy array and every
    OrderedDict as a dict; for the official checkpoints
    {'step': int, 'model': {name: array}, 'ema': {name: array}}.

  Raises:
    FileNotFoundError: if there is no such file.
    CheckpointError: naming the file if it is not a zip checkpoint, is
      truncated or corrupt.
    UnsafeCheckpointError: naming the global if the pickle refers to anything
      but tensors and dicts (nothing from the file is run).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint {path} does not exist.")
  if not zipfile.is_zipfile(path):
    raise _not_a_zip(path)
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      pickles = [n for n in names
                 if n.endswith("/data.pkl") and n.count("/") == 1]
      if len(pickles) != 1:
        raise CheckpointError(f"expected one <name>/data.pkl, found "
                              f"{pickles}")
      prefix = pickles[0][:-len("data.pkl")]
      byteorder = (archive.read(prefix + "byteorder").decode().strip()
                   if prefix + "byteorder" in names else "little")
      with archive.open(pickles[0]) as f:
        obj = _CheckpointUnpickler(f, archive, prefix, byteorder).load()
  except UnsafeCheckpointError as e:
    raise UnsafeCheckpointError(f"{path}: {e}") from None
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, KeyError,
          zlib.error, CheckpointError, ValueError, TypeError,
          IndexError) as e:
    raise CheckpointError(
        f"{path} is truncated or corrupt, or not an official checkpoint: "
        f"{type(e).__name__}: {e}") from e
  return _plain(obj)


# ------------------------------------------------------------ state dicts --


def split_state_dict(
    state_dict: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Splits a wrapper state dict into network weights and the rest.

  Returns:
    (weights, ignored): `weights` are the `denoise_fn.*` tensors keyed as
    inside the network (a DataParallel `module.` prefix stripped);
    `ignored` lists every other key (blur kernels, schedule buffers, ...),
    without the `module.` prefix, in checkpoint order.

  Raises:
    CheckpointError: if there are no `denoise_fn.*` keys.
  """
  weights, ignored = {}, []
  for key, value in state_dict.items():
    if key.startswith("module."):
      key = key[len("module."):]
    if key.startswith("denoise_fn."):
      weights[key[len("denoise_fn."):]] = np.asarray(value)
    else:
      ignored.append(key)
  if not weights:
    raise CheckpointError(
        "state dict has no denoise_fn.* keys; keys start with "
        f"{sorted({k.split('.')[0] for k in state_dict})}")
  return weights, ignored


def denoise_fn_state(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The network weights of a wrapper state dict, keyed as in the network.

  Strips a DataParallel `module.` prefix, keeps `denoise_fn.*` without that
  prefix and drops everything else (blur kernels and other buffers).
  """
  return split_state_dict(state_dict)[0]


def summarize_keys(keys) -> str:
  """'gaussian_kernels.<i>.weight (x5), alphas' for a list of keys."""
  counts = collections.Counter(re.sub(r"(?<=\.)\d+(?=\.|$)", "<i>", k)
                               for k in keys)
  return ", ".join(k if n == 1 else f"{k} (x{n})" for k, n in counts.items())


def official_architecture(state: Mapping[str, np.ndarray],
                          image_size: int | None = None) -> dict[str, Any]:
  """The config keys that describe the network of an official state dict.

  Args:
    state: network weights as returned by `denoise_fn_state`.
    image_size: the image side; only needed to express the DDPM U-Net's
      attention levels as `model.attn_resolutions`.

  Returns:
    {'model.name': ..., 'data.channels': ..., ...} for every key the weights
    determine ({} if the network is neither official U-Net). Not stored in
    the weights: model.residual (official runs: False), model.dropout and
    data.image_size.
  """
  try:
    if "conv_in.weight" in state:
      return _ddpm_architecture(state, image_size)
    if "downs.0.0.ds_conv.weight" in state:
      return _unet_architecture(state)
  except (KeyError, IndexError, ValueError, ZeroDivisionError):
    pass  # An unusual layout: no hint rather than a wrong one.
  return {}


def _levels(state, prefix: str) -> list[int]:
  return sorted({int(k.split(".")[1]) for k in state if k.startswith(prefix)})


def _unet_architecture(state) -> dict[str, Any]:
  widths = [state[f"downs.{i}.0.net.3.weight"].shape[0]
            for i in _levels(state, "downs.")]
  with_time = "time_mlp.1.weight" in state
  # The time embedding is `dim` wide; without it, assume dim_mults[0] = 1.
  dim = state["time_mlp.3.weight"].shape[0] if with_time else widths[0]
  arch = {"model.name": "unet",
          "data.channels": state["downs.0.0.ds_conv.weight"].shape[0]}
  arch["model.dim"] = dim
  if all(w % dim == 0 for w in widths):
    arch["model.dim_mults"] = tuple(w // dim for w in widths)
  arch["model.with_time_emb"] = with_time
  if state["downs.0.2.fn.fn.to_qkv.weight"].shape[0] == 3 * 4 * 32:
    # Every official LinearAttention has 4 heads of 32 channels.
    arch["model.attn_heads"], arch["model.attn_dim_head"] = 4, 32
  return arch


def _ddpm_architecture(state, image_size) -> dict[str, Any]:
  ch, channels = state["conv_in.weight"].shape[:2]
  levels = _levels(state, "down.")
  arch = {"model.name": "ddpm", "data.channels": channels, "model.ch": ch,
          "model.ch_mult": tuple(
              state[f"down.{i}.block.0.conv1.weight"].shape[0] // ch
              for i in levels),
          "model.num_res_blocks": len(
              {k.split(".")[3] for k in state
               if k.startswith("down.0.block.")})}
  if image_size:
    arch["model.attn_resolutions"] = tuple(
        image_size // 2**i for i in levels
        if f"down.{i}.attn.0.q.weight" in state)
  if len(levels) > 1:  # Only down/upsamplers with convolutions have weights.
    arch["model.resamp_with_conv"] = "down.0.downsample.conv.weight" in state
  return arch


def _config_value(config, dotted: str):
  """config['a']['b'] for 'a.b' (tuples for sequences), None if absent."""
  node = config
  for part in dotted.split("."):
    if part not in node:
      return None
    node = node[part]
  return tuple(node) if isinstance(node, (list, tuple)) else node


def _flag(key: str, value) -> str:
  if isinstance(value, tuple):
    items = ",".join(str(v) for v in value) + ("," if len(value) == 1 else "")
    text = f"--config.{key}=({items})"
    return f"'{text}'"  # Parentheses need quoting in a shell.
  return f"--config.{key}={value}"


def architecture_hint(config, state: Mapping[str, np.ndarray]) -> str:
  """Says which network the checkpoint holds and which config keys differ."""
  arch = official_architecture(state, config.data.image_size)
  if not arch:
    return ("The checkpoint's network is neither official U-Net (no "
            "conv_in.weight or downs.0.0.ds_conv.weight).")
  kind = {"unet": "ConvNeXt U-Net", "ddpm": "DDPM U-Net"}[arch["model.name"]]
  described = ", ".join(f"{k}={v!r}" for k, v in arch.items())
  changes = [_flag(k, v) for k, v in arch.items()
             if _config_value(config, k) != v]
  text = f"The checkpoint holds a {kind}: {described}."
  if changes:
    text += " Change the config: " + " ".join(changes)
  return text


# ----------------------------------------------------------------- mapping --

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


def torch_shape(owner, leaf: str, shape, like=None) -> tuple[int, ...]:
  """The PyTorch shape of `owner.<leaf>` with NNX shape `shape`.

  `like` is the checkpoint's shape where known: a 1-D NNX parameter matches
  both (C,) and the NCHW-broadcastable (1, C, 1, 1) of the official norms.
  """
  shape = tuple(shape)
  if leaf != "kernel":
    if like is not None and len(like) == 4 and len(shape) == 1:
      return (1, shape[0], 1, 1)
    return shape
  if isinstance(owner, nnx.ConvTranspose):
    kh, kw, cin, cout = shape
    return (cin, cout, kh, kw)
  if isinstance(owner, nnx.Conv):
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  if isinstance(owner, nnx.Linear):
    return shape[::-1]
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


def _listing(items: list[str], sep: str, limit: int = 12) -> str:
  more = f"{sep}... ({len(items) - limit} more)" if len(items) > limit else ""
  return sep.join(items[:limit]) + more


def load_into(model: nnx.Module, state: Mapping[str, np.ndarray]) -> None:
  """Copies official network weights into `model` in place.

  Args:
    model: a `Unet` or `DDPMUnet` (concrete or from `nnx.eval_shape`) whose
      configuration matches the checkpoint.
    state: network weights keyed as inside `denoise_fn` (see
      `denoise_fn_state`).

  Raises:
    ArchitectureMismatch: naming the first mismatching key (in checkpoint
      order) with both shapes, then counting and listing (the first dozen of)
      the missing keys, unused keys and shape mismatches. Shapes are in the
      PyTorch layout. Nothing is loaded.
  """
  params = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(params))
  by_key = {key: (path, owner, leaf)
            for path, (key, owner, leaf) in torch_key_map(model).items()}
  unused, mismatched, updates = [], [], {}
  first = None
  for key, array in state.items():
    array = np.asarray(array)
    if key not in by_key:
      unused.append(key)
      first = first or (f"'{key}' {array.shape} is in the checkpoint but "
                        f"not in the model")
      continue
    path, owner, leaf = by_key[key]
    target = flat[path].get_value()
    expected = torch_shape(owner, leaf, target.shape, like=array.shape)
    if array.shape != expected:
      mismatched.append(f"{key}: checkpoint {array.shape}, model {expected}")
      first = first or (f"'{key}': checkpoint shape {array.shape}, the "
                        f"model expects {expected}")
      continue
    updates[path] = jnp.asarray(torch_layout(owner, leaf, array),
                                dtype=target.dtype)
  missing = [key for key in by_key if key not in state]
  if missing and first is None:
    path, owner, leaf = by_key[missing[0]]
    first = (f"'{missing[0]}' "
             f"{torch_shape(owner, leaf, flat[path].get_value().shape)} is in "
             f"the model but not in the checkpoint")
  if first is not None:
    lines = [f"first mismatch: {first}"]
    if missing:
      lines.append(f"missing from the checkpoint ({len(missing)}): "
                   f"{_listing(missing, ', ')}")
    if unused:
      lines.append(f"unused checkpoint keys ({len(unused)}): "
                   f"{_listing(unused, ', ')}")
    if mismatched:
      lines.append(f"shape mismatches ({len(mismatched)}, PyTorch layout): "
                   f"{_listing(mismatched, '; ')}")
    raise ArchitectureMismatch(
        "checkpoint does not fit the model:\n  " + "\n  ".join(lines), first)
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
  if which not in ("ema", "model"):
    raise ValueError(f"which={which!r} must be 'ema' or 'model'")
  ckpt = load_torch_checkpoint(path)
  _check_entries(ckpt, path, (which,))
  load_into(model, denoise_fn_state(ckpt[which]))
  return _step(ckpt, path)


# ------------------------------------------------------------- conversion --


def _check_entries(ckpt, path, needed) -> None:
  """Raises naming the file when an official Trainer.save() entry is absent."""
  if not isinstance(ckpt, dict):
    raise CheckpointError(
        f"{path} holds a {type(ckpt).__name__}, not the official "
        f"Trainer.save() dict {{'step', 'model', 'ema'}}.")
  keys = sorted(map(str, ckpt))
  bare = any(str(k).startswith(("denoise_fn.", "module.denoise_fn."))
             for k in ckpt)
  for entry in needed:
    if entry in ckpt and isinstance(ckpt[entry], dict):
      continue
    what = ("a bare state dict" if bare else
            f"the keys {keys[:8]}{' ...' if len(keys) > 8 else ''}")
    hint = (" Pass --use_ema=false to import the raw 'model' weights into "
            "both 'params' and 'ema'." if entry == "ema" and "model" in ckpt
            else "")
    raise CheckpointError(
        f"{path} has no '{entry}' state dict: it holds {what}, not the "
        f"official Trainer.save() dict {{'step', 'model', 'ema'}}.{hint}")


def _step(ckpt, path) -> int:
  step = ckpt.get("step", 0)
  if (isinstance(step, (bool, np.bool_))
      or not isinstance(step, (int, np.integer)) or step < 0):
    raise CheckpointError(f"{path}: 'step' is {step!r}, not an integer >= 0.")
  return int(step)


def _abstract_model(config) -> nnx.Module:
  """The config's network with shapes only: loading fills every parameter."""
  # Late import: train pulls in the training stack (clu, TensorFlow), which
  # the library functions above do not need.
  from colddiff_jax import train  # pylint: disable=g-import-not-at-top
  return nnx.eval_shape(lambda: models.build(
      config.model, config.data.channels, config.data.image_size,
      rngs=nnx.Rngs(config.seed), dtype=train.DTYPES[config.train.dtype]))


def _check_attention_split(config, weights, path) -> None:
  """Refuses a head split that fits the weights but is not the official one."""
  arch = official_architecture(weights)
  if (config.model.name == arch.get("model.name") == "unet"
      and (config.model.attn_heads, config.model.attn_dim_head) != (4, 32)):
    # 1 x 128 has the weight shapes of 4 x 32: it would load, then compute
    # something else. Every official LinearAttention is 4 heads x 32.
    raise CheckpointError(
        f"model.attn_heads={config.model.attn_heads}, model.attn_dim_head="
        f"{config.model.attn_dim_head}: the official U-Net's attention has 4 "
        f"heads of 32 channels, so {path} cannot be imported.\n"
        f"{architecture_hint(config, weights)}")


def _load_checked(model, config, weights, path, entry: str) -> None:
  """`load_into`, with an error that names the config keys to change."""
  try:
    load_into(model, weights)
  except ArchitectureMismatch as e:
    raise ArchitectureMismatch(
        f"{path} ('{entry}' weights) does not fit the network of the config "
        f"(model.name={config.model.name!r}, data.channels="
        f"{config.data.channels}): first mismatching key {e.first}.\n"
        f"{architecture_hint(config, weights)}\nDetails: {e}",
        e.first) from None


def _detached(tree):
  """The same arrays in new Variable objects (a model's State shares them)."""
  return jax.tree.map(lambda x: x, tree)


def _write_text(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def convert_checkpoint(config: ml_collections.ConfigDict, checkpoint,
                       workdir: str, *, use_ema: bool = True) -> dict:
  """Writes an official checkpoint as the orbax checkpoint of a run.

  Args:
    config: the experiment config the checkpoint is used with (its model,
      data.channels, data.image_size, optim and train keys shape the state).
    checkpoint: the official `model.pt` (Trainer.save() format).
    workdir: run directory; must not hold checkpoints yet.
    use_ema: True: 'ema' = the checkpoint's EMA weights (what every official
      evaluation used); False: 'ema' = its raw 'model' weights.

  Returns:
    {'step', 'num_tensors' (network tensors per state dict), 'num_params',
     'ignored' (non-network keys, e.g. the blur kernels), 'use_ema',
     'checkpoint_dir'}.

  Raises:
    FileExistsError: if `workdir` already holds checkpoints.
    FileNotFoundError, CheckpointError, UnsafeCheckpointError: for a missing,
      unreadable or unsafe file (see `load_torch_checkpoint`), or one without
      the 'model' / 'ema' state dicts.
    ArchitectureMismatch: naming the first mismatching key, both shapes and
      the config keys to change.
    ValueError: for invalid config keys (named).
  """
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    found = ", ".join(sorted(os.listdir(ckpt_dir))[:5])
    raise FileExistsError(
        f"{ckpt_dir} already holds checkpoints ({found}); importing into it "
        f"would mix two runs. Pass a new --workdir (or delete that folder).")
  from colddiff_jax import train  # pylint: disable=g-import-not-at-top
  train.check_config(config)
  raw = load_torch_checkpoint(checkpoint)
  entries = ("model", "ema") if use_ema else ("model",)
  _check_entries(raw, checkpoint, entries)
  step = _step(raw, checkpoint)
  weights, ignored = split_state_dict(raw["model"])
  layout = ("DataParallel 'module.' prefix"
            if any(k.startswith("module.") for k in raw["model"]) else "plain")
  logging.info("Read %s: step %d, %d network tensors per state dict (%s "
               "keys), entries %s.", checkpoint, step, len(weights), layout,
               sorted(map(str, raw)))
  if ignored:
    logging.info("Ignored %d non-network tensors per state dict: %s.",
                 len(ignored), summarize_keys(ignored))
  arch = official_architecture(weights, config.data.image_size)
  logging.info("Checkpoint network: %s.",
               ", ".join(f"{k}={v!r}" for k, v in arch.items()) or "unknown")

  _check_attention_split(config, weights, checkpoint)

  # One abstract network (no random initialisation) receives both weight
  # sets in turn; the state holds its own Variables (`_detached`), so loading
  # the second set does not change the first.
  model = _abstract_model(config)
  _load_checked(model, config, weights, checkpoint, "model")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = train.make_optimizer(config.optim)
  # One compiled program instead of one eager op per parameter shape.
  state = jax.jit(lambda p: train.create_state(
      config, nnx.merge(graphdef, p, rest), tx))(_detached(params))
  state["step"] = jnp.asarray(step, jnp.int32)
  if use_ema:
    ema_weights, _ = split_state_dict(raw["ema"])
    _load_checked(model, config, ema_weights, checkpoint, "ema")
    state["ema"] = _detached(nnx.state(model, nnx.Param))
  num_params = models.count_params(model)
  del raw

  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep)
  try:
    # An empty data state: the training iterator starts afresh.
    ckpt.save(step, state, {})
  finally:
    ckpt.close()
  _write_text(os.path.join(workdir, "config.json"),
              config.to_json_best_effort(indent=2))
  logging.info(
      "Wrote step %d to %s: params = 'model' weights, ema = '%s' weights "
      "(%d parameters), fresh Adam state.", step, ckpt.directory,
      "ema" if use_ema else "model", num_params)
  if config.model.name == "unet" and config.model.residual:
    logging.warning("model.residual=True: the checkpoint does not store it; "
                    "every official run used False.")
  return {"step": step, "num_tensors": len(weights), "num_params": num_params,
          "ignored": ignored, "use_ema": use_ema,
          "checkpoint_dir": ckpt.directory}


# -------------------------------------------------------------------- CLI --


def _define_flags() -> None:
  """Flags of the CLI (defined only when run: main.py defines --config too)."""
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (configs/<name>.py[:variant]) "
      "whose model matches the checkpoint.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Official checkpoint (model.pt).")
  flags.DEFINE_string("workdir", None,
                      "Run directory to create (default: config.workdir).")
  flags.DEFINE_bool("use_ema", True,
                    "true: inference uses the checkpoint's EMA weights; "
                    "false: its raw 'model' weights.")
  flags.mark_flags_as_required(["config", "checkpoint"])


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO lines of orbax's checkpoint internals (dozens per save)."""

  def filter(self, record):
    # Standard levels: absl's logging.INFO is 0, not the record's 20.
    return (record.levelno > logging.logging.INFO
            or "/orbax/" not in record.pathname)


def main(argv) -> None:
  """CLI entry: converts --checkpoint for --config into --workdir."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  for handler in logging.logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or config.workdir
  try:
    convert_checkpoint(config, flags.FLAGS.checkpoint, workdir,
                       use_ema=flags.FLAGS.use_ema)
  except (ValueError, FileExistsError, FileNotFoundError,
          pickle.UnpicklingError) as e:
    # Expected failures end with their message, not a traceback.
    sys.exit(f"colddiff_jax.convert: error: {e}")


if __name__ == "__main__":
  # Config files import `configs.default`: make the repository root
  # importable wherever the command is run from (as main.py does).
  _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main)
