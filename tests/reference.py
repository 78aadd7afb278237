"""Independent float64 NumPy references for every norm, written from the papers' formulas (docs/norms.md).

They deliberately take different computational routes from normjax where one exists (explicit loops
over groups and samples, reconstructing the dropped CRMS coordinate, reshaping to [rows, features])
so a shared mistake is unlikely. Inputs are converted to float64 first.
"""

from __future__ import annotations

import numpy as np


def f64(a):
  return None if a is None else np.asarray(a, dtype=np.float64)


def _bcast(p, ndim, axes):
  """Reshape a parameter of shape x.shape[axes] so it broadcasts against x."""
  shape = [1] * ndim
  for i, a in enumerate(axes):
    shape[a] = p.shape[i]
  return p.reshape(shape)


def _axes(ndim, axis):
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted(a % ndim for a in axes))


def _affine(y, axes, scale, bias, out_scale=1.0, scale_offset=0.0):
  """``out_scale * (y * (scale + offset) + bias)``: LayerNorm Scaling scales the whole norm output,
  its bias included (arXiv:2502.05795)."""
  if scale is not None:
    y = y * (_bcast(f64(scale), y.ndim, axes) + scale_offset)
  if bias is not None:
    y = y + _bcast(f64(bias), y.ndim, axes)
  return y * out_scale


def layer_norm(x, scale=None, bias=None, axis=-1, eps=1e-6, out_scale=1.0, scale_offset=0.0):
  x = f64(x)
  axes = _axes(x.ndim, axis)
  mu = x.mean(axis=axes, keepdims=True)
  var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
  return _affine((x - mu) / np.sqrt(var + eps), axes, scale, bias, out_scale, scale_offset)


def rms_norm(x, scale=None, bias=None, axis=-1, eps=1e-6, out_scale=1.0, scale_offset=0.0):
  x = f64(x)
  axes = _axes(x.ndim, axis)
  rms = np.sqrt((x ** 2).mean(axis=axes, keepdims=True) + eps)
  return _affine(x / rms, axes, scale, bias, out_scale, scale_offset)


def crms_norm(xc, scale=None, bias=None, eps=1e-6, out_scale=1.0):
  """Reconstruct the zero-mean d-vector, RMS-normalize it, drop the last coordinate again."""
  xc = f64(xc)
  full = np.concatenate([xc, -xc.sum(-1, keepdims=True)], -1)
  y = (full / np.sqrt((full ** 2).mean(-1, keepdims=True) + eps))[..., :-1]
  return _affine(y, (xc.ndim - 1,), scale, bias, out_scale)


def l2_norm(x, scale=None, axis=-1, eps=1e-6):
  x = f64(x)
  axes = _axes(x.ndim, axis)
  return _affine(x / np.sqrt((x ** 2).sum(axis=axes, keepdims=True) + eps), axes, scale, None)


def dyt(x, alpha, scale=None, bias=None):
  x = f64(x)
  return _affine(np.tanh(float(alpha) * x), (x.ndim - 1,), scale, bias)


def fixed_norm(x, std, scale=None, bias=None, center=True):
  x = f64(x)
  if center:
    x = x - x.mean(-1, keepdims=True)
  return _affine(x / float(std), (x.ndim - 1,), scale, bias)


def group_norm(x, scale=None, bias=None, num_groups=32, eps=1e-5, num_batch_axes=1):
  """Loops over every (batch index, group) block; batch axes are the leading ``num_batch_axes``."""
  x = f64(x)
  y = np.empty_like(x)
  cg = x.shape[-1] // num_groups
  for idx in np.ndindex(*x.shape[:num_batch_axes]):
    for g in range(num_groups):
      sl = idx + (Ellipsis, slice(g * cg, (g + 1) * cg))
      block = x[sl]
      y[sl] = (block - block.mean()) / np.sqrt(block.var() + eps)
  return _affine(y, (x.ndim - 1,), scale, bias)


def batch_norm(x, scale, bias, mean, var, train, momentum=0.9, eps=1e-5, mask=None):
  """Features last. Returns (y, new_mean, new_var)."""
  x = f64(x)
  rows = x.reshape(-1, x.shape[-1])
  if train:
    sel = rows if mask is None else rows[np.asarray(mask).reshape(-1)]
    mu, sigma2 = sel.mean(0), sel.var(0)
    new_mean = momentum * f64(mean) + (1 - momentum) * mu
    new_var = momentum * f64(var) + (1 - momentum) * sigma2
  else:
    mu, sigma2, new_mean, new_var = f64(mean), f64(var), f64(mean), f64(var)
  y = (rows - mu) / np.sqrt(sigma2 + eps)
  return _affine(y.reshape(x.shape), (x.ndim - 1,), scale, bias), new_mean, new_var


