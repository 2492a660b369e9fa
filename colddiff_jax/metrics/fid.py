"""Fréchet Inception Distance as pytorch-fid / the official evaluation computes it.

Features are the 2048-d pool3 activations of the TF-FID Inception-v3
(`inception.InceptionV3`, weights from a local file); statistics are the mean
and `np.cov(rowvar=False)` of each set; the distance uses `scipy.linalg.sqrtm`
with pytorch-fid's fallback (1e-6 added to the covariance diagonals when the
square root is not finite) and its check that only a negligible imaginary part
is dropped.

Differences from the official code (spec §5.4, §8 item 21), on purpose:

* every image counts: the last partial batch is padded and the padding is
  dropped (the official code leaves the last N mod 50 feature rows
  uninitialised);
* the forward is one jitted function sharded over the mesh's 'data' axis.

As in the official conditional evaluation the images are used as floats
(neither quantised to uint8 nor clamped); `FID.activations` takes them on the
model's [-1, 1] scale and maps them to the [0, 1] the network expects.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import scipy.linalg
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from colddiff_jax import parallel
from colddiff_jax.metrics import inception


def statistics(activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (float64) of activations [N, D]."""
  act = np.asarray(activations, np.float64)
  if act.ndim != 2 or act.shape[0] < 2:
    raise ValueError(f"statistics need activations [N >= 2, D], got shape "
                     f"{act.shape}")
  return np.mean(act, axis=0), np.cov(act, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
  """‖μ1 - μ2‖² + Tr(Σ1 + Σ2 - 2·sqrt(Σ1·Σ2)), as pytorch-fid computes it.

  Raises:
    ValueError: if the shapes differ, or if the matrix square root has an
      imaginary diagonal component larger than 1e-3 (pytorch-fid's check).
  """
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs "
                     f"{mu2.shape}")
  if sigma1.shape != sigma2.shape:
    raise ValueError(f"covariances have different shapes: {sigma1.shape} vs "
                     f"{sigma2.shape}")
  diff = mu1 - mu2
  # The product may be almost singular (fewer images than dimensions).
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    logging.warning("FID: singular covariance product; adding %g to the "
                    "diagonal of both covariances (as pytorch-fid does)", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  # Numerical error may leave a slight imaginary component.
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: the square root of the covariance product has "
                       f"an imaginary component of "
                       f"{np.max(np.abs(covmean.imag)):g}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * np.trace(covmean))


def fid_from_activations(a: np.ndarray, b: np.ndarray) -> float:
  """FID between two sets of activations [N, D] and [M, D]."""
  return frechet_distance(*statistics(a), *statistics(b))


class FID:
  """Inception-v3 features and FID of image sets, sharded over devices.

  Attributes:
    mesh: the device mesh; batches are split over its 'data' axis.
    batch_size: images per forward call (a multiple of the mesh size).
  """

  def __init__(self, weights_path: str, mesh: Mesh | None = None,
               batch_size: int = 50):
    """Loads the weights (`.pth` of pytorch-fid or its `.npz` conversion).

    Args:
      weights_path: config.eval.inception_weights.
      mesh: a ('data',) mesh; None = all devices (`parallel.make_mesh()`).
      batch_size: images per forward call; rounded up to a multiple of the
        number of devices.
    """
    if batch_size < 1:
      raise ValueError(f"FID batch_size={batch_size} must be positive")
    self.mesh = parallel.make_mesh() if mesh is None else mesh
    devices = self.mesh.shape[parallel.DATA]
    self.batch_size = math.ceil(batch_size / devices) * devices
    graphdef, state = nnx.split(inception.load_inception(weights_path))
    replicated = parallel.replicated(self.mesh)
    self._sharding = parallel.batch_sharding(self.mesh)
    self._state = jax.device_put(state, replicated)

    def forward(state, images):
      # [-1, 1] (the models' scale) -> the [0, 1] pytorch-fid expects.
      return nnx.merge(graphdef, state)((images + 1.0) / 2.0)

    self._forward = jax.jit(forward, in_shardings=(replicated, self._sharding),
                            out_shardings=replicated)

  def activations(self, images: np.ndarray) -> np.ndarray:
    """Pool3 features [N, 2048] (float64) of every image.

    Args:
      images: float NHWC in [-1, 1] (not clamped), C = 1 (repeated to 3 as
        the official evaluation does) or 3, any N and size (each image is
        resized to 299x299).
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"FID needs images [N, H, W, C] with C in (1, 3), got "
                       f"shape {images.shape}")
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    n = len(images)
    outputs = []
    for start in range(0, n, self.batch_size):
      chunk = images[start:start + self.batch_size]
      valid = len(chunk)
      if valid < self.batch_size:  # pad to the compiled shape; dropped below
        chunk = np.concatenate(
            [chunk, np.zeros((self.batch_size - valid, *chunk.shape[1:]),
                             chunk.dtype)])
      batch = jax.make_array_from_callback(chunk.shape, self._sharding,
                                           lambda index, c=chunk: c[index])
      # Kept on device until all batches are dispatched (async pipeline).
      outputs.append((self._forward(self._state, batch), valid))
    features = [np.asarray(out)[:valid] for out, valid in outputs]
    if not features:
      return np.zeros((0, inception.FEATURES), np.float64)
    return np.concatenate(features).astype(np.float64)

  def distance(self, images_a: np.ndarray, images_b: np.ndarray) -> float:
    """FID between two image sets (NHWC, [-1, 1], see `activations`)."""
    return fid_from_activations(self.activations(images_a),
                                self.activations(images_b))
