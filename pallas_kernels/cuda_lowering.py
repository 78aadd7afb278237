"""The kernels lowered for CUDA on a machine without a GPU, and the Triton IR that lowering produced.

Interpret mode (how the kernels run on CPU) pads out-of-bounds reads and drops out-of-bounds
writes, so it cannot show a missing mask. ``lower`` runs the real Pallas-Triton lowering instead:
``jax.export`` for ``platforms=["cuda"]`` with interpret mode off, under an abstract H100
(``jax.sharding.AbstractDevice``, how jax >= 0.11 is told the target GPU; jax 0.10 falls back to
compute capability 9.0 by itself). Each ``pallas_call`` becomes a custom call whose backend config
carries the kernel's Triton module as MLIR bytecode; ``TritonKernel.asm`` is that module as text,
``unmasked_accesses`` the global loads and stores in it without a mask.

``compile_for_hopper`` takes one step further, still without a GPU: the ``triton`` package from PyPI
(the ``ptx`` extra) compiles the Triton IR to PTX and a cubin for sm_90a, and ``ptxas -v`` (shipped
with it) reports registers per thread and spilled bytes.

The private imports (the Triton dialect bundled with jaxlib, jax's MLIR context) are confined here.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

import jax
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib import triton as jaxlib_triton
from jax._src.lib.mlir import ir

from pallas_kernels import _compat

TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
TARGET = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")


@dataclasses.dataclass(frozen=True)
class TritonKernel:
  """One ``pallas_call`` as lowered for CUDA."""
  name: str
  asm: str  # the Triton (tt dialect) module as text
  bytecode: bytes  # the same module as MLIR bytecode (what ``triton.compile`` reads)
  grid: tuple[int, int, int]
  num_warps: int
  num_stages: int


def lower(fn: Callable[..., Any], *args: Any) -> list[TritonKernel]:
  """The Triton kernels of ``jax.jit(fn)(*args)`` (``args`` may be ``ShapeDtypeStruct``) lowered
  for CUDA, in program order."""
  mesh = jax.sharding.AbstractMesh((1,), ("lowering",), abstract_device=TARGET)
  with _compat.lowering_for_gpu(), jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)])(*args)
  context = jax_mlir.make_ir_context()
  jaxlib_triton.dialect.register_dialect(context)
  with context:
    module = ir.Module.parse(exported.mlir_module())
    return [_kernel(op) for op in _custom_calls(module.operation)]


def _custom_calls(op: Any) -> list[Any]:
  found = []
  for region in op.regions:
    for block in region.blocks:
      for inner in block.operations:
        if inner.name == "stablehlo.custom_call" and \
            ir.StringAttr(inner.attributes["call_target_name"]).value == TRITON_CUSTOM_CALL:
          found.append(inner)
        found += _custom_calls(inner)
  return found


def _kernel(op: Any) -> TritonKernel:
  config = op.attributes["mhlo.backend_config"]
  bytecode = ir.StringAttr(config["ir"]).value_bytes
  asm = ir.Module.parse(bytecode).operation.get_asm()
  number = lambda key: ir.IntegerAttr(config[key]).value
  name = re.search(r"tt\.func public @(\w+)", asm)
  return TritonKernel(ir.StringAttr(config["name"]).value if "name" in config else name[1], asm, bytecode,
                      (number("grid_x"), number("grid_y"), number("grid_z")), number("num_warps"),
                      number("num_stages"))


_ACCESS = re.compile(r"(?:%\S+ = )?tt\.(load|store) ([^:]+) : (tensor<[^>]*>)")


def unmasked_accesses(kernel: TritonKernel) -> list[str]:
  """The block (tensor-of-pointer) loads and stores of ``kernel`` that carry no mask: a load with one
  operand (the pointers) or a store with two (pointers, value). Each such access reads or writes
  every lane of its block, in bounds or not."""
  out = []
  for line in kernel.asm.splitlines():
    match = _ACCESS.search(line)
    if match:
      op, operands, _ = match.groups()
      if len(operands.split(",")) == (1 if op == "load" else 2):
        out.append(line.strip())
  return out


HOPPER = 90  # compute capability of the H100/H200; ptxas target sm_90a


@dataclasses.dataclass(frozen=True)
class Cubin:
  """A kernel compiled for sm_90a, with what ``ptxas -v`` reports about it."""
  name: str
  ptx: str
  cubin: bytes
  registers: int  # per thread
  spill_stores: int  # bytes per thread
  spill_loads: int
  stack_frame: int


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
                    r"(?:.|\n)*?Used (\d+) registers")


def compile_for_hopper(kernel: TritonKernel) -> Cubin:
  """PTX and cubin of ``kernel`` for sm_90a by ``triton.compile`` (no driver needed), with registers
  and spills from ``ptxas -v``. Needs the ``triton`` package (in the ``dev`` extra)."""
  with tempfile.TemporaryDirectory() as tmp:
    source = pathlib.Path(tmp) / f"{kernel.name}.ttir"
    source.write_text(kernel.asm)  # text, not bytecode: jaxlib's and triton's MLIR versions differ
    return _compile(str(source), kernel.name, kernel.num_warps, kernel.num_stages)


def compile_source_for_hopper(fn: Any, signature: dict[str, str], constexprs: dict[str, Any],
                              num_warps: int, name: str) -> Cubin:
  """The same for a ``@triton.jit`` function (``triton_kernels``) specialized to ``signature``
  (``{"X": "*bf16", "n": "i32", ...}``) and ``constexprs``."""
  from triton.compiler import ASTSource
  signature = {**signature, **{key: "constexpr" for key in constexprs}}
  return _compile(ASTSource(fn, signature, constexprs), name, num_warps, 3)


def _compile(source: Any, name: str, num_warps: int, num_stages: int) -> Cubin:
  try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
  except ImportError as error:
    raise ImportError("compiling for sm_90a needs the triton package: pip install -e '.[dev]'") from error
  compiled = triton.compile(source, target=GPUTarget("cuda", HOPPER, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
  with tempfile.TemporaryDirectory() as tmp:
    ptx = pathlib.Path(tmp) / f"{name}.ptx"
    ptx.write_text(compiled.asm["ptx"])
    report = subprocess.run([get_ptxas(HOPPER).path, "-v", f"--gpu-name=sm_{HOPPER}a", str(ptx), "-o",
                             str(ptx.with_suffix(".cubin"))], capture_output=True, text=True, check=True)
  match = _PTXAS.search(report.stdout + report.stderr)
  if match is None:
    raise RuntimeError(f"unexpected ptxas -v output for {name}:\n{report.stdout}{report.stderr}")
  stack, stores, loads, registers = map(int, match.groups())
  return Cubin(name, compiled.asm["ptx"], compiled.asm["cubin"], registers, stores, loads, stack)
