"""AdamW with warmup + cosine decay, gradient clipping and an explicit weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections as mlc
import optax

from normjax.treeutil import path_names


def schedule(config: mlc.ConfigDict) -> optax.Schedule:
  o = config.optim
  return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, max(config.train.steps, 1),
                                            o.lr * o.min_lr_ratio)


def decay_mask(params: Any, config: mlc.ConfigDict) -> Any:
  """True where weight decay applies: dense kernels and embeddings; norm parameters and biases only
  with ``optim.decay_norms_and_biases`` (the anchors disagree, so it is a field and it is logged)."""
  def decayed(path, _):
    names = path_names(path)
    is_norm = any("norm" in name for name in names) or names[-1] in ("bias", "alpha", "gamma", "v")
    return config.optim.decay_norms_and_biases or not is_norm
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(params: Any, config: mlc.ConfigDict) -> tuple[optax.GradientTransformation, Any]:
  """Returns the optimizer and its weight-decay mask (same tree as ``params``)."""
  o = config.optim
  mask = decay_mask(params, config)
  chain = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm else []
  chain.append(optax.adamw(schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=mask))
  return optax.chain(*chain), mask
