"""Per-depth statistics beyond the forward pass (definitions: ``docs/statistics.md``).

The forward pass itself returns the activation statistics (``model(x, collect_stats=True)``):
``{attn,mlp}/{resid_var, resid_rms, max_abs, branch_rms, norm_in_rms, norm_out_rms}`` and
``attn/attn_entropy`` as ``[L]`` arrays, ``embed/...`` scalars for x_0, and ``hidden`` ``[L+1, B, w]``.
This module adds the parameter-space and ablation views:

* ``layer_grad_norms`` and ``layer_weight_std`` from a gradient / parameter ``nnx.State`` whose
  block variables carry a leading ``layers`` axis (``normjax.params.per_layer``, the layout of
  ``normjax.models``);
* ``angular_distance`` (Gromov et al., arXiv:2403.17887) from ``hidden``;
* ``removal_losses``: the loss with each block replaced by the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from normjax.data.batches import packing
from normjax.params import Kernel, per_layer, variables
from normjax.treeutil import path_names

Array = jax.Array


def layer_grad_norms(grads: nnx.State) -> Array:
  """``[L]``: sqrt of the summed squared gradient of every parameter in block l (float32)."""
  squares = [jnp.sum(jnp.square(g[...].astype(jnp.float32)).reshape(g[...].shape[0], -1), axis=1)
             for _, g in variables(grads) if per_layer(g)]
  return jnp.sqrt(sum(squares))


def layer_weight_std(params: nnx.State) -> dict[str, Array]:
  """``{path: [L]}``: std of each 2-D block kernel per layer (e.g. ``stack/blocks/attn/q/kernel``)."""
  return {"/".join(path_names(path)): jnp.std(w[...].astype(jnp.float32).reshape(w[...].shape[0], -1), 1)
          for path, w in variables(params)
          if isinstance(w, Kernel) and per_layer(w) and w[...].ndim == 3}


def angular_distance(hidden: Array) -> Array:
  """Gromov et al.'s d(l, l+n) = arccos(cos(h_l, h_{l+n})) / pi, averaged over the batch.

  ``hidden``: ``[L+1, B, w]`` (x_0 and every block output, before the final norm; the last token
  for LLaMA, the class token or patch mean for ViT). Returns ``D`` of shape ``[L+1, L+1]`` with
  ``D[l, n]`` for start layer l and block count n >= 1 (``D[l, 0] = 0``); entries with l + n > L are
  NaN. A zero vector (undefined cosine) counts as 0.5, as in the LNS repository.
  """
  h = hidden.astype(jnp.float32)
  unit = h / jnp.linalg.norm(h, axis=-1, keepdims=True)
  cos = jnp.einsum("ibd,jbd->ijb", unit, unit)  # [L+1, L+1, B]
  dist = jnp.where(jnp.isnan(cos), 0.5, jnp.arccos(jnp.clip(cos, -1.0, 1.0)) / jnp.pi).mean(-1)
  depth = h.shape[0]
  start = jnp.arange(depth)[:, None]
  span = jnp.arange(depth)[None, :]
  gathered = jnp.where(span == 0, 0.0, dist[start, jnp.minimum(start + span, depth - 1)])
  return jnp.where(start + span < depth, gathered, jnp.nan)


def removal_losses(model: nnx.Module, batch: Any, loss_fn: Callable[[Array, Any], Array]) -> Array:
  """``[L+1]``: the loss of the full model (index 0) and with block l (1..L) removed.

  ``loss_fn(logits, batch) -> scalar``; the model is called as ``model(inputs, skip_layer=l)`` with
  ``inputs = batch["inputs"]`` (and a packed batch's segment ids and positions) in eval mode. One
  compilation serves every l.
  """
  @nnx.jit
  def loss_without(model, batch, layer):
    logits, _ = model(batch["inputs"], skip_layer=layer, **packing(batch))
    return loss_fn(logits, batch)

  return jnp.stack([loss_without(model, batch, jnp.asarray(layer))
                    for layer in range(model.cfg.num_layers + 1)])
