"""The kernels as a GPU would run them, checked on CPU: every kernel lowered for CUDA by the real
Pallas-Triton lowering (interpret mode off), its Triton IR inspected, then compiled to PTX and a
cubin for sm_90a by the ``triton`` package (no GPU or driver needed). Interpret mode pads
out-of-bounds reads and drops out-of-bounds writes, so only this shows a missing mask: the old
forward's (bm, next_pow2(D)) block specs stored each row's padding over the next row's first
columns and past the end of the buffer, while every interpret-mode test passed."""

from __future__ import annotations

import itertools

import jax
import jax.experimental.pallas as pl
import jax.numpy as jnp
import pytest

import pallas_kernels
from pallas_kernels import KernelConfig, cuda_lowering, kernels
from pallas_kernels._compat import compiler_params

WIDTHS = (1000, 1024, 4096, 8192, 16384)
DTYPES = ("float32", "bfloat16", "float16")
ROWS = 37  # ragged for every block size the heuristics pick


def _fwd_and_bwd(kind: str, residual: bool):
  op = getattr(pallas_kernels, kind)

  def loss(x, scale, bias, r):
    out = op(x, scale, bias, residual=r if residual else None, return_stats=True, impl="pallas")
    y, *rest = out
    total = jnp.sum(y.astype(jnp.float32) ** 2)
    return total + (jnp.sum(rest[0].astype(jnp.float32)) if residual else 0.0)
  return jax.grad(loss, argnums=(0, 1, 2, 3) if residual else (0, 1, 2))


@pytest.mark.parametrize("kind,dtype,width,residual", [
    (kind, dtype, width, residual) for kind, dtype, width, residual in
    itertools.product(pallas_kernels.KINDS, DTYPES, WIDTHS, (False, True))])
def test_every_block_load_and_store_of_every_kernel_is_masked(kind, dtype, width, residual):
  x = jax.ShapeDtypeStruct((ROWS, width), jnp.dtype(dtype))
  param = jax.ShapeDtypeStruct((width,), jnp.float32)
  kernels = cuda_lowering.lower(_fwd_and_bwd(kind, residual), x, param, param, x)
  assert [k.name for k in kernels] == [f"{kind}_fwd", f"{kind}_bwd"]
  for kernel in kernels:
    assert "tt.store" in kernel.asm and "tt.load" in kernel.asm
    assert cuda_lowering.unmasked_accesses(kernel) == [], kernel.name
    # ... and compiled to PTX and a cubin for sm_90a, with nothing spilled
    cubin = cuda_lowering.compile_for_hopper(kernel)
    assert cubin.cubin and ".target sm_90a" in cubin.ptx
    assert (cubin.spill_stores, cubin.spill_loads) == (0, 0), (kernel.name, cubin)


def test_the_widest_rows_compile_without_spilling():
  """65536 lanes, the widest the kernels accept: whole rows in registers spilled 12-18 KB per
  thread; rows looped over in column blocks spill nothing."""
  x = jax.ShapeDtypeStruct((ROWS, 65536), jnp.bfloat16)
  param = jax.ShapeDtypeStruct((65536,), jnp.float32)
  for kernel in cuda_lowering.lower(_fwd_and_bwd("layer_norm", True), x, param, param, x):
    cubin = cuda_lowering.compile_for_hopper(kernel)
    assert (cubin.spill_stores, cubin.spill_loads, cubin.stack_frame) == (0, 0, 0), kernel.name
    assert cubin.registers <= 128, (kernel.name, cubin.registers)


