"""The registry contract and the thin Flax wrappers (linen and nnx)."""

from __future__ import annotations

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from normjax import norms
from normjax.nn import linen as nj_linen
from normjax.nn import nnx as nj_nnx

ISSUE_NORMS = {"layer_norm", "rms_norm", "crms_norm", "l2_norm", "dyt", "group_norm", "batch_norm",
               "batch_channel_norm", "power_norm", "evonorm_b0", "evonorm_s0", "weight_standardize",
               "sigma_reparam", "fixed_norm", "identity", "prepbn", "unified_norm"}
STATEFUL = {"batch_norm", "batch_channel_norm", "power_norm", "evonorm_b0", "sigma_reparam",
            "fixed_norm", "prepbn", "unified_norm"}


def example(spec):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 32)) + 0.5, jnp.float32)
  return x[0] if spec.acts_on == "weights" else x


def options(spec):
  return {"num_groups": 4} if "num_groups" in spec.defaults else {}


def test_names_lists_every_norm_and_import_line_works():
  assert set(norms.names()) >= ISSUE_NORMS
  out = subprocess.run([sys.executable, "-c",
                        "import normjax, pallas_kernels; print(normjax.norms.names())"],
                       capture_output=True, text=True, check=True).stdout
  for name in ISSUE_NORMS:
    assert repr(name) in out


@pytest.mark.parametrize("name", sorted(ISSUE_NORMS))
def test_spec_contract(name):
  spec = norms.get(name)
  assert spec.name == name and spec.stateful == (name in STATEFUL)
  assert callable(spec.fn) and spec.fn.__doc__
  x = example(spec)
  params = spec.init_params(jax.random.key(0), x, **options(spec))
  state = spec.init_state(x, **options(spec))
  y, new_state = jax.jit(lambda x, p, s: spec.apply(x, p, s, train=True, **options(spec)))(x, params, state)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  if name in {"batch_norm", "batch_channel_norm", "evonorm_b0", "power_norm", "prepbn", "unified_norm"}:
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)))


def test_aliases_resolve():
  for alias, name in norms.aliases().items():
    assert norms.get(alias) is norms.get(name)


def test_scale_offset_initializes_gain_to_one():
  spec = norms.get("rms_norm")
  x = example(spec)
  params = spec.init_params(jax.random.key(0), x, scale_offset=1.0)
  np.testing.assert_array_equal(params["scale"], 0.0)
  y, _ = spec.apply(x, params, scale_offset=1.0)
  np.testing.assert_allclose(y, norms.rms_norm(x), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(ISSUE_NORMS))
def test_linen_wrapper_matches_functional(name):
  spec = norms.get(name)
  x = example(spec)
  module = nj_linen.Norm(name, options(spec))
  variables = module.init(jax.random.key(0), x)
  params = nn.unbox(variables["params"]) if "params" in variables else {}
  assert params.keys() == spec.init_params(jax.random.key(0), x, **options(spec)).keys()
  for boxed in jax.tree.leaves(variables.get("params", {}), is_leaf=lambda v: isinstance(v, nn.Partitioned)):
    assert boxed.names == norms.logical_axes(boxed.value)
  state = variables.get(nj_linen.STATE_COLLECTION, {})
  expected, expected_state = spec.apply(x, params, dict(state), train=True, **options(spec))
  y, updates = module.apply(variables, x, train=True, mutable=[nj_linen.STATE_COLLECTION])
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  if spec.stateful:
    jax.tree.map(np.testing.assert_array_equal, dict(updates[nj_linen.STATE_COLLECTION]), expected_state)


@pytest.mark.parametrize("name", sorted(ISSUE_NORMS))
def test_nnx_wrapper_matches_functional(name):
  spec = norms.get(name)
  x = example(spec)
  features_or_example = x if spec.acts_on == "weights" or "num_groups" in spec.defaults else x.shape[-1]
  module = nj_nnx.Norm(name, features_or_example, rngs=nnx.Rngs(0), **options(spec))
  params = spec.init_params(jax.random.key(0), x, **options(spec))
  state = spec.init_state(x, **options(spec))
  assert {k: v[...] for k, v in nnx.state(module, nnx.Param).items()}.keys() == params.keys()
  expected, expected_state = spec.apply(x, params, state, train=True, **options(spec))
  y = nnx.jit(lambda m, x: m(x, train=True))(module, x)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  for key, value in expected_state.items():
    np.testing.assert_allclose(getattr(module, key).get_value(), value, rtol=1e-6)  # jit vs eager


def test_nnx_param_metadata_and_out_scale_call_option():
  module = nj_nnx.Norm("layer_norm", 16)
  assert module.scale.get_metadata()["out_sharding"] == ("norm",)
  x = jnp.arange(32.0).reshape(2, 16)
  np.testing.assert_allclose(module(x, out_scale=0.5), 0.5 * norms.layer_norm(x), rtol=1e-6)


def test_user_linen_model_trains_with_norm_state():
  """A user's linen model with BatchNorm-style state: grads flow, state updates under mutable."""
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      h = nn.Dense(16)(x)
      h = nj_linen.Norm("batch_norm")(h, train=train)
      return nn.Dense(1)(jax.nn.gelu(h))

  x = jnp.asarray(np.random.default_rng(1).normal(size=(32, 8)), jnp.float32)
  model = Model()
  variables = model.init(jax.random.key(0), x, train=False)

  def loss(params, state):
    out, updates = model.apply({"params": params, **state}, x, train=True, mutable=["norm_state"])
    return jnp.mean(out**2), updates

  grads, updates = jax.grad(loss, has_aux=True)(variables["params"], {"norm_state": variables["norm_state"]})
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert not np.allclose(updates["norm_state"]["Norm_0"]["mean"], 0.0)

