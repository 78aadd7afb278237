"""Gradients: ``jax.test_util.check_grads`` in float64 for every autodiff norm, and the custom VJPs
(PowerNorm's approximate backward, sigma-Reparam's stop-gradient power iteration) against formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from normjax import norms
import reference as ref


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def rand(rng, *shape, loc=0.0, scale=1.0):
  return jnp.asarray(rng.normal(size=shape) * scale + loc, jnp.float64)


def grad_check(fn, args):
  check_grads(jax.jit(fn), args, order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6, eps=1e-5)


def affine_params(rng, n):
  return rand(rng, n, loc=1.0, scale=0.3), rand(rng, n, scale=0.3)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("axis", [-1, (1, 2)])
def test_token_norms(name, axis):
  rng = np.random.default_rng(1)
  x = rand(rng, 2, 3, 5, loc=0.7, scale=2.0)
  pshape = (5,) if axis == -1 else (3, 5)
  scale, bias = rand(rng, *pshape, loc=1.0), rand(rng, *pshape)
  fn = getattr(norms, name)
  grad_check(lambda x, s, b, o: fn(x, s, b, axis=axis, out_scale=o, scale_offset=0.5),
             (x, scale, bias, jnp.asarray(0.7)))


def test_crms_norm():
  rng = np.random.default_rng(2)
  grad_check(lambda x, s: norms.crms_norm(x, s, out_scale=0.5), (rand(rng, 4, 7), rand(rng, 7, loc=1.0)))


def test_l2_dyt_fixed():
  rng = np.random.default_rng(3)
  x = rand(rng, 3, 6, scale=2.0)
  grad_check(lambda x, s: norms.l2_norm(x, s), (x, rand(rng, 6, loc=1.0)))
  grad_check(lambda x, a, s, b: norms.dyt(x, a, s, b), (x, jnp.asarray(0.6), *affine_params(rng, 6)))
  grad_check(lambda x, std, s, b: norms.fixed_norm(x, std, s, b), (x, jnp.asarray(1.3), *affine_params(rng, 6)))


def test_group_norm():
  rng = np.random.default_rng(4)
  grad_check(lambda x, s, b: norms.group_norm(x, s, b, num_groups=2),
             (rand(rng, 2, 3, 8, loc=0.5), *affine_params(rng, 8)))


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm(train):
  rng = np.random.default_rng(5)
  mean, var = rand(rng, 4), jnp.asarray(rng.uniform(0.5, 2, 4))
  grad_check(lambda x, s, b: norms.batch_norm(x, s, b, mean, var, train=train)[0],
             (rand(rng, 6, 4, loc=0.3, scale=1.5), *affine_params(rng, 4)))


def test_batch_channel_norm():
  rng = np.random.default_rng(6)
  mean, var = jnp.zeros(8, jnp.float64), jnp.ones(8, jnp.float64)
  grad_check(lambda x, bs, bb, s, b: norms.batch_channel_norm(x, bs, bb, s, b, mean, var, train=True,
                                                              num_groups=2)[0],
             (rand(rng, 3, 4, 8), *affine_params(rng, 8), *affine_params(rng, 2)))


@pytest.mark.parametrize("train", [True, False])
def test_evonorm(train):
  rng = np.random.default_rng(7)
  x = rand(rng, 3, 4, 8, scale=1.5)
  v = rand(rng, 8, loc=1.0, scale=0.2)
  running = jnp.asarray(rng.uniform(0.5, 2, 8))
  grad_check(lambda x, s, b, v: norms.evonorm_b0(x, s, b, v, running, train=train)[0],
             (x, *affine_params(rng, 8), v))
  grad_check(lambda x, s, b, v: norms.evonorm_s0(x, s, b, v, num_groups=2), (x, *affine_params(rng, 8), v))


def test_weight_standardize():
  rng = np.random.default_rng(8)
  for variant in ("paper", "code"):
    grad_check(lambda w: norms.weight_standardize(w, variant=variant), (rand(rng, 6, 4),))


def test_power_norm_eval_autodiff():
  rng = np.random.default_rng(9)
  state = norms.power_norm_init_state(8, jnp.float64)
  grad_check(lambda x, s, b: norms.power_norm(x, s, b, state, train=False)[0],
             (rand(rng, 3, 4, 8), *affine_params(rng, 8)))


@pytest.mark.parametrize("backward", ["paper", "code"])
@pytest.mark.parametrize("masked", [False, True])
def test_power_norm_custom_vjp_matches_formula(backward, masked):
  """After warmup: the VJP is Algorithm 2 (or the public code), and nu's cotangent is its increment."""
  rng = np.random.default_rng(10)
  x = rand(rng, 3, 5, 8, scale=2.0)
  scale, bias = affine_params(rng, 8)
  dy = rand(rng, 3, 5, 8)
  mask = jnp.asarray(rng.uniform(size=(3, 5)) > 0.3) if masked else None
  state = {"psi": jnp.asarray(rng.uniform(0.5, 3, 8)), "nu": rand(rng, 8, scale=0.1),
           "step": jnp.asarray(100.0)}

  def loss(x, scale, bias, state):
    y, _ = norms.power_norm(x, scale, bias, state, train=True, backward=backward, mask=mask)
    return jnp.sum(y * dy)

  dx, dscale, dbias, dstate = jax.grad(loss, argnums=(0, 1, 2, 3))(x, scale, bias, state)
  if masked:  # the reference takes the statistics over real tokens only
    keep = np.asarray(mask)
    xr, dyr = np.asarray(x)[keep], np.asarray(dy)[keep]
  else:
    xr, dyr = np.asarray(x), np.asarray(dy)
  rdx, rdscale, rdbias, rdnu = ref.power_norm_backward(xr, scale, state["psi"], state["nu"], dyr,
                                                       backward=backward)
  got_dx = np.asarray(dx)[keep] if masked else np.asarray(dx)
  np.testing.assert_allclose(got_dx, rdx, rtol=1e-10, atol=1e-12)
  if not masked:
    np.testing.assert_allclose(dscale, rdscale, rtol=1e-10)
    np.testing.assert_allclose(dbias, rdbias, rtol=1e-10)
  np.testing.assert_allclose(dstate["nu"], rdnu, rtol=1e-10, atol=1e-14)
  np.testing.assert_array_equal(dstate["psi"], 0.0)
  new_state = norms.update_backward_state({"layer": state}, {"layer": dstate})
  np.testing.assert_allclose(new_state["layer"]["nu"], np.asarray(state["nu"]) + rdnu, rtol=1e-10)
  np.testing.assert_array_equal(new_state["layer"]["psi"], state["psi"])


