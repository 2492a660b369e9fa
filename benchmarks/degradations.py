"""Forward degradations: the precomputed table form against the official chain.

What is measured. For every family (blur, mask, mask_generation, resolution,
snow, decolor, mix, noise) and two settings, 32x32 (the CIFAR-10 config of the
family) and 128x128 (its CelebA config), on a batch of 64 random images:

* table: `jax.jit(deg.apply)` at s = T, the form colddiff_jax runs (a gather
  from a table built once, then work that does not grow with s);
* chain, for the cumulative families only: the T per-step operations of the
  official code in one jitted `lax.scan`, as a straight JAX port would run it:
    blur        jnp.pad (wrap or reflect) of the state, then a depthwise
                lax.conv_general_dilated (feature_group_count=C, NCHW as
                the official Conv2d) with the step's k x k Gaussian;
    mask        state * m_i (Random_Incremental: each example's N x N window
                is cropped from the 2N x 2N step mask at every step);
    resolution  PyTorch-style down-sampling (bicubic / bilinear / area as a
                per-axis matrix), nearest-exact up-sampling by index gather,
                plus the 3x3 reflect blurs of the `_with_blur` routines. The
                down size changes at every step, so this chain is an unrolled
                loop inside jit rather than a scan;
    decolor     the step's C x C channel matrix K_i at every pixel.
  The chain's output is compared with the table's (max abs error), so both
  columns compute the same D(x0, T).

The 32x32 setting of families without a CIFAR-10 config (mask_generation, mix,
noise) builds their CelebA config at 32x32; such rows are marked with '*'.

How it is timed. Each function is compiled ahead of time (not timed), run once
as a warm-up, then run up to --repeats times (fewer if that would take longer
than --budget seconds) and the median wall time is reported, each run ending
with `block_until_ready`. A function whose warm-up run alone takes longer than
--budget (the 128x128 blur chain on a CPU) is not run again: that one,
already compiled, run is its time (runs = 1 in the JSON).

The issue's target: the table form is at least 20x faster than the chain for
CelebA 128x128 blur (T = 200, Exponential_reflect, k = 15).

Like the CLI, the script first restarts itself with malloc asking for
transparent huge pages (`benchmarks.common.start`); --no-huge-pages keeps
malloc's defaults.

Run (a few minutes on 2 CPU cores, dominated by the 128x128 blur chain):
  python -m benchmarks.degradations
  python -m benchmarks.degradations --quick          # tiny smoke run
  python -m benchmarks.degradations --families blur mask --repeats 20
Results are printed as a table and written to benchmarks/results/
degradations.json (--out to change), with the JAX version, backend, device
kind and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

from colddiff_jax import degradations as deglib
from colddiff_jax.degradations import blur as blur_lib
from colddiff_jax.degradations import operators
from colddiff_jax.degradations import resolution as resolution_lib

# family -> (config of the 32x32 setting, config of the 128x128 setting).
CASES = {
    "blur": ("cifar10_blur", "celeba_blur"),
    "mask": ("cifar10_inpaint", "celeba_inpaint"),
    "mask_generation": ("celeba_inpaint_generation", "celeba_inpaint_generation"),
    "resolution": ("cifar10_superres", "celeba_superres"),
    "snow": ("cifar10_snow", "celeba_snow"),
    "decolor": ("cifar10_decolor", "celeba_decolor"),
    "mix": ("afhq_to_celeba", "afhq_to_celeba"),
    "noise": ("celeba_noise", "celeba_noise"),
}
SETTINGS = (32, 128)
# --quick shrinks each setting's image side to this.
QUICK_SIZES = {32: 16, 128: 32}
# The target: table >= TARGET_SPEEDUP x faster than the chain here.
TARGET_FAMILY, TARGET_CONFIG, TARGET_SETTING = "blur", "celeba_blur", 128
TARGET_SPEEDUP = 20.0

DEFAULT_OUT = (pathlib.Path(__file__).resolve().parent / "results"
               / "degradations.json")
_HI = lax.Precision.HIGHEST

ChainFn = Callable[[jax.Array, Any], jax.Array]


# ------------------------------------------------------------------ chains ----


def _depthwise_blur(x: jax.Array, kernel: jax.Array, mode: str) -> jax.Array:
  """One official blur step: pad the state, then a depthwise k x k correlation.

  Works in PyTorch's NCHW layout, as the official Conv2d(groups=C) does; XLA:CPU
  runs this depthwise convolution 2-3x faster than in NHWC, so the chain is
  not handicapped by our layout.

  Args:
    x: [B, C, H, W] state.
    kernel: [k, k] kernel, odd k, applied to every channel.
    mode: jnp.pad mode, 'wrap' (PyTorch circular) or 'reflect'.

  Returns:
    The blurred [B, C, H, W] state.
  """
  k, c = kernel.shape[0], x.shape[1]
  p = (k - 1) // 2
  padded = jnp.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode=mode)
  weights = jnp.broadcast_to(kernel[None, None], (c, 1, k, k))
  return lax.conv_general_dilated(
      padded, weights, window_strides=(1, 1), padding="VALID",
      dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=c,
      precision=_HI)


def _to_nchw(x: jax.Array) -> jax.Array:
  return jnp.transpose(x, (0, 3, 1, 2))


def _to_nhwc(x: jax.Array) -> jax.Array:
  return jnp.transpose(x, (0, 2, 3, 1))


def blur_chain(deg) -> ChainFn:
  """The official blur forward: T pad + depthwise-conv steps in a lax.scan."""
  modes = {mode for _, _, mode in deg.schedule}
  if len(modes) != 1:
    raise ValueError(f"blur schedule mixes pad modes {sorted(modes)}.")
  (mode,) = modes
  # Kernels of different sizes (Individual_Incremental) are zero-padded to the
  # largest: wider wrap/reflect padding leaves the inner values, hence the
  # result, unchanged. Every benchmarked routine uses a single size.
  size = max(k for k, _, _ in deg.schedule)
  kernels = np.zeros((deg.num_steps, size, size), np.float32)
  for i, (k, sigma, _) in enumerate(deg.schedule):
    o = (size - k) // 2
    kernels[i, o:o + k, o:o + k] = blur_lib.kernel_2d(k, sigma)
  kernels = jnp.asarray(kernels)

  def chain(x, aux):
    del aux

    def step(state, kernel):
      return _depthwise_blur(state, kernel, mode), None

    x, _ = lax.scan(step, _to_nchw(x), kernels)
    x = _to_nhwc(x)
    if deg.discrete:  # The official D(x, T) of the generation runs: the mean.
      x = jnp.broadcast_to(jnp.mean(x, axis=(1, 2), keepdims=True), x.shape)
    return x

  return chain


def mask_chain(deg) -> ChainFn:
  """The official inpainting forward: one mask multiplication per step."""
  masks = jnp.asarray(deg.step_masks, jnp.float32)  # [T, M, M], M = N or 2N
  n = deg.image_size

  def chain(x, aux):
    offsets = (jnp.broadcast_to(jnp.asarray(aux["offset"], jnp.int32),
                                (x.shape[0], 2)) if deg.random else None)

    def step(state, mask):
      if deg.random:
        mask = jax.vmap(
            lambda off: lax.dynamic_slice(mask, (off[0], off[1]), (n, n)))(offsets)
      return state * mask[..., None], None

    x, _ = lax.scan(step, x, masks)
    return x

  return chain


_DOWN = {
    "bicubic": operators.bicubic_operator,
    "bilinear": operators.bilinear_operator,
    "area": operators.area_operator,
}


def resolution_chain(deg) -> ChainFn:
  """The official super-resolution forward: down- then up-sample per step."""
  mode, _, with_blur = resolution_lib.ROUTINES[deg.config.resolution_routine]
  n = deg.image_size
  downs, ups = [], []
  for size in deg.sizes:
    downs.append(jnp.asarray(_DOWN[mode](n, size), jnp.float32))  # [size, N]
    ups.append(jnp.asarray(
        np.argmax(operators.nearest_exact_operator(size, n), axis=1), jnp.int32))
  blur3 = jnp.asarray(blur_lib.kernel_2d(3, 0.5), jnp.float32)

  def chain(x, aux):
    del aux
    # Sizes differ per step, so the steps are unrolled (T is 3 or 4 here).
    for down, up in zip(downs, ups):
      if with_blur:
        x = _to_nhwc(_depthwise_blur(_to_nchw(x), blur3, "reflect"))
      x = jnp.einsum("hi,biwc->bhwc", down, x, precision=_HI)
      x = jnp.einsum("wj,bhjc->bhwc", down, x, precision=_HI)
      x = jnp.take(jnp.take(x, up, axis=1), up, axis=2)  # nearest-exact
      if with_blur:
        x = _to_nhwc(_depthwise_blur(_to_nchw(x), blur3, "reflect"))
    return x

  return chain


def decolor_chain(deg) -> ChainFn:
  """The official decolorization forward: one 1x1 channel mix per step."""
  mats = jnp.asarray(deg.step_matrices, jnp.float32)  # [T, C_out, C_in]

  def chain(x, aux):
    del aux

    def step(state, mat):
      return jnp.einsum("oi,bhwi->bhwo", mat, state, precision=_HI), None

    x, _ = lax.scan(step, x, mats)
    return x

  return chain


CHAINS = {
    "blur": blur_chain,
    "mask": mask_chain,
    "resolution": resolution_chain,
    "decolor": decolor_chain,
}


# ------------------------------------------------------------------ timing ----


@dataclasses.dataclass
class Timing:
  """Median wall time of a compiled function and how it was obtained."""
  median_ms: float
  runs: int
  compile_s: float


def time_fn(fn: Callable, args: Sequence, repeats: int,
            budget_s: float) -> tuple[Timing, jax.Array]:
  """Times jit(fn)(*args); see the module docstring for the policy.

  Args:
    fn: the function to jit.
    args: its arguments.
    repeats: most timed runs after the warm-up.
    budget_s: seconds of timed runs to aim for; a warm-up longer than this is
      the only run.

  Returns:
    The timing and fn's output.
  """
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start

  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  first = time.perf_counter() - start
  if first >= budget_s:
    return Timing(first * 1e3, 1, compile_s), out
  runs = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return Timing(statistics.median(times) * 1e3, runs, compile_s), out


# --------------------------------------------------------------- benchmark ----


def build_case(family: str, config_name: str, image_size: int):
  """(degradation, channels, config's own image size) of one benchmark row."""
  config = importlib.import_module(f"configs.{config_name}").get_config()
  if config.degradation.name != family:
    raise ValueError(f"configs/{config_name}.py is not a {family} config.")
  channels = config.data.channels
  deg = deglib.build(config.degradation, image_size, channels)
  return deg, channels, config.data.image_size


def make_aux(family: str, deg, rng: jax.Array, batch: int, shape):
  """The aux of one batch: drawn, a random partner image (mix) or None."""
  if family == "mix":
    partner = jax.random.uniform(rng, shape, jnp.float32, -1.0, 1.0)
    return deg.make_aux(partner)
  if deg.random:
    return deg.sample_aux(rng, batch)
  return None


def run_case(family: str, config_name: str, setting: int, image_size: int,
             batch: int, repeats: int, budget_s: float, seed: int) -> dict:
  """Times one (family, setting) row; returns it as a JSON-ready dict."""
  deg, channels, own_size = build_case(family, config_name, image_size)
  t = deg.num_steps
  shape = (batch, image_size, image_size, channels)
  k_x, k_aux = jax.random.split(jax.random.key(seed))
  x0 = jax.random.uniform(k_x, shape, jnp.float32, -1.0, 1.0)
  aux = make_aux(family, deg, k_aux, batch, shape)
  s = jnp.full((batch,), t, jnp.int32)

  table, table_out = time_fn(deg.apply, (x0, s, aux), repeats, budget_s)
  row = {
      "family": family,
      "config": config_name,
      "setting": setting,
      "image_size": image_size,
      "config_image_size": own_size,
      "channels": channels,
      "time_steps": t,
      "batch": batch,
      "table_ms": table.median_ms,
      "table_runs": table.runs,
      "table_compile_s": table.compile_s,
      "chain_ms": None,
      "chain_runs": None,
      "chain_compile_s": None,
      "speedup": None,
      "max_abs_err": None,
  }
  if family in CHAINS:
    chain, chain_out = time_fn(CHAINS[family](deg), (x0, aux), repeats, budget_s)
    err = float(jnp.max(jnp.abs(chain_out - table_out)))
    row.update(chain_ms=chain.median_ms, chain_runs=chain.runs,
               chain_compile_s=chain.compile_s,
               speedup=chain.median_ms / table.median_ms, max_abs_err=err)
  return row



def format_table(rows: list[dict]) -> str:
  """The results as a fixed-width text table."""
  header = (f"{'family':<16} {'config':<27} {'size':>5} {'T':>4} "
            f"{'table ms':>10} {'chain ms':>11} {'speedup':>9} {'max err':>9}")
  lines = [header, "-" * len(header)]
  for r in rows:
    name = r["config"] + ("*" if r["image_size"] != r["config_image_size"] else "")
    lines.append(
        f"{r['family']:<16} {name:<27} {r['image_size']:>5} {r['time_steps']:>4} "
        f"{r['table_ms']:>10.3f} {common.fmt(r['chain_ms'], '11.1f'):>11} "
        f"{common.fmt(r['speedup'], '8.1f') + ('x' if r['speedup'] else ''):>9} "
        f"{common.fmt(r['max_abs_err'], '9.1e'):>9}")
  lines.append("* config built at a size other than its own data.image_size.")
  return "\n".join(lines)


def check_target(rows: list[dict], quick: bool) -> dict | None:
  """The issue's target (table >= 20x chain, CelebA blur) on the results."""
  for r in rows:
    if (r["family"], r["config"], r["setting"]) == (
        TARGET_FAMILY, TARGET_CONFIG, TARGET_SETTING):
      return {
          "description": (f"table >= {TARGET_SPEEDUP:g}x faster than chain, "
                          f"{TARGET_CONFIG} T={r['time_steps']}"),
          "image_size": r["image_size"],
          "required_speedup": TARGET_SPEEDUP,
          "speedup": r["speedup"],
          "met": r["speedup"] >= TARGET_SPEEDUP,
          # --quick runs it at a reduced size: indicative only.
          "conclusive": not quick,
      }
  return None



def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Time degradation tables against the official step chains.")
  parser.add_argument("--quick", action="store_true",
                      help="tiny images, batch and repeats (a smoke run).")
  parser.add_argument("--batch", type=int, default=None,
                      help="images per batch (default 64; 4 with --quick).")
  parser.add_argument("--repeats", type=int, default=None,
                      help="most timed runs per function (default 10; 2 "
                      "with --quick).")
  parser.add_argument("--budget", type=float, default=None,
                      help="seconds of timed runs per function (default 5; "
                      "0.5 with --quick); a slower warm-up is the only run.")
  parser.add_argument("--families", nargs="+", choices=sorted(CASES),
                      default=list(CASES), help="families to run (default all).")
  parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the inputs.")
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                      help=f"JSON output path (default {DEFAULT_OUT}).")
  common.add_huge_pages_flag(parser)
  args = parser.parse_args(argv)
  if args.batch is None:
    args.batch = 4 if args.quick else 64
  if args.repeats is None:
    args.repeats = 2 if args.quick else 10
  if args.budget is None:
    args.budget = 0.5 if args.quick else 5.0
  if args.batch < 1 or args.repeats < 1 or args.budget <= 0:
    parser.error("--batch and --repeats must be >= 1 and --budget > 0.")
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the benchmark, prints the table and writes the JSON; returns it."""
  args = parse_args(argv)
  env = common.environment()
  print(f"jax {env['jax_version']} | backend {env['backend']} | device "
        f"{env['device_kind']} | batch {args.batch} | {env['date']}"
        + (" | QUICK" if args.quick else ""), flush=True)

  rows = []
  for family in args.families:
    for setting, config_name in zip(SETTINGS, CASES[family]):
      size = QUICK_SIZES[setting] if args.quick else setting
      row = run_case(family, config_name, setting, size, args.batch,
                     args.repeats, args.budget, args.seed)
      rows.append(row)
      print(f"  {family:<16} {size:>4}px  table {row['table_ms']:.3f} ms"
            + (f"  chain {row['chain_ms']:.1f} ms" if row["chain_ms"] else ""),
            flush=True)

  print()
  print(format_table(rows))
  target = check_target(rows, args.quick)
  if target is not None:
    verdict = "MET" if target["met"] else "NOT MET"
    note = "" if target["conclusive"] else (
        f" (--quick, {target['image_size']}x{target['image_size']}: "
        "indicative only)")
    print(f"\nTarget: {target['description']} at {target['image_size']}x"
          f"{target['image_size']}: {target['speedup']:.1f}x -> {verdict}{note}")

  result = {
      "benchmark": "degradations",
      **env,
      "quick": args.quick,
      "batch": args.batch,
      "repeats": args.repeats,
      "budget_s": args.budget,
      "seed": args.seed,
      "results": rows,
      "target": target,
  }
  common.write_json(args.out, result)
  return result


if __name__ == "__main__":
  common.start(sys.argv[1:])
  main(sys.argv[1:])
