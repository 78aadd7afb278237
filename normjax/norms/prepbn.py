"""Progressive re-parameterized BatchNorm, PRepBN (Guo et al., SLAB, ICML 2024, arXiv:2405.11582).

RepBN adds a learnable multiple of the input to BatchNorm, ``RepBN(x) = BN(x) + eta * x``; PRepBN
trains with a blend that moves from LayerNorm to RepBN::

    lambda_t = 1                                  for t < warmup_steps (LayerNorm only)
    lambda_t = max(0, 1 - (t - warmup_steps) / decay_steps)   afterwards
    y = lambda_t * LN(x) + (1 - lambda_t) * RepBN(x)            (training)
    y = RepBN(x), with BN's running statistics                  (inference)

``t`` counts training calls (one per optimizer step in the loop), as the authors' ``LinearNorm``
counts its forward passes. BN's running statistics start updating when the warmup ends (before,
the code does not run the BN). At inference RepBN is a per-channel affine map ``a * x + c``, so it
folds into the linear layer that reads it (``repbn_merge``): the deployed model has no norm left.
Statistics are over every non-feature position (batch and sequence), so future tokens enter
them: normjax refuses PRepBN in a causal decoder, although the paper also reports a LLaMA run.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from normjax.norms._util import Array, stat_dtype
from normjax.norms.batch import batch_norm
from normjax.norms.standard import layer_norm, rms_norm

LN_KINDS = ("layer_norm", "rms_norm")


def prepbn_lambda(step: Array, warmup_steps: int, decay_steps: int, dtype: Any = jnp.float32) -> Array:
  """The LayerNorm weight lambda_t at training step ``step`` (a ``dtype`` scalar)."""
  t = jnp.asarray(step, dtype)
  decayed = 1.0 - (t - warmup_steps) / max(decay_steps, 1)
  return jnp.where(t < warmup_steps, 1.0, jnp.clip(decayed, 0.0, 1.0))


def repbn(x: Array, bn_scale: Array, bn_bias: Array, eta: Array, mean: Array, var: Array, *,
          train: bool, momentum: float = 0.9, eps: float = 1e-5, mask: Array | None = None
          ) -> tuple[Array, Array, Array]:
  """``BN(x) + eta * x`` over the last (feature) axis; returns ``(y, new_mean, new_var)``."""
  y, new_mean, new_var = batch_norm(x, bn_scale, bn_bias, mean, var, train=train, momentum=momentum,
                                    eps=eps, axis=-1, mask=mask)
  wide = stat_dtype(x.dtype)
  return (y.astype(wide) + eta * x.astype(wide)).astype(x.dtype), new_mean, new_var


def prepbn(x: Array, ln_scale: Array, ln_bias: Array | None, bn_scale: Array, bn_bias: Array,
           eta: Array, mean: Array, var: Array, step: Array, *, train: bool, warmup_steps: int = 0,
           decay_steps: int = 60_000, ln: str = "layer_norm", momentum: float = 0.9,
           eps: float = 1e-5, ln_eps: float = 1e-6, mask: Array | None = None
           ) -> tuple[Array, dict[str, Array]]:
  """PRepBN of ``x [..., C]``; returns ``(y, {"mean", "var", "step"})``. In eval ``y`` is
  ``RepBN(x)`` with the running statistics and the state is unchanged."""
  if not train:
    y, _, _ = repbn(x, bn_scale, bn_bias, eta, mean, var, train=False, eps=eps)
    return y, {"mean": mean, "var": var, "step": step}
  wide = stat_dtype(x.dtype)
  lam = prepbn_lambda(step, warmup_steps, decay_steps, wide)
  norm = layer_norm(x, ln_scale, ln_bias, eps=ln_eps) if ln == "layer_norm" else rms_norm(
      x, ln_scale, ln_bias, eps=ln_eps)
  rep, batch_mean, batch_var = repbn(x, bn_scale, bn_bias, eta, mean, var, train=True,
                                     momentum=momentum, eps=eps, mask=mask)
  started = step >= warmup_steps  # the code's BN does not run (nor update) during the warmup
  y = lam * norm.astype(wide) + (1.0 - lam) * rep.astype(wide)
  state = {"mean": jnp.where(started, batch_mean, mean), "var": jnp.where(started, batch_var, var),
           "step": step + 1}
  return y.astype(x.dtype), state


def repbn_merge(bn_scale: Array, bn_bias: Array, eta: Array, mean: Array, var: Array, kernel: Array,
                bias: Array | None, eps: float = 1e-5) -> tuple[Array, Array]:
  """The inference-time fold: ``(kernel', bias')`` with ``RepBN(x) @ kernel + bias ==
  x @ kernel' + bias'``. ``kernel`` ``[C, out]`` (Flax layout), ``bias`` ``[out]`` or None."""
  inv = lax.rsqrt(var.astype(stat_dtype(kernel.dtype)) + eps)
  a = bn_scale * inv + eta  # RepBN(x) = a * x + c, per channel
  c = bn_bias - bn_scale * mean * inv
  merged_bias = c @ kernel + (0.0 if bias is None else bias)
  return (a[:, None] * kernel).astype(kernel.dtype), merged_bias.astype(kernel.dtype)
