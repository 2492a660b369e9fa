"""Smoke test of benchmarks/degradations.py in its --quick mode."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from benchmarks import conv_floor
from benchmarks import degradations as bench
from benchmarks import run_all
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
  train_step.main(["--quick", "--in-process", "--cases", "mnist_blur",
                   "celeba_blur", "--out", str(out)])

  data = json.loads(out.read_text())
  for key in ("date", "jax_version", "backend", "device_kind", "cpu_count"):
    assert data[key]
  rows = data["results"]
  assert [r["case"] for r in rows] == ["mnist_blur", "celeba_blur"]
  for r in rows:
    case = train_step.CASES[r["case"]]
    assert r["images_per_step"] == r["batch"] * r["grad_accum"] == 16
    assert r["compile_s"] > 0 and r["step_s"] > 0 and r["runs"] >= 1
    assert r["img_per_s"] == pytest.approx(16 / r["step_s"])
    assert r["ratio"] == pytest.approx(r["img_per_s"] / case.official_img_s)
    assert np.isfinite(r["loss"])
    assert r["peak_memory_mib"] is not None and r["memory_source"]
    assert r["xla_temp_mib"] > 0 and r["remat"] is False
    assert r["comparable"] is False  # --quick: not the official batch/size
  assert rows[1]["time_steps"] == 200 and rows[1]["channels"] == 3
  assert [t["conclusive"] for t in data["targets"]] == [False, False]
  printed = capsys.readouterr().out
  assert "img/s" in printed and "Target mnist_blur" in printed

  # The per-config worker processes get the same settings back.
  args = train_step.parse_args(["--quick", "--dtype", "bfloat16", "--remat",
                                "--grad-accum", "3", "--peak-tflops", "100"])
  worker = train_step.parse_args(
      train_step._worker_argv(args, "celeba_blur", "row.json")[3:])
  assert worker.worker_out == "row.json" and worker.cases == ["celeba_blur"]
  for key in ("quick", "dtype", "remat", "grad_accum", "peak_tflops",
              "repeats", "budget", "batch", "mesh_data", "seed"):
    assert getattr(worker, key) == getattr(args, key), key


def test_run_all_quick_writes_every_section(tmp_path, capsys):
  """benchmarks/run_all.py --quick: every section, one config each (the
  train case also with --remat)."""
  out = tmp_path / "cpu.json"
  run_all.main(["--quick", "--train-cases", "mnist_blur", "--sample-cases",
                "celeba_blur", "--input-seconds", "0.2", "--remat",
                "--out", str(out)])
  data = json.loads(out.read_text())
  for key in ("date", "jax_version", "backend", "xla_flags", "load_average"):
    assert data[key] is not None
  assert data["quick"] and data["repeats"] == 2 and data["sample_steps"] == 2
  train, remat = data["train"]
  assert train["case"] == remat["case"] == "mnist_blur" and train["runs"] == 2
  assert not train["remat"] and remat["remat"]
  # Rematerialised: less scratch memory for more FLOPs.
  assert remat["xla_temp_mib"] < train["xla_temp_mib"]
  assert remat["flops_per_step"] > train["flops_per_step"]
  assert train["flops_per_step"] > 0 and 0 < train["utilisation"]
  assert train["peak"]["peak_flops"] > 0 and "FMA" in train["peak"]["formula"]
  (sample,) = data["sample"]
  assert sample["time_steps"] == 200 and sample["timed_steps"] == 2
  assert sample["extrapolated"] and sample["runs"] == 2
  assert sample["total_s"] == pytest.approx(200 * sample["run_s"] / 2)
  assert sample["official_s"] is None  # --quick is not comparable
  (degrade,) = data["degrade"]
  assert degrade["max_abs_err"] <= 1e-5 and degrade["speedup"] > 0
  assert [r["source"] for r in data["input"]] == ["mnist_embedded", "celeba_hq"]
  for r in data["input"]:
    assert r["img_per_s"] > 0
  assert data["input"][0]["train_step_img_per_s"] == train["img_per_s"]
  (floor,) = data["convs"]  # the float32 step's, below its train row
  assert floor["case"] == "mnist_blur" and not floor["remat"]
  assert floor["executions"] >= floor["distinct"] > 0
  assert floor["floor_s"] == pytest.approx(
      sum(c["count"] * c["median_s"] for c in floor["convs"]))
  assert floor["bound_img_per_s"] == pytest.approx(
      floor["images_per_step"] / floor["floor_s"])
  workloads = [line["workload"] for line in data["summary"]]
  assert len(workloads) == 7 and workloads[0].startswith("train mnist_blur")
  assert workloads[1].startswith("  its convolutions alone: mnist_blur")
  assert workloads[2].endswith("remat")
  assert all(line["met"] is None for line in data["summary"])  # no targets
  printed = capsys.readouterr().out
  assert "official" in printed and "CPU peak" in printed


def test_run_all_targets_and_peak():
  """The summary compares with the official figures; the CPU peak formula."""
  line = run_all.summary({
      "train": [], "convs": [], "sample": [], "input": [],
      "degrade": [{"config": "celeba_blur", "image_size": 128,
                   "time_steps": 200, "batch": 4, "table_ms": 2.0,
                   "official_chain_ms": 1100.0, "speedup_vs_official": 550.0,
                   "chain_ms": 900.0, "speedup": 450.0}]})[0]
  assert line["target"] == run_all.DEGRADE_TARGET and line["met"] is True
  peak = run_all.cpu_peak()
  assert peak["peak_flops"] == pytest.approx(
      peak["cores"] * peak["flops_per_cycle_per_core"] * peak["mhz"] * 1e6)
  gpu = run_all.gpu_peak("NVIDIA H200", "bfloat16", None)
  assert gpu["peak_flops"] == pytest.approx(989.4e12)
  assert run_all.gpu_peak("NVIDIA H200", "float32", 50.0)["peak_flops"] == 50e12


def _conv(x, w, stride=1):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO",
                                                         "NHWC"))


def test_conv_floor_counts_forward_and_gradient_convolutions():
  """The walk finds every convolution autodiff writes, in sub-programs too:
  two layers' forward passes, both kernel gradients and the input gradient
  of the second (the data needs none); a scan of 3 runs its body 3 times; of
  a cond's branches the one with fewer convolutions counts."""
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  w1 = jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32)
  w2 = jax.ShapeDtypeStruct((3, 3, 4, 5), jnp.float32)

  def loss(w1, w2, x):
    return jnp.sum(_conv(jax.nn.relu(_conv(x, w1)), w2, stride=2))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  calls = conv_floor.collect(grad, w1, w2, x)
  assert sum(c.count for c in calls) == 5
  described = [c.describe() for c in calls]
  assert "[2, 8, 8, 3] x [3, 3, 3, 4] NHWC,HWIO->NHWC" in described[0]
  assert "window_strides=(2, 2)" in described[1]
  assert sum("lhs_dilation=(2, 2)" in d for d in described) == 1  # dL/dx

  def scanned(w1, w2, x):
    def body(carry, _):
      return carry, grad(w1, w2, x)
    return jax.lax.scan(body, 0.0, None, length=3)[1]

  assert sum(c.count for c in conv_floor.collect(scanned, w1, w2, x)) == 15

  def branchy(w1, x, pred):
    return jax.lax.cond(pred, lambda: _conv(x, w1),
                        lambda: jnp.zeros((2, 8, 8, 4)))

  assert conv_floor.collect(branchy, w1, x, True) == []


