"""Snowification (official SN `Snow`): D(x0, s) adds the snow layer of step s-1.

The process is not cumulative: step i thresholds a zoomed Gaussian base field at
`thr_i`, motion-blurs it with a 1-D Gaussian of std `mb_i` along the rows or the
columns, and adds that layer plus its 180-degree rotation to the image (after a
brightness mix unless `fix_brightness`). Everything that does not depend on the
image is precomputed here: the per-step schedules and one N×N motion-blur matrix
per step, so `apply` costs two small matmuls whatever s is.

`aux` = {'base': [B', H, W] float32 zoomed field, 'vertical': [B'] bool}, with
B' = 1 (one pattern for the whole batch, as officially) or B' = B (single_snow).
Without `random_snow` the official pattern is fixed by numpy seed 123321 and
`apply` uses it when aux is None; with it `sample_aux` draws a fresh pattern.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from colddiff_jax.degradations import base
from colddiff_jax.degradations import operators

# The seed the official code uses for the fixed (non-random) pattern.
OFFICIAL_SEED = 123321
# kornia rgb_to_grayscale weights (the official luminance).
_LUMA = (0.299, 0.587, 0.114)
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class SnowLevel:
  """Constants of one snow_level: ImageNet-C c0, c1, c2, c4 and schedules."""
  mean: float
  std: float
  zoom: float
  kernel: int
  threshold: tuple[float, float]
  sigma: tuple[float, float]
  brightness: tuple[float, float]


LEVELS = {
    1: SnowLevel(0.10, 0.3, 3.0, 5, (0.70, 0.30), (0.50, 5.0), (0.95, 0.70)),
    2: SnowLevel(0.55, 0.3, 2.5, 11, (1.15, 0.70), (0.05, 12.0), (0.95, 0.55)),
    3: SnowLevel(0.55, 0.3, 2.5, 11, (1.15, 0.70), (0.05, 16.0), (0.95, 0.40)),
    4: SnowLevel(0.55, 0.3, 2.5, 11, (1.15, 0.55), (0.05, 20.0), (0.95, 0.30)),
}


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """float32 `torch.linspace(start, end, steps)` as computed by PyTorch on CPU.

  PyTorch takes a float32 step, then start + step·i for the first half and
  end - step·(steps-1-i) for the second, each with one (fused) rounding; the
  float64 evaluation below reproduces the official lists bit for bit.
  """
  a, b = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([a], np.float32)
  step = np.float64((b - a) / np.float32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  out = np.where(i < steps // 2, np.float64(a) + step * i,
                 np.float64(b) - step * (steps - 1 - i))
  return out.astype(np.float32)


def zoom_matrix(n: int, factor: float) -> np.ndarray:
  """[n, n] float64 matrix A with clipped_zoom(X) = A · X · Aᵀ (ImageNet-C).

  clipped_zoom crops the central ceil(n/factor) square, zooms it with
  scipy.ndimage.zoom (order 1) and trims the result back to n centred. Order-1
  zoom is linear and separable: zooming an identity gives its per-axis matrix.
  """
  ch = int(math.ceil(n / factor))
  top = (n - ch) // 2
  z = ndimage.zoom(np.eye(ch), (factor, 1.0), order=1)
  trim = (z.shape[0] - n) // 2
  out = np.zeros((n, n))
  out[:, top:top + ch] = z[trim:trim + n]
  return out




@base.register("snow")
class Snow(base.Degradation):
  """Official snowification; see the module docstring for `aux`."""

  def __init__(self, config, image_size: int, channels: int):
    super().__init__(config, image_size, channels)
    level = config.get("snow_level", 1)
    if isinstance(level, (bool, np.bool_)):
      level = repr(level)  # True == 1 would otherwise pass the choice check.
    base.check_choice("snow_level", level, tuple(LEVELS))
    self.level = LEVELS[int(level)]
    self.random = base.check_bool("random_snow", config.get("random_snow", False))
    self.fix_brightness = base.check_bool("fix_brightness",
                                      config.get("fix_brightness", False))
    self.single_snow = base.check_bool("single_snow",
                                   config.get("single_snow", False))
    if not self.fix_brightness and channels != 3:
      raise ValueError(
          f"data.channels={channels} does not work with "
          f"degradation.fix_brightness=False: the brightness mix uses RGB "
          f"luminance; use 3 channels or set fix_brightness=True.")

    t, n, lv = self.num_steps, image_size, self.level
    # Host copies (float32 values as the official lists) for inspection/tests.
    self.thresholds = torch_linspace(*lv.threshold, t)
    self.sigmas = torch_linspace(*lv.sigma, t)
    self.brightness = torch_linspace(*lv.brightness, t)
    self.zoom = zoom_matrix(n, lv.zoom)
    blur = np.stack([
        operators.conv_operator(operators.gaussian_1d(lv.kernel, sg), n,
                                "constant") for sg in self.sigmas
    ])
    self._thr = base.as_device_table(self.thresholds)
    self._bright = base.as_device_table(self.brightness)
    self._blur = base.as_device_table(blur)  # [T, N, N]: out = M · x.
    self._zoom = base.as_device_table(self.zoom)
    self._fixed: dict[int, dict] = {}

  def seeded_draw(self, num_fields: int = 1) -> tuple[np.ndarray, float]:
    """The official seeded draw: raw fields [num_fields, H, W] and the uniform.

    Mirrors `np.random.seed(123321)`, `np.random.normal(c0, c1, (n, H, W, 1))`,
    then `np.random.uniform()` for the orientation (vertical when > 0.5).
    """
    n = self.image_size
    rs = np.random.RandomState(OFFICIAL_SEED)
    raw = rs.normal(loc=self.level.mean, scale=self.level.std,
                    size=(num_fields, n, n, 1))[..., 0]
    return raw, float(rs.uniform())

  def fixed_aux(self, batch_size: int = 1) -> dict:
    """The fixed official pattern (B' = batch_size with single_snow, else 1).

    Built once per B' on the host (it depends on B' only through the draw size).
    """
    num = batch_size if self.single_snow else 1
    if num not in self._fixed:
      raw, u = self.seeded_draw(num)
      self._fixed[num] = self.aux_from_base(raw, np.full((num,), u > 0.5))
    return self._fixed[num]

  def aux_from_base(self, base_raw, vertical) -> dict:
    """Builds aux from raw normal fields [B', H, W] or [H, W] and orientations.

    numpy input is zoomed in float64 on the host (as the official scipy call)
    and gives numpy arrays, which stay constants under jit; JAX input is zoomed
    with the precomputed matrices, so that path is jit-able.
    """
    if isinstance(base_raw, np.ndarray):
      raw = base_raw.astype(np.float64).reshape((-1,) + base_raw.shape[-2:])
      zoomed = np.einsum("hi,bij,wj->bhw", self.zoom, raw, self.zoom)
      vertical = np.broadcast_to(np.asarray(vertical, bool).reshape(-1),
                                 zoomed.shape[:1])
      return {"base": zoomed.astype(np.float32), "vertical": vertical.copy()}
    raw = jnp.asarray(base_raw, jnp.float32)
    raw = raw.reshape((-1,) + raw.shape[-2:])
    zoomed = jnp.einsum("hi,bij,wj->bhw", self._zoom, raw, self._zoom,
                        precision=_HI)
    vertical = jnp.broadcast_to(jnp.asarray(vertical, bool).reshape(-1),
                                zoomed.shape[:1])
    return {"base": zoomed, "vertical": vertical}

  def sample_aux(self, rng: jax.Array, batch_size: int) -> base.Aux:
    """Draws a new pattern (random_snow); None for the fixed official pattern.

    One orientation per call, as the official `generate_snow_layer`, even when
    single_snow gives every example its own field.
    """
    if not self.random:
      return None
    num = batch_size if self.single_snow else 1
    n = self.image_size
    k_field, k_orient = jax.random.split(rng)
    raw = self.level.mean + self.level.std * jax.random.normal(
        k_field, (num, n, n), jnp.float32)
    vertical = jax.random.uniform(k_orient) > 0.5
    return self.aux_from_base(raw, jnp.broadcast_to(vertical, (num,)))

  def snow_layer(self, s: jax.Array, aux: base.Aux) -> jax.Array:
    """The official snow_{s-1} layer [B, H, W] (s = 0 gives step 0's layer)."""
    s = jnp.asarray(s, jnp.int32).reshape(-1)
    i = jnp.maximum(s - 1, 0)
    field = aux["base"]
    thr = base.gather_steps(self._thr, i)[:, None, None]
    field = jnp.clip(jnp.where(field < thr, 0.0, field), 0.0, 1.0)  # [B, H, W]
    m = base.gather_steps(self._blur, i)
    # Official kernel: Gaussian in the middle row (blur along the width);
    # its 90-degree rotation puts it in the middle column (along the height).
    horizontal = jnp.einsum("bhw,bvw->bhv", field, m, precision=_HI)
    vertical = jnp.einsum("bvh,bhw->bvw", m, field, precision=_HI)
    flag = jnp.broadcast_to(aux["vertical"], s.shape)[:, None, None]
    return jnp.where(flag, vertical, horizontal)

  def apply(self, x0: jax.Array, s: jax.Array,
            aux: base.Aux = None) -> jax.Array:
    """D(x0, s) for x0 [B, H, W, C] in [-1, 1] and steps s (scalar or [B])."""
    b = x0.shape[0]
    s = base.broadcast_steps(s, b)
    if aux is None and not self.random:
      aux = self.fixed_aux(b)
    self.check_aux(aux)
    layer = self.snow_layer(s, aux)[..., None]
    layer_rot = layer[:, ::-1, ::-1]
    r = (x0 + 1.0) / 2.0
    if not self.fix_brightness:
      lum = _LUMA[0] * r[..., 0] + _LUMA[1] * r[..., 1] + _LUMA[2] * r[..., 2]
      gray = jnp.maximum(r, 1.5 * lum[..., None] + 0.5)
      c = base.gather_steps(self._bright, jnp.maximum(s - 1, 0))[:, None, None,
                                                                  None]
      r = c * r + (1.0 - c) * gray
    y = jnp.clip(r + layer + layer_rot, 0.0, 1.0)
    return jnp.where((s == 0)[:, None, None, None], x0, 2.0 * y - 1.0)
