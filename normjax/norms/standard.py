"""Per-token and per-group norms: LayerNorm, RMSNorm, Compressed RMSNorm, L2, DyT, fixed, group.

All are pure functions of explicit parameters. Statistics are computed in float32 (float64 for
float64 inputs), eps sits inside the square root, and the result comes back in ``x.dtype`` (the
token norms under ``casting="hf"``: promoted with the parameters' dtypes, as transformers does).
Formulas, defaults and papers: ``docs/norms.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax import lax

from normjax.norms._util import Array, Axis, affine, canonical_axes, check_scalar, stat_dtype


def layer_norm(x: Array, scale: Array | None = None, bias: Array | None = None, *, axis: Axis = -1,
               eps: float = 1e-6, out_scale: Any = 1.0, scale_offset: float = 0.0,
               casting: str = "f32") -> Array:
  """LayerNorm: ``((x - mean) / sqrt(var + eps) * (scale + scale_offset) + bias) * out_scale``.

  Args:
    x: input, any shape ``[..., d]``; normalized over ``axis`` (an int or a tuple of ints).
    scale, bias: optional parameters of shape ``x.shape[axis]`` (the normalized axes, in order).
    eps: added to the variance inside the square root (Flax/Gemma default 1e-6).
    out_scale: LayerNorm Scaling factor 1/sqrt(layer index); a Python float or a traced 0-d array.
    scale_offset: Gemma-style ``1 + w`` parameterization (w zero-initialized), formed in float32.
    casting: "f32" (one cast at the end), "hf" (current transformers' LlamaRMSNorm order) or
      "hf_legacy" (the older LlamaRMSNorm that rounds to the gain's dtype); see ``_util.affine``.
  Returns:
    An array of x's shape and dtype (under "hf", x's dtype promoted with the parameters'). The
    variance is the two-pass E[(x - mean)^2], never clipped.
  """
  axes = canonical_axes(x.ndim, axis)
  xf = x.astype(stat_dtype(x.dtype))
  centered = xf - jnp.mean(xf, axes, keepdims=True)
  var = jnp.mean(jnp.square(centered), axes, keepdims=True)
  y = centered * lax.rsqrt(var + eps)
  return affine(y, x, axes, scale, bias, scale_offset=scale_offset, out_scale=out_scale, casting=casting)


def rms_norm(x: Array, scale: Array | None = None, bias: Array | None = None, *, axis: Axis = -1,
             eps: float = 1e-6, out_scale: Any = 1.0, scale_offset: float = 0.0,
             casting: str = "f32") -> Array:
  """RMSNorm: ``(x / sqrt(mean(x^2) + eps) * (scale + scale_offset) + bias) * out_scale``.

  Shapes and keyword arguments as in ``layer_norm``. ``x: [..., d] -> [..., d]``.
  """
  axes = canonical_axes(x.ndim, axis)
  xf = x.astype(stat_dtype(x.dtype))
  y = xf * lax.rsqrt(jnp.mean(jnp.square(xf), axes, keepdims=True) + eps)
  return affine(y, x, axes, scale, bias, scale_offset=scale_offset, out_scale=out_scale, casting=casting)


def crms_norm(xc: Array, scale: Array | None = None, bias: Array | None = None, *, axis: int = -1,
              eps: float = 1e-6, out_scale: Any = 1.0, scale_offset: float = 0.0,
              casting: str = "f32") -> Array:
  """Compressed RMSNorm (Jiang et al., NeurIPS 2023, arXiv:2305.14858) on the d-1 stored coordinates.

  A zero-mean d-vector x is stored as ``xc = x[:d-1]``; the dropped coordinate is ``-sum(xc)``. Then
  ``crms_norm(xc) = xc / sqrt((sum(xc^2) + sum(xc)^2) / d + eps)``, with d the ORIGINAL width, which
  equals ``rms_norm(decompress(xc))[:d-1]`` and ``layer_norm(decompress(xc))[:d-1]`` exactly.

  Args:
    xc: ``[..., d-1]`` compressed input; ``axis`` (one int) is the compressed feature axis.
    scale, bias: optional, shape ``[d-1]``. Other keyword arguments as in ``layer_norm``.
  Returns:
    ``[..., d-1]`` in xc's dtype.
  """
  (ax,) = canonical_axes(xc.ndim, axis)
  xf = xc.astype(stat_dtype(xc.dtype))
  d = xc.shape[ax] + 1
  total = jnp.sum(xf, ax, keepdims=True)
  mean_square = (jnp.sum(jnp.square(xf), ax, keepdims=True) + jnp.square(total)) / d
  y = xf * lax.rsqrt(mean_square + eps)
  return affine(y, xc, (ax,), scale, bias, scale_offset=scale_offset, out_scale=out_scale,
                casting=casting)


def compress(x: Array, *, axis: int = -1) -> Array:
  """Drops the last feature of a zero-mean vector: ``[..., d] -> [..., d-1]`` (centre x first)."""
  (ax,) = canonical_axes(x.ndim, axis)
  return lax.slice_in_dim(x, 0, x.shape[ax] - 1, axis=ax)


def decompress(xc: Array, *, axis: int = -1) -> Array:
  """Restores the dropped coordinate ``-sum(xc)``: ``[..., d-1] -> [..., d]`` (zero mean)."""
  (ax,) = canonical_axes(xc.ndim, axis)
  return jnp.concatenate([xc, -jnp.sum(xc, ax, keepdims=True)], axis=ax)


def l2_norm(x: Array, scale: Array | None = None, *, axis: Axis = -1, eps: float = 1e-6) -> Array:
  """nGPT-style unit-norm projection: ``x / sqrt(sum(x^2) + eps) * scale``. ``[..., d] -> [..., d]``.

  nGPT's ``justnorm`` divides by the bare norm; eps (inside the root) only guards an all-zero row.
  ``scale`` is optional (nGPT's per-feature s_qk / s_uv are applied after the projection).
  """
  axes = canonical_axes(x.ndim, axis)
  xf = x.astype(stat_dtype(x.dtype))
  y = xf * lax.rsqrt(jnp.sum(jnp.square(xf), axes, keepdims=True) + eps)
  return affine(y, x, axes, scale, None)


def dyt(x: Array, alpha: Any, scale: Array | None = None, bias: Array | None = None, *,
        axis: int = -1) -> Array:
  """Dynamic Tanh (arXiv:2503.10622): ``scale * tanh(alpha * x) + bias`` with a scalar learnable alpha.

  No statistics at all; alpha is a 0-d array (init 0.5 for vision; LLaMA: ``dyt_llm_options``).
  ``x: [..., d]``; scale and bias have shape ``[d]`` (the LLaMA variant drops the bias).
  """
  (ax,) = canonical_axes(x.ndim, axis)
  alpha = check_scalar(alpha, "alpha")
  xf = x.astype(stat_dtype(x.dtype))
  y = jnp.tanh(jnp.asarray(alpha, xf.dtype) * xf)
  return affine(y, x, (ax,), scale, bias)


# DyT's LLaMA alpha_0 (attention, other) by model width, arXiv:2503.10622 (its width x depth grid
# of the LLaMA study: depth hardly moves the optimum, width does; 5120 is LLaMA-13B)
DYT_LLM_ALPHAS = {1024: (1.0, 1.0), 2048: (1.0, 0.5), 4096: (0.8, 0.2), 5120: (0.6, 0.15),
                  8192: (0.2, 0.05)}


def dyt_llm_options(width: int) -> dict[str, Any]:
  """DyT's LLM recipe for a decoder of ``width``: the options of ``dyt`` (``alpha_attn``, and
  ``alpha_init`` for the MLP and ``alpha_final`` for the final norm, both the paper's "other"
  alpha_0) at the published width nearest on a log scale (below 1024: 1024's), without the bias.
  The recipe's learnable scalar after the embedding is ``ModelConfig.embed_scale``."""
  nearest = min(DYT_LLM_ALPHAS, key=lambda w: abs(math.log2(w) - math.log2(max(width, 1))))
  attn, other = DYT_LLM_ALPHAS[nearest]
  return dict(alpha_attn=attn, alpha_init=other, alpha_final=other, use_bias=False)


def fixed_norm(x: Array, std: Any, scale: Array | None = None, bias: Array | None = None, *,
               axis: Axis = -1, center: bool = True, scale_offset: float = 0.0,
               casting: str = "f32") -> Array:
  """LayerNorm with the per-token std replaced by a fixed per-layer value (arXiv:2409.13710).

  ``(x - mean(x)) / std * (scale + scale_offset) + bias`` (``center=False`` drops the mean, for
  RMSNorm models). The map is affine in x, the first step of the LayerNorm-removal recipe; estimate
  ``std`` once with ``fixed_norm_std`` on real activations. ``x: [..., d] -> [..., d]``; std is a
  scalar, or an array of x's rank with size 1 on the normalized axes (a value per position, e.g. the
  first position's own std). ``scale_offset`` and ``casting`` as in ``layer_norm``, so a LayerNorm's
  parameters and options carry over unchanged.
  """
  axes = canonical_axes(x.ndim, axis)
  if jnp.ndim(std) and (jnp.ndim(std) != x.ndim or any(jnp.shape(std)[a] != 1 for a in axes)):
    raise ValueError(f"std must be a scalar or have rank {x.ndim} with size 1 on the normalized "
                     f"axes {axes}, got shape {jnp.shape(std)}")
  xf = x.astype(stat_dtype(x.dtype))
  if center:
    xf = xf - jnp.mean(xf, axes, keepdims=True)
  return affine(xf / jnp.asarray(std, xf.dtype), x, axes, scale, bias, scale_offset=scale_offset,
                casting=casting)


def token_std(x: Array, *, axis: Axis = -1, eps: float = 1e-6, center: bool = True) -> Array:
  """Each token's ``sqrt(var + eps)`` (``center=False``: ``sqrt(mean(x^2) + eps)``), the divisor a
  LayerNorm (RMSNorm) applies; ``[..., d] -> [...]`` in the statistics dtype."""
  axes = canonical_axes(x.ndim, axis)
  xf = x.astype(stat_dtype(x.dtype))
  if center:
    xf = xf - jnp.mean(xf, axes, keepdims=True)
  return jnp.sqrt(jnp.mean(jnp.square(xf), axes) + eps)


def fixed_norm_std(x: Array, *, axis: Axis = -1, eps: float = 1e-6, center: bool = True) -> Array:
  """The fixed scale for ``fixed_norm``: the mean over tokens of the per-token sqrt(var + eps)."""
  return jnp.mean(token_std(x, axis=axis, eps=eps, center=center))


def identity(x: Array) -> Array:
  """No normalization. Pair with the ``none`` placement, dyt, sigma_reparam or fixed_norm."""
  return x


def group_axes(ndim: int, batch_axes: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Checks batch axes for a channels-last group statistic; returns (batch_axes, reduced axes).

  The input is viewed as ``[..., groups, channels_per_group]`` (rank ndim+1); statistics reduce every
  axis except the batch axes and the group axis.
  """
  batch = canonical_axes(ndim, batch_axes, field="batch_axes") if batch_axes else ()
  if ndim - 1 in batch:
    raise ValueError(f"batch_axes={tuple(batch_axes)!r} includes the channel axis {ndim - 1}; "
                     "group statistics need the channels last")
  reduced = tuple(a for a in range(ndim - 1) if a not in batch) + (ndim,)
  return batch, reduced


def grouped(xf: Array, num_groups: int) -> Array:
  """``[..., C] -> [..., G, C/G]`` with a clear error when G does not divide C."""
  channels = xf.shape[-1]
  if num_groups <= 0 or channels % num_groups:
    raise ValueError(f"num_groups={num_groups} must be positive and divide the {channels} channels")
  return xf.reshape(*xf.shape[:-1], num_groups, channels // num_groups)


def group_moments(xf: Array, num_groups: int, batch_axes: Sequence[int]) -> tuple[Array, Array, Array]:
  """Per-(sample, group) mean and biased variance; returns (x grouped, mean, var), all ``[..., G, C/G]``."""
  _, reduced = group_axes(xf.ndim, batch_axes)
  xg = grouped(xf, num_groups)
  mean = jnp.mean(xg, reduced, keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), reduced, keepdims=True)
  return xg, mean, var


def group_norm(x: Array, scale: Array | None = None, bias: Array | None = None, *,
               num_groups: int = 32, eps: float = 1e-5, batch_axes: Sequence[int] = (0,)) -> Array:
  """GroupNorm (Wu & He 2018) on channels-last input ``[batch, *spatial, C] -> same``.

  Channels split into ``num_groups`` groups; mean and variance over every axis except ``batch_axes``
  and the group, as in Flax/torch. For per-token groups in a sequence model use
  ``batch_axes=(0, 1)``. eps defaults to 1e-5 (torch, the WS/BCN reference). scale/bias: ``[C]``.
  """
  xf = x.astype(stat_dtype(x.dtype))
  xg, mean, var = group_moments(xf, num_groups, batch_axes)
  y = ((xg - mean) * lax.rsqrt(var + eps)).reshape(xf.shape)
  return affine(y, x, (x.ndim - 1,), scale, bias)


__all__ = [
    "layer_norm", "rms_norm", "crms_norm", "compress", "decompress", "l2_norm", "dyt", "dyt_llm_options",
    "fixed_norm", "fixed_norm_std", "token_std", "identity", "group_norm",
]
