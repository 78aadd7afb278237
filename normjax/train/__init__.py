"""The config-driven, sharded training loop (``python -m normjax.train``)."""

from normjax.train.loop import NonFiniteLoss, train

__all__ = ["NonFiniteLoss", "train"]
