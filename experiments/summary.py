"""One table row per run of a sweep: losses, residual-variance growth, gradient spread, removability.

  python -m experiments.summary runs/placement_study             # writes summary.csv / summary.md
  python -m experiments.summary runs/placement_study --analyze   # first runs depth_analysis

Per-depth numbers come from the LAST statistics row of each run (``stats.jsonl``):
x_1..x_L are ``mlp/resid_var`` (the residual stream after each block).
Missing or non-finite values (diverged runs, runs without statistics or depth analysis) are NaN in
the rows and empty cells in the files, never an error; missing tags are empty strings.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments import depth_analysis, intervals, sweep
from normjax.train.writer import read_jsonl

NAN = float("nan")
COLUMNS = ("name", "model", "placement", "depth", "train_loss", "eval_loss", "eval_accuracy",
           "var_first", "var_last", "var_ratio", "var_growth_per_layer", "var_growth_power",
           "grad_ratio", "removable_fraction", "diverged", "wall_seconds")


def _number(value: Any) -> float:
  """``value`` as a float; None, non-numbers and non-finite values are NaN."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    return NAN
  return value if math.isfinite(value) else NAN


def _last(rows: Sequence[dict[str, Any]], key: str, count: int = 1) -> list[float]:
  """The last ``count`` values of ``key`` among the rows that have it (as floats)."""
  return [_number(row[key]) for row in rows if key in row][-count:]


def growth_fit(variances: Sequence[float]) -> tuple[float, float]:
  """``variances [L]`` after blocks 1..L -> (slope per layer, power-law exponent); NaN unless L >= 2
  and all are > 0.

  Least-squares slopes of log var against the block index l (exponential growth var ~ e^{a l}) and
  against log l (power law var ~ l^p, the LNS paper's Theta(L) .. Theta(L^2) regime). The embedding
  output x_0 is left out: its scale is set by the embedding init (std 0.02), not by depth, and
  would dominate the fit of a shallow model.
  """
  values = np.asarray([_number(v) for v in variances], np.float64)
  if len(values) < 2 or not np.all(values > 0):  # NaN compares False
    return NAN, NAN
  layers = np.arange(1, len(values) + 1, dtype=np.float64)
  log_var = np.log(values)
  return float(np.polyfit(layers, log_var, 1)[0]), float(np.polyfit(np.log(layers), log_var, 1)[0])


def depth_row(stats_row: dict[str, Any] | None) -> dict[str, float]:
  """The depth columns (variance first/last/ratio and fits, gradient ratio) of one statistics row."""
  if not stats_row:
    return {key: NAN for key in ("var_first", "var_last", "var_ratio", "var_growth_per_layer",
                                 "var_growth_power", "grad_ratio")}
  post_block = [_number(v) for v in stats_row.get("mlp/resid_var", [])]  # [L]
  grads = [_number(v) for v in stats_row.get("grad_norm", [])]  # [L]
  first, last = (post_block[0], post_block[-1]) if post_block else (NAN, NAN)
  slope, power = growth_fit(post_block)
  return {"var_first": first, "var_last": last, "var_ratio": last / first if first else NAN,
          "var_growth_per_layer": slope, "var_growth_power": power,
          "grad_ratio": grads[0] / grads[-1] if grads and grads[-1] else NAN}


def run_row(workdir: pathlib.Path) -> dict[str, Any]:
  """The summary row of one run directory that has ``result.json`` (see COLUMNS and ``summarize``)."""
  result = json.loads((workdir / sweep.RESULT).read_text())
  tags = result.get("tags", {})
  metrics = read_jsonl(workdir / "metrics.jsonl")
  stats_rows = read_jsonl(workdir / "stats.jsonl")
  train = _last(metrics, "train/loss", 3)
  analysis_path = workdir / depth_analysis.ANALYSIS
  analysis = json.loads(analysis_path.read_text()) if analysis_path.exists() else {}
  return {
      "name": result.get("name", workdir.name), "model": tags.get("model", ""),
      "placement": tags.get("placement", ""), "depth": tags.get("depth", ""),
      "train_loss": float(np.mean(train)) if train else NAN,
      "eval_loss": (_last(metrics, "eval/loss") or [NAN])[0],
      "eval_accuracy": (_last(metrics, "eval/accuracy") or [NAN])[0],
      **depth_row(stats_rows[-1] if stats_rows else None),
      "removable_fraction": _number(analysis.get("removable_fraction")),
      "diverged": bool(result.get("diverged", False)),
      "wall_seconds": _number(result.get("wall_seconds")),
  }


def summarize(sweep_dir: str | pathlib.Path) -> list[dict[str, Any]]:
  """One row per run directory with ``result.json``, sorted by (model, placement, depth).

  Columns (COLUMNS): name, model, placement, depth (tags); train_loss (mean of the last 3 logged
  ``train/loss``); eval_loss, eval_accuracy (last logged); var_first, var_last (``mlp/resid_var`` of
  block 1 and block L) and var_ratio = var_last / var_first; var_growth_per_layer and
  var_growth_power (``growth_fit`` over x_1..x_L); grad_ratio = grad_norm of block 1 / block L;
  removable_fraction (``depth_analysis.json``, NaN without it); diverged; wall_seconds.
  """
  rows = [run_row(path.parent) for path in pathlib.Path(sweep_dir).glob(f"*/{sweep.RESULT}")]
  return sorted(rows, key=lambda r: (str(r["model"]), str(r["placement"]), r["depth"] == "",
                                     r["depth"] if r["depth"] != "" else 0, r["name"]))


def _cell(value: Any, float_format: str) -> str:
  """A table cell: floats with ``float_format``, NaN as an empty cell."""
  if isinstance(value, float):
    return "" if math.isnan(value) else format(value, float_format)
  return str(value)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  """The rows as a Markdown table (floats to 4 significant digits, NaN as an empty cell)."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(_cell(row[c], ".4g") for c in COLUMNS) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def write(sweep_dir: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes ``summary.csv`` (shortest round-trip floats, NaN empty), ``summary.md`` and ``cells.md``
  (runs over seeds: means with 95 % intervals and verdicts against pre, ``experiments.intervals``)
  into the sweep directory; returns the first two paths."""
  sweep_dir = pathlib.Path(sweep_dir)
  rows = summarize(sweep_dir)
  csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
  (sweep_dir / "cells.md").write_text(intervals.markdown(intervals.cells(rows)))
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({c: _cell(row[c], "") for c in COLUMNS} for row in rows)
  md_path.write_text(markdown(rows))
  return csv_path, md_path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("sweep_dir", help="sweep directory (one subdirectory per run)")
  parser.add_argument("--analyze", action="store_true",
                      help="first run experiments.depth_analysis on runs that lack it (defaults)")
  args = parser.parse_args()
  if args.analyze:
    depth_analysis.analyze_sweep(args.sweep_dir)
  _, md_path = write(args.sweep_dir)
  print(md_path.read_text(), end="")


if __name__ == "__main__":
  main()
