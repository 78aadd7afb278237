"""Public norm ops with a selectable implementation: ``layer_norm``, ``rms_norm``, ``crms_norm``.

Each op normalizes the last axis of ``x [..., D]`` and can, in the same pass,

* add a residual first (``residual=r``): returns ``(y, x + r)``, the Pre-LN "add then norm" fusion; in the
  backward the residual-stream cotangent is added to dx inside the kernel and both inputs get that dx;
* fold ``scale_offset`` (Gemma 1+w, formed in float32) and ``out_scale`` (LayerNorm Scaling 1/sqrt(l),
  a float or a traced 0-d array) into one effective weight and bias, so they cost nothing;
* return ``Stats(mean, rstd)``: per-row float32 statistics with stop-gradient semantics, so per-depth
  variance (``1/rstd^2 - eps``) is recorded without another pass over memory. ``mean`` is the mean the
  norm subtracted: the row mean for layer_norm, zeros for rms_norm and crms_norm.

``impl`` picks the implementation: ``"xla"`` (``normjax.norms``, the reference and the CPU default),
``"pallas"`` (the Pallas-Triton kernels in ``kernels.py``; interpret mode on CPU), ``"triton"`` (the same
design in the Triton language through jax-triton, ``triton_kernels.py``: a GPU only, whole rows),
``"auto"`` (``auto.choose``: Pallas only
where the measured table says it beats XLA for this device, op and shape), or a tuple tried in order in
which ``NotImplementedError`` falls through to the next entry (the tokamax pattern). The kernels write
x's dtype, so ``casting="hf"`` with a parameter wider than x (bfloat16 x, float32 gain: a float32
result) is XLA only: ``"auto"`` picks XLA for it and the kernel implementations raise ValueError.

Under a mesh (``jax.set_mesh``) the Pallas call is wrapped in ``jax.shard_map`` with the leading axis split
over ``row_axes`` (norms are row-local, so no collectives are needed).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from normjax.axes import BATCH_AXES
from normjax.norms import standard
from normjax.norms._util import CASTINGS, check_scalar, output_dtype
from normjax.validation import check_choice
from pallas_kernels import _compat, auto, kernels, launch
from pallas_kernels.kernels import F32, KernelConfig, Static, compute_dtype

Array = jax.Array
IMPLS = ("xla", "pallas", "triton", "auto")
MAX_WIDTH = 65536  # whole row in registers; wider rows would need a loop (Liger's limit)
MAX_ELEMENTS = 2**31  # the kernels' pointer offsets (row * D + column) are int32
KERNEL_DTYPES = ("float32", "bfloat16", "float16")
_REFERENCE = {"layer_norm": standard.layer_norm, "rms_norm": standard.rms_norm,
              "crms_norm": standard.crms_norm}
KINDS = tuple(_REFERENCE)  # the norm kinds with a fused kernel
_log = logging.getLogger(__name__)
_logged: set[tuple[Any, ...]] = set()


class Stats(NamedTuple):
  """Per-row float32 statistics, shape ``x.shape[:-1]``."""
  mean: Array
  rstd: Array


class _Args(NamedTuple):
  kind: str
  eps: float
  scale_offset: float
  out_scale: Any
  casting: str
  config: KernelConfig | None
  row_axes: tuple[str, ...]
  stats: bool  # return_stats: the XLA path computes statistics only then; the kernel always has them


def effective_weight(scale: Array | None, width: int, scale_offset: float, out_scale: Any,
                     casting: str, *, x_dtype: Any) -> Array | None:
  """``(scale + scale_offset) * out_scale`` in the dtype ``normjax.norms._util.affine`` multiplies in.

  None when there is nothing to multiply (no scale and a static out_scale of 1). ``[D]``.
  """
  compute = compute_dtype(casting, x_dtype, None if scale is None else scale.dtype)
  if scale is None:
    if scale_offset != 0.0:
      raise ValueError("scale_offset needs a scale parameter (the offset is added to it)")
    if isinstance(out_scale, (int, float)) and out_scale == 1.0:
      return None
    return jnp.broadcast_to(jnp.asarray(out_scale, compute), (width,))
  return ((scale.astype(compute) + jnp.asarray(scale_offset, compute))
          * jnp.asarray(out_scale, compute))


def effective_bias(bias: Array | None, scale: Array | None, out_scale: Any, casting: str, *,
                   x_dtype: Any) -> Array | None:
  """``bias * out_scale`` in the dtype ``affine`` adds in (LayerNorm Scaling scales the bias too);
  ``[D]`` or None."""
  if bias is None:
    return None
  compute = compute_dtype(casting, x_dtype, None if scale is None else scale.dtype)
  return bias.astype(compute) * jnp.asarray(out_scale, compute)


def _check_kernel_casting(impl: str, casting: str, x: Array, scale: Array | None,
                         bias: Array | None) -> None:
  """ValueError when ``casting`` returns a dtype wider than x's: the kernels write x's dtype."""
  out = output_dtype(casting, x.dtype, scale, bias)
  if out != x.dtype:
    params = ", ".join(f"{name} {p.dtype}" for name, p in (("scale", scale), ("bias", bias))
                       if p is not None)
    raise ValueError(f"casting={casting!r} with x {x.dtype} and {params} returns {out}, but "
                     f"impl={impl!r} writes x's dtype ({x.dtype}); use impl='xla' (or 'auto')")


# ---------------------------------------------------------------------------------------------
# Implementations: (x, scale, bias, residual, args) -> (y, new residual or None, mean, rstd); the
# XLA path returns None statistics unless ``args.stats``.

def _xla(x, scale, bias, residual, a: _Args):
  s = x if residual is None else x + residual
  y = _REFERENCE[a.kind](s, scale, bias, eps=a.eps, out_scale=a.out_scale,
                         scale_offset=a.scale_offset, casting=a.casting)
  if not a.stats:
    return y, (None if residual is None else s), None, None
  d = s.shape[-1]
  rows = lax.stop_gradient(s).astype(F32).reshape(-1, d)
  _, mean, rstd = kernels.row_statistics(rows, True, a.kind, d, a.eps)
  return (y, (None if residual is None else s), mean.reshape(s.shape[:-1]),
          rstd.reshape(s.shape[:-1]))


def _launcher(backend: str) -> Any:
  """The module building the kernel calls: ``launch`` (Pallas) or ``triton_kernels`` (imported on
  first use: it needs the ``triton`` package)."""
  if backend == "pallas":
    return launch
  from pallas_kernels import triton_kernels
  return triton_kernels


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(st: Static, x, residual, weight, bias):
  return _launcher(st.backend).forward(x, residual, weight, bias, st)


def _fused_fwd(st, x, residual, weight, bias):
  y, s, mean, rstd = _launcher(st.backend).forward(x, residual, weight, bias, st)
  return (y, s, mean, rstd), (x if s is None else s, mean, rstd, weight, bias)


def _fused_bwd(st, saved, cotangents):
  x, mean, rstd, weight, bias = saved
  dy, ds = cotangents[0], cotangents[1]  # mean/rstd cotangents are dropped: stop-gradient stats
  dx, dweight, dbias = _launcher(st.backend).backward(x, dy, ds, mean, rstd, weight, st)
  return (dx, dx if st.has_residual else None,
          None if weight is None else dweight.astype(weight.dtype),
          None if bias is None else dbias.astype(bias.dtype))


_fused.defvjp(_fused_fwd, _fused_bwd)


def _pallas(x, scale, bias, residual, a: _Args, backend: str = "pallas"):
  if not _compat.supported_backend():
    raise NotImplementedError(f"impl='pallas' uses Pallas-Triton, which has no {_compat.backend()} "
                              "lowering; use impl='xla'")
  width = x.shape[-1]
  if jnp.dtype(x.dtype).name not in KERNEL_DTYPES or width > MAX_WIDTH or x.ndim == 0:
    raise NotImplementedError(f"impl={backend!r} supports dtypes {KERNEL_DTYPES} and widths up to "
                              f"{MAX_WIDTH}; got {x.dtype} [..., {width}]")
  if x.size >= MAX_ELEMENTS:
    raise NotImplementedError(f"impl={backend!r} indexes with int32 offsets: {x.size} elements "
                              f"(shape {tuple(x.shape)}) reach 2**31; split the rows or use impl='xla'")
  weight = effective_weight(scale, width, a.scale_offset, a.out_scale, a.casting, x_dtype=x.dtype)
  bias = effective_bias(bias, scale, a.out_scale, a.casting, x_dtype=x.dtype)
  st = Static(a.kind, float(a.eps), a.casting, weight is not None, bias is not None,
              residual is not None, a.config or KernelConfig(), backend)

  def rows(x, residual, weight, bias):
    lead = x.shape[:-1]
    flat = lambda t: None if t is None else t.reshape(-1, width)
    y, s, mean, rstd = _fused(st, flat(x), flat(residual), weight, bias)
    return (y.reshape(x.shape), None if s is None else s.reshape(x.shape), mean.reshape(lead),
            rstd.reshape(lead))

  return _row_sharded(rows, a.row_axes, x, residual, weight, bias)


def _row_sharded(fn: Callable[..., Any], row_axes: Sequence[str], x, residual, weight, bias):
  """Runs ``fn`` per shard of the leading axis when a mesh is set; pallas_call is not partitionable."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or x.ndim < 2 or math.prod(mesh.shape.values()) == 1:
    return fn(x, residual, weight, bias)
  axes = tuple(name for name in row_axes if mesh.shape.get(name, 1) > 1)
  if axes and x.shape[0] % math.prod(mesh.shape[name] for name in axes) == 0:
    rows = P(axes)
  else:
    rows = P()  # a leading axis the mesh does not divide: every device normalizes every row
  # An absent residual or bias is None: an empty pytree, which shard_map passes through.
  return jax.shard_map(fn, in_specs=(rows, rows, P(), P()), out_specs=(rows, rows, rows, rows),
                       check_vma=False)(x, residual, weight, bias)


