"""Pallas-Triton kernel bodies for the row norms on ``[N, D]`` arrays (``launch.py`` calls them).

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import pl, pltriton

Array = jax.Array
KINDS = ("layer_norm", "rms_norm", "crms_norm")
F32 = jnp.float32


MAX_WARPS = 32  # 1024 threads per block on every CUDA GPU
MAX_BLOCK_ELEMENTS = 2**20  # rows x padded width of one block: Triton's TRITON_MAX_TENSOR_NUMEL
# Rows up to WHOLE_ROW (padded) lanes are held in registers whole; wider rows are looped over in
# blocks of WIDE_BLOCK_COLS columns (``wide.py``): a 16384-lane row in registers needs 255 registers
# per thread and spills, a 65536-lane row spills 12-18 KB per thread (ptxas -v, sm_90a).
WHOLE_ROW = 8192
WIDE_BLOCK_COLS = 4096


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
  block_cols: int | None = None  # columns per block: below next_pow2(D), rows are looped over (wide.py)

  def __post_init__(self):
    for field in ("block_rows", "num_warps", "bwd_block_rows", "bwd_num_warps", "block_cols"):
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
  backend: str = "pallas"  # whose kernels run: "pallas" (launch.py) or "triton" (triton_kernels.py)


def default_config(n: int, d: int, config: KernelConfig | None = None) -> KernelConfig:
  """Fills unset launch parameters from the prototype's best measured (rows, warps, G) per width.

  H100 sweep (jax 0.11.2, triton 3.6, bf16): forward (4 rows, 8 warps) at D=1024, (2, 8) at 4096, (1, 4) at
  16384; backward (2, 4, G=512) at 1024 and (1, 8, G=256) at 4096 and above.
  """
  config = config or KernelConfig()
  dp = pl.next_power_of_2(d)
  fwd_rows = max(1, min(32, 4096 // dp)) if dp <= 1024 else max(1, 8192 // dp)
  fwd_warps = 4 if dp * fwd_rows < 2048 else 8
  bwd_rows = 2 if dp <= 2048 else 1
  bwd_warps = 4 if dp <= 1024 else 8
  programs = 512 if dp <= 1024 else 256
  pick = lambda value, default: default if value is None else value
  bwd_rows = pick(config.bwd_block_rows, bwd_rows)
  filled = KernelConfig(
      block_rows=pick(config.block_rows, fwd_rows), num_warps=pick(config.num_warps, fwd_warps),
      bwd_block_rows=bwd_rows, bwd_num_warps=pick(config.bwd_num_warps, bwd_warps),
      bwd_programs=min(pick(config.bwd_programs, programs), pl.cdiv(n, bwd_rows)),
      block_cols=min(dp, pick(config.block_cols, dp if dp <= WHOLE_ROW else WIDE_BLOCK_COLS)))
  for field in ("block_rows", "bwd_block_rows"):
    if getattr(filled, field) * filled.block_cols > MAX_BLOCK_ELEMENTS:
      raise ValueError(f"KernelConfig.{field}={getattr(filled, field)} rows of {filled.block_cols} "
                       f"columns exceed {MAX_BLOCK_ELEMENTS} elements per block")
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


class ForwardRefs(NamedTuple):
  x: Any
  residual: Any
  weight: Any
  bias: Any
  y: Any
  s: Any  # the new residual stream (x + residual), when fused
  mean: Any
  rstd: Any


def forward_refs(refs: tuple[Any, ...], st: Static) -> ForwardRefs:
  """The forward kernel's refs by name (absent operands are None), in ``pallas_call`` order."""
  it = iter(refs)
  inputs = [next(it) if present else None for present in (True, st.has_residual, st.has_weight, st.has_bias)]
  y = next(it)
  s = next(it) if st.has_residual else None
  return ForwardRefs(*inputs, y, s, next(it), next(it))


