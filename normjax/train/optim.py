"""AdamW with warmup + cosine decay, gradient clipping and an explicit weight-decay mask."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import optax
from flax import nnx

from normjax.params import Bias, NormParam, Scalar, map_variables
from normjax.validation import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The ``optim`` section, checked: every number finite and in its range (a NaN learning rate or
  a beta of 1.5 would otherwise compile and train into NaN or a broken schedule)."""
  lr: float
  warmup_steps: int
  min_lr_ratio: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  decay_norms_and_biases: bool
  clip_norm: float

  def __post_init__(self):
    _in_range("lr", self.lr, low=0.0, low_open=True)
    _in_range("warmup_steps", self.warmup_steps, low=0)
    _in_range("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
    _in_range("b1", self.b1, low=0.0, high=1.0, high_open=True)
    _in_range("b2", self.b2, low=0.0, high=1.0, high_open=True)
    _in_range("eps", self.eps, low=0.0, low_open=True)
    _in_range("weight_decay", self.weight_decay, low=0.0)
    _in_range("clip_norm", self.clip_norm, low=0.0)

  @classmethod
  def from_section(cls, section: Mapping[str, Any]) -> OptimConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section.keys()) - fields)
    if unknown:
      raise ConfigError(f"optim.{unknown[0]} is not an optimizer field; valid fields: {sorted(fields)}")
    return cls(**{key: section[key] for key in fields})


def _in_range(field: str, value: float, *, low: float, high: float = math.inf, low_open: bool = False,
              high_open: bool = False) -> None:
  if not math.isfinite(value) or value < low or (low_open and value == low) or value > high or (
      high_open and value == high):
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"
    raise ConfigError(f"optim.{field}={value!r} must be finite and in {interval}")


def schedule(optim: OptimConfig, steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
  # a warmup as long as the run leaves no decay: optax needs one decay step past the warmup
  return optax.warmup_cosine_decay_schedule(0.0, optim.lr, optim.warmup_steps,
                                            max(steps, optim.warmup_steps + 1),
                                            optim.lr * optim.min_lr_ratio)


def decay_mask(params: nnx.State, decay_norms_and_biases: bool) -> dict[str, Any]:
  """True where weight decay applies, by parameter type (``normjax.params``): dense kernels and
  embeddings always; norm parameters and biases only with ``decay_norms_and_biases`` (the anchors
  disagree, so it is a field and the mask is written to the workdir); ``Scalar`` gains never. A
  plain dict like the params."""
  mask = map_variables(lambda _, var: not isinstance(var, Scalar) and (
      decay_norms_and_biases or not isinstance(var, (NormParam, Bias))), params)
  return nnx.to_pure_dict(mask)


def make_optimizer(params: nnx.State, optim: OptimConfig, steps: int
                   ) -> tuple[optax.GradientTransformation, dict[str, Any]]:
  """The optimizer of the plain-dict params of ``params`` and its weight-decay mask."""
  mask = decay_mask(params, optim.decay_norms_and_biases)
  chain = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm else []
  chain.append(optax.adamw(schedule(optim, steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=mask))
  return optax.chain(*chain), mask
