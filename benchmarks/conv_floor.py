"""The convolutions of a program, timed alone: a floor under its run time.

A train step costs its convolutions plus everything else (normalisations,
activations, layout transposes, the optimizer). Timing the convolutions alone,
each one at the shapes and parameters the step runs it with, bounds what any
rewrite of the rest can achieve on this backend: the step cannot take less
than the sum, so its img/s cannot exceed images / floor. On a 2-core CPU that
bound decides whether a throughput target is reachable at all with these
convolution kernels.

How. `jax.make_jaxpr` of the program is walked into every sub-program (jit,
remat, the rules of custom VJPs, scan bodies counted `length` times, the
cheaper branch of a cond: a floor counts what must run) and every
`conv_general_dilated` is listed with its operands' shapes and its parameters:
forward, input-gradient and kernel-gradient convolutions alike, as the
program's autodiff wrote them. Each distinct one is compiled alone and timed
on random operands (a warm-up, then the median of `repeats` runs); the floor
is the sum over distinct convolutions of count x median.

What it leaves out. The depthwise convolutions that the CPU fast paths
compute as shifted adds (colddiff_jax/models/layers.py) are not convolutions
in the program and are not counted; neither are the layout transposes XLA
adds around convolutions inside a larger program. Inside the program XLA may
also run a convolution on another layout or overlap it with other work, so
the floor is a measured estimate, not a proof. The shapes are the traced,
global ones: on a mesh of several devices each device runs a slice of each
batch, so the callers report the floor for one-device programs only.

Like the CLI, the script first restarts itself with malloc asking for
transparent huge pages (`benchmarks.common.start`); --no-huge-pages keeps
malloc's defaults.

  python -m benchmarks.conv_floor                      # the three train steps
  python -m benchmarks.conv_floor --cases mnist_blur --top 20
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import pathlib
import sys
from typing import Any, Callable, Iterator, Sequence

import jax
from jax import lax
from jax.extend import core as jax_core
import numpy as np

from benchmarks import common
from benchmarks import train_step

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "conv_floor.json"
_CONV = "conv_general_dilated"


@dataclasses.dataclass(frozen=True)
class ConvCall:
  """One distinct convolution of a program and how often one run executes it."""
  lhs: jax.ShapeDtypeStruct
  rhs: jax.ShapeDtypeStruct
  params: tuple[tuple[str, Any], ...]  # conv_general_dilated's, sorted
  count: int

  def describe(self) -> str:
    """lhs x rhs with the parameters that tell forward from gradients."""
    p = dict(self.params)
    extras = [f"{k}={p[k]}" for k in ("window_strides", "lhs_dilation",
                                      "rhs_dilation")
              if any(v != 1 for v in p[k])]
    for k in ("feature_group_count", "batch_group_count"):
      if p[k] != 1:
        extras.append(f"{k}={p[k]}")
    dn = p["dimension_numbers"]
    specs = (f"{_layout(dn.lhs_spec, 'NC')},{_layout(dn.rhs_spec, 'OI')}->"
             f"{_layout(dn.out_spec, 'NC')}")
    pad = [tuple(x) for x in p["padding"]]
    return " ".join([f"{list(self.lhs.shape)} x {list(self.rhs.shape)}",
                     specs, f"pad={pad}"] + extras)


def _layout(spec: Sequence[int], names: str) -> str:
  """A dimension spec as letters, e.g. (0, 3, 1, 2) with 'NC' -> 'NHWC'.

  `spec` lists the dimension holding (batch or out-feature, feature or
  in-feature, spatial...). A forward convolution reads NHWC,HWIO->NHWC; the
  kernel gradient XLA derives swaps batch and features (CHWN,IHWO->HWNC).
  """
  letters = [""] * len(spec)
  for name, dim in zip(names + "HWD"[:len(spec) - 2], spec):
    letters[dim] = name
  return "".join(letters)


def _sub_jaxprs(eqn) -> Iterator[tuple[jax_core.Jaxpr, int]]:
  """(sub-program, executions per execution of `eqn`) of one equation that
  is not a cond (`_count` takes one branch of those)."""
  times = int(eqn.params["length"]) if eqn.primitive.name == "scan" else 1
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax_core.ClosedJaxpr):
        yield v.jaxpr, times
      elif isinstance(v, jax_core.Jaxpr):
        yield v, times


def _count(jaxpr: jax_core.Jaxpr, times: int,
           counts: collections.Counter) -> None:
  """Adds the convolutions `jaxpr` runs (`times` executions) to `counts`."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == _CONV:
      lhs, rhs = (v.aval for v in eqn.invars)
      key = (jax.ShapeDtypeStruct(lhs.shape, lhs.dtype),
             jax.ShapeDtypeStruct(rhs.shape, rhs.dtype),
             tuple(sorted(eqn.params.items())))
      counts[key] += times
    elif eqn.primitive.name == "cond":
      branches = []
      for branch in eqn.params["branches"]:
        branch_counts = collections.Counter()
        _count(branch.jaxpr, times, branch_counts)
        branches.append(branch_counts)
      counts.update(min(branches, key=lambda c: sum(c.values())))
    else:
      for sub, n in _sub_jaxprs(eqn):
        _count(sub, times * n, counts)


def collect(fn: Callable, *args) -> list[ConvCall]:
  """The distinct convolutions one call of `fn(*args)` executes.

  `args` may be arrays or `jax.ShapeDtypeStruct`s (nothing is computed).
  Convolutions equal in shapes, dtypes and parameters are one entry with
  their total count; the list is in order of first appearance.
  """
  counts = collections.Counter()
  _count(jax.make_jaxpr(fn)(*args).jaxpr, 1, counts)
  return [ConvCall(lhs, rhs, params, n) for (lhs, rhs, params), n
          in counts.items()]


