"""The optimizer: AdamW, AdamP or Conda (``optim.name``) with warmup + cosine decay, gradient clipping, an
explicit weight-decay mask, and a trainable mask (``train.trainable``) that freezes the rest."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import optax
from flax import nnx

from normjax.params import Bias, NormParam, Scalar, map_variables
from normjax.train import adamp, conda
from normjax.treeutil import path_names
from normjax.validation import ConfigError

OPTIMIZERS = ("adamw", "adamp", "conda")


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
  # added later: a config saved before has none of them and means AdamW
  name: str = "adamw"  # one of OPTIMIZERS
  adamp: adamp.AdamPOptions = adamp.AdamPOptions()  # read when name == "adamp"
  conda: conda.CondaOptions = conda.CondaOptions()  # read when name == "conda"

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ConfigError(f"optim.name={self.name!r} is not an optimizer; choose one of {list(OPTIMIZERS)}")
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
    values = {key: section[key] for key in fields if key in section}
    values["adamp"] = _record(adamp.AdamPOptions, "optim.adamp", section.get("adamp", {}))
    values["conda"] = _record(conda.CondaOptions, "optim.conda", section.get("conda", {}))
    return cls(**values)


def _record(cls: type, where: str, section: Mapping[str, Any]) -> Any:
  """``cls(**section)``; an unknown key is a ConfigError naming the valid ones."""
  fields = sorted(f.name for f in dataclasses.fields(cls))
  unknown = sorted(set(section.keys()) - set(fields))
  if unknown:
    raise ConfigError(f"{where}.{unknown[0]} is not a field; valid fields: {fields}")
  return cls(**section)


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


def trainable_mask(params: nnx.State, trainable: str) -> dict[str, Any]:
  """True for the parameters that train: ``all``; ``norms``: the norms' own parameters (every
  ``NormParam``: gains, biases, DyT's alpha; the BatchNorm-only and LayerNorm-tuning setups); else
  a regular expression searched in each parameter's path ``a/b/c``. A plain dict like the params;
  ConfigError when it selects nothing."""
  if trainable == "all":
    mask = map_variables(lambda *_: True, params)
  elif trainable == "norms":
    mask = map_variables(lambda _, var: isinstance(var, NormParam), params)
  else:
    try:
      pattern = re.compile(trainable)
    except re.error as error:
      raise ConfigError(f"train.trainable={trainable!r} is not all, norms or a regular expression: "
                        f"{error}") from None
    mask = map_variables(lambda path, _: bool(pattern.search("/".join(path_names(path)))), params)
  mask = nnx.to_pure_dict(mask)
  if not any(jax.tree.leaves(mask)):
    paths = ["/".join(path_names(path)) for path, _ in jax.tree_util.tree_flatten_with_path(mask)[0]]
    raise ConfigError(f"train.trainable={trainable!r} selects no parameter; choose all, norms or a "
                      f"regular expression over paths such as {paths[:4]}")
  return mask


def make_optimizer(params: nnx.State, optim: OptimConfig, steps: int, trainable: str = "all"
                   ) -> tuple[optax.GradientTransformation, dict[str, Any], dict[str, Any]]:
  """The optimizer of the plain-dict params of ``params``, its weight-decay mask and its trainable
  mask. Frozen parameters get a zero gradient before the clip (so they do not count in the global
  norm) and a zero update after the optimizer (so weight decay leaves them alone too)."""
  mask = decay_mask(params, optim.decay_norms_and_biases)
  train = trainable_mask(params, trainable)
  frozen = jax.tree.map(lambda t: not t, train)
  chain = [optax.masked(optax.set_to_zero(), frozen)] if trainable != "all" else []
  if optim.clip_norm:
    chain.append(optax.clip_by_global_norm(optim.clip_norm))
  lr = schedule(optim, steps)
  if optim.name == "adamp":
    chain.append(adamp.adamp(lr, views=adamp.views(params), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay, weight_decay_mask=mask,
                             **dataclasses.asdict(optim.adamp)))
  elif optim.name == "conda":
    chain.append(conda.conda(lr, targets=conda.targets(params), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay, weight_decay_mask=mask,
                             **dataclasses.asdict(optim.conda)))
  else:
    chain.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay, mask=mask))
  if trainable != "all":
    chain.append(optax.masked(optax.set_to_zero(), frozen))
  return optax.chain(*chain), mask, train
