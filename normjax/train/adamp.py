"""AdamP (Heo et al., ICLR 2021, arXiv:2006.08217): Adam without the radial part of its update on
scale-invariant weights.

A weight followed by a normalization (``N(W x)`` unchanged when W is scaled) has a gradient
orthogonal to W, yet Adam's momentum still grows ``||W||`` and so shrinks the effective step
size early in training. AdamP detects such weights by the cosine between gradient and weight and
removes the update's component along the weight there::

    m = b1 m + (1 - b1) g              v = b2 v + (1 - b2) g^2
    p = m / (sqrt(v / (1 - b2^t)) + eps)          (nesterov: (b1 m + (1 - b1) g) / ...)
    if max_c |cos(g_c, w_c)| < delta / sqrt(dim(w_c)):   p_c -= (w_c . p_c) w_c / ||w_c||^2
    w <- w (1 - lr lambda r) - lr / (1 - b1^t) p

tried first per output channel ``c`` and then on the whole weight, as the paper's Algorithm 2 and
its code do; ``r`` is ``wd_ratio`` (0.1) where the projection applied, else 1. Where no weight is
scale-invariant the update is AdamW's exactly. Parameters with one axis (biases, norm gains) are
never projected, like the paper's code.

Layout: normjax's dense kernels are ``[..., in, out]`` (Flax), so a channel is a slice along the
last axis (the code's ``view(size(0), -1)`` of a PyTorch ``[out, in]`` weight); embeddings and other
plain matrices use their first axis, like the code. A stacked block parameter ``[L, ...]`` is L
weights, each with its own test and ratio (``views``).
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
class AdamPOptions:
  """``optim.adamp``: the paper's defaults."""
  delta: float = 0.1  # a weight is scale-invariant when max |cos(g, w)| < delta / sqrt(dim)
  wd_ratio: float = 0.1  # weight-decay factor where the projection applied
  nesterov: bool = False  # Nesterov momentum in the update direction

  def __post_init__(self):
    if not (math.isfinite(self.delta) and self.delta > 0):
      raise ConfigError(f"optim.adamp.delta={self.delta!r} must be finite and > 0")
    if not (math.isfinite(self.wd_ratio) and 0 <= self.wd_ratio <= 1):
      raise ConfigError(f"optim.adamp.wd_ratio={self.wd_ratio!r} must be in [0, 1]")
    if not isinstance(self.nesterov, bool):
      raise ConfigError(f"optim.adamp.nesterov={self.nesterov!r} must be true or false")


@dataclasses.dataclass(frozen=True)
class View:
  """How AdamP reads one parameter: its first ``layers`` axes index stacked weights; ``channel``
  is the output-channel axis (None: never projected)."""
  layers: int
  channel: int | None


class AdamPState(NamedTuple):
  count: jax.Array  # [] int32: steps taken
  mu: optax.Updates
  nu: optax.Updates


def views(params: nnx.State) -> Any:
  """A ``View`` per parameter of ``params`` (a plain-dict tree like ``nnx.to_pure_dict``), by type:
  a ``Kernel``'s channel is its last axis, another matrix's its first; one axis: not projected."""
  def view(_, var: nnx.Variable) -> View:
    layers = int(per_layer(var))
    ndim = len(var.get_value().shape)  # an array, or its ShapeDtypeStruct (``nnx.eval_shape``)
    if ndim - layers < 2:
      return View(layers, None)
    return View(layers, ndim - 1 if isinstance(var, Kernel) else layers)
  return nnx.to_pure_dict(map_variables(view, params))


def _cosine(x: jax.Array, y: jax.Array, axes: tuple[int, ...], eps: float) -> jax.Array:
  """|cos(x, y)| over ``axes`` (kept), each norm clamped at ``eps`` as torch's cosine_similarity."""
  dot = jnp.sum(x * y, axes, keepdims=True)
  norms = [jnp.maximum(jnp.sqrt(jnp.sum(v * v, axes, keepdims=True)), eps) for v in (x, y)]
  return jnp.abs(dot) / (norms[0] * norms[1])


def _without_radial(w: jax.Array, update: jax.Array, axes: tuple[int, ...], eps: float) -> jax.Array:
  unit = w / (jnp.sqrt(jnp.sum(w * w, axes, keepdims=True)) + eps)
  return update - unit * jnp.sum(unit * update, axes, keepdims=True)


def project(w: jax.Array, grad: jax.Array, update: jax.Array, view: View, delta: float,
            wd_ratio: float, eps: float) -> tuple[jax.Array, jax.Array]:
  """(update without its radial part where ``w`` tests scale-invariant, weight-decay ratio) for
  one parameter ``w`` ``[*layers, ...]``; the ratio broadcasts against ``w``."""
  if view.channel is None:
    return update, jnp.ones(())
  own = tuple(range(view.layers, w.ndim))  # one stacked weight's axes
  per_channel = tuple(a for a in own if a != view.channel)
  layer_shape = w.shape[:view.layers] + (1,) * len(own)
  cos_channel = jnp.max(_cosine(grad, w, per_channel, eps), axis=view.channel, keepdims=True)
  cos_layer = _cosine(grad, w, own, eps)
  dim_channel = math.prod(w.shape[a] for a in per_channel)
  on_channel = cos_channel.reshape(layer_shape) < delta / math.sqrt(dim_channel)
  on_layer = ~on_channel & (cos_layer < delta / math.sqrt(math.prod(w.shape[a] for a in own)))
  update = jnp.where(on_channel, _without_radial(w, update, per_channel, eps),
                     jnp.where(on_layer, _without_radial(w, update, own, eps), update))
  return update, jnp.where(on_channel | on_layer, wd_ratio, 1.0)


def adamp(learning_rate: optax.ScalarOrSchedule, *, views: Any, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0, weight_decay_mask: Any = None,
          delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False
          ) -> optax.GradientTransformation:
  """AdamP as an optax transformation of plain-dict params. ``views``: ``views(params)``;
  ``weight_decay_mask``: True where decoupled weight decay applies (None: everywhere). The
  defaults are the paper's (delta 0.1, wd_ratio 0.1)."""
  def init(params: Any) -> AdamPState:
    zeros = jax.tree.map(jnp.zeros_like, params)
    return AdamPState(jnp.zeros((), jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

  def update(grads: Any, state: AdamPState, params: Any = None) -> tuple[Any, AdamPState]:
    if params is None:
      raise ValueError("adamp needs the params (its projection and weight decay read them)")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
    t = count.astype(jax.dtypes.canonicalize_dtype(jnp.float64))  # float64 under x64, else float32
    correction1, correction2 = 1 - b1 ** t, 1 - b2 ** t
    mask = weight_decay_mask if weight_decay_mask is not None else jax.tree.map(lambda _: True, params)

    def one(w, g, m, v, view, decays):
      denom = jnp.sqrt(v) / jnp.sqrt(correction2) + eps
      step = ((b1 * m + (1 - b1) * g) if nesterov else m) / denom
      step, ratio = project(w, g, step, view, delta, wd_ratio, eps)
      decay = lr * weight_decay * ratio * w if decays and weight_decay else 0.0
      return (-(lr / correction1) * step - decay).astype(w.dtype)

    updates = jax.tree.map(one, params, grads, mu, nu, views, mask,
                           is_leaf=lambda x: isinstance(x, View))
    return updates, AdamPState(count, mu, nu)

  return optax.GradientTransformation(init, update)
