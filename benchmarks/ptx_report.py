"""Registers and spills of every kernel compiled for Hopper (sm_90a), on a machine without a GPU.

    python benchmarks/ptx_report.py [--widths=1000,1024,4096,8192,16384,65536] [--dtypes=bfloat16]

Each op's forward and backward (gain, bias for layer_norm, fused residual or not, 37 rows) is
lowered for CUDA by the real Pallas-Triton lowering (``pallas_kernels.cuda_lowering``), compiled
by the ``triton`` package to PTX and a cubin, and ``ptxas -v`` reports registers per thread and
spilled bytes. Prints one markdown table (as recorded in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import triton

import pallas_kernels
from pallas_kernels import cuda_lowering, kernels


def kernels_of(kind: str, dtype: str, width: int, residual: bool) -> list[cuda_lowering.TritonKernel]:
  """The forward and backward kernels of one op and option set, lowered for CUDA."""
  op = getattr(pallas_kernels, kind)
  bias = kind == "layer_norm"

  def grads(x, scale, b, r):
    def loss(x, scale, b, r):
      out = op(x, scale, b if bias else None, residual=r if residual else None, impl="pallas")
      y = out[0] if residual else out
      return jnp.sum(y.astype(jnp.float32) ** 2) + (jnp.sum(out[1].astype(jnp.float32)) if residual else 0)
    return jax.grad(loss, argnums=(0, 1, 2, 3))(x, scale, b, r)
  x = jax.ShapeDtypeStruct((37, width), jnp.dtype(dtype))
  param = jax.ShapeDtypeStruct((width,), jnp.float32)
  return cuda_lowering.lower(grads, x, param, param, x)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", default="1000,1024,4096,8192,16384,65536")
  parser.add_argument("--dtypes", default="bfloat16")
  args = parser.parse_args()
  widths = [int(w) for w in args.widths.split(",")]
  print(f"jax {jax.__version__}, triton {triton.__version__}, sm_{cuda_lowering.HOPPER}a; whole rows up "
        f"to {kernels.WHOLE_ROW} lanes, wider rows in blocks of {kernels.WIDE_BLOCK_COLS} columns\n")
  print("| kernel | dtype | D | residual | warps | registers | spill stores B | spill loads B | stack B |")
  print("|---|---|---|---|---|---|---|---|---|")
  for kind, dtype, width, residual in itertools.product(pallas_kernels.KINDS, args.dtypes.split(","),
                                                        widths, (False, True)):
    for kernel in kernels_of(kind, dtype, width, residual):
      c = cuda_lowering.compile_for_hopper(kernel)
      print(f"| {kernel.name} | {dtype} | {width} | {'yes' if residual else 'no'} | {kernel.num_warps} | "
            f"{c.registers} | {c.spill_stores} | {c.spill_loads} | {c.stack_frame} |")


if __name__ == "__main__":
  main()
