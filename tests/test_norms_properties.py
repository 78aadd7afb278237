"""Properties from the literature and the API promises (jit/vmap friendliness, traced out_scale)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax import norms


def rand(seed, *shape, dtype=jnp.float32, loc=0.0, scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=shape) * scale + loc, dtype)


@pytest.fixture
def float64():
  with jax.enable_x64(True):
    yield


def test_layer_norm_invariant_to_shift_and_scale(float64):
  x = rand(0, 4, 6, 32, dtype=jnp.float64, loc=0.3)
  a = rand(1, 4, 6, 1, dtype=jnp.float64) ** 2 + 0.5  # positive per-token scale
  b = rand(2, 4, 6, 1, dtype=jnp.float64) * 10  # per-token shift
  np.testing.assert_allclose(norms.layer_norm(a * x + b, eps=0.0), norms.layer_norm(x, eps=0.0),
                             rtol=1e-12, atol=1e-12)
  # float32 with the default eps: invariant up to eps / var
  x32, a32, b32 = (t.astype(jnp.float32) for t in (x, a, b))
  np.testing.assert_allclose(norms.layer_norm(a32 * x32 + b32), norms.layer_norm(x32), atol=5e-5)


def test_rms_norm_invariant_to_scale_but_not_shift(float64):
  x = rand(3, 4, 32, dtype=jnp.float64, loc=0.3)
  a = jnp.asarray([[0.1], [3.0], [7.5], [100.0]], jnp.float64)
  np.testing.assert_allclose(norms.rms_norm(a * x, eps=0.0), norms.rms_norm(x, eps=0.0), rtol=1e-12)
  assert not np.allclose(norms.rms_norm(x + 1.0), norms.rms_norm(x), atol=1e-3)


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-12), (jnp.float32, 2e-6)])
def test_crms_equals_rms_and_layer_norm_on_reconstructed_vector(dtype, tol):
  with jax.enable_x64(dtype == jnp.float64):
    x = rand(4, 3, 5, 64, dtype=dtype, loc=1.0)
    x = x - x.mean(-1, keepdims=True)
    xc = norms.compress(x)
    np.testing.assert_allclose(norms.decompress(xc), x, atol=tol * 10)
    scale = rand(5, 63, dtype=dtype, loc=1.0)
    expected_rms = norms.rms_norm(norms.decompress(xc))[..., :-1] * scale
    expected_ln = norms.layer_norm(norms.decompress(xc))[..., :-1] * scale
    ours = norms.crms_norm(xc, scale)
    np.testing.assert_allclose(ours, expected_rms, rtol=tol, atol=tol)
    np.testing.assert_allclose(ours, expected_ln, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "crms_norm"])
def test_out_scale_multiplies_output(name):
  fn = getattr(norms, name)
  x = rand(6, 4, 48)
  scale, bias = rand(7, 48, loc=1.0), rand(8, 48)
  base = fn(x, scale)
  # powers of two: bitwise exact
  for s in (0.5, 0.25, 2.0):
    np.testing.assert_array_equal(fn(x, scale, out_scale=s), base * s)
  # LNS factors 1/sqrt(l): exact up to one float32 rounding
  for layer in (2, 3, 7):
    s = 1.0 / np.sqrt(layer)
    np.testing.assert_allclose(fn(x, scale, out_scale=s), base * s, rtol=3e-7, atol=1e-7)
  # the scale multiplies the whole output, the bias too (LayerNorm Scaling, arXiv:2502.05795)
  np.testing.assert_array_equal(fn(x, scale, bias, out_scale=0.5), fn(x, scale, bias) * 0.5)


def test_out_scale_traced_matches_python_float():
  x, scale = rand(9, 8, 32), rand(10, 32, loc=1.0)
  traced = jax.jit(lambda x, s: norms.rms_norm(x, scale, out_scale=s))(x, jnp.float32(1 / np.sqrt(5)))
  np.testing.assert_allclose(traced, norms.rms_norm(x, scale, out_scale=1 / np.sqrt(5)), rtol=1e-6)
  # scanned layer index, as a model under scan over depth would use it
  def body(carry, layer):
    return carry, norms.layer_norm(x, out_scale=jax.lax.rsqrt(layer.astype(jnp.float32)))
  _, ys = jax.lax.scan(body, None, jnp.arange(1, 4))
  for i, layer in enumerate(range(1, 4)):
    np.testing.assert_allclose(ys[i], norms.layer_norm(x, out_scale=1 / np.sqrt(layer)), rtol=1e-6)


def test_bfloat16_statistics_in_float32():
  """Large-offset bf16 input: computing the mean in bf16 would destroy the centered signal."""
  x = (rand(11, 4, 256) + 300.0).astype(jnp.bfloat16)
  y = norms.layer_norm(x)
  assert y.dtype == jnp.bfloat16
  expected = norms.layer_norm(x.astype(jnp.float32))
  np.testing.assert_allclose(y.astype(jnp.float32), expected, atol=2e-2, rtol=1e-2)


def test_sigma_reparam_converges_to_largest_singular_value():
  w = rand(12, 24, 16, scale=0.1)
  top = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[0]
  u = rand(13, 24)
  u = u / jnp.linalg.norm(u)
  step = jax.jit(lambda u: norms.sigma_reparam(w, 1.0, u, train=True))
  for _ in range(200):
    w_hat, u = step(u)
  sigma, _ = norms.spectral_norm_estimate(w, u)
  np.testing.assert_allclose(float(sigma), top, rtol=1e-4)
  np.testing.assert_allclose(np.linalg.svd(np.asarray(w_hat), compute_uv=False)[0], 1.0, rtol=1e-4)
  # the SVD initialization is already converged, and gamma_init="sigma" leaves W unchanged at init
  gamma, u0 = norms.sigma_reparam_init(w)
  np.testing.assert_allclose(float(gamma), top, rtol=1e-5)
  np.testing.assert_allclose(norms.sigma_reparam(w, gamma, u0)[0], w, rtol=1e-4, atol=1e-6)


def test_batch_norm_train_vs_eval():
  x = rand(14, 64, 8, loc=3.0, scale=2.0)
  mean, var = jnp.zeros(8), jnp.ones(8)
  y_train, m1, v1 = norms.batch_norm(x, None, None, mean, var, train=True)
  # train mode normalizes with the batch statistics
  np.testing.assert_allclose(y_train.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(y_train.var(0), 1.0, rtol=1e-4)
  np.testing.assert_allclose(m1, 0.1 * x.mean(0), rtol=1e-5)
  # eval mode uses the running statistics and leaves them untouched
  y_eval, m_eval, v_eval = norms.batch_norm(x, None, None, m1, v1, train=False)
  np.testing.assert_allclose(y_eval, (x - m1) / jnp.sqrt(v1 + 1e-5), rtol=1e-5)
  assert m_eval is m1 and v_eval is v1
  # after enough updates on the same batch the running statistics reach the batch ones
  for _ in range(200):
    _, mean, var = norms.batch_norm(x, None, None, mean, var, train=True)
  np.testing.assert_allclose(norms.batch_norm(x, None, None, mean, var, train=False)[0], y_train,
                             atol=1e-4)


def test_power_norm_running_mean_reaches_quadratic_mean():
  x = rand(15, 32, 8, loc=1.0, scale=2.0)
  state = norms.power_norm_init_state(8)
  for _ in range(150):
    _, state = norms.power_norm(x, None, None, state, train=True)
  np.testing.assert_allclose(state["psi"], jnp.mean(x**2, 0), rtol=1e-4)
  assert float(state["step"]) == 150


# Per-token norms: a NaN in token (0, 0) stays in that token. Per-sample norms (statistics over a
# sample's tokens) and batch norms in eval mode: a NaN in sample 0 stays in sample 0.
PER_TOKEN = ["layer_norm", "rms_norm", "crms_norm", "l2_norm", "dyt", "fixed_norm", "identity"]
PER_SAMPLE = ["group_norm", "evonorm_s0", "evonorm_b0", "batch_norm", "batch_channel_norm",
              "power_norm"]


@pytest.mark.parametrize("name", PER_TOKEN + PER_SAMPLE)
def test_nan_stays_in_its_row(name):
  spec = norms.get(name)
  x = rand(16, 3, 4, 32)
  options = {"num_groups": 4} if "num_groups" in spec.defaults else {}
  params = spec.init_params(jax.random.key(0), x, **options)
  state = spec.init_state(x, **options)
  y, _ = spec.apply(x.at[0, 0, 5].set(jnp.nan), params, state, train=False, **options)
  finite = np.isfinite(np.asarray(y))
  if name in PER_TOKEN:
    assert not finite[0, 0].all()
    finite[0, 0] = True
  else:
    assert not finite[0].all()
    finite[0] = True
  assert finite.all(), f"{name}: NaN leaked out of its row"


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "l2_norm", "group_norm", "evonorm_s0"])
def test_vmap_matches_batched_call(name):
  spec = norms.get(name)
  x = rand(17, 5, 3, 32)
  options = {"num_groups": 4} if "num_groups" in spec.defaults else {}
  params = spec.init_params(jax.random.key(0), x[0], **options)
  direct = jnp.stack([spec.apply(xi, params, train=False, **options)[0] for xi in x])
  mapped = jax.vmap(lambda xi: spec.apply(xi, params, train=False, **options)[0])(x)
  np.testing.assert_allclose(mapped, direct, rtol=1e-6, atol=1e-6)


def test_hf_legacy_casting_rounds_before_the_gain():
  """casting='hf_legacy' casts the normalized value to a bf16 weight's dtype before multiplying."""
  x = rand(18, 4, 64)
  w = (rand(19, 64, loc=1.0)).astype(jnp.bfloat16)
  legacy = norms.rms_norm(x, w, casting="hf_legacy")
  manual = (norms.rms_norm(x).astype(jnp.bfloat16) * w).astype(jnp.float32)
  np.testing.assert_array_equal(legacy, manual)
  f32 = norms.rms_norm(x, w, casting="f32")
  assert not np.array_equal(legacy, f32)