def _random(struct: jax.ShapeDtypeStruct, rng: np.random.Generator):
  return jax.device_put(rng.standard_normal(struct.shape).astype(struct.dtype))


def time_call(call: ConvCall, repeats: int,
              rng: np.random.Generator) -> dict:
  """Compiles `call`'s convolution alone and times it: a JSON-ready row."""
  params = dict(call.params)
  conv = jax.jit(lambda lhs, rhs: lax.conv_general_dilated_p.bind(
      lhs, rhs, **params))
  lhs, rhs = _random(call.lhs, rng), _random(call.rhs, rng)
  compiled = conv.lower(lhs, rhs).compile()
  median = common.time_compiled(compiled, (lhs, rhs), repeats)["median_s"]
  flops = common.xla_flops(compiled)
  return {"conv": call.describe(), "count": call.count, "median_s": median,
          "total_s": call.count * median, "flops": flops,
          "gflop_per_s": flops / median / 1e9 if flops else None}


def measure(fn: Callable, *args, repeats: int = 5, seed: int = 0) -> dict:
  """The convolution floor of one call of `fn(*args)`.

  Returns:
    seconds: sum over distinct convolutions of count x median time alone;
    flops: XLA's count for the same executions (None if not reported);
    distinct / executions: how many convolutions, distinct and in all;
    convs: one row per distinct convolution (`time_call`), slowest total
      first.
  """
  calls = collect(fn, *args)
  rng = np.random.default_rng(seed)
  rows = [time_call(call, repeats, rng) for call in calls]
  rows.sort(key=lambda r: -r["total_s"])
  flops = [r["flops"] and r["count"] * r["flops"] for r in rows]
  return {"seconds": sum(r["total_s"] for r in rows),
          "flops": None if None in flops else sum(flops),
          "distinct": len(rows), "executions": sum(r["count"] for r in rows),
          "repeats": repeats, "convs": rows}


# ---------------------------------------------------------- train steps ----


def train_step_floor(name: str, targs: argparse.Namespace) -> dict:
  """The floor of benchmarks/train_step.py's step for case `name`.

  `targs` are train_step's arguments (--quick, --dtype, --remat, ...). The
  row compares images / floor, the most img/s the step could reach with these
  convolutions, with the official img/s.
  """
  case = train_step.CASES[name]
  config = train_step.make_config(case, targs)
  built = train_step.build_step(config)
  if built.mesh.devices.size != 1:
    raise ValueError(f"{name}: the convolution floor is for a one-device "
                     f"mesh (this one has {built.mesh.devices.size}); pass "
                     f"--mesh-data 1.")
  floor = measure(built.step, built.state, built.batch,
                  repeats=targs.repeats, seed=targs.seed)
  images = config.optim.grad_accum * config.train.batch_size
  bound = images / floor["seconds"]
  return {"case": name, "config": case.config,
          "image_size": config.data.image_size,
          "channels": config.data.channels, "dtype": config.train.dtype,
          "remat": config.train.remat, "batch": config.train.batch_size,
          "grad_accum": config.optim.grad_accum, "images_per_step": images,
          "floor_s": floor["seconds"], "bound_img_per_s": bound,
          "official_img_per_s": case.official_img_s,
          "bound_ratio": bound / case.official_img_s,
          "comparable": train_step.comparable(config, case, targs),
          **{k: floor[k] for k in ("flops", "distinct", "executions",
                                   "repeats", "convs")}}


def format_table(rows: list[dict], top: int) -> str:
  """Per case: the floor and its bound, then its `top` costliest convs."""
  out = []
  for r in rows:
    out.append(
        f"{r['case']} ({r['image_size']}x{r['image_size']}x{r['channels']}, "
        f"{r['batch']}x{r['grad_accum']} images, {r['dtype']}"
        f"{', remat' if r['remat'] else ''}): {r['executions']} "
        f"convolutions ({r['distinct']} distinct) take {r['floor_s']:.3f} s "
        f"alone -> at most {r['bound_img_per_s']:.2f} img/s = "
        f"{r['bound_ratio']:.2f}x official ({r['official_img_per_s']:g})")
    out.append(f"  {'total ms':>9} {'count':>5} {'ms':>8} {'GFLOP/s':>8}  "
               "convolution")
    for c in r["convs"][:top]:
      out.append(f"  {1e3 * c['total_s']:9.1f} {c['count']:5d} "
                 f"{1e3 * c['median_s']:8.2f} "
                 f"{common.fmt(c['gflop_per_s'], '8.1f'):>8}  {c['conv']}")
  return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace,
                                                    argparse.Namespace]:
  """(this script's arguments, the train_step arguments they imply)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cases", nargs="+", choices=list(train_step.CASES),
                      default=list(train_step.CASES))
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--top", type=int, default=10,
                      help="costliest convolutions listed per case.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  common.add_huge_pages_flag(parser)
  args = parser.parse_args(argv)
  targs = train_step.parse_args(
      (["--quick"] if args.quick else []) + (["--remat"] if args.remat else [])
      + ["--dtype", args.dtype, "--repeats", str(args.repeats),
         "--seed", str(args.seed), "--mesh-data", "1"])
  return args, targs


def main(argv: Sequence[str] | None = None) -> list[dict]:
  args, targs = parse_args(argv)
  rows = [train_step_floor(name, targs) for name in args.cases]
  print(format_table(rows, args.top))
  common.write_json(args.out, {"benchmark": "conv_floor",
                               **common.environment(), "rows": rows})
  return rows


if __name__ == "__main__":
  common.start(sys.argv[1:])
  main(sys.argv[1:])
