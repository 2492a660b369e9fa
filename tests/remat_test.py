"""Rematerialised blocks (`config.train.remat`, `layers.call`).

Both networks built with remat=True compute the same values and gradients as
without (DDPM dropout included: the recomputation draws the same masks), with
the CPU fast path (`layers._checkpoint_after_cotangent`) and with plain
`nnx.remat`; on XLA:CPU the fast path must actually lower the step's scratch
memory, which `jax.checkpoint` alone does not there.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from colddiff_jax import models
from colddiff_jax.models import layers

pytestmark = pytest.mark.usefixtures("fast_compiles")

NETWORKS = {
    "unet": dict(name="unet", dim=8, dim_mults=(1,), with_time_emb=True,
                 residual=False, attn_heads=1, attn_dim_head=8),
    "ddpm": dict(name="ddpm", ch=32, ch_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(), dropout=0.1, resamp_with_conv=True),
}


def _grad_fn(name: str, remat: bool, size: int = 32, batch: int = 4):
  """(jitted value-and-grad of a loss over the parameters, params)."""
  config = ml_collections.ConfigDict(NETWORKS[name])
  model = models.build(config, 3, size, rngs=nnx.Rngs(0), remat=remat)
  assert model.remat is remat
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.uniform(jax.random.key(1), (batch, size, size, 3),
                         jnp.float32, -1, 1)
  t = jnp.arange(batch, dtype=jnp.int32) % 5
  key = jax.random.key(2) if name == "ddpm" else None
  r = jax.random.normal(jax.random.key(3), x.shape)

  def loss(params):
    y = nnx.merge(graphdef, params, rest)(x, t, dropout_rng=key)
    return jnp.sum(y * r)

  return jax.jit(jax.value_and_grad(loss)), params


@functools.cache
def _runs(name: str) -> dict:
  """{variant: ((loss, grads), XLA scratch bytes)} for the plain network and
  the two remat paths, each compiled once for both tests."""
  out = {}
  for variant, remat, fast in (("plain", False, True), ("cpu_path", True, True),
                               ("nnx_remat", True, False)):
    with layers.fast_cpu_paths(fast):
      f, params = _grad_fn(name, remat)
      compiled = f.lower(params).compile()
    out[variant] = (compiled(params),
                    compiled.memory_analysis().temp_size_in_bytes)
  return out


@pytest.mark.parametrize("variant", ["cpu_path", "nnx_remat"])
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_remat_gives_the_same_loss_and_gradients(name, variant):
  (l0, g0), _ = _runs(name)["plain"]
  (l1, g1), _ = _runs(name)[variant]
  # Same function; only the order of floating-point operations may differ.
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  leaves0, tree0 = jax.tree.flatten(g0)
  leaves1, tree1 = jax.tree.flatten(g1)
  assert tree0 == tree1
  scale = max(float(jnp.max(jnp.abs(g))) for g in leaves0)
  for a, b in zip(leaves1, leaves0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * scale)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_remat_lowers_the_scratch_memory_on_cpu(name):
  # XLA's own count for the compiled program: deterministic, not timed.
  _, plain = _runs(name)["plain"]
  _, remat = _runs(name)["cpu_path"]
  # Measured: 0.30x (unet) and 0.47x (ddpm); 3-5x less at full size
  # (benchmarks/results/cpu.json).
  assert remat < 0.7 * plain, (remat, plain)


def test_build_refuses_a_non_boolean_remat():
  config = ml_collections.ConfigDict(NETWORKS["unet"])
  with pytest.raises(ValueError, match=r"train\.remat=1 must be True or False"):
    nnx.eval_shape(lambda: models.build(config, 3, 16, rngs=nnx.Rngs(0),
                                        remat=1))
