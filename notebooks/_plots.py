"""Shared loading and plotting helpers for the analysis notebooks (import from ``notebooks/``).

A sweep directory holds one training-loop workdir per run (``experiments/sweep.py``); a run here is
any subdirectory with statistics rows (``stats/``), finished (``result.json``) or still running. Its model,
placement and depth come from ``result.json``'s tags, or else from the ``<model>_<placement>_L<depth>``
directory name.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # so that ``experiments`` and ``normjax`` import from a notebook
  sys.path.insert(0, str(REPO))

from experiments.placement_study import PLACEMENTS  # noqa: E402  (after the path set-up above)
from normjax.train.writer import read_jsonl, read_stats  # noqa: E402

NAME = re.compile(r"(?P<model>[a-z0-9]+)_(?P<placement>.+)_L(?P<depth>\d+)$")


def load_runs(sweep_dir: str | pathlib.Path) -> list[dict[str, Any]]:
  """``[{name, model, placement, depth, diverged, dir, result, stats}]`` (``stats``: ``read_stats``)
  sorted by model, depth, placement."""
  runs = []
  for path in sorted(pathlib.Path(sweep_dir).iterdir()):
    stats = read_stats(path)
    if not stats:  # no statistics row yet
      continue
    result = json.loads((path / "result.json").read_text()) if (path / "result.json").exists() else {}
    tags = result.get("tags") or {}
    match = NAME.match(path.name)
    guess = match.groupdict() if match else {}
    model, placement = tags.get("model", guess.get("model")), tags.get("placement", guess.get("placement"))
    depth = tags.get("depth", guess.get("depth"))
    if model is None or placement is None or depth is None:
      continue
    runs.append({"name": path.name, "model": model, "placement": placement, "depth": int(depth),
                 "diverged": bool(result.get("diverged", False)), "dir": path, "result": result,
                 "stats": stats})
  return sorted(runs, key=lambda r: (r["model"], r["depth"], r["placement"]))


def color(placement: str) -> str:
  """The placement's colour (tab10, in ``PLACEMENTS`` order: the same in every figure; others share
  the last one)."""
  return f"C{PLACEMENTS.index(placement) if placement in PLACEMENTS else 9}"


def stat(run: dict[str, Any], name: str) -> np.ndarray:
  """One statistic of a run, stacked over its statistics steps (e.g. ``mlp/resid_var`` [steps, L];
  ``steps`` for the steps)."""
  return run["stats"][name]


def resid_var(run: dict[str, Any]) -> np.ndarray:
  """[steps, L+1]: residual-stream variance of x_0 (embedding) and after every block."""
  return np.concatenate([stat(run, "embed/resid_var")[:, None], stat(run, "mlp/resid_var")], axis=1)


def grad_norm(run: dict[str, Any]) -> np.ndarray:
  """[steps, L]: gradient norm of each block's parameters."""
  return stat(run, "grad_norm")


