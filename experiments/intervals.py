"""Results over seeds: one cell per run name without its ``_s<k>`` seed suffix, with mean, standard
deviation and a 95 % Student-t interval per metric, and differences called only when intervals
separate.

  cells = intervals.cells(summary.summarize(sweep_dir))
  verdicts = intervals.compare(cells, metric="eval_loss")   # each placement against pre

A cell with one seed has no interval (NaN): its differences are "not resolved (1 seed)".
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

METRICS = ("train_loss", "eval_loss", "eval_accuracy", "var_growth_power", "removable_fraction")
# two-sided 95 % Student-t quantiles t_{0.975, df}; df > 30 uses the normal 1.96
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}
SEED_SUFFIX = re.compile(r"_s\d+$")


def t975(df: int) -> float:
  """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (the table's next lower df)."""
  return 1.96 if df > 30 else T975[max(d for d in T975 if d <= df)]


def interval(values: Sequence[float]) -> dict[str, float]:
  """``{"n", "mean", "std", "ci95"}`` of the finite values; ci95 is the half-width
  ``t * std / sqrt(n)`` (NaN below 2 values)."""
  finite = np.asarray([v for v in values if math.isfinite(v)], np.float64)
  n = len(finite)
  if n == 0:
    return {"n": 0, "mean": math.nan, "std": math.nan, "ci95": math.nan}
  std = float(finite.std(ddof=1)) if n > 1 else math.nan
  return {"n": n, "mean": float(finite.mean()), "std": std,
          "ci95": t975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan}


def cells(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The summary rows grouped by run name without the seed suffix, in the rows' order: name,
  model, placement, depth, seeds, diverged (count), and per metric ``<metric>`` (mean),
  ``<metric>_std``, ``<metric>_ci95``."""
  groups: dict[str, list[dict[str, Any]]] = {}
  for row in rows:
    groups.setdefault(SEED_SUFFIX.sub("", str(row["name"])), []).append(row)
  result = []
  for name, members in groups.items():
    cell = {"name": name, **{k: members[0][k] for k in ("model", "placement", "depth")},
            "seeds": len(members), "diverged": sum(bool(m["diverged"]) for m in members)}
    for metric in METRICS:
      stats = interval([float(m[metric]) for m in members])
      cell.update({metric: stats["mean"], f"{metric}_std": stats["std"],
                   f"{metric}_ci95": stats["ci95"]})
    result.append(cell)
  return result


def verdict(a: dict[str, Any], b: dict[str, Any], metric: str) -> str:
  """"lower" / "higher" when a's 95 % interval of ``metric`` lies wholly below / above b's,
  else "not resolved" (with the reason when a cell has a single seed or no value)."""
  (ma, ca), (mb, cb) = ((c[metric], c[f"{metric}_ci95"]) for c in (a, b))
  if not (math.isfinite(ma) and math.isfinite(mb)):
    return "no value"
  if not (math.isfinite(ca) and math.isfinite(cb)):
    return "not resolved (1 seed)"
  if ma + ca < mb - cb:
    return "lower"
  if ma - ca > mb + cb:
    return "higher"
  return "not resolved"


def compare(cell_rows: Sequence[dict[str, Any]], metric: str = "eval_loss", baseline: str = "pre"
            ) -> list[dict[str, Any]]:
  """Each cell against the ``baseline`` placement's cell of the same model and depth."""
  base = {(c["model"], c["depth"]): c for c in cell_rows if c["placement"] == baseline}
  result = []
  for cell in cell_rows:
    other = base.get((cell["model"], cell["depth"]))
    if other is None or cell is other:
      continue
    result.append({"model": cell["model"], "depth": cell["depth"], "placement": cell["placement"],
                   "metric": metric, "verdict": verdict(cell, other, metric),
                   "difference": cell[metric] - other[metric]})
  return result


def _estimate(cell: dict[str, Any], metric: str) -> str:
  mean, ci = cell[metric], cell[f"{metric}_ci95"]
  if not math.isfinite(mean):
    return ""
  return f"{mean:.4g} ± {ci:.2g}" if math.isfinite(ci) else f"{mean:.4g}"


def markdown(cell_rows: Sequence[dict[str, Any]], metric: str = "eval_loss") -> str:
  """The cells (mean ± 95 % half-width per metric) and the verdicts against ``pre`` on ``metric``."""
  head = ["name", "seeds", "diverged", *METRICS]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join([c["name"], str(c["seeds"]), str(c["diverged"]),
                               *(_estimate(c, m) for m in METRICS)]) + " |" for c in cell_rows]
  lines += ["", f"Against pre, {metric} (resolved only when the 95 % intervals separate):", "",
            "| model | depth | placement | difference | verdict |", "|---|---|---|---|---|"]
  lines += [f"| {v['model']} | {v['depth']} | {v['placement']} | {v['difference']:+.4g} | "
            f"{v['verdict']} |" for v in compare(cell_rows, metric)]
  return "\n".join(lines) + "\n"
