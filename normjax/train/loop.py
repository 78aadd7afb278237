"""The training loop: one screen from config to checkpoints, metrics and per-depth statistics.

    python -m normjax.train --config=configs/llama.py:tiny --workdir=runs/llama_tiny

Resumes automatically from the newest checkpoint in the workdir (the data order depends only on
the step). SIGTERM saves a checkpoint and exits cleanly. A non-finite loss stops the run, naming the
step, the last good checkpoint and the last statistics row; nothing written before is touched.
"""

from __future__ import annotations

import json
import math
import pathlib
import signal
import time
from typing import Any, NamedTuple

import jax
import ml_collections as mlc
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import nnx
from jax.sharding import PartitionSpec

from normjax import config as config_lib
from normjax import data, models
from normjax.train import mesh as mesh_lib
from normjax.train.optim import make_optimizer, schedule
from normjax.train.step import Compiled, Steps, jit_steps
from normjax.train.writer import Writer
from normjax.treeutil import path_names


class NonFiniteLoss(RuntimeError):
  """Raised when the training loss is NaN or infinite; the message says where to look."""


def state_specs(steps: Steps, model: Any, state: dict[str, Any], mesh: Any) -> dict[str, Any]:
  """PartitionSpecs for the whole train state: params by the logical rules, the rest replicated."""
  param_specs = mesh_lib.param_specs(nnx.state(model, nnx.Param), mesh)
  opt_specs = optax.tree_map_params(steps.tx, lambda _, spec: spec, state["opt_state"], param_specs,
                                    transform_non_params=lambda _: PartitionSpec())
  return {"step": PartitionSpec(), "params": param_specs,
          "norm_state": jax.tree.map(lambda _: PartitionSpec(), state["norm_state"]),
          "opt_state": opt_specs}


def build_steps(config: mlc.ConfigDict, model_cfg: Any) -> tuple[nnx.Module, Steps, Any]:
  """The model (seeded by ``config.seed``), its optimizer and ``Steps``, exactly as ``train`` builds
  them (so a restored checkpoint matches); returns (model, steps, weight-decay mask)."""
  model = models.build(model_cfg, seed=config.seed)
  tx, decay = make_optimizer(nnx.state(model, nnx.Param), config)
  return model, Steps(model, tx, schedule(config)), decay


class Sharded(NamedTuple):
  """The train state on its mesh and everything compiled for it (``build_sharded``)."""
  mesh: Any
  steps: Steps
  state: dict[str, Any]  # placed by ``state_shardings``
  specs: dict[str, Any]  # PartitionSpecs of the state
  state_shardings: Any
  batch_sharding: Any
  compiled: Compiled
  decay: Any  # the weight-decay mask


