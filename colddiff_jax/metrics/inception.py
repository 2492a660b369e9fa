"""Inception-v3 of TF-FID / pytorch-fid in Flax NNX, and its weights without torch.

FID is only comparable across papers when it is computed with the network of
the original TensorFlow FID code (the 2015-12-05 Inception graph), which
pytorch-fid ships as `pt_inception-2015-12-05-6726825d.pth` and the official
Cold Diffusion code uses (spec §5.4). That network is torchvision's Inception-v3
with three patches (pytorch-fid's `FIDInceptionA/C/E`):

* the average-pool branch of the A, C and first E blocks does not count the
  zero padding (TensorFlow's average pooling);
* the pool branch of the last E block (`Mixed_7c`) max-pools instead;
* the features are the 2048-d global average pool ("pool3") before the
  classifier.

`InceptionV3` reproduces pytorch-fid's `InceptionV3(output_blocks=[3])`
forward: it takes images in [0, 1] (NHWC, 3 channels, any size), resizes them
bilinearly to 299x299 exactly like `F.interpolate(..., mode='bilinear',
align_corners=False)` (no antialiasing), maps them to [-1, 1] with 2x - 1 and
returns the [B, 2048] pool3 features. Every conv is torchvision's
`BasicConv2d`: a bias-free conv, BatchNorm in inference mode (eps 1e-3) and a
ReLU. Convolutions run at `Precision.HIGHEST` by default so that TPUs/GPUs do
not silently drop to bf16/tf32 matmuls.

The modules keep PyTorch's attribute names and layouts (OIHW conv kernels,
BatchNorm `weight`/`bias`/`running_mean`/`running_var`), so the NNX path of
every variable, joined by dots, is its pytorch-fid state-dict key (e.g.
`Mixed_5b.branch1x1.conv.weight`, `Conv2d_1a_3x3.bn.running_var`), and the
arrays are copied as they are. A fresh `InceptionV3()` holds shape-only
placeholders; `load_inception` fills them from the weights file.

Weights come from a local file, read without torch (`read_state_dict`):

* the pytorch-fid `.pth` itself, in torch's legacy (pre-1.6, non-zip)
  serialisation, which is what the 2019 file uses, or in the zip format;
* an `.npz` holding the same keys and arrays in PyTorch layout, as written by
  the conversion command

      python -m colddiff_jax.metrics.inception \\
          --weights pt_inception-2015-12-05-6726825d.pth \\
          --output inception_fid.npz

Both torch formats are read with `colddiff_jax.convert`'s restricted
unpickler, which resolves only the globals a state dict needs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import os
import pathlib
import pickle
import struct
import sys
import zipfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from colddiff_jax import convert

# The network's input size (pytorch-fid resizes every image to it).
INPUT_SIZE = 299
FEATURES = 2048
# First 8 hex digits of the SHA-256 of the pytorch-fid weights (the suffix of
# its file name, which torch.hub checks on download).
PYTORCH_FID_SHA256_PREFIX = "6726825d"

# Keys of the pytorch-fid file that the pool3 features do not use: the
# 1008-class classifier (TF's graph has 1008 outputs), and what a file saved
# from a torchvision model may add (BatchNorm step counters).
_CLASSIFIER = "fc."
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_TF_CLASSES = 1008

# The variables loaded from the weights: parameters and BatchNorm statistics.
_WEIGHTS = (nnx.Param, nnx.BatchStat)


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def _placeholder(*shape: int) -> jax.ShapeDtypeStruct:
  """Shape of a weight that `load_into` fills from the weights file."""
  return jax.ShapeDtypeStruct(shape, jnp.float32)


# ------------------------------------------------------------------ layers --
#
# The layers keep PyTorch's names and layouts (OIHW kernels, BatchNorm
# `weight`/`bias`/`running_mean`/`running_var`), so that the NNX path of every
# variable, joined by dots, is its pytorch-fid state-dict key. They are created
# as placeholders (shapes only): the network only ever runs with the TF-FID
# weights, which `load_into` copies in.


class Conv2d(nnx.Module):
  """Bias-free `torch.nn.Conv2d` on NHWC inputs with an OIHW `weight`."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size,
               stride=1, padding=0, precision=None):
    kh, kw = _pair(kernel_size)
    ph, pw = _pair(padding)
    self.weight = nnx.Param(_placeholder(out_channels, in_channels, kh, kw))
    self.stride = _pair(stride)
    self.padding = ((ph, ph), (pw, pw))
    self.precision = precision

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, self.weight[...], self.stride, self.padding,
        dimension_numbers=("NHWC", "OIHW", "NHWC"), precision=self.precision)


