"""Small NNX layers shared by LLaMA and ViT: dense, embedding, rotary embedding, attention, MLPs.

Every parameter's type says what it is (``normjax.params``: ``Kernel``, ``Bias``, ``NormParam``,
plain ``nnx.Param`` for embeddings) and its ``out_sharding`` metadata holds logical axis names
(embed, mlp, heads, kv, vocab, norm; ``layers`` is added by the stacked blocks) for the training
loop's sharding rules. Compute happens in ``dtype``; parameters are stored in ``param_dtype``.

The norms of a model are built here (``activation_norm``): the XLA reference of the registry, or,
for the kinds with a fused kernel and ``model.norm.impl`` other than ``xla``, the
``pallas_kernels`` op of the same name (``KernelNorm``) with the same parameters. LayerNorm removal
(``ModelConfig.fixed_norm``) makes a norm a ``RemovableLayerNorm``: same parameters, fixed stds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from normjax import norms
from normjax.axes import BATCH_AXES
from normjax.nn.nnx import Norm
from normjax.params import Bias, Kernel, NormState

Array = jax.Array


class Init(NamedTuple):
  """How one parameter is drawn. ``scale`` may be traced (a per-layer init factor).

  rule: "normal" N(0, scale^2); "xavier_uniform" U(-a, a) with variance scale^2 * 2/(fan_in +
  fan_out); "lecun_normal" normal truncated at 2 sigma with variance scale^2 / fan_in (flax's
  ``lecun_normal``); "zeros". Fans are the last two axes. ``bias_std``: a Dense bias's N(0, s^2).
  """
  scale: Any
  rule: str = "normal"
  bias_std: float = 0.0


_RULES = {"xavier_uniform": jax.nn.initializers.xavier_uniform(),
          "lecun_normal": jax.nn.initializers.lecun_normal()}


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], init: Init, dtype: Any,
          axes: tuple[str | None, ...], *, kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
  """A parameter of type ``kind`` drawn as ``init`` says, with logical axes ``axes``."""
  if init.rule == "zeros":
    value = jnp.zeros(shape, dtype)
  elif init.rule == "normal":
    value = (jax.random.normal(rngs.params(), shape, jnp.float32) * init.scale).astype(dtype)
  else:
    value = (_RULES[init.rule](rngs.params(), shape, jnp.float32) * init.scale).astype(dtype)
  return kind(value, out_sharding=axes, eager_sharding=False)


def reparam_kind(cfg: Any) -> str | None:
  """The weight-space norm every dense layer applies under ``model.reparam`` (None: plain)."""
  return "sigma_reparam" if cfg.reparam == "sigma" else None


class Dense(nnx.Module):
  """``[..., in] -> [..., out]``; kernel ``[in, out]`` with logical axes ``axes``.

  ``weight_norm`` names a weight-space norm kind (sigma_reparam, weight_standardize) applied to the
  kernel on every call; its parameters and state live in ``self.weight_norm``. ``center_output``
  uses ``W - mean_out(W)`` (and a centred bias), so every output vector has zero mean: the
  Pre-RMSNorm paper's training parameterization of residual writers.
  """

  def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
               init: Init, use_bias: bool, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
               weight_norm: str | None = None, center_output: bool = False):
    self.kernel = param(rngs, (in_features, out_features), init, param_dtype, axes, kind=Kernel)
    bias = Init(init.bias_std) if init.bias_std else Init(0.0, "zeros")
    self.bias = param(rngs, (out_features,), bias, param_dtype, axes[1:], kind=Bias) if use_bias else None
    self.weight_norm = Norm(weight_norm, self.kernel[...]) if weight_norm else None
    self.dtype = dtype
    self.center_output = center_output

  def __call__(self, x: Array, *, train: bool = False) -> Array:
    kernel = self.kernel[...]
    if self.weight_norm is not None:
      kernel = self.weight_norm(kernel, train=train)
    bias = None if self.bias is None else self.bias[...]
    if self.center_output:
      kernel = kernel - jnp.mean(kernel, -1, keepdims=True)
      bias = None if bias is None else bias - jnp.mean(bias)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    return y if bias is None else y + bias.astype(self.dtype)


class Segments(NamedTuple):
  """Packed documents in a batch: ``ids`` int32 [B, T] numbers the documents of a row (1, 2, ...;
  0 is padding) and ``positions`` int32 [B, T] is each token's position within its document.
  Attention stays within a document and RoPE restarts at each one."""
  ids: Array
  positions: Array

  def mask(self) -> Array:
    """``bool [B, 1, T, T]``: query t may attend to key s of the same document (padding to
    padding, so that no row is empty; the loss ignores it)."""
    return (self.ids[:, :, None] == self.ids[:, None, :])[:, None]


def rope(x: Array, theta: float, positions: Array | None = None) -> Array:
  """Rotary position embedding on ``[B, T, heads, head_dim]`` (half-split pairs, as in LLaMA), at
  ``positions`` (int [B, T]; default 0..T-1)."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if positions is None:
    positions = jnp.arange(x.shape[1])[None]
  angle = positions.astype(jnp.float32)[..., None] * freq  # [B or 1, T, half]
  cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def attention_entropy(q: Array, k: Array, causal: bool, mask: Array | None = None) -> Array:
  """Mean entropy of the attention distributions over batch, heads and queries (float32 scalar).

  Only on statistics steps; the attention output itself always comes from
  ``jax.nn.dot_product_attention``, so collecting statistics never changes the training numerics.
  ``q: [B, T, H, hd]``, ``k: [B, S, KV, hd]``, ``mask``: bool broadcastable to [B, H, T, S].
  """
  k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
  logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool)), logits, -jnp.inf)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  log_probs = jax.nn.log_softmax(logits, -1)
  probs = jnp.exp(log_probs)
  return jnp.mean(-jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), -1))


