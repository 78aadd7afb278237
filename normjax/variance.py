"""Weight-space variance control: initialization schemes by name, and TVR rescaling.

Init schemes give the per-layer factor on the std of each block's dense kernels, by role
(``normjax.roles``: q, k, v, o, gate, up, down for a SwiGLU MLP; q, k, v, o, fc1, fc2 for GELU). Writers
(o, down, fc2) add to the residual stream. Equations and papers: ``docs/placements.md``.

  normal    every kernel N(0, std^2)                                  (0.02 default)
  lir       block l (1-based): N(0, std^2 / l) on every block kernel  (Owen et al., arXiv:2503.17500)
  scaled    writers std / sqrt(2L)                                    (GPT-2 residual init)
  deepnorm  v, o and the MLP kernels divided by (8L)^(1/4)            (DeepNet decoder-only beta,
                                                                       torchscale's divide-after-init)

Embeddings, heads and norms keep ``std`` (LIR leaves them too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from normjax.params import Bias, Kernel, map_variables, per_layer
from normjax.roles import Role
from normjax.treeutil import path_names

InitScheme = Callable[[Role, Any, int], Any]  # (role, layer 1-based, num_layers) -> std factor

_SCHEMES: dict[str, InitScheme] = {
    "normal": lambda role, layer, num_layers: 1.0,
    "lir": lambda role, layer, num_layers: jax.lax.rsqrt(jnp.asarray(layer, jnp.float32)),
    "scaled": lambda role, layer, num_layers: (2.0 * num_layers) ** -0.5 if role.writes_stream else 1.0,
    "deepnorm": lambda role, layer, num_layers: (8.0 * num_layers) ** -0.25 if role.deepnorm_beta else 1.0,
}


def init_schemes() -> list[str]:
  return sorted(_SCHEMES)


def init_factor(scheme: str, role: Role, layer: Any, num_layers: int) -> Any:
  """The multiplier on ``init.std`` for a block kernel of ``role`` in 1-based ``layer``."""
  return _SCHEMES[scheme](role, layer, num_layers)


@dataclasses.dataclass(frozen=True)
class TVRConfig:
  """Target Variance Rescaling (bluorion-com/weight_rescaling ``callbacks/tvr.py``)."""
  every: int = 50  # optimizer steps between rescalings
  target_std: float = 0.01  # sigma_t: 0.01 in the README and headline run (the code default is 0.02)
  threshold: float = 1.2  # rescale when std / sigma_t exceeds this
  per_layer_target: bool = False  # target sigma_t / sqrt(l) instead of sigma_t


def tvr_rescale(params: nnx.State, config: TVRConfig = TVRConfig()
                ) -> tuple[nnx.State, dict[str, dict[str, jax.Array]]]:
  """Rescales every stacked block ``Kernel`` ``[L, ..., in, out]`` whose per-layer std is too large.

  For each layer l of each kernel of the stacked blocks (``normjax.params.per_layer``): if
  std / target > threshold then ``W <- (W - mean) / std * target + mean`` and the ``Bias`` of the
  same dense layer (if any) is zeroed. Mean and std are over the whole per-layer matrix (global
  under GSPMD). Embeddings, heads and norms are untouched. Call it outside ``grad`` every
  ``config.every`` steps. ``params`` is an ``nnx.State`` (types decide what is a kernel). Returns the
  new params (same structure) and, for logging, ``{"std": {kernel path: std before rescaling [L]},
  "rescaled": {kernel path: bool [L]}}``.
  """
  report = {"std": {}, "rescaled": {}}
  rescaled_layers = {}  # dense layer path -> bool [L]

  def kernel(path, var):
    if not (isinstance(var, Kernel) and per_layer(var)):
      return var
    name = path_names(path)
    w = var[...]
    wf = w.astype(jnp.float32)
    axes = tuple(range(1, w.ndim))
    mean = jnp.mean(wf, axes, keepdims=True)
    std = jnp.std(wf, axes, keepdims=True)
    target = jnp.full_like(std, config.target_std)
    if config.per_layer_target:
      layers = jnp.arange(1, w.shape[0] + 1, dtype=jnp.float32).reshape(std.shape)
      target = target * jax.lax.rsqrt(layers)
    rescale = std / target > config.threshold
    report["std"]["/".join(name)] = std.reshape(-1)
    report["rescaled"]["/".join(name)] = rescaled_layers[name[:-1]] = rescale.reshape(-1)
    return var.replace(jnp.where(rescale, (wf - mean) / std * target + mean, wf).astype(w.dtype))

  def bias(path, var):
    layer = path_names(path)[:-1]
    if not isinstance(var, Bias) or layer not in rescaled_layers:
      return var
    mask = rescaled_layers[layer].reshape((-1,) + (1,) * (var[...].ndim - 1))
    return var.replace(jnp.where(mask, jnp.zeros_like(var[...]), var[...]))

  return map_variables(bias, map_variables(kernel, params)), report
