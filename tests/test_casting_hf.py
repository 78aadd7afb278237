"""``casting="hf"`` against torch/transformers, ``"hf_legacy"`` against its formula, and both in the kernels.

"hf" is current transformers' ``LlamaRMSNorm``: normalize in float32, round to the input dtype, multiply
by the gain with torch type promotion (the result dtype is promote(x, gain)). "hf_legacy" is the older
``LlamaRMSNorm`` that rounds to a 16-bit gain's dtype and returns x's dtype.

Where torch and XLA normalize different float32 statistics (their sums run in different orders and
their rsqrt differ in the last bit) the results cannot be bit-exact; those tests allow what that
difference can cause and nothing more (see ``RANDOM_ULPS``). Inputs whose statistics are exact in
float32 in any order and whose rsqrt is a power of two remove it: there every output is bit-exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from normjax import norms
from pallas_kernels import auto

DTYPE_PAIRS = [(x, w) for x in ("bfloat16", "float32") for w in ("bfloat16", "float32")]
# Random inputs, eps 1e-6: a few float32 ulps of difference in the statistics. A bfloat16 result
# rounds the normalized value once, so the difference flips that rounding for a handful of elements
# (one bfloat16 ulp of the normalized value, at most two after the gain multiply); a float32 result
# carries it straight through (measured up to 5 ulps on [256, 2048]).
RANDOM_ULPS = {"bfloat16": 2, "float32": 8}
MAX_INEXACT = 1e-3  # bfloat16 results: the share of elements that may differ at all ("f32" casting: ~26 %)


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch", reason="the torch comparisons need torch (not on the Python 3.12 leg)")


@pytest.fixture(scope="module")
def llama_rms_norm(torch):
  return pytest.importorskip("transformers.models.llama.modeling_llama").LlamaRMSNorm


def _to_jax(t) -> jax.Array:
  """A torch tensor as a JAX array of the same dtype (bfloat16 through float32, which numpy lacks)."""
  return jnp.asarray(t.detach().float().numpy(), str(t.dtype).removeprefix("torch."))


def _ordered(a: np.ndarray) -> np.ndarray:
  """Float bit patterns as integers whose differences count ulps (sign-magnitude to two's complement)."""
  ints = {2: np.int16, 4: np.int32}[a.dtype.itemsize]
  bits = a.view(ints).astype(np.int64)
  return np.where(bits < 0, np.iinfo(ints).min - bits, bits)


def ulps(got: jax.Array, want: jax.Array) -> np.ndarray:
  assert got.dtype == want.dtype, (got.dtype, want.dtype)
  return np.abs(_ordered(np.asarray(got)) - _ordered(np.asarray(want)))


def _random(torch, seed: int, shape: tuple[int, int], x_dtype: str, w_dtype: str):
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(*shape, generator=g) * 3 + 1
  w = 1 + 0.3 * torch.randn(shape[-1], generator=g)
  b = 0.1 * torch.randn(shape[-1], generator=g)
  return x.to(getattr(torch, x_dtype)), w.to(getattr(torch, w_dtype)), b.to(getattr(torch, w_dtype))


def _exact(torch, x_dtype: str, w_dtype: str, rows: int = 16, d: int = 256):
  """Rows that are signed permutations of one row of multiples of 1/16, and an eps that makes
  mean(x^2) + eps exactly 16: every sum is exact in any order and rsqrt(16) = 1/4."""
  rng = np.random.default_rng(0)
  base = rng.integers(-40, 40, d) / 16
  x = np.stack([rng.permutation(base) * rng.choice([-1, 1], d) for _ in range(rows)])
  eps = 16.0 - float(np.mean(base**2))
  w = (1 + 0.3 * rng.normal(size=d)).astype(np.float32)
  return (torch.tensor(x, dtype=getattr(torch, x_dtype)), torch.tensor(w).to(getattr(torch, w_dtype)), eps)


def _torch_rms_norm(llama_rms_norm, torch, x, w, eps):
  module = llama_rms_norm(x.shape[-1], eps=eps).to(w.dtype)
  with torch.no_grad():
    module.weight.copy_(w)
    return module(x)


@pytest.mark.parametrize("x_dtype,w_dtype", DTYPE_PAIRS)
def test_hf_rms_norm_is_bit_exact_with_llama_rms_norm_on_exact_statistics(torch, llama_rms_norm,
                                                                          x_dtype, w_dtype):
  x, w, eps = _exact(torch, x_dtype, w_dtype)
  want = _to_jax(_torch_rms_norm(llama_rms_norm, torch, x, w, eps))
  got = norms.rms_norm(_to_jax(x), _to_jax(w), eps=eps, casting="hf")
  assert got.dtype == want.dtype == jnp.promote_types(x_dtype, w_dtype)
  assert ulps(got, want).max() == 0


@pytest.mark.parametrize("x_dtype,w_dtype", DTYPE_PAIRS)
def test_hf_rms_norm_matches_llama_rms_norm(torch, llama_rms_norm, x_dtype, w_dtype):
  x, w, _ = _random(torch, 1, (256, 2048), x_dtype, w_dtype)
  want = _to_jax(_torch_rms_norm(llama_rms_norm, torch, x, w, 1e-6))
  got = norms.rms_norm(_to_jax(x), _to_jax(w), eps=1e-6, casting="hf")
  assert got.dtype == want.dtype == jnp.promote_types(x_dtype, w_dtype)
  error = ulps(got, want)
  assert error.max() <= RANDOM_ULPS[got.dtype.name], error.max()
  if got.dtype == jnp.bfloat16:
    assert (error > 0).mean() <= MAX_INEXACT, (error > 0).mean()


def test_hf_differs_from_hf_legacy_where_transformers_changed():
  """float32 x with a bfloat16 gain: "hf" never rounds to bfloat16, "hf_legacy" does."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 64)), jnp.float32)
  w = jnp.full((64,), 1.5, jnp.bfloat16)
  hf, legacy = norms.rms_norm(x, w, casting="hf"), norms.rms_norm(x, w, casting="hf_legacy")
  np.testing.assert_array_equal(hf, norms.rms_norm(x) * 1.5)
  np.testing.assert_array_equal(legacy, (norms.rms_norm(x).astype(jnp.bfloat16) * w).astype(jnp.float32))
  assert hf.dtype == legacy.dtype == jnp.float32 and not np.array_equal(hf, legacy)


# torch.nn.LayerNorm (GPT-2, ViT) rounds once, after the affine, into x's dtype: normjax's "f32".
# It accepts bfloat16 x with float32 parameters (the result is bfloat16) and refuses float32 x with
# bfloat16 parameters, so that pair is not compared.
LAYER_NORM_PAIRS = [("bfloat16", "bfloat16"), ("bfloat16", "float32"), ("float32", "float32")]


def _torch_layer_norm(torch, x, w, b, eps):
  module = torch.nn.LayerNorm(x.shape[-1], eps=eps).to(w.dtype)
  with torch.no_grad():
    module.weight.copy_(w)
    module.bias.copy_(b)
    return module(x)


@pytest.mark.parametrize("x_dtype,w_dtype", LAYER_NORM_PAIRS)
def test_f32_layer_norm_matches_torch_layer_norm(torch, x_dtype, w_dtype):
  x, w, b = _random(torch, 3, (256, 1024), x_dtype, w_dtype)
  want = _to_jax(_torch_layer_norm(torch, x, w, b, 1e-5))
  got = norms.layer_norm(_to_jax(x), _to_jax(w), _to_jax(b), eps=1e-5, casting="f32")
  assert got.dtype == want.dtype == jnp.dtype(x_dtype)
  if x_dtype == "bfloat16":
    error = ulps(got, want)  # one rounding of nearly equal float32 values: at most one ulp
    assert error.max() <= 1 and (error > 0).mean() <= MAX_INEXACT, (error.max(), (error > 0).mean())
  else:  # the bias add cancels near zero, so the float32 bound is absolute as well as relative
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_hf_layer_norm_matches_torch_layer_norm_in_float32(torch):
  x, w, b = _random(torch, 4, (64, 512), "float32", "float32")
  want = _to_jax(_torch_layer_norm(torch, x, w, b, 1e-5))
  got = norms.layer_norm(_to_jax(x), _to_jax(w), _to_jax(b), eps=1e-5, casting="hf")
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # float32 throughout: nothing rounds


def test_hf_layer_norm_is_the_rms_norm_order_with_the_bias_in_the_promoted_dtype():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(8, 96)) * 2 + 0.5, jnp.bfloat16)
  w = jnp.asarray(1 + 0.2 * rng.normal(size=96), jnp.bfloat16)
  b = jnp.asarray(0.1 * rng.normal(size=96), jnp.float32)
  xhat = norms.layer_norm(x, eps=1e-5)  # float32 statistics, rounded to x's dtype
  same = norms.layer_norm(x, w, b.astype(jnp.bfloat16), eps=1e-5, casting="hf")
  np.testing.assert_array_equal(same, xhat * w + b.astype(jnp.bfloat16))  # every step in bfloat16
  wide = norms.layer_norm(x, w, b, eps=1e-5, casting="hf")  # a float32 bias: multiply and add in float32
  assert wide.dtype == jnp.float32
  np.testing.assert_array_equal(wide, xhat.astype(jnp.float32) * w.astype(jnp.float32) + b)


@pytest.mark.parametrize("x_dtype", ["bfloat16", "float32"])
def test_hf_legacy_is_the_old_llama_order(x_dtype):
  """"hf_legacy" (formerly "llama"): a 16-bit gain gets the normalized value rounded to its dtype, with
  the offset, out_scale and bias in that dtype; a float32 gain is exactly "f32"; the result is x's dtype."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(8, 96)) * 2 + 0.5, x_dtype)
  w = jnp.asarray(rng.normal(size=96) * 0.2, jnp.bfloat16)
  b = jnp.asarray(rng.normal(size=96) * 0.1, jnp.bfloat16)
  got = norms.layer_norm(x, w, b, scale_offset=1.0, out_scale=0.5, casting="hf_legacy")
  gain = (w + jnp.bfloat16(1.0)) * jnp.bfloat16(0.5)
  # LayerNorm Scaling's out_scale scales the bias too (arXiv:2502.05795), in the same dtype
  manual = (norms.layer_norm(x.astype(jnp.float32)).astype(jnp.bfloat16) * gain
            + b * jnp.bfloat16(0.5)).astype(x_dtype)
  assert got.dtype == jnp.dtype(x_dtype)
  np.testing.assert_array_equal(got, manual)
  w32, b32 = w.astype(jnp.float32), b.astype(jnp.float32)
  np.testing.assert_array_equal(norms.layer_norm(x, w32, b32, casting="hf_legacy"),
                                norms.layer_norm(x, w32, b32, casting="f32"))


# ---------------------------------------------------------------------------- fused kernels
KERNEL_CASES = [(kind, dtype) for kind in ("rms_norm", "layer_norm") for dtype in ("bfloat16", "float32")]


def _kernel_inputs(dtype: str, shape=(9, 384)):
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=shape) * 2 + 0.5, dtype)
  w = jnp.asarray(1 + 0.2 * rng.normal(size=shape[-1]), dtype)
  b = jnp.asarray(0.1 * rng.normal(size=shape[-1]), dtype)
  cotangent = jnp.asarray(rng.normal(size=shape), jnp.float32)
  return x, w, b, cotangent


