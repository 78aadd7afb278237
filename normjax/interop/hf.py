"""Hugging Face import and export: ``from_hf(path) -> (ModelConfig, model)`` and
``to_hf(model, path)``, for the families of ``normjax.interop.families``.

    cfg, model = from_hf("checkpoints/TinyLlama")        # config.json + *.safetensors, no torch
    logits, stats = model(tokens, collect_stats=True)
    to_hf(normjax.convert.to_rms(model), "out/")         # refused: not an HF architecture any more
    to_hf(model, "out/")                                 # transformers' from_pretrained loads it

Imported norms use ``casting="hf"`` (current transformers' bfloat16 order), so bfloat16 runs round
where transformers rounds. Tensors keep their stored dtype unless ``param_dtype`` says otherwise;
float16 checkpoints load as float32 (exact), since normjax computes in float32 or bfloat16.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from normjax import models, norms
from normjax.interop import checkpoint_files
from normjax.interop.families import FAMILIES, Family, Row, refuse, to_hf as row_to_hf, to_ours
from normjax.models.config import ModelConfig
from normjax.validation import ConfigError

HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32", None: "float32"}


def family_of(hf: dict) -> Family:
  """The family of an HF ``config.json`` (by ``model_type``)."""
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    refuse("model_type", model_type, f"normjax imports {sorted(FAMILIES)}")
  return FAMILIES[model_type]


def hf_config(path: str | os.PathLike, *, dtype: str | None = None,
              param_dtype: str | None = None) -> ModelConfig:
  """The ``ModelConfig`` of an HF directory's ``config.json`` (refusing what normjax cannot
  express). ``param_dtype`` None = the checkpoint's dtype; ``dtype`` (compute) None = param_dtype."""
  hf = checkpoint_files.read_config(path)
  stored = hf.get("dtype", hf.get("torch_dtype"))
  if stored not in HF_DTYPES:
    refuse("dtype", stored, f"normjax reads {sorted(k for k in HF_DTYPES if k)}")
  param_dtype = param_dtype or HF_DTYPES[stored]
  fields = family_of(hf).config_in(hf)
  try:
    return ModelConfig(**fields, param_dtype=param_dtype, dtype=dtype or param_dtype)
  except ConfigError as error:
    raise ConfigError(f"{path}/config.json gives an invalid normjax model: {error}") from None


def _layers(row: Row, cfg: ModelConfig) -> list[str]:
  return [row.hf.format(i=i) for i in range(cfg.num_layers)] if "{i}" in row.hf else [row.hf]


def _set(tree: dict, path: str, value: Any) -> None:
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def _get(tree: dict, path: str) -> Any:
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _shapes(cfg: ModelConfig) -> dict:
  """normjax's parameter shapes (per layer for the stacked blocks), without building the model."""
  abstract = nnx.eval_shape(lambda: models.build(cfg))
  return jax.tree.map(lambda a: a.shape, models.params_of(abstract))


def _import_tensors(tensors: dict[str, np.ndarray], family: Family, cfg: ModelConfig) -> dict:
  family.unfuse(tensors, cfg)
  if cfg.tie_embeddings:
    tensors.pop("lm_head.weight", None)  # a tied head some checkpoints store anyway
  shapes, params = _shapes(cfg), {}
  for row in family.rows(cfg):
    names = _layers(row, cfg)
    missing = [n for n in names if n not in tensors]
    if missing:
      raise ConfigError(f"the checkpoint lacks {missing[0]} (and {len(missing) - 1} more), which a "
                        f"{family.architecture} with this config.json has")
    shape = _get(shapes, row.ours)
    per_layer = shape[1:] if "{i}" in row.hf else shape
    values = [to_ours(row.op, tensors.pop(n), per_layer) for n in names]
    _set(params, row.ours, np.stack(values) if "{i}" in row.hf else values[0])
  if tensors:
    raise ConfigError(f"the checkpoint has tensors normjax's {family.name} does not: "
                      f"{sorted(tensors)[:5]} ({len(tensors)} in all)")
  return params


def read_params(path: str | os.PathLike, cfg: ModelConfig) -> dict[str, Any]:
  """The directory's tensors as normjax parameters (NumPy, stored dtype) for ``cfg`` (its
  ``hf_config``, dtypes aside)."""
  family = family_of(checkpoint_files.read_config(path))
  return _import_tensors(checkpoint_files.read_tensors(path), family, cfg)


