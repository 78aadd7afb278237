"""Column-blocked kernel bodies for rows wider than ``kernels.WHOLE_ROW`` lanes.

A whole 16384-lane row in registers needs 255 registers per thread and spills; a 65536-lane row
spills kilobytes per thread. These kernels hold one block of ``bc`` columns at a time and loop over
the row instead, with the same math, masks and outputs as the whole-row kernels (``kernels.py``):

forward, per block of ``bm`` rows:
  1. over the column blocks: ``s = x (+ r)`` (written out when fused), float32 sums of ``s`` and
     ``s^2``;
  2. layer_norm only, again over the blocks: the centred sum of squares ``sum((s - mean)^2)``,
     as the whole-row kernel computes the variance (two-pass, not ``E[s^2] - mean^2``);
  3. over the blocks: ``y = (s - mean) * rstd * w + b``.

backward, per program (a contiguous slab of rows, as in the whole-row kernel):
  1. row tiles x column blocks: the per-row sums the input gradient needs (``kernels.ROW_SUMS``),
     written to small ``[N]`` float32 scratch outputs; then a barrier, since the next pass reads
     them back on other threads;
  2. column blocks x row tiles: ``dx`` of each block, and the block's weight and bias partial
     sums accumulated over the slab's rows in registers, written once per block.

Passes re-read ``x`` (and ``r``) instead of keeping them: rows this wide do not fit in registers,
and the re-reads of a row just read come from L2. Sums over blocks are accumulated in float32 in
block order, so results equal the whole-row kernels' to float32 rounding.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import interpret, pl, pltriton
from pallas_kernels.kernels import (F32, ROW_SUMS, Static, affine, backward_refs, forward_refs,
                                    input_gradient, row_sums)


def _columns(j, bc: int, d: int):
  """Column block ``j``: its ``pl.ds`` and the mask of its columns inside ``D``."""
  return pl.ds(j * bc, bc), j * bc + jnp.arange(bc) < d


def forward_kernel(*refs, st: Static, n: int, d: int, bm: int, bc: int):
  r = forward_refs(refs, st)
  r0 = pl.program_id(0) * bm
  row_ok = r0 + jnp.arange(bm) < n
  blocks = pl.cdiv(d, bc)

  def block(j):  # s of column block j in the input dtype, and its mask
    cols, col_ok = _columns(j, bc, d)
    ok = row_ok[:, None] & col_ok[None, :]
    s = pltriton.load(r.x.at[pl.ds(r0, bm), cols], mask=ok, other=0.0)
    if r.residual is not None:
      s = s + pltriton.load(r.residual.at[pl.ds(r0, bm), cols], mask=ok, other=0.0)
    return s, ok, cols, col_ok

  def sums(j, acc):
    s, ok, cols, _ = block(j)
    if r.s is not None:
      pltriton.store(r.s.at[pl.ds(r0, bm), cols], s, mask=ok)
    sf = jnp.where(ok, s.astype(F32), 0.0)
    return acc[0] + jnp.sum(sf, axis=1), acc[1] + jnp.sum(sf * sf, axis=1)

  zeros = jnp.zeros((bm,), F32)
  total, squares = lax.fori_loop(0, blocks, sums, (zeros, zeros))
  if st.kind == "layer_norm":
    mean = total / d

    def centred(j, acc):
      s, ok, _, _ = block(j)
      sc = jnp.where(ok, s.astype(F32) - mean[:, None], 0.0)
      return acc + jnp.sum(sc * sc, axis=1)
    mean_square = lax.fori_loop(0, blocks, centred, zeros) / d
  else:
    mean = zeros
    mean_square = (squares + total * total) / (d + 1) if st.kind == "crms_norm" else squares / d
  rstd = lax.rsqrt(mean_square + st.eps)

  def write(j, carry):
    s, ok, cols, col_ok = block(j)
    xhat = jnp.where(ok, s.astype(F32) - mean[:, None], 0.0) * rstd[:, None]
    y = affine(xhat, r, cols, col_ok, st.casting)
    pltriton.store(r.y.at[pl.ds(r0, bm), cols], y.astype(r.y.dtype), mask=ok)
    return carry

  lax.fori_loop(0, blocks, write, 0)
  pltriton.store(r.mean.at[pl.ds(r0, bm)], mean, mask=row_ok)
  pltriton.store(r.rstd.at[pl.ds(r0, bm)], rstd, mask=row_ok)


def backward_kernel(*refs, st: Static, n: int, d: int, rows_per_program: int, bm: int, bc: int):
  names = ROW_SUMS[st.kind]
  r = backward_refs(refs, st, num_row_sums=len(names))
  program = pl.program_id(0)
  start = program * rows_per_program
  stop = jnp.minimum(start + rows_per_program, n)
  tiles, blocks = rows_per_program // bm, pl.cdiv(d, bc)

  def tile(t, j):  # g, xhat, dy of (row tile t, column block j), float32, zero outside
    r0 = start + t * bm
    row_ok = r0 + jnp.arange(bm) < stop
    cols, col_ok = _columns(j, bc, d)
    ok = row_ok[:, None] & col_ok[None, :]
    load = lambda ref: pltriton.load(ref.at[pl.ds(r0, bm), cols], mask=ok, other=0.0).astype(F32)
    mean = pltriton.load(r.mean.at[pl.ds(r0, bm)], mask=row_ok, other=0.0)
    rstd = pltriton.load(r.rstd.at[pl.ds(r0, bm)], mask=row_ok, other=0.0)
    dy = load(r.dy)
    xhat = jnp.where(ok, (load(r.x) - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if r.weight is not None:
      g = dy * pltriton.load(r.weight.at[cols], mask=col_ok, other=0.0).astype(F32)[None, :]
    return g, xhat, dy, rstd, (r0, row_ok, cols, col_ok, ok, load)

  def row_pass(t, carry):
    def over_blocks(j, acc):
      g, xhat, _, _, _ = tile(t, j)
      part = row_sums(st.kind, g, xhat)
      return {name: acc[name] + part[name] for name in names}
    acc = lax.fori_loop(0, blocks, over_blocks, {name: jnp.zeros((bm,), F32) for name in names})
    r0 = start + t * bm
    row_ok = r0 + jnp.arange(bm) < stop
    for name, ref in zip(names, r.row_sums):
      pltriton.store(ref.at[pl.ds(r0, bm)], acc[name], mask=row_ok)
    return carry

  lax.fori_loop(0, tiles, row_pass, 0)
  if not interpret():  # interpret mode has no threads (and no barrier)
    pltriton.debug_barrier()  # the sums were stored by other threads of this program

  def column_pass(j, carry):
    def over_tiles(t, acc):
      g, xhat, dy, rstd, (r0, row_ok, cols, _, ok, load) = tile(t, j)
      sums = {name: pltriton.load(ref.at[pl.ds(r0, bm)], mask=row_ok, other=0.0)
              for name, ref in zip(names, r.row_sums)}
      dx = input_gradient(st.kind, g, xhat, sums, rstd, d)
      if r.ds is not None:
        dx = dx + load(r.ds)
      pltriton.store(r.dx.at[pl.ds(r0, bm), cols], dx.astype(r.dx.dtype), mask=ok)
      terms = {"dw": lambda: jnp.sum(dy * xhat, axis=0), "db": lambda: jnp.sum(dy, axis=0)}
      return {name: total + terms[name]() for name, total in acc.items()}
    partials = {name: ref for name, ref in (("dw", r.dw), ("db", r.db)) if ref is not None}
    acc = lax.fori_loop(0, tiles, over_tiles, {name: jnp.zeros((bc,), F32) for name in partials})
    cols, col_ok = _columns(j, bc, d)
    for name, ref in partials.items():
      pltriton.store(ref.at[program, cols], acc[name], mask=col_ok)
    return carry

  lax.fori_loop(0, blocks, column_pass, 0)
