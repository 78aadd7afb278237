"""Weight-space variance control: initialization schemes by name, and TVR rescaling.

Init schemes give the per-layer factor on the std of each block's dense kernels, by role
(q, k, v, o, gate, up, down for LLaMA; q, k, v, o, fc1, fc2 for ViT). Writers (o, down, fc2) add
to the residual stream.

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

from normjax.treeutil import path_names

WRITERS = ("o", "down", "fc2")
DEEPNORM_ROLES = ("v", "o", "gate", "up", "down", "fc1", "fc2")

InitScheme = Callable[[str, Any, int], Any]  # (role, layer 1-based, num_layers) -> std factor

_SCHEMES: dict[str, InitScheme] = {
    "normal": lambda role, layer, num_layers: 1.0,
    "lir": lambda role, layer, num_layers: jax.lax.rsqrt(jnp.asarray(layer, jnp.float32)),
    "scaled": lambda role, layer, num_layers: (2.0 * num_layers) ** -0.5 if role in WRITERS else 1.0,
    "deepnorm": lambda role, layer, num_layers: (8.0 * num_layers) ** -0.25 if role in DEEPNORM_ROLES else 1.0,
}


def init_schemes() -> list[str]:
  return sorted(_SCHEMES)


def init_factor(scheme: str, role: str, layer: Any, num_layers: int) -> Any:
  """The multiplier on ``init.std`` for a block kernel of ``role`` in 1-based ``layer``."""
  return _SCHEMES[scheme](role, layer, num_layers)


@dataclasses.dataclass(frozen=True)
class TVRConfig:
  """Target Variance Rescaling (bluorion-com/weight_rescaling ``callbacks/tvr.py``)."""
  every: int = 50  # optimizer steps between rescalings
  target_std: float = 0.01  # sigma_t: 0.01 in the README and headline run (the code default is 0.02)
  threshold: float = 1.2  # rescale when std / sigma_t exceeds this
  per_layer_target: bool = False  # target sigma_t / sqrt(l) instead of sigma_t


def tvr_rescale(params: Any, config: TVRConfig = TVRConfig()) -> tuple[Any, dict[str, dict[str, jax.Array]]]:
  """Rescales every stacked block kernel ``[L, ..., in, out]`` whose per-layer std is too large.

  For each layer l of each kernel under ``blocks``: if std / target > threshold then
  ``W <- (W - mean) / std * target + mean`` and the kernel's bias (if any) is zeroed. Mean and std
  are over the whole per-layer matrix (global under GSPMD). Embeddings, heads and norms are
  untouched. Call it outside ``grad`` every ``config.every`` steps. Returns the new params (same
  structure) and, for logging, ``{"std": {kernel path: std before rescaling [L]},
  "rescaled": {kernel path: bool [L]}}``.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [path_names(path) for path, _ in leaves]
  values = [leaf for _, leaf in leaves]
  report = {"std": {}, "rescaled": {}}
  rescaled_layers = {}
  for i, (name, w) in enumerate(zip(names, values)):
    if "blocks" not in name or name[-1] != "kernel" or w.ndim < 3:
      continue
    wf = w.astype(jnp.float32)
    axes = tuple(range(1, w.ndim))
    mean = jnp.mean(wf, axes, keepdims=True)
    std = jnp.std(wf, axes, keepdims=True)
    target = jnp.full_like(std, config.target_std)
    if config.per_layer_target:
      layers = jnp.arange(1, w.shape[0] + 1, dtype=jnp.float32).reshape(std.shape)
      target = target * jax.lax.rsqrt(layers)
    rescale = std / target > config.threshold
    values[i] = jnp.where(rescale, (wf - mean) / std * target + mean, wf).astype(w.dtype)
    report["std"]["/".join(name)] = std.reshape(-1)
    report["rescaled"]["/".join(name)] = rescaled_layers[name[:-1]] = rescale.reshape(-1)
  for i, name in enumerate(names):
    if name[-1] == "bias" and name[:-1] in rescaled_layers:
      mask = rescaled_layers[name[:-1]].reshape((-1,) + (1,) * (values[i].ndim - 1))
      values[i] = jnp.where(mask, jnp.zeros_like(values[i]), values[i])
  return jax.tree_util.tree_unflatten(treedef, values), report
