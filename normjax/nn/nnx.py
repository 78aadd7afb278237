"""``Norm`` for flax.nnx: any registered norm kind as an eager NNX module.

Parameters are ``normjax.params.NormParam`` attributes (an ``nnx.Param`` subtype, so optimizers see
them as parameters while the weight-decay mask and the statistics tell them apart by type) named as
in the registry, with logical axes in their ``out_sharding`` metadata; state is held in ``NormState``
variables and updated in place by a call with ``train=True``.

    norm = Norm("rms_norm", 512, rngs=nnx.Rngs(0))
    y = norm(x)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from normjax import norms
from normjax.params import NormParam, NormState, Scalar

__all__ = ["Norm", "NormParam", "NormState"]


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
    **options: the kind's construction options (fields of ``normjax.norms.get(kind).options_type``).
  """

  def __init__(self, kind: str, features_or_example: Any, *, rngs: nnx.Rngs | None = None,
               **options: Any):
    spec = norms.get(kind)
    self.kind = spec.name
    self.options = spec.options(**options)
    example = _example(features_or_example, jnp.float32)
    key = rngs.params() if rngs is not None else jax.random.key(0)
    params = spec.init_params(key, example, self.options)
    state = spec.init_state(example, self.options)
    self.param_names = tuple(params)
    self.state_names = tuple(state)
    for name, value in params.items():
      kind = Scalar if jnp.ndim(value) == 0 else NormParam
      setattr(self, name, kind(value, out_sharding=norms.logical_axes(value), eager_sharding=False))
    for name, value in state.items():
      setattr(self, name, NormState(value))

  def _run(self, x: jax.Array, train: bool, fn: Any) -> jax.Array:
    """Calls ``fn(x, params, state)`` and writes the new state back when training."""
    params = {name: getattr(self, name)[...] for name in self.param_names}
    state = {name: getattr(self, name).get_value() for name in self.state_names}
    y, new_state = fn(x, params, state)
    if train:
      for name in self.state_names:
        getattr(self, name).set_value(new_state[name])
    return y

  def __call__(self, x: jax.Array, *, train: bool = False, **call_options: Any) -> jax.Array:
    """``x: [..., d] -> [..., d]``; with ``train=True`` the state variables are updated."""
    spec = norms.get(self.kind)
    return self._run(x, train, lambda x, p, s: spec.apply(x, p, s, train=train, options=self.options,
                                                          **call_options))
