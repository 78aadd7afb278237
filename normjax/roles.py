"""The dense layers of a transformer block by role: the one table the models, the init schemes and
the LN -> RMSNorm conversion read.

A *reader* consumes the (normalized) residual stream, a *writer* adds its output to the stream, and
every role belongs to the attention or the MLP sublayer. DeepNet's beta (arXiv:2203.00555) scales
the value and output projections and the whole MLP, never the query and key projections.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Role:
  name: str  # the Dense attribute in the sublayer module (q, k, v, o, gate, up, down, fc1, fc2)
  sublayer: str  # "attn" or "mlp"
  reads_stream: bool  # its input is the sublayer's (normalized) input
  writes_stream: bool  # its output is added to the residual stream
  deepnorm_beta: bool  # DeepNet scales its init by beta


def _attention() -> tuple[Role, ...]:
  return (Role("q", "attn", True, False, False), Role("k", "attn", True, False, False),
          Role("v", "attn", True, False, True), Role("o", "attn", False, True, True))


# by MLP kind (``ModelConfig.mlp_kind``): the gated SwiGLU has three dense layers, a GELU MLP two
_GATED = _attention() + (Role("gate", "mlp", True, False, True), Role("up", "mlp", True, False, True),
                         Role("down", "mlp", False, True, True))
_PLAIN = _attention() + (Role("fc1", "mlp", True, False, True), Role("fc2", "mlp", False, True, True))
ROLES: dict[str, tuple[Role, ...]] = {"swiglu": _GATED, "gelu": _PLAIN, "gelu_tanh": _PLAIN}


def of(mlp_kind: str, role: str) -> Role:
  """The role called ``role`` in a block whose MLP is ``mlp_kind``."""
  return next(r for r in ROLES[mlp_kind] if r.name == role)


def readers(mlp_kind: str, sublayer: str) -> tuple[str, ...]:
  return tuple(r.name for r in ROLES[mlp_kind] if r.sublayer == sublayer and r.reads_stream)


def writers(mlp_kind: str, sublayer: str) -> tuple[str, ...]:
  return tuple(r.name for r in ROLES[mlp_kind] if r.sublayer == sublayer and r.writes_stream)
