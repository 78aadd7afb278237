"""``Norm`` for flax.linen: any registered norm kind as a module.

Parameters live in the ``params`` collection under their registry names (``scale``, ``bias``,
``alpha``, ...) with logical axis metadata (``("norm",)`` for per-feature vectors); state (running
statistics, sigma-Reparam's u) lives in the ``norm_state`` collection and is updated when called
with ``train=True`` and ``mutable=["norm_state"]``.

    y = Norm("rms_norm")(x)
    y, updates = model.apply(variables, x, train=True, mutable=["norm_state"])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from normjax import norms

STATE_COLLECTION = "norm_state"


class Norm(nn.Module):
  """A registered norm kind. ``options`` are the kind's construction options (the fields of
  ``normjax.norms.get(kind).options_type``)."""
  kind: str
  options: Mapping[str, Any] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, **call_options: Any) -> jax.Array:
    """``x: [..., d] -> [..., d]`` (for weight kinds, a kernel ``[..., out]``)."""
    spec = norms.get(self.kind)
    options = spec.options(**dict(self.options or {}))
    shapes = jax.eval_shape(lambda: spec.init_params(jax.random.key(0), x, options))
    params = {
        name: self.param(name, nn.with_logical_partitioning(
            lambda key, name=name: spec.init_params(key, x, options)[name],
            norms.logical_axes(shape)))
        for name, shape in shapes.items()}
    state_vars = {}
    if spec.stateful:
      state_shapes = jax.eval_shape(lambda: spec.init_state(x, options))
      state_vars = {name: self.variable(STATE_COLLECTION, name,
                                        lambda name=name: spec.init_state(x, options)[name])
                    for name in state_shapes}
    state = {name: var.value for name, var in state_vars.items()}
    y, new_state = spec.apply(x, params, state, train=train, options=options, **call_options)
    if train and not self.is_initializing() and self.is_mutable_collection(STATE_COLLECTION):
      for name, var in state_vars.items():
        var.value = new_state[name]
    return y