def build_sharded(config: mlc.ConfigDict, model_cfg: Any, sizes: dict[str, int]) -> Sharded:
  """The initial train state placed on a mesh of ``sizes`` and the compiled steps, as ``train`` and
  the benchmarks use them."""
  mesh = mesh_lib.make_mesh(sizes, jax.devices()[:math.prod(sizes.values())])
  model, steps, decay = build_steps(config, model_cfg)
  state = steps.init_state(model)
  specs = state_specs(steps, model, state, mesh)
  state_shardings = mesh_lib.shardings(specs, mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  return Sharded(mesh, steps, jax.device_put(state, state_shardings), specs, state_shardings,
                 batch_sharding, jit_steps(steps, state_shardings, batch_sharding), decay)


def due(step: int, every: int, *, last: int | None = None, first: bool = False) -> bool:
  """Whether a periodic action (log, eval, save, statistics, TVR) runs after ``step`` (1-based):
  at multiples of ``every`` (0 = never), at step ``last`` and, with ``first``, at step 1."""
  return bool(every and step % every == 0) or step == last or (first and step == 1)


def train(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  # ---------------------------------------------------------------- validate once (no JAX work yet)
  run = config_lib.validate(config, jax.device_count())
  workdir_path = pathlib.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  # ---------------------------------------------------------------- data
  info = data.info(run.data)
  batch_size, total = config.train.batch_size, config.train.steps
  train_data = data.load(run.data, "train", batch_size)
  val_data = data.load(run.data, "validation", batch_size)
  items_per_step = batch_size * (run.data.seq_len if run.data.kind == "text" else 1)
  throughput_key = "tokens_per_second" if run.data.kind == "text" else "images_per_second"
  # ---------------------------------------------------------------- model, optimizer, sharding
  mesh, steps, state, specs, state_shardings, batch_sharding, compiled, decay = build_sharded(
      config, run.model, run.mesh)
  tvr = None if run.tvr is None else jax.jit(
      lambda p: steps.tvr(p, run.tvr), in_shardings=(state_shardings["params"],),
      out_shardings=(state_shardings["params"], None))
  # ---------------------------------------------------------------- checkpoints and resume
  ckpt_dir = (workdir_path / "checkpoints").absolute()
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=config.ckpt.keep, create=True, enable_async_checkpointing=True))
  start = manager.latest_step() or 0
  if start:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, state_shardings)
    state = manager.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
  writer = Writer(workdir_path, start)
  writer.write_config(config)
  _describe(workdir_path, run, info, specs, decay, start)
  # ---------------------------------------------------------------- loop
  preempted = []
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
  bar = tqdm.tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
  last = {"time": time.perf_counter(), "step": start, "loss": math.nan, "eval": {}}

  def save(step: int, force: bool = False) -> None:
    manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"step": step, "config": json.loads(config.to_json_best_effort())})))

  def process(step: int, metrics: dict[str, Any]) -> None:
    host = jax.device_get(metrics)
    depth_stats = host.pop("stats", None)
    if depth_stats is not None:
      writer.stats(step, depth_stats)
    loss = float(host["loss"])
    if not math.isfinite(loss):
      writer.metrics(step, host)
      manager.wait_until_finished()
      good = manager.latest_step()
      raise NonFiniteLoss(
          f"non-finite loss {loss} at step {step}; last good checkpoint: "
          f"{f'step {good} in {ckpt_dir}' if good else 'none'}; last statistics: "
          f"step {writer.last_stats_step} in {writer.stats_path}")
    last["loss"] = loss
    bar.set_postfix(loss=f"{loss:.4f}")
    if due(step, config.train.log_every, last=total):
      now = time.perf_counter()
      host[throughput_key] = items_per_step * (step - last["step"]) / (now - last["time"])
      last["time"], last["step"] = now, step
      writer.metrics(step, host)

  pending = None
  try:
    # Traced under the mesh: fused norm kernels (not partitionable) run in shard_map over batch axes.
    with jax.set_mesh(mesh):
      for index in range(start, total):
        step = index + 1
        collect = due(step, config.stats.every, first=True) if config.stats.every else False
        batch = jax.device_put(train_data.batch(index), batch_sharding)
        state, metrics = compiled.train_step(collect)(state, batch)
        if pending is not None:  # read the previous step while this one runs
          process(*pending)
        pending = (step, metrics)
        bar.update(1)
        if tvr is not None and due(step, run.tvr.every):
          params, report = tvr(state["params"])
          state = {**state, "params": params}
          writer.metrics(step, {"rescaled": sum(int(np.sum(r)) for r in report["rescaled"].values())},
                         prefix="tvr")
        save_now = bool(preempted) or due(step, config.ckpt.every, last=total)
        eval_now = due(step, config.train.eval_every, last=total)
        if save_now or eval_now:
          process(*pending)  # a checkpoint or evaluation only follows a step whose loss was checked
          pending = None
          if save_now:
            save(step, force=bool(preempted))
          if eval_now:
            last["eval"] = evaluate(compiled.eval, state, val_data, config.train.eval_steps,
                                    batch_sharding)
            writer.metrics(step, last["eval"], prefix="eval")
        if preempted:
          bar.write(f"SIGTERM: checkpoint saved at step {step} in {ckpt_dir}; exiting")
          break
      if start >= total:  # resumed a finished run: report its evaluation again
        last["eval"] = evaluate(compiled.eval, state, val_data, config.train.eval_steps, batch_sharding)
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    bar.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
  parts = [f"train loss {last['loss']:.4f}" if math.isfinite(last["loss"]) else "no new steps"]
  parts += [f"eval {k} {v:.4f}" for k, v in last["eval"].items()]
  print(f"done: step {last['step'] if preempted else total}/{total}, {', '.join(parts)}; "
        f"workdir: {workdir_path.absolute()}")
  return {"train_loss": last["loss"], **{f"eval_{k}": v for k, v in last["eval"].items()}}


def evaluate(eval_step: Any, state: dict[str, Any], val_data: Any, num_batches: int,
             batch_sharding: Any) -> dict[str, float]:
  """Mean of the eval metrics over the first ``num_batches`` validation batches (fixed order)."""
  results = [jax.device_get(eval_step(state, jax.device_put(val_data.batch(i), batch_sharding)))
             for i in range(num_batches)]
  return {key: float(np.mean([r[key] for r in results])) for key in results[0]} if results else {}


def _describe(workdir: pathlib.Path, run: config_lib.Validated, info: dict[str, Any],
              specs: dict[str, Any], decay: Any, start: int) -> None:
  """Startup log: data, model, mesh, the weight-decay mask and the parameter partition specs."""
  flat_decay = {"/".join(map(str, k)): bool(v) for k, v in _flatten(decay)}
  flat_specs = {"/".join(map(str, k)): str(v) for k, v in _flatten(
      specs["params"], is_leaf=lambda x: isinstance(x, PartitionSpec))}
  (workdir / "weight_decay_mask.json").write_text(json.dumps(flat_decay, indent=1) + "\n")
  (workdir / "partition_specs.json").write_text(json.dumps(flat_specs, indent=1) + "\n")
  excluded = sorted(k for k, v in flat_decay.items() if not v)
  print(f"data: {info['source']} ({info['num_examples']})")
  m = run.model
  print(f"model: {m.name} L={m.num_layers} d={m.d_model} norm={m.norm.kind} "
        f"placement={m.placement.kind} init={m.init.scheme} dtype={m.dtype}")
  print(f"mesh: {run.mesh}; weight decay on {len(flat_decay) - len(excluded)} tensors, not on "
        f"{len(excluded)} (norm parameters and biases; see weight_decay_mask.json)")
  if start:
    print(f"resuming from step {start}")


def _flatten(tree: Any, is_leaf: Any = None) -> list[tuple[tuple[str, ...], Any]]:
  return [(path_names(p), v) for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]
