"""``impl="triton"``: the fused forward and backward written in the Triton language, called through
jax-triton (the ``gpu`` extra; a GPU jaxlib), with the same design, options, launch settings and results as
the Pallas kernels (``kernels.py``; docs/kernels.md). Whole rows up to ``MAX_WIDTH`` lanes; wider
rows, and any call without a GPU and jax-triton, raise ``NotImplementedError`` (a tuple ``impl``
falls through to the next entry).

Absent operands are passed as an unread placeholder pointer (the kernels specialize on ``HAS_*``
constants). Offsets are int32, as in the Pallas kernels (``ops`` refuses 2**31 elements): int64
offsets made the whole-row kernels spill. On CPU the kernels cannot run (jax-triton needs a GPU
jaxlib), but ``cuda_lowering.compile_source_for_hopper`` compiles them for sm_90a with the
``triton`` package, as ``cuda_lowering`` does for the Pallas kernels.
"""

from __future__ import annotations

import jax
import numpy as np
import triton
import triton.language as tl

from pallas_kernels import _compat
from pallas_kernels.kernels import F32, Static, default_config

Array = jax.Array
KIND_IDS = {"layer_norm": 0, "rms_norm": 1, "crms_norm": 2}
# Whole rows only. At 8192 lanes the bf16 crms_norm backward with a residual needs 255 registers
# and spills 52 B on sm_90a (the Pallas kernel of the same design needs 128): 4096 until measured.
MAX_WIDTH = 4096


@triton.jit
def forward_kernel(X, R, W, B, n_rows, d, eps, Y, S, MEAN, RSTD,
                   KIND: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   ROUND_TO_X: tl.constexpr, ROUND_TO_W: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   BLOCK_D: tl.constexpr):
  rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
  cols = tl.arange(0, BLOCK_D)
  row_ok = rows < n_rows
  col_ok = cols < d
  ok = row_ok[:, None] & col_ok[None, :]
  offs = rows[:, None] * d + cols[None, :]
  x = tl.load(X + offs, mask=ok, other=0.0)
  if HAS_R:
    x = x + tl.load(R + offs, mask=ok, other=0.0)  # in the input dtype, like ``x + r``
    tl.store(S + offs, x, mask=ok)
  xf = tl.where(ok, x.to(tl.float32), 0.0)
  total = tl.sum(xf, axis=1)
  if KIND == 0:
    mean = total / d
    xc = tl.where(ok, xf - mean[:, None], 0.0)
    mean_square = tl.sum(xc * xc, axis=1) / d
  else:
    mean = total * 0.0
    xc = xf
    squares = tl.sum(xf * xf, axis=1)
    if KIND == 2:
      mean_square = (squares + total * total) / (d + 1)
    else:
      mean_square = squares / d
  rstd = tl.rsqrt(mean_square + eps)
  y = xc * rstd[:, None]
  if ROUND_TO_X:
    y = y.to(Y.dtype.element_ty)  # "hf": round to x's dtype (which ops checked holds the result)
  if HAS_W:
    w = tl.load(W + cols, mask=col_ok, other=0.0)
    if ROUND_TO_W:
      y = y.to(w.dtype)  # "hf_legacy": round to the weight's dtype before the multiply
    y = y * w[None, :]
  if HAS_B:
    y = y + tl.load(B + cols, mask=col_ok, other=0.0)[None, :]
  tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)
  tl.store(MEAN + rows, mean, mask=row_ok)
  tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def backward_kernel(X, DY, DS, MEAN, RSTD, W, n_rows, d, rows_per_program, DX, DW, DB,
                    KIND: tl.constexpr, HAS_DS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
  program = tl.program_id(0)
  start = program * rows_per_program
  stop = tl.minimum(start + rows_per_program, n_rows)
  cols = tl.arange(0, BLOCK_D)
  col_ok = cols < d
  w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) if HAS_W else None
  dw = tl.zeros((BLOCK_D,), tl.float32)
  db = tl.zeros((BLOCK_D,), tl.float32)
  for r0 in range(start, stop, BLOCK_ROWS):
    rows = r0 + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < stop
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * d + cols[None, :]
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy * w[None, :] if HAS_W else dy
    g_xhat = tl.sum(g * xhat, axis=1)[:, None]
    if KIND == 0:
      inner = g - tl.sum(g, axis=1)[:, None] / d - xhat * (g_xhat / d)
    elif KIND == 1:
      inner = g - xhat * (g_xhat / d)
    else:
      inner = g - (xhat + tl.sum(xhat, axis=1)[:, None]) * (g_xhat / (d + 1))
    dx = inner * rstd[:, None]
    if HAS_DS:
      dx = dx + tl.load(DS + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
    if HAS_W:
      dw += tl.sum(dy * xhat, axis=0)
    if HAS_B:
      db += tl.sum(dy, axis=0)
  if HAS_W:
    tl.store(DW + program.to(tl.int64) * d + cols, dw, mask=col_ok)
  if HAS_B:
    tl.store(DB + program.to(tl.int64) * d + cols, db, mask=col_ok)


# The kernels' signatures in jax-triton's order (inputs and scalars, then outputs), as
# ``triton.compile`` wants them for a given dtype; constexprs are passed by name.
POINTERS = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}


