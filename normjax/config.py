"""Config plumbing: ``parse_arg`` for ``file.py:key=value,...``, ``load`` with dotted overrides, and
``validate(config)``, which checks the whole config once (naming the field, the value and the
choices) before any JAX computation or dataset build and returns the validated typed objects the
loop uses from then on.

Fields a config leaves to "the default" or "from the dataset" hold None (``placeholder(int)``);
``model_config`` is the one place they are resolved.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import pathlib
import re
import typing
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections as mlc
from ml_collections.config_dict import FieldReference

from normjax import data, norms, variance
from normjax.axes import BATCH_AXES, MESH_AXES
from normjax.models import ModelConfig
from normjax.train import mesh as mesh_lib
from normjax.train.optim import OPTIMIZERS, OptimConfig
from normjax.validation import ConfigError, check_choice, closest, parse_value

__all__ = ["MAY_CHANGE_ON_RESUME", "ConfigError", "Validated", "check_choice", "differences",
           "from_source", "load", "mesh_shape", "model_config", "parse_arg", "placeholder",
           "resume_changes", "section", "set_field", "validate"]


def placeholder(kind: type, value: Any = None) -> FieldReference:
  """A typed config field that may hold None ("the default" or "from the dataset"); overriding it
  from the command line parses the text as ``kind``."""
  return FieldReference(value, field_type=kind)


def _errors_as_config_errors(fn):
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


def set_field(node: mlc.ConfigDict, field: str, value: Any, name: str) -> None:
  """``node[field] = value``; text is parsed as the field's type (``parse_value``), so "true",
  "1e-3" and "24" from a command line become a bool, a float and an int."""
  if field not in node:
    close = closest(field, sorted(node.keys()))
    hint = f" (did you mean {'.'.join([*name.split('.')[:-1], close])}?)" if close else ""
    raise ConfigError(f"{name} is not a config field{hint}; valid fields: {sorted(node.keys())}")
  kind = node.get_type(field)
  if isinstance(value, str) and kind in (bool, int, float):
    value = parse_value(name, value, kind)
  try:
    node[field] = value
  except TypeError as error:
    raise ConfigError(f"{name}={value!r}: {error}") from None


def parse_arg(arg: str | None, **defaults: Any) -> mlc.ConfigDict:
  """``"130m,norm=rms,depth=24"`` -> ConfigDict; a bare first word sets ``variant``.

  A default is a value or ``placeholder(type)`` (None unless given). Values are parsed as the
  default's type; an unknown key is a ConfigError listing the keys.
  """
  result = mlc.ConfigDict(defaults)
  for i, item in enumerate(filter(None, (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      if i or "variant" not in defaults:
        raise ConfigError(f"config argument {item!r} is not key=value; keys: {sorted(defaults)}")
      key, value = "variant", item
    if key not in defaults:
      raise ConfigError(f"config argument key {key!r} is unknown; valid keys: {sorted(defaults)}")
    set_field(result, key, value, f"config argument {key}")
  return result


def load(spec: str, overrides: Mapping[str, Any] | None = None) -> mlc.ConfigDict:
  """``load("configs/llama.py:tiny,norm=ln", {"train.steps": 50})``: a config file's ``get_config(arg)``
  with dotted-key overrides (as ``--config.train.steps=50`` would set them; text values are parsed
  as the field's type); relative paths are resolved from the current directory, then from the
  repository root."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.exists():
    file = pathlib.Path(__file__).resolve().parents[1] / path
  if not file.exists():
    raise ConfigError(f"config file {path!r} not found (from {spec!r})")
  module_spec = importlib.util.spec_from_file_location(f"normjax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  items = list((overrides or {}).items())
  # a kind's options last: their types come from the kind, which an earlier override may change
  for key, value in sorted(items, key=lambda item: item[0].rsplit(".", 1)[0] in _OPTION_SECTIONS):
    *parents, field = key.split(".")
    node = _node(config, parents, key)
    if ".".join(parents) in _OPTION_SECTIONS:
      value = _OPTION_SECTIONS[".".join(parents)](config, field, value, key)
      node[field] = value
    else:
      set_field(node, field, value, key)
  return config


def _node(config: mlc.ConfigDict, parents: list[str], key: str) -> mlc.ConfigDict:
  """The section holding ``key``; an unknown name is a one-line ConfigError with the closest names."""
  node = config
  for depth, parent in enumerate(parents):
    if not isinstance(node, mlc.ConfigDict) or parent not in node:
      where = ".".join(parents[:depth])
      fields = sorted(node.keys()) if isinstance(node, mlc.ConfigDict) else []
      close = closest(parent, fields)
      hint = f" (did you mean {'.'.join([*parents[:depth], close])}?)" if close else ""
      raise ConfigError(f"{key}: {'.'.join(parents[:depth + 1])} is not a config field{hint}; "
                        f"fields of {where or 'the config'}: {fields}")
    node = node[parent]
  return node


def _norm_option(config: mlc.ConfigDict, field: str, value: Any, key: str) -> Any:
  """A value for ``model.norm.options.<field>``, typed by the kind's options record (text from a
  command line parsed as the field's type; an option the kind lacks names the valid ones)."""
  kind = config.model.norm.kind
  options_type = norms.get(kind).options_type
  valid = {f.name: f for f in dataclasses.fields(options_type)}
  if field not in valid:
    close = closest(field, sorted(valid))
    hint = f" (did you mean {close!r}?)" if close else ""
    raise ConfigError(f"{key}: norm {kind!r} has no option {field!r}{hint}; valid options: {sorted(valid)}")
  if not isinstance(value, str):
    return value
  kind_of = typing.get_type_hints(options_type).get(field)
  if kind_of in (bool, int, float, str):
    return parse_value(key, value, kind_of)
  try:  # tuples, None, numbers of a union type
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


# Sections that are open dicts whose fields depend on another field (the norm kind's options).
_OPTION_SECTIONS = {"model.norm.options": _norm_option}


def section(record: Any, **extra: Any) -> mlc.ConfigDict:
  """A config section holding a typed record's fields (its defaults are the one home), plus
  ``extra`` fields that only the config has (e.g. ``enabled``)."""
  return mlc.ConfigDict({**extra, **dataclasses.asdict(record)})


class Validated(NamedTuple):
  """What ``validate`` returns: every section the loop reads, checked and typed."""
  model: ModelConfig
  data: data.DataConfig
  optim: OptimConfig
  mesh: dict[str, int]  # axis -> size, -1 filled
  tvr: variance.TVRConfig | None  # None when disabled
  trainable: str  # train.trainable: all, norms or a regular expression over parameter paths


VOCAB_MULTIPLE = 128


def from_source(config: mlc.ConfigDict) -> tuple[ModelConfig, dict[str, tuple[Any, Any]]]:
  """With ``train.init_from``: the source's architecture with this config's numerics
  (``interop.native.NUMERICS`` and ``model.norm.impl``), and ``{field: (config value, source
  value)}`` for the config's other model fields the source overrides (reported at start-up)."""
  from normjax import interop  # local: interop imports the models, which this module's users need

  source = interop.source_config(config.train.init_from)
  numerics = {key: config.model[key] for key in interop.native.NUMERICS}
  cfg = source.replace(**numerics, norm=dataclasses.replace(source.norm, impl=config.model.norm.impl))
  ours = _flat(config.model.to_dict())
  theirs = _flat(dataclasses.asdict(cfg))
  ignored = {f"model.{k}": (v, theirs[k]) for k, v in ours.items()
             if v is not None and k in theirs and v != theirs[k] and not isinstance(v, Mapping)}
  return cfg, ignored


def model_config(config: mlc.ConfigDict, data_cfg: data.DataConfig) -> ModelConfig:
  """The ``ModelConfig`` of ``config.model``: the one place None fields that come from the dataset
  (a LLaMA's vocab_size, rounded up to a multiple of 128; a ViT's image_size, channels,
  num_classes; patch_size = image_size // 4) are resolved. With ``train.init_from`` the
  architecture is the source's (``from_source``)."""
  if config.train.get("init_from"):
    cfg, _ = from_source(config)
    _check_kind(cfg.name, data_cfg)
    _check_against_data(cfg, data_cfg, source=config.train.init_from)
    return cfg
  values = config.model.to_dict()
  expected_kind = _check_kind(values.get("name"), data_cfg)
  if expected_kind == "text" and values.get("vocab_size") is None:
    # the tokenizer's size rounded up to a multiple of 128 (matmul tiles); the extra rows are never
    # a target, so training only pushes their logits down
    values["vocab_size"] = -(-data_cfg.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  if expected_kind == "image":
    height, _, channels = data_cfg.image_shape
    resolved = {"image_size": height, "channels": channels, "num_classes": data_cfg.num_classes}
    for key, value in resolved.items():
      if values.get(key) is None:
        values[key] = value
    if values.get("patch_size") is None:
      values["patch_size"] = max(1, values["image_size"] // 4)
  cfg = ModelConfig.from_dict(values)
  _check_against_data(cfg, data_cfg)
  return cfg


def _check_kind(name: str, data_cfg: data.DataConfig) -> str:
  expected_kind = "image" if name == "vit" else "text"
  if data_cfg.kind != expected_kind:
    raise ConfigError(f"model.name={name!r} needs {expected_kind} data, but "
                      f"data.name={data_cfg.name!r} gives {data_cfg.kind}")
  return expected_kind


def _check_against_data(cfg: ModelConfig, d: data.DataConfig, source: str = "") -> None:
  """The model against its data; ``source`` (``train.init_from``) changes only the advice."""
  if cfg.causal and cfg.vocab_size < d.vocab_size:
    if source:
      raise ConfigError(f"train.init_from={source!r} has a vocabulary of {cfg.vocab_size}, smaller "
                        f"than the tokenizer's {d.vocab_size} (data.tokenizer): train with the "
                        "source's own tokenizer")
    raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                      f"of {d.vocab_size} (data.tokenizer); set None to take it from the tokenizer")
  if cfg.causal and cfg.position_kind == "learned" and d.seq_len > cfg.max_positions:
    raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_positions={cfg.max_positions}, "
                      "the longest sequence the learned positions cover")
  if cfg.name == "vit" and (cfg.image_size, cfg.image_size, cfg.channels) != tuple(d.image_shape):
    raise ConfigError(f"model.image_size={cfg.image_size}, model.channels={cfg.channels} do not match "
                      f"the data's images {tuple(d.image_shape)} (data.name={d.name!r}); set them to "
                      "None to take them from the data")


def mesh_shape(config: mlc.ConfigDict, num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with -1 filled from ``num_devices``; ConfigError naming ``mesh.*`` otherwise."""
  sizes = {axis: int(config.mesh[axis]) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}={size} must be a positive size or -1 (fill)")
  if len(free) > 1:
    raise ConfigError(f"mesh: only one axis may be -1, got {free}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh: the fixed axes {sizes} (product {fixed}) do not divide the "
                        f"{num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"mesh: data*fsdp*tensor = {sizes} has {math.prod(sizes.values())} devices, "
                      f"but {num_devices} are used (mesh.num_devices={config.mesh.num_devices}; "
                      "set the sizes or -1 to fill)")
  return sizes


def _positive(config: mlc.ConfigDict, field: str, *, allow_zero: bool = False) -> None:
  section_name, name = field.split(".")
  value = config[section_name][name]
  if value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(f"{field}={value} must be {'>= 0' if allow_zero else 'positive'}")


def _mesh(config: mlc.ConfigDict, available_devices: int, num_processes: int) -> dict[str, int]:
  requested = int(config.mesh.num_devices)
  if requested < 0 or requested > available_devices:
    raise ConfigError(f"mesh.num_devices={requested} but {available_devices} devices are visible "
                      "(0 = use all)")
  if num_processes > 1 and requested not in (0, available_devices):
    raise ConfigError(f"mesh.num_devices={requested}: a run on {num_processes} processes uses every "
                      f"device of every process ({available_devices}); set 0 (all)")
  sizes = mesh_shape(config, requested or available_devices)
  across = check_choice(config.mesh.across_processes, "mesh.across_processes", BATCH_AXES)
  if num_processes > 1:
    mesh_lib.split_over_processes(sizes, num_processes, across)
  return sizes


@_errors_as_config_errors
def validate(config: mlc.ConfigDict, available_devices: int, num_processes: int = 1) -> Validated:
  """Checks the whole config once for ``available_devices`` devices on ``num_processes``
  processes; returns the typed, validated sections (``Validated``)."""
  data_cfg = data.validate(config.data)
  model = model_config(config, data_cfg)
  sizes = _mesh(config, available_devices, num_processes)
  optim = OptimConfig.from_section(config.optim)
  for field in ("train.steps", "train.batch_size", "train.log_every", "ckpt.keep"):
    _positive(config, field)
  for field in ("train.eval_every", "train.eval_steps", "ckpt.every", "stats.every"):
    _positive(config, field, allow_zero=True)
  if config.optim.warmup_steps > config.train.steps:
    raise ConfigError(f"optim.warmup_steps={config.optim.warmup_steps} exceeds "
                      f"train.steps={config.train.steps}")
  shards = sizes["data"] * sizes["fsdp"]
  if config.train.batch_size % shards:
    raise ConfigError(f"train.batch_size={config.train.batch_size} is not divisible by the "
                      f"{shards} batch shards (mesh.data * mesh.fsdp = {sizes['data']} * {sizes['fsdp']})")
  tvr = None
  if config.tvr.enabled:
    _positive(config, "tvr.every")
    tvr = variance.TVRConfig(**{k: v for k, v in config.tvr.items() if k != "enabled"})
  trainable = _trainable(config.train.get("trainable", "all"))
  return Validated(model, data_cfg, optim, sizes, tvr, trainable)


def _trainable(value: Any) -> str:
  """``train.trainable``: all, norms or a regular expression (which parameters it selects is
  checked against the model when the optimizer is built)."""
  if not isinstance(value, str) or not value:
    raise ConfigError(f"train.trainable={value!r} must be all, norms or a regular expression")
  if value not in ("all", "norms"):
    try:
      re.compile(value)
    except re.error as error:
      raise ConfigError(f"train.trainable={value!r} is not all, norms or a regular expression: "
                        f"{error}") from None
  return value


# What a resumed run may change: how long it runs, how often it logs, evaluates, saves and records
# statistics, where the data is cached, and the mesh (orbax reshards the state on restore). Anything
# else changes what is computed, so resuming with it is refused unless explicitly allowed. A longer
# train.steps also stretches the cosine schedule of the remaining steps.
MAY_CHANGE_ON_RESUME = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.eval_steps", "ckpt.every",
    "ckpt.keep", "stats.every", "data.data_dir", *(f"mesh.{axis}" for axis in MESH_AXES),
    "mesh.num_devices", "mesh.across_processes"})


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def differences(saved: Mapping[str, Any], config: mlc.ConfigDict, ignore: frozenset[str] = frozenset()
                ) -> dict[str, tuple[Any, Any]]:
  """``{field: (saved value, new value)}`` for every field outside ``ignore`` that differs between
  a config's JSON and ``config``; "<absent>" marks a field only one of them has."""
  old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
  absent = "<absent>"
  unread = tuple(f"optim.{name}." for name in OPTIMIZERS if name != new.get("optim.name", "adamw"))
  return {key: (old.get(key, absent), new.get(key, absent)) for key in sorted(old.keys() | new.keys())
          if key not in ignore and old.get(key, absent) != new.get(key, absent)
          and not key.startswith(unread)
          and not (key not in old and key in ADDED and new.get(key) == ADDED[key])}


# Fields added after runs were saved, with the value that computes what the older code did: a saved
# config without one resumes when it holds that value (the options of an optimizer other than the
# selected one are never read, so they never count).
ADDED = {"optim.name": "adamw", "train.trainable": "all", "model.reparam": "none"}


def resume_changes(saved: Mapping[str, Any], config: mlc.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """``differences`` between a checkpoint's saved config and ``config`` outside
  ``MAY_CHANGE_ON_RESUME``: what resuming would change."""
  return differences(saved, config, MAY_CHANGE_ON_RESUME)
