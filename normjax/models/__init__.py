"""LLaMA, GPT-2 and ViT in Flax NNX, with every norm kind and placement as a config switch."""

from flax import nnx

from normjax.models.config import InitConfig, ModelConfig, NormConfig, PlacementConfig
from normjax.models.llama import Llama
from normjax.models.vit import ViT

MODELS = {"llama": Llama, "gpt2": Llama, "vit": ViT}


def build(cfg: ModelConfig, *, seed: int = 0):
  """The model named by ``cfg.name`` (a ``ModelConfig`` is valid once made), initialized from ``seed``."""
  return MODELS[cfg.name](cfg, rngs=nnx.Rngs(seed))


__all__ = ["InitConfig", "ModelConfig", "NormConfig", "PlacementConfig", "Llama", "ViT", "MODELS", "build"]
