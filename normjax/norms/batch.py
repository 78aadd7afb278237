"""Norms with batch statistics and running state: BatchNorm, Batch-Channel Norm, EvoNorm-B0/S0.

Running statistics are explicit inputs and outputs (no hidden mutation). Convention for every
running average here: ``new = momentum * running + (1 - momentum) * batch`` with momentum 0.9,
which is torch's ``momentum=0.1`` and Flax's ``momentum=0.9``. Inputs are channels-last
``[batch, *spatial, C]`` (or ``[batch, seq, C]`` for tokens). Under jit with GSPMD a batch mean is
already global; ``axis_name`` is only for shard_map/pmap code.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from normjax.norms._util import Array, affine, canonical_axes, expand_param, masked_mean, stat_dtype
from normjax.norms.standard import group_moments


def _feature_mask(x: Array, ax: int, mask: Array | None) -> Array | None:
  """A ``mask`` of x's shape without the feature axis, expanded to broadcast against x."""
  if mask is None:
    return None
  expected = x.shape[:ax] + x.shape[ax + 1:]
  if tuple(mask.shape) != expected:
    raise ValueError(f"mask has shape {tuple(mask.shape)}; for an input of shape {x.shape} with "
                     f"features on axis {ax} it must have shape {expected}")
  return jnp.expand_dims(mask.astype(bool), ax)


def _running(running: Array, batch: Array, momentum: float, x: Array, ax: int, name: str) -> Array:
  running = expand_param(running, x.shape, (ax,), name)
  new = momentum * running.astype(batch.dtype) + (1.0 - momentum) * lax.stop_gradient(batch)
  return new.reshape(-1).astype(running.dtype)


def batch_norm(x: Array, scale: Array | None, bias: Array | None, mean: Array, var: Array, *,
               train: bool, momentum: float = 0.9, eps: float = 1e-5, axis: int = -1,
               mask: Array | None = None, axis_name: str | None = None
               ) -> tuple[Array, Array, Array]:
  """BatchNorm (Ioffe & Szegedy 2015) with running statistics as explicit state.

  Args:
    x: ``[..., C, ...]`` with features on ``axis``; statistics reduce every other axis.
    scale, bias: ``[C]`` or None. mean, var: running statistics ``[C]``.
    train: True uses batch statistics and returns updated running ones; False uses the running
      statistics and returns them unchanged.
    momentum: decay of the running average (0.9 == torch momentum 0.1).
    mask: optional boolean ``x.shape`` minus the feature axis; padded positions are left out of
      the statistics (they are still normalized).
    axis_name: a mapped axis to average statistics over (shard_map/pmap only).
  Returns:
    ``(y, new_mean, new_var)``; y has x's shape and dtype. The variance is biased (Flax); torch
    stores the unbiased one in its running_var.
  """
  (ax,) = canonical_axes(x.ndim, axis)
  xf = x.astype(stat_dtype(x.dtype))
  if train:
    reduce_axes = tuple(a for a in range(x.ndim) if a != ax)
    m = _feature_mask(x, ax, mask)
    mu = masked_mean(xf, m, reduce_axes, axis_name)
    sigma2 = masked_mean(jnp.square(xf - mu), m, reduce_axes, axis_name)
    new_mean = _running(mean, mu, momentum, x, ax, "mean")
    new_var = _running(var, sigma2, momentum, x, ax, "var")
  else:
    mu = expand_param(mean, x.shape, (ax,), "mean").astype(xf.dtype)
    sigma2 = expand_param(var, x.shape, (ax,), "var").astype(xf.dtype)
    new_mean, new_var = mean, var
  y = (xf - mu) * lax.rsqrt(sigma2 + eps)
  return affine(y, x, (ax,), scale, bias), new_mean, new_var


