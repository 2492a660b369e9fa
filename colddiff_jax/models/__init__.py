"""The restoration networks R(x, t) and a config-driven builder.

Two architectures from the official code, both NHWC Flax NNX modules called as
`model(x, t, *, dropout_rng=None)` and returning float32:

* 'unet': the ConvNeXt U-Net (`unet.Unet`), the default of every run except
  the CIFAR-10 ones.
* 'ddpm': the DDPM ResNet U-Net (`ddpm_unet.DDPMUnet`), used for CIFAR-10
  blur, inpainting and super-resolution.

`build` validates the `model` sub-config before anything is allocated, so a bad
key fails fast with a ValueError naming it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax.numpy as jnp
from flax import nnx

from colddiff_jax.models.ddpm_unet import DDPMUnet
from colddiff_jax.models.unet import Unet

__all__ = ["DDPMUnet", "Unet", "build", "count_params", "NAMES"]

#: Values accepted by `config.model.name`.
NAMES = ("unet", "ddpm")


def _get(config, key: str):
  if hasattr(config, "get"):
    if key not in config:
      raise ValueError(f"model.{key} is missing from the model config.")
    return config[key]
  if not hasattr(config, key):
    raise ValueError(f"model.{key} is missing from the model config.")
  return getattr(config, key)


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(key: str, value, prefix: str = "model.") -> int:
  if not _is_int(value) or value < 1:
    raise ValueError(f"{prefix}{key}={value!r} must be an integer >= 1.")
  return int(value)


def _bool(key: str, value, prefix: str = "model.") -> bool:
  if not isinstance(value, bool):
    raise ValueError(f"{prefix}{key}={value!r} must be True or False.")
  return value


def _int_tuple(key: str, value, *,
               allow_empty: bool = False) -> tuple[int, ...]:
  try:
    items = tuple(value)
  except TypeError:
    items = None
  if (items is None or (not items and not allow_empty)
      or not all(_is_int(v) and v >= 1 for v in items)):
    what = "a" if allow_empty else "a non-empty"
    raise ValueError(
        f"model.{key}={value!r} must be {what} sequence of integers >= 1.")
  return tuple(int(v) for v in items)


def _check_divisible(image_size: int, levels: int, key: str) -> None:
  factor = 2 ** (levels - 1)
  if image_size % factor:
    raise ValueError(
        f"data.image_size={image_size} must be divisible by {factor} = "
        f"2**(len(model.{key}) - 1): every level but the last halves it.")


def build(model_config, channels: int, image_size: int, *, rngs: nnx.Rngs,
          dtype: Any = jnp.float32, remat: bool = False) -> nnx.Module:
  """Builds the network named by `model_config.name`.

  Args:
    model_config: the `model` sub-config (ml_collections ConfigDict or any
      object with attribute access) with keys name, dim, dim_mults,
      with_time_emb, residual (unet) and ch, ch_mult, num_res_blocks,
      attn_resolutions, dropout, resamp_with_conv (ddpm).
    channels: image channels (input and output).
    image_size: side of the square images.
    rngs: PRNG streams for parameter initialisation.
    dtype: compute dtype (parameters stay float32; the output is float32).
    remat: recompute each block's activations in the backward pass
      (`config.train.remat`; see `layers.call`).

  Returns:
    A `Unet` or a `DDPMUnet`.

  Raises:
    ValueError: naming the offending key when the config is invalid.
  """
  name = _get(model_config, "name")
  remat = _bool("remat", remat, prefix="train.")
  channels = _positive_int("channels", channels, prefix="data.")
  image_size = _positive_int("image_size", image_size, prefix="data.")
  if name == "unet":
    dim = _positive_int("dim", _get(model_config, "dim"))
    dim_mults = _int_tuple("dim_mults", _get(model_config, "dim_mults"))
    with_time_emb = _bool("with_time_emb", _get(model_config, "with_time_emb"))
    residual = _bool("residual", _get(model_config, "residual"))
    if with_time_emb and (dim < 4 or dim % 2):
      # The sinusoids divide by dim/2 - 1.
      raise ValueError(f"model.dim={dim} must be even and >= 4 when "
                       f"model.with_time_emb is True.")
    _check_divisible(image_size, len(dim_mults), "dim_mults")
    heads = _positive_int("attn_heads", _get(model_config, "attn_heads"))
    dim_head = _positive_int("attn_dim_head", _get(model_config, "attn_dim_head"))
    return Unet(channels=channels, dim=dim, dim_mults=dim_mults,
                with_time_emb=with_time_emb, residual=residual,
                out_dim=channels, attn_heads=heads, attn_dim_head=dim_head,
                remat=remat, dtype=dtype, rngs=rngs)
  if name == "ddpm":
    ch = _positive_int("ch", _get(model_config, "ch"))
    if ch % 32:
      raise ValueError(f"model.ch={ch} must be a multiple of 32 (GroupNorm "
                       f"uses 32 groups).")
    ch_mult = _int_tuple("ch_mult", _get(model_config, "ch_mult"))
    num_res_blocks = _positive_int(
        "num_res_blocks", _get(model_config, "num_res_blocks"))
    attn_resolutions = _int_tuple(
        "attn_resolutions", _get(model_config, "attn_resolutions"),
        allow_empty=True)
    rate = _get(model_config, "dropout")
    if (not isinstance(rate, numbers.Real) or isinstance(rate, bool)
        or not math.isfinite(rate) or not 0.0 <= rate < 1.0):
      raise ValueError(f"model.dropout={rate!r} must be a number in [0, 1).")
    resamp_with_conv = _bool("resamp_with_conv",
                             _get(model_config, "resamp_with_conv"))
    _check_divisible(image_size, len(ch_mult), "ch_mult")
    return DDPMUnet(ch=ch, out_ch=channels, ch_mult=ch_mult,
                    num_res_blocks=num_res_blocks,
                    attn_resolutions=attn_resolutions, dropout=float(rate),
                    resamp_with_conv=resamp_with_conv, in_channels=channels,
                    resolution=image_size, remat=remat, dtype=dtype,
                    rngs=rngs)
  raise ValueError(f"model.name={name!r} is not a known network; use one of "
                   f"{', '.join(NAMES)}.")


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters (works on `nnx.eval_shape` models too)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return sum(math.prod(var.get_value().shape) for _, var in flat)
