"""Weight-space transforms: Weight Standardization and sigma-Reparam.

Weights are in Flax layout: the LAST axis is the output features (``[in, out]`` for a dense kernel,
``[kh, kw, in, out]`` for a convolution). Torch's ``[out, in]`` is the transpose.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from normjax.norms._util import Array, check_scalar, stat_dtype
from normjax.validation import check_choice

WS_VARIANTS = ("paper", "code")
GAMMA_INITS = ("sigma", "one")


def weight_standardize(w: Array, *, eps: float = 1e-5, variant: str = "paper") -> Array:
  """Weight Standardization (Qiao et al., arXiv:1903.10520) per output channel.

  ``variant="paper"`` (eq. 5-6): ``(W - mean) / sqrt(var + eps)`` with the biased variance over all
  input axes. ``variant="code"`` (the authors' PyTorch ``Conv2d``): ``(W - mean) / (std_unbiased + eps)``.
  ``w: [..., out] -> [..., out]`` in w's dtype. Use it only before a norm (GN/BCN).
  """
  check_choice(variant, "variant", WS_VARIANTS)
  if w.ndim < 2:
    raise ValueError(f"weight_standardize needs a weight with input and output axes; got shape {w.shape}")
  wf = w.astype(stat_dtype(w.dtype))
  axes = tuple(range(w.ndim - 1))
  centered = wf - jnp.mean(wf, axes, keepdims=True)
  if variant == "paper":
    out = centered * lax.rsqrt(jnp.mean(jnp.square(centered), axes, keepdims=True) + eps)
  else:
    fan_in = wf.size // wf.shape[-1]
    std = jnp.sqrt(jnp.sum(jnp.square(centered), axes, keepdims=True) / (fan_in - 1))
    out = centered / (std + eps)
  return out.astype(w.dtype)


def _as_matrix(w: Array) -> Array:
  if w.ndim < 2:
    raise ValueError(f"sigma_reparam needs a weight with input and output axes; got shape {w.shape}")
  return w.reshape(-1, w.shape[-1]).astype(stat_dtype(w.dtype))


def _unit(v: Array, eps: float) -> Array:
  """torch.nn.functional.normalize: v / max(||v||, eps)."""
  return v / jnp.maximum(jnp.linalg.norm(v), eps)


def spectral_norm_estimate(w: Array, u: Array, *, num_iters: int = 1, eps: float = 1e-12
                           ) -> tuple[Array, Array]:
  """Power iteration for the largest singular value of ``w`` viewed as ``[fan_in, out]``.

  ``u: [fan_in]`` (torch's u, the input-space vector). Each iteration: ``v = normalize(W^T u)``,
  ``u = normalize(W v)``; then ``sigma = u^T W v``. u and v are under stop-gradient, so sigma is
  differentiable in w with gradient ``u v^T``. Returns ``(sigma, new_u)``.
  """
  wm = _as_matrix(w)
  if u.shape != (wm.shape[0],):
    raise ValueError(f"u has shape {u.shape}; a weight of shape {w.shape} needs u of shape {(wm.shape[0],)}")
  u = lax.stop_gradient(u.astype(wm.dtype))
  wd = lax.stop_gradient(wm)
  v = None
  for _ in range(num_iters):
    v = _unit(wd.T @ u, eps)
    u = _unit(wd @ v, eps)
  return u @ wm @ v, u


def sigma_reparam(w: Array, gamma: Any, u: Array, *, train: bool = True, num_iters: int = 1,
                  eps: float = 1e-12) -> tuple[Array, Array]:
  """sigma-Reparam (Zhai et al., ICML 2023, arXiv:2303.06296): ``W_hat = gamma / sigma(W) * W``.

  One power-iteration step per call (as in apple/ml-sigma-reparam); u and v are stop-gradient and
  sigma = u^T W v stays differentiable in W. In training the new u is returned as state; in eval u
  is returned unchanged (the step is still taken to compute sigma, like the torch code).
  Args:
    w: weight ``[..., out]``; gamma: scalar gain; u: power-iteration state ``[fan_in]``.
  Returns:
    ``(w_hat, new_u)``; w_hat in w's dtype.
  """
  gamma = check_scalar(gamma, "gamma")
  sigma, new_u = spectral_norm_estimate(w, u, num_iters=num_iters, eps=eps)
  w_hat = (jnp.asarray(gamma, sigma.dtype) / sigma) * w.astype(sigma.dtype)
  return w_hat.astype(w.dtype), (new_u if train else u).astype(u.dtype)


def sigma_reparam_init(w: Array, *, gamma_init: str = "sigma") -> tuple[Array, Array]:
  """Initial ``(gamma, u)`` from the SVD of W0: u is the top left singular vector of ``[fan_in, out]``.

  gamma_init="sigma" (torch reference: gamma = sigma(W0), so W_hat = W0 at init) or "one"
  (the Flax ``SNDense`` of the same repository).
  """
  check_choice(gamma_init, "gamma_init", GAMMA_INITS)
  left, singular, _ = jnp.linalg.svd(_as_matrix(w), full_matrices=False)
  gamma = singular[0] if gamma_init == "sigma" else jnp.ones((), singular.dtype)
  return gamma, left[:, 0]


__all__ = ["weight_standardize", "sigma_reparam", "sigma_reparam_init", "spectral_norm_estimate"]