def _triton(x, scale, bias, residual, a: _Args):
  """The Triton-language kernels through jax-triton (``triton_kernels.py``): a GPU, jax-triton and
  whole rows, else NotImplementedError (a tuple ``impl`` falls through)."""
  try:
    from pallas_kernels import triton_kernels
  except ImportError as error:
    raise NotImplementedError("impl='triton' needs the triton package: pip install -e '.[gpu]'") from error
  triton_kernels.check_supported(x)
  return _pallas(x, scale, bias, residual, a, backend="triton")


_IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {"xla": _xla, "pallas": _pallas, "triton": _triton}


def _candidates(impl: str | Sequence[str], kind: str, x: Array, residual: Array | None,
                kernels_fit: bool) -> list[str]:
  """The implementations to try, "auto" resolved; ``kernels_fit``: the result dtype is x's."""
  order = [impl] if isinstance(impl, str) else list(impl)
  if not order:
    raise ValueError(f"impl=() is empty; choose one or more of {list(IMPLS)}")
  for name in order:
    check_choice(name, "impl", IMPLS)
  choose = lambda: auto.choose(kind, x.shape, x.dtype, residual is not None) if kernels_fit else "xla"
  return [choose() if name == "auto" else name for name in order]


def _norm(kind: str, x: Array, scale: Array | None, bias: Array | None, residual: Array | None,
          eps: float, scale_offset: float, out_scale: Any, casting: str, return_stats: bool,
          impl: str | Sequence[str], config: KernelConfig | None, row_axes: Sequence[str]) -> Any:
  check_choice(casting, "casting", CASTINGS)
  check_scalar(out_scale, "out_scale")
  if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
    raise ValueError(f"residual must match x: x is {x.dtype}{list(x.shape)}, residual is "
                     f"{residual.dtype}{list(residual.shape)}")
  for name, p in (("scale", scale), ("bias", bias)):
    if p is not None and tuple(p.shape) != x.shape[-1:]:
      raise ValueError(f"{name} has shape {tuple(p.shape)}; normalizing the last axis of an input of "
                       f"shape {tuple(x.shape)} needs {x.shape[-1:]}")
  args = _Args(kind, eps, scale_offset, out_scale, casting, config, tuple(row_axes), return_stats)
  kernels_fit = output_dtype(casting, x.dtype, scale, bias) == x.dtype
  reasons = []
  for name in _candidates(impl, kind, x, residual, kernels_fit):
    if name != "xla":
      _check_kernel_casting(name, casting, x, scale, bias)
    try:
      y, s, mean, rstd = _IMPLEMENTATIONS[name](x, scale, bias, residual, args)
    except NotImplementedError as e:
      reasons.append(f"{name}: {e}")
      continue
    key = (kind, x.shape, jnp.dtype(x.dtype).name, residual is not None, name)
    if key not in _logged:
      _logged.add(key)
      _log.info("%s %s%s residual=%s: impl=%s", kind, key[2], list(x.shape), key[3], name)
    out = (y,) if residual is None else (y, s)
    if return_stats:
      out += (Stats(mean, rstd),)
    return out[0] if len(out) == 1 else out
  raise NotImplementedError(f"no implementation of {kind} in impl={impl!r} accepts this input: "
                            + "; ".join(reasons))


