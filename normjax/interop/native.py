"""normjax's own model directories, and ``load``: weights from wherever a user has them.

A *model directory* is ``model.json`` (the ``ModelConfig``) plus ``params/`` (an orbax checkpoint of
the parameter dict); ``save`` writes one, ``python -m normjax.convert`` writes converted models as
one. A *training workdir* also counts as a source: the loop writes its ``model.json`` and its
``checkpoints/<step>/state`` hold the parameters, of which the newest step is read.

    cfg, model = load("runs/llama_tiny")          # or an HF directory, or a model directory
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from normjax import models
from normjax.interop import checkpoint_files, hf
from normjax.models.config import ModelConfig
from normjax.validation import ConfigError

MODEL_JSON = "model.json"
PARAMS = "params"
NUMERICS = ("dtype", "param_dtype", "scan_layers", "remat")  # a user's choice, not the source's


def write_model_json(path: str | os.PathLike, cfg: ModelConfig) -> None:
  (pathlib.Path(path) / MODEL_JSON).write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")


def save(model: nnx.Module, path: str | os.PathLike) -> pathlib.Path:
  """Writes ``model`` as a model directory (``model.json`` + ``params/``)."""
  root = pathlib.Path(path).resolve()
  root.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(root / PARAMS, models.params_of(model), force=True)
  write_model_json(root, model.cfg)
  return root


def _kind(path: pathlib.Path) -> str:
  if (path / MODEL_JSON).is_file():
    return "workdir" if (path / "checkpoints").is_dir() else "model"
  if (path / checkpoint_files.CONFIG).is_file() and "model_type" in checkpoint_files.read_config(path):
    return "hf"
  raise ConfigError(f"{path} holds no weights normjax reads: a Hugging Face directory (config.json "
                    f"+ *.safetensors), a model directory ({MODEL_JSON} + {PARAMS}/) or a training "
                    f"workdir ({MODEL_JSON} + checkpoints/)")


def source_config(path: str | os.PathLike) -> ModelConfig:
  """The ``ModelConfig`` of a source, without reading its weights."""
  path = pathlib.Path(path)
  if _kind(path) == "hf":
    return hf.hf_config(path)
  return ModelConfig.from_dict(json.loads((path / MODEL_JSON).read_text()))


def _newest_state(workdir: pathlib.Path) -> pathlib.Path:
  steps = sorted((int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()),
                 reverse=True)
  for step in steps:
    if (workdir / "checkpoints" / str(step) / "commit_success.txt").exists():
      return workdir / "checkpoints" / str(step) / "state"
  raise ConfigError(f"{workdir}/checkpoints has no finished checkpoint")


def read_params(path: str | os.PathLike, cfg: ModelConfig) -> dict[str, Any]:
  """A source's parameters (NumPy) for ``cfg`` (``source_config`` with the caller's dtypes)."""
  path = pathlib.Path(path).resolve()
  kind = _kind(path)
  if kind == "hf":
    return hf.read_params(path, cfg)
  with ocp.StandardCheckpointer() as checkpointer:
    if kind == "model":
      params = checkpointer.restore(path / PARAMS)
    else:
      params = checkpointer.restore(_newest_state(path))["params"]
  return jax.tree.map(np.asarray, params)


def load(path: str | os.PathLike, **numerics: Any) -> tuple[ModelConfig, nnx.Module]:
  """``(ModelConfig, model)`` from any source; ``numerics`` override ``NUMERICS`` fields."""
  unknown = set(numerics) - set(NUMERICS)
  if unknown:
    raise TypeError(f"load() takes only {NUMERICS} as overrides, not {sorted(unknown)}")
  cfg = source_config(path).replace(**numerics)
  return cfg, models.with_params(cfg, read_params(path, cfg))
