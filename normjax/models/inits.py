"""Which initializer each matrix of a model draws from: ``model.init.base`` picks the family's
reference init, ``model.init.scheme`` (``normjax.variance``) a per-layer factor on the block kernels.

  base="family"  the family's published init:
                   LLaMA, GPT-2  every matrix N(0, std^2) (HF's initializer_range; GPT-2 (Radford
                                 et al. 2019) adds the 1/sqrt(2L) writers: scheme="scaled")
                   ViT           big_vision's models/vit.py (arXiv:2010.11929, arXiv:2205.01580):
                                 patch kernel LeCun normal (truncated, variance 1/fan_in), learned
                                 positions N(0, 1/width), class token and head zeros, block kernels
                                 Xavier uniform, MLP biases N(0, 1e-6^2), other biases zeros
  base="gpt2"    every matrix N(0, std^2), biases zeros: the ViT's init before the reference one

The class token's position row starts at zero under the ViT reference: big_vision adds positions
to the patches only, and ``cls + position[0]`` is then exactly its zero class token at init.
"""

from __future__ import annotations

import math
from typing import Any

from normjax import roles, variance
from normjax.models.layers import Init

BASES = ("family", "gpt2")
ZEROS = Init(0.0, "zeros")


def big_vision(cfg: Any) -> bool:
  """Whether ``cfg`` (a ``ModelConfig``) takes big_vision's ViT init."""
  return cfg.name == "vit" and cfg.init.base == "family"


def block_inits(cfg: Any, layer: Any) -> dict[str, Init]:
  """``{role name: Init}`` for the dense layers of block ``layer`` (1-based, may be traced)."""
  inits = {}
  for role in roles.ROLES[cfg.mlp_kind]:
    factor = variance.init_factor(cfg.init.scheme, role, layer, cfg.num_layers)
    if big_vision(cfg):
      inits[role.name] = Init(factor, "xavier_uniform", 1e-6 if role.sublayer == "mlp" else 0.0)
    else:
      inits[role.name] = Init(cfg.init.std * factor)
  return inits


def vit_inits(cfg: Any) -> dict[str, Init]:
  """The ViT's patch kernel, positions (patch rows; ``cls_position`` the class token's row),
  class token and head kernel. Under ``model.reparam`` the reference's zero head becomes
  N(0, std^2), the sigmaReparam paper's init: a zero kernel has no spectral norm to divide by."""
  if not big_vision(cfg):
    return dict.fromkeys(("patch", "position", "cls_position", "cls", "head"), Init(cfg.init.std))
  head = ZEROS if cfg.reparam == "none" else Init(cfg.init.std)  # std is 0.02 with this base
  return dict(patch=Init(1.0, "lecun_normal"), position=Init(1.0 / math.sqrt(cfg.width)),
              cls_position=ZEROS, cls=ZEROS, head=head)
