"""LayerNorm removal by fine-tuning (Heimersheim 2024, arXiv:2409.13710): a Pre-LN GPT-2 whose
LayerNorms are replaced, one kind at a time, by fixed-scale norms, with fine-tuning in between.

  python -m experiments.ln_removal --source checkpoints/gpt2 --text corpus.txt --workdir runs/noln

``--source`` is a Hugging Face GPT-2 directory, a normjax model directory or a training workdir
(with its ``tokenizer.json``, or pass ``--tokenizer``); ``--text`` a text file or a directory of
them, tokenized and packed as training data (``data.name = text_files``). Stages, in the paper's
order:

  0 vanilla   fine-tune only (the paper's control, and the start of the chain)
  1 ln2       ln_2, the MLP's input norm, in every block
  2 ln1_qk    ln_1 as the queries and keys read it (the values still read the LayerNorm)
  3 ln1_v     ln_1 as the values read it
  4 lnf       ln_f; the first position's own std goes too, leaving one std per norm reader

Stage k >= 1 loads stage k-1's result, measures the std of each newly fixed norm's input on
``--measure-batches`` training batches (the mean over tokens of ``sqrt(var + eps)``; the first
position of every document, where the residual norm is largest, gets its own mean, as the paper
treats the BOS position until the end), saves the model with those stds as ``stage_k/start`` (a
model directory), evaluates it, and fine-tunes it with the training loop (``train.init_from``) in
``stage_k/`` (a training workdir; each stage draws its own batch order). ``stage_k/stage.json``
records the stage (the stds, the loss before and after fine-tuning, on the same ``--eval-batches``
validation batches for every stage); a stage that has it is skipped on a rerun. ``summary.json``
collects the stages. Its ``vanilla_ft`` had one stage's steps, ``ln_free`` all five: a
budget-matched control continues stage 0 with the training loop (docs/ln_removal.md).

Differences from the paper: each stage is its own run (fresh AdamW state, warmup and cosine per
stage) and a stage fixes a slot in every layer at once. ``--std-from source`` takes every std from
the source model instead of the previous stage (the original public code's precomputed table), and
``--first-position shared`` uses one std for every position from the start.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import pathlib
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx

from experiments import analyze
from normjax import config as config_lib
from normjax import data, interop, models
from normjax.config import ConfigError
from normjax.data.batches import packing
from normjax.models.config import FIXED_SLOTS, FixedNormConfig, FixedStd, ModelConfig
from normjax.train import train
from normjax.train.step import task_loss

CONFIG = "configs/llama.py:gpt2_tiny"
STAGES = (("vanilla", ()), ("ln2", ("mlp_in",)), ("ln1_qk", ("attn_qk",)), ("ln1_v", ("attn_v",)),
          ("lnf", ("final",)))
MEASURED = {"mlp_in": "mlp", "attn_qk": "attn", "attn_v": "attn", "final": "final"}  # norm input
STAGE_JSON, SUMMARY = "stage.json", "summary.json"
# GPT-2 small, cross-entropy on OpenWebText: the published numbers of the recipe (arXiv:2409.13710)
# as its public follow-up code reports them (submarat/removing-layer-norm, 300 steps of 0.5M tokens)
PAPER = {"original": 3.1006, "vanilla_ft": 3.0126, "ln_free": 3.0797}


def stage_config(args: argparse.Namespace, stage: int) -> mlc.ConfigDict:
  """The fine-tuning run of ``stage`` on the text (its ``train.init_from`` is set once the stage's
  start model exists): the tiny GPT-2 config, whose model section only sets the numerics."""
  kind, path = analyze.tokenizer_of(pathlib.Path(args.source), args.tokenizer)
  text = analyze.text_dir(pathlib.Path(args.text), pathlib.Path(args.workdir))
  return config_lib.load(CONFIG, {
      "train.steps": args.steps_per_stage, "train.batch_size": args.batch_size,
      "train.eval_every": 0, "train.eval_steps": args.eval_batches, "train.log_every": 1,
      "ckpt.every": 0, "stats.every": 0, "optim.lr": args.lr,
      "optim.warmup_steps": args.warmup_steps, "optim.weight_decay": args.weight_decay,
      "data.name": "text_files", "data.text_dir": str(text), "data.tokenizer.kind": kind,
      "data.tokenizer.path": path, "data.seq_len": args.seq_len, "data.data_dir": args.data_dir,
      "data.shuffle_seed": stage,  # fresh batches every stage
      "mesh.num_devices": 1})


def train_batches(config: mlc.ConfigDict, count: int) -> list[dict[str, np.ndarray]]:
  """The first ``count`` training batches of ``config``: what its run starts on."""
  batches = data.load(config.data, "train", config.train.batch_size)
  return [batches.batch(i) for i in range(count)]


def validation_batches(args: argparse.Namespace) -> list[dict[str, np.ndarray]]:
  """The ``--eval-batches`` validation batches every stage's losses are measured on (stage 0's
  order: the same batches for every stage, so the losses compare across stages)."""
  batches = data.load(stage_config(args, 0).data, "validation", args.batch_size)
  return [batches.batch(i) for i in range(args.eval_batches)]


@nnx.jit
def _input_stds(model: nnx.Module, batch: dict[str, Any]) -> dict[str, jax.Array]:
  _, stats = model(batch["inputs"], **packing(batch))
  return {key.split("/")[0]: value for key, value in stats.items() if key.endswith("/input_std")}


@nnx.jit
def _loss(model: nnx.Module, batch: dict[str, Any]) -> jax.Array:
  return task_loss(model(batch["inputs"], **packing(batch))[0], batch)[0]


def measure(model: nnx.Module, batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """The mean token std of every norm input: ``{"attn" | "mlp": [L, 2], "final": [1, 2]}``, the
  columns being the positions after each document's first and the first positions."""
  probe = nnx.with_attributes(model, measure_std=True)
  total: dict[str, np.ndarray] = {}
  for batch in batches:  # (sum, count) pairs, so that batches add up
    for name, value in _input_stds(probe, batch).items():
      total[name] = total.get(name, 0.0) + np.asarray(value, np.float64).reshape(-1, 4)
  return {name: np.stack([s[:, 0] / s[:, 1], s[:, 2] / s[:, 3]], 1) for name, s in total.items()}


