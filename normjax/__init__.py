"""normjax: every normalization and every norm placement as a config switch, in JAX/Flax."""

from normjax import norms

__version__ = "0.1.0"
__all__ = ["norms", "__version__"]
