"""Shared loading and plotting helpers for the analysis notebooks (import from ``notebooks/``).

A sweep directory holds one training-loop workdir per run (``experiments/sweep.py``); a run here is
any subdirectory with statistics rows (``stats/``), finished (``result.json``) or still running. Its model,
placement, depth and seed come from ``result.json``'s tags, or else from the
``<model>_<placement>_L<depth>[_s<seed>]`` directory name.

Runs of one (model, placement, depth) under several seeds form a *cell*. Curves show the cell's mean
with a band of its 95 % Student-t interval (``experiments.intervals``; none for one seed), bars an
error bar of the same; quantities drawn on a log axis are averaged and banded in log space
(geometric mean). Heatmaps, which cannot show a band, use seed 0. Every figure's title names the
sweep, the model's size and the number of seeds (``describe``).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # so that ``experiments`` and ``normjax`` import from a notebook
  sys.path.insert(0, str(REPO))

from experiments.depth_analysis import ANALYSIS  # noqa: E402  (after the path set-up above)
from experiments.intervals import t975  # noqa: E402
from experiments.placement_study import PLACEMENTS  # noqa: E402
from normjax.train.writer import read_jsonl, read_stats  # noqa: E402

NAME = re.compile(r"(?P<model>[a-z0-9]+)_(?P<placement>.+)_L(?P<depth>\d+)(?:_s(?P<seed>\d+))?$")


def load_runs(sweep_dir: str | pathlib.Path) -> list[dict[str, Any]]:
  """``[{name, model, placement, depth, seed, diverged, dir, result, config, analysis, stats}]``
  (``stats``: ``read_stats``; ``analysis``: ``depth_analysis.json`` or None) sorted by model, depth,
  placement, seed."""
  runs = []
  for path in sorted(pathlib.Path(sweep_dir).iterdir()):
    stats = read_stats(path)
    if not stats:  # no statistics row yet
      continue
    result = _json(path / "result.json") or {}
    tags = result.get("tags") or {}
    match = NAME.match(path.name)
    guess = match.groupdict() if match else {}
    model, placement = tags.get("model", guess.get("model")), tags.get("placement", guess.get("placement"))
    depth = tags.get("depth", guess.get("depth"))
    if model is None or placement is None or depth is None:
      continue
    runs.append({"name": path.name, "model": model, "placement": placement, "depth": int(depth),
                 "seed": int(tags.get("seed", guess.get("seed") or 0)),
                 "diverged": bool(result.get("diverged", False)), "dir": path, "result": result,
                 "config": _json(path / "config.json") or {}, "analysis": _json(path / ANALYSIS),
                 "stats": stats})
  return sorted(runs, key=lambda r: (r["model"], r["depth"], r["placement"], r["seed"]))


def _json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text()) if path.exists() else None


def describe(runs: list[dict[str, Any]]) -> str:
  """``"<sweep>: llama d=64, 300 steps x batch 16, seeds 0-2"``: what a figure of ``runs`` shows
  (the size from each model's first ``config.json``, what it has of it)."""
  parts = []
  for model in dict.fromkeys(r["model"] for r in runs):
    config = next(r["config"] for r in runs if r["model"] == model)
    width, train = config.get("model", {}).get("d_model"), config.get("train", {})
    size = (f" d={width}" if width else "") + (
        f", {train['steps']} steps x batch {train['batch_size']}" if "steps" in train else "")
    seeds = sorted({r["seed"] for r in runs if r["model"] == model})
    which = f"seeds {seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"
    parts.append(f"{model}{size}, {which}")
  return f"{runs[0]['dir'].parent.name}: " + "; ".join(parts)


def cells(runs: Iterable[dict[str, Any]]) -> dict[tuple[str, int, str], list[dict[str, Any]]]:
  """``{(model, depth, placement): its runs, one per seed}`` in the runs' order."""
  result: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
  for run in runs:
    result.setdefault((run["model"], run["depth"], run["placement"]), []).append(run)
  return result


def mean_band(values: np.ndarray, log: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mean, low, high) over axis 0 (the seeds) of ``values`` [seeds, ...]: the 95 % Student-t
  interval, low = high = mean for one seed. ``log``: of log10 (a geometric mean, a band that stays
  positive), for quantities drawn on a log axis; non-positive entries are ignored there."""
  values = np.asarray(values, np.float64)
  if log:
    values = np.log10(np.where(values > 0, values, np.nan))
  n = np.sum(np.isfinite(values), axis=0)
  with warnings.catch_warnings():  # an all-NaN column (a layer past a diverged seed) stays NaN
    warnings.simplefilter("ignore", RuntimeWarning)
    mean = np.nanmean(values, axis=0)
    std = np.nanstd(values, axis=0, ddof=1)
  t = np.vectorize(lambda k: t975(k - 1) if k > 1 else 0.0)(n)
  half = np.where(n > 1, t * std / np.sqrt(np.maximum(n, 1)), 0.0)
  low, high = mean - half, mean + half
  return (10 ** mean, 10 ** low, 10 ** high) if log else (mean, low, high)


def band(ax, x: np.ndarray, values: np.ndarray, placement: str, log: bool = False, **kwargs) -> None:
  """The cell's mean line over ``x`` with its interval band; ``values`` [seeds, len(x)]."""
  mean, low, high = mean_band(values, log)
  label = placement + (f" ({len(values)} seeds)" if len(values) > 1 else "")
  ax.plot(x, mean, marker="o", ms=3, label=label, color=color(placement), **kwargs)
  if len(values) > 1:
    ax.fill_between(x, low, high, color=color(placement), alpha=0.2, lw=0)


def log_axis(ax, drawn: list[np.ndarray]) -> None:
  """A log y axis when something positive was drawn (a cell whose gradients are exactly 0, like a
  saturated DyT stack, has nothing to show on one); linear otherwise."""
  values = np.concatenate([np.ravel(v) for v in drawn]) if drawn else np.zeros(0)
  if np.any(np.isfinite(values) & (values > 0)):
    ax.set_yscale("log")


def stacked(values: list[np.ndarray]) -> np.ndarray:
  """[seeds, n]: the seeds' arrays cut to the shortest (a diverged seed stops logging early)."""
  n = min(len(v) for v in values)
  return np.stack([v[:n] for v in values])


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
  """``{model: its runs at one depth, every placement and seed}``: the deepest depth among those with
  the most placements (the deepest of a finished sweep; a shallower, complete one while it runs)."""
  by_depth: dict[str, dict[int, list[dict[str, Any]]]] = {}
  for run in runs:
    by_depth.setdefault(run["model"], {}).setdefault(run["depth"], []).append(run)
  def coverage(item: tuple[int, list[dict[str, Any]]]) -> tuple[int, int]:
    return len({r["placement"] for r in item[1]}), item[0]
  return {model: max(depths.items(), key=coverage)[1] for model, depths in by_depth.items()}


def first_seed(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
  """One run per cell: its lowest seed (for views that cannot show a band)."""
  return [members[0] for members in cells(runs).values()]


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
  """One row per model, one depth x step panel per placement (its lowest seed), shared log colour
  scale per model."""
  picked = {model: first_seed(runs) for model, runs in runs_by_model.items()}
  ncols = max(len(rs) for rs in picked.values())
  fig, axes = plt.subplots(len(picked), ncols, figsize=(3.4 * ncols, 3.0 * len(picked)),
                           squeeze=False, constrained_layout=True)
  for row, (model, runs) in zip(axes, picked.items()):
    data = [load(run) for run in runs]
    norm = LogNorm(*positive_range(data))
    for ax, run, values in zip(row, runs, data):
      title = f"{run['placement']} L={run['depth']} s{run['seed']}{' (diverged)' if run['diverged'] else ''}"
      mesh = depth_step_heatmap(ax, values, stat(run, "steps"), first_layer, norm, title)
    fig.colorbar(mesh, ax=list(row), label=label)
    for ax in row[len(runs):]:
      ax.set_visible(False)
  fig.suptitle(describe(first_seed(r for rs in runs_by_model.values() for r in rs)))
  return fig


def profile_steps(runs: list[dict[str, Any]], count: int = 3) -> list[int]:
  """``count`` logged steps spread over training (first, middle, last of the longest run)."""
  steps = max((stat(run, "steps") for run in runs), key=len)
  picks = np.unique(np.linspace(0, len(steps) - 1, count).round().astype(int))
  return [int(steps[i]) for i in picks]


def at_step(run: dict[str, Any], values: np.ndarray, step: int) -> np.ndarray | None:
  """The row of ``values`` [logged steps, ...] logged at ``step``; None if the run has none."""
  steps = list(stat(run, "steps")[:len(values)])
  return values[steps.index(step)] if step in steps else None


def profiles(runs_by_model: dict[str, list[dict[str, Any]]], load: Callable, first_layer: int,
             label: str, count: int = 3) -> plt.Figure:
  """One row per model, one panel per chosen step: ``load(run)`` vs depth, a band per placement over
  its seeds (geometric mean), log y."""
  picks = {model: profile_steps(runs, count) for model, runs in runs_by_model.items()}
  ncols = max(len(p) for p in picks.values())
  fig, axes = plt.subplots(len(runs_by_model), ncols, figsize=(4.2 * ncols, 3.2 * len(runs_by_model)),
                           squeeze=False, constrained_layout=True)
  for row, (model, runs) in zip(axes, runs_by_model.items()):
    for ax, step in zip(row, picks[model]):
      drawn = []
      for (_, _, placement), members in cells(runs).items():
        rows = [y for y in (at_step(r, load(r), step) for r in members) if y is not None]
        if rows:  # a diverged run stops logging early
          band(ax, np.arange(first_layer, first_layer + len(rows[0])), np.stack(rows), placement, log=True)
          drawn += rows
      ax.set(title=f"{model} L={runs[0]['depth']}, step {step}", xlabel="layer", ylabel=label)
      log_axis(ax, drawn)
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    row[0].legend(fontsize="small")
    for ax in row[len(picks[model]):]:
      ax.set_visible(False)
  fig.suptitle(describe([r for rs in runs_by_model.values() for r in rs]))
  return fig


def layer_panels(runs_by_model: dict[str, list[dict[str, Any]]], load: Callable, label: str,
                 yscale: str = "log") -> plt.Figure:
  """One panel per model: ``load(run)`` [L] vs block 1..L, a band per placement over its seeds (in
  log space for ``yscale="log"``); runs whose ``load`` is None are left out."""
  fig, axes = grid(len(runs_by_model), ncols=2, size=(5.2, 3.6), constrained_layout=True)
  for ax, (model, runs) in zip(axes, runs_by_model.items()):
    drawn = []
    for (_, depth, placement), members in cells(runs).items():
      rows = [np.asarray(y, np.float64) for y in map(load, members) if y is not None]
      if rows:
        band(ax, np.arange(1, depth + 1), np.stack(rows), placement, log=yscale == "log")
        drawn += rows
    ax.set(title=f"{model} L={runs[0]['depth']}", xlabel="block", ylabel=label)
    if yscale == "log":
      log_axis(ax, drawn)
    else:
      ax.set_yscale(yscale, **({"linthresh": 1e-3} if yscale == "symlog" else {}))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
  fig.suptitle(describe([r for rs in runs_by_model.values() for r in rs]))
  return fig


def removal_increase(run: dict[str, Any]) -> np.ndarray | None:
  """[L]: validation-loss increase when block l is removed (``depth_analysis.json``; None without)."""
  analysis = run["analysis"]
  return None if analysis is None else np.array(analysis["loss_increase"], np.float64)


def loss_curves(runs: list[dict[str, Any]], key: str = "train/loss") -> plt.Figure:
  """One panel per (model, depth): ``key`` from metrics.jsonl vs step, a band per placement over its
  seeds (x: a diverged seed's last logged value)."""
  groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
  for run in runs:
    groups.setdefault((run["model"], run["depth"]), []).append(run)
  fig, axes = grid(len(groups), ncols=4, size=(4.0, 3.0), constrained_layout=True)
  for ax, ((model, depth), group) in zip(axes, groups.items()):
    for (_, _, placement), members in cells(group).items():
      curves = [metrics(run, key) for run in members]
      curves = [c for c in curves if len(c[0])]
      if curves:
        values = stacked([loss for _, loss in curves])
        band(ax, curves[0][0][:values.shape[1]], values, placement)
      for run, (steps, loss) in zip(members, curves):
        if run["diverged"]:
          ax.plot(steps[-1:], loss[-1:], "x", ms=9, color=color(placement))
    ax.set(title=f"{model} L={depth}", xlabel="step", ylabel=key)
    ax.legend(fontsize="small")
  fig.suptitle(describe(runs))
  return fig


def final_bars(cell_rows: list[dict[str, Any]], metrics_by_model: dict[str, str], runs: list[dict[str, Any]]
               ) -> plt.Figure:
  """One panel per model: its metric (``experiments.intervals.cells`` rows, e.g. ``eval_loss``) per
  depth, a bar per placement with the 95 % interval as error bar (none for one seed)."""
  fig, axes = grid(len(metrics_by_model), ncols=2, size=(6.0, 3.6), constrained_layout=True)
  for ax, (model, metric) in zip(axes, metrics_by_model.items()):
    mine = [c for c in cell_rows if c["model"] == model]
    depths = sorted({int(c["depth"]) for c in mine})
    placements = list(dict.fromkeys(c["placement"] for c in mine))
    width = 0.8 / max(len(placements), 1)
    for i, placement in enumerate(placements):
      by_depth = {int(c["depth"]): c for c in mine if c["placement"] == placement}
      x = np.arange(len(depths)) + (i - (len(placements) - 1) / 2) * width
      value = [by_depth[d][metric] if d in by_depth else math.nan for d in depths]
      error = [by_depth[d][f"{metric}_ci95"] if d in by_depth else math.nan for d in depths]
      ax.bar(x, value, width, yerr=np.nan_to_num(error), capsize=2, label=placement, color=color(placement))
    ax.set_xticks(np.arange(len(depths)), [f"L={d}" for d in depths])
    ax.set(title=f"{model}: final {metric}", ylabel=metric)
    ax.legend(fontsize="x-small", ncols=3)
  fig.suptitle(describe(runs))
  return fig


def angular_distance_grid(runs: list[dict[str, Any]]) -> plt.Figure:
  """Angular distance d(x_l, x_{l+n}) at the last logged step: a panel per cell (its lowest seed),
  rows = placement, columns = depth, one shared colour scale."""
  runs = first_seed(runs)
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
  fig.suptitle(f"d(x_l, x_(l+n)) at the last logged step. {describe(runs)}")
  return fig


def save(fig: plt.Figure, path: str | pathlib.Path) -> pathlib.Path:
  """Writes the figure as PNG (next to the data) and returns the path; the notebook shows it too."""
  path = pathlib.Path(path)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  print(f"saved {path}")
  return path
