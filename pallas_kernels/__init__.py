"""Fused Pallas norm kernels: LayerNorm, RMSNorm, Compressed RMSNorm, forward and one-pass backward.

  from pallas_kernels import rms_norm
  y, new_residual, stats = rms_norm(x, scale, residual=r, return_stats=True, impl="pallas")

``ops`` holds the public functions and the implementation dispatch (``xla | pallas | triton | auto``),
``kernels`` the Pallas-Triton kernel bodies for whole rows, ``wide`` those for rows looped over in
column blocks, ``launch`` the ``pallas_call`` builders, ``auto`` the measured table behind
``impl='auto'``, and ``cuda_lowering`` the CUDA lowering and sm_90a compilation that check the
kernels on a machine without a GPU.
The package builds on ``normjax.norms`` (which never imports it): every kernel is checked against
that XLA reference (tests/test_kernels.py) and runs on CPU in interpret mode;
``benchmarks/kernels.py`` measures them on a GPU. Design: ``docs/kernels.md``.
"""

from pallas_kernels.kernels import KernelConfig
from pallas_kernels.ops import IMPLS, KINDS, Stats, crms_norm, effective_weight, layer_norm, rms_norm

__all__ = ["IMPLS", "KINDS", "KernelConfig", "Stats", "crms_norm", "effective_weight", "layer_norm",
           "rms_norm"]