def evaluate(model: nnx.Module, batches: list[dict[str, np.ndarray]]) -> float:
  """Mean loss over ``batches`` in eval mode, as the training loop's evaluation computes it."""
  return float(np.mean([float(_loss(model, batch)) for batch in batches]))


def removal_config(cfg: ModelConfig, slots: tuple[str, ...], measured: dict[str, Any],
                   first_position: str) -> ModelConfig:
  """``cfg`` with ``slots`` fixed at the ``measured`` stds. The final norm's stage also ends the
  first position's own std everywhere (the paper removes that special treatment last)."""
  fixed = cfg.fixed_norm
  for slot in slots:
    values = measured[MEASURED[slot]]
    first = values[:, 1] if first_position == "own" and slot != "final" else None
    fixed = dataclasses.replace(fixed, **{slot: FixedStd(values[:, 0], first)})
  if "final" in slots:
    fixed = dataclasses.replace(fixed, **{s: FixedStd(getattr(fixed, s).std) for s in fixed.slots})
  return cfg.replace(fixed_norm=fixed)


def start_model(args: argparse.Namespace, stage: int, config: mlc.ConfigDict) -> pathlib.Path:
  """Stage ``stage``'s starting model directory, built (once) from the previous stage's result:
  the source itself for stage 0."""
  out = pathlib.Path(args.workdir)
  if stage == 0:
    return pathlib.Path(args.source).resolve()
  start = out / f"stage_{stage}" / "start"
  if (start / interop.native.MODEL_JSON).is_file():  # written last by ``save``: the model is whole
    return start
  cfg, previous = interop.load(out / f"stage_{stage - 1}")
  measured_on = previous if args.std_from == "previous" else interop.load(args.source)[1]
  measured = measure(measured_on, train_batches(config, args.measure_batches))
  new_cfg = removal_config(cfg, STAGES[stage][1], measured, args.first_position)
  interop.save(models.with_params(new_cfg, models.params_of(previous)), start)
  return start


