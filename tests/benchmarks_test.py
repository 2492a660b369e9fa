"""Smoke test of benchmarks/degradations.py in its --quick mode."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from benchmarks import degradations as bench
from colddiff_jax import degradations


def test_quick_run_times_every_family_and_checks_the_chains(tmp_path, capsys):
  out = tmp_path / "results" / "degradations.json"
  bench.main(["--quick", "--out", str(out)])

  data = json.loads(out.read_text())
  for key in ("date", "jax_version", "backend", "device_kind"):
    assert data[key]
  rows = data["results"]
  assert [(r["family"], r["setting"]) for r in rows] == [
      (f, s) for f in bench.CASES for s in bench.SETTINGS]
  for r in rows:
    assert r["table_ms"] > 0
    if r["family"] in bench.CHAINS:
      # The chain computes the same D(x0, T) as the table.
      assert r["chain_ms"] > 0 and r["speedup"] > 0
      assert r["max_abs_err"] <= 1e-5, r
    else:
      assert r["chain_ms"] is None
  assert data["target"]["conclusive"] is False
  printed = capsys.readouterr().out
  assert "speedup" in printed and "Target:" in printed


@pytest.mark.parametrize("cfg", [
    dict(name="blur", time_steps=6, blur_routine="Incremental", blur_size=5,
         blur_std=0.5, discrete=False),
    dict(name="blur", time_steps=6, blur_routine="Exponential", blur_size=5,
         blur_std=0.2, discrete=True),
    dict(name="blur", time_steps=6, blur_routine="Individual_Incremental",
         blur_size=3, blur_std=0.1, discrete=False),
    dict(name="blur", time_steps=6, blur_routine="Constant_reflect",
         blur_size=7, blur_std=1.5, discrete=False),
    dict(name="mask", time_steps=8, fade_routine="Constant", kernel_std=2.0),
    dict(name="mask", time_steps=8, fade_routine="Random_Incremental",
         kernel_std=0.5, initial_mask=1),
    dict(name="resolution", time_steps=3, resolution_routine="Incremental"),
    dict(name="resolution", time_steps=3,
         resolution_routine="Incremental_area_with_blur"),
    dict(name="resolution", time_steps=3,
         resolution_routine="Incremental_bilinear_factor_2"),
    dict(name="decolor", time_steps=5, decolor_routine="Constant",
         decolor_ema_factor=0.7),
], ids=lambda cfg: f"{cfg['name']}-{list(cfg.values())[2]}")
def test_chain_equals_table_for_other_routines(cfg):
  """The step chains are exact for routines the benchmark does not time too."""
  deg = degradations.build(ml_collections.ConfigDict(cfg), 16, 3)
  shape = (2, 16, 16, 3)
  x0 = jax.random.uniform(jax.random.key(0), shape, jnp.float32, -1.0, 1.0)
  aux = bench.make_aux(cfg["name"], deg, jax.random.key(1), 2, shape)
  table = deg.apply(x0, jnp.full((2,), deg.num_steps), aux)
  chain = jax.jit(bench.CHAINS[cfg["name"]](deg))(x0, aux)
  np.testing.assert_allclose(np.asarray(chain), np.asarray(table), atol=2e-6)
