"""PowerNorm (Shen et al., ICML 2020, arXiv:2003.07845) with the paper's approximate backward.

Training step t (Algorithm 2), per channel, statistics over every non-feature position:

  forward:  z = x / sqrt(psi_{t-1} + eps);  y = scale * z + bias
            psi_t = a_fwd * psi_{t-1} + (1 - a_fwd) * mean(x^2)          (psi is a quadratic mean)
  backward: g = scale * dy;  g~ = g - nu_{t-1} * z;  dx = g~ / sqrt(psi_{t-1} + eps)
            nu_t = nu_{t-1} + (1 - a_bwd) * mean(g~ * z)

``backward="code"`` reproduces the public implementation (sIncerass/powernorm ``mask_powernorm.py``)
instead, which differs in two places (their issue #3): ``g~ = g - (1 - a_bwd) * nu * z`` with
``nu += mean(g~ * z)``, and dx divides by the BATCH statistic ``sqrt(mean(x^2) + eps)`` even after
warmup. For the first ``warmup_steps`` training steps both use the batch statistic in the forward
and psi is the cumulative average of the batch statistics (the public code's warmup; Algorithm 2
itself has none, so the default is 0). The public code also pre-scales every token by its RMS in
``group_scaling`` groups (``GroupScaling1D``); set ``group_scaling`` to reproduce it (0 = off).

The backward pass updates nu, so nu is an input whose cotangent carries the increment
nu_t - nu_{t-1}. Differentiate the loss with respect to the norm state too and apply
``norms.update_backward_state(state, state_grads)`` after the step. Eval uses psi only, with plain autodiff.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from normjax.norms._util import Array, affine, affine_operands, expand_param, masked_mean, stat_dtype
from normjax.norms.batch import _feature_mask
from normjax.validation import check_choice

BACKWARDS = ("paper", "code")


def power_norm_init_state(features: int, dtype: Any = jnp.float32) -> dict[str, Array]:
  """psi (running quadratic mean) starts at 1 and nu at 0, as in the public code; step counts updates."""
  return {"psi": jnp.ones((features,), dtype), "nu": jnp.zeros((features,), dtype),
          "step": jnp.zeros((), jnp.float32)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _power_train(xf, scale, bias, nu, inv_fwd, inv_bwd, mask, alpha_bwd, backward):
  del nu, inv_bwd, mask, alpha_bwd, backward
  return scale * (xf * inv_fwd) + bias


def _power_train_fwd(xf, scale, bias, nu, inv_fwd, inv_bwd, mask, alpha_bwd, backward):
  z = xf * inv_fwd
  return scale * z + bias, (z, scale, nu, inv_fwd, inv_bwd, mask)


def _power_train_bwd(alpha_bwd, backward, res, dy):
  z, scale, nu, inv_fwd, inv_bwd, mask = res
  axes = tuple(range(z.ndim - 1))
  g = dy * scale
  if backward == "paper":
    g_tilde = g - nu * z
    dnu = (1.0 - alpha_bwd) * masked_mean(g_tilde * z, mask, axes)
  else:
    g_tilde = g - (1.0 - alpha_bwd) * nu * z
    dnu = masked_mean(g_tilde * z, mask, axes)
  dscale = jnp.sum(dy * z, axes, keepdims=True)
  dbias = jnp.sum(dy, axes, keepdims=True)
  zeros = jnp.zeros_like
  mask_ct = None if mask is None else zeros(mask, dtype=jax.dtypes.float0)
  return (g_tilde * inv_bwd, dscale, dbias, dnu.reshape(nu.shape), zeros(inv_fwd), zeros(inv_bwd),
          mask_ct)


_power_train.defvjp(_power_train_fwd, _power_train_bwd)


def _group_scale(xf: Array, groups: int, eps: float) -> Array:
  """GroupScaling1D: divide each token by its RMS within ``groups`` channel groups."""
  channels = xf.shape[-1]
  if channels % groups:
    raise ValueError(f"group_scaling={groups} must divide the {channels} channels")
  xg = xf.reshape(*xf.shape[:-1], groups, channels // groups)
  return (xg * lax.rsqrt(jnp.mean(jnp.square(xg), -1, keepdims=True) + eps)).reshape(xf.shape)


def power_norm(x: Array, scale: Array | None, bias: Array | None, state: dict[str, Array], *,
               train: bool, alpha_fwd: float = 0.9, alpha_bwd: float = 0.9, eps: float = 1e-5,
               warmup_steps: int = 0, group_scaling: int = 0, backward: str = "paper",
               mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """PowerNorm over the last (feature) axis; see the module docstring for the exact math.

  Args:
    x: ``[..., C]``; statistics over every leading axis (all tokens of the batch).
    scale, bias: ``[C]`` or None. state: ``power_norm_init_state(C)``.
    train: True runs Algorithm 2 (custom VJP) and returns the forward-updated state; False uses psi.
    backward: "paper" (Algorithm 2, default) or "code" (the public implementation).
    mask: optional boolean ``x.shape[:-1]``; False marks padding left out of every statistic.
  Returns:
    ``(y, new_state)``: y in x's dtype; new_state has psi and step advanced (nu advances through
    the backward pass, see ``norms.update_backward_state``).
  """
  check_choice(backward, "backward", BACKWARDS)
  ax = x.ndim - 1
  xf = x.astype(stat_dtype(x.dtype))
  if group_scaling:
    xf = _group_scale(xf, group_scaling, eps)
  psi = lax.stop_gradient(expand_param(state["psi"], x.shape, (ax,), "psi").astype(xf.dtype))
  scale_f, bias_f = affine_operands(scale, bias, x.shape, ax, xf.dtype)
  if not train:
    y = affine(xf * lax.rsqrt(psi + eps), x, (ax,), scale, bias)
    return y, state
  m = _feature_mask(x, ax, mask)
  batch_sq = lax.stop_gradient(masked_mean(jnp.square(xf), m, tuple(range(ax))))
  step = state["step"] + 1
  in_warmup = step <= warmup_steps
  inv_batch = lax.rsqrt(batch_sq + eps)
  inv_fwd = jnp.where(in_warmup, inv_batch, lax.rsqrt(psi + eps))
  inv_bwd = inv_batch if backward == "code" else inv_fwd
  nu = expand_param(state["nu"], x.shape, (ax,), "nu").astype(xf.dtype)
  y = _power_train(xf, scale_f, bias_f, nu, inv_fwd, inv_bwd, m, alpha_bwd, backward)
  new_psi = jnp.where(in_warmup, psi + (batch_sq - psi) / step,
                      alpha_fwd * psi + (1.0 - alpha_fwd) * batch_sq)
  new_state = {"psi": new_psi.reshape(-1).astype(state["psi"].dtype), "nu": state["nu"],
               "step": step}
  return y.astype(x.dtype), new_state


__all__ = ["power_norm", "power_norm_init_state"]
