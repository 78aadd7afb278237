"""Norm kernels side by side (XLA, Pallas, Triton, tokamax): fwd and fwd+bwd time, GB/s, fraction of copy.

    python -m benchmarks.kernels --markdown                  # GPU: the default target shapes, bf16
    python -m benchmarks.kernels --shapes 64x128,64x1000     # CPU smoke run (Pallas interpret mode)
    python -m benchmarks.kernels --write-auto-table --end-to-end   # GPU: feed impl='auto'; a train step

Per shape: a copy kernel ``y = x * 2`` (the bandwidth ceiling), then each op (layer_norm with scale and
bias, rms_norm and crms_norm with scale, as the models use them) with the residual add fused off and on,
per impl (xla, pallas, tokamax if importable: no crms_norm, and its "add" rows add in XLA). fwd+bwd is
a jit of ``jax.vjp`` pulling constant cotangents through y (and x + r) to x, r, scale and bias. GB/s
counts the minimal traffic (docs/kernels.md) in [N, D] tensors: fwd 2, fwd+bwd 5; fused fwd 4, fwd+bwd
8. Times: medians of interleaved repeats (``benchmarks.conversion``) of ``--inner`` queued calls each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp

import pallas_kernels
from benchmarks.conversion import interleaved_ms
from pallas_kernels import auto

try:
  import tokamax
except ImportError:  # optional GPU peer; absent in CI
  tokamax = None

OPS = ("layer_norm", "rms_norm", "crms_norm")
GPU_SHAPES = "16384x1024,8192x4096,4096x8192,32768x2048"
CPU_SHAPES = "64x128,64x1000"
REPO = pathlib.Path(__file__).resolve().parents[1]
NAN = float("nan")


class Row(NamedTuple):
  op: str
  fused: bool
  shape: tuple[int, int]
  impl: str
  ms: tuple[float, float]  # forward, forward+backward
  gbs: tuple[float, float]
  copy_gbs: float
  xla_ms: tuple[float, float]  # xla's in the same group (the speedup's numerator)


def repeated(fn, inner: int):
  """``inner`` calls queued back to back; the helper blocks on the last one's output."""
  def run(*args):
    for _ in range(inner - 1):
      fn(*args)
    return fn(*args)
  return run


def cases(op: str, impl: str, fused: bool, x, r, scale, bias, cts):
  """The jitted forward ``(x, r, scale, bias) -> y | (y, x + r)`` and forward+backward, with arguments."""
  args = (x, r, scale, bias)

  def f(x, r, scale, bias):
    if impl != "tokamax":
      return getattr(pallas_kernels, op)(x, scale, bias, residual=r if fused else None, impl=impl)
    s = x + r if fused else x
    y = tokamax.layer_norm(s, scale, bias, subtract_mean=op == "layer_norm", implementation="triton")
    return (y, s) if fused else y

  def fwd_bwd(x, r, scale, bias):
    out, pull = jax.vjp(f, x, r, scale, bias)
    return out, pull(cts if fused else cts[0])  # outputs kept, so y is written as in training

  return (jax.jit(f), args), (jax.jit(fwd_bwd), args)


