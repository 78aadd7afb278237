"""Thin Flax wrappers around the functional norms: ``normjax.nn.linen.Norm`` and ``normjax.nn.nnx.Norm``.

They own parameters and state only; the math is the registry's (``normjax.norms.get(kind)``).
"""