class Attention(nnx.Module):
  """Multi-head attention with optional grouped-query heads and RoPE; ``[B, T, w] -> [B, T, w]``.

  ``w`` is the stored residual width (d, or d-1 for compressed models). Attention runs through
  ``jax.nn.dot_product_attention`` (its default, XLA implementation; the cuDNN one takes no segment
  mask), causal and, for packed rows, within each document (``Segments``).
  """

  def __init__(self, cfg: Any, inits: dict[str, Init], rngs: nnx.Rngs, weight_norm: str | None = None):
    heads, kv, hd, w = cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.width
    common = dict(use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                  weight_norm=weight_norm)
    self.q = Dense(w, heads * hd, ("embed", "heads"), init=inits["q"], **common)
    self.k = Dense(w, kv * hd, ("embed", "heads"), init=inits["k"], **common)
    self.v = Dense(w, kv * hd, ("embed", "heads"), init=inits["v"], **common)
    self.o = Dense(heads * hd, w, ("heads", "embed"), init=inits["o"], **common,
                   center_output=cfg.zero_mean_writers)
    self.shape = (heads, kv, hd)
    self.causal = cfg.causal
    self.rope_theta = cfg.rope_theta if cfg.position_kind == "rope" else None

  def __call__(self, x: Array, *, train: bool = False, collect_stats: bool = False,
               segments: Segments | None = None, v_input: Array | None = None
               ) -> tuple[Array, dict[str, Array]]:
    """``x [B, T, w]`` feeds q and k, and v unless ``v_input [B, T, w]`` is given (LayerNorm
    removal switches the values' norm apart from the queries' and keys')."""
    heads, kv, hd = self.shape
    b, t, _ = x.shape
    q = self.q(x, train=train).reshape(b, t, heads, hd)
    k = self.k(x, train=train).reshape(b, t, kv, hd)
    v = self.v(x if v_input is None else v_input, train=train).reshape(b, t, kv, hd)
    positions, mask = (None, None) if segments is None else (segments.positions, segments.mask())
    if self.rope_theta is not None:
      q, k = rope(q, self.rope_theta, positions), rope(k, self.rope_theta, positions)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal, mask=mask)
    aux = {"attn_entropy": attention_entropy(q, k, self.causal, mask)} if collect_stats else {}
    return self.o(out.reshape(b, t, heads * hd), train=train), aux