def test_conv_floor_times_each_distinct_convolution():
  x = jnp.ones((2, 8, 8, 3))
  w = jnp.ones((3, 3, 3, 3))
  twice = lambda x, w: _conv(_conv(x, w), w)  # one shape, run twice
  result = conv_floor.measure(twice, x, w, repeats=2)
  assert result["distinct"] == 1 and result["executions"] == 2
  (row,) = result["convs"]
  assert row["count"] == 2 and row["total_s"] == 2 * row["median_s"] > 0
  assert result["seconds"] == row["total_s"]
  # XLA counts the taps that land on the image: 22 (of 24) per axis, for
  # 2 images x 3 in x 3 out channels, 2 FLOPs per multiply-add.
  assert row["flops"] == pytest.approx(2 * (2 * 3 * 3 * 22 * 22))
  assert result["flops"] == pytest.approx(2 * row["flops"])
  assert row["gflop_per_s"] == pytest.approx(
      row["flops"] / row["median_s"] / 1e9)


def test_conv_floor_script_quick(tmp_path, capsys):
  """python -m benchmarks.conv_floor --quick: one case, table and JSON."""
  out = tmp_path / "conv_floor.json"
  (row,) = conv_floor.main(["--quick", "--cases", "cifar10_blur",
                            "--repeats", "1", "--top", "3", "--out",
                            str(out)])
  data = json.loads(out.read_text())
  assert data["benchmark"] == "conv_floor" and data["rows"][0] == row
  assert row["case"] == "cifar10_blur" and not row["comparable"]
  printed = capsys.readouterr().out
  counts = f"{row['executions']} convolutions ({row['distinct']} distinct)"
  assert counts in printed
  # The header, then the three costliest convolutions.
  table = printed.split("take")[1].splitlines()[1:5]
  assert table[0].split()[:2] == ["total", "ms"]
  assert all("NHWC" in line or "CHWN" in line for line in table[1:])
