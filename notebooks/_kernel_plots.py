"""Loading and plotting ``benchmarks/kernels.py`` results for ``kernels.ipynb`` (import from
``notebooks/``)."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

NUMBERS = ("fwd_ms", "fwd_bwd_ms", "fwd_frac_copy", "fwd_bwd_frac_copy")  # kernel results columns


def load_kernel_results(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """Rows of ``benchmarks/kernels.py`` results from a JSON (a list of rows, or ``{"rows": [...]}``)
  or CSV file: ``{op, fused, shape, impl, fwd_ms, fwd_bwd_ms, fwd_frac_copy, fwd_bwd_frac_copy}``,
  normalized to ``fused: bool``, ``shape: "NxD"`` and float numbers (NaN where missing); the
  ``copy`` reference rows are dropped (their fraction of copy is 1 by definition)."""
  path = pathlib.Path(path)
  if path.suffix == ".csv":
    import csv
    with open(path, newline="") as f:
      raw = list(csv.DictReader(f))
  else:
    raw = json.loads(path.read_text())
    raw = raw["rows"] if isinstance(raw, dict) else raw
  def number(value: Any) -> float:
    try:
      return float(value)
    except (TypeError, ValueError):
      return math.nan
  rows = []
  for row in raw:
    shape = row["shape"]
    rows.append({**row, "fused": str(row["fused"]).lower() in ("true", "1", "add", "yes"),
                 "shape": shape if isinstance(shape, str) else "x".join(str(v) for v in shape),
                 **{k: number(row.get(k)) for k in NUMBERS}})
  return [row for row in rows if row["op"] != "copy"]


def kernel_bars(rows: list[dict[str, Any]]) -> plt.Figure:
  """Fraction of copy bandwidth: a panel per op (columns) and direction (rows: fwd, fwd+bwd); bars
  grouped by shape (``+add``: residual add fused), one colour per impl; the dashed line is copy speed."""
  ops = list(dict.fromkeys(r["op"] for r in rows))
  impls = list(dict.fromkeys(r["impl"] for r in rows))
  fig, axes = plt.subplots(2, len(ops), figsize=(4.5 * len(ops), 6.4), squeeze=False, sharey="row",
                           constrained_layout=True)
  width = 0.8 / len(impls)
  for col, op in enumerate(ops):
    mine = [r for r in rows if r["op"] == op]
    groups = list(dict.fromkeys((r["shape"], r["fused"]) for r in mine))
    for ax, (key, title) in zip(axes[:, col], (("fwd_frac_copy", "fwd"), ("fwd_bwd_frac_copy", "fwd+bwd"))):
      for i, impl in enumerate(impls):
        value = {(r["shape"], r["fused"]): r[key] for r in mine if r["impl"] == impl}
        ax.bar(np.arange(len(groups)) + (i - (len(impls) - 1) / 2) * width,
               [value.get(g, math.nan) for g in groups], width, label=impl, color=f"C{i}")
      ax.axhline(1.0, color="gray", ls="--", lw=1)
      ax.set_xticks(np.arange(len(groups)), [s + (" +add" if fused else "") for s, fused in groups],
                    rotation=30, ha="right")
      ax.set(title=f"{op} {title}", ylabel="fraction of copy bandwidth")
  axes[0, 0].legend(fontsize="small")
  return fig
