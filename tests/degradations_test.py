"""Properties every degradation family and routine must have."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colddiff_jax import degradations
from colddiff_jax import sampling
from colddiff_jax.degradations import blur, resolution
from parity import config

SIZE = 16


def _cases():
  """(id, config) for every family and every routine, at small T."""
  cases = []
  for r in blur.ROUTINES:
    cases.append((f"blur-{r}", dict(name="blur", time_steps=4, blur_routine=r, blur_size=5,
                                    blur_std=0.5, discrete=False)))
  cases.append(("blur-discrete", dict(name="blur", time_steps=4, blur_routine="Exponential",
                                      blur_size=7, blur_std=0.1, discrete=True)))
  for r in ("Incremental", "Constant", "Random_Incremental"):
    cases.append((f"mask-{r}", dict(name="mask", time_steps=4, fade_routine=r, kernel_std=1.0,
                                    initial_mask=1, discrete=r == "Random_Incremental")))
  for rev in (False, True):
    cases.append((f"mask_generation-reverse{rev}",
                  dict(name="mask_generation", time_steps=4, kernel_std=1.0, initial_mask=1,
                       reverse=rev)))
  for r in resolution.ROUTINES:
    cases.append((f"resolution-{r}", dict(name="resolution", time_steps=3, resolution_routine=r)))
  for level in (1, 2, 3, 4):
    for rnd in (False, True):
      cases.append((f"snow-L{level}-random{rnd}",
                    dict(name="snow", time_steps=4, snow_level=level, random_snow=rnd,
                         fix_brightness=level % 2 == 0, single_snow=rnd and level == 4)))
  for r in ("Constant", "Linear"):
    for total in (False, True):
      cases.append((f"decolor-{r}-total{total}",
                    dict(name="decolor", time_steps=4, decolor_routine=r, decolor_ema_factor=0.9,
                         decolor_total_remove=total)))
  cases.append(("mix", dict(name="mix", time_steps=4)))
  cases.append(("noise", dict(name="noise", time_steps=4)))
  return cases


CASES = _cases()
IDS = [c[0] for c in CASES]


def test_every_family_is_covered():
  assert {c[1]["name"] for c in CASES} == set(degradations.families())
  assert set(degradations.families()) == {
      "blur", "mask", "mask_generation", "resolution", "snow", "decolor", "mix", "noise"}


def _setup(cfg, batch=3):
  deg = degradations.build(config(**cfg), SIZE, 3)
  x0 = jax.random.uniform(jax.random.key(0), (batch, SIZE, SIZE, 3), minval=-1, maxval=1)
  if cfg["name"] == "mix":
    aux = deg.make_aux(jax.random.uniform(jax.random.key(1), x0.shape, minval=-1, maxval=1))
  else:
    aux = deg.sample_aux(jax.random.key(1), batch)
  return deg, x0, aux


@pytest.mark.parametrize("cfg", [c[1] for c in CASES], ids=IDS)
def test_identity_at_zero_finite_and_per_example_steps(cfg):
  deg, x0, aux = _setup(cfg)
  apply = jax.jit(deg.apply)
  np.testing.assert_array_equal(apply(x0, jnp.zeros((3,), jnp.int32), aux), x0)
  T = deg.num_steps
  mixed = apply(x0, jnp.array([0, 1, T], jnp.int32), aux)
  assert bool(jnp.all(jnp.isfinite(mixed)))
  for b, s in enumerate((0, 1, T)):
    alone = apply(x0, jnp.full((3,), s, jnp.int32), aux)[b]
    np.testing.assert_allclose(mixed[b], alone, atol=1e-6)
  # The last state really differs from the clean image.
  assert float(jnp.abs(apply(x0, jnp.full((3,), T), aux) - x0).max()) > 1e-3


@pytest.mark.parametrize("cfg", [c[1] for c in CASES], ids=IDS)
def test_vmap_over_an_outer_axis(cfg):
  deg, x0, aux = _setup(cfg)
  xs = jnp.stack([x0, -x0])
  s = jnp.array([[1, 2, 3], [3, 2, 1]], jnp.int32)
  out = jax.jit(jax.vmap(lambda x, t: deg.apply(x, t, aux)))(xs, s)
  for v in range(2):
    np.testing.assert_allclose(out[v], deg.apply(xs[v], s[v], aux), atol=1e-6)


@pytest.mark.parametrize("method", ["naive", "tacos"])
@pytest.mark.parametrize("cfg", [c[1] for c in CASES], ids=IDS)
def test_oracle_restorer_recovers_x0(cfg, method):
  """With R(x_s, s-1) = x0 both algorithms return x0 (Alg. 2 telescopes)."""
  deg, x0, aux = _setup(cfg)
  x_T = deg.apply(x0, jnp.full((3,), deg.num_steps), aux)
  out = sampling.make_sampler(lambda x, k: x0, deg, method)(x_T, aux)
  np.testing.assert_allclose(out, x0, atol=1e-5)


@pytest.mark.parametrize("cfg", [c[1] for c in CASES if c[1]["name"] in ("blur", "mask")][:3],
                         ids=IDS[:3])
def test_quantize_is_official_truncation(cfg):
  deg, x0, aux = _setup(dict(cfg, discrete=True))
  x = np.asarray(x0)
  expected = ((x + 1) / 2 * 255).astype(np.int32) / 255 * 2 - 1
  np.testing.assert_allclose(deg.quantize(x0), expected, atol=1e-6)


def test_unknown_family_and_bad_sizes_fail_before_compiling():
  with pytest.raises(ValueError, match="degradation.name"):
    degradations.build(config(name="jpeg", time_steps=3), 32, 3)
  for bad in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match="degradation.time_steps"):
      degradations.build(config(**dict(CASES[0][1], time_steps=bad)), 32, 3)
  with pytest.raises(ValueError, match="data.image_size"):
    degradations.build(config(**CASES[0][1]), 0, 3)
  with pytest.raises(ValueError, match="data.channels"):
    degradations.build(config(**CASES[0][1]), 32, 0)
