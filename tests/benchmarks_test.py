"""Smoke test of benchmarks/degradations.py in its --quick mode."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from benchmarks import degradations as bench
from benchmarks import train_step
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


def test_train_step_quick_run_times_both_configs(tmp_path, capsys):
  """benchmarks/train_step.py --quick: tiny U-Net, both configs, in process."""
  out = tmp_path / "results" / "train_step.json"
  train_step.main(["--quick", "--in-process", "--out", str(out)])

  data = json.loads(out.read_text())
  for key in ("date", "jax_version", "backend", "device_kind", "cpu_count"):
    assert data[key]
  rows = data["results"]
  assert [r["case"] for r in rows] == list(train_step.CASES)
  for r, case in zip(rows, train_step.CASES.values()):
    assert r["images_per_step"] == r["batch"] * r["grad_accum"] == 16
    assert r["compile_s"] > 0 and r["step_s"] > 0 and r["runs"] >= 1
    assert r["img_per_s"] == pytest.approx(16 / r["step_s"])
    assert r["ratio"] == pytest.approx(r["img_per_s"] / case.official_img_s)
    assert np.isfinite(r["loss"])
    assert r["peak_memory_mib"] is not None and r["memory_source"]
    assert r["comparable"] is False  # --quick: not the official batch/size
  assert rows[1]["time_steps"] == 200 and rows[1]["channels"] == 3
  assert [t["conclusive"] for t in data["targets"]] == [False, False]
  printed = capsys.readouterr().out
  assert "img/s" in printed and "Target mnist_blur" in printed

  # The per-config worker processes get the same settings back.
  args = train_step.parse_args(["--quick", "--dtype", "bfloat16",
                                "--grad-accum", "3", "--peak-tflops", "100"])
  worker = train_step.parse_args(
      train_step._worker_argv(args, "celeba_blur", "row.json")[3:])
  assert worker.worker_out == "row.json" and worker.cases == ["celeba_blur"]
  for key in ("quick", "dtype", "grad_accum", "peak_tflops", "repeats",
              "budget", "batch", "mesh_data", "seed"):
    assert getattr(worker, key) == getattr(args, key), key
