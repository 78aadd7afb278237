"""Runs a list of training-loop runs into one sweep directory, resumably.

Each run is an ordinary workdir ``<out>/<name>/`` written by ``normjax.train.train``; a finished run
has ``result.json`` (final losses, wall time, divergence) and is skipped. An interrupted run resumes
from its last checkpoint, because that is what the training loop does with an existing workdir. A
run whose loss, gradient or parameters go non-finite is recorded as diverged (its metrics and
checkpoints stay), not raised.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from normjax import config as common
from normjax.train import NonFiniteLoss, train

RESULT = "result.json"


@dataclasses.dataclass(frozen=True)
class Run:
  name: str  # directory name inside the sweep
  config: str  # config spec, e.g. "configs/llama.py:tiny,placement=post,depth=8"
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # dotted keys
  tags: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # study labels for the summary


def with_seeds(runs: Sequence[Run], seeds: int) -> list[Run]:
  """Each run under ``seeds`` seeds: seed k sets the parameter init (``seed``) and the data order
  (``data.shuffle_seed``) to k and the tag ``seed``. Seed 0 keeps the run's name (it is the config's
  default), seeds 1.. add ``_s<k>``, so a finished 1-seed sweep grows to N seeds by resuming."""
  if seeds < 1:
    raise ValueError(f"--seeds={seeds} must be at least 1")
  result = []
  for run in runs:
    for seed in range(seeds):
      result.append(dataclasses.replace(
          run, name=run.name if seed == 0 else f"{run.name}_s{seed}",
          overrides={**run.overrides, "seed": seed, "data.shuffle_seed": seed},
          tags={**run.tags, "seed": seed}))
  return result


def is_finished(workdir: pathlib.Path) -> bool:
  return (workdir / RESULT).exists()


def run_one(run: Run, out: pathlib.Path, shared: Mapping[str, Any]) -> dict[str, Any]:
  """Trains (or resumes) one run and writes its ``result.json``; returns the result."""
  workdir = out / run.name
  config = common.load(run.config, {**shared, **run.overrides})
  start = time.perf_counter()
  result: dict[str, Any] = {"name": run.name, "config": run.config, "tags": dict(run.tags),
                            "overrides": {**shared, **run.overrides}}
  try:
    result.update(train(config, str(workdir)), diverged=False)
  except NonFiniteLoss as error:
    result.update(diverged=True, message=str(error))
  result["wall_seconds"] = time.perf_counter() - start
  (workdir / RESULT).write_text(json.dumps(result, indent=1, default=float))
  return result


def run_all(runs: Sequence[Run], out: str | pathlib.Path, shared: Mapping[str, Any] | None = None,
            only: str = "") -> list[dict[str, Any]]:
  """Every run not yet finished, in order (``only``: a substring filter on names)."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  names = [run.name for run in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"run names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
  results = []
  for i, run in enumerate(runs):
    if only and only not in run.name:
      continue
    if is_finished(out / run.name):
      print(f"[{i + 1}/{len(runs)}] {run.name}: finished, skipped")
      continue
    print(f"[{i + 1}/{len(runs)}] {run.name}: {run.config} {dict(run.overrides)}")
    results.append(run_one(run, out, shared or {}))
  return results


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
  """``["train.steps=50", "tvr.enabled=true"]`` -> ``{"train.steps": "50", ...}``; the text is parsed
  as each field's type when the config is loaded (``normjax.config.load``), strict for booleans."""
  result = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise common.ConfigError(f"--set {item!r} is not key=value")
    result[key] = value
  return result


def arguments(description: str) -> argparse.ArgumentParser:
  """The flags every study shares."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--out", required=True, help="sweep directory (one subdirectory per run)")
  parser.add_argument("--scale", default="small", help="run size preset of the study (see --help)")
  parser.add_argument("--only", default="", help="run only names containing this substring")
  parser.add_argument("--seeds", type=int, default=1,
                      help="seeds per run: parameter init and data order (seed 0 keeps the name)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for every run, e.g. --set train.steps=50 (repeatable)")
  parser.add_argument("--list", action="store_true", help="print the runs and exit")
  return parser


def pick_scale(scales: Mapping[str, Any], scale: str) -> Any:
  """A study's size preset; ValueError naming the valid ones."""
  if scale not in scales:
    raise ValueError(f"--scale={scale!r} is unknown; choose one of {list(scales)}")
  return scales[scale]


def main(runs: Sequence[Run], args: argparse.Namespace, shared: Mapping[str, Any]) -> bool:
  """Lists (``--list``, returns False) or trains the runs, each under ``--seeds`` seeds (returns
  True: the study may report)."""
  runs = with_seeds(runs, args.seeds)
  if args.list:
    for run in runs:
      print(run.name, run.config, dict(run.overrides))
    return False
  run_all(runs, args.out, {**shared, **parse_overrides(args.set)}, args.only)
  print(f"sweep in {args.out}; summarize with: python -m experiments.summary {args.out}")
  return True
