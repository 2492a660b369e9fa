"""Per-axis linear operators shared by the separable families (blur, resolution).

Blur with circular or reflect padding, PyTorch's bicubic / bilinear / area
down-sampling (align_corners=False, no antialias), nearest-exact up-sampling and
the "mean at T" of the discrete mode are all separable linear maps: one image
channel X [N, N] goes to A · X · Aᵀ with an N×N matrix A per step. A chain of
steps is then the matrix product of its steps, so the state after s steps needs
two matmuls whatever s is. Operators are built in float64 on the host; their
products are cast to float32 once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from colddiff_jax.degradations import base

# The cubic convolution constant of PyTorch's bicubic interpolation (Keys, a=-0.75).
_CUBIC_A = -0.75


def gaussian_1d(size: int, sigma: float) -> np.ndarray:
  """Normalised 1-D Gaussian of odd `size` centred at size // 2 (torchgeometry)."""
  j = np.arange(size, dtype=np.float64) - size // 2
  g = np.exp(-(j**2) / (2.0 * float(sigma) ** 2))
  return g / g.sum()


def _pad_matrix(n: int, pad: int, mode: str) -> np.ndarray:
  """[n + 2·pad, n] matrix that pads a length-n signal ('wrap' or 'reflect')."""
  return np.pad(np.eye(n), ((pad, pad), (0, 0)), mode=mode)


def conv_operator(taps: np.ndarray, n: int, mode: str) -> np.ndarray:
  """[n, n] matrix of a 'same' correlation with `taps` after `mode` padding.

  Args:
    taps: odd-length 1-D filter.
    n: signal length.
    mode: 'wrap' (PyTorch circular), 'reflect' (PyTorch reflect: mirror without
      repeating the edge) or 'constant' (zero padding).
  """
  k = len(taps)
  pad = (k - 1) // 2
  padded = _pad_matrix(n, pad, mode)
  out = np.zeros((n, n))
  for j, w in enumerate(taps):
    out += w * padded[j:j + n]
  return out


def _source_scale(n_in: int, n_out: int) -> np.float32:
  # PyTorch computes the scale in float32 for float32 images; reproducing it
  # keeps the sampling positions (and hence floor() results) bit-identical.
  return np.float32(n_in) / np.float32(n_out)


def bicubic_operator(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] PyTorch bicubic resize (align_corners=False, antialias=False)."""
  scale = _source_scale(n_in, n_out)
  out = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = np.float32(scale * np.float32(i + 0.5) - np.float32(0.5))
    idx = int(np.floor(src))
    t = float(src - np.float32(idx))
    a = _CUBIC_A
    w = [
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    ]
    for k in range(4):
      # Out-of-range taps are clamped to the border pixel.
      out[i, min(max(idx - 1 + k, 0), n_in - 1)] += w[k]
  return out


def bilinear_operator(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] PyTorch bilinear resize (align_corners=False, antialias=False)."""
  scale = _source_scale(n_in, n_out)
  out = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = np.float32(scale * np.float32(i + 0.5) - np.float32(0.5))
    src = max(float(src), 0.0)
    idx = min(int(np.floor(src)), n_in - 1)
    lam = min(max(src - idx, 0.0), 1.0)
    out[i, idx] += 1.0 - lam
    out[i, idx + 1 if idx < n_in - 1 else idx] += lam
  return out


def area_operator(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] PyTorch 'area' resize (= adaptive average pooling)."""
  out = np.zeros((n_out, n_in))
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -(-((i + 1) * n_in) // n_out)
    out[i, start:end] = 1.0 / (end - start)
  return out


def nearest_exact_operator(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] PyTorch 'nearest-exact' resize."""
  scale = _source_scale(n_in, n_out)
  out = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = min(int(np.floor(np.float32(np.float32(i + 0.5) * scale))), n_in - 1)
    out[i, src] = 1.0
  return out


def mean_operator(n: int) -> np.ndarray:
  """[n, n] matrix that replaces a signal by its mean."""
  return np.full((n, n), 1.0 / n)


def cumulative(steps: list[np.ndarray], n: int) -> np.ndarray:
  """[T+1, n, n] table of chained operators: table[s] = steps[s-1] ⋯ steps[0]."""
  table = np.empty((len(steps) + 1, n, n))
  table[0] = np.eye(n)
  for s, op in enumerate(steps, start=1):
    table[s] = op @ table[s - 1]
  return table


def apply_separable(x: jax.Array, a: jax.Array) -> jax.Array:
  """Per-example A · X · Aᵀ on every channel: x [B,H,W,C], a [B,N,N] (N=H=W).

  HIGHEST precision keeps float32 parity on TPU/GPU (whose default f32 matmul
  uses reduced-precision passes); the matmuls are tiny next to the U-Net.
  """
  hp = jax.lax.Precision.HIGHEST
  y = jnp.einsum("bhi,biwc->bhwc", a, x, precision=hp)
  return jnp.einsum("bwj,bhjc->bhwc", a, y, precision=hp)


class SeparableDegradation(base.Degradation):
  """A deterministic family whose state after s steps is A_s · X · A_sᵀ.

  Subclasses build `self.step_operators()` (the T per-step [N, N] matrices);
  this class chains them into the [T+1, N, N] table used by `apply`.
  """

  def _set_table(self, table: np.ndarray) -> None:
    self.table = base.as_device_table(table)

  def apply(self, x0, s, aux=None):
    del aux
    self.check_input(x0)
    s = base.broadcast_steps(s, x0.shape[0])
    return apply_separable(x0, base.gather_steps(self.table, s))
