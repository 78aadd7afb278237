"""The device mesh and the logical-axis rules that place parameters, optimizer state and batches.

Rules are data (MaxText style): each logical axis name carried by a parameter (see
``normjax.models.layers``) maps to a mesh axis or to None (replicated). A dimension that the mesh
axis does not divide stays replicated, and a mesh axis is used at most once per parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from normjax.axes import BATCH_AXES, MESH_AXES

# logical axis -> mesh axis (or a tuple of mesh axes, or None)
RULES: Mapping[str, Any] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "vocab": "tensor",
    "norm": None,
    "layers": None,
}


def make_mesh(sizes: Mapping[str, int], devices: list[Any] | None = None) -> Mesh:
  devices = devices if devices is not None else jax.devices()
  count = int(np.prod([sizes[a] for a in MESH_AXES]))
  grid = np.asarray(devices[:count]).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES)


def spec_for(shape: tuple[int, ...], logical: tuple[str | None, ...], mesh: Mesh,
             rules: Mapping[str, Any] = RULES) -> PartitionSpec:
  """The mesh PartitionSpec for one array from its logical axis names."""
  used: set[str] = set()
  out = []
  for size, name in zip(shape, logical):
    target = rules.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    total = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or size % total:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def param_specs(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any] = RULES) -> Any:
  """PartitionSpecs (a pure-dict tree) for an nnx state whose variables carry ``out_sharding``."""
  def one(var):
    logical = var.get_metadata().get("out_sharding") or (None,) * var[...].ndim
    return spec_for(var[...].shape, tuple(logical), mesh, rules)
  specs = jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
  return nnx.to_pure_dict(specs) if isinstance(specs, nnx.State) else specs


def shardings(specs: Any, mesh: Mesh) -> Any:
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the data and fsdp axes."""
  return NamedSharding(mesh, PartitionSpec(RULES["batch"]))