def compute_dtype(casting: str, x_dtype: Any, weight_dtype: Any | None) -> jnp.dtype:
  """The dtype the kernels round the normalized value to and multiply and add in.

  As ``normjax.norms._util.affine``: "hf" rounds to x's dtype, which ``ops`` admits only where x's
  dtype already holds the promoted result (the kernels write x's dtype); "hf_legacy" rounds to a
  16-bit weight's dtype; otherwise float32.
  """
  if casting == "hf":
    return jnp.dtype(x_dtype)
  if casting == "hf_legacy" and weight_dtype is not None and jnp.dtype(weight_dtype).itemsize < 4:
    return jnp.dtype(weight_dtype)
  return jnp.dtype(F32)


def affine(xhat: Array, r: ForwardRefs, cols: Any, col_ok: Array, casting: str) -> Array:
  """``xhat [rows, C]`` float32 times the weight, plus the bias, of columns ``cols`` (a ``pl.ds``)."""
  w = None if r.weight is None else pltriton.load(r.weight.at[cols], mask=col_ok, other=0.0)
  compute = compute_dtype(casting, r.y.dtype, None if w is None else w.dtype)
  y = xhat.astype(compute)  # "hf"/"hf_legacy": the rounding before the weight multiply
  if w is not None:
    y = y * w[None, :].astype(compute)
  if r.bias is not None:
    y = y + pltriton.load(r.bias.at[cols], mask=col_ok, other=0.0)[None, :].astype(compute)
  return y


def forward_kernel(*refs, st: Static, n: int, d: int, bm: int):
  r = forward_refs(refs, st)
  # Whole-array refs indexed by hand, every access masked on both edges: Pallas-Triton does not
  # mask block specs, so a (bm, Dp) block of a [N, D] array would read and write past each row
  # (D < Dp) and past the last row (N % bm != 0).
  dp = pl.next_power_of_2(d)
  r0 = pl.program_id(0) * bm
  row_ok = r0 + jnp.arange(bm) < n
  col_ok = jnp.arange(dp) < d
  ok = row_ok[:, None] & col_ok[None, :]
  block = (pl.ds(r0, bm), pl.ds(0, dp))
  x = pltriton.load(r.x.at[block], mask=ok, other=0.0)
  if r.residual is not None:
    x = x + pltriton.load(r.residual.at[block], mask=ok, other=0.0)  # in the input dtype, like ``x + r``
    pltriton.store(r.s.at[block], x, mask=ok)
  xc, mean, rstd = row_statistics(jnp.where(ok, x.astype(F32), 0.0), ok, st.kind, d, st.eps)
  y = affine(xc * rstd[:, None], r, pl.ds(0, dp), col_ok, st.casting)
  pltriton.store(r.y.at[block], y.astype(r.y.dtype), mask=ok)
  pltriton.store(r.mean.at[pl.ds(r0, bm)], mean, mask=row_ok)
  pltriton.store(r.rstd.at[pl.ds(r0, bm)], rstd, mask=row_ok)


class BackwardRefs(NamedTuple):
  x: Any
  dy: Any
  ds: Any  # cotangent of the new residual stream, when fused
  mean: Any
  rstd: Any
  weight: Any
  dx: Any
  dw: Any  # [G, D] float32 partial sums, when there is a weight
  db: Any  # [G, D] float32 partial sums, when there is a bias
  row_sums: tuple[Any, ...]  # wide rows only: per-row sums for the second pass (``wide.py``)


def backward_refs(refs: tuple[Any, ...], st: Static, num_row_sums: int = 0) -> BackwardRefs:
  it = iter(refs)
  x, dy = next(it), next(it)
  ds = next(it) if st.has_residual else None
  mean, rstd = next(it), next(it)
  weight = next(it) if st.has_weight else None
  dx = next(it)
  dw = next(it) if st.has_weight else None
  db = next(it) if st.has_bias else None
  return BackwardRefs(x, dy, ds, mean, rstd, weight, dx, dw, db, tuple(next(it) for _ in range(num_row_sums)))


