"""The pure train and eval steps over a plain-dict train state.

The train state is ``{"step", "params", "norm_state", "opt_state"}`` with params and norm state as
plain nested dicts (what orbax saves and what the sharding rules place); ``Codec`` turns them back
into the model's ``nnx.State`` (with its Variable types, which say what each parameter is) inside
the step. ``train_step`` is compiled twice: without and with per-depth statistics (the static
``collect_stats``), so ordinary steps pay nothing for them (``Compiled``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from normjax import norms, stats, variance
from normjax.data.batches import packing
from normjax.treeutil import path_names

Array = jax.Array


class Codec:
  """Plain dict <-> nnx.State for one fixed state layout (same leaves, same order)."""

  def __init__(self, template: nnx.State):
    self.state_def = jax.tree.structure(template)
    pure = nnx.to_pure_dict(template)
    self.pure_def = jax.tree.structure(pure)
    state_paths = [path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
    pure_paths = [path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]]
    if state_paths != pure_paths:
      raise RuntimeError("nnx.State and its pure dict flatten in different orders")

  def to_pure(self, state: nnx.State) -> dict[str, Any]:
    return jax.tree.unflatten(self.pure_def, jax.tree.leaves(state))

  def from_pure(self, pure: dict[str, Any]) -> nnx.State:
    return jax.tree.unflatten(self.state_def, jax.tree.leaves(pure))


def task_loss(logits: Array, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
  """Next-token cross-entropy (``targets``; averaged over the tokens ``loss_mask`` keeps, when the
  batch has one) or classification cross-entropy and accuracy (``labels``)."""
  if "targets" in batch:
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    if "loss_mask" not in batch:
      return per_token.mean(), {}
    mask = batch["loss_mask"].astype(jnp.float32)
    # one reduction of both sums: over a sharded batch that is one all-reduce. Two independent ones
    # may run in different orders on different CPU devices, which deadlocks XLA's CPU collectives.
    total, count = jnp.sum(jnp.stack([per_token * mask, mask]).reshape(2, -1), axis=1)
    return total / jnp.maximum(count, 1.0), {}
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
  return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["labels"])}


class Steps:
  """Builds the step functions for one model layout and optimizer."""

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, lr_schedule: optax.Schedule):
    self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    self.params_codec, self.rest_codec = Codec(params), Codec(rest)
    self.tx, self.lr_schedule = tx, lr_schedule

  def init_state(self, model: nnx.Module) -> dict[str, Any]:
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params = self.params_codec.to_pure(params)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "norm_state": self.rest_codec.to_pure(rest), "opt_state": self.tx.init(params)}

  def model(self, params: dict[str, Any], norm_state: dict[str, Any]) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params_codec.from_pure(params),
                     self.rest_codec.from_pure(norm_state))

  def train_step(self, state: dict[str, Any], batch: dict[str, Array], *, collect_stats: bool
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    def loss_fn(params, norm_state):
      model = self.model(params, norm_state)
      logits, depth_stats = model(batch["inputs"], train=True, collect_stats=collect_stats,
                                  **packing(batch))
      loss, extra = task_loss(logits, batch)
      new_rest = self.rest_codec.to_pure(nnx.state(model, nnx.Not(nnx.Param)))
      return loss, (new_rest, depth_stats, extra)

    (loss, (new_rest, depth_stats, extra)), (grads, rest_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state["params"], state["norm_state"])
    # PowerNorm's and UN's backward passes advance part of their state through its cotangent
    new_rest = norms.update_backward_state(new_rest, rest_grads)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # the loop stops on a non-finite loss, gradient norm or updated parameter (the state a
    # checkpoint of this step would hold), so every leaf is checked here, on device
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "params_finite": params_finite,
               "lr": self.lr_schedule(state["step"]), **extra}
    if collect_stats:
      metrics["stats"] = depth_statistics(depth_stats, self.params_codec.from_pure(grads),
                                          self.params_codec.from_pure(state["params"]))
    new_state = {"step": state["step"] + 1, "params": params, "norm_state": new_rest,
                 "opt_state": opt_state}
    return new_state, metrics

  def tvr(self, params: dict[str, Any], config: variance.TVRConfig) -> tuple[dict[str, Any], Any]:
    """``variance.tvr_rescale`` of the plain-dict params (typed on the way in, plain on the way out)."""
    new, report = variance.tvr_rescale(self.params_codec.from_pure(params), config)
    return self.params_codec.to_pure(new), report

  def eval_step(self, state: dict[str, Any], batch: dict[str, Array]) -> dict[str, Array]:
    logits, _ = self.model(state["params"], state["norm_state"])(batch["inputs"], **packing(batch))
    loss, extra = task_loss(logits, batch)
    return {"loss": loss, **extra}


def depth_statistics(depth_stats: dict[str, Array], grads: nnx.State, params: nnx.State
                     ) -> dict[str, Array]:
  """The forward's per-layer statistics plus per-layer gradient norms, weight std and the angular
  distance matrix (``docs/statistics.md``)."""
  out = {key: value for key, value in depth_stats.items() if key != "hidden"}
  out["grad_norm"] = stats.layer_grad_norms(grads)
  for path, value in stats.layer_weight_std(params).items():
    out["w_std/" + "/".join(path.split("/")[-3:-1])] = value
  out["angular_distance"] = stats.angular_distance(depth_stats["hidden"])
  return out


class Compiled(NamedTuple):
  """The jitted steps: plain train step, train step with statistics, eval step."""
  train: Callable[..., Any]
  train_with_stats: Callable[..., Any]
  eval: Callable[..., Any]

  def train_step(self, collect_stats: bool) -> Callable[..., Any]:
    return self.train_with_stats if collect_stats else self.train


def jit_steps(steps: Steps, state_shardings: Any, batch_sharding: NamedSharding) -> Compiled:
  """The two compiled train steps (plain / with statistics) and the eval step. Metrics come out
  replicated, so every process reads them whole (on several processes, every one takes the same
  decisions from them)."""
  replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())

  def train(collect):
    return jax.jit(functools.partial(steps.train_step, collect_stats=collect),
                   in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
  return Compiled(train(False), train(True), jax.jit(
      steps.eval_step, in_shardings=(state_shardings, batch_sharding), out_shardings=replicated))