def measure(args, dtype) -> list[Row]:
  rows = []
  for shape in args.shapes:
    n, d = shape
    keys = jax.random.split(jax.random.key(0), 6)
    x, r, ct_y, ct_s = (jax.random.normal(k, shape, dtype) for k in keys[:4])
    scale = 1 + 0.1 * jax.random.normal(keys[4], (d,), jnp.float32)
    bias = 0.1 * jax.random.normal(keys[5], (d,), jnp.float32)
    tensor = n * d * dtype.itemsize  # bytes of one [N, D] tensor
    copy = repeated(jax.jit(lambda x: x * 2), args.inner)
    copy_ms = interleaved_ms([(copy, (x,))], args.repeats)[0] / args.inner
    copy_gbs = 2 * tensor / copy_ms / 1e6
    rows.append(Row("copy", False, shape, "x*2", (copy_ms, NAN), (copy_gbs, NAN), copy_gbs, (NAN, NAN)))
    print(format_row(rows[-1]))
    for op in args.ops:
      for fused in (False, True):
        b = bias if op == "layer_norm" else None
        impls, group = [], []
        for impl in [i for i in args.impls if not (i == "tokamax" and op == "crms_norm")]:  # no tokamax CRMS
          fwd, fb = cases(op, impl, fused, x, r, scale, b, (ct_y, ct_s))
          try:  # trace and compile once; an impl that rejects this input is skipped, not fatal
            for fn, fn_args in (fwd, fb):
              jax.block_until_ready(fn(*fn_args))
          except Exception as e:  # ours may only refuse; the optional peer may fail in any way
            if impl != "tokamax" and not isinstance(e, NotImplementedError):
              raise
            print(f"  skipped {op} fused={fused} {n}x{d} impl={impl}: {e}")
            continue
          impls.append(impl)
          group += [(repeated(fn, args.inner), fn_args) for fn, fn_args in (fwd, fb)]
        ms = [t / args.inner for t in interleaved_ms(group, args.repeats)] if group else []
        by_impl = {impl: (ms[2 * i], ms[2 * i + 1]) for i, impl in enumerate(impls)}
        for impl, (fwd_ms, fb_ms) in by_impl.items():
          gbs = ((4 if fused else 2) * tensor / fwd_ms / 1e6, (8 if fused else 5) * tensor / fb_ms / 1e6)
          rows.append(Row(op, fused, shape, impl, (fwd_ms, fb_ms), gbs, copy_gbs,
                          by_impl.get("xla", (NAN, NAN))))
          print(format_row(rows[-1]))
  return rows


HEADER = ("op", "fused", "shape", "impl", "fwd ms", "GB/s", "/copy", "f+b ms", "GB/s", "/copy",
          "fwd vs xla", "f+b vs xla")
WIDTHS = (11, 6, 12, 9, 9, 9, 7, 10, 9, 7, 11, 11)


def cells(row: Row) -> list[str]:
  numbers = [v for i in (0, 1)
             for v in ((row.ms[i], ".4f"), (row.gbs[i], ".4g"), (row.gbs[i] / row.copy_gbs, ".2f"))]
  numbers += [(row.xla_ms[i] / row.ms[i], ".2f") for i in (0, 1)]
  return [row.op, "add" if row.fused else "-", f"{row.shape[0]}x{row.shape[1]}", row.impl,
          *("" if math.isnan(v) else format(v, spec) for v, spec in numbers)]  # copy rows: blanks


def format_row(row: Row | None) -> str:
  values = HEADER if row is None else cells(row)
  cols = (f"{v:<{w}}" if i < 4 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(values, WIDTHS)))
  return "".join(cols).rstrip()


def markdown(rows: list[Row]) -> str:
  lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  return "\n".join(lines + ["| " + " | ".join(cells(row)) + " |" for row in rows])


def write_auto_table(rows: list[Row], dtype, path: pathlib.Path = auto.TABLE_PATH) -> None:
  """Merges forward+backward ms per impl under this device kind and ``auto.key(op, dtype, D, fused)``."""
  table = json.loads(path.read_text()) if path.exists() else {}
  entries = table.setdefault(jax.devices()[0].device_kind, {})
  rows = [row for row in rows if row.op != "copy"]
  for row in rows:  # a width measured at several N keeps the last shape's times
    entries.setdefault(auto.key(row.op, dtype, row.shape[1], row.fused), {})[row.impl] = round(row.ms[1], 5)
  path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
  print(f"wrote {len(rows)} times for {jax.devices()[0].device_kind} into {path}")


def write_json(rows: list[Row], path: pathlib.Path) -> None:
  """The table for ``notebooks/kernels.ipynb``: one object per row, NaN written as null."""
  clean = lambda v: None if math.isnan(v) else round(v, 6)
  out = [{"op": r.op, "fused": r.fused, "shape": f"{r.shape[0]}x{r.shape[1]}", "impl": r.impl,
          "fwd_ms": clean(r.ms[0]), "fwd_bwd_ms": clean(r.ms[1]),
          "fwd_frac_copy": clean(r.gbs[0] / r.copy_gbs), "fwd_bwd_frac_copy": clean(r.gbs[1] / r.copy_gbs)}
         for r in rows]
  path.write_text(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                              "date": f"{datetime.date.today()}", "rows": out}, indent=1) + "\n")
  print(f"wrote {len(out)} rows into {path}")


def stepper(step, state, batch):
  """One train-step variant threading its own (donated) state, so that variants can be interleaved."""
  def run():
    run.state, metrics = step(run.state, batch)
    return metrics
  run.state = state
  return run


