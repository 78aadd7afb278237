"""Shared plumbing for the functional norms: axis checks, parameter broadcasting, dtype rules.

Every norm computes its statistics in ``stat_dtype(x.dtype)`` (float32, or float64 when the input is
float64) and returns its result in ``x.dtype`` (the token norms under ``casting="hf"``: in x's dtype
promoted with the parameters', see ``affine``). Parameters are validated against the normalized axes
so that a wrong shape fails with a message instead of broadcasting silently.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normjax.validation import check_choice

Array = jax.Array
Axis = int | Sequence[int]

CASTINGS = ("f32", "hf", "hf_legacy")


def stat_dtype(dtype: Any) -> jnp.dtype:
  """The dtype statistics are computed in: at least float32, float64 kept for gradient checks."""
  return jnp.promote_types(dtype, jnp.float32)


def canonical_axes(ndim: int, axis: Axis, *, field: str = "axis") -> tuple[int, ...]:
  """Returns sorted non-negative axes; raises ValueError naming the bad value and the valid range."""
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  if not axes:
    raise ValueError(f"{field}={axis!r}: at least one axis is needed")
  result = []
  for a in axes:
    if not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
      raise ValueError(
          f"{field}={axis!r} is not valid for an input of rank {ndim}: "
          f"axes must be integers in [{-ndim}, {ndim - 1}]")
    result.append(int(a) % ndim)
  if len(set(result)) != len(result):
    raise ValueError(f"{field}={axis!r} names the same axis twice")
  return tuple(sorted(result))


def param_shape(x_shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
  """The shape a per-feature parameter must have for a norm over ``axes``."""
  return tuple(x_shape[a] for a in axes)


def expand_param(p: Array, x_shape: Sequence[int], axes: Sequence[int], name: str) -> Array:
  """Checks ``p`` has ``param_shape(x_shape, axes)`` and reshapes it to broadcast against x."""
  expected = param_shape(x_shape, axes)
  if tuple(p.shape) != expected:
    raise ValueError(
        f"{name} has shape {tuple(p.shape)}, but normalizing axes {tuple(axes)} of an input of "
        f"shape {tuple(x_shape)} needs {name} of shape {expected}")
  shape = [1] * len(x_shape)
  for a in axes:
    shape[a] = x_shape[a]
  return jnp.reshape(p, shape)


def check_scalar(value: Any, name: str) -> Array:
  """A Python number or a 0-d (possibly traced) array; anything else is a ValueError."""
  if jnp.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar (Python float or 0-d array), got shape {jnp.shape(value)}")
  return value


def output_dtype(casting: str, x_dtype: Any, *params: Array | None) -> jnp.dtype:
  """The dtype ``affine`` returns: x's, or under "hf" x's promoted with every present parameter's.

  "hf" follows torch type promotion (``weight * normalized``), so a bfloat16 input with a float32
  gain gives float32, as in transformers; the fused kernels compare this with x's dtype.
  """
  if casting != "hf":
    return jnp.dtype(x_dtype)
  dtypes = [p.dtype for p in params if p is not None]
  return functools.reduce(jnp.promote_types, dtypes, jnp.dtype(x_dtype))


def affine(y: Array, x: Array, axes: Sequence[int], scale: Array | None, bias: Array | None, *,
           scale_offset: float = 0.0, out_scale: Any = 1.0, casting: str = "f32") -> Array:
  """Applies ``(y * (scale + scale_offset) + bias) * out_scale`` to a normalized ``y`` (float32/64).

  ``out_scale`` scales the whole output, bias included: LayerNorm Scaling's N(x) / sqrt(l) with
  N's affine inside (Sun et al., arXiv:2502.05795). It is folded into the gain and the bias, so the
  cost is the same as without it.

  ``casting`` says where the rounding happens; the offset, out_scale and bias are always formed
  and added in the dtype the gain multiply happens in:

  * "f32" (Gemma, tokamax, MaxText): everything in y's dtype, one cast to x.dtype at the end.
  * "hf" (current transformers' ``LlamaRMSNorm``, checked against 5.x): y is rounded to x.dtype, then
    multiplied in ``output_dtype`` (x's dtype promoted with the gain's and bias's), which is also
    the result dtype: bfloat16 x with a float32 gain returns float32; float32 x with a bfloat16
    gain returns float32 without any bfloat16 rounding.
  * "hf_legacy" (the older ``LlamaRMSNorm`` that rounds to the weight dtype, as vendored by the
    LayerNorm-Scaling and Mix-LN public code): when the gain is float16/bfloat16, y is rounded to
    the gain's dtype and multiplied in it; otherwise as "f32". The result is in x.dtype.
  """
  check_choice(casting, "casting", CASTINGS)
  out_scale = check_scalar(out_scale, "out_scale")
  compute = y.dtype
  if casting == "hf":
    compute = output_dtype(casting, x.dtype, scale, bias)
    y = y.astype(x.dtype).astype(compute)
  if scale is not None:
    w = expand_param(scale, x.shape, axes, "scale")
    if casting == "hf_legacy" and jnp.dtype(w.dtype).itemsize < 4:
      compute = w.dtype
      y = y.astype(compute)
    w = (w.astype(compute) + jnp.asarray(scale_offset, compute)) * jnp.asarray(out_scale, compute)
    y = y * w
  elif scale_offset != 0.0:
    raise ValueError("scale_offset needs a scale parameter (the offset is added to it)")
  else:
    y = y * jnp.asarray(out_scale, compute)
  if bias is not None:
    b = expand_param(bias, x.shape, axes, "bias").astype(compute)
    y = y + b * jnp.asarray(out_scale, compute)
  return y.astype(output_dtype(casting, x.dtype, scale, bias))


def affine_operands(scale: Array | None, bias: Array | None, x_shape: Sequence[int], ax: int,
                    dtype: Any) -> tuple[Array, Array]:
  """``scale`` and ``bias`` in ``dtype``, shaped to broadcast against x along feature axis ``ax``,
  ones / zeros when absent: the explicit operands a custom VJP differentiates (PowerNorm, UN)."""
  c = x_shape[ax]
  scale = jnp.ones(c, dtype) if scale is None else scale.astype(dtype)
  bias = jnp.zeros(c, dtype) if bias is None else bias.astype(dtype)
  return (expand_param(scale, x_shape, (ax,), "scale"), expand_param(bias, x_shape, (ax,), "bias"))


def masked_mean(v: Array, mask: Array | None, axes: Sequence[int],
                axis_name: str | None = None) -> Array:
  """Mean of v over ``axes`` counting only positions where ``mask`` (broadcastable to v) is true.

  Masked-out positions are replaced by zero with ``where`` so a NaN in padding cannot leak in.
  With ``axis_name`` the sums are also added across that mapped axis (shard_map/pmap).
  """
  if mask is None:
    total = jnp.sum(v, axes, keepdims=True)
    count = jnp.asarray(np.prod([v.shape[a] for a in axes]), v.dtype)
  else:
    m = jnp.broadcast_to(mask, v.shape)
    total = jnp.sum(jnp.where(m, v, 0), axes, keepdims=True)
    count = jnp.sum(m, axes, keepdims=True).astype(v.dtype)
  if axis_name is not None:
    total, count = jax.lax.psum((total, count), axis_name)
  return total / count
