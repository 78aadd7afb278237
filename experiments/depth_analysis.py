"""Layer-removal and angular-distance analysis of finished runs (``docs/statistics.md``).

  python -m experiments.depth_analysis runs/placement_study [--threshold 0.01] [--num-batches 4]

For one run workdir, ``analyze`` rebuilds the model from ``config.json``, restores the params of the
last checkpoint, and measures on the first ``num_batches`` validation batches the loss of the full
model and with each block replaced by the identity (``normjax.stats.removal_losses``). It adds the
angular-distance matrix of the last statistics row and writes everything to
``<workdir>/depth_analysis.json``. The CLI does this for every finished, non-diverged run of a sweep
that has no analysis yet.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp

from experiments import sweep
from normjax import config as config_lib
from normjax import data, stats
from normjax.train.loop import build_steps
from normjax.train.step import Steps, task_loss
from normjax.train.writer import read_jsonl

ANALYSIS = "depth_analysis.json"


def strict_json(value: Any) -> Any:
  """``value`` with arrays as lists and non-finite floats as None, so the file is standard JSON."""
  if isinstance(value, dict):
    return {key: strict_json(item) for key, item in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [strict_json(item) for item in (value.tolist() if isinstance(value, np.ndarray) else value)]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  return value.item() if isinstance(value, np.generic) else value


def restore(workdir: pathlib.Path) -> tuple[mlc.ConfigDict, Steps, dict[str, Any]]:
  """The run's config, its ``Steps`` and the train state of its newest checkpoint (on one device).

  Builds model and optimizer exactly as ``normjax.train.train`` does, so the abstract state matches
  the saved ``state`` item; only that item of the composite checkpoint is read.
  """
  config = mlc.ConfigDict(json.loads((workdir / "config.json").read_text()))
  model, steps, _ = build_steps(config, config_lib.model_config(config, data.validate(config.data)))
  manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    target = steps.init_state(model)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  finally:
    manager.close()
  return config, steps, state["state"]


def validation_batch(config: mlc.ConfigDict, num_batches: int) -> dict[str, np.ndarray]:
  """The first ``num_batches`` validation batches of ``train.batch_size``, concatenated (the loop's
  evaluation set when ``num_batches == train.eval_steps``): ``[num_batches * batch, ...]``."""
  validation = data.load(config.data, "validation", config.train.batch_size)
  return jax.tree.map(lambda *parts: np.concatenate(parts),
                      *[validation.batch(i) for i in range(num_batches)])


def analyze(workdir: str | pathlib.Path, *, num_batches: int = 4, threshold: float = 0.01
            ) -> dict[str, Any]:
  """Removal losses and angular distances of one run; writes and returns ``depth_analysis.json``.

  Losses are the task loss over the first ``num_batches`` validation batches of ``train.batch_size``
  (concatenated: equal-sized batches, so this is the mean of the per-batch losses, the loop's own
  ``eval/loss`` when ``num_batches == train.eval_steps``). For block l = 1..L:
  ``loss_increase[l-1] = removed_loss[l-1] - full_loss`` and
  ``relative_increase[l-1] = loss_increase[l-1] / full_loss``; a block is *removable* when its
  relative increase is below ``threshold`` (a block whose removal lowers the loss counts), and
  ``removable_fraction`` is the share of the L blocks that are removable.

  ``angular_distance`` is the ``[L+1, L+1]`` matrix of the last statistics row (row l, column n: the
  distance between x_l and x_{l+n}; null past the end), ``angular_distance_next`` its n = 1 column,
  ``[L]``: how far block l+1 turns the residual stream. Non-finite numbers are written as null.
  """
  workdir = pathlib.Path(workdir)
  config, steps, state = restore(workdir)
  batch = validation_batch(config, num_batches)
  model = steps.model(state["params"], state["norm_state"])
  return write_analysis(workdir, model, batch, threshold, checkpoint_step=int(state["step"]),
                        num_batches=num_batches, batch_size=config.train.batch_size)


def write_analysis(workdir: pathlib.Path, model: Any, batch: dict[str, np.ndarray], threshold: float,
                   **about: Any) -> dict[str, Any]:
  """The removal losses of ``model`` on ``batch`` and the angular distances of the workdir's last
  statistics row, written as ``depth_analysis.json`` (see ``analyze``); ``about`` is recorded."""
  losses = np.asarray(stats.removal_losses(model, batch, lambda logits, b: task_loss(logits, b)[0]),
                      np.float64)  # [L+1]: full model, then without block 1..L
  full, removed = losses[0], losses[1:]
  relative = (removed - full) / full
  stats_rows = read_jsonl(workdir / "stats.jsonl")
  angular = np.asarray(stats_rows[-1]["angular_distance"], np.float64) if stats_rows else None
  result = {
      **about, "threshold": threshold,
      "full_loss": full, "removed_loss": removed, "loss_increase": removed - full,
      "relative_increase": relative,
      "removable_fraction": float(np.mean(relative < threshold)),
      "stats_step": stats_rows[-1]["step"] if stats_rows else None,
      "angular_distance": angular,
      "angular_distance_next": None if angular is None else angular[:-1, 1],
  }
  result = strict_json(result)
  (workdir / ANALYSIS).write_text(json.dumps(result, indent=1) + "\n")
  return result


def _show(value: float | None, spec: str) -> str:
  return "nan" if value is None else format(value, spec)


def analyze_sweep(sweep_dir: str | pathlib.Path, *, num_batches: int = 4, threshold: float = 0.01
                  ) -> list[dict[str, Any]]:
  """Analyzes every finished, non-diverged run without ``depth_analysis.json``; one line per run."""
  results = []
  for workdir in sorted(p for p in pathlib.Path(sweep_dir).iterdir() if p.is_dir()):
    if not sweep.is_finished(workdir):
      print(f"{workdir.name}: not finished, skipped")
    elif json.loads((workdir / sweep.RESULT).read_text()).get("diverged"):
      print(f"{workdir.name}: diverged, skipped")
    elif (workdir / ANALYSIS).exists():
      print(f"{workdir.name}: already analyzed, skipped")
    else:
      result = analyze(workdir, num_batches=num_batches, threshold=threshold)
      increases = ", ".join(_show(v, "+.4f") for v in result["loss_increase"])
      print(f"{workdir.name}: full loss {_show(result['full_loss'], '.4f')}, loss increase per "
            f"removed block [{increases}], removable fraction {result['removable_fraction']:.2f}")
      results.append(result)
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("sweep_dir", help="sweep directory (one subdirectory per run)")
  parser.add_argument("--threshold", type=float, default=0.01,
                      help="a block is removable when (removed - full) / full loss is below this")
  parser.add_argument("--num-batches", type=int, default=4, help="validation batches per loss")
  args = parser.parse_args()
  analyze_sweep(args.sweep_dir, num_batches=args.num_batches, threshold=args.threshold)


if __name__ == "__main__":
  main()
