"""The device mesh, the logical-axis rules that place parameters and optimizer state, and the
rows of a batch each process reads.

Rules are data (MaxText style): each logical axis name carried by a parameter (see
``normjax.models.layers``) maps to a mesh axis or to None (replicated). A dimension that the mesh
axis does not divide stays replicated, and a mesh axis is used at most once per parameter.

Across processes (hosts) the mesh is hybrid (``jax.experimental.mesh_utils``): ``tensor`` stays
within a process (its collectives are the most frequent); ``mesh.across_processes`` ("data" by
default, or "fsdp") spans processes first and the other batch axis takes the rest
(``split_over_processes``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from normjax.axes import BATCH_AXES, MESH_AXES
from normjax.validation import ConfigError

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


def split_over_processes(sizes: Mapping[str, int], num_processes: int, first: str = "data"
                         ) -> tuple[dict[str, int], dict[str, int]]:
  """(within a process, across processes) axis sizes whose products are ``sizes``: batch axis
  ``first`` ("data" or "fsdp") takes as many processes as it divides, the other batch axis the
  rest, ``tensor`` none. ConfigError when the mesh cannot be split so."""
  second = BATCH_AXES[1] if first == BATCH_AXES[0] else BATCH_AXES[0]
  across_first = math.gcd(sizes[first], num_processes)
  across = {first: across_first, second: num_processes // across_first, "tensor": 1}
  if sizes[second] % across[second]:
    raise ConfigError(
        f"mesh {dict(sizes)} cannot be split over {num_processes} processes: tensor stays within a "
        f"process, {first} (mesh.across_processes) takes {across_first} of them, and {second}="
        f"{sizes[second]} is not divisible by the remaining {across[second]}")
  return {axis: sizes[axis] // across[axis] for axis in MESH_AXES}, across


def make_mesh(sizes: Mapping[str, int], across_processes: str = "data") -> Mesh:
  """The mesh of ``sizes`` (axes ``MESH_AXES``) over the first data*fsdp*tensor devices; over all
  processes' devices, hybrid (``split_over_processes``), when there are several processes."""
  shape = [sizes[a] for a in MESH_AXES]
  if jax.process_count() == 1:
    return Mesh(mesh_utils.create_device_mesh(shape, jax.devices()[:math.prod(shape)]), MESH_AXES)
  within, across = split_over_processes(sizes, jax.process_count(), across_processes)
  grid = mesh_utils.create_hybrid_device_mesh([within[a] for a in MESH_AXES],
                                              [across[a] for a in MESH_AXES], jax.devices(),
                                              process_is_granule=True)
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
    shape = var.get_value().shape  # an array, or its ShapeDtypeStruct (``nnx.eval_shape``)
    logical = var.get_metadata().get("out_sharding") or (None,) * len(shape)
    return spec_for(shape, tuple(logical), mesh, rules)
  specs = jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
  return nnx.to_pure_dict(specs) if isinstance(specs, nnx.State) else specs


def shardings(specs: Any, mesh: Mesh) -> Any:
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the data and fsdp axes."""
  return NamedSharding(mesh, PartitionSpec(RULES["batch"]))


class BatchRows:
  """The rows of a ``[batch_size, ...]`` global batch that this process's devices hold under
  ``sharding`` (``rows``: int64 [local rows], ascending), and ``put``, which makes the global
  arrays from just those rows: no process reads, holds or sends the whole batch."""

  def __init__(self, sharding: NamedSharding, batch_size: int):
    self.sharding, self.batch_size = sharding, batch_size
    blocks = sorted({(index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
                     for index in sharding.addressable_devices_indices_map((batch_size,)).values()})
    self.rows = np.concatenate([np.arange(start, stop) for start, stop in blocks])
    # global first row of a device's block -> where the block starts in ``rows``
    self._offset = {int(start): int(np.searchsorted(self.rows, start)) for start, _ in blocks}

  def put(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """``{key: [local rows, ...]}`` (rows in ``self.rows`` order) -> ``{key: [batch_size, ...]}``."""
    def one(value: np.ndarray) -> jax.Array:
      def block(index: tuple[slice, ...]) -> np.ndarray:
        start = self._offset[index[0].start or 0]
        stop = start + (index[0].stop or self.batch_size) - (index[0].start or 0)
        return value[start:stop]
      return jax.make_array_from_callback((self.batch_size, *value.shape[1:]), self.sharding, block)
    return {key: one(value) for key, value in local.items()}