def test_power_norm_paper_and_code_differ():
  """The two backwards are genuinely different choices (so the option is not a no-op)."""
  rng = np.random.default_rng(11)
  x, dy = rand(rng, 4, 8, scale=2.0), rand(rng, 4, 8)
  state = {"psi": jnp.full(8, 2.0, jnp.float64), "nu": rand(rng, 8), "step": jnp.asarray(5.0)}
  grads = [jax.grad(lambda x: jnp.sum(norms.power_norm(x, None, None, state, train=True,
                                                        backward=b)[0] * dy))(x)
           for b in ("paper", "code")]
  assert not np.allclose(grads[0], grads[1])


def test_sigma_reparam_gradient_is_stop_gradient_formula():
  """d/dW sum(C * gamma W / sigma) with u, v held fixed: gamma C / sigma - gamma <C, W> / sigma^2 u v^T."""
  rng = np.random.default_rng(12)
  w, c = rand(rng, 6, 4), rand(rng, 6, 4)
  u = rand(rng, 6)
  u = u / jnp.linalg.norm(u)
  gamma = 1.3
  grad = jax.grad(lambda w: jnp.sum(c * norms.sigma_reparam(w, gamma, u)[0]))(w)
  _, new_u, sigma = ref.sigma_reparam(np.asarray(w), gamma, np.asarray(u))
  v = np.asarray(w).T @ np.asarray(u)
  v /= np.linalg.norm(v)
  cw = float(np.sum(np.asarray(c) * np.asarray(w)))
  expected = gamma * np.asarray(c) / sigma - gamma * cw / sigma**2 * np.outer(new_u, v)
  np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-12)
  sigma_grad = jax.grad(lambda w: norms.spectral_norm_estimate(w, u)[0])(w)
  np.testing.assert_allclose(sigma_grad, np.outer(new_u, v), rtol=1e-10, atol=1e-12)
  grad_gamma = jax.grad(lambda g: jnp.sum(c * norms.sigma_reparam(w, g, u)[0]))(jnp.asarray(gamma))
  np.testing.assert_allclose(grad_gamma, cw / sigma, rtol=1e-10)