CRMS_WIDTH = " (the d-1 stored coordinates; the original width is D+1)"


def _op(kind: str, summary: str) -> Callable[..., Any]:
  def op(x: Array, scale: Array | None = None, bias: Array | None = None, *,
         residual: Array | None = None, eps: float = 1e-6, scale_offset: float = 0.0,
         out_scale: Any = 1.0, casting: str = "f32", return_stats: bool = False,
         impl: str | Sequence[str] = "auto", config: KernelConfig | None = None,
         row_axes: Sequence[str] = BATCH_AXES) -> Any:
    return _norm(kind, x, scale, bias, residual, eps, scale_offset, out_scale, casting, return_stats,
                 impl, config, row_axes)

  op.__name__ = op.__qualname__ = kind
  op.__doc__ = f"""{summary} over the last axis: ``x [..., D] -> y [..., D]`` in x's dtype.

  Math, defaults and ``casting`` as in ``normjax.norms.{kind}`` (the ``xla`` implementation), so
  ``casting="hf"`` returns x's dtype promoted with the parameters'; only XLA writes a wider dtype.

  Args:
    x: input ``[..., D]``{CRMS_WIDTH if kind == "crms_norm" else ""}.
    scale, bias: optional ``[D]`` parameters.
    residual: optional ``[..., D]`` (x's dtype); the op normalizes ``x + residual`` and also returns it.
    eps, scale_offset, out_scale, casting: as in the reference.
    return_stats: also return ``Stats(mean, rstd)`` (float32, ``x.shape[:-1]``, no gradient).
    impl: "xla", "pallas", "triton", "auto", or a tuple tried in order (see the module docstring).
    config: ``KernelConfig`` launch parameters for the Pallas kernels (None: measured heuristics).
    row_axes: mesh axes the leading axis is split over under ``jax.set_mesh`` (default: the batch
      axes of ``normjax.axes``).
  Returns:
    ``y``, ``(y, x + residual)`` with a residual, and ``Stats`` appended when requested.
  """
  return op


layer_norm = _op("layer_norm",
                 "LayerNorm ``((x - mean) * rsqrt(var + eps) * (scale + offset) + bias) * out_scale``")
rms_norm = _op("rms_norm", "RMSNorm ``(x * rsqrt(mean(x^2) + eps) * (scale + offset) + bias) * out_scale``")
crms_norm = _op("crms_norm", "Compressed RMSNorm ``xc * rsqrt((sum(xc^2) + sum(xc)^2)/(D+1) + eps)``")
