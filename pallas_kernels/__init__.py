"""Fused Pallas norm kernels: LayerNorm, RMSNorm, Compressed RMSNorm, forward and one-pass backward.

  from pallas_kernels import rms_norm
  y, new_residual, stats = rms_norm(x, scale, residual=r, return_stats=True, impl="pallas")

``ops`` holds the public functions and the implementation dispatch (``xla | pallas | triton | auto``),
``kernels`` the Pallas-Triton kernel bodies, ``auto`` the measured table behind ``impl='auto'``.
Every kernel is checked against ``normjax.norms`` (tests/test_kernels.py) and runs on CPU in
interpret mode; ``benchmarks/kernels.py`` measures them on a GPU.
"""

from pallas_kernels.kernels import KernelConfig
from pallas_kernels.ops import IMPLS, Stats, crms_norm, effective_weight, layer_norm, rms_norm

__all__ = ["IMPLS", "KernelConfig", "Stats", "crms_norm", "effective_weight", "layer_norm",
           "rms_norm"]