def test_the_check_finds_the_unmasked_block_of_a_block_spec_kernel():
  """What the old forward did: a (4, 1024) block spec over [10, 1000] rows, copied. The check must
  report its load and its store (else the test above could not fail)."""
  def copy(x):
    def body(x_ref, y_ref):
      y_ref[...] = x_ref[...]
    spec = pl.BlockSpec((4, 1024), lambda i: (i, 0))
    return pl.pallas_call(body, grid=(3,), in_specs=[spec], out_specs=spec, name="copy",
                          out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          compiler_params=compiler_params(4))(x)
  [kernel] = cuda_lowering.lower(copy, jax.ShapeDtypeStruct((10, 1000), jnp.float32))
  unmasked = cuda_lowering.unmasked_accesses(kernel)
  assert any("tt.load" in line for line in unmasked) and any("tt.store" in line for line in unmasked)
  assert all("tensor<4x1024x!tt.ptr<f32>>" in line for line in unmasked)


def test_launch_settings_are_validated_where_they_are_built():
  for field, value in [("block_rows", 3), ("num_warps", 6), ("bwd_block_rows", 0), ("bwd_num_warps", 64)]:
    with pytest.raises(ValueError, match=rf"KernelConfig.{field}={value}"):
      KernelConfig(**{field: value})
  with pytest.raises(ValueError, match=r"KernelConfig.bwd_programs=0 must be a positive int"):
    KernelConfig(bwd_programs=0)
  with pytest.raises(ValueError, match=r"KernelConfig.block_rows=512 rows of 4096 columns exceed 1048576"):
    pallas_kernels.rms_norm(jnp.ones((4, 4096)), impl="pallas", config=KernelConfig(block_rows=512))


def test_int32_offsets_are_refused_before_they_overflow():
  big = jax.ShapeDtypeStruct((2**17, 2**14), jnp.bfloat16)  # 2**31 elements, abstract: nothing allocated
  with pytest.raises(NotImplementedError, match=r"int32 offsets: 2147483648 elements .* reach 2\*\*31"):
    jax.eval_shape(lambda x: pallas_kernels.rms_norm(x, impl="pallas"), big)
  assert jax.eval_shape(lambda x: pallas_kernels.rms_norm(x, impl=("pallas", "xla")), big).shape == big.shape


# ---------------------------------------------------------------------------- impl="triton"
@pytest.mark.parametrize("kind,dtype,width,residual", [
    (kind, dtype, width, residual) for kind, dtype, width, residual in
    itertools.product(pallas_kernels.KINDS, ("float32", "bfloat16"), (1000, 1024, 4096), (False, True))])
def test_the_triton_language_kernels_compile_for_hopper_without_spills(kind, dtype, width, residual):
  """``impl='triton'``'s kernels (jax-triton runs them on a GPU only) compiled for sm_90a on CPU,
  specialized exactly as ``triton_kernels.forward``/``backward`` launch them."""
  from pallas_kernels import triton_kernels as tk
  st = kernels.Static(kind, 1e-6, "f32", True, kind == "layer_norm", residual, KernelConfig(), "triton")
  fwd, fwd_warps = tk.forward_constants(st, ROWS, width)
  bwd, bwd_warps, _, _ = tk.backward_constants(st, ROWS, width)
  for fn, signature, constants, warps, name in [
      (tk.forward_kernel, tk.forward_signature(dtype), fwd, fwd_warps, f"{kind}_fwd"),
      (tk.backward_kernel, tk.backward_signature(dtype), bwd, bwd_warps, f"{kind}_bwd")]:
    cubin = cuda_lowering.compile_source_for_hopper(fn, signature, constants, warps, name)
    assert cubin.cubin and ".target sm_90a" in cubin.ptx
    assert (cubin.spill_stores, cubin.spill_loads) == (0, 0), (name, cubin.registers)


def test_impl_triton_needs_a_gpu_and_falls_through_to_the_next_impl():
  x = jnp.ones((3, 128))
  with pytest.raises(NotImplementedError, match=r"impl='triton' runs Triton kernels through jax-triton, "
                                                r"which needs a GPU \(this backend is cpu\)"):
    pallas_kernels.rms_norm(x, impl="triton")
  fallback = pallas_kernels.rms_norm(x, impl=("triton", "xla"))
  assert jnp.allclose(fallback, pallas_kernels.rms_norm(x, impl="xla"))
