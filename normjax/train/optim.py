"""AdamW with warmup + cosine decay, gradient clipping and an explicit weight-decay mask."""

from __future__ import annotations

from typing import Any

import ml_collections as mlc
import optax
from flax import nnx

from normjax.params import Bias, NormParam, map_variables


def schedule(config: mlc.ConfigDict) -> optax.Schedule:
  o = config.optim
  return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, max(config.train.steps, 1),
                                            o.lr * o.min_lr_ratio)


def decay_mask(params: nnx.State, decay_norms_and_biases: bool) -> dict[str, Any]:
  """True where weight decay applies, by parameter type (``normjax.params``): dense kernels and
  embeddings always; norm parameters and biases only with ``decay_norms_and_biases`` (the anchors
  disagree, so it is a field and the mask is written to the workdir). A plain dict like the params."""
  mask = map_variables(lambda _, var: decay_norms_and_biases or not isinstance(var, (NormParam, Bias)),
                       params)
  return nnx.to_pure_dict(mask)


def make_optimizer(params: nnx.State, config: mlc.ConfigDict
                   ) -> tuple[optax.GradientTransformation, dict[str, Any]]:
  """The optimizer of the plain-dict params of ``params`` and its weight-decay mask."""
  o = config.optim
  mask = decay_mask(params, o.decay_norms_and_biases)
  chain = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm else []
  chain.append(optax.adamw(schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=mask))
  return optax.chain(*chain), mask
