"""Pallas-Triton kernel bodies and ``pallas_call`` builders for the row norms, on ``[N, D]`` arrays.

One forward kernel and one backward kernel serve LayerNorm, RMSNorm and Compressed RMSNorm
(``docs/kernels.md``). Every row is normalized from the statistics

  layer_norm  mean = sum(x)/D,  rstd = rsqrt(sum((x - mean)^2)/D + eps)
  rms_norm    mean = 0,         rstd = rsqrt(sum(x^2)/D + eps)
  crms_norm   mean = 0,         rstd = rsqrt((sum(x^2) + sum(x)^2)/(D+1) + eps)  (D+1 = original width)

and ``y = (x - mean) * rstd * w + b`` with ``w`` the effective weight (scale, offset and out_scale
already folded in by the caller). The forward optionally adds a residual first (``s = x + r`` in the
input dtype, written out as the new residual stream) and always writes the float32 mean and rstd:
they are the backward's residuals and the stats output. With ``g = dy * w`` and ``xhat = (x-mean)*rstd``
the backward is

  layer_norm  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
  rms_norm    dx = rstd * (g - xhat * mean(g * xhat))
  crms_norm   dx = rstd * (g - (xhat + sum(xhat)) * sum(g * xhat) / (D+1))

(+ the residual-stream cotangent when fused), written by ONE kernel whose G programs each loop over a
contiguous slab of rows and also write float32 partial sums of ``dy * xhat`` and ``dy`` (``[G, D]``) that
XLA reduces afterwards: deterministic, no atomics. Both kernels index whole-array refs by hand and mask
every load and store on both edges: columns beyond D (the power-of-two padding) and rows beyond N.
Values are masked with ``jnp.where``, never multiplied by a mask, since interpret mode pads with NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import compiler_params, interpret, pl, pltriton

Array = jax.Array
KINDS = ("layer_norm", "rms_norm", "crms_norm")
F32 = jnp.float32


MAX_WARPS = 32  # 1024 threads per block on every CUDA GPU
MAX_BLOCK_ELEMENTS = 2**20  # rows x padded width of one block: Triton's TRITON_MAX_TENSOR_NUMEL


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Launch parameters; None = the measured heuristic in ``default_config`` (docs/kernels.md).
  Rows per block and warps must be powers of two (Triton's tensor shapes and launch), at most
  ``MAX_WARPS`` warps; a ValueError names the field otherwise."""
  block_rows: int | None = None  # forward rows per program
  num_warps: int | None = None  # forward warps per program
  bwd_block_rows: int | None = None  # backward rows per loop iteration
  bwd_num_warps: int | None = None
  bwd_programs: int | None = None  # G, the number of backward programs (= partial-sum rows)

  def __post_init__(self):
    for field in ("block_rows", "num_warps", "bwd_block_rows", "bwd_num_warps"):
      value = getattr(self, field)
      if value is not None and (not isinstance(value, int) or value < 1 or value & (value - 1)):
        raise ValueError(f"KernelConfig.{field}={value!r} must be a power of two")
    for field in ("num_warps", "bwd_num_warps"):
      if (getattr(self, field) or 1) > MAX_WARPS:
        raise ValueError(f"KernelConfig.{field}={getattr(self, field)} exceeds {MAX_WARPS} warps "
                         "(1024 threads per block)")
    if self.bwd_programs is not None and (not isinstance(self.bwd_programs, int) or self.bwd_programs < 1):
      raise ValueError(f"KernelConfig.bwd_programs={self.bwd_programs!r} must be a positive int")


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything the kernels specialise on; hashable so it can be a custom_vjp nondiff argument."""
  kind: str
  eps: float
  casting: str
  has_weight: bool
  has_bias: bool
  has_residual: bool
  config: KernelConfig


def default_config(n: int, d: int, config: KernelConfig | None = None) -> KernelConfig:
  """Fills unset launch parameters from the prototype's best measured (rows, warps, G) per width.

  H100 sweep (jax 0.11.2, triton 3.6, bf16): forward (4 rows, 8 warps) at D=1024, (2, 8) at 4096, (1, 4) at
  16384; backward (2, 4, G=512) at 1024 and (1, 8, G=256) at 4096 and above.
  """
  config = config or KernelConfig()
  dp = pl.next_power_of_2(d)
  fwd_rows = max(1, min(32, 4096 // dp)) if dp <= 1024 else max(1, 8192 // dp)
  fwd_warps = 4 if dp >= 16384 or dp * fwd_rows < 2048 else 8
  bwd_rows = 2 if dp <= 2048 else 1
  bwd_warps = 4 if dp <= 1024 else 8
  programs = 512 if dp <= 1024 else 256
  pick = lambda value, default: default if value is None else value
  bwd_rows = pick(config.bwd_block_rows, bwd_rows)
  filled = KernelConfig(
      block_rows=pick(config.block_rows, fwd_rows), num_warps=pick(config.num_warps, fwd_warps),
      bwd_block_rows=bwd_rows, bwd_num_warps=pick(config.bwd_num_warps, bwd_warps),
      bwd_programs=min(pick(config.bwd_programs, programs), pl.cdiv(n, bwd_rows)))
  for field in ("block_rows", "bwd_block_rows"):
    if getattr(filled, field) * dp > MAX_BLOCK_ELEMENTS:
      raise ValueError(f"KernelConfig.{field}={getattr(filled, field)} rows of padded width {dp} "
                       f"exceed {MAX_BLOCK_ELEMENTS} elements per block")
  return filled


def row_statistics(xf: Array, valid: Array | bool, kind: str, d: int, eps: float
                   ) -> tuple[Array, Array, Array]:
  """``xf [rows, Dp]`` float32, zero outside ``valid`` -> (x - mean [rows, Dp], mean [rows], rstd [rows]).

  The statistics in the module docstring; shared by the kernel (Dp >= D, masked) and the XLA path
  of ``ops`` (Dp == D, ``valid=True``)."""
  total = jnp.sum(xf, axis=1)
  if kind == "layer_norm":
    mean = total / d
    xc = jnp.where(valid, xf - mean[:, None], 0.0)
    mean_square = jnp.sum(xc * xc, axis=1) / d
  else:
    mean = jnp.zeros_like(total)
    xc = xf
    mean_square = jnp.sum(xf * xf, axis=1)
    mean_square = (mean_square + total * total) / (d + 1) if kind == "crms_norm" else mean_square / d
  return xc, mean, lax.rsqrt(mean_square + eps)


def _forward_kernel(*refs, st: Static, n: int, d: int, bm: int):
  it = iter(refs)
  x_ref = next(it)
  r_ref = next(it) if st.has_residual else None
  w_ref = next(it) if st.has_weight else None
  b_ref = next(it) if st.has_bias else None
  y_ref = next(it)
  s_ref = next(it) if st.has_residual else None
  mean_ref, rstd_ref = next(it), next(it)

  # Whole-array refs indexed by hand, every access masked on both edges: Pallas-Triton does not
  # mask block specs, so a (bm, Dp) block of a [N, D] array would read and write past each row
  # (D < Dp) and past the last row (N % bm != 0).
  dp = pl.next_power_of_2(d)
  r0 = pl.program_id(0) * bm
  row_ok = r0 + jnp.arange(bm) < n
  col_ok = jnp.arange(dp) < d
  ok = row_ok[:, None] & col_ok[None, :]
  block = (pl.ds(r0, bm), pl.ds(0, dp))
  x = pltriton.load(x_ref.at[block], mask=ok, other=0.0)
  if r_ref is not None:
    x = x + pltriton.load(r_ref.at[block], mask=ok, other=0.0)  # in the input dtype, like ``x + r``
    pltriton.store(s_ref.at[block], x, mask=ok)
  xc, mean, rstd = row_statistics(jnp.where(ok, x.astype(F32), 0.0), ok, st.kind, d, st.eps)
  y = xc * rstd[:, None]
  if w_ref is not None:
    w = pltriton.load(w_ref.at[pl.ds(0, dp)], mask=col_ok, other=0.0)
    if st.casting == "llama" and jnp.dtype(w.dtype).itemsize < 4:
      y = y.astype(w.dtype)  # HF Llama: round the normalized value before the weight multiply
    y = y * w[None, :].astype(y.dtype)
  if b_ref is not None:
    y = y + pltriton.load(b_ref.at[pl.ds(0, dp)], mask=col_ok, other=0.0)[None, :].astype(y.dtype)
  pltriton.store(y_ref.at[block], y.astype(y_ref.dtype), mask=ok)
  pltriton.store(mean_ref.at[pl.ds(r0, bm)], mean, mask=row_ok)
  pltriton.store(rstd_ref.at[pl.ds(r0, bm)], rstd, mask=row_ok)


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
  results = pl.pallas_call(
      functools.partial(_forward_kernel, st=st, n=n, d=d, bm=cfg.block_rows),
      grid=(pl.cdiv(n, cfg.block_rows),), out_shape=out_shape,
      compiler_params=compiler_params(cfg.num_warps), interpret=interpret(),
      name=f"{st.kind}_fwd")(*operands)
  y, *rest = results
  s = rest.pop(0) if st.has_residual else None
  return y, s, rest[0], rest[1]


def _backward_kernel(*refs, st: Static, n: int, d: int, rows_per_program: int, bm: int):
  it = iter(refs)
  x_ref, dy_ref = next(it), next(it)
  ds_ref = next(it) if st.has_residual else None
  mean_ref, rstd_ref = next(it), next(it)
  w_ref = next(it) if st.has_weight else None
  dx_ref = next(it)
  dw_ref = next(it) if st.has_weight else None
  db_ref = next(it) if st.has_bias else None

  dp = pl.next_power_of_2(d)
  cols = jnp.arange(dp)
  col_ok = cols < d
  program = pl.program_id(0)
  start = program * rows_per_program
  stop = jnp.minimum(start + rows_per_program, n)
  # Masked loads with ``other=0`` already zero the padding (interpret mode applies the same where).
  w = None if w_ref is None else pltriton.load(w_ref.at[pl.ds(0, dp)], mask=col_ok, other=0.0).astype(F32)
  partials = {name: ref for name, ref in (("dw", dw_ref), ("db", db_ref)) if ref is not None}

  def rows(ref, r0, mask):
    return pltriton.load(ref.at[pl.ds(r0, bm), pl.ds(0, dp)], mask=mask, other=0.0).astype(F32)

  def body(step, sums):
    r0 = start + step * bm
    row_ok = r0 + jnp.arange(bm) < stop
    ok = row_ok[:, None] & col_ok[None, :]
    mean = pltriton.load(mean_ref.at[pl.ds(r0, bm)], mask=row_ok, other=0.0)
    rstd = pltriton.load(rstd_ref.at[pl.ds(r0, bm)], mask=row_ok, other=0.0)
    dy = rows(dy_ref, r0, ok)
    xhat = jnp.where(ok, (rows(x_ref, r0, ok) - mean[:, None]) * rstd[:, None], 0.0)
    g = dy if w is None else dy * w[None, :]
    g_dot_xhat = jnp.sum(g * xhat, axis=1)[:, None]
    if st.kind == "layer_norm":
      inner = g - jnp.sum(g, axis=1)[:, None] / d - xhat * (g_dot_xhat / d)
    elif st.kind == "rms_norm":
      inner = g - xhat * (g_dot_xhat / d)
    else:
      inner = g - (xhat + jnp.sum(xhat, axis=1)[:, None]) * (g_dot_xhat / (d + 1))
    dx = inner * rstd[:, None]
    if ds_ref is not None:
      dx = dx + rows(ds_ref, r0, ok)
    pltriton.store(dx_ref.at[pl.ds(r0, bm), pl.ds(0, dp)], dx.astype(dx_ref.dtype), mask=ok)
    # Only the sums that are written are accumulated: each is a [Dp] float32 register vector.
    terms = {"dw": lambda: jnp.sum(dy * xhat, axis=0), "db": lambda: jnp.sum(dy, axis=0)}
    return {name: total + terms[name]() for name, total in sums.items()}

  sums = lax.fori_loop(0, rows_per_program // bm, body,
                       {name: jnp.zeros((dp,), F32) for name in partials})
  for name, ref in partials.items():
    pltriton.store(ref.at[program, pl.ds(0, dp)], sums[name], mask=col_ok)


def backward(x: Array, dy: Array, ds: Array | None, mean: Array, rstd: Array, weight: Array | None,
             st: Static) -> tuple[Array, Array | None, Array | None]:
  """One pass over rows -> (dx [N, D], d weight [D] or None, d bias [D] or None).

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
  kernel = functools.partial(_backward_kernel, st=st, n=n, d=d, rows_per_program=rows_per_program,
                             bm=bm)
  dx, *partials = pl.pallas_call(
      kernel, grid=(programs,), out_shape=out_shape,
      compiler_params=compiler_params(cfg.bwd_num_warps), interpret=interpret(),
      name=f"{st.kind}_bwd")(*operands)
  dweight = partials.pop(0).sum(0) if st.has_weight else None
  dbias = partials.pop(0).sum(0) if st.has_bias else None
  return dx, dweight, dbias
