"""The ``pallas_call`` builders: ``forward`` and ``backward`` on ``[N, D]`` rows, choosing the whole-row
kernels (``kernels.py``) or, for rows wider than ``kernels.WHOLE_ROW`` lanes, the column-blocked ones
(``wide.py``), with the launch settings of ``kernels.default_config``."""

from __future__ import annotations

import functools

import jax

from pallas_kernels import wide
from pallas_kernels._compat import compiler_params, interpret, pl
from pallas_kernels.kernels import (F32, ROW_SUMS, Static, backward_kernel, forward_kernel,
                                    default_config)

Array = jax.Array


def forward(x: Array, residual: Array | None, weight: Array | None, bias: Array | None,
            st: Static) -> tuple[Array, Array | None, Array, Array]:
  """``x, residual: [N, D]; weight, bias: [D]`` -> (y [N, D], s [N, D] or None, mean [N], rstd [N])."""
  n, d = x.shape
  cfg = default_config(n, d, st.config)
  operands = [a for a in (x, residual, weight, bias) if a is not None]
  out_shape = [jax.ShapeDtypeStruct((n, d), x.dtype)]
  if st.has_residual:
    out_shape.append(jax.ShapeDtypeStruct((n, d), x.dtype))
  out_shape += [jax.ShapeDtypeStruct((n,), F32)] * 2
  body = forward_kernel
  if cfg.block_cols < pl.next_power_of_2(d):
    body = functools.partial(wide.forward_kernel, bc=cfg.block_cols)
  results = pl.pallas_call(
      functools.partial(body, st=st, n=n, d=d, bm=cfg.block_rows),
      grid=(pl.cdiv(n, cfg.block_rows),), out_shape=out_shape,
      compiler_params=compiler_params(cfg.num_warps), interpret=interpret(),
      name=f"{st.kind}_fwd")(*operands)
  y, *rest = results
  s = rest.pop(0) if st.has_residual else None
  return y, s, rest[0], rest[1]


def backward(x: Array, dy: Array, ds: Array | None, mean: Array, rstd: Array, weight: Array | None,
             st: Static) -> tuple[Array, Array | None, Array | None]:
  """One pass over rows (two for wide rows) -> (dx [N, D], d weight [D] or None, d bias [D] or None).

  ``x`` is the normalized input (the new residual stream when fused); ``ds`` its own cotangent.
  The weight gradient is with respect to the effective weight, reduced from float32 partials.
  """
  n, d = x.shape
  cfg = default_config(n, d, st.config)
  bm, programs = cfg.bwd_block_rows, cfg.bwd_programs
  rows_per_program = pl.cdiv(pl.cdiv(n, programs), bm) * bm
  programs = pl.cdiv(n, rows_per_program)
  operands = [a for a in (x, dy, ds, mean, rstd, weight) if a is not None]
  partial = jax.ShapeDtypeStruct((programs, d), F32)
  out_shape = [jax.ShapeDtypeStruct((n, d), dy.dtype)]
  out_shape += [partial] * (int(st.has_weight) + int(st.has_bias))
  settings = dict(st=st, n=n, d=d, rows_per_program=rows_per_program, bm=bm)
  if cfg.block_cols < pl.next_power_of_2(d):
    kernel = functools.partial(wide.backward_kernel, bc=cfg.block_cols, **settings)
    out_shape += [jax.ShapeDtypeStruct((n,), F32)] * len(ROW_SUMS[st.kind])
  else:
    kernel = functools.partial(backward_kernel, **settings)
  dx, *partials = pl.pallas_call(
      kernel, grid=(programs,), out_shape=out_shape,
      compiler_params=compiler_params(cfg.bwd_num_warps), interpret=interpret(),
      name=f"{st.kind}_bwd")(*operands)
  dweight = partials.pop(0).sum(0) if st.has_weight else None
  dbias = partials.pop(0).sum(0) if st.has_bias else None
  return dx, dweight, dbias
