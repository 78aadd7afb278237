"""Shared plumbing for the functional norms: axis checks, parameter broadcasting, dtype rules.

Every norm computes its statistics in ``stat_dtype(x.dtype)`` (float32, or float64 when the input is
float64) and returns its result in ``x.dtype``. Parameters are validated against the normalized axes
so that a wrong shape fails with a message instead of broadcasting silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normjax.validation import check_choice

Array = jax.Array
Axis = int | Sequence[int]

CASTINGS = ("f32", "llama")


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


def affine(y: Array, x: Array, axes: Sequence[int], scale: Array | None, bias: Array | None, *,
           scale_offset: float = 0.0, out_scale: Any = 1.0, casting: str = "f32") -> Array:
  """Applies ``y * (scale + scale_offset) * out_scale + bias`` to a normalized ``y`` and casts to x.dtype.

  casting="f32" (Gemma, tokamax, MaxText): everything in float32, one cast at the end, (1+w) formed in
  float32. casting="llama" (HF LlamaRMSNorm, the LNS/Mix-LN code): the normalized value is cast to the
  weight dtype when that is float16/bfloat16 and the multiply happens in that dtype.
  """
  check_choice(casting, "casting", CASTINGS)
  out_scale = check_scalar(out_scale, "out_scale")
  compute = y.dtype
  if scale is not None:
    w = expand_param(scale, x.shape, axes, "scale")
    if casting == "llama" and jnp.dtype(w.dtype).itemsize < 4:
      compute = w.dtype
      y = y.astype(compute)
    w = (w.astype(compute) + jnp.asarray(scale_offset, compute)) * jnp.asarray(out_scale, compute)
    y = y * w
  elif scale_offset != 0.0:
    raise ValueError("scale_offset needs a scale parameter (the offset is added to it)")
  else:
    y = y * jnp.asarray(out_scale, compute)
  if bias is not None:
    y = y + expand_param(bias, x.shape, axes, "bias").astype(compute)
  return y.astype(x.dtype)


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
