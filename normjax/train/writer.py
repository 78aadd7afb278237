"""Everything the loop writes into the workdir, crash-safe.

  config.json            the full config
  metrics.jsonl          one row per log step: step, loss, lr, grad_norm, throughput; eval rows too
  stats.jsonl            one row per statistics step: every per-depth statistic as a list
  stats/<name>.npy       the same, stacked: [logged steps, L] (or [logged steps, L+1, L+1])
  stats/steps.npy        the step of each row
  tb/                    TensorBoard events (scalars, and per-layer statistics as stats/<name>/layer_NNN)

Rows are appended and flushed at once; the .npy files are rewritten atomically (write, then rename),
so a crash or kill never leaves a torn file. On resume, rows past the restored step (from the lost
part of the previous run) are dropped first: the resumed run writes them again, identically.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter


def _jsonable(value: Any) -> Any:
  array = np.asarray(value)
  return array.item() if array.ndim == 0 else array.tolist()


def _atomic_save(path: pathlib.Path, array: np.ndarray) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    np.save(f, array)
  os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of ``metrics.jsonl`` / ``stats.jsonl`` (any JSON-lines file); [] when it is absent."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_jsonl(path: pathlib.Path, last_step: int) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  rows = read_jsonl(path)
  kept = [row for row in rows if row["step"] <= last_step]
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
  os.replace(tmp, path)
  return kept


class Writer:
  def __init__(self, workdir: str | os.PathLike, resume_step: int):
    self.workdir = pathlib.Path(workdir)
    self.stats_dir = self.workdir / "stats"
    self.stats_dir.mkdir(parents=True, exist_ok=True)
    self.metrics_path = self.workdir / "metrics.jsonl"
    self.stats_path = self.workdir / "stats.jsonl"
    _truncate_jsonl(self.metrics_path, resume_step)
    self.stats_rows = _truncate_jsonl(self.stats_path, resume_step)
    self.tb = SummaryWriter(str(self.workdir / "tb"))
    self.last_stats_step: int | None = self.stats_rows[-1]["step"] if self.stats_rows else None

  def write_config(self, config: Any) -> None:
    (self.workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

  def metrics(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
    row = {"step": step, **{f"{prefix}/{k}": _jsonable(v) for k, v in values.items()}}
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for key, value in row.items():
      if key != "step":
        self.tb.add_scalar(key, value, step)
    self.tb.flush()

  def stats(self, step: int, values: dict[str, Any]) -> None:
    row = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
    with open(self.stats_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    self.stats_rows.append(row)
    self.last_stats_step = step
    _atomic_save(self.stats_dir / "steps.npy", np.asarray([r["step"] for r in self.stats_rows]))
    for key in values:
      stacked = np.asarray([r[key] for r in self.stats_rows], np.float32)
      _atomic_save(self.stats_dir / (key.replace("/", ".") + ".npy"), stacked)
      per_layer = np.asarray(values[key])
      if per_layer.ndim == 1:
        for layer, value in enumerate(per_layer):
          self.tb.add_scalar(f"stats/{key}/layer_{layer:03d}", float(value), step)
    self.tb.flush()

  def close(self) -> None:
    self.tb.close()
