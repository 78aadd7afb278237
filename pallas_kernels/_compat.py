"""The one place that knows which jax is installed and how Pallas-Triton is reached on it.

The Pallas Triton backend works unchanged from jax 0.10.2 to 0.12 but is deprecated from 0.11.0
(warning id ``jax-pallas-triton``); Mosaic GPU is the default GPU lowering, so Triton is selected
by passing ``pltriton.CompilerParams`` explicitly. On CPU the same kernels run in interpret mode.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import jax
import jax.experimental.pallas as pl
from jax.experimental.pallas import triton as pltriton

JAX_VERSION = jax.__version_info__
# Deprecated upstream, chosen deliberately (docs/kernels.md, "Why Pallas-Triton"): silence it here, once.
if JAX_VERSION >= (0, 11, 0):
  warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def backend() -> str:
  return jax.default_backend()


_lowering_for_gpu = False


@contextlib.contextmanager
def lowering_for_gpu() -> Iterator[None]:
  """Within: kernels are built for the GPU lowering even on a CPU host (interpret mode off), so that
  ``pallas_kernels.cuda_lowering`` can lower them for CUDA without a GPU."""
  global _lowering_for_gpu
  previous, _lowering_for_gpu = _lowering_for_gpu, True
  try:
    yield
  finally:
    _lowering_for_gpu = previous


def interpret() -> bool:
  """Interpret mode is the only way to run a Pallas kernel on CPU (and the way CI tests them)."""
  return backend() == "cpu" and not _lowering_for_gpu


def supported_backend() -> bool:
  """Pallas-Triton lowers on CUDA/ROCm GPUs and interprets on CPU; TPU has no Triton."""
  return backend() in GPU_PLATFORMS or backend() == "cpu"


def compiler_params(num_warps: int) -> pltriton.CompilerParams:
  """Triton parameters: passing them is what selects the (deprecated) Triton lowering over Mosaic."""
  return pltriton.CompilerParams(num_warps=num_warps)


def device_kind() -> str:
  """Key of the measured ``auto`` table, e.g. ``NVIDIA H100 80GB HBM3``; ``cpu`` on CPU."""
  return jax.devices()[0].device_kind if backend() != "cpu" else "cpu"


__all__ = ["pl", "pltriton", "JAX_VERSION", "backend", "interpret", "lowering_for_gpu",
           "supported_backend", "compiler_params", "device_kind"]
