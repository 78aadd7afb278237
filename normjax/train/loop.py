"""The training loop: one screen from config to checkpoints, metrics and per-depth statistics.

    python -m normjax.train --config=configs/llama.py:tiny --workdir=runs/llama_tiny

Resumes from the newest checkpoint that restores, if the config is the one it was trained with
(the data order depends only on the step). The workdir is locked (``workdir.py``); checkpoints are
saved, checked and restored by ``checkpoints.py``; SIGTERM and SIGINT save and stop
(``signals.py``); a non-finite loss, gradient norm or parameter stops the run, naming the step, the
last good checkpoint and the last statistics row. Nothing written before is touched.

The same code runs on one process or on many (``jax.distributed``, started by the command line or
by the caller): the state is created already sharded, each process reads only its rows of every
batch, process 0 alone writes files and prints, and every decision is taken alike by all processes
(``distributed.py``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import pathlib
import time
from typing import Any, NamedTuple

import jax
import ml_collections as mlc
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.sharding import PartitionSpec

from normjax import config as config_lib
from normjax import data, interop, models
from normjax.train import distributed, signals
from normjax.train import mesh as mesh_lib
from normjax.train import workdir as workdir_lib
from normjax.train.checkpoints import Checkpoints, Restored
from normjax.train.optim import OptimConfig, make_optimizer, schedule
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


def build_steps(config: mlc.ConfigDict, model_cfg: Any, *, abstract: bool = False
                ) -> tuple[nnx.Module, Steps, Any]:
  """The model (seeded by ``config.seed``; with ``abstract``, only its shapes), its optimizer and
  ``Steps``, exactly as ``train`` builds them (so a restored checkpoint matches); returns (model,
  steps, (weight-decay mask, trainable mask))."""
  build = functools.partial(models.build, model_cfg, seed=config.seed)
  model = nnx.eval_shape(build) if abstract else build()
  optim = OptimConfig.from_section(config.optim)
  tx, decay, trainable = make_optimizer(nnx.state(model, nnx.Param), optim, config.train.steps,
                                        config.train.get("trainable", "all"))
  return model, Steps(model, tx, schedule(optim, config.train.steps)), (decay, trainable)


class Sharded(NamedTuple):
  """The train state on its mesh and everything compiled for it (``build_sharded``)."""
  mesh: Any
  steps: Steps
  state: dict[str, Any]  # placed by ``state_shardings``
  specs: dict[str, Any]  # PartitionSpecs of the state
  state_shardings: Any
  batch_sharding: Any
  rows: mesh_lib.BatchRows  # the rows of a train/eval batch this process reads
  compiled: Compiled
  decay: Any  # the weight-decay mask
  trainable: Any  # True for the parameters that train (train.trainable)


def build_sharded(config: mlc.ConfigDict, model_cfg: Any, sizes: dict[str, int],
                  init_params: dict[str, Any] | None = None) -> Sharded:
  """The initial train state on a mesh of ``sizes`` and the compiled steps, as ``train`` and the
  benchmarks use them. The state is created already sharded: its shapes come from
  ``jax.eval_shape``, its values from one ``jit`` whose ``out_shardings`` are the state's, so each
  device computes only its own shards and no host ever holds the whole state (except
  ``init_params``, host arrays of pretrained weights, which every process reads in full)."""
  mesh = mesh_lib.make_mesh(sizes, config.mesh.across_processes)
  model, steps, (decay, trainable) = build_steps(config, model_cfg, abstract=True)

  def init(params: dict[str, Any] | None) -> dict[str, Any]:
    if params is None:
      return steps.init_state(models.build(model_cfg, seed=config.seed))
    return steps.init_state(models.with_params(model_cfg, params))

  specs = state_specs(steps, model, jax.eval_shape(init, init_params), mesh)
  state_shardings = mesh_lib.shardings(specs, mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  state = jax.jit(init, out_shardings=state_shardings)(init_params)
  return Sharded(mesh, steps, state, specs, state_shardings, batch_sharding,
                 mesh_lib.BatchRows(batch_sharding, config.train.batch_size),
                 jit_steps(steps, state_shardings, batch_sharding), decay, trainable)


def due(step: int, every: int, *, last: int | None = None, first: bool = False) -> bool:
  """Whether a periodic action (log, eval, save, statistics, TVR) runs after ``step`` (1-based):
  at multiples of ``every`` (0 = never), at step ``last`` and, with ``first``, at step 1."""
  return bool(every and step % every == 0) or step == last or (first and step == 1)


def train(config: mlc.ConfigDict, workdir: str, *, allow_config_change: bool = False) -> dict[str, Any]:
  """Trains (or resumes) the run of ``config`` in ``workdir``; returns the final train loss and
  evaluation. Raises ``Interrupted`` (after saving) on SIGTERM/SIGINT, ``NonFiniteLoss``,
  ``CheckpointError``, ``WorkdirError`` and ``ConfigError``/``ResumeRefused``, each with one message.
  ``allow_config_change`` resumes a checkpoint trained with another config (recorded).

  With ``jax.distributed`` initialized, every process calls it with the same config and workdir."""
  with signals.handled() as stop:  # first: a signal during the slow start-up gets its message
    distributed.begin_run()
    run = distributed.everywhere("config", lambda: config_lib.validate(
        config, jax.device_count(), jax.process_count()))
    _same_config_everywhere(config)
    with contextlib.ExitStack() as cleanup:
      wd = _claim(workdir, cleanup)
      return _Run(config, run, wd, stop, cleanup, allow_config_change).loop()


def _same_config_everywhere(config: mlc.ConfigDict) -> None:
  """ConfigError on every process when any was given another config than process 0 (the data
  cache may differ per host: ``data.data_dir``)."""
  first = json.loads(distributed.share("config-json", config.to_json_best_effort()))
  changes = config_lib.differences(first, config, frozenset({"data.data_dir"}))
  why = None if not changes else (f"process {jax.process_index()} was given another config than "
                                  "process 0: " + ", ".join(f"{k}: {a!r} (process 0) vs {b!r}"
                                                            for k, (a, b) in changes.items()))
  why = distributed.first_reason("same-config", why)
  if why:
    raise distributed.raised_everywhere(config_lib.ConfigError(why))


def _claim(workdir: str, cleanup: contextlib.ExitStack) -> workdir_lib.Workdir:
  """The workdir, claimed (created, locked) by process 0 and joined by every other process, which
  checks that it sees the same directory (``workdir.join``)."""
  def claim() -> tuple[workdir_lib.Workdir, str]:
    wd = cleanup.enter_context(workdir_lib.claim(workdir))
    return wd, wd.token()

  claimed = distributed.on_primary("workdir", claim)
  token = distributed.share("workdir-token", claimed[1] if claimed else None)
  return distributed.everywhere("workdir-shared", lambda: claimed[0] if claimed else workdir_lib.join(
      workdir, token, jax.process_index()))


def _open_data(cfg: data.DataConfig, batch_size: int) -> tuple[dict[str, Any], Any, Any]:
  """(info, train batches, validation batches); a missing dataset is built by process 0 alone
  while the others wait (one build, no race on its files)."""
  if jax.process_count() > 1:
    distributed.on_primary("data-build", lambda: data.info(cfg))
  return distributed.everywhere("data", lambda: (
      data.info(cfg), data.load(cfg, "train", batch_size), data.load(cfg, "validation", batch_size)))


class _Run:
  """One training run: start-up (data, model, restore, writer) in ``__init__``, then ``loop``."""

  def __init__(self, config: mlc.ConfigDict, run: config_lib.Validated, wd: workdir_lib.Workdir,
               stop: signals.StopRequest, cleanup: contextlib.ExitStack, allow_config_change: bool):
    self.config, self.run, self.wd, self.stop = config, run, wd, stop
    self.total, batch_size = config.train.steps, config.train.batch_size
    self.primary = distributed.primary()
    info, self.train_data, self.val_data = _open_data(run.data, batch_size)
    self.items_per_step = batch_size * (run.data.seq_len if run.data.kind == "text" else 1)
    self.throughput_key = "tokens_per_second" if run.data.kind == "text" else "images_per_second"
    init_params = None
    if config.train.init_from:  # read on every start: a failed restore falls back to these weights
      init_params = distributed.everywhere("init-from", lambda: interop.read_params(
          config.train.init_from, run.model))
    self.sharded = build_sharded(config, run.model, run.mesh, init_params)
    self.vote = distributed.StopVote(self.sharded.mesh)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(self.sharded.state))
    distributed.on_primary("free-space", lambda: wd.require_free(state_bytes, "one checkpoint"))
    self.tvr = None if run.tvr is None else jax.jit(
        lambda p: self.sharded.steps.tvr(p, run.tvr), in_shardings=(self.sharded.state_shardings["params"],),
        out_shardings=(self.sharded.state_shardings["params"], None))
    self.ckpts = Checkpoints(wd.path, config.ckpt.keep)
    cleanup.callback(self.ckpts.close)
    restored = self.ckpts.restore(_abstract(self.sharded), config, allow_config_change)
    self.start = restored.step if restored else 0
    self.state = restored.state if restored else self.sharded.state
    self.config_json = json.loads(config.to_json_best_effort())
    self.writer = distributed.everywhere("writer", lambda: Writer(wd.path, self.start, self.primary))
    cleanup.callback(self.writer.close)
    distributed.on_primary("announce", lambda: self._announce(info, restored))
    self.train_feed = data.Prefetched(self.train_data, self.sharded.rows.rows)
    cleanup.callback(self.train_feed.close)
    self.bar = tqdm.tqdm(total=self.total, initial=self.start, desc="train", dynamic_ncols=True,
                         disable=not self.primary)
    cleanup.callback(self.bar.close)
    self.last = {"time": time.perf_counter(), "step": self.start, "loss": math.nan, "eval": {}}

  def _announce(self, info: dict[str, Any], restored: Restored | None) -> None:
    """config.json, the start-up files and lines, what the restore found (process 0)."""
    self.writer.write_config(self.config)
    interop.native.write_model_json(self.wd.path, self.run.model)  # the workdir is a source too
    if self.config.train.init_from:
      _, ignored = config_lib.from_source(self.config)
      print(f"weights and architecture from {self.config.train.init_from}" + "".join(
          f"; {k}={ours!r} ignored (source: {theirs!r})" for k, (ours, theirs) in ignored.items()))
    _describe(self.wd.path, self.run, info, self.sharded, self.start)
    self._report_restore(restored)

  def _report_restore(self, restored: Restored | None) -> None:
    if self.ckpts.removed_unfinished:
      print(f"removed the unfinished save(s) of a killed run: {self.ckpts.removed_unfinished}")
    if restored is None:
      return
    for step, why in restored.skipped.items():
      print(f"skipped checkpoint {step}: {why} (moved to {self.ckpts.skipped_directory / str(step)})")
    if restored.changes:
      self.writer.config_change(restored.step, restored.changes)
      print("resuming with a changed config (allowed; recorded in config_changes.jsonl): " +
            ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in restored.changes.items()))

  def loop(self) -> dict[str, Any]:
    config, compiled = self.config, self.sharded.compiled
    if self.start and due(self.start, config.train.eval_every, last=self.total):
      self._evaluate(self.start, reuse_row=True)  # a kill may have lost it; a finished run reports it
    self.wd.started, self.stop.training = True, True
    pending = None
    # Traced under the mesh: fused norm kernels (not partitionable) run in shard_map over batch axes.
    with jax.set_mesh(self.sharded.mesh):
      for index in range(self.start, self.total):
        step = index + 1
        collect = due(step, config.stats.every, first=True) if config.stats.every else False
        batch = self.sharded.rows.put(self.train_feed.get(index))  # read while earlier steps run
        self.state, metrics = compiled.train_step(collect)(self.state, batch)
        if pending is not None:  # read the previous step while this one runs
          self._process(*pending)
        pending = (step, metrics)
        self.bar.update(1)
        self.ckpts.poll()
        if self.tvr is not None and due(step, self.run.tvr.every):
          params, report = self.tvr(self.state["params"])
          self.state = {**self.state, "params": params}
          self.writer.metrics(step, {"rescaled": sum(int(np.sum(r)) for r in report["rescaled"].values())},
                              prefix="tvr")
        signum = self.vote(self.stop.requested)  # the same on every process
        save_now = bool(signum) or due(step, config.ckpt.every, last=self.total)
        eval_now = due(step, config.train.eval_every, last=self.total)
        if save_now or eval_now:
          self._process(*pending)  # a checkpoint or evaluation only follows a step whose loss was checked
          pending = None
          if eval_now:  # the row first: a checkpoint never exists without its evaluation row
            self._evaluate(step)
          if save_now:
            self.ckpts.save(step, self.state, self.config_json)
        if signum:
          self._stop_after(step, signum)
      if pending is not None:
        self._process(*pending)
    self.ckpts.finish()
    return self._done()

  def _process(self, step: int, metrics: dict[str, Any]) -> None:
    """Writes step ``step``'s metrics and statistics; stops the run if anything was not finite."""
    host = jax.device_get(metrics)
    depth_stats = host.pop("stats", None)
    params_finite = bool(host.pop("params_finite"))
    if depth_stats is not None:
      self.writer.stats(step, depth_stats)
    loss, grad_norm = float(host["loss"]), float(host["grad_norm"])
    bad = [f"loss {loss}"] if not math.isfinite(loss) else []
    bad += [f"gradient norm {grad_norm}"] if not math.isfinite(grad_norm) else []
    bad += [] if params_finite else ["updated parameters"]
    if bad:
      self.writer.metrics(step, host)
      self._stop_non_finite(step, bad)
    self.ckpts.checked(step)
    self.last["loss"] = loss
    self.bar.set_postfix(loss=f"{loss:.4f}")
    if due(step, self.config.train.log_every, last=self.total):
      now = time.perf_counter()
      host[self.throughput_key] = self.items_per_step * (step - self.last["step"]) / (now - self.last["time"])
      self.last["time"], self.last["step"] = now, step
      self.writer.metrics(step, host)

  def _stop_non_finite(self, step: int, bad: list[str]) -> None:
    removed = self.ckpts.discard(step)
    good = self.ckpts.latest()
    note = f"removed checkpoint {removed} (its next step is this one); " if removed else ""
    raise distributed.raised_everywhere(NonFiniteLoss(
        f"non-finite {', '.join(bad)} at step {step}; {note}last good checkpoint: "
        f"{f'step {good} in {self.ckpts.directory}' if good else 'none'}; last statistics: "
        f"step {self.writer.last_stats_step} in {self.writer.stats_path}"))

  def _stop_after(self, step: int, signum: int) -> None:
    """A stop was requested: the checkpoint of ``step`` was saved (``loop``); wait for it, raise."""
    self.ckpts.finish()
    message = f"{signals.name(signum)}: checkpoint saved at step {step} in {self.ckpts.directory}; exiting"
    if self.primary:
      self.bar.write(message)
    raise distributed.raised_everywhere(signals.Interrupted(signum, message))

  def _evaluate(self, step: int, reuse_row: bool = False) -> None:
    row = self.writer.row(step, "eval") if reuse_row else None
    if row is None:
      row = evaluate(self.sharded.compiled.eval, self.state, self.val_data, self.config.train.eval_steps,
                     self.sharded.rows)
      self.writer.metrics(step, row, prefix="eval")
    self.last["eval"] = row

  def _done(self) -> dict[str, Any]:
    last = self.last
    parts = [f"train loss {last['loss']:.4f}" if math.isfinite(last["loss"]) else "no new steps"]
    parts += [f"eval {k} {v:.4f}" for k, v in last["eval"].items()]
    self.bar.close()
    if self.primary:
      print(f"done: step {self.total}/{self.total}, {', '.join(parts)}; workdir: {self.wd.path}")
    return {"train_loss": last["loss"], **{f"eval_{k}": v for k, v in last["eval"].items()}}


