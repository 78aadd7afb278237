"""Unified Normalization, UN (Yang et al., ACM MM 2022, arXiv:2208.01313).

An offline norm for transformers: like BatchNorm it divides by a per-channel statistic, so at
inference it is a fixed affine map that folds into the neighbouring linear layer; unlike BN the
training statistic is smoothed over a window of steps in the forward AND the backward pass.
Training step t, per channel c, statistics over every non-feature (non-pad) position:

  forward   x2_t = mean(x^2)                        (a quadratic mean, no mean subtraction)
            window W_x = the last ``window`` x2's;  s_t = geomean(W_x) once t > window and
            t >= warmup_steps, else s_t = x2_t
            z = x / sqrt(s_t + eps);  y = scale * z + bias
            running_var <- momentum * running_var + (1 - momentum) * s_t      (used in eval)
  backward  r = sqrt(s_t + eps) / sqrt(running_var + eps), clipped to [1/ratio_clip, ratio_clip]
            after max(hold_steps, warmup_steps) steps and 1 before;  g = r * scale * dy
            gz_t = mean(g * z);  m_t = mean of the last ``grad_window`` gz's (gz_t itself while
            t <= grad_window or t < warmup_steps);  ema_gz <- momentum * ema_gz + (1-momentum) m_t
            dx = (g - ema_gz * z) / sqrt(s_t + eps)
  outliers  (``outlier_filtration``, from warmup_steps on) when for any channel
            mean(W_x) - geomean(W_x) > window * var(sqrt(W_x before x2_t entered)), the step is
            skipped: s_t = x2_t, x2_t's slot holds running_var instead, r = 1, and the backward
            subtracts gz_t * z itself (its window slot holds the old ema_gz).

The paper names the parts (fluctuation smoothing of activation and gradient statistics,
adaptive outlier filtration) but not every constant; the equations above are the authors'
``UN2dFunction`` (hikvision-research/Unified-Normalization), whose constants ``ratio_clip=5``
and ``hold_steps=1000`` are options here, with two choices the paper leaves implicit: the
scale's gradient is ``sum(dy * r * z)`` (the compensated output, not the forward's z), and the
outlier threshold's variance is one unbiased variance over every entry of the window. Pads
(``mask``) are left out of x2 and gz. The backward updates ``ema_gz`` and ``buffer_gz``: their
cotangents carry the increments, which ``norms.update_backward_state`` adds after the step (as
for PowerNorm's ``nu``). ``window=1`` turns the smoothing off (every step counts as skipped).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from normjax.norms._util import Array, affine, affine_operands, expand_param, masked_mean, stat_dtype
from normjax.norms.batch import _feature_mask


def unified_norm_init_state(features: int, window: int = 4, grad_window: int = 4,
                            dtype: Any = jnp.float32) -> dict[str, Array]:
  """The code's buffers: running_var 1, ema_gz 0, windows of zeros; step and skipped count."""
  return {"running_var": jnp.ones((features,), dtype), "ema_gz": jnp.zeros((features,), dtype),
          "buffer_x2": jnp.zeros((window, features), dtype),
          "buffer_gz": jnp.zeros((grad_window, features), dtype),
          "step": jnp.zeros((), jnp.float32), "skipped": jnp.zeros((), jnp.float32)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(11,))
def _un_train(xf, scale, bias, ema_gz, buffer_gz, inv_std, r, slot, use_window, skip, mask, momentum):
  del ema_gz, buffer_gz, r, slot, use_window, skip, mask, momentum
  return scale * (xf * inv_std) + bias


def _un_train_fwd(xf, scale, bias, ema_gz, buffer_gz, inv_std, r, slot, use_window, skip, mask,
                  momentum):
  del momentum
  z = xf * inv_std
  return scale * z + bias, (z, scale, ema_gz, buffer_gz, inv_std, r, slot, use_window, skip, mask)


def _un_train_bwd(momentum, res, dy):
  z, scale, ema_gz, buffer_gz, inv_std, r, slot, use_window, skip, mask = res
  axes = tuple(range(z.ndim - 1))
  g = dy * scale * r
  gz = masked_mean(g * z, mask, axes).reshape(-1)
  new_buffer = buffer_gz.at[slot].set(jnp.where(skip, ema_gz.reshape(-1), gz))
  mean_gz = jnp.where(use_window, jnp.mean(new_buffer, 0), gz)
  new_ema = momentum * ema_gz.reshape(-1) + (1.0 - momentum) * mean_gz
  subtract = jnp.where(skip, mean_gz, new_ema)
  dx = (g - subtract * z) * inv_std
  zeros = jnp.zeros_like
  return (dx, jnp.sum(dy * r * z, axes, keepdims=True), jnp.sum(dy, axes, keepdims=True),
          (new_ema - ema_gz.reshape(-1)).reshape(ema_gz.shape), new_buffer - buffer_gz,
          zeros(inv_std), zeros(r), zeros(slot, dtype=jax.dtypes.float0),
          zeros(use_window, dtype=jax.dtypes.float0), zeros(skip, dtype=jax.dtypes.float0),
          None if mask is None else zeros(mask, dtype=jax.dtypes.float0))


