"""Fused Pallas norm kernels (forward and one-pass backward) for GPU and TPU.

Each kernel is checked against the XLA reference in ``normjax.norms`` and runs on CPU in Pallas
interpret mode. The kernels themselves arrive with the Pallas-kernels issue; this package is
importable now so that configs and tests can name it.
"""
