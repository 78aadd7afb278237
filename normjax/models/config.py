"""``ModelConfig``: every architectural switch of the LLaMA and ViT models, validated when it is made.

The training loop builds it from the ``model`` section of an ml_collections config
(``normjax.config.model_config``); tests and notebooks build it directly. Construction (and
``replace``) rejects bad values with a ``ConfigError`` naming the field, the value and the valid
choices, so a ``ModelConfig`` that exists is valid and nothing downstream checks it again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax

import pallas_kernels
from normjax import norms
from normjax.validation import ConfigError, check_choice

MODEL_NAMES = ("llama", "gpt2", "vit")
POSITIONS = ("rope", "learned")
MLPS = ("swiglu", "gelu", "gelu_tanh")
# what None means for the switches that differ by family: LLaMA (arXiv:2302.13971), GPT-2 (Radford
# et al. 2019), ViT (arXiv:2010.11929; big_vision's tanh GELU)
FAMILY_DEFAULTS = {"llama": dict(positions="rope", mlp="swiglu", dense_bias=False),
                   "gpt2": dict(positions="learned", mlp="gelu_tanh", dense_bias=True),
                   "vit": dict(positions="learned", mlp="gelu_tanh", dense_bias=True)}
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = {
    "none": None,  # no rematerialization
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}
POOLS = ("cls", "mean")
# Settings that belong to the model, not to a norm kind's options: one place each.
MODEL_LEVEL_OPTIONS = {"impl": "model.norm.impl", "param_dtype": "model.param_dtype"}


@dataclasses.dataclass(frozen=True)
class NormConfig:
  kind: str = "rms_norm"  # registry name or alias (normjax.norms.names())
  # the kind's options (eps, casting, ...: normjax.norms.get(kind).options_type), except impl and
  # param_dtype, which have one home each (the field below, model.param_dtype)
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # layer_norm/rms_norm/crms_norm: "xla", "pallas" (fused kernels), "triton", or "auto" (the kernel
  # only where benchmarks/kernels.py measured it faster than XLA on this device; XLA on CPU).
  impl: str = "auto"


@dataclasses.dataclass(frozen=True)
class PlacementConfig:
  kind: str = "pre"  # normjax.placements.names()
  final_norm: bool = True  # a norm after the last block (the papers always keep it)
  embed_norm: bool = False  # peri: normalize the embedding output too (open question in the paper)
  mix_alpha: float = 0.25  # mix: the first floor(alpha * L) blocks are Post-LN
  deepnorm_alpha: float | None = None  # deepnorm residual gain; None = decoder-only (2L)^(1/4)

  def __post_init__(self):
    if self.deepnorm_alpha is not None and self.deepnorm_alpha <= 0:
      raise ConfigError(f"model.placement.deepnorm_alpha={self.deepnorm_alpha} must be positive "
                        "(None = the decoder-only (2L)^(1/4))")
    if not 0.0 <= self.mix_alpha <= 1.0:
      raise ConfigError(f"model.placement.mix_alpha={self.mix_alpha} must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class InitConfig:
  scheme: str = "normal"  # normjax.variance.init_schemes(): normal, lir, scaled, deepnorm
  std: float = 0.02  # sigma of every normal initializer before the scheme's per-layer factor
  # "family": each family's reference init (the ViT's is big_vision's, which does not read std);
  # "gpt2": every matrix N(0, std^2) (normjax.models.inits)
  base: str = "family"


def _floats(value: Any, field: str) -> tuple[float, ...] | None:
  if value is None:
    return None
  try:
    return tuple(float(v) for v in value)
  except (TypeError, ValueError):
    raise ConfigError(f"FixedStd.{field}={value!r} must be a list of floats (one per layer)") from None


@dataclasses.dataclass(frozen=True)
class FixedStd:
  """The fixed std of one LayerNorm-removal slot: one value per layer (the final norm: one)."""
  std: tuple[float, ...]
  # the first position's own std per layer (a document's first token, where the residual norm is
  # largest): the paper's special treatment of the BOS position until the end; None = std
  first: tuple[float, ...] | None = None

  def __post_init__(self):  # JSON gives lists: stored as tuples, so a round trip compares equal
    object.__setattr__(self, "std", _floats(self.std, "std"))
    object.__setattr__(self, "first", _floats(self.first, "first"))


@dataclasses.dataclass(frozen=True)
class FixedNormConfig:
  """LayerNorm removal (Heimersheim 2024, arXiv:2409.13710): the Pre-LN norm readers that divide by
  a fixed std instead of each token's own (``fixed_norm`` with the LayerNorm's gain and bias).

  A slot left None is a LayerNorm. The stds are architecture, not weights: they live here, so
  ``model.json`` carries them, and the model holds them as non-trainable ``NormState``.
  """
  mlp_in: FixedStd | None = None  # ln_2, the MLP's input norm, in every block
  attn_qk: FixedStd | None = None  # ln_1 as the attention's queries and keys read it
  attn_v: FixedStd | None = None  # ln_1 as the attention's values read it
  final: FixedStd | None = None  # ln_f, the norm before the head (one std, no first-position std)

  def __post_init__(self):
    for slot in FIXED_SLOTS:
      value = getattr(self, slot)
      if isinstance(value, Mapping):
        try:
          object.__setattr__(self, slot, FixedStd(**value))
        except TypeError as error:
          raise ConfigError(f"model.fixed_norm.{slot}={dict(value)!r}: {error}; fields: "
                            f"{[f.name for f in dataclasses.fields(FixedStd)]}") from None

  @property
  def slots(self) -> tuple[str, ...]:
    """The fixed slots, in ``FIXED_SLOTS`` order."""
    return tuple(slot for slot in FIXED_SLOTS if getattr(self, slot) is not None)


FIXED_SLOTS = tuple(f.name for f in dataclasses.fields(FixedNormConfig))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str = "llama"  # "llama" / "gpt2" (causal decoders) or "vit" (image classifier)
  num_layers: int = 4  # L, number of blocks
  d_model: int = 128  # residual width d
  num_heads: int = 4  # attention heads; must divide d_model
  num_kv_heads: int | None = None  # grouped-query heads; None = num_heads
  head_size: int | None = None  # per-head width; None = d_model // num_heads
  mlp: str | None = None  # swiglu, gelu (exact), gelu_tanh; None = swiglu (llama), gelu_tanh
  mlp_dim: int | None = None  # hidden width; None = 4d (GELU) or 8d/3 rounded up to 16 (SwiGLU)
  vocab_size: int = 256  # decoders: byte-level by default
  positions: str | None = None  # decoders: rope or learned (absolute); None = rope (llama), learned
  max_positions: int = 1024  # learned decoder positions: the longest sequence
  rope_theta: float = 10_000.0  # rotary embedding base
  tie_embeddings: bool = False  # decoders: the head reuses the token embedding
  # decoders: a learnable scalar times the embedding output, initialized to sqrt(d) (DyT's LLaMA
  # recipe, arXiv:2503.10622; never weight-decayed, like every scalar)
  embed_scale: bool = False
  dense_bias: bool | None = None  # biases on dense layers; None = False (llama) / True (gpt2, vit)
  image_size: int = 28  # vit: square images
  patch_size: int = 4  # vit: patch side; must divide image_size
  channels: int = 1  # vit: image channels
  num_classes: int = 10  # vit: classes
  pool: str = "cls"  # vit: "cls" token or "mean" of patch tokens
  compressed: bool = False  # residual stream stores d-1 coordinates (Pre-CRMSNorm models)
  # Writers to the residual stream (embedding output, attention o, MLP down/fc2) use W - mean_out(W):
  # the stream has zero mean for ANY parameters, so layer_norm == rms_norm exactly, in training too.
  zero_mean_writers: bool = False
  # "sigma": every dense layer (blocks, head, the ViT's patch embedding) as gamma / sigma(W) * W
  # (sigmaReparam, arXiv:2303.06296), whatever the activation norms; "none": plain kernels
  reparam: str = "none"
  norm: NormConfig = NormConfig()
  placement: PlacementConfig = PlacementConfig()
  init: InitConfig = InitConfig()
  fixed_norm: FixedNormConfig = FixedNormConfig()  # LayerNorm removal: readers with a fixed std
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"  # parameter storage dtype
  scan_layers: bool = True  # nnx.scan over depth (False: a Python loop with static layer indices)
  remat: str = "none"  # rematerialization policy per block: none, full, dots

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads if self.head_size is None else self.head_size

  @property
  def mlp_kind(self) -> str:
    return FAMILY_DEFAULTS[self.name]["mlp"] if self.mlp is None else self.mlp

  @property
  def position_kind(self) -> str:
    return FAMILY_DEFAULTS[self.name]["positions"] if self.positions is None else self.positions

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def hidden_dim(self) -> int:
    if self.mlp_dim is not None:
      return self.mlp_dim
    if self.mlp_kind != "swiglu":
      return 4 * self.d_model
    return -(-(8 * self.d_model // 3) // 16) * 16

  @property
  def use_bias(self) -> bool:
    return FAMILY_DEFAULTS[self.name]["dense_bias"] if self.dense_bias is None else self.dense_bias

  @property
  def width(self) -> int:
    """Width of the stored residual stream: d, or d-1 when compressed (CRMSNorm)."""
    return self.d_model - 1 if self.compressed else self.d_model

  @property
  def causal(self) -> bool:
    return self.name != "vit"

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
    """From a plain (nested) dict such as ``config.model.to_dict()``; unknown keys are errors."""
    values = dict(values)
    sub = {"norm": NormConfig, "placement": PlacementConfig, "init": InitConfig,
           "fixed_norm": FixedNormConfig}
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
      if key not in known:
        raise ConfigError(f"model.{key} is not a model field; valid fields: {sorted(known)}")
    for key, sub_cls in sub.items():
      if isinstance(values.get(key), Mapping):
        fields = {f.name for f in dataclasses.fields(sub_cls)}
        for name in values[key]:
          if name not in fields:
            raise ConfigError(f"model.{key}.{name} is not a field; valid fields: {sorted(fields)}")
        values[key] = sub_cls(**values[key])
    return cls(**values)

  def __post_init__(self):
    _check(self)


def _check(cfg: ModelConfig) -> None:
  """Checks every field against the others (ConfigError naming the field, value and choices)."""
  from normjax import placements, variance  # local: both import this module
  from normjax.models import inits

  check_choice(cfg.name, "model.name", MODEL_NAMES)
  check_choice(cfg.dtype, "model.dtype", DTYPES)
  check_choice(cfg.param_dtype, "model.param_dtype", DTYPES)
  check_choice(cfg.remat, "model.remat", REMAT_POLICIES)
  check_choice(cfg.pool, "model.pool", POOLS)
  if cfg.mlp is not None:
    check_choice(cfg.mlp, "model.mlp", MLPS)
  if cfg.positions is not None:
    check_choice(cfg.positions, "model.positions", POSITIONS)
  if cfg.name == "vit" and cfg.position_kind != "learned":
    raise ConfigError(f"model.positions={cfg.positions!r}: the ViT's positions are learned "
                      "(set None or 'learned')")
  check_choice(cfg.init.scheme, "model.init.scheme", variance.init_schemes())
  if cfg.embed_scale and not cfg.causal:
    raise ConfigError("model.embed_scale=True belongs to the decoders (DyT's LLaMA recipe); the "
                      "ViT has no token embedding to scale: set it False")
  check_choice(cfg.init.base, "model.init.base", inits.BASES)
  _check_reparam(cfg)
  if inits.big_vision(cfg) and cfg.init.std != InitConfig.std:
    raise ConfigError(f"model.init.std={cfg.init.std} is not read by the ViT's reference init "
                      "(model.init.base='family': fan-in and Xavier initializers); set "
                      "model.init.base='gpt2' to draw every matrix from N(0, std^2)")
  for field in ("num_layers", "d_model", "num_heads", "vocab_size", "patch_size", "num_classes",
                "image_size", "channels", "max_positions", "num_kv_heads", "mlp_dim", "head_size"):
    value = getattr(cfg, field)
    optional = field in ("num_kv_heads", "mlp_dim", "head_size")
    if (value is not None or not optional) and (not isinstance(value, int) or value < 1):
      raise ConfigError(f"model.{field}={value!r} must be a positive int"
                        + (" (None = the default)" if optional else ""))
  if cfg.head_size is None and cfg.d_model % cfg.num_heads:
    raise ConfigError(f"model.num_heads={cfg.num_heads} does not divide model.d_model={cfg.d_model}")
  if cfg.num_heads % cfg.kv_heads:
    raise ConfigError(f"model.num_kv_heads={cfg.num_kv_heads} does not divide "
                      f"model.num_heads={cfg.num_heads}")
  if cfg.name == "vit" and cfg.image_size % cfg.patch_size:
    raise ConfigError(f"model.patch_size={cfg.patch_size} does not divide "
                      f"model.image_size={cfg.image_size}")
  spec = _check_norm(cfg.norm)
  check_choice(cfg.placement.kind, "model.placement.kind", placements.names())
  placement = placements.get(cfg.placement.kind)
  placement.check(cfg, spec)
  if cfg.causal and spec.mixes_positions and placement.norm_slots:
    raise ConfigError(f"model.norm.kind={cfg.norm.kind!r} takes statistics across sequence positions, "
                      f"which leaks future tokens into a causal decoder (model.name={cfg.name!r}); "
                      f"use it with model.name='vit' or pick a per-token norm")
  casting = spec.options(**cfg.norm.options).casting if "casting" in spec.defaults else None
  if (casting == "hf" and cfg.norm.impl in ("pallas", "triton") and cfg.dtype == "bfloat16"
      and cfg.param_dtype == "float32"):
    raise ConfigError(f"model.norm.impl={cfg.norm.impl!r} with casting='hf', model.dtype='bfloat16' "
                      "and model.param_dtype='float32': the norm then returns float32, which the "
                      "fused kernels cannot write; use impl='auto' or 'xla'")
  if (spec.name == "crms_norm") != cfg.compressed:
    raise ConfigError(f"model.norm.kind={cfg.norm.kind!r} with model.compressed={cfg.compressed}: "
                      "crms_norm needs the compressed d-1 residual stream and only it does "
                      "(build one with normjax.convert.to_crms)")
  if cfg.init.scheme == "scaled" and placement.name == "lns":
    raise ConfigError("model.init.scheme='scaled' with model.placement.kind='lns': LayerNorm Scaling "
                      "must not be combined with scaled init (LNS paper, Table 4); use 'normal'")
  _check_fixed(cfg, spec)


REPARAMS = ("none", "sigma")


def _check_reparam(cfg: ModelConfig) -> None:
  """A weight-space norm kind would reparametrize the block kernels a second time."""
  check_choice(cfg.reparam, "model.reparam", REPARAMS)
  if cfg.reparam == "none":
    return
  if norms.get(cfg.norm.kind).acts_on == "weights":
    raise ConfigError(f"model.reparam={cfg.reparam!r} with model.norm.kind={cfg.norm.kind!r}: both "
                      "reparametrize the block kernels; use model.reparam alone (with any activation "
                      "norm, or placement 'none' for none)")


def _check_fixed(cfg: ModelConfig, spec: norms.NormSpec) -> None:
  """LayerNorm removal applies to a Pre-LN decoder's LayerNorms; each slot holds one positive std
  per layer (the final norm: one, without a first-position std)."""
  fixed = cfg.fixed_norm
  if not fixed.slots:
    return
  why = f"model.fixed_norm sets {list(fixed.slots)}"
  for field, value, choices in (("model.name", cfg.name, ("gpt2", "llama")),
                                ("model.norm.kind", spec.name, ("layer_norm",)),
                                ("model.placement.kind", cfg.placement.kind, ("pre",)),
                                ("model.placement.embed_norm", cfg.placement.embed_norm, (False,))):
    if value not in choices:  # the recipe removes the LayerNorms of a Pre-LN decoder
      raise ConfigError(f"{field}={value!r} is not valid when {why}; choose one of {list(choices)}")
  if fixed.final is not None and not cfg.placement.final_norm:
    raise ConfigError("model.fixed_norm.final is set but model.placement.final_norm=False: there "
                      "is no final norm to fix")
  for slot in fixed.slots:
    entry, count = getattr(fixed, slot), 1 if slot == "final" else cfg.num_layers
    if slot == "final" and entry.first is not None:
      raise ConfigError(f"model.fixed_norm.final.first={entry.first!r}: the final norm has one std "
                        "for every position; set None")
    for name, values in (("std", entry.std), ("first", entry.first)):
      if values is not None and (len(values) != count or not all(0 < v < math.inf for v in values)):
        raise ConfigError(f"model.fixed_norm.{slot}.{name}={values!r} must hold {count} positive "
                          f"finite std(s) ({'one' if count == 1 else 'one per layer'})")


def _check_norm(norm: NormConfig) -> norms.NormSpec:
  """The norm's spec, after checking its options and its implementation."""
  for option, home in MODEL_LEVEL_OPTIONS.items():
    if option in norm.options:
      raise ConfigError(f"model.norm.options.{option}={norm.options[option]!r} duplicates {home}: "
                        f"set it once, in {home}")
  try:
    spec = norms.get(norm.kind)
    options = spec.options(**norm.options)
  except ValueError as error:
    raise ConfigError(f"model.norm: {error}") from None
  check_choice(norm.impl, "model.norm.impl", pallas_kernels.IMPLS)
  if norm.impl in ("auto", "xla"):
    return spec
  if spec.name not in pallas_kernels.KINDS:
    raise ConfigError(f"model.norm.impl={norm.impl!r} needs a kind with a fused kernel "
                      f"({', '.join(pallas_kernels.KINDS)}); model.norm.kind={norm.kind!r} has "
                      "only the XLA implementation: use impl='auto' or 'xla'")
  if options.axis != -1:
    raise ConfigError(f"model.norm.impl={norm.impl!r} normalizes the last axis only; got "
                      f"model.norm.options.axis={options.axis!r}")
  return spec
