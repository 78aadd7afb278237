"""The config-driven, sharded training loop (``python -m normjax.train``).

The names below load on first use, so ``python -m normjax.train`` can install its signal handlers
(``normjax.train.signals``, standard library only) before JAX is imported.
"""

import importlib

_EXPORTS = {"train": "normjax.train.loop", "NonFiniteLoss": "normjax.train.loop",
            "Interrupted": "normjax.train.signals", "CheckpointError": "normjax.train.checkpoints",
            "ResumeRefused": "normjax.train.checkpoints", "WorkdirError": "normjax.train.workdir"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'normjax.train' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)
