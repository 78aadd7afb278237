"""Functional norm transforms and the norm registry.

Pure functions with explicit parameters and state; statistics in float32 (float64 for float64
inputs), eps inside the square root, results in the input dtype. ``get(name)`` / ``names()`` give
the registry used by the Flax wrappers (``normjax.nn``) and by model configs.
"""

from normjax.norms import kinds  # noqa: F401  (registers the built-in kinds)
from normjax.norms.batch import batch_channel_norm, batch_norm, evonorm_b0, evonorm_s0
from normjax.norms.power import power_norm, power_norm_init_state
from normjax.norms.registry import (SITES, NormSpec, Options, aliases, get, logical_axes, names, register,
                                    update_backward_state)
from normjax.norms.standard import (compress, crms_norm, decompress, dyt, dyt_llm_options, fixed_norm,
                                    fixed_norm_std, group_norm, identity, l2_norm, layer_norm, rms_norm,
                                    token_std)
from normjax.norms.weight import (sigma_reparam, sigma_reparam_init, spectral_norm_estimate,
                                  weight_standardize)
from normjax.norms.unified import unified_norm, unified_norm_init_state

__all__ = [
    "SITES", "NormSpec", "Options", "aliases", "get", "logical_axes", "names", "register",
    "layer_norm", "rms_norm", "crms_norm", "compress", "decompress", "l2_norm", "dyt", "dyt_llm_options",
    "fixed_norm", "fixed_norm_std", "token_std", "identity", "group_norm", "batch_norm", "batch_channel_norm",
    "evonorm_b0", "evonorm_s0", "power_norm", "power_norm_init_state",
    "unified_norm", "unified_norm_init_state", "update_backward_state",
    "weight_standardize", "sigma_reparam", "sigma_reparam_init", "spectral_norm_estimate",
]
