"""What a parameter is, decided by its NNX Variable type, never by its path.

The models create every dense matrix as a ``Kernel`` and every dense bias as a ``Bias``; the norm
wrappers create ``NormParam`` (gains, biases, EvoNorm's v; ``Scalar`` for DyT's alpha and
sigma-Reparam's gamma) and
``NormState`` (running statistics). Token/position embeddings and the class token stay plain
``nnx.Param``. The weight-decay mask, TVR and the per-layer statistics select by these types, and a
parameter of a stacked block carries the logical axis ``layers`` first in its ``out_sharding``
metadata (``per_layer``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx


class Kernel(nnx.Param):
  """A dense layer's matrix ``[..., in, out]`` (Flax layout)."""


class Bias(nnx.Param):
  """A dense layer's bias ``[..., out]``."""


class NormParam(nnx.Param):
  """A trainable parameter of a norm: gain, bias, DyT's alpha, EvoNorm's v, sigma-Reparam's gamma."""


class Scalar(NormParam):
  """A learned scalar gain: DyT's alpha, sigma-Reparam's gamma (the norm wrappers make every 0-d
  norm parameter one) and the DyT recipe's embedding scale. Never weight-decayed: decay pulls a
  gain toward 0, and DyT's recipe excludes its alpha."""


class NormState(nnx.Variable):
  """Non-trainable norm state: running statistics, sigma-Reparam's u, PowerNorm's nu."""


def per_layer(var: nnx.Variable) -> bool:
  """True for a parameter of the stacked blocks: its leading axis indexes the layer."""
  axes = var.get_metadata().get("out_sharding") or ()
  return bool(axes) and axes[0] == "layers"


def is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def map_variables(fn: Callable[[tuple[Any, ...], nnx.Variable], Any], state: nnx.State) -> Any:
  """``fn(path, variable)`` for every variable of ``state``, in a tree of the same structure."""
  return jax.tree_util.tree_map_with_path(fn, state, is_leaf=is_variable)


def variables(state: nnx.State) -> list[tuple[tuple[Any, ...], nnx.Variable]]:
  """(path, variable) pairs of ``state`` in flattening order."""
  return jax.tree_util.tree_flatten_with_path(state, is_leaf=is_variable)[0]
