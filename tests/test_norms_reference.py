"""Every norm against the independent float64 NumPy reference (tests/reference.py).

Fresh random inputs (non-zero mean, non-unit scale) for several shapes and axes, float32 and
bfloat16, with and without scale/bias. Tolerances (|ours - ref| <= atol + rtol * |ref|):
  float32:  atol 2e-5, rtol 2e-5  (statistics in float32 vs float64)
  bfloat16: atol 2e-2, rtol 1.6e-2 (output rounding to 8 mantissa bits, about 0.4 % per element,
            plus float32 statistics on the bfloat16-rounded input)
"""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from normjax import norms
import reference as ref

TOL = {"float32": dict(atol=2e-5, rtol=2e-5), "bfloat16": dict(atol=2e-2, rtol=1.6e-2)}
DTYPES = ["float32", "bfloat16"]


def make_input(rng, shape, dtype):
  x = rng.normal(size=shape) * 3.0 + 1.5 + rng.normal(size=shape[-1:])
  return jnp.asarray(x, dtype)


def params(rng, shape, with_affine):
  if not with_affine:
    return None, None
  return (jnp.asarray(rng.normal(size=shape) * 0.5 + 1.0, jnp.float32),
          jnp.asarray(rng.normal(size=shape) * 0.5, jnp.float32))


def check(ours, expected, dtype):
  assert ours.dtype == jnp.dtype(dtype), f"result dtype {ours.dtype}, input dtype {dtype}"
  np.testing.assert_allclose(np.asarray(ours, np.float64), expected, **TOL[dtype])


def as_ref(x):
  """The exact values the kernel saw (bfloat16 rounding included), in float64."""
  return np.asarray(x, np.float64)