_un_train.defvjp(_un_train_fwd, _un_train_bwd)


def _forward_statistic(x2: Array, state: dict[str, Array], step: Array, warmup_steps: int,
                       outlier_filtration: bool) -> tuple[Array, Array, Array]:
  """(s_t, the new x2 window, skip) for one training step; ``x2`` is ``[C]``."""
  window = state["buffer_x2"].shape[0]
  recorded_var = jnp.var(jnp.sqrt(state["buffer_x2"]), ddof=1)
  slot = (step % window).astype(jnp.int32)
  buffer = state["buffer_x2"].at[slot].set(x2)
  skip = jnp.asarray(window <= 1)
  if outlier_filtration:
    gap = jnp.mean(buffer, 0) - jnp.exp(jnp.mean(jnp.log(buffer), 0))
    outlier = (step >= warmup_steps) & jnp.any(gap > recorded_var * window)
    buffer = jnp.where(outlier, buffer.at[slot].set(state["running_var"].astype(x2.dtype)), buffer)
    skip = skip | outlier
  smooth = ~((step <= window) | (step < warmup_steps) | skip)
  s = jnp.where(smooth, jnp.exp(jnp.mean(jnp.log(buffer), 0)), x2)
  return s, buffer, skip


def unified_norm(x: Array, scale: Array | None, bias: Array | None, state: dict[str, Array], *,
                 train: bool, warmup_steps: int = 4000, outlier_filtration: bool = False,
                 hold_steps: int = 1000, ratio_clip: float = 5.0, momentum: float = 0.9,
                 eps: float = 1e-5, mask: Array | None = None
                 ) -> tuple[Array, dict[str, Array]]:
  """UN over the last (feature) axis; the module docstring has the exact math.

  Args:
    x: ``[..., C]``; statistics over every leading axis (all tokens of the batch).
    scale, bias: ``[C]`` or None. state: ``unified_norm_init_state(C, window, grad_window)``;
      the window lengths are the state's buffer lengths.
    train: True runs the smoothed statistics and the compensated backward; False divides by
      ``sqrt(running_var + eps)`` (a fixed affine map) with plain autodiff.
    warmup_steps: steps of plain batch statistics first (the paper's default 4000).
    outlier_filtration: the adaptive skip of outlier steps (the authors turn it on for vision).
    hold_steps, ratio_clip: r is 1 for the first max(hold_steps, warmup_steps) steps, then
      clipped to [1/ratio_clip, ratio_clip] (the code's 1000 and 5).
    mask: optional boolean ``x.shape[:-1]``; False marks padding left out of the statistics.
  Returns:
    ``(y, new_state)``: y in x's dtype; the state's forward parts advanced (``ema_gz`` and
    ``buffer_gz`` advance through the backward pass, see ``norms.update_backward_state``).
  """
  ax = x.ndim - 1
  xf = x.astype(stat_dtype(x.dtype))
  if not train:
    var = expand_param(state["running_var"], x.shape, (ax,), "running_var").astype(xf.dtype)
    return affine(xf * lax.rsqrt(var + eps), x, (ax,), scale, bias), state
  m = _feature_mask(x, ax, mask)
  x2 = lax.stop_gradient(masked_mean(jnp.square(xf), m, tuple(range(ax)))).reshape(-1)
  step = state["step"] + 1
  s, buffer_x2, skip = _forward_statistic(x2, state, step, warmup_steps, outlier_filtration)
  running = state["running_var"].astype(xf.dtype)
  r = jnp.sqrt(s + eps) / jnp.sqrt(running + eps)
  held = (step <= max(hold_steps, warmup_steps)) | skip
  r = jnp.where(held, 1.0, jnp.clip(r, 1.0 / ratio_clip, ratio_clip))
  grad_window = state["buffer_gz"].shape[0]
  use_window = ~((step <= grad_window) | (step < warmup_steps) | skip)
  scale_f, bias_f = affine_operands(scale, bias, x.shape, ax, xf.dtype)
  ema = expand_param(state["ema_gz"].astype(xf.dtype), x.shape, (ax,), "ema_gz")
  y = _un_train(xf, scale_f, bias_f, ema, state["buffer_gz"].astype(xf.dtype),
                expand_param(lax.rsqrt(s + eps), x.shape, (ax,), "s"),
                expand_param(r, x.shape, (ax,), "r"), (step % grad_window).astype(jnp.int32),
                use_window, skip, m, momentum)
  dtype = state["running_var"].dtype
  new_state = {**state, "running_var": (momentum * running + (1.0 - momentum) * s).astype(dtype),
               "buffer_x2": buffer_x2.astype(dtype), "step": step,
               "skipped": state["skipped"] + skip.astype(jnp.float32)}
  return y.astype(x.dtype), new_state


__all__ = ["unified_norm", "unified_norm_init_state"]