class Mlp(nnx.Module):
  """SwiGLU (LLaMA: down(silu(gate x) * up x)) or GELU (GPT-2, ViT: fc2(gelu(fc1 x)), exact or tanh
  approximation); ``[.., w] -> [.., w]``."""

  def __init__(self, cfg: Any, inits: dict[str, Init], rngs: nnx.Rngs, weight_norm: str | None = None):
    w, hidden = cfg.width, cfg.hidden_dim
    common = dict(use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                  weight_norm=weight_norm)
    self.gated = cfg.mlp_kind == "swiglu"
    self.approximate = cfg.mlp_kind == "gelu_tanh"
    if self.gated:
      self.gate = Dense(w, hidden, ("embed", "mlp"), init=inits["gate"], **common)
      self.up = Dense(w, hidden, ("embed", "mlp"), init=inits["up"], **common)
      self.down = Dense(hidden, w, ("mlp", "embed"), init=inits["down"], **common,
                        center_output=cfg.zero_mean_writers)
    else:
      self.fc1 = Dense(w, hidden, ("embed", "mlp"), init=inits["fc1"], **common)
      self.fc2 = Dense(hidden, w, ("mlp", "embed"), init=inits["fc2"], **common,
                       center_output=cfg.zero_mean_writers)

  def __call__(self, x: Array, *, train: bool = False, collect_stats: bool = False,
               segments: Segments | None = None) -> tuple[Array, dict[str, Array]]:
    del collect_stats, segments  # token-local
    if self.gated:
      h = jax.nn.silu(self.gate(x, train=train)) * self.up(x, train=train)
      return self.down(h, train=train), {}
    h = jax.nn.gelu(self.fc1(x, train=train), approximate=self.approximate)
    return self.fc2(h, train=train), {}


class KernelNorm(Norm):
  """layer_norm / rms_norm / crms_norm through ``pallas_kernels``' implementation dispatch.

  Same parameters and options as ``Norm`` (so checkpoints do not depend on ``impl``); the rows are
  split over the mesh's batch axes under ``jax.set_mesh``.
  """

  def __init__(self, kind: str, features: int, *, impl: str, rngs: nnx.Rngs | None = None,
               **options: Any):
    super().__init__(kind, features, rngs=rngs, **options)
    self.impl = impl

  def __call__(self, x: Array, *, train: bool = False, out_scale: Any = 1.0) -> Array:
    """``x: [..., d] -> [..., d]``."""
    return self._run(x, train, lambda x, p, s: (self._op(x, p, out_scale), s))

  def add_norm(self, x: Array, residual: Array, *, train: bool = False, out_scale: Any = None,
               with_stats: bool = False) -> tuple[Array, Array, Array | None]:
    """``(N(x + residual), x + residual, mean square of x + residual per row or None)`` in one
    kernel pass; ``[..., d]`` in, ``[...]`` float32 mean squares. The mean square comes from the
    kernel's row statistics (``1/rstd^2 - eps``, plus ``mean^2`` for LayerNorm); Compressed RMSNorm
    normalizes a wider implicit vector, so its rows give None (recomputed in XLA)."""
    out_scale = 1.0 if out_scale is None else out_scale
    stats = with_stats and self.kind != "crms_norm"
    y, s, *rest = self._run(x, train, lambda x, p, state: (self._op(
        x, p, out_scale, residual=residual, return_stats=stats), state))
    if not stats:
      return y, s, None
    mean, rstd = rest[0]
    return y, s, 1.0 / jnp.square(rstd) - self.options.eps + jnp.square(mean)

  def _op(self, x: Array, params: dict[str, Array], out_scale: Any, **fusions: Any) -> Any:
    o = self.options
    return getattr(pallas_kernels, self.kind)(
        x, params.get("scale"), params.get("bias"), eps=o.eps, out_scale=out_scale,
        scale_offset=o.scale_offset, casting=o.casting, impl=self.impl, row_axes=BATCH_AXES, **fusions)


class RemovableLayerNorm(Norm):
  """A LayerNorm (the registry's ``layer_norm``: same parameters, same options) whose ``fixed``
  readers see the per-token std replaced by a fixed value: ``fixed_norm`` with this norm's gain
  and bias, the LayerNorm-removal recipe (Heimersheim 2024, arXiv:2409.13710).

  ``fixed`` maps a reader to ``(std, first)`` for this layer: "main" reads the norm as the sublayer
  (or head) does; "v" is the attention's values, whose norm the recipe switches apart from the
  queries' and keys'. ``first`` (or None) is the first position's own std. Both are ``NormState``
  (``fixed_<reader>``, ``fixed_<reader>_first``): never trained, carried in checkpoints.
  """

  def __init__(self, features: int, fixed: Mapping[str, tuple[Any, Any]], *,
               rngs: nnx.Rngs | None = None, **options: Any):
    super().__init__("layer_norm", features, rngs=rngs, **options)
    for reader, (std, first) in fixed.items():
      setattr(self, f"fixed_{reader}", NormState(jnp.asarray(std, jnp.float32)))
      if first is not None:
        setattr(self, f"fixed_{reader}_first", NormState(jnp.asarray(first, jnp.float32)))
    self.fixed_readers = tuple(fixed)
    self.first_readers = tuple(reader for reader, (_, first) in fixed.items() if first is not None)

  def __call__(self, x: Array, *, train: bool = False, reader: str = "main",
               first: Array | None = None, **call_options: Any) -> Array:
    """``x [..., d] -> [..., d]`` as ``reader`` sees it; ``first`` (bool ``[...]``) marks the
    positions that take the first-position std."""
    if reader not in self.fixed_readers:
      return super().__call__(x, train=train, **call_options)
    std = getattr(self, f"fixed_{reader}")[...]
    if reader in self.first_readers:
      if first is None:
        raise ValueError(f"reader {reader!r} has a first-position std: pass first=")
      std = jnp.where(first[..., None], getattr(self, f"fixed_{reader}_first")[...], std)
    o = self.options
    params = {name: getattr(self, name)[...] for name in self.param_names}
    return norms.fixed_norm(x, std, params.get("scale"), params.get("bias"), axis=o.axis,
                            scale_offset=o.scale_offset, casting=o.casting)