def _value_and_grads(kind, impl, x, w, b, cotangent):
  op = getattr(pk, kind)
  loss = lambda x, w, b: jnp.sum(op(x, w, b, out_scale=0.7, casting="hf", impl=impl).astype(jnp.float32)
                                 * cotangent)
  y = op(x, w, b, out_scale=0.7, casting="hf", impl=impl)
  return y, jax.grad(loss, argnums=(0, 1, 2))(x, w, b)


@pytest.mark.parametrize("kind,dtype", KERNEL_CASES)
def test_pallas_hf_equals_xla_hf(kind, dtype):
  """Forward: the kernel's float32 statistics are summed in another order, so a bfloat16 output may
  differ by a rare ulp; gradients within the kernel tests' bounds (tests/test_kernels.py)."""
  x, w, b, cotangent = _kernel_inputs(dtype)
  y, grads = _value_and_grads(kind, "pallas", x, w, b, cotangent)
  y_ref, grads_ref = _value_and_grads(kind, "xla", x, w, b, cotangent)
  assert y.dtype == y_ref.dtype == jnp.dtype(dtype)
  if dtype == "bfloat16":
    error = ulps(y, y_ref)
    assert error.max() <= 1 and (error > 0).mean() <= 1e-2, (error.max(), (error > 0).mean())
  else:
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  tol = 2e-2 if dtype == "bfloat16" else 1e-5
  for name, got, want in zip(("dx", "dscale", "dbias"), grads, grads_ref):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(np.abs(want).max(), 1e-6) if name != "dx" else 1.0
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=name)