def _abstract(sharded: Sharded) -> Any:
  """The train state as shapes, dtypes and shardings: what a checkpoint restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      sharded.state, sharded.state_shardings)


def evaluate(eval_step: Any, state: dict[str, Any], val_data: Any, num_batches: int,
             rows: mesh_lib.BatchRows) -> dict[str, float]:
  """Mean of the eval metrics over the first ``num_batches`` validation batches (fixed order),
  each process reading its ``rows``."""
  results = [jax.device_get(eval_step(state, rows.put(val_data.batch(i, rows.rows))))
             for i in range(num_batches)]
  return {key: float(np.mean([r[key] for r in results])) for key in results[0]} if results else {}


def _describe(workdir: pathlib.Path, run: config_lib.Validated, info: dict[str, Any],
              sharded: Sharded, start: int) -> None:
  """Startup log: data, model, mesh, the weight-decay and trainable masks, the parameter partition
  specs, and the count of trainable parameters (``trainable.json``)."""
  flat_decay = {"/".join(map(str, k)): bool(v) for k, v in _flatten(sharded.decay)}
  sizes = {"/".join(map(str, k)): int(np.prod(v.shape)) for k, v in _flatten(sharded.state["params"])}
  flat_train = {"/".join(map(str, k)): bool(v) for k, v in _flatten(sharded.trainable)}
  trained = sum(n for k, n in sizes.items() if flat_train[k])
  (workdir / "trainable.json").write_text(json.dumps({
      "trainable": run.trainable, "parameters": trained, "total": sum(sizes.values()),
      "tensors": flat_train}, indent=1) + "\n")
  flat_specs = {"/".join(map(str, k)): str(v) for k, v in _flatten(
      sharded.specs["params"], is_leaf=lambda x: isinstance(x, PartitionSpec))}
  (workdir / "weight_decay_mask.json").write_text(json.dumps(flat_decay, indent=1) + "\n")
  (workdir / "partition_specs.json").write_text(json.dumps(flat_specs, indent=1) + "\n")
  excluded = sorted(k for k, v in flat_decay.items() if not v)
  print(f"data: {info['source']} ({info['num_examples']})")
  m = run.model
  print(f"model: {m.name} L={m.num_layers} d={m.d_model} norm={m.norm.kind} "
        f"placement={m.placement.kind} init={m.init.scheme} dtype={m.dtype}")
  print(f"mesh: {run.mesh}; weight decay on {len(flat_decay) - len(excluded)} tensors, not on "
        f"{len(excluded)} (norm parameters and biases; see weight_decay_mask.json)")
  print(f"trainable ({run.trainable}): {trained:,} of {sum(sizes.values()):,} parameters in "
        f"{sum(flat_train.values())} of {len(flat_train)} tensors (see trainable.json)")
  if start:
    print(f"resuming from step {start}")


def _flatten(tree: Any, is_leaf: Any = None) -> list[tuple[tuple[str, ...], Any]]:
  return [(path_names(p), v) for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]