def end_to_end(args, dtype) -> None:
  """Plain train step of ``--e2e-config`` with ``model.norm.impl`` = xla vs pallas, built as in
  ``benchmarks.train_step`` (imported here, not at the top: it defines absl flags)."""
  from benchmarks.train_step import synthetic_batch, synthetic_data
  from normjax import config as config_lib
  from normjax.train.loop import build_sharded

  print(f"\nend to end: {args.e2e_config}, dtype {dtype.name}, plain train step (model.norm.impl)")
  steppers, labels = [], []
  for impl in ("xla", "pallas"):
    try:
      config = config_lib.load(args.e2e_config, {"model.dtype": dtype.name, "model.norm.impl": impl})
      sizes = config_lib.validate(config, jax.device_count()).mesh
      model_cfg = config_lib.model_config(config, synthetic_data(config))
    except ValueError as e:
      print(f"  skipped impl={impl}: {e}")
      continue
    sharded = build_sharded(config, model_cfg, sizes)
    batch = jax.device_put(synthetic_batch(config, model_cfg), sharded.batch_sharding)
    steppers.append(stepper(sharded.compiled.train, sharded.state, batch))
    labels.append(impl)
  if not steppers:
    return
  ms = interleaved_ms([(s, ()) for s in steppers], args.repeats)
  tokens = config.train.batch_size * config.data.seq_len
  print(f"{'norm impl':<11}{'step ms':>10}{'tokens/s':>12}{'vs first':>10}")
  for label, value in zip(labels, ms):
    print(f"{label:<11}{value:>10.2f}{tokens / value * 1e3:>12.0f}{value / ms[0]:>10.3f}")


def parse_shapes(text: str) -> list[tuple[int, int]]:
  return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", type=parse_shapes, default=None,
                      help=f"comma-separated NxD (default {GPU_SHAPES}; on CPU {CPU_SHAPES})")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--ops", type=lambda t: t.split(","), default=OPS, help="subset of " + ",".join(OPS))
  parser.add_argument("--impls", type=lambda t: t.split(","),
                      default=("xla", "pallas", "triton", "tokamax"),
                      help="comma-separated; tokamax is skipped when it is not importable, triton "
                           "(jax-triton) where it raises NotImplementedError (no GPU, D > 4096)")
  parser.add_argument("--repeats", type=int, default=None, help="timed samples (default 30; 3 on CPU)")
  parser.add_argument("--inner", type=int, default=None, help="calls per sample (default 10; 1 on CPU)")
  parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
  parser.add_argument("--write-auto-table", action="store_true",
                      help=f"merge fwd+bwd ms into {auto.TABLE_PATH.relative_to(REPO)} (GPU only)")
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="also write the rows as JSON (benchmarks/kernels_results.json feeds notebooks/kernels)")
  parser.add_argument("--end-to-end", action="store_true", help="also time a train step per norm impl")
  parser.add_argument("--e2e-config", default="configs/llama.py:tiny")
  args = parser.parse_args()
  cpu = jax.default_backend() == "cpu"
  if args.write_auto_table and cpu:
    print("refusing --write-auto-table on CPU: Pallas runs in interpret mode there, so its times say "
          "nothing about the kernels (and impl='auto' never picks Pallas on CPU anyway)", file=sys.stderr)
    return 2
  args.shapes = args.shapes or parse_shapes(CPU_SHAPES if cpu else GPU_SHAPES)
  args.impls = [i for i in args.impls if i != "tokamax" or tokamax is not None]
  args.repeats = args.repeats or (3 if cpu else 30)
  args.inner = args.inner or (1 if cpu else 10)
  dtype = jnp.dtype(args.dtype)
  print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {dtype.name}, impls {','.join(args.impls)}"
        f"{'' if tokamax else ' (no tokamax)'}, median of {args.repeats} x {args.inner} calls")
  if cpu:
    print("CPU: Pallas runs in interpret mode; these numbers only prove the script runs, not kernel speed")
  print(format_row(None))
  rows = measure(args, dtype)
  if args.markdown:
    print("\n" + markdown(rows))
  if args.json:
    write_json(rows, args.json)
  if args.write_auto_table:
    write_auto_table(rows, dtype)
  if args.end_to_end:
    end_to_end(args, dtype)
  return 0


if __name__ == "__main__":
  sys.exit(main())
