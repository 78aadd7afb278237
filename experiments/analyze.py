"""Depth analysis of a pretrained model on a local text: per-depth statistics, the angular distance
matrix and the loss with each block removed, in a training workdir's layout.

  python -m experiments.analyze --hf checkpoints/gpt2 --text corpus.txt --workdir runs/gpt2_analysis

``--hf`` is a Hugging Face directory (LLaMA or GPT-2, with its ``tokenizer.json`` or
``tokenizer.model``), a normjax model directory or a training workdir. The text (a file, or a
directory of text files) is tokenized and packed as training data would be (``data.name =
text_files``); the first ``--num-batches`` validation batches are the measurement set.

The workdir gets what a training run's statistics step writes: ``config.json`` (the config that
describes the measurement, ``train.init_from`` = the model), ``model.json``, ``stats.jsonl`` and
``stats/`` (one row, step 0: residual variance per depth, branch norms, attention entropy, gradient
norm and weight std per layer, the angular distance matrix), ``metrics.jsonl`` (``eval/loss``),
``depth_analysis.json`` (``experiments.depth_analysis``' removal losses) and ``result.json`` with the
tags the notebooks group by, so ``notebooks/_plots.load_runs`` on the parent directory plots it.
Layer removal follows Gromov et al. (arXiv:2403.17887) and Sun et al.'s Curse of Depth
(arXiv:2502.05795): block l replaced by the identity.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx

from experiments import depth_analysis, sweep
from normjax import config as config_lib
from normjax import interop, models
from normjax.config import ConfigError
from normjax.data.batches import packing
from normjax.train.step import depth_statistics, task_loss
from normjax.train.writer import Writer

CONFIG = "configs/llama.py:tiny"


def tokenizer_of(source: pathlib.Path, override: str = "") -> tuple[str, str]:
  """(kind, path) of the model's tokenizer: ``override``, else the directory's ``tokenizer.json``
  (HF ``tokenizers``) or ``tokenizer.model`` (SentencePiece)."""
  candidates = [pathlib.Path(override)] if override else [source / "tokenizer.json",
                                                          source / "tokenizer.model"]
  for path in candidates:
    if path.is_file():
      return ("sentencepiece" if path.suffix == ".model" else "hf"), str(path.resolve())
  raise ConfigError(f"no tokenizer for {source}: it has no tokenizer.json or tokenizer.model; "
                    "pass --tokenizer PATH")


def text_dir(text: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
  """A directory of text files for ``data.text_dir``: ``text`` itself, or one holding a link to it."""
  if text.is_dir():
    return text.resolve()
  if not text.is_file():
    raise ConfigError(f"--text {text}: no such file or directory")
  folder = workdir / "text"
  folder.mkdir(parents=True, exist_ok=True)
  link = folder / text.name
  if not link.exists():
    os.symlink(text.resolve(), link)
  return folder


def measurement_config(args: argparse.Namespace, workdir: pathlib.Path) -> mlc.ConfigDict:
  """The config of the measurement: the tiny LLaMA config with the model from ``args.hf``."""
  source = pathlib.Path(args.hf).resolve()
  kind, path = tokenizer_of(source, args.tokenizer)
  return config_lib.load(CONFIG, {
      "train.init_from": str(source), "train.batch_size": args.batch_size,
      "train.eval_steps": args.num_batches, "data.name": "text_files",
      "data.text_dir": str(text_dir(pathlib.Path(args.text), workdir)), "data.tokenizer.kind": kind,
      "data.tokenizer.path": path, "data.seq_len": args.seq_len, "data.data_dir": args.data_dir,
      "mesh.num_devices": 1})


def statistics_row(model: nnx.Module, batch: dict[str, Any]) -> tuple[float, dict[str, Any]]:
  """(loss, the training loop's statistics row) of ``model`` on ``batch``, in eval mode."""
  def loss_fn(model):
    logits, depth_stats = model(batch["inputs"], collect_stats=True, **packing(batch))
    return task_loss(logits, batch)[0], depth_stats

  (loss, depth_stats), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
  row = depth_statistics(depth_stats, grads, nnx.state(model, nnx.Param))
  return float(loss), jax.tree.map(np.asarray, row)


def analyze(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the measurement into ``args.workdir`` (see the module docstring); returns the analysis."""
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config = measurement_config(args, workdir)
  # the source's architecture with the config's numerics; a ViT source fails here (text data)
  run = config_lib.validate(config, jax.device_count())
  cfg = run.model
  model = models.with_params(cfg, interop.read_params(args.hf, cfg))
  batch = depth_analysis.validation_batch(config, args.num_batches)
  for name in ("stats", "stats.jsonl", "metrics.jsonl"):  # a rerun replaces the measurement
    target = workdir / name
    if target.is_dir():
      shutil.rmtree(target)
    else:
      target.unlink(missing_ok=True)
  loss, row = statistics_row(model, batch)
  writer = Writer(workdir, 0)
  try:
    writer.write_config(config)
    interop.native.write_model_json(workdir, cfg)
    writer.stats(0, row)
    writer.metrics(0, {"loss": loss}, prefix="eval")
  finally:
    writer.close()
  result = depth_analysis.write_analysis(workdir, model, batch, args.threshold, source=str(args.hf),
                                         num_batches=args.num_batches, batch_size=args.batch_size)
  tags = {"model": cfg.name, "placement": cfg.placement.kind, "depth": cfg.num_layers,
          "source": str(args.hf)}
  (workdir / sweep.RESULT).write_text(json.dumps({"name": workdir.name, "tags": tags, "eval_loss": loss,
                                                  "diverged": False}, indent=1) + "\n")
  return result


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.analyze", description=__doc__.splitlines()[0])
  parser.add_argument("--hf", required=True, help="an HF directory, a normjax model directory or a workdir")
  parser.add_argument("--text", required=True, help="a text file or a directory of text files")
  parser.add_argument("--workdir", required=True, help="where the measurement is written")
  parser.add_argument("--tokenizer", default="", help="tokenizer.json or a SentencePiece .model "
                      "(default: the one in --hf)")
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--num-batches", type=int, default=4, help="validation batches measured")
  parser.add_argument("--threshold", type=float, default=0.01,
                      help="a block is removable when (removed - full) / full loss is below this")
  parser.add_argument("--data-dir", default="", help="dataset cache (default: $NORMJAX_DATA_DIR or "
                      "~/.cache/normjax)")
  args = parser.parse_args(argv)
  try:
    result = analyze(args)
  except ConfigError as error:
    print(f"config error: {error}")
    return 2
  increases = ", ".join(f"{v:+.4f}" for v in result["loss_increase"])
  print(f"{args.hf}: loss {result['full_loss']:.4f}; loss increase per removed block [{increases}]; "
        f"removable fraction {result['removable_fraction']:.2f}; written to {args.workdir}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