@pytest.mark.parametrize("impl", ["pallas", "triton"])
def test_kernels_refuse_an_hf_result_wider_than_x(impl):
  x, w, _, _ = _kernel_inputs("bfloat16")
  with pytest.raises(ValueError, match=rf"casting='hf' with x bfloat16 and scale float32 returns float32, "
                                       rf"but impl='{impl}' writes x's dtype .*use impl='xla'"):
    pk.rms_norm(x, w.astype(jnp.float32), casting="hf", impl=impl)


def test_auto_runs_a_wider_hf_result_in_xla_even_where_the_kernel_is_faster(monkeypatch):
  x, w, _, _ = _kernel_inputs("bfloat16")
  monkeypatch.setattr(auto, "choose", lambda *args, **kwargs: "pallas")
  w32 = w.astype(jnp.float32)
  y = pk.rms_norm(x, w32, casting="hf", impl="auto")
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(y, norms.rms_norm(x, w32, casting="hf"))
  assert "pallas_call" not in str(jax.make_jaxpr(lambda x: pk.rms_norm(x, w32, casting="hf", impl="auto"))(x))
  # where x's dtype holds the result, "auto" still takes the kernel
  assert "pallas_call" in str(jax.make_jaxpr(lambda x: pk.rms_norm(x, w, casting="hf", impl="auto"))(x))
