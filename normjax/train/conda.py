"""Conda, column-normalized Adam (Wang et al., arXiv:2509.24218): Adam's second moment taken in the
singular basis of the momentum, so the update is better conditioned (as Muon's) yet adapts per
coordinate (as Adam's).

For a block matrix ``W`` ``[a, b]`` with momentum ``m`` and gradient ``g``::

    m = b1 m + (1 - b1) g
    every T steps: P = the singular vectors of m on its shorter side (U [a, a] if a <= b, else V [b, b])
    m' = P^T m,  g' = P^T g           (right side: m P, g P)
    v = b2 v + (1 - b2) g'^2          (in the projected coordinates, kept across basis refreshes)
    W <- W - lr sqrt(1 - b2^t) / (1 - b1^t) * scale * P (m' / (sqrt(v) + eps))
    W <- W (1 - lr * weight_decay)

as the paper describes it and the authors' code (``conda_torch``) runs it: the basis is refreshed
from the updated momentum at steps 0, T, 2T, ..., ``scale`` (0.25 in the paper's runs) multiplies
the projected-back update, and the weight decay is applied after the step. Conda is used for the
attention and MLP matrices, as the paper's training scripts select them; everything else
(embeddings, head, biases, norm parameters) takes the same Adam without projection or ``scale``,
like the code's other group. In normjax those matrices are the ``Kernel`` parameters of the stacked blocks
(``targets``); each of the L stacked layers has its own basis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from normjax.params import Kernel, map_variables, per_layer
from normjax.validation import ConfigError


@dataclasses.dataclass(frozen=True)
class CondaOptions:
  """``optim.conda``: the paper's LLaMA runs (update_proj_gap 2000, scale 0.25)."""
  update_proj_gap: int = 2000  # T: steps between refreshes of the singular basis
  scale: float = 0.25  # factor on the projected-back update

  def __post_init__(self):
    if not (isinstance(self.update_proj_gap, int) and self.update_proj_gap >= 1):
      raise ConfigError(f"optim.conda.update_proj_gap={self.update_proj_gap!r} must be an integer >= 1")
    if not (math.isfinite(self.scale) and self.scale > 0):
      raise ConfigError(f"optim.conda.scale={self.scale!r} must be finite and > 0")


class CondaState(NamedTuple):
  count: jax.Array  # [] int32: steps taken
  mu: optax.Updates  # first moment, in the parameters' own coordinates
  nu: optax.Updates  # second moment, in the projected coordinates of a target
  # the targets' singular vectors [*layers, k, k], in flattening order: a tuple, not a params-like
  # tree, so that sharding rules for the params never apply to it (it is replicated)
  basis: tuple[jax.Array, ...]


@dataclasses.dataclass(frozen=True)
class Target:
  """How Conda treats one parameter: projected with a basis of ``basis`` shape ``[*layers, k, k]``
  and dtype, or (``basis=None``) plain Adam."""
  basis: tuple[int, ...] | None = None
  dtype: Any = jnp.float32

  @classmethod
  def matrix(cls, shape: tuple[int, ...], dtype: Any) -> Target:
    """A projected ``[*layers, a, b]`` matrix: its basis is ``[*layers, min(a, b), min(a, b)]``."""
    return cls(tuple(shape[:-2]) + (min(shape[-2:]),) * 2, jnp.promote_types(dtype, jnp.float32))


def targets(params: nnx.State) -> Any:
  """A ``Target`` per parameter: the blocks' dense kernels ``[L, in, out]`` are projected, the rest
  takes Adam."""
  def target(_, var: nnx.Variable) -> Target:
    value = var.get_value()  # an array, or its ShapeDtypeStruct (``nnx.eval_shape``)
    if isinstance(var, Kernel) and per_layer(var) and len(value.shape) == 3:
      return Target.matrix(value.shape, value.dtype)
    return Target()
  return nnx.to_pure_dict(map_variables(target, params))


def _left(w: jax.Array) -> bool:
  return w.shape[-2] <= w.shape[-1]  # project on the shorter side


def _basis(m: jax.Array) -> jax.Array:
  """[*layers, k, k]: the singular vectors of ``m`` on its shorter side, in float32 or wider (the
  code's rule for bfloat16 parameters; ``Target.matrix``'s dtype)."""
  u, _, vh = jnp.linalg.svd(m.astype(jnp.promote_types(m.dtype, jnp.float32)), full_matrices=False)
  return u if _left(m) else vh


def _project(p: jax.Array, x: jax.Array, left: bool) -> jax.Array:
  return jnp.swapaxes(p, -1, -2) @ x if left else x @ jnp.swapaxes(p, -1, -2)


def _back(p: jax.Array, y: jax.Array, left: bool) -> jax.Array:
  return p @ y if left else y @ p


def conda(learning_rate: optax.ScalarOrSchedule, *, targets: Any, b1: float = 0.9, b2: float = 0.99,
          eps: float = 1e-8, weight_decay: float = 0.0, weight_decay_mask: Any = None,
          update_proj_gap: int = 2000, scale: float = 0.25) -> optax.GradientTransformation:
  """Conda as an optax transformation of plain-dict params; ``targets``: ``targets(params)``;
  ``weight_decay_mask``: True where the decoupled weight decay applies (None: everywhere)."""
  def init(params: Any) -> CondaState:
    # the bases' shapes come from ``targets``: optax also calls init with placeholder params
    basis = tuple(jnp.zeros(t.basis, t.dtype) for t in jax.tree.leaves(targets) if t.basis)
    return CondaState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params),
                      jax.tree.map(jnp.zeros_like, params), basis)

  def update(grads: Any, state: CondaState, params: Any = None) -> tuple[Any, CondaState]:
    if params is None:
      raise ValueError("conda needs the params (its weight decay reads them)")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    t = (state.count + 1).astype(jax.dtypes.canonicalize_dtype(jnp.float64))
    step_size = lr * jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    refresh = state.count % update_proj_gap == 0
    leaves, treedef = jax.tree.flatten(params)
    mask = treedef.flatten_up_to(weight_decay_mask) if weight_decay_mask is not None else [True] * len(leaves)
    columns = zip(leaves, *(treedef.flatten_up_to(tree) for tree in (grads, state.mu, state.nu, targets)),
                  mask)
    bases = iter(state.basis)
    updates, mu, nu, basis = [], [], [], []
    for w, g, m, v, target, decays in columns:
      m = b1 * m + (1 - b1) * g
      target = target.basis is not None
      if target:
        left, previous = _left(w), next(bases)
        p = jax.lax.cond(refresh, lambda m=m: _basis(m), lambda p=previous: p)
        g, projected = (_project(p, x.astype(p.dtype), left) for x in (g, m))
        basis.append(p)
      else:
        projected = m
      v = b2 * v + (1 - b2) * g * g
      direction = projected / (jnp.sqrt(v) + eps)
      if target:
        direction = _back(p, direction, left).astype(w.dtype) * scale
      new = w - step_size * direction
      if decays and weight_decay:
        new = new - lr * weight_decay * new
      updates.append((new - w).astype(w.dtype))
      mu.append(m)
      nu.append(v)
    rebuild = treedef.unflatten
    return rebuild(updates), CondaState(state.count + 1, rebuild(mu), rebuild(nu), tuple(basis))

  return optax.GradientTransformation(init, update)
