"""A Hugging Face model directory on disk: ``config.json`` plus one ``model.safetensors`` or several
shards listed by ``model.safetensors.index.json``. Read and written with the ``safetensors``
package's NumPy interface (bfloat16 through ``ml_dtypes``), so no torch is needed.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from normjax.validation import ConfigError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# transformers refuses a safetensors file whose metadata names no framework it knows
METADATA = {"format": "pt"}


def read_config(path: str | os.PathLike) -> dict:
  """The directory's ``config.json`` as a dict; a missing directory or file is one ConfigError."""
  file = pathlib.Path(path) / CONFIG
  if not file.is_file():
    raise ConfigError(f"{path} is not a Hugging Face model directory: it has no {CONFIG}")
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as error:
    raise ConfigError(f"{file} is not valid JSON: {error}") from None


def _files(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """``{tensor name: file}`` from the index, the single file, or every ``*.safetensors``."""
  if (root / INDEX).is_file():
    weight_map = json.loads((root / INDEX).read_text())["weight_map"]
    return {name: root / file for name, file in weight_map.items()}
  files = [root / SINGLE] if (root / SINGLE).is_file() else sorted(root.glob("*.safetensors"))
  if not files:
    other = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    hint = f" (it has {other}: re-save it with save_pretrained(safe_serialization=True))" if other else ""
    raise ConfigError(f"{root} has no *.safetensors weights{hint}")
  out = {}
  for file in files:
    with safe_open(file, "np") as f:
      out.update({name: file for name in f.keys()})
  return out


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of the directory by name (NumPy arrays in their stored dtype)."""
  root = pathlib.Path(path)
  by_file: dict[pathlib.Path, list[str]] = {}
  for name, file in _files(root).items():
    if not file.is_file():
      raise ConfigError(f"{root / INDEX} lists {file.name} for {name!r}, but the file is missing")
    by_file.setdefault(file, []).append(name)
  tensors = {}
  for file, names in by_file.items():
    with safe_open(file, "np") as f:
      tensors.update({name: f.get_tensor(name) for name in names})
  return tensors


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> Iterator[dict[str, np.ndarray]]:
  """Consecutive groups of tensors of at most ``max_bytes`` each (a larger tensor alone)."""
  shard, size = {}, 0
  for name, value in tensors.items():
    if shard and size + value.nbytes > max_bytes:
      yield shard
      shard, size = {}, 0
    shard[name] = value
    size += value.nbytes
  if shard:
    yield shard


def write(path: str | os.PathLike, config: Mapping, tensors: Mapping[str, np.ndarray], *,
          max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
  """Writes ``config.json`` and the tensors (one file, or shards of at most ``max_shard_bytes``
  with their index, named as ``save_pretrained`` names them)."""
  root = pathlib.Path(path)
  root.mkdir(parents=True, exist_ok=True)
  (root / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  shards = list(_shards({k: np.ascontiguousarray(v) for k, v in tensors.items()}, max_shard_bytes))
  if len(shards) == 1:
    save_file(shards[0], root / SINGLE, metadata=METADATA)
    return root
  weight_map = {}
  for i, shard in enumerate(shards, 1):
    name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, root / name, metadata=METADATA)
    weight_map.update(dict.fromkeys(shard, name))
  total = sum(v.nbytes for v in tensors.values())
  (root / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                       indent=2, sort_keys=True) + "\n")
  return root
