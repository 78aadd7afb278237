"""Small pytree helpers shared by the norms, the variance controls and the statistics."""

from __future__ import annotations

from typing import Any


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """Key names along a ``tree_flatten_with_path`` path, without flax.nnx's trailing ``value``."""
  names = [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path]
  if names and names[-1] == "value":
    names.pop()
  return tuple(names)