def metrics(run: dict[str, Any], key: str = "train/loss") -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one metric from ``metrics.jsonl`` (rows without the key are skipped)."""
  rows = [row for row in read_jsonl(run["dir"] / "metrics.jsonl") if key in row]
  return np.array([r["step"] for r in rows]), np.array([r[key] for r in rows], dtype=float)


def deepest(runs: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """``{model: its runs at one depth, one per placement}``: the deepest depth among those with the
  most placements (the deepest of a finished sweep; a shallower, complete one while it runs)."""
  by_depth: dict[str, dict[int, list[dict[str, Any]]]] = {}
  for run in runs:
    by_depth.setdefault(run["model"], {}).setdefault(run["depth"], []).append(run)
  return {model: max(depths.items(), key=lambda item: (len(item[1]), item[0]))[1]
          for model, depths in by_depth.items()}


def grid(n: int, ncols: int = 4, size: tuple[float, float] = (3.6, 3.0), **kwargs):
  """A figure with ``n`` panels in rows of ``ncols`` (unused panels hidden); returns (fig, axes list)."""
  ncols = max(1, min(ncols, n))
  nrows = max(1, math.ceil(n / ncols))
  fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False, **kwargs)
  axes = list(axes.flat)
  for ax in axes[n:]:
    ax.set_visible(False)
  return fig, axes[:n]


def positive_range(arrays: Iterable[np.ndarray]) -> tuple[float, float]:
  """(min, max) over the finite positive entries (a log colour scale's limits); (1e-3, 1) if none."""
  values = np.concatenate([np.ravel(a) for a in arrays] or [np.zeros(0)])
  values = values[np.isfinite(values) & (values > 0)]
  return (float(values.min()), float(values.max())) if values.size else (1e-3, 1.0)


def depth_step_heatmap(ax, values: np.ndarray, steps: np.ndarray, first_layer: int, norm, title: str):
  """``values`` [steps, layers] as a log-coloured depth (x) by step (y) map; non-finite cells blank."""
  steps, values = steps[:len(values)], values[:len(steps)]  # a running sweep may be one row apart
  layers = np.arange(first_layer, first_layer + values.shape[1] + 1) - 0.5
  step_edges = np.concatenate([[steps[0] - 0.5], (steps[1:] + steps[:-1]) / 2, [steps[-1] + 0.5]])
  masked = np.ma.masked_where(~np.isfinite(values) | (values <= 0), values)
  mesh = ax.pcolormesh(layers, step_edges, masked, norm=norm, cmap="viridis")
  ax.set(title=title, xlabel="layer", ylabel="step")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  return mesh


def heatmaps(runs_by_model: dict[str, list[dict[str, Any]]], load: Callable, first_layer: int,
             label: str) -> plt.Figure:
  """One row per model, one depth x step panel per run, shared log colour scale per model."""
  ncols = max(len(rs) for rs in runs_by_model.values())
  fig, axes = plt.subplots(len(runs_by_model), ncols, figsize=(3.4 * ncols, 3.0 * len(runs_by_model)),
                           squeeze=False, constrained_layout=True)
  for row, (model, runs) in zip(axes, runs_by_model.items()):
    data = [load(run) for run in runs]
    norm = LogNorm(*positive_range(data))
    for ax, run, values in zip(row, runs, data):
      title = f"{model} {run['placement']} L={run['depth']}" + (" (diverged)" if run["diverged"] else "")
      mesh = depth_step_heatmap(ax, values, stat(run, "steps"), first_layer, norm, title)
    fig.colorbar(mesh, ax=list(row), label=label)
    for ax in row[len(runs):]:
      ax.set_visible(False)
  return fig


def profile_steps(runs: list[dict[str, Any]], count: int = 3) -> list[int]:
  """``count`` logged steps spread over training (first, middle, last of the longest run)."""
  steps = max((stat(run, "steps") for run in runs), key=len)
  picks = np.unique(np.linspace(0, len(steps) - 1, count).round().astype(int))
  return [int(steps[i]) for i in picks]


def profiles(runs_by_model: dict[str, list[dict[str, Any]]], load: Callable, first_layer: int,
             label: str) -> plt.Figure:
  """One row per model, one panel per chosen step: ``load(run)`` vs depth, a line per placement, log y."""
  picks = {model: profile_steps(runs) for model, runs in runs_by_model.items()}
  ncols = max(len(p) for p in picks.values())
  fig, axes = plt.subplots(len(runs_by_model), ncols, figsize=(4.2 * ncols, 3.2 * len(runs_by_model)),
                           squeeze=False, constrained_layout=True)
  for row, (model, runs) in zip(axes, runs_by_model.items()):
    for ax, step in zip(row, picks[model]):
      for run in runs:
        values = load(run)
        steps = list(stat(run, "steps")[:len(values)])
        if step in steps:  # a diverged run stops logging early
          y = values[steps.index(step)]
          ax.plot(np.arange(first_layer, first_layer + len(y)), y, marker="o", ms=3, label=run["placement"],
                  color=color(run["placement"]))
      ax.set(title=f"{model} L={runs[0]['depth']}, step {step}", xlabel="layer", ylabel=label, yscale="log")
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    row[0].legend(fontsize="small")
    for ax in row[len(picks[model]):]:
      ax.set_visible(False)
  return fig


def loss_curves(runs: list[dict[str, Any]], key: str = "train/loss") -> plt.Figure:
  """One panel per (model, depth): ``key`` from metrics.jsonl vs step, a line per placement (x: diverged)."""
  groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
  for run in runs:
    groups.setdefault((run["model"], run["depth"]), []).append(run)
  fig, axes = grid(len(groups), ncols=4, size=(4.0, 3.0), constrained_layout=True)
  for ax, ((model, depth), group) in zip(axes, groups.items()):
    for run in group:
      steps, loss = metrics(run, key)
      if len(steps):
        ax.plot(steps, loss, marker="o", ms=3, label=run["placement"], color=color(run["placement"]))
        if run["diverged"]:
          ax.plot(steps[-1:], loss[-1:], "x", ms=9, color=color(run["placement"]))
    ax.set(title=f"{model} L={depth}", xlabel="step", ylabel=key)
    ax.legend(fontsize="small")
  return fig


def angular_distance_grid(runs: list[dict[str, Any]]) -> plt.Figure:
  """Angular distance d(x_l, x_{l+n}) at the last logged step: a panel per run, rows = placement,
  columns = depth, one shared colour scale."""
  placements = list(dict.fromkeys(r["placement"] for r in runs))
  depths = sorted({r["depth"] for r in runs})
  last = {r["name"]: stat(r, "angular_distance")[-1] for r in runs}
  top = max([float(np.nanmax(d)) for d in last.values() if np.isfinite(d).any()] + [1e-6])
  fig, axes = plt.subplots(len(placements), len(depths), squeeze=False, constrained_layout=True,
                           figsize=(3.0 * len(depths), 2.6 * len(placements)))
  for ax in axes.flat:
    ax.set_visible(False)
  for run in runs:
    ax = axes[placements.index(run["placement"]), depths.index(run["depth"])]
    ax.set_visible(True)
    image = ax.imshow(np.ma.masked_invalid(last[run["name"]]), origin="lower", vmin=0, vmax=top,
                      cmap="magma", interpolation="nearest")
    step = int(stat(run, "steps")[len(stat(run, "angular_distance")) - 1])
    ax.set(title=f"{run['placement']} L={run['depth']} (step {step})", xlabel="n (blocks spanned)",
           ylabel="start layer l")
    for axis in (ax.xaxis, ax.yaxis):
      axis.set_major_locator(MaxNLocator(integer=True))
  fig.colorbar(image, ax=list(axes.flat), label="angular distance / pi")
  fig.suptitle(f"{runs[0]['model']}: d(x_l, x_(l+n)) at the last logged step")
  return fig


def save(fig: plt.Figure, path: str | pathlib.Path) -> pathlib.Path:
  """Writes the figure as PNG (next to the data) and returns the path; the notebook shows it too."""
  path = pathlib.Path(path)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  print(f"saved {path}")
  return path


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
