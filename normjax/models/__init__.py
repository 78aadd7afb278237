"""LLaMA, GPT-2 and ViT in Flax NNX, with every norm kind and placement as a config switch."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from normjax.models.config import InitConfig, ModelConfig, NormConfig, PlacementConfig
from normjax.models.llama import Llama
from normjax.models.vit import ViT

MODELS = {"llama": Llama, "gpt2": Llama, "vit": ViT}


def build(cfg: ModelConfig, *, seed: int = 0):
  """The model named by ``cfg.name`` (a ``ModelConfig`` is valid once made), initialized from ``seed``."""
  return MODELS[cfg.name](cfg, rngs=nnx.Rngs(seed))



def params_of(model: nnx.Module) -> dict[str, Any]:
  """The model's parameters as a plain nested dict of arrays (the layout of ``nnx.state``)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def with_params(cfg: ModelConfig, params: dict[str, Any]) -> nnx.Module:
  """A model of ``cfg`` holding ``params`` (cast to each parameter's dtype); dense biases absent
  from ``params`` become zeros, any other missing parameter is a ValueError. No random init runs
  for the parameters (shapes come from ``nnx.eval_shape``), so a large imported model is not built
  twice; other variables (norm statistics) are initialized as ``build`` would."""
  graphdef, abstract, rest = nnx.split(nnx.eval_shape(lambda: build(cfg)), nnx.Param, ...)
  if jax.tree.leaves(rest):
    rest = nnx.state(build(cfg), nnx.Not(nnx.Param))

  def pick(path, leaf):
    keys = [k.key for k in path]
    node = params
    for key in keys:
      if not isinstance(node, dict) or key not in node:
        if keys[-1] == "bias":
          return jnp.zeros(leaf.shape, leaf.dtype)
        raise ValueError(f"the parameters lack {'/'.join(map(str, keys))}")
      node = node[key]
    if tuple(node.shape) != tuple(leaf.shape):
      raise ValueError(f"{'/'.join(map(str, keys))} has shape {tuple(node.shape)}, the model "
                       f"expects {tuple(leaf.shape)}")
    return jnp.asarray(node, leaf.dtype)

  values = jax.tree_util.tree_map_with_path(pick, nnx.to_pure_dict(abstract))
  nnx.replace_by_pure_dict(abstract, values)
  return nnx.merge(graphdef, abstract, rest)


__all__ = ["InitConfig", "ModelConfig", "NormConfig", "PlacementConfig", "Llama", "ViT", "MODELS",
           "build", "params_of", "with_params"]