def batch_channel_norm(x, bn_scale, bn_bias, scale, bias, mean, var, train, num_groups, momentum=0.9,
                       eps=1e-5):
  h, new_mean, new_var = batch_norm(x, bn_scale, bn_bias, mean, var, train, momentum, eps)
  y = group_norm(h, None, None, num_groups, eps)
  cg = x.shape[-1] // num_groups
  gain = np.repeat(f64(scale), cg)
  shift = np.repeat(f64(bias), cg)
  return y * gain + shift, new_mean, new_var


def evonorm_b0(x, scale, bias, v, running_var, train, momentum=0.9, eps=1e-5):
  x = f64(x)
  c = x.shape[-1]
  rows = x.reshape(-1, c)
  if train:
    batch_var = rows.var(0)
    n = rows.shape[0]
    new_var = momentum * f64(running_var) + (1 - momentum) * batch_var * n / (n - 1)
  else:
    batch_var, new_var = f64(running_var), f64(running_var)
  per_sample = x.reshape(x.shape[0], -1, c)
  inst_std = np.sqrt(per_sample.var(1) + eps)  # [B, C]
  inst_std = inst_std.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (c,))
  denom = np.maximum(np.sqrt(batch_var + eps), f64(v) * x + inst_std)
  return _affine(x / denom, (x.ndim - 1,), scale, bias), new_var


def evonorm_s0(x, scale, bias, v, num_groups=32, eps=1e-5):
  x = f64(x)
  std = np.empty_like(x)
  cg = x.shape[-1] // num_groups
  for b in range(x.shape[0]):
    for g in range(num_groups):
      sl = (b, Ellipsis, slice(g * cg, (g + 1) * cg))
      std[sl] = np.sqrt(x[sl].var() + eps)
  y = x * (1.0 / (1.0 + np.exp(-f64(v) * x))) / std
  return _affine(y, (x.ndim - 1,), scale, bias)


def power_norm_forward(x, scale, bias, psi, step, train, alpha_fwd=0.9, eps=1e-5, warmup_steps=0,
                       group_scaling=0, mask=None):
  """Returns (y, new_psi). Features last; psi is the running quadratic mean (state before the step)."""
  x = f64(x)
  c = x.shape[-1]
  if group_scaling:
    xg = x.reshape(x.shape[:-1] + (group_scaling, c // group_scaling))
    x = (xg / np.sqrt((xg ** 2).mean(-1, keepdims=True) + eps)).reshape(x.shape)
  rows = x.reshape(-1, c)
  sel = rows if mask is None else rows[np.asarray(mask).reshape(-1)]
  batch_sq = (sel ** 2).mean(0)
  psi = f64(psi)
  if not train:
    return _affine(x / np.sqrt(psi + eps), (x.ndim - 1,), scale, bias), psi
  t = step + 1
  if t <= warmup_steps:
    z = x / np.sqrt(batch_sq + eps)
    new_psi = psi * (t - 1) / t + batch_sq / t
  else:
    z = x / np.sqrt(psi + eps)
    new_psi = alpha_fwd * psi + (1 - alpha_fwd) * batch_sq
  return _affine(z, (x.ndim - 1,), scale, bias), new_psi


def power_norm_backward(x, scale, psi, nu, dy, backward="paper", alpha_bwd=0.9, eps=1e-5):
  """Algorithm 2 (paper) or the public code's backward, after warmup. Returns dx, dscale, dbias, dnu."""
  x, dy, nu, scale, psi = f64(x), f64(dy), f64(nu), f64(scale), f64(psi)
  c = x.shape[-1]
  rows, drows = x.reshape(-1, c), dy.reshape(-1, c)
  z = rows / np.sqrt(psi + eps)
  g = drows * scale
  if backward == "paper":
    g_tilde = g - nu * z
    dnu = (1 - alpha_bwd) * (g_tilde * z).mean(0)
    dx = g_tilde / np.sqrt(psi + eps)
  else:
    g_tilde = g - (1 - alpha_bwd) * nu * z
    dnu = (g_tilde * z).mean(0)
    dx = g_tilde / np.sqrt((rows ** 2).mean(0) + eps)
  return dx.reshape(x.shape), (drows * z).sum(0), drows.sum(0), dnu


def weight_standardize(w, eps=1e-5, variant="paper"):
  w = f64(w)
  cols = w.reshape(-1, w.shape[-1])
  out = np.empty_like(cols)
  for j in range(cols.shape[1]):
    col = cols[:, j]
    if variant == "paper":
      out[:, j] = (col - col.mean()) / np.sqrt(col.var() + eps)
    else:
      out[:, j] = (col - col.mean()) / (col.std(ddof=1) + eps)
  return out.reshape(w.shape)


def sigma_reparam(w, gamma, u):
  """One torch-style power-iteration step in Flax layout. Returns (w_hat, new_u, sigma)."""
  w = f64(w)
  m = w.reshape(-1, w.shape[-1])
  v = m.T @ f64(u)
  v /= np.linalg.norm(v)
  new_u = m @ v
  new_u /= np.linalg.norm(new_u)
  sigma = new_u @ m @ v
  return float(gamma) / sigma * w, new_u, sigma
