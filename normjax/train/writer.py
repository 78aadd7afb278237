"""Everything the loop writes into the workdir, crash-safe.

  config.json            the full config
  config_changes.jsonl   one row per resume that was allowed to change the config (field: [old, new])
  metrics.jsonl          one row per log step: step, loss, lr, grad_norm, throughput; eval rows too
  stats.jsonl            one row per statistics step: every per-depth statistic as a list
  stats/<step>.npz       the same row as arrays, one file per statistics step (``read_stats``
                         stacks them: ``[logged steps, L]``, ``[logged steps, L+1, L+1]``, ...)
  tb/                    TensorBoard events (scalars, and per-layer statistics as stats/<name>/layer_NNN)

Rows are appended and flushed at once; each statistics file is written once, atomically (write,
then rename), so the cost of a statistics step does not grow with the run and a crash or kill never
leaves a torn file. On resume, rows and files past the restored step (from the lost part of the
previous run) are dropped first: the resumed run writes them again, identically. A write that fails
(a full or read-only disk) stops the run with ``WorkdirError`` naming the file and the OS error.

Only process 0 of a multi-process run writes (``primary``); the others' writers only read the rows
kept from before (``row``), so every row and file exists once. Temporary names carry the host and
pid anyway, so two writers can never collide on one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter

from normjax.train.workdir import WorkdirError, describe

# A diverged run's last row is NaN on purpose; tensorboardX would warn once per value.
logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)


@contextlib.contextmanager
def _writing(path: pathlib.Path) -> Iterator[None]:
  try:
    yield
  except OSError as error:
    raise WorkdirError(f"cannot write {path}: {describe(error)}; "
                       "training stopped (the last complete checkpoint is intact)") from None


def _jsonable(value: Any) -> Any:
  array = np.asarray(value)
  return array.item() if array.ndim == 0 else array.tolist()


STATS_DIR = "stats"


def _shard(stats_dir: pathlib.Path, step: int) -> pathlib.Path:
  return stats_dir / f"{step:09d}.npz"


def _shard_step(path: pathlib.Path) -> int | None:
  return int(path.stem) if path.suffix == ".npz" and path.stem.isdigit() else None


def _tmp(path: pathlib.Path) -> pathlib.Path:
  """A temporary name next to ``path``, unique to this process (removed on resume if left over)."""
  return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _atomic_savez(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  tmp = _tmp(path)
  with _writing(path), open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def _append(path: pathlib.Path, row: dict[str, Any]) -> None:
  with _writing(path), open(path, "a") as f:
    f.write(json.dumps(row) + "\n")


def read_stats(workdir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every per-depth statistic of a run, stacked over statistics steps: ``{"steps": [S],
  "mlp/resid_var": [S, L], "angular_distance": [S, L+1, L+1], ...}`` ({} before the first row)."""
  stats_dir = pathlib.Path(workdir) / STATS_DIR
  shards = sorted((step, path) for path in stats_dir.glob("*.npz")
                  if (step := _shard_step(path)) is not None) if stats_dir.is_dir() else []
  if not shards:
    return {}
  rows = []
  for _, path in shards:
    with np.load(path) as f:
      rows.append({key.replace(".", "/"): f[key] for key in f.files})
  out = {"steps": np.asarray([step for step, _ in shards])}
  out.update({key: np.stack([row[key] for row in rows]) for key in rows[-1]})
  return out


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
  tmp = _tmp(path)
  tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
  os.replace(tmp, path)
  return kept


class Writer:
  """The workdir's rows and files of a run resumed at ``resume_step`` (0: a new run); with
  ``primary=False`` (processes other than 0) it reads, but writes nothing."""

  def __init__(self, workdir: str | os.PathLike, resume_step: int, primary: bool = True):
    self.workdir, self.primary = pathlib.Path(workdir), primary
    self.stats_dir = self.workdir / STATS_DIR
    self.metrics_path = self.workdir / "metrics.jsonl"
    self.stats_path = self.workdir / "stats.jsonl"
    if not primary:
      self._rows = [r for r in read_jsonl(self.metrics_path) if r["step"] <= resume_step]
      self.last_stats_step = None
      return
    self.stats_dir.mkdir(parents=True, exist_ok=True)
    self._rows = _truncate_jsonl(self.metrics_path, resume_step)  # the kept rows, for ``row``
    kept = _truncate_jsonl(self.stats_path, resume_step)
    for path in self.stats_dir.iterdir():
      step = _shard_step(path)
      if (step is not None and step > resume_step) or path.name.endswith(".tmp"):
        path.unlink()
    self.tb = SummaryWriter(str(self.workdir / "tb"))
    self.last_stats_step: int | None = kept[-1]["step"] if kept else None

  def write_config(self, config: Any) -> None:
    if not self.primary:
      return
    path = self.workdir / "config.json"
    with _writing(path):
      path.write_text(config.to_json_best_effort(indent=2) + "\n")

  def config_change(self, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    if not self.primary:
      return
    _append(self.workdir / "config_changes.jsonl",
            {"step": step, "changes": {field: list(pair) for field, pair in changes.items()}})

  def row(self, step: int, prefix: str) -> dict[str, float] | None:
    """The ``prefix/...`` values of a metrics row at ``step`` written before this writer started
    (prefix stripped), or None."""
    for row in reversed(self._rows):
      values = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith(prefix + "/")}
      if row["step"] == step and values:
        return values
    return None

  def metrics(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
    if not self.primary:
      return
    row = {"step": step, **{f"{prefix}/{k}": _jsonable(v) for k, v in values.items()}}
    _append(self.metrics_path, row)
    for key, value in row.items():
      if key != "step":
        self.tb.add_scalar(key, value, step)
    self.tb.flush()

  def stats(self, step: int, values: dict[str, Any]) -> None:
    if not self.primary:
      return
    row = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
    _append(self.stats_path, row)
    self.last_stats_step = step
    _atomic_savez(_shard(self.stats_dir, step),
                  {key.replace("/", "."): np.asarray(value, np.float32) for key, value in values.items()})
    for key in values:
      per_layer = np.asarray(values[key])
      if per_layer.ndim == 1:
        for layer, value in enumerate(per_layer):
          self.tb.add_scalar(f"stats/{key}/layer_{layer:03d}", float(value), step)
    self.tb.flush()

  def close(self) -> None:
    if self.primary:
      self.tb.close()