def uses_kernel(cfg: Any) -> bool:
  """Whether the model's residual-stream norms are ``KernelNorm`` (``model.norm.impl`` not xla, a
  kind with a fused kernel)."""
  return cfg.norm.impl != "xla" and cfg.norm.kind in pallas_kernels.KINDS


def fixed_readers(cfg: Any, slots: Mapping[str, str], layer: Any = None
                  ) -> dict[str, tuple[Any, Any]]:
  """``{reader: (std, first)}`` of one norm from ``cfg.fixed_norm`` (scalars; ``first`` may be
  None); ``slots`` maps a reader to its config slot (``{"main": "mlp_in"}``), ``layer`` (1-based,
  may be traced) picks a block's values, None the final norm's one."""
  def pick(values: tuple[float, ...]) -> Array:
    if layer is None:
      return jnp.asarray(values[0], jnp.float32)
    return jnp.asarray(values, jnp.float32)[jnp.asarray(layer, jnp.int32) - 1]

  entries = {reader: getattr(cfg.fixed_norm, slot) for reader, slot in slots.items()}
  return {reader: (pick(e.std), None if e.first is None else pick(e.first))
          for reader, e in entries.items() if e is not None}


def activation_norm(cfg: Any, site: str, rngs: nnx.Rngs | None = None, *,
                    fixed: Mapping[str, tuple[Any, Any]] | None = None) -> Norm | None:
  """The residual-stream norm of the configured kind at ``site`` (``norms.SITES``; None for
  weight-space kinds); a ``RemovableLayerNorm`` when some reader divides by a fixed std (``fixed``,
  as ``fixed_readers`` returns it)."""
  if site not in norms.SITES:  # a model's typo would silently get the default options
    raise ValueError(f"site {site!r} is not one of {norms.SITES}")
  spec = norms.get(cfg.norm.kind)
  if spec.acts_on == "weights":
    return None
  at_site = dataclasses.asdict(spec.options(**cfg.norm.options).at_site(site))
  options = {key: value for key, value in at_site.items()  # the set ones and the site's own
             if key in cfg.norm.options or value != spec.defaults[key]}
  if "param_dtype" in spec.defaults:
    options["param_dtype"] = cfg.param_dtype  # one home: model.param_dtype (options may not set it)
  if "batch_axes" in spec.defaults:
    options.setdefault("batch_axes", (0, 1))  # group statistics per token, never across positions
  if fixed:
    return RemovableLayerNorm(cfg.width, fixed, rngs=rngs, **options)
  if uses_kernel(cfg):  # a model's norms: the last axis
    return KernelNorm(spec.name, cfg.width, impl=cfg.norm.impl, rngs=rngs, **options)
  if "num_groups" in spec.defaults or spec.name == "evonorm_b0":
    example = jax.ShapeDtypeStruct((1, 1, cfg.width), jnp.float32)
  else:
    example = cfg.width
  return Norm(spec.name, example, rngs=rngs, **options)


def call_norm(norm: Norm | None, x: Array, *, train: bool, out_scale: Any = None,
              first: Array | None = None) -> Array:
  """Applies ``norm`` (identity when None); out_scale is folded in where the kind supports it.
  ``first`` (bool ``[B, T]``) marks first positions for a ``RemovableLayerNorm``'s own std."""
  if isinstance(norm, RemovableLayerNorm):
    y = norm(x, train=train, first=first)
  elif norm is None:
    y = x
  elif out_scale is not None and "out_scale" in norms.get(norm.kind).call_options:
    return norm(x, train=train, out_scale=out_scale)
  else:
    y = norm(x, train=train)
  return y if out_scale is None else y * jnp.asarray(out_scale, y.dtype)
