"""Config plumbing: ``parse_arg`` for ``file.py:key=value,...``, the sections every config shares, and
``validate(config)``, which rejects bad values (naming the field, the value and the choices) before
any JAX computation or dataset build.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections as mlc

from normjax import data
from normjax.models import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")


class ConfigError(ValueError):
  """A bad config value; the message names the field, the value and the valid choices."""


def _config_errors(fn):
  """Re-raises the ValueErrors of a validation function as ConfigError (same message)."""
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except ConfigError:
      raise
    except ValueError as error:
      raise ConfigError(str(error)) from None
  wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
  return wrapped


def parse_arg(arg: str | None, **defaults: Any) -> mlc.ConfigDict:
  """``"130m,norm=rms,depth=24"`` -> ConfigDict; a bare first word sets ``variant``.

  Values are converted to the type of their default; an unknown key is a ValueError listing the keys.
  """
  result = mlc.ConfigDict(defaults)
  for i, item in enumerate(filter(None, (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      if i or "variant" not in defaults:
        raise ValueError(f"config argument {item!r} is not key=value; keys: {sorted(defaults)}")
      key, value = "variant", item
    if key not in defaults:
      raise ValueError(f"config argument key {key!r} is unknown; valid keys: {sorted(defaults)}")
    kind = type(defaults[key])
    result[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return result


def load(spec: str, overrides: Mapping[str, Any] | None = None) -> mlc.ConfigDict:
  """``load("configs/llama.py:tiny,norm=ln", {"train.steps": 50})``: a config file's ``get_config(arg)``
  with dotted-key overrides (as ``--config.train.steps=50`` would set them); relative paths are
  resolved from the current directory, then from the repository root."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.exists():
    file = pathlib.Path(__file__).resolve().parents[1] / path
  if not file.exists():
    raise FileNotFoundError(f"config file {path!r} not found (from {spec!r})")
  module_spec = importlib.util.spec_from_file_location(f"normjax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for key, value in (overrides or {}).items():
    *parents, field = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if field not in node:
      raise ConfigError(f"{key} is not a config field; fields of {'.'.join(parents) or 'the config'}: "
                        f"{sorted(node.keys())}")
    node[field] = value
  return config


def train_sections(c: mlc.ConfigDict, *, steps: int, batch_size: int, lr: float, warmup: int) -> None:
  """The optimizer, schedule, checkpoint, statistics, TVR and mesh sections (same for every model)."""
  c.train = mlc.ConfigDict(dict(
      steps=steps,  # optimizer steps
      batch_size=batch_size,  # global batch (split over the data and fsdp mesh axes)
      log_every=10,  # steps between metrics.jsonl rows
      eval_every=100,  # steps between validation passes (and one at the end)
      eval_steps=4,  # validation batches per pass
  ))
  c.optim = mlc.ConfigDict(dict(
      lr=lr,  # peak learning rate of the warmup + cosine schedule
      warmup_steps=warmup,  # linear warmup from 0
      min_lr_ratio=0.1,  # cosine decays to lr * min_lr_ratio at train.steps
      b1=0.9,  # AdamW beta1
      b2=0.95,  # AdamW beta2
      eps=1e-8,  # AdamW epsilon
      weight_decay=0.1,  # decoupled weight decay on the decayed parameters
      decay_norms_and_biases=False,  # also decay norm gains/biases and dense biases (MaxText, nanodo do)
      clip_norm=1.0,  # global gradient-norm clip (0 = off)
  ))
  c.tvr = mlc.ConfigDict(dict(
      enabled=False,  # Target Variance Rescaling of block kernels
      every=50,  # optimizer steps between rescalings
      target_std=0.01,  # sigma_t (0.01 headline run; the authors' code default is 0.02)
      threshold=1.2,  # rescale when std / sigma_t exceeds this
      per_layer_target=False,  # target sigma_t / sqrt(l)
  ))
  c.ckpt = mlc.ConfigDict(dict(
      every=100,  # steps between asynchronous orbax saves (0 = only at the end)
      keep=3,  # checkpoints kept
  ))
  c.stats = mlc.ConfigDict(dict(
      every=25,  # steps between per-depth statistics rows (0 = off; costs a second compiled step)
  ))
  c.mesh = mlc.ConfigDict(dict(
      data=-1,  # data-parallel axis size (-1 = all devices left)
      fsdp=1,  # parameter-sharding axis size
      tensor=1,  # tensor-parallel axis size
      num_devices=0,  # devices to use (0 = all visible)
  ))


@_config_errors
def model_config(config: mlc.ConfigDict, data_info: dict[str, Any] | None = None) -> ModelConfig:
  """The ``ModelConfig`` of ``config.model``; 0 means "default"/"from the dataset" (see configs/vit.py).

  Without ``data_info`` a ViT's image fields that are 0 get placeholders, which is enough to
  validate everything else before the dataset is built.
  """
  values = config.model.to_dict()
  for key in ("num_kv_heads", "mlp_dim"):
    values[key] = values.get(key) or None
  values["placement"] = {**values.get("placement", {}),
                         "deepnorm_alpha": values.get("placement", {}).get("deepnorm_alpha") or None}
  if values.get("name") == "vit":
    source = data_info or {"image_shape": (8, 8, 1), "num_classes": 10}
    height, _, channels = source["image_shape"]
    values["image_size"] = values.get("image_size") or height
    values["channels"] = values.get("channels") or channels
    values["num_classes"] = values.get("num_classes") or source["num_classes"]
    values["patch_size"] = values.get("patch_size") or max(1, values["image_size"] // 4)
  cfg = ModelConfig.from_dict(values)
  if data_info is not None:
    _check_against_data(cfg, data_info)
  return cfg.validate()


def _check_against_data(cfg: ModelConfig, info: dict[str, Any]) -> None:
  expected_kind = "text" if cfg.name == "llama" else "image"
  if info["kind"] != expected_kind:
    raise ValueError(f"model.name={cfg.name!r} needs {expected_kind} data, but data.name gives "
                     f"{info['kind']} ({info['source']})")
  if cfg.name == "llama" and cfg.vocab_size < info["vocab_size"]:
    raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the data's {info['vocab_size']}")
  if cfg.name == "vit" and (cfg.image_size, cfg.image_size, cfg.channels) != tuple(info["image_shape"]):
    raise ValueError(f"model.image_size={cfg.image_size}, model.channels={cfg.channels} do not match the "
                     f"data's images {tuple(info['image_shape'])} ({info['source']}); set them to 0")


def mesh_shape(config: mlc.ConfigDict, num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with -1 filled from ``num_devices``; ValueError naming ``mesh.*`` otherwise."""
  sizes = {axis: int(config.mesh[axis]) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{axis}={size} must be a positive size or -1 (fill)")
  if len(free) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {free}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh: the fixed axes {sizes} (product {fixed}) do not divide the "
                       f"{num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh: data*fsdp*tensor = {sizes} has {math.prod(sizes.values())} devices, "
                     f"but {num_devices} are used (mesh.num_devices={config.mesh.num_devices}; "
                     "set the sizes or -1 to fill)")
  return sizes


def _positive(config: mlc.ConfigDict, field: str, *, allow_zero: bool = False) -> None:
  section, name = field.split(".")
  value = config[section][name]
  if value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f"{field}={value} must be {'>= 0' if allow_zero else 'positive'}")


@_config_errors
def validate(config: mlc.ConfigDict, available_devices: int) -> tuple[ModelConfig, dict[str, int]]:
  """Checks the whole config; returns the (placeholder) model config and the mesh sizes."""
  model = model_config(config)
  data.validate(config.data)
  requested = int(config.mesh.num_devices)
  if requested < 0 or requested > available_devices:
    raise ValueError(f"mesh.num_devices={requested} but {available_devices} devices are visible "
                     "(0 = use all)")
  sizes = mesh_shape(config, requested or available_devices)
  for field in ("train.steps", "train.batch_size", "train.log_every", "optim.lr", "ckpt.keep"):
    _positive(config, field)
  for field in ("train.eval_every", "train.eval_steps", "optim.warmup_steps", "optim.clip_norm",
                "optim.weight_decay", "ckpt.every", "stats.every"):
    _positive(config, field, allow_zero=True)
  if config.optim.warmup_steps > config.train.steps:
    raise ValueError(f"optim.warmup_steps={config.optim.warmup_steps} exceeds train.steps={config.train.steps}")
  shards = sizes["data"] * sizes["fsdp"]
  if config.train.batch_size % shards:
    raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by the "
                     f"{shards} batch shards (mesh.data * mesh.fsdp = {sizes['data']} * {sizes['fsdp']})")
  if config.tvr.enabled:
    _positive(config, "tvr.every")
  return model, sizes
