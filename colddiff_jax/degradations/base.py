"""The interface every degradation family implements, and the family registry.

A degradation D(x0, s) maps a clean batch x0 (NHWC float32 in [-1, 1]) to the
state after s forward steps, s = 0..T, with D(x0, 0) = x0. Families precompute
everything that does not depend on the image at construction (as device arrays),
so `apply` is a pure function of (x0, s, aux) whose cost does not grow with s.

`aux` holds the per-example random choices a family needs (a mask window, a
colour, a noise draw, a snow field, a mix partner). It is a dict of arrays whose
leading axis is the batch (or 1 when shared by the whole batch) and is drawn by
`sample_aux` from an explicit PRNG key. Deterministic families use None.
"""

from __future__ import annotations

import abc
import numbers
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Aux = Mapping[str, jax.Array] | None

_REGISTRY: dict[str, Callable[..., "Degradation"]] = {}


def register(name: str):
  """Class decorator adding a family to the registry under `name`."""

  def wrap(cls):
    _REGISTRY[name] = cls
    return cls

  return wrap


def families() -> tuple[str, ...]:
  """Names accepted by `config.degradation.name`."""
  return tuple(sorted(_REGISTRY))


def build(config, image_size: int, channels: int) -> "Degradation":
  """Builds the degradation named by `config.name`; validates before any compile.

  Args:
    config: the `degradation` sub-config (an ml_collections ConfigDict or any
      mapping with attribute access), using the official option names.
    image_size: side of the square images the degradation will see.
    channels: number of image channels.

  Returns:
    A `Degradation` with all tables precomputed.

  Raises:
    ValueError: naming the offending key when the config is invalid.
  """
  name = config.get("name") if hasattr(config, "get") else getattr(config, "name")
  if name not in _REGISTRY:
    raise ValueError(
        f"degradation.name={name!r} is not a known family; use one of "
        f"{', '.join(families())}.")
  check_positive_int("time_steps", config.time_steps)
  check_positive_int("image_size", image_size, prefix="data.")
  check_positive_int("channels", channels, prefix="data.")
  return _REGISTRY[name](config, image_size=int(image_size), channels=int(channels))


def check_positive_int(key: str, value, prefix: str = "degradation.") -> None:
  """Raises ValueError naming `prefix + key` unless `value` is an int >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{prefix}{key}={value!r} must be an integer >= 1.")


def check_choice(key: str, value, choices) -> None:
  """Raises ValueError naming `degradation.key` unless `value` is in `choices`."""
  if value not in choices:
    raise ValueError(
        f"degradation.{key}={value!r} is not supported; use one of "
        f"{', '.join(map(str, choices))}.")


def option(config, key: str, default):
  """config.key, or the official default when the config omits it."""
  if hasattr(config, "get"):
    return config.get(key, default)
  return getattr(config, key, default)


def check_real(key: str, value, minimum: float, strict: bool) -> float:
  """Returns `value` as a float, or raises ValueError naming `degradation.key`.

  Accepted: finite reals above `minimum` (or equal to it unless `strict`).
  """
  ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
        and np.isfinite(value)
        and (value > minimum if strict else value >= minimum))
  if not ok:
    relation = ">" if strict else ">="
    raise ValueError(
        f"degradation.{key}={value!r} must be a number {relation} {minimum}.")
  return float(value)


def check_bool(key: str, value) -> bool:
  """Returns `value` as a bool, or raises ValueError naming `degradation.key`."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"degradation.{key}={value!r} must be True or False.")
  return bool(value)


class Degradation(abc.ABC):
  """A forward degradation D(x0, s), s = 0..T, built once from a config."""

  #: True when sampling needs `aux` (drawn by `sample_aux` or given by the user).
  random: bool = False
  #: True for families whose training inputs are quantised to 8 bit.
  discrete: bool = False

  def __init__(self, config, image_size: int, channels: int):
    self.config = config
    self.image_size = image_size
    self.channels = channels
    self.num_steps = int(config.time_steps)

  def sample_aux(self, rng: jax.Array, batch_size: int) -> Aux:
    """Draws the per-example random choices for a batch (None if deterministic)."""
    del rng, batch_size
    return None

  @abc.abstractmethod
  def apply(self, x0: jax.Array, s: jax.Array, aux: Aux = None) -> jax.Array:
    """Returns D(x0, s) for a batch x0 [B,H,W,C] and per-example steps s int32 [B]."""

  def quantize(self, x: jax.Array) -> jax.Array:
    """8-bit quantisation of the official `discrete` mode (identity otherwise).

    The official code truncates toward zero: ((x+1)/2*255).int()/255*2-1.
    """
    if not self.discrete:
      return x
    return jnp.trunc((x + 1.0) / 2.0 * 255.0) / 255.0 * 2.0 - 1.0

  def train_input(self, x0: jax.Array, s: jax.Array, aux: Aux = None) -> jax.Array:
    """The network input of a training example: D(x0, s), quantised if discrete."""
    return self.quantize(self.apply(x0, s, aux))

  def initial_state(self, x0: jax.Array, aux: Aux = None) -> jax.Array:
    """The sampler's start x_T for a clean batch in conditional evaluation.

    D(x0, T); families whose official evaluation quantises x_T override this.
    """
    return self.apply(x0, jnp.full((x0.shape[0],), self.num_steps, jnp.int32), aux)

  def estimate_aux(self, x_s: jax.Array, x0_hat: jax.Array, s: jax.Array) -> Aux:
    """Re-estimates `aux` from a state and a clean estimate (DDIM-style sampling).

    Only families whose state is a known mix of x0 and an unknown image (noise,
    mix) can do this.
    """
    raise ValueError(
        f"sample.method='ddim' needs a degradation whose hidden image can be "
        f"re-estimated (noise, mix); {type(self).__name__} cannot. Use 'tacos'.")

  def check_input(self, x: jax.Array) -> None:
    """Raises ValueError (at trace time) if x is not [B, S, S, C] of this build."""
    expected = (self.image_size, self.image_size, self.channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(
          f"{type(self).__name__} was built for images [B, {expected[0]}, "
          f"{expected[1]}, {expected[2]}] (data.image_size, data.channels), got "
          f"{tuple(x.shape)}.")

  def check_aux(self, aux: Aux) -> None:
    """Raises ValueError if a random family gets no aux."""
    if self.random and aux is None:
      raise ValueError(
          f"{type(self).__name__} is random: pass aux=deg.sample_aux(rng, batch) "
          f"(or build it from known draws).")


def gather_steps(table: jax.Array, s: jax.Array) -> jax.Array:
  """table[s] for per-example steps s int32 [B]; a jit-friendly gather."""
  return jnp.take(table, s, axis=0)


def as_device_table(array: np.ndarray) -> jax.Array:
  """float32 device copy of a table computed in float64 on the host."""
  return jnp.asarray(np.asarray(array, dtype=np.float32))


def broadcast_steps(s: jax.Array, batch: int) -> jax.Array:
  """Accepts a scalar or [B] step and returns int32 [B]."""
  s = jnp.asarray(s, dtype=jnp.int32)
  return jnp.broadcast_to(s, (batch,))


Config = Any
