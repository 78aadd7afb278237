"""Bad input fails early with a message that names the problem and the valid choices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from normjax import norms

X = jnp.ones((2, 3, 8))


@pytest.mark.parametrize("call,match", [
    (lambda: norms.layer_norm(X, jnp.ones(7)), r"scale has shape \(7,\).*needs scale of shape \(8,\)"),
    (lambda: norms.rms_norm(X, None, jnp.ones((2, 8))), r"bias has shape \(2, 8\)"),
    (lambda: norms.rms_norm(X, jnp.ones((3, 8)), axis=-1), r"scale has shape \(3, 8\)"),
    (lambda: norms.layer_norm(X, axis=3), r"axis=3 is not valid for an input of rank 3.*\[-3, 2\]"),
    (lambda: norms.layer_norm(X, axis=(1, -2)), r"names the same axis twice"),
    (lambda: norms.crms_norm(X, axis=(1, 2)), r"not valid|one int|cannot unpack|too many"),
    (lambda: norms.rms_norm(X, out_scale=jnp.ones(3)), r"out_scale must be a scalar"),
    (lambda: norms.rms_norm(X, jnp.ones(8), casting="bf16"),
     r"casting='bf16'.*\['f32', 'hf', 'hf_legacy'\]"),
    (lambda: norms.dyt(X, jnp.ones(8)), r"alpha must be a scalar"),
    (lambda: norms.group_norm(X, num_groups=3), r"num_groups=3 must be positive and divide the 8"),
    (lambda: norms.group_norm(X, batch_axes=(0, 2)), r"batch_axes=\(0, 2\) includes the channel axis"),
    (lambda: norms.batch_norm(X, None, None, jnp.zeros(4), jnp.ones(8), train=False),
     r"mean has shape \(4,\)"),
    (lambda: norms.batch_norm(X, None, None, jnp.zeros(8), jnp.ones(8), train=True,
                              mask=jnp.ones((2, 8), bool)), r"mask has shape \(2, 8\).*\(2, 3\)"),
    (lambda: norms.evonorm_b0(jnp.ones((2, 8)), None, None, jnp.ones(8), jnp.ones(8), train=True),
     r"needs \[batch, \*spatial, C\]"),
    (lambda: norms.power_norm(X, None, None, norms.power_norm_init_state(8), train=True,
                              backward="exact"), r"backward='exact'.*\['paper', 'code'\]"),
    (lambda: norms.power_norm(X, None, None, norms.power_norm_init_state(6), train=True),
     r"psi has shape \(6,\)"),
    (lambda: norms.weight_standardize(jnp.ones(8)), r"needs a weight with input and output axes"),
    (lambda: norms.weight_standardize(jnp.ones((3, 8)), variant="torch"), r"variant='torch'"),
    (lambda: norms.sigma_reparam(jnp.ones((3, 8)), 1.0, jnp.ones(8)), r"u has shape \(8,\).*\(3,\)"),
    (lambda: norms.sigma_reparam_init(jnp.ones((3, 8)), gamma_init="two"), r"gamma_init='two'"),
])
def test_functional_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_unknown_norm_names_value_choices_and_closest_match():
  with pytest.raises(ValueError) as info:
    norms.get("rms_nrom")
  message = str(info.value)
  assert "'rms_nrom'" in message and "Did you mean 'rms_norm'?" in message
  for name in norms.names():
    assert name in message


def test_unknown_option_lists_valid_options():
  with pytest.raises(ValueError, match=r"norm 'rms_norm' has no option 'epsilon'; valid options: .*'eps'"):
    norms.get("rms").apply(X, {}, epsilon=1e-5)


def test_stateful_norm_without_state():
  spec = norms.get("batch_norm")
  with pytest.raises(ValueError, match=r"'batch_norm' is stateful: pass the state"):
    spec.apply(X, spec.init_params(jax.random.key(0), X))


def test_errors_raise_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="scale has shape"):
    jax.jit(lambda x: norms.layer_norm(x, jnp.ones(5)))(X)