class BatchNorm2d(nnx.Module):
  """`torch.nn.BatchNorm2d` in inference mode (running statistics)."""

  def __init__(self, channels: int, eps: float):
    self.weight = nnx.Param(_placeholder(channels))
    self.bias = nnx.Param(_placeholder(channels))
    self.running_mean = nnx.BatchStat(_placeholder(channels))
    self.running_var = nnx.BatchStat(_placeholder(channels))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
    return (x - self.running_mean[...]) * scale + self.bias[...]


class BasicConv2d(nnx.Module):
  """torchvision's BasicConv2d: bias-free conv, BatchNorm (eps 1e-3), ReLU."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size,
               *, stride=1, padding=0, precision=None):
    self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                       precision)
    self.bn = BatchNorm2d(out_channels, eps=1e-3)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def _max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
  """3x3 max pool (padding, when any, never wins: it is -inf)."""
  return nnx.max_pool(x, (3, 3), strides=(stride, stride),
                      padding=((padding, padding), (padding, padding)))


def _tf_avg_pool(x: jax.Array) -> jax.Array:
  """3x3/1 average pool that, like TensorFlow's, ignores the zero padding
  (pytorch-fid's `count_include_pad=False` patch)."""
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


class FIDInceptionA(nnx.Module):
  """Mixed_5b/c/d: 1x1, 5x5, double 3x3 and TF-average-pool branches."""

  def __init__(self, in_channels: int, pool_features: int, *, precision=None):
    conv = functools.partial(BasicConv2d, precision=precision)
    self.branch1x1 = conv(in_channels, 64, 1)
    self.branch5x5_1 = conv(in_channels, 48, 1)
    self.branch5x5_2 = conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = conv(in_channels, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
    self.branch_pool = conv(in_channels, pool_features, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_tf_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a (grid reduction 35 -> 17); unpatched torchvision block."""

  def __init__(self, in_channels: int, *, precision=None):
    conv = functools.partial(BasicConv2d, precision=precision)
    self.branch3x3 = conv(in_channels, 384, 3, stride=2)
    self.branch3x3dbl_1 = conv(in_channels, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class FIDInceptionC(nnx.Module):
  """Mixed_6b..6e: factorised 7x7 branches and a TF-average-pool branch."""

  def __init__(self, in_channels: int, channels_7x7: int, *, precision=None):
    conv = functools.partial(BasicConv2d, precision=precision)
    c7 = channels_7x7
    self.branch1x1 = conv(in_channels, 192, 1)
    self.branch7x7_1 = conv(in_channels, c7, 1)
    self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = conv(in_channels, c7, 1)
    self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = conv(in_channels, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(_tf_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a (grid reduction 17 -> 8); unpatched torchvision block."""

  def __init__(self, in_channels: int, *, precision=None):
    conv = functools.partial(BasicConv2d, precision=precision)
    self.branch3x3_1 = conv(in_channels, 192, 1)
    self.branch3x3_2 = conv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = conv(in_channels, 192, 1)
    self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                  self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class FIDInceptionE(nnx.Module):
  """Mixed_7b (`pool='avg'`, TF average pool) and Mixed_7c (`pool='max'`:
  the TF-FID graph max-pools here, pytorch-fid's FIDInceptionE_2)."""

  def __init__(self, in_channels: int, pool: str, *, precision=None):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool={pool!r} must be 'avg' or 'max'")
    conv = functools.partial(BasicConv2d, precision=precision)
    self.pool = pool
    self.branch1x1 = conv(in_channels, 320, 1)
    self.branch3x3_1 = conv(in_channels, 384, 1)
    self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = conv(in_channels, 448, 1)
    self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = conv(in_channels, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], -1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)],
                         -1)
    pooled = _max_pool(x, 1, 1) if self.pool == "max" else _tf_avg_pool(x)
    bp = self.branch_pool(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's 1-D linear interpolation with
  align_corners=False: source x = (i + 0.5)·n_in/n_out - 0.5, clamped at 0,
  between pixels floor(x) and floor(x)+1 (clamped to the last pixel)."""
  dst = np.arange(n_out)
  src = np.maximum((dst + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  weights = np.zeros((n_out, n_in))
  weights[dst, lo] += 1.0 - frac
  weights[dst, hi] += frac
  return weights.astype(np.float32)


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE,
                    precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """`F.interpolate(x, (size, size), mode='bilinear', align_corners=False)`
  for NHWC `x`, as two matmuls (no antialiasing when shrinking, unlike
  `jax.image.resize`)."""
  _, h, w, _ = x.shape
  if h != size:
    x = jnp.einsum("oh,bhwc->bowc", _interpolation_matrix(h, size), x,
                   precision=precision)
  if w != size:
    x = jnp.einsum("pw,bhwc->bhpc", _interpolation_matrix(w, size), x,
                   precision=precision)
  return x


class InceptionV3(nnx.Module):
  """pytorch-fid's `InceptionV3([3])` with the FID weights: [0,1] -> pool3."""

  def __init__(self, *, precision=jax.lax.Precision.HIGHEST):
    kw = dict(precision=precision)
    self.precision = precision
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
    self.Mixed_5b = FIDInceptionA(192, 32, **kw)
    self.Mixed_5c = FIDInceptionA(256, 64, **kw)
    self.Mixed_5d = FIDInceptionA(288, 64, **kw)
    self.Mixed_6a = InceptionB(288, **kw)
    self.Mixed_6b = FIDInceptionC(768, 128, **kw)
    self.Mixed_6c = FIDInceptionC(768, 160, **kw)
    self.Mixed_6d = FIDInceptionC(768, 160, **kw)
    self.Mixed_6e = FIDInceptionC(768, 192, **kw)
    self.Mixed_7a = InceptionD(768, **kw)
    self.Mixed_7b = FIDInceptionE(1280, "avg", **kw)
    self.Mixed_7c = FIDInceptionE(2048, "max", **kw)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Pool3 features [B, 2048] of images [B, H, W, 3] in [0, 1]."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"InceptionV3 expects [B, H, W, 3] images, got shape "
                       f"{images.shape}")
    x = resize_bilinear(images.astype(jnp.float32), INPUT_SIZE, self.precision)
    x = 2.0 * x - 1.0  # pytorch-fid's normalize_input: [0, 1] -> [-1, 1]
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool(x, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool(x, 2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                  self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                  self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten


# ------------------------------------------------------------ key mapping --


def _weight_paths(model: nnx.Module) -> dict[str, tuple]:
  """PyTorch key -> NNX path of every parameter and running statistic."""
  return {".".join(str(p) for p in path): tuple(path)
          for path, _ in nnx.to_flat_state(nnx.state(model, _WEIGHTS))}


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Every key the pool3 features need, with its shape (PyTorch layout)."""
  flat = nnx.to_flat_state(nnx.state(InceptionV3(), _WEIGHTS))
  return {".".join(str(p) for p in path): tuple(v.get_value().shape)
          for path, v in flat}


def check_state_dict(state: Mapping[str, np.ndarray], source: str,
                     expected: Mapping[str, tuple] | None = None
                     ) -> dict[str, np.ndarray]:
  """The entries of `state` the features need, after checking them all.

  Args:
    state: a pytorch-fid Inception state dict (PyTorch key -> array).
    source: the file it came from, named in errors.
    expected: `expected_shapes()` (computed when None).

  Returns:
    {key: float32 array} for exactly the keys of `expected`.

  Raises:
    ValueError: naming `source`, the first missing key, the first shape
      mismatch (file vs expected shape) and the first unknown key, with
      counts; or saying that the file holds torchvision's ImageNet Inception
      rather than the TF-FID weights.
  """
  expected = expected_shapes() if expected is None else expected
  fc = state.get(_CLASSIFIER + "weight")
  if any(k.startswith("AuxLogits.") for k in state) or (
      fc is not None and np.shape(fc)[0] != _TF_CLASSES):
    raise ValueError(
        f"{source} looks like torchvision's ImageNet Inception-v3 (it has "
        f"AuxLogits or a {np.shape(fc)[0] if fc is not None else '?'}-class "
        f"classifier), not the TF-FID weights pytorch-fid uses (1008 classes, "
        f"no aux head); FID computed with it would not be comparable. Use "
        f"pt_inception-2015-12-05-{PYTORCH_FID_SHA256_PREFIX}.pth.")
  missing = [k for k in expected if k not in state]
  mismatched = [f"{k}: file {tuple(np.shape(state[k]))}, expected "
                f"{tuple(expected[k])}" for k in expected
                if k in state and tuple(np.shape(state[k])) != tuple(expected[k])]
  unknown = [k for k in state if k not in expected
             and not k.startswith(_CLASSIFIER)
             and not k.endswith(_IGNORED_SUFFIXES)]
  if missing or mismatched or unknown:
    lines = []
    if missing:
      lines.append(f"{len(missing)} missing key(s), the first is {missing[0]!r}")
    if mismatched:
      lines.append(f"{len(mismatched)} shape mismatch(es), the first is "
                   f"{mismatched[0]}")
    if unknown:
      lines.append(f"{len(unknown)} unknown key(s), the first is {unknown[0]!r}")
    raise ValueError(
        f"{source} is not a pytorch-fid Inception state dict "
        f"(pt_inception-2015-12-05-{PYTORCH_FID_SHA256_PREFIX}.pth or an .npz "
        f"converted from it): " + "; ".join(lines) + ".")
  return {k: np.asarray(state[k], np.float32) for k in expected}


def load_into(model: InceptionV3, state: Mapping[str, np.ndarray],
              source: str = "state dict") -> None:
  """Copies pytorch-fid weights into `model` (placeholders or not) in place.

  Raises the ValueError of `check_state_dict` before touching the model.
  """
  variables = nnx.state(model, _WEIGHTS)
  flat = dict(nnx.to_flat_state(variables))
  paths = _weight_paths(model)
  expected = {k: tuple(flat[p].get_value().shape) for k, p in paths.items()}
  state = check_state_dict(state, source, expected)
  for key, path in paths.items():
    flat[path].set_value(jnp.asarray(state[key]))
  nnx.update(model, variables)


def load_inception(path, precision=jax.lax.Precision.HIGHEST) -> InceptionV3:
  """The FID Inception-v3 with its weights read from `path` (.pth or .npz)."""
  model = InceptionV3(precision=precision)
  load_into(model, read_state_dict(path), str(path))
  return model


# ------------------------------------------------------ reading weight files --

# torch's legacy serialisation: pickled magic number, protocol version and
# system info, the pickled object whose storages are persistent ids, the
# pickled list of storage keys, then per key an int64 element count followed
# by the raw little-endian elements.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class _LegacyStorage:
  """A storage of a legacy file; its bytes come after the pickle."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, int(numel)
    self.array: np.ndarray | None = None

  def resolve(self) -> np.ndarray:
    if self.array is None:
      raise ValueError(f"storage {self.key} is used by a tensor but its data "
                       f"is not in the file")
    return self.array


class _StorageView:
  """A view [offset, offset + numel) into a `_LegacyStorage` (old files)."""

  def __init__(self, base: _LegacyStorage, offset: int, numel: int):
    self.base, self.offset, self.numel = base, int(offset), int(numel)

  def resolve(self) -> np.ndarray:
    array = self.base.resolve()
    if self.offset + self.numel > array.size:
      raise ValueError(f"storage view past the end of storage {self.base.key}")
    return array[self.offset:self.offset + self.numel]


class _LazyTensor:
  """A tensor whose storage is read after the pickle; see `_materialize`."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset = storage, offset
    self.size, self.stride = tuple(size), tuple(stride)

  def resolve(self) -> np.ndarray:
    return convert._rebuild_tensor_v2(self.storage.resolve(), self.offset,
                                      self.size, self.stride)


def _lazy_rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """Stands in for torch._utils._rebuild_tensor(_v2) while unpickling."""
  del unused  # requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, storage_offset, size, stride)


def _ascii(value):
  """Keys pickled by Python 2 arrive as bytes."""
  return value.decode("ascii") if isinstance(value, bytes) else value


class _LegacyUnpickler(convert._CheckpointUnpickler):  # pylint: disable=protected-access
  """convert's restricted unpickler, with legacy-format storages.

  Only the globals a state dict needs resolve (inherited `find_class`); the
  tensor rebuilders are swapped for lazy ones because a legacy file stores
  the tensor data after the pickle.
  """

  def __init__(self, file, storages: dict[str, _LegacyStorage]):
    super().__init__(file, archive=None, prefix="", byteorder="little")
    self.storages = storages

  def find_class(self, module: str, name: str):
    if module == "torch._utils" and name in ("_rebuild_tensor",
                                             "_rebuild_tensor_v2"):
      return _lazy_rebuild_tensor
    return super().find_class(module, name)

  def persistent_load(self, pid):
    if isinstance(pid, tuple) and pid and _ascii(pid[0]) == "module":
      raise pickle.UnpicklingError(
          "the file pickles a whole torch.nn.Module, not a state dict; save "
          "model.state_dict() instead")
    if not (isinstance(pid, tuple) and len(pid) == 6
            and _ascii(pid[0]) == "storage"
            and isinstance(pid[1], convert._StorageType)):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel, view = pid
    key = _ascii(key)
    storage = self.storages.get(key)
    if storage is None:
      storage = self.storages[key] = _LegacyStorage(key, storage_type.dtype,
                                                    numel)
    if view is None:
      return storage
    _view_key, offset, view_numel = view
    return _StorageView(storage, offset, view_numel)


def _materialize(obj):
  """Lazy tensors -> numpy arrays, OrderedDicts -> dicts, recursively."""
  if isinstance(obj, _LazyTensor):
    return obj.resolve()
  if isinstance(obj, Mapping):
    return {k: _materialize(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_materialize(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialize(v) for v in obj)
  return obj


def load_legacy_torch_file(path) -> Any:
  """Reads a file of torch's legacy (pre-1.6, non-zip) `torch.save` format.

  Args:
    path: the file.

  Returns:
    The pickled object, every tensor a numpy array, every OrderedDict a dict.

  Raises:
    ValueError: if the file is not in that format or is truncated.
    pickle.UnpicklingError: if it refers to anything but tensors and dicts.
  """
  path = pathlib.Path(path)
  f = io.BytesIO(path.read_bytes())
  storages: dict[str, _LegacyStorage] = {}

  def load():
    return _LegacyUnpickler(f, storages).load()

  try:
    magic = load()
  except (pickle.UnpicklingError, EOFError, ValueError, IndexError,
          KeyError, TypeError) as e:
    raise ValueError(f"{path} is neither an .npz nor a torch.save file "
                     f"(zip or legacy): {e}") from None
  if magic != _LEGACY_MAGIC:
    raise ValueError(f"{path} is neither an .npz nor a torch.save file (zip "
                     f"or legacy): no torch magic number")
  try:
    protocol = load()
    if protocol != _LEGACY_PROTOCOL:
      raise ValueError(f"unsupported legacy torch protocol {protocol}")
    load()  # system info: the data itself is always little-endian
    obj = load()
    keys = load()
    for key in keys:
      _read_storage(f, storages, _ascii(key))
    return _materialize(obj)
  except (ValueError, EOFError, IndexError, KeyError, TypeError) as e:
    raise ValueError(f"{path} is truncated or corrupt, or not a torch.save "
                     f"file: {e}") from e


def _read_storage(f, storages: dict[str, _LegacyStorage], key: str) -> None:
  """Reads the int64 element count and raw elements of one legacy storage."""
  storage = storages.get(key)
  if storage is None:
    raise ValueError(f"storage {key} is stored but not referenced")
  header = f.read(8)
  if len(header) != 8:
    raise ValueError(f"truncated at storage {key}")
  (numel,) = struct.unpack("<q", header)
  if numel != storage.numel:
    raise ValueError(f"storage {key} holds {numel} elements, its tensors "
                     f"expect {storage.numel}")
  nbytes = numel * storage.dtype.itemsize
  raw = f.read(nbytes)
  if len(raw) != nbytes:
    raise ValueError(f"truncated at storage {key}")
  storage.array = np.frombuffer(raw, storage.dtype.newbyteorder("<")).astype(
      storage.dtype)


def read_state_dict(path) -> dict[str, np.ndarray]:
  """The state dict of a `.npz` or a `torch.save` file (zip or legacy format).

  The format is recognised from the content, not the file name. No torch is
  needed; torch files go through a restricted unpickler.

  Raises:
    FileNotFoundError: naming the file and where to get the weights.
    ValueError: naming the file if it is not a flat {name: array} dict in one
      of those formats, or is truncated or corrupt.
    pickle.UnpicklingError: naming the global if a torch file's pickle refers
      to anything but tensors and dicts (nothing from the file is run).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
        f"Inception weights {path} not found (config.eval.inception_weights): "
        f"download pytorch-fid's pt_inception-2015-12-05-"
        f"{PYTORCH_FID_SHA256_PREFIX}.pth (see the README, 'FID') or convert "
        f"it with `python -m colddiff_jax.metrics.inception`.")
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
    if any(n.endswith("/data.pkl") for n in names):
      state = convert.load_torch_checkpoint(path)
    else:
      with np.load(path, allow_pickle=False) as data:
        state = {k: data[k] for k in data.files}
  else:
    state = load_legacy_torch_file(path)
  if not isinstance(state, Mapping) or not all(
      isinstance(v, np.ndarray) for v in state.values()):
    raise ValueError(f"{path} does not hold a flat state dict "
                     f"{{name: tensor}}")
  return dict(state)


# ------------------------------------------------------------- conversion --


def _sha256(path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def convert_weights(weights, output) -> dict[str, np.ndarray]:
  """Checks the pytorch-fid weights and writes the keys the features need
  (PyTorch names and layout) to an .npz, atomically. Returns them."""
  state = check_state_dict(read_state_dict(weights), str(weights))
  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = output.with_name(output.name + ".tmp")
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **state)
    os.replace(tmp, output)
  finally:
    if tmp.exists():
      tmp.unlink()
  return state


def main(argv: Sequence[str] | None = None) -> int:
  """CLI: pytorch-fid .pth -> .npz, without torch."""
  parser = argparse.ArgumentParser(
      prog="python -m colddiff_jax.metrics.inception",
      description="Convert pytorch-fid's Inception weights "
                  f"(pt_inception-2015-12-05-{PYTORCH_FID_SHA256_PREFIX}.pth) "
                  "to an .npz for config.eval.inception_weights (torch is not "
                  "needed; the .pth also works directly).")
  parser.add_argument("--weights", required=True,
                      help="pytorch-fid .pth (legacy or zip torch.save)")
  parser.add_argument("--output", required=True, help="the .npz to write")
  args = parser.parse_args(argv)
  try:
    state = convert_weights(args.weights, args.output)
  except (OSError, ValueError, pickle.UnpicklingError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  digest = _sha256(args.weights)
  if not digest.startswith(PYTORCH_FID_SHA256_PREFIX):
    print(f"warning: {args.weights} has SHA-256 {digest[:8]}..., not the "
          f"{PYTORCH_FID_SHA256_PREFIX}... of pytorch-fid's release file; FID "
          f"values may not be comparable to published ones.", file=sys.stderr)
  print(f"wrote {args.output}: {len(state)} arrays, "
        f"{sum(v.size for v in state.values()):,} values")
  return 0


if __name__ == "__main__":
  sys.exit(main())
