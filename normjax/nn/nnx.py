"""``Norm`` for flax.nnx: any registered norm kind as an eager NNX module.

Parameters are ``nnx.Param`` attributes named as in the registry, with logical axes in their
``out_sharding`` metadata; state is held in ``NormState`` variables and updated in place by a call
with ``train=True``.

    norm = Norm("rms_norm", 512, rngs=nnx.Rngs(0))
    y = norm(x)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from normjax import norms


class NormState(nnx.Variable):
  """Non-trainable norm state: running statistics, sigma-Reparam's u, PowerNorm's nu."""


def _example(features_or_example: Any, dtype: Any) -> Any:
  if isinstance(features_or_example, int):
    return jax.ShapeDtypeStruct((features_or_example,), dtype)
  return features_or_example


class Norm(nnx.Module):
  """A registered norm kind.

  Args:
    kind: a registry name or alias (``normjax.norms.names()``).
    features_or_example: the feature count (input ``[..., features]``), or an example input /
      ``jax.ShapeDtypeStruct`` when shape matters (group norms need ``[batch, ..., C]``) or values
      matter (sigma_reparam initializes from the weight itself).
    rngs: optional; no built-in kind draws random parameters.
    **options: the kind's construction options (``normjax.norms.get(kind).defaults``).
  """

  def __init__(self, kind: str, features_or_example: Any, *, rngs: nnx.Rngs | None = None,
               **options: Any):
    spec = norms.get(kind)
    self.kind = spec.name
    self.options = spec.options(**options)
    example = _example(features_or_example, jnp.float32)
    key = rngs.params() if rngs is not None else jax.random.key(0)
    params = spec.init_params(key, example, **self.options)
    state = spec.init_state(example, **self.options)
    self.param_names = tuple(params)
    self.state_names = tuple(state)
    for name, value in params.items():
      setattr(self, name, nnx.Param(value, out_sharding=norms.logical_axes(value),
                                    eager_sharding=False))
    for name, value in state.items():
      setattr(self, name, NormState(value))

  def __call__(self, x: jax.Array, *, train: bool = False, **call_options: Any) -> jax.Array:
    """``x: [..., d] -> [..., d]``; with ``train=True`` the state variables are updated."""
    spec = norms.get(self.kind)
    params = {name: getattr(self, name)[...] for name in self.param_names}
    state = {name: getattr(self, name).get_value() for name in self.state_names}
    y, new_state = spec.apply(x, params, state, train=train, **self.options, **call_options)
    if train:
      for name in self.state_names:
        getattr(self, name).set_value(new_state[name])
    return y
