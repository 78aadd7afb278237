"""The one transformer block shared by LLaMA and ViT, and the stack that runs it over depth.

``Block`` = attention sublayer then MLP sublayer, each wrapped by the configured placement
(``normjax.placements``). With a Pre-LN-style placement (``placements.PreNorm``) and kernel norms
(``layers.uses_kernel``) the blocks carry the residual stream as ``(x, pending)`` and each
sublayer's norm adds ``pending`` inside its kernel (``residual=``): one pass over memory for "add,
then normalize" instead of two (``fuses_residual_add``).

``Stack`` creates the L blocks stacked along a leading ``layers`` axis (``nnx.vmap``) and runs
them either under ``nnx.scan`` (the 1-based layer index is a scanned input, so depth-dependent
placements work) or in a Python loop with static layer indices. Both paths read the same stacked
parameters, so scanned and unrolled models are interchangeable.

LayerNorm removal (``ModelConfig.fixed_norm``, arXiv:2409.13710; docs/ln_removal.md): a block's
input norm with a fixed reader is a ``layers.RemovableLayerNorm`` holding this layer's stds as
``NormState``; the attention's values read it apart from the queries and keys (``Block._branch``).
``nnx.with_attributes(model, measure_std=True)`` adds each norm input's token-std sums to the
statistics (``input_std``): what the recipe measures before each switch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from normjax import norms, placements
from normjax.models import inits
from normjax.models.config import REMAT_POLICIES, ModelConfig
from normjax.models.layers import (Attention, Mlp, RemovableLayerNorm, activation_norm, call_norm,
                                   fixed_readers, reparam_kind, uses_kernel)

Array = jax.Array


# LayerNorm removal: the config slot each reader of a block's input norm takes its fixed std from
FIXED_READERS = {"attn": {"main": "attn_qk", "v": "attn_v"}, "mlp": {"main": "mlp_in"}}


def fuses_residual_add(cfg: ModelConfig) -> bool:
  """Whether the blocks defer each residual add into the next norm's kernel (see the docstring);
  never with fixed stds, whose norms have no kernel."""
  return (uses_kernel(cfg) and isinstance(placements.get(cfg.placement.kind), placements.PreNorm)
          and not cfg.fixed_norm.slots)


def first_positions(x: Array, segments: Any) -> Array:
  """``bool [B or 1, T]``: each document's first token (a row's first without packing)."""
  if segments is not None:
    return segments.positions == 0
  return (jnp.arange(x.shape[1]) == 0)[None]


def input_std(x: Array, first: Array, eps: float) -> Array:
  """``[4]`` float32: (sum, count) of the per-token std ``sqrt(var + eps)`` of a norm input ``x
  [B, T, w]`` over the positions after the first, then over the first positions (``first``): what
  LayerNorm removal measures (sums, so that batches add up)."""
  std = norms.token_std(x, eps=eps)
  first = jnp.broadcast_to(first, std.shape)
  parts = [(jnp.sum(jnp.where(mask, std, 0.0)), jnp.sum(mask)) for mask in (~first, first)]
  return jnp.stack([value for part in parts for value in part]).astype(jnp.float32)


class Block(nnx.Module):
  """Attention and MLP sublayers under one placement; ``[B, T, w] -> [B, T, w]`` plus statistics."""

  def __init__(self, cfg: ModelConfig, layer: Any, rngs: nnx.Rngs):
    block_inits = inits.block_inits(cfg, layer)
    spec = norms.get(cfg.norm.kind)
    weight_norm = reparam_kind(cfg) or (spec.name if spec.acts_on == "weights" else None)
    self.attn = Attention(cfg, block_inits, rngs, weight_norm)
    self.mlp = Mlp(cfg, block_inits, rngs, weight_norm)
    placement = placements.get(cfg.placement.kind)
    for sublayer in ("attn", "mlp"):
      for slot in placement.norm_slots:
        fixed = fixed_readers(cfg, FIXED_READERS[sublayer], layer) if slot == "in" else {}
        setattr(self, f"{sublayer}_norm_{slot}", activation_norm(cfg, sublayer, rngs, fixed=fixed))
    self.placement_kind = placement.name
    self.norm_slots = placement.norm_slots
    self.deferred_add = fuses_residual_add(cfg)
    # the measured token std includes the norm's eps: it is what a LayerNorm divides by
    self.eps = getattr(spec.options(**cfg.norm.options), "eps", 0.0)
    # nnx.with_attributes(model, measure_std=True): the stats get each norm input's token std
    self.measure_std = False

  def __call__(self, x: Any, ctx: placements.Context, *, train: bool = False
               ) -> tuple[Any, dict[str, Array]]:
    """``x [B, T, w]``, or the pair ``(x, pending)`` when ``deferred_add``."""
    placement = placements.get(self.placement_kind)
    if self.measure_std and not isinstance(placement, placements.PreNorm):
      raise ValueError(f"measure_std reads the norms' inputs off the residual stream, which only "
                       f"a Pre-LN placement feeds them; this model's is {self.placement_kind!r}")
    stats = {}
    first = first_positions(x[0] if self.deferred_add else x, ctx.segments)
    for sublayer, module in (("attn", self.attn), ("mlp", self.mlp)):
      if self.measure_std:  # Pre-LN: the stream is the input of this sublayer's norm
        stream = x[0] + x[1] if self.deferred_add else x
        stats[f"{sublayer}/input_std"] = input_std(stream, first, self.eps)
      branch = self._branch(sublayer, module, x, first, ctx, train)
      if self.deferred_add:
        norm = getattr(self, f"{sublayer}_norm_in")
        add_norm = lambda pending, x, out_scale, with_stats, norm=norm: norm.add_norm(
            pending, x, train=train, out_scale=out_scale, with_stats=with_stats)
        x, sub_stats = placement.apply_deferred(x, branch, add_norm, ctx)
      else:
        slot_norms = {slot: self._norm_fn(getattr(self, f"{sublayer}_norm_{slot}"), train, first)
                      for slot in self.norm_slots}
        x, sub_stats = placement.apply(x, branch, slot_norms, ctx)
      stats.update({f"{sublayer}/{name}": value for name, value in sub_stats.items()})
    return x, stats

  def _branch(self, sublayer: str, module: Any, x: Any, first: Array, ctx: placements.Context,
              train: bool):
    """The sublayer as the placement calls it. When its values read the attention norm apart
    (a ``RemovableLayerNorm``; Pre-LN only, so the norm's input is the stream ``x``), v gets
    its own view of that norm."""
    kwargs = dict(train=train, collect_stats=ctx.collect_stats, segments=ctx.segments)
    norm = getattr(self, "attn_norm_in", None)
    if sublayer == "attn" and isinstance(norm, RemovableLayerNorm):
      kwargs["v_input"] = norm(x, train=train, reader="v", first=first)
    return lambda h: module(h, **kwargs)

  @staticmethod
  def _norm_fn(norm: Any, train: bool, first: Array):
    return lambda h, out_scale=None: call_norm(norm, h, train=train, out_scale=out_scale,
                                               first=first)


class Stack(nnx.Module):
  """L blocks stacked on a leading ``layers`` axis; ``[B, T, w] -> ([B, T, w], stats of [L])``."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs, layer: Array) -> Block:
      return Block(cfg, layer, rngs)

    self.blocks = make(rngs, jnp.arange(1, cfg.num_layers + 1, dtype=jnp.float32))
    self.cfg = cfg
    self.measure_std = False  # with the blocks': ``final/input_std``, the final norm's input

  def __call__(self, x: Array, *, train: bool = False, collect_stats: bool = False,
               skip_layer: Any = None, summarize: Any = None, segments: Any = None
               ) -> tuple[Array, dict[str, Array]]:
    """Runs every block. ``skip_layer`` (1-based, may be traced) replaces that block by the identity;
    ``segments`` (``layers.Segments``) keeps attention within packed documents.

    With ``collect_stats`` the stats hold an ``[L]`` array per sublayer statistic
    (``attn/resid_var``, ``mlp/branch_rms``, ...), ``embed/...`` scalars for the input x_0, and
    ``hidden``: ``summarize`` of x_0 and of every block output, ``[L+1, B, w]`` (the model picks the
    token: last for LLaMA, class token or mean for ViT).
    """
    cfg = self.cfg
    ctx_kwargs = dict(num_layers=cfg.num_layers, collect_stats=collect_stats,
                      mix_alpha=cfg.placement.mix_alpha, deepnorm_alpha=cfg.placement.deepnorm_alpha,
                      segments=segments)

    deferred = fuses_residual_add(cfg)
    stream = lambda carry: carry[0] + carry[1] if deferred else carry  # the residual stream

    def body(x, block, layer):
      y, stats = block(x, placements.Context(layer=layer, **ctx_kwargs), train=train)
      if skip_layer is not None:
        y = jax.tree.map(lambda a, b: jnp.where(jnp.asarray(layer) == skip_layer, a, b), x, y)
      if collect_stats:
        stats["hidden"] = summarize(stream(y)).astype(jnp.float32)
      return y, stats

    policy = REMAT_POLICIES[cfg.remat]
    if cfg.remat != "none":
      body = nnx.remat(body, policy=policy, static_argnums=(2,) if not cfg.scan_layers else ())
    carry = (x, jnp.zeros_like(x)) if deferred else x  # the first norm adds a zero "pending"
    if cfg.scan_layers:
      scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
      y, stats = scan(carry, self.blocks, jnp.arange(1, cfg.num_layers + 1))
    else:
      y, stats = self._unrolled(body, carry)
    y = stream(y)
    if self.measure_std:
      stats["final/input_std"] = input_std(y, first_positions(y, segments), self.blocks.eps)
    if collect_stats:
      stats.update({f"embed/{k}": v for k, v in placements.residual_stats(x).items()})
      stats["hidden"] = jnp.concatenate([summarize(x).astype(jnp.float32)[None], stats["hidden"]])
    return y, stats

  def _unrolled(self, body, x):
    """A Python loop over the stacked blocks with static 1-based layer indices."""
    graphdef, state = nnx.split(self.blocks)
    per_layer_stats, new_states = [], []
    for index in range(self.cfg.num_layers):
      block = nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))
      x, stats = body(x, block, index + 1)
      per_layer_stats.append(stats)
      new_states.append(nnx.state(block))
    nnx.update(self.blocks, jax.tree.map(lambda *a: jnp.stack(a), *new_states))
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *per_layer_stats) if per_layer_stats[0] else {}
    return x, stacked
