"""The causal decoders: LLaMA (RoPE attention with optional GQA, SwiGLU MLP) and GPT-2 (learned
absolute positions, tanh-GELU MLP, biases, LayerNorm, tied head), one class for both: the family only
sets defaults (``ModelConfig.positions``, ``mlp``, ``dense_bias``), and every switch combines with
every norm and placement.

Flax NNX (Flax's recommended API): modules are plain Python objects holding their parameters, so
the norm, the placement and the per-layer init are ordinary constructor arguments, stacked layers
come from ``nnx.vmap`` and depth runs under ``nnx.scan``; ``nnx.split``/``nnx.merge`` give the
pure (graphdef, state) pair the training loop jits and shards.

    model = Llama(ModelConfig(name="llama", norm=NormConfig("rms_norm"), ...), rngs=nnx.Rngs(0))
    logits, stats = model(tokens, collect_stats=True)   # tokens [B, T] int -> logits [B, T, V]
    logits, _ = model(tokens, segment_ids=ids, positions=pos)   # packed documents [B, T] each
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from normjax.models.block import Stack
from normjax.models.config import ModelConfig
from normjax.models.layers import (Dense, Init, Segments, activation_norm, call_norm, fixed_readers, param,
                                   reparam_kind)
from normjax.params import Scalar

Array = jax.Array


class Llama(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = Init(cfg.init.std)  # the decoders' reference init (normjax.models.inits)
    self.embed = param(rngs, (cfg.vocab_size, cfg.width), init, cfg.param_dtype, ("vocab", "embed"))
    self.position = (param(rngs, (cfg.max_positions, cfg.width), init, cfg.param_dtype,
                           (None, "embed")) if cfg.position_kind == "learned" else None)
    self.embed_scale = (Scalar(jnp.asarray(cfg.d_model ** 0.5, cfg.param_dtype), out_sharding=(),
                               eager_sharding=False) if cfg.embed_scale else None)
    self.embed_norm = activation_norm(cfg, "embed", rngs) if cfg.placement.embed_norm else None
    self.stack = Stack(cfg, rngs)
    self.final_norm = (activation_norm(cfg, "final", rngs, fixed=fixed_readers(cfg, {"main": "final"}))
                       if cfg.placement.final_norm else None)
    self.head = None if cfg.tie_embeddings else Dense(
        cfg.width, cfg.vocab_size, ("embed", "vocab"), init=init, use_bias=cfg.use_bias,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs, weight_norm=reparam_kind(cfg))

  def __call__(self, tokens: Array, *, train: bool = False, collect_stats: bool = False,
               skip_layer: Any = None, segment_ids: Array | None = None,
               positions: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """``tokens [B, T] -> (logits [B, T, V] float32, stats)``; stats is {} unless collect_stats.

    Packed rows: ``segment_ids`` int [B, T] (1, 2, ... per document, 0 padding) and ``positions``
    int [B, T] (within the document) keep attention inside each document and restart RoPE, so a
    document's logits do not depend on what else shares its row.

    ``stats['hidden']`` is ``[L+1, B, w]``: the LAST token of x_0 (embedding) and of every block
    output, before the final norm, for the angular-distance matrix.
    """
    cfg = self.cfg
    x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.dtype)
    if self.embed_scale is not None:
      x = x * self.embed_scale[...].astype(cfg.dtype)
    if (segment_ids is None) != (positions is None):
      raise ValueError("packed rows need both segment_ids and positions (or neither)")
    if self.position is not None:  # learned absolute positions, restarting in each packed document
      index = jnp.arange(tokens.shape[1])[None] if positions is None else positions
      x = x + jnp.take(self.position[...], index, axis=0).astype(cfg.dtype)
    if cfg.zero_mean_writers:  # centred embedding rows (a tied head still reads the raw rows)
      x = x - jnp.mean(x, -1, keepdims=True)
    x = call_norm(self.embed_norm, x, train=train)
    last = lambda h: h[:, -1]
    segments = None if segment_ids is None else Segments(segment_ids, positions)
    h, stats = self.stack(x, train=train, collect_stats=collect_stats, skip_layer=skip_layer,
                          summarize=last, segments=segments)
    h = call_norm(self.final_norm, h, train=train)
    if self.head is None:
      logits = jnp.dot(h, self.embed[...].astype(cfg.dtype).T)
    else:
      logits = self.head(h, train=train)
    return logits.astype(jnp.float32), stats