# The per-row sums each kind's input gradient needs (the backward formulas in the module docstring).
ROW_SUMS = {"layer_norm": ("g", "g_xhat"), "rms_norm": ("g_xhat",), "crms_norm": ("g_xhat", "xhat")}


def row_sums(kind: str, g: Array, xhat: Array) -> dict[str, Array]:
  """``g, xhat [rows, C]`` -> the sums of ``ROW_SUMS[kind]`` over the columns, each ``[rows]``."""
  terms = {"g": lambda: g, "g_xhat": lambda: g * xhat, "xhat": lambda: xhat}
  return {name: jnp.sum(terms[name](), axis=1) for name in ROW_SUMS[kind]}


def input_gradient(kind: str, g: Array, xhat: Array, sums: dict[str, Array], rstd: Array, d: int) -> Array:
  """dx ``[rows, C]`` from ``g = dy * w``, ``xhat`` and the row sums over the whole row."""
  col = lambda name: sums[name][:, None]
  if kind == "layer_norm":
    inner = g - col("g") / d - xhat * (col("g_xhat") / d)
  elif kind == "rms_norm":
    inner = g - xhat * (col("g_xhat") / d)
  else:
    inner = g - (xhat + col("xhat")) * (col("g_xhat") / (d + 1))
  return inner * rstd[:, None]


def backward_kernel(*refs, st: Static, n: int, d: int, rows_per_program: int, bm: int):
  r = backward_refs(refs, st)
  dp = pl.next_power_of_2(d)
  col_ok = jnp.arange(dp) < d
  program = pl.program_id(0)
  start = program * rows_per_program
  stop = jnp.minimum(start + rows_per_program, n)
  # Masked loads with ``other=0`` already zero the padding (interpret mode applies the same where).
  w = None
  if r.weight is not None:
    w = pltriton.load(r.weight.at[pl.ds(0, dp)], mask=col_ok, other=0.0).astype(F32)
  partials = {name: ref for name, ref in (("dw", r.dw), ("db", r.db)) if ref is not None}

  def rows(ref, r0, mask):
    return pltriton.load(ref.at[pl.ds(r0, bm), pl.ds(0, dp)], mask=mask, other=0.0).astype(F32)

  def body(step, sums):
    r0 = start + step * bm
    row_ok = r0 + jnp.arange(bm) < stop
    ok = row_ok[:, None] & col_ok[None, :]
    mean = pltriton.load(r.mean.at[pl.ds(r0, bm)], mask=row_ok, other=0.0)
    rstd = pltriton.load(r.rstd.at[pl.ds(r0, bm)], mask=row_ok, other=0.0)
    dy = rows(r.dy, r0, ok)
    xhat = jnp.where(ok, (rows(r.x, r0, ok) - mean[:, None]) * rstd[:, None], 0.0)
    g = dy if w is None else dy * w[None, :]
    dx = input_gradient(st.kind, g, xhat, row_sums(st.kind, g, xhat), rstd, d)
    if r.ds is not None:
      dx = dx + rows(r.ds, r0, ok)
    pltriton.store(r.dx.at[pl.ds(r0, bm), pl.ds(0, dp)], dx.astype(r.dx.dtype), mask=ok)
    # Only the sums that are written are accumulated: each is a [Dp] float32 register vector.
    terms = {"dw": lambda: jnp.sum(dy * xhat, axis=0), "db": lambda: jnp.sum(dy, axis=0)}
    return {name: total + terms[name]() for name, total in sums.items()}

  sums = lax.fori_loop(0, rows_per_program // bm, body,
                       {name: jnp.zeros((dp,), F32) for name in partials})
  for name, ref in partials.items():
    pltriton.store(ref.at[program, pl.ds(0, dp)], sums[name], mask=col_ok)