def forward_signature(dtype: str) -> dict[str, str]:
  t = POINTERS[dtype]
  return {"X": t, "R": t, "W": "*fp32", "B": "*fp32", "n_rows": "i32", "d": "i32", "eps": "fp32",
          "Y": t, "S": t, "MEAN": "*fp32", "RSTD": "*fp32"}


def backward_signature(dtype: str) -> dict[str, str]:
  t = POINTERS[dtype]
  return {"X": t, "DY": t, "DS": t, "MEAN": "*fp32", "RSTD": "*fp32", "W": "*fp32", "n_rows": "i32",
          "d": "i32", "rows_per_program": "i32", "DX": t, "DW": "*fp32", "DB": "*fp32"}


def forward_constants(st: Static, n: int, d: int) -> tuple[dict[str, object], int]:
  """(constexprs, num_warps) of the forward for ``[n, d]`` rows: the Pallas kernel's launch rule."""
  cfg = default_config(n, d, st.config)
  return dict(KIND=KIND_IDS[st.kind], HAS_R=st.has_residual, HAS_W=st.has_weight, HAS_B=st.has_bias,
              ROUND_TO_X=st.casting == "hf", ROUND_TO_W=st.casting == "hf_legacy",
              BLOCK_ROWS=cfg.block_rows, BLOCK_D=triton.next_power_of_2(d)), cfg.num_warps


def backward_constants(st: Static, n: int, d: int) -> tuple[dict[str, object], int, int, int]:
  """(constexprs, num_warps, programs, rows per program) of the backward."""
  cfg = default_config(n, d, st.config)
  bm = cfg.bwd_block_rows
  rows_per_program = triton.cdiv(triton.cdiv(n, cfg.bwd_programs), bm) * bm  # as launch.backward
  return (dict(KIND=KIND_IDS[st.kind], HAS_DS=st.has_residual, HAS_W=st.has_weight, HAS_B=st.has_bias,
               BLOCK_ROWS=bm, BLOCK_D=triton.next_power_of_2(d)),
          cfg.bwd_num_warps, triton.cdiv(n, rows_per_program), rows_per_program)


def _jax_triton():
  if _compat.backend() not in _compat.GPU_PLATFORMS:
    raise NotImplementedError("impl='triton' runs Triton kernels through jax-triton, which needs a GPU "
                              f"(this backend is {_compat.backend()}); use impl='pallas' or 'xla'")
  try:
    import jax_triton
  except ImportError as error:
    raise NotImplementedError("impl='triton' needs jax-triton: pip install -e '.[gpu]'") from error
  return jax_triton


def check_supported(x: Array) -> None:
  """NotImplementedError unless the Triton path can run ``x [..., D]`` here."""
  _jax_triton()
  if x.shape[-1] > MAX_WIDTH:
    raise NotImplementedError(f"impl='triton' holds whole rows, up to {MAX_WIDTH} lanes; got "
                              f"D={x.shape[-1]} (impl='pallas' loops over wider rows)")


def forward(x: Array, residual: Array | None, weight: Array | None, bias: Array | None,
            st: Static) -> tuple[Array, Array | None, Array, Array]:
  """As ``launch.forward``: ``[N, D]`` rows -> (y, x + residual or None, mean [N], rstd [N])."""
  jt = _jax_triton()
  n, d = x.shape
  constants, warps = forward_constants(st, n, d)
  placeholder = x  # an operand the kernel does not read (its HAS_* constant is False)
  inputs = [x, placeholder if residual is None else residual, placeholder if weight is None else weight,
            placeholder if bias is None else bias, n, d, np.float32(st.eps)]
  s_shape = (n, d) if st.has_residual else (1,)
  y, s, mean, rstd = jt.triton_call(
      *inputs, kernel=forward_kernel, grid=(triton.cdiv(n, constants["BLOCK_ROWS"]),), num_warps=warps,
      out_shape=[jax.ShapeDtypeStruct((n, d), x.dtype), jax.ShapeDtypeStruct(s_shape, x.dtype),
                 jax.ShapeDtypeStruct((n,), F32), jax.ShapeDtypeStruct((n,), F32)], **constants)
  return y, (s if st.has_residual else None), mean, rstd


def backward(x: Array, dy: Array, ds: Array | None, mean: Array, rstd: Array, weight: Array | None,
             st: Static) -> tuple[Array, Array | None, Array | None]:
  """As ``launch.backward``: (dx [N, D], d weight [D] or None, d bias [D] or None)."""
  jt = _jax_triton()
  n, d = x.shape
  constants, warps, programs, rows_per_program = backward_constants(st, n, d)
  partial = lambda present: jax.ShapeDtypeStruct((programs, d) if present else (1,), F32)
  dx, dw, db = jt.triton_call(
      x, dy, dy if ds is None else ds, mean, rstd, x if weight is None else weight, n, d, rows_per_program,
      kernel=backward_kernel, grid=(programs,), num_warps=warps,
      out_shape=[jax.ShapeDtypeStruct((n, d), dy.dtype), partial(st.has_weight), partial(st.has_bias)],
      **constants)
  return dx, (dw.sum(0) if st.has_weight else None), (db.sum(0) if st.has_bias else None)