def batch_channel_norm(x: Array, bn_scale: Array | None, bn_bias: Array | None,
                       scale: Array | None, bias: Array | None, mean: Array, var: Array, *,
                       train: bool, num_groups: int = 32, momentum: float = 0.9, eps: float = 1e-5,
                       mask: Array | None = None) -> tuple[Array, Array, Array]:
  """Batch-Channel Normalization (Qiao et al., arXiv:1903.10520): BatchNorm, then a group norm.

  As in the authors' ``BCNorm``: a BatchNorm over channels (its own ``bn_scale``/``bn_bias`` [C] and
  running mean/var), then each sample's groups standardized over (spatial, channels in group), then
  a per-GROUP affine ``scale``/``bias`` of shape ``[num_groups]``. ``x: [batch, *spatial, C]``.
  Returns ``(y, new_mean, new_var)``.
  """
  h, new_mean, new_var = batch_norm(x, bn_scale, bn_bias, mean, var, train=train, momentum=momentum,
                                    eps=eps, mask=mask)
  hf = h.astype(stat_dtype(x.dtype))
  hg, mu, sigma2 = group_moments(hf, num_groups, (0,))
  yg = (hg - mu) * lax.rsqrt(sigma2 + eps)
  group_axis = hg.ndim - 2
  yg = affine(yg, yg, (group_axis,), scale, bias)
  return yg.reshape(x.shape).astype(x.dtype), new_mean, new_var


def evonorm_b0(x: Array, scale: Array | None, bias: Array | None, v: Array, running_var: Array, *,
               train: bool, momentum: float = 0.9, eps: float = 1e-5
               ) -> tuple[Array, Array]:
  """EvoNorm-B0 (Liu et al. 2020), following timm ``EvoNorm2dB0`` on channels-last input.

  ``y = x / max(sqrt(batch_var + eps), v * x + instance_std(x)) * scale + bias`` where batch_var is
  over (batch, spatial) per channel (running_var in eval) and instance_std is per sample and channel
  over spatial. As in timm the running variance stores the unbiased (n/(n-1)) batch variance.
  ``x: [batch, *spatial, C]`` with at least one spatial/sequence axis; v, scale, bias: ``[C]``.
  Returns ``(y, new_running_var)``.
  """
  if x.ndim < 3:
    raise ValueError(f"evonorm_b0 needs [batch, *spatial, C] with a spatial axis; got shape {x.shape}")
  ax = x.ndim - 1
  xf = x.astype(stat_dtype(x.dtype))
  if train:
    batch_var = jnp.var(xf, axis=tuple(range(ax)), keepdims=True)
    n = xf.size / xf.shape[ax]
    new_var = _running(running_var, batch_var * (n / (n - 1)), momentum, x, ax, "running_var")
  else:
    batch_var = expand_param(running_var, x.shape, (ax,), "running_var").astype(xf.dtype)
    new_var = running_var
  instance_std = jnp.sqrt(jnp.var(xf, axis=tuple(range(1, ax)), keepdims=True) + eps)
  vf = expand_param(v, x.shape, (ax,), "v").astype(xf.dtype)
  denom = jnp.maximum(jnp.sqrt(batch_var + eps), vf * xf + instance_std)
  return affine(xf / denom, x, (ax,), scale, bias), new_var


def evonorm_s0(x: Array, scale: Array | None, bias: Array | None, v: Array, *,
               num_groups: int = 32, eps: float = 1e-5, batch_axes: Sequence[int] = (0,)) -> Array:
  """EvoNorm-S0 (Liu et al. 2020), following timm ``EvoNorm2dS0``; no batch statistics.

  ``y = x * sigmoid(v * x) / group_std(x) * scale + bias``, group_std per sample and group over
  (spatial, channels in group) with eps inside the root. ``x: [batch, *spatial, C]``; v, scale,
  bias: ``[C]``.
  """
  ax = x.ndim - 1
  xf = x.astype(stat_dtype(x.dtype))
  _, _, var = group_moments(xf, num_groups, batch_axes)
  group_std = jnp.broadcast_to(jnp.sqrt(var + eps), (*xf.shape[:-1], num_groups, xf.shape[-1] // num_groups))
  vf = expand_param(v, x.shape, (ax,), "v").astype(xf.dtype)
  y = xf * jax.nn.sigmoid(vf * xf) / group_std.reshape(xf.shape)
  return affine(y, x, (ax,), scale, bias)


__all__ = ["batch_norm", "batch_channel_norm", "evonorm_b0", "evonorm_s0"]