def from_hf(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None
            ) -> tuple[ModelConfig, nnx.Module]:
  """``(ModelConfig, model)`` from a local HF directory (``config.json`` + safetensors, one file or
  sharded with an index); see the module docstring for dtypes. ViT models take images
  ``[B, H, W, C]`` (transformers' pixel_values transposed)."""
  cfg = hf_config(path, dtype=dtype, param_dtype=param_dtype)
  return cfg, models.with_params(cfg, read_params(path, cfg))


def check_exportable(cfg: ModelConfig) -> Family:
  """The family ``cfg`` exports as; a ConfigError naming the first field HF's class lacks."""
  family = next((f for f in FAMILIES.values() if f.name == cfg.name), None)
  if family is None:
    raise ConfigError(f"model.name={cfg.name!r} has no Hugging Face export")
  kind, bias = family.norm
  options = norms.get(cfg.norm.kind).options(**cfg.norm.options) if cfg.norm.kind == kind else None
  wanted = {"model.placement.kind": (cfg.placement.kind, "pre"),
            "model.placement.final_norm": (cfg.placement.final_norm, True),
            "model.placement.embed_norm": (cfg.placement.embed_norm, False),
            "model.norm.kind": (norms.get(cfg.norm.kind).name, kind),
            "model.compressed": (cfg.compressed, False),
            "model.zero_mean_writers": (cfg.zero_mean_writers, False),
            "model.embed_scale": (cfg.embed_scale, False),
            "model.reparam": (cfg.reparam, "none"),
            "model.fixed_norm": (cfg.fixed_norm.slots, ())}  # LayerNorm removal: no HF class has it
  if options is not None:
    wanted.update({"model.norm.options.use_scale": (options.use_scale, True),
                   "model.norm.options.use_bias": (options.use_bias, bias),
                   "model.norm.options.scale_offset": (options.scale_offset, 0.0)})
  if family.name == "llama":
    wanted["model.mlp"] = (cfg.mlp_kind, "swiglu")
  else:  # GPT-2 and ViT: a GELU MLP, biases everywhere, plain multi-head attention
    gelu = cfg.mlp_kind if cfg.mlp_kind != "swiglu" else "gelu or gelu_tanh"
    wanted.update({"model.mlp": (cfg.mlp_kind, gelu), "model.dense_bias": (cfg.use_bias, True),
                   "model.num_kv_heads": (cfg.kv_heads, cfg.num_heads),
                   "model.head_size": (cfg.head_dim, cfg.d_model // cfg.num_heads)})
  if family.name == "vit":
    wanted["model.pool"] = (cfg.pool, "cls")
  else:
    wanted["model.positions"] = (cfg.position_kind, "rope" if family.name == "llama" else "learned")
  for field, (value, expected) in wanted.items():
    if value != expected:
      raise ConfigError(f"{field}={value!r}: {family.architecture} needs {expected!r}")
  return family


def to_hf(model: nnx.Module, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> str:
  """Writes ``model`` as an HF directory (``config.json`` + safetensors in the parameter dtype,
  sharded above ``max_shard_bytes``) that ``from_pretrained`` loads to the same logits."""
  cfg = model.cfg
  family = check_exportable(cfg)
  params = jax.tree.map(np.asarray, models.params_of(model))
  head_bias = params.get("head", {}).get("bias")
  if family.name != "vit" and head_bias is not None:
    if np.any(head_bias != 0):
      raise ConfigError(f"the head has a nonzero bias, which {family.architecture}'s lm_head lacks")
    del params["head"]["bias"]
  tensors = {}
  for row in family.rows(cfg):
    value = _get(params, row.ours)
    for i, name in enumerate(_layers(row, cfg)):
      tensors[name] = row_to_hf(row.op, value[i] if "{i}" in row.hf else value, cfg)
  family.fuse(tensors, cfg)
  config = {"architectures": [family.architecture], "model_type": family.model_type,
            "dtype": cfg.param_dtype, **family.config_out(cfg)}
  return str(checkpoint_files.write(path, config, tensors, max_shard_bytes=max_shard_bytes))
