"""Helpers shared by the training-loop tests: a small LLaMA, the config and CLI of a run, and
readers of what a run left in its workdir."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable

from normjax import config as common
from normjax.train.writer import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[1]

SMALL_LLAMA = {
    "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2, "data.seq_len": 32,
    "train.batch_size": 8, "train.steps": 20, "train.log_every": 1, "train.eval_every": 10,
    "train.eval_steps": 2, "ckpt.every": 10, "stats.every": 5, "optim.warmup_steps": 2,
    "mesh.num_devices": 1,
}
# the CLI as a user runs it: one CPU device, the default XLA flags
CLI_ENV = {**os.environ, "XLA_FLAGS": ""}


def load_config(path: str, overrides: dict, data_dir: pathlib.Path):
  return common.load(str(ROOT / path), {**overrides, "data.data_dir": str(data_dir)})


def cli(path: str, overrides: dict, data_dir: pathlib.Path, workdir: pathlib.Path) -> list[str]:
  args = [sys.executable, "-m", "normjax.train", f"--config={ROOT / path}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}"]
  return args + [f"--config.{key}={value}" for key, value in overrides.items()]


def start(path: str, overrides: dict, data_dir: pathlib.Path, workdir: pathlib.Path) -> subprocess.Popen:
  """A training run in a subprocess, its output captured as text."""
  return subprocess.Popen(cli(path, overrides, data_dir, workdir), env=CLI_ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def train_losses(workdir: pathlib.Path) -> dict[int, float]:
  return {row["step"]: row["train/loss"] for row in read_jsonl(workdir / "metrics.jsonl")
          if "train/loss" in row}


def train_losses_or_empty(workdir: pathlib.Path) -> dict[int, float]:
  """``train_losses`` of a run that may be writing its first row right now."""
  try:
    return train_losses(workdir)
  except (FileNotFoundError, json.JSONDecodeError):
    return {}


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str, timeout: float = 240,
             interval: float = 0.05) -> None:
  """Polls ``condition`` while ``process`` runs; fails with ``what`` and the run's output otherwise."""
  deadline = time.time() + timeout
  while not condition():
    if process.poll() is not None or time.time() > deadline:
      process.kill()
      out, err = process.communicate()
      raise AssertionError(f"the run ended or timed out before {what}:\n{out[-2000:]}\n{err[-4000:]}")
    time.sleep(interval)
