"""The three Hugging Face families normjax reads and writes, one table each: LLaMA
(``LlamaForCausalLM``), GPT-2 (``GPT2LMHeadModel``) and ViT (``ViTForImageClassification``).

A family turns an HF ``config.json`` into ``ModelConfig`` fields and back, and lists its tensors as
``Row(hf name, normjax path, op)``: ``{i}`` in a name is the 0-based layer, whose tensors stack on
the leading axis of ``stack/blocks``. An HF setting normjax cannot express is refused by name and
value (``ConfigError``), never dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from normjax import norms
from normjax.models.config import ModelConfig, NormConfig
from normjax.validation import ConfigError

BLOCKS = "stack/blocks/"


class Row(NamedTuple):
  hf: str  # the HF tensor name ({i}: the layer)
  ours: str  # the path in normjax's parameter dict, "/"-separated
  op: str  # COPY, T (HF nn.Linear [out, in] vs our [in, out]), PATCH, RANK3


COPY, T, PATCH, RANK3 = "copy", "T", "patch", "rank3"


def to_ours(op: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """An HF tensor in normjax's layout (``shape``: the normjax parameter's, per layer)."""
  if op == T:
    return value.T
  if op == PATCH:  # conv [d, C, p, p] -> dense over patchify's (row, col, channel) order
    return value.transpose(2, 3, 1, 0).reshape(shape)
  return value.reshape(shape)  # COPY, RANK3 ([1, 1, d] / [1, N, d] -> [d] / [N, d])


def to_hf(op: str, value: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """The inverse of ``to_ours``."""
  if op == T:
    return value.T
  if op == PATCH:
    p, c = cfg.patch_size, cfg.channels
    return value.reshape(p, p, c, -1).transpose(3, 2, 0, 1)
  if op == RANK3:
    return value.reshape((1,) * (3 - value.ndim) + value.shape)
  return value


def refuse(field: str, value: Any, why: str) -> None:
  raise ConfigError(f"config.json {field}={value!r}: {why}")


def _dense(rows: list[Row], hf: str, ours: str, cfg: ModelConfig, op: str = T) -> None:
  rows.append(Row(f"{hf}.weight", f"{ours}/kernel", op))
  if cfg.use_bias:
    rows.append(Row(f"{hf}.bias", f"{ours}/bias", COPY))


def _norm(rows: list[Row], hf: str, ours: str, bias: bool) -> None:
  rows.append(Row(f"{hf}.weight", f"{ours}/scale", COPY))
  if bias:
    rows.append(Row(f"{hf}.bias", f"{ours}/bias", COPY))


def _block(rows: list[Row], cfg: ModelConfig, layer: str, dense: tuple[tuple[str, str], ...],
           norms_in: tuple[str, str], norm_bias: bool, op: str = T) -> None:
  """One family's block tensors: its dense layers (HF name, normjax sublayer/role) and its two input
  norms (attention, MLP), under the layer prefix ``layer`` (with ``{i}``)."""
  for hf, ours in dense:
    _dense(rows, layer + hf, BLOCKS + ours, cfg, op)
  for hf, ours in zip(norms_in, ("attn_norm_in", "mlp_norm_in")):
    _norm(rows, layer + hf, BLOCKS + ours, norm_bias)


def _decoder_head(rows: list[Row], cfg: ModelConfig) -> list[Row]:
  if not cfg.tie_embeddings:
    rows.append(Row("lm_head.weight", "head/kernel", T))
  return rows


def _eps(cfg: ModelConfig) -> float:
  return norms.get(cfg.norm.kind).options(**cfg.norm.options).eps


# --- LLaMA --------------------------------------------------------------------------------------

def _llama_in(hf: dict) -> dict[str, Any]:
  if hf.get("hidden_act", "silu") != "silu":
    refuse("hidden_act", hf["hidden_act"], "normjax's SwiGLU uses silu")
  if hf.get("rope_scaling"):
    refuse("rope_scaling", hf["rope_scaling"], "normjax has no RoPE scaling (default RoPE only)")
  rope = hf.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    refuse("rope_parameters", rope, "normjax has only the default RoPE (rope_type 'default')")
  if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
    refuse("attention_bias", hf.get("attention_bias"),
           f"with mlp_bias={hf.get('mlp_bias')}: normjax's dense_bias covers every dense layer")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or d // heads
  return dict(name="llama", num_layers=hf["num_hidden_layers"], d_model=d, num_heads=heads,
              num_kv_heads=hf.get("num_key_value_heads") or heads,
              head_size=None if head_dim * heads == d else head_dim, mlp_dim=hf["intermediate_size"],
              vocab_size=hf["vocab_size"], rope_theta=float(rope.get("rope_theta", hf.get(
                  "rope_theta", 10_000.0))), max_positions=hf.get("max_position_embeddings", 2048),
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
              dense_bias=bool(hf.get("attention_bias", False)),
              norm=NormConfig("rms_norm", {"eps": float(hf.get("rms_norm_eps", 1e-6)), "casting": "hf"}))


def _llama_out(cfg: ModelConfig) -> dict[str, Any]:
  theta = cfg.rope_theta
  return {"hidden_size": cfg.d_model, "intermediate_size": cfg.hidden_dim,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
          "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_positions,
          "rms_norm_eps": _eps(cfg), "rope_parameters": {"rope_type": "default", "rope_theta": theta},
          "rope_theta": theta, "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias,
          "tie_word_embeddings": cfg.tie_embeddings}


def _llama_rows(cfg: ModelConfig) -> list[Row]:
  rows = [Row("model.embed_tokens.weight", "embed", COPY)]
  _block(rows, cfg, "model.layers.{i}.", (
      ("self_attn.q_proj", "attn/q"), ("self_attn.k_proj", "attn/k"), ("self_attn.v_proj", "attn/v"),
      ("self_attn.o_proj", "attn/o"), ("mlp.gate_proj", "mlp/gate"), ("mlp.up_proj", "mlp/up"),
      ("mlp.down_proj", "mlp/down")), ("input_layernorm", "post_attention_layernorm"), False)
  _norm(rows, "model.norm", "final_norm", False)
  return _decoder_head(rows, cfg)


# --- GPT-2 --------------------------------------------------------------------------------------

GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _gpt2_in(hf: dict) -> dict[str, Any]:
  act = hf.get("activation_function", "gelu_new")
  if act not in GPT2_ACTIVATIONS:
    refuse("activation_function", act, f"normjax's GELU MLP takes one of {sorted(GPT2_ACTIVATIONS)}")
  for field, value in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                       ("scale_attn_weights", True)):
    if hf.get(field, value) != value:
      refuse(field, hf[field], f"normjax's attention is only the {field}={value} one")
  d = hf["n_embd"]
  return dict(name="gpt2", num_layers=hf["n_layer"], d_model=d, num_heads=hf["n_head"],
              mlp_dim=hf.get("n_inner") or 4 * d, mlp=GPT2_ACTIVATIONS[act], vocab_size=hf["vocab_size"],
              positions="learned", max_positions=hf["n_positions"], dense_bias=True,
              tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
              norm=NormConfig("layer_norm", {"eps": float(hf.get("layer_norm_epsilon", 1e-5))}))


def _gpt2_out(cfg: ModelConfig) -> dict[str, Any]:
  return {"n_embd": cfg.d_model, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
          "n_inner": cfg.hidden_dim, "vocab_size": cfg.vocab_size, "n_positions": cfg.max_positions,
          "activation_function": "gelu_new" if cfg.mlp_kind == "gelu_tanh" else "gelu",
          "layer_norm_epsilon": _eps(cfg), "tie_word_embeddings": cfg.tie_embeddings,
          "scale_attn_weights": True}


def _gpt2_rows(cfg: ModelConfig) -> list[Row]:
  rows = [Row("transformer.wte.weight", "embed", COPY), Row("transformer.wpe.weight", "position", COPY)]
  # GPT-2's Conv1D stores [in, out], as normjax does; c_attn is split into q, k, v (``unfuse``)
  _block(rows, cfg, "transformer.h.{i}.", (
      ("attn.c_attn.q", "attn/q"), ("attn.c_attn.k", "attn/k"), ("attn.c_attn.v", "attn/v"),
      ("attn.c_proj", "attn/o"), ("mlp.c_fc", "mlp/fc1"), ("mlp.c_proj", "mlp/fc2")),
      ("ln_1", "ln_2"), True, COPY)
  _norm(rows, "transformer.ln_f", "final_norm", True)
  return _decoder_head(rows, cfg)


def _gpt2_unfuse(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> None:
  """``c_attn`` ([d, 3d] weight, [3d] bias) -> ``c_attn.q/k/v``; checkpoints saved from
  ``GPT2Model`` lack the ``transformer.`` prefix, and old ones carry the causal-mask buffers."""
  for name in list(tensors):
    if not name.startswith(("transformer.", "lm_head.")):
      tensors[f"transformer.{name}"] = tensors.pop(name)
  for name in [n for n in tensors if n.endswith((".attn.bias", ".attn.masked_bias"))]:
    del tensors[name]  # the causal mask and its fill value, not parameters
  for name in [n for n in tensors if ".attn.c_attn." in n]:
    base, kind = name.rsplit(".", 1)
    for part, value in zip("qkv", np.split(tensors.pop(name), 3, axis=-1)):
      tensors[f"{base}.{part}.{kind}"] = value


def _gpt2_fuse(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> None:
  for i in range(cfg.num_layers):
    for kind in ("weight", "bias"):
      base = f"transformer.h.{i}.attn.c_attn"
      tensors[f"{base}.{kind}"] = np.concatenate(
          [tensors.pop(f"{base}.{part}.{kind}") for part in "qkv"], axis=-1)


# --- ViT ----------------------------------------------------------------------------------------

VIT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _vit_in(hf: dict) -> dict[str, Any]:
  act = hf.get("hidden_act", "gelu")
  if act not in VIT_ACTIVATIONS:
    refuse("hidden_act", act, f"normjax's GELU MLP takes one of {sorted(VIT_ACTIVATIONS)}")
  if not hf.get("qkv_bias", True):
    refuse("qkv_bias", False, "normjax's dense_bias covers every dense layer")
  labels = hf.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"}
  return dict(name="vit", num_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
              num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
              mlp=VIT_ACTIVATIONS[act], image_size=hf["image_size"], patch_size=hf["patch_size"],
              channels=hf.get("num_channels", 3), num_classes=len(labels), pool="cls", dense_bias=True,
              norm=NormConfig("layer_norm", {"eps": float(hf.get("layer_norm_eps", 1e-12))}))


def _vit_out(cfg: ModelConfig) -> dict[str, Any]:
  labels = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
  return {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.hidden_dim,
          "hidden_act": "gelu" if cfg.mlp_kind == "gelu" else "gelu_pytorch_tanh",
          "layer_norm_eps": _eps(cfg), "image_size": cfg.image_size, "patch_size": cfg.patch_size,
          "num_channels": cfg.channels, "qkv_bias": True, "id2label": labels,
          "label2id": {v: int(k) for k, v in labels.items()}}


def _vit_rows(cfg: ModelConfig) -> list[Row]:
  emb = "vit.embeddings."
  rows = [Row(emb + "cls_token", "cls", RANK3), Row(emb + "position_embeddings", "position", RANK3),
          Row(emb + "patch_embeddings.projection.weight", "patch_embed/kernel", PATCH),
          Row(emb + "patch_embeddings.projection.bias", "patch_embed/bias", COPY)]
  _block(rows, cfg, "vit.encoder.layer.{i}.", (
      ("attention.attention.query", "attn/q"), ("attention.attention.key", "attn/k"),
      ("attention.attention.value", "attn/v"), ("attention.output.dense", "attn/o"),
      ("intermediate.dense", "mlp/fc1"), ("output.dense", "mlp/fc2")),
      ("layernorm_before", "layernorm_after"), True)
  _norm(rows, "vit.layernorm", "final_norm", True)
  _dense(rows, "classifier", "head", cfg)
  return rows


@dataclasses.dataclass(frozen=True)
class Family:
  name: str  # ModelConfig.name
  model_type: str  # config.json model_type
  architecture: str  # the transformers class
  config_in: Callable[[dict], dict[str, Any]]
  config_out: Callable[[ModelConfig], dict[str, Any]]
  rows: Callable[[ModelConfig], list[Row]]
  norm: tuple[str, bool]  # the norm kind and whether it has a bias
  unfuse: Callable[[dict, ModelConfig], None] = lambda tensors, cfg: None
  fuse: Callable[[dict, ModelConfig], None] = lambda tensors, cfg: None


FAMILIES = {f.model_type: f for f in (
    Family("llama", "llama", "LlamaForCausalLM", _llama_in, _llama_out, _llama_rows, ("rms_norm", False)),
    Family("gpt2", "gpt2", "GPT2LMHeadModel", _gpt2_in, _gpt2_out, _gpt2_rows, ("layer_norm", True),
           _gpt2_unfuse, _gpt2_fuse),
    Family("vit", "vit", "ViTForImageClassification", _vit_in, _vit_out, _vit_rows, ("layer_norm", True)),
)}