def run_stage(args: argparse.Namespace, stage: int) -> dict[str, Any]:
  """Runs (or resumes) one stage into ``<workdir>/stage_<stage>``; returns its record."""
  workdir = pathlib.Path(args.workdir) / f"stage_{stage}"
  record_path = workdir / STAGE_JSON
  if record_path.is_file():
    print(f"stage {stage} ({STAGES[stage][0]}): finished, skipped")
    return json.loads(record_path.read_text())
  config = stage_config(args, stage)
  start = start_model(args, stage, config)
  config.train.init_from = str(start)
  cfg, model = interop.load(start)
  eval_set = validation_batches(args)
  before = evaluate(model, eval_set)
  result = train(config, str(workdir))
  after = evaluate(interop.load(workdir)[1], eval_set)
  record = {"stage": stage, "name": STAGES[stage][0], "fixed": list(STAGES[stage][1]),
            "fixed_slots": list(cfg.fixed_norm.slots), "std": dataclasses.asdict(cfg.fixed_norm),
            "loss_before": before, "loss_after": after, "train_loss": result["train_loss"],
            "steps": args.steps_per_stage, "start": str(start)}
  record_path.write_text(json.dumps(record, indent=1) + "\n")
  print(f"stage {stage} ({STAGES[stage][0]}): loss {before:.4f} -> {after:.4f}")
  return record


def check_source(path: str) -> None:
  """ConfigError (field, value, choices) for a source the recipe cannot apply to, before any
  training: every slot fixed must give a valid config."""
  cfg = interop.source_config(path)
  count = {slot: 1 if slot == "final" else cfg.num_layers for slot in FIXED_SLOTS}
  cfg.replace(fixed_norm=FixedNormConfig(**{s: FixedStd((1.0,) * n) for s, n in count.items()}))


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Every stage in order, then ``summary.json``; returns the summary."""
  check_source(args.source)
  out = pathlib.Path(args.workdir)
  out.mkdir(parents=True, exist_ok=True)
  records = [run_stage(args, stage) for stage in range(len(STAGES))]
  for previous, record in itertools.pairwise(records):  # each switch's cost before fine-tuning
    record["removal_jump"] = record["loss_before"] - previous["loss_after"]
  summary = {"source": str(args.source), "paper_gpt2_small_owt": PAPER,
             "original": records[0]["loss_before"], "vanilla_ft": records[0]["loss_after"],
             "ln_free": records[-1]["loss_after"], "vanilla_ft_steps": records[0]["steps"],
             "ln_free_steps": sum(r["steps"] for r in records), "stages": records,
             "args": vars(args)}
  (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
  return summary


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m experiments.ln_removal",
                              description=__doc__.splitlines()[0])
  p.add_argument("--source", required=True,
                 help="an HF GPT-2 directory, a normjax model directory or a training workdir")
  p.add_argument("--text", required=True, help="a text file or a directory of text files")
  p.add_argument("--workdir", required=True, help="where the stages and summary.json are written")
  p.add_argument("--tokenizer", default="", help="tokenizer.json (default: the one in --source)")
  p.add_argument("--steps-per-stage", type=int, default=60, help="fine-tuning steps of each stage "
                 "(5 x 60 = the 300 steps the published GPT-2 small run took)")
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (the paper's 6e-4)")
  p.add_argument("--warmup-steps", type=int, default=0)
  p.add_argument("--weight-decay", type=float, default=0.01)
  p.add_argument("--measure-batches", type=int, default=4, help="training batches the stds average")
  p.add_argument("--eval-batches", type=int, default=4, help="validation batches of the losses")
  p.add_argument("--first-position", choices=("own", "shared"), default="own",
                 help="own: a document's first position has its own std until the last stage "
                 "(the paper); shared: one std for every position")
  p.add_argument("--std-from", choices=("previous", "source"), default="previous",
                 help="previous: measured on the previous stage's model just before the switch "
                 "(the paper); source: every std measured on the source (the first public code)")
  p.add_argument("--data-dir", default="", help="dataset cache (default: $NORMJAX_DATA_DIR or "
                 "~/.cache/normjax)")
  return p


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  try:
    summary = run(args)
  except ConfigError as error:
    print(f"config error: {error}")
    return 2
  print(f"original {summary['original']:.4f}, vanilla fine-tune {summary['vanilla_ft']:.4f}, "
        f"LayerNorm-free {summary['ln_free']:.4f}; written to {args.workdir}/{SUMMARY}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
