"""Vision Transformer: patch embedding, class token or mean pooling, learned positions, GELU MLP, head.

Same NNX design and the same ``Block``/``Stack`` as ``normjax.models.llama`` (see its docstring);
attention is bidirectional and has no RoPE.

    model = ViT(ModelConfig(name="vit", image_size=28, patch_size=4, channels=1, ...), rngs=nnx.Rngs(0))
    logits, stats = model(images)   # images [B, H, W, C] -> logits [B, num_classes]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from normjax.models import inits
from normjax.models.block import Stack
from normjax.models.config import ModelConfig
from normjax.models.layers import Dense, activation_norm, call_norm, param, reparam_kind

Array = jax.Array


def patchify(images: Array, patch: int) -> Array:
  """``[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]`` in row-major patch order."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class ViT(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    num_patches = (cfg.image_size // cfg.patch_size) ** 2
    tokens = num_patches + (cfg.pool == "cls")
    common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs, use_bias=cfg.use_bias,
                  weight_norm=reparam_kind(cfg))
    init = inits.vit_inits(cfg)
    self.patch_embed = Dense(cfg.patch_size ** 2 * cfg.channels, cfg.width, (None, "embed"),
                             init=init["patch"], **common)
    # the class token's position is the first row, as HF's ViT stores it
    self.position = param(rngs, (tokens, cfg.width), init["position"], cfg.param_dtype,
                          (None, "embed"))
    self.cls = (param(rngs, (cfg.width,), init["cls"], cfg.param_dtype, ("embed",))
                if cfg.pool == "cls" else None)
    if self.cls is not None and init["cls_position"].rule == "zeros":
      self.position[...] = self.position[...].at[0].set(0.0)
    self.embed_norm = activation_norm(cfg, "embed", rngs) if cfg.placement.embed_norm else None
    self.stack = Stack(cfg, rngs)
    self.final_norm = activation_norm(cfg, "final", rngs) if cfg.placement.final_norm else None
    self.head = Dense(cfg.width, cfg.num_classes, ("embed", None), init=init["head"], **common)

  def summarize(self, h: Array) -> Array:
    """The per-image vector of a token sequence: the class token, or the mean of the patches."""
    return h[:, 0] if self.cls is not None else h.mean(axis=1)

  def __call__(self, images: Array, *, train: bool = False, collect_stats: bool = False,
               skip_layer: Any = None) -> tuple[Array, dict[str, Array]]:
    """``images [B, H, W, C] -> (logits [B, classes] float32, stats)``.

    ``stats['hidden']`` is ``[L+1, B, w]``: ``summarize`` of x_0 and of every block output.
    """
    cfg = self.cfg
    x = self.patch_embed(patchify(images.astype(cfg.dtype), cfg.patch_size), train=train)
    if self.cls is not None:
      cls = jnp.broadcast_to(self.cls[...].astype(cfg.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.position[...].astype(cfg.dtype)
    if cfg.zero_mean_writers:  # = centring the patch kernel, positions and class token
      x = x - jnp.mean(x, -1, keepdims=True)
    x = call_norm(self.embed_norm, x, train=train)
    h, stats = self.stack(x, train=train, collect_stats=collect_stats, skip_layer=skip_layer,
                          summarize=self.summarize)
    h = self.summarize(call_norm(self.final_norm, h, train=train))
    return self.head(h, train=train).astype(jnp.float32), stats