TOKEN_CASES = [((8, 16), -1), ((2, 5, 24), -1), ((2, 5, 24), 1), ((3, 4, 6, 16), (2, 3)),
               ((3, 4, 6, 16), (-1, 1))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_affine", [False, True])
@pytest.mark.parametrize("shape,axis", TOKEN_CASES)
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_layer_and_rms_norm(name, shape, axis, with_affine, dtype):
  rng = np.random.default_rng(zlib.crc32(repr((name, shape, axis, with_affine, dtype)).encode()))
  x = make_input(rng, shape, dtype)
  axes = (axis,) if isinstance(axis, int) else axis
  pshape = tuple(shape[a] for a in sorted(a % len(shape) for a in axes))
  scale, bias = params(rng, pshape, with_affine)
  ours = getattr(norms, name)(x, scale, bias, axis=axis)
  check(ours, getattr(ref, name)(as_ref(x), scale, bias, axis=axis), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_scale_offset_and_eps(name, dtype):
  rng = np.random.default_rng(7)
  x = make_input(rng, (6, 32), dtype)
  w = jnp.asarray(rng.normal(size=(32,)) * 0.1, jnp.float32)
  ours = getattr(norms, name)(x, w, eps=1e-3, scale_offset=1.0, out_scale=0.3)
  check(ours, getattr(ref, name)(as_ref(x), w, eps=1e-3, scale_offset=1.0, out_scale=0.3), dtype)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_layer_norm_scaling_scales_the_bias_too(name):
  """LayerNorm Scaling is N(x) / sqrt(l) with N's affine inside (arXiv:2502.05795): written out in
  float64 here, independently of ``tests/reference.py``, s * (x_hat * g + b)."""
  rng = np.random.default_rng(7)
  x, g, b = rng.normal(size=(4, 16)), rng.normal(size=16), rng.normal(size=16)
  s = 1 / np.sqrt(3.0)
  centred = x - x.mean(-1, keepdims=True) if name == "layer_norm" else x
  x_hat = centred / np.sqrt(np.mean(centred ** 2, -1, keepdims=True) + 1e-6)
  got = getattr(norms, name)(jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32),
                             jnp.asarray(b, jnp.float32), out_scale=s)
  np.testing.assert_allclose(np.asarray(got, np.float64), s * (x_hat * g + b), rtol=2e-6, atol=2e-6)
  gain_only = x_hat * g * s + b  # what normjax did before: a different method under the same name
  assert np.max(np.abs(np.asarray(got) - gain_only)) > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_affine", [False, True])
@pytest.mark.parametrize("shape", [(8, 15), (2, 5, 31), (3, 2, 4, 63)])
def test_crms_norm(shape, with_affine, dtype):
  rng = np.random.default_rng(shape[-1] + 3 * with_affine)
  full = rng.normal(size=shape[:-1] + (shape[-1] + 1,)) * 2.0
  xc = jnp.asarray((full - full.mean(-1, keepdims=True))[..., :-1], dtype)
  scale, bias = params(rng, shape[-1:], with_affine)
  check(norms.crms_norm(xc, scale, bias), ref.crms_norm(as_ref(xc), scale, bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((8, 16), -1), ((2, 5, 24), 1), ((3, 4, 6, 16), (2, 3))])
def test_l2_norm(shape, axis, dtype):
  rng = np.random.default_rng(11)
  x = make_input(rng, shape, dtype)
  check(norms.l2_norm(x, axis=axis), ref.l2_norm(as_ref(x), axis=axis), dtype)
  if isinstance(axis, int):
    scale = jnp.asarray(rng.normal(size=(shape[axis],)), jnp.float32)
    check(norms.l2_norm(x, scale, axis=axis), ref.l2_norm(as_ref(x), scale, axis=axis), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_affine", [False, True])
@pytest.mark.parametrize("shape", [(8, 16), (2, 5, 24)])
def test_dyt(shape, with_affine, dtype):
  rng = np.random.default_rng(13)
  x = make_input(rng, shape, dtype)
  scale, bias = params(rng, shape[-1:], with_affine)
  alpha = jnp.asarray(0.37, jnp.float32)
  check(norms.dyt(x, alpha, scale, bias), ref.dyt(as_ref(x), 0.37, scale, bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("center", [True, False])
def test_fixed_norm(center, dtype):
  rng = np.random.default_rng(17)
  x = make_input(rng, (4, 7, 24), dtype)
  scale, bias = params(rng, (24,), True)
  std = norms.fixed_norm_std(x, center=center)
  xr = as_ref(x)
  xr_c = xr - xr.mean(-1, keepdims=True) if center else xr
  np.testing.assert_allclose(float(std), np.sqrt((xr_c ** 2).mean(-1) + 1e-6).mean(), rtol=1e-5)
  check(norms.fixed_norm(x, std, scale, bias, center=center),
        ref.fixed_norm(xr, float(std), scale, bias, center=center), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_affine", [False, True])
@pytest.mark.parametrize("shape,groups,batch_axes", [((4, 32), 4, (0,)), ((2, 5, 32), 8, (0,)),
                                                     ((2, 3, 3, 16), 4, (0,)), ((2, 5, 32), 4, (0, 1))])
def test_group_norm(shape, groups, batch_axes, with_affine, dtype):
  rng = np.random.default_rng(19 + groups)
  x = make_input(rng, shape, dtype)
  scale, bias = params(rng, shape[-1:], with_affine)
  ours = norms.group_norm(x, scale, bias, num_groups=groups, batch_axes=batch_axes)
  check(ours, ref.group_norm(as_ref(x), scale, bias, groups, num_batch_axes=len(batch_axes)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(16, 8), (4, 5, 12), (2, 3, 3, 8)])
def test_batch_norm(shape, train, dtype):
  rng = np.random.default_rng(23)
  x = make_input(rng, shape, dtype)
  scale, bias = params(rng, shape[-1:], True)
  mean = jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32)
  var = jnp.asarray(rng.uniform(0.5, 2.0, size=shape[-1:]), jnp.float32)
  y, new_mean, new_var = norms.batch_norm(x, scale, bias, mean, var, train=train)
  ry, rmean, rvar = ref.batch_norm(as_ref(x), scale, bias, mean, var, train)
  check(y, ry, dtype)
  np.testing.assert_allclose(new_mean, rmean, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(new_var, rvar, rtol=2e-5, atol=2e-5)


def test_batch_norm_mask_excludes_padding():
  rng = np.random.default_rng(29)
  x = make_input(rng, (3, 10, 8), "float32")
  mask = rng.uniform(size=(3, 10)) > 0.3
  x = x.at[~mask].set(1e6)  # padding garbage must not reach the statistics
  zeros, ones = jnp.zeros(8), jnp.ones(8)
  y, new_mean, new_var = norms.batch_norm(x, None, None, zeros, ones, train=True, mask=mask)
  ry, rmean, rvar = ref.batch_norm(as_ref(x), None, None, zeros, ones, True, mask=mask)
  np.testing.assert_allclose(np.asarray(y)[mask], ry[mask], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(new_mean, rmean, rtol=1e-5)
  np.testing.assert_allclose(new_var, rvar, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False])
def test_batch_channel_norm(train, dtype):
  rng = np.random.default_rng(31)
  x = make_input(rng, (4, 3, 3, 16), dtype)
  bn_scale, bn_bias = params(rng, (16,), True)
  scale, bias = params(rng, (4,), True)
  mean = jnp.asarray(rng.normal(size=16), jnp.float32)
  var = jnp.asarray(rng.uniform(0.5, 2.0, size=16), jnp.float32)
  y, m, v = norms.batch_channel_norm(x, bn_scale, bn_bias, scale, bias, mean, var, train=train,
                                     num_groups=4)
  ry, rm, rv = ref.batch_channel_norm(as_ref(x), bn_scale, bn_bias, scale, bias, mean, var, train, 4)
  check(y, ry, dtype)
  np.testing.assert_allclose(m, rm, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(v, rv, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(4, 6, 8), (2, 3, 3, 8)])
def test_evonorm_b0(shape, train, dtype):
  rng = np.random.default_rng(37)
  x = make_input(rng, shape, dtype)
  scale, bias = params(rng, shape[-1:], True)
  v = jnp.asarray(rng.normal(size=shape[-1:]) * 0.5 + 1.0, jnp.float32)
  running = jnp.asarray(rng.uniform(0.5, 2.0, size=shape[-1:]), jnp.float32)
  y, new_var = norms.evonorm_b0(x, scale, bias, v, running, train=train)
  ry, rvar = ref.evonorm_b0(as_ref(x), scale, bias, v, running, train)
  check(y, ry, dtype)
  np.testing.assert_allclose(new_var, rvar, rtol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", [((4, 16), 4), ((2, 5, 32), 8), ((2, 3, 3, 16), 2)])
def test_evonorm_s0(shape, groups, dtype):
  rng = np.random.default_rng(41)
  x = make_input(rng, shape, dtype)
  scale, bias = params(rng, shape[-1:], True)
  v = jnp.asarray(rng.normal(size=shape[-1:]) * 0.5 + 1.0, jnp.float32)
  check(norms.evonorm_s0(x, scale, bias, v, num_groups=groups),
        ref.evonorm_s0(as_ref(x), scale, bias, v, groups), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train,step,warmup", [(True, 0, 0), (True, 3, 10), (True, 12, 10),
                                               (False, 5, 0)])
@pytest.mark.parametrize("group_scaling", [0, 4])
def test_power_norm_forward(train, step, warmup, group_scaling, dtype):
  rng = np.random.default_rng(43 + step)
  x = make_input(rng, (4, 6, 16), dtype)
  scale, bias = params(rng, (16,), True)
  state = {"psi": jnp.asarray(rng.uniform(0.5, 3.0, size=16), jnp.float32),
           "nu": jnp.asarray(rng.normal(size=16), jnp.float32),
           "step": jnp.asarray(step, jnp.float32)}
  y, new_state = norms.power_norm(x, scale, bias, state, train=train, warmup_steps=warmup,
                                  group_scaling=group_scaling)
  ry, rpsi = ref.power_norm_forward(as_ref(x), scale, bias, state["psi"], step, train,
                                    warmup_steps=warmup, group_scaling=group_scaling)
  check(y, ry, dtype)
  np.testing.assert_allclose(new_state["psi"], rpsi, rtol=2e-5)
  assert float(new_state["step"]) == step + train
  np.testing.assert_array_equal(new_state["nu"], state["nu"])


def test_power_norm_mask_excludes_padding():
  rng = np.random.default_rng(47)
  x = make_input(rng, (3, 10, 8), "float32")
  mask = rng.uniform(size=(3, 10)) > 0.3
  x = x.at[~mask].set(1e6)
  state = norms.power_norm_init_state(8)
  _, new_state = norms.power_norm(x, None, None, state, train=True, mask=mask)
  _, rpsi = ref.power_norm_forward(as_ref(x), None, None, state["psi"], 0, True, mask=mask)
  np.testing.assert_allclose(new_state["psi"], rpsi, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize("shape", [(16, 8), (3, 3, 4, 8)])
def test_weight_standardize(shape, variant, dtype):
  rng = np.random.default_rng(53)
  w = make_input(rng, shape, dtype)
  check(norms.weight_standardize(w, variant=variant),
        ref.weight_standardize(as_ref(w), variant=variant), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16, 8), (3, 3, 4, 8)])
def test_sigma_reparam(shape, dtype):
  rng = np.random.default_rng(59)
  w = jnp.asarray(rng.normal(size=shape) * 0.2, dtype)
  u = rng.normal(size=(int(np.prod(shape[:-1])),))
  u = jnp.asarray(u / np.linalg.norm(u), jnp.float32)
  w_hat, new_u = norms.sigma_reparam(w, 1.7, u, train=True)
  r_hat, r_u, _ = ref.sigma_reparam(as_ref(w), 1.7, u)
  check(w_hat, r_hat, dtype)
  np.testing.assert_allclose(new_u, r_u, rtol=1e-4, atol=1e-5)
  _, eval_u = norms.sigma_reparam(w, 1.7, u, train=False)
  np.testing.assert_array_equal(eval_u, u)


def test_identity_is_exact():
  x = make_input(np.random.default_rng(61), (3, 5), "bfloat16")
  assert norms.identity(x) is x
