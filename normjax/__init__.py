"""normjax: every normalization and every norm placement as a config switch, in JAX/Flax.

``normjax.norms`` (and every other submodule) loads on first use, so that importing a light
submodule (``normjax.train.signals``) does not import JAX.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["norms", "__version__"]


def __getattr__(name: str):
  if name == "norms":
    return importlib.import_module("normjax.norms")
  raise AttributeError(f"module 'normjax' has no attribute {name!r}")
