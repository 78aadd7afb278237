"""Init schemes, TVR rescaling, and the exact Pre-LN -> Pre-RMSNorm -> Pre-CRMSNorm conversion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from grid import params

from normjax import convert, stats, variance
from normjax.models import InitConfig, ModelConfig, NormConfig, PlacementConfig, build

L = 4


def kernel_std(scheme: str) -> dict[str, np.ndarray]:
  cfg = ModelConfig(name="llama", num_layers=L, d_model=128, num_heads=4, mlp_dim=256,
                    init=InitConfig(scheme, std=0.02))
  std = stats.layer_weight_std(nnx.state(build(cfg, seed=8), nnx.Param))
  return {key.split("/")[-2]: np.asarray(value) for key, value in std.items()}


def test_init_schemes_set_the_per_layer_std():
  """Tolerance 5 %: each estimate averages at least 16k normal draws (relative sd < 0.6 %)."""
  layers = np.arange(1, L + 1)
  normal = kernel_std("normal")
  for role, std in normal.items():
    np.testing.assert_allclose(std, 0.02, rtol=0.05, err_msg=role)
  for role, std in kernel_std("lir").items():
    np.testing.assert_allclose(std, 0.02 / np.sqrt(layers), rtol=0.05, err_msg=role)
  scaled = kernel_std("scaled")
  for role in ("o", "down"):
    np.testing.assert_allclose(scaled[role], 0.02 / np.sqrt(2 * L), rtol=0.05)
  np.testing.assert_allclose(scaled["q"], 0.02, rtol=0.05)
  deep = kernel_std("deepnorm")
  for role in ("v", "o", "gate", "up", "down"):
    np.testing.assert_allclose(deep[role], 0.02 * (8 * L) ** -0.25, rtol=0.05, err_msg=role)
  for role in ("q", "k"):
    np.testing.assert_allclose(deep[role], 0.02, rtol=0.05, err_msg=role)


def test_tvr_rescales_only_kernels_over_threshold():
  cfg = ModelConfig(name="vit", num_layers=3, d_model=64, num_heads=4, image_size=8, patch_size=4,
                    init=InitConfig(base="gpt2"))  # std 0.02 kernels, so x3 puts layer 2 over
  model = build(cfg, seed=9)
  q = model.stack.blocks.attn.q
  q.kernel[...] = q.kernel[...].at[1].multiply(3.0).at[1].add(0.01)  # layer 2: std 0.06, mean 0.01
  q.bias[...] = jnp.ones_like(q.bias[...])
  params = nnx.state(model, nnx.Param)
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
  new, report = variance.tvr_rescale(params, variance.TVRConfig(target_std=0.02, threshold=1.2))
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(new))
  kernel, old_kernel = after["stack"]["blocks"]["attn"]["q"]["kernel"], before["stack"]["blocks"]["attn"]["q"]["kernel"]
  np.testing.assert_allclose(np.std(kernel[1]), 0.02, rtol=1e-5)
  np.testing.assert_allclose(np.mean(kernel[1]), np.mean(old_kernel[1]), atol=1e-6)
  np.testing.assert_array_equal(kernel[[0, 2]], old_kernel[[0, 2]])
  bias = after["stack"]["blocks"]["attn"]["q"]["bias"]
  np.testing.assert_array_equal(bias[1], 0.0)
  np.testing.assert_array_equal(bias[[0, 2]], 1.0)
  for name in ("patch_embed", "head", "position"):
    jax.tree.map(np.testing.assert_array_equal, after[name], before[name])
  np.testing.assert_allclose(report["std"]["stack/blocks/attn/q/kernel"][1], np.std(old_kernel[1]), rtol=1e-5)
  np.testing.assert_array_equal(report["rescaled"]["stack/blocks/attn/q/kernel"], [False, True, False])
  # the README/headline target 0.01 rescales every init-0.02 kernel; per-layer targets shrink as 1/sqrt(l)
  new, _ = variance.tvr_rescale(params, variance.TVRConfig(per_layer_target=True))
  fc1 = nnx.to_pure_dict(new)["stack"]["blocks"]["mlp"]["fc1"]["kernel"]
  np.testing.assert_allclose(np.std(fc1.reshape(3, -1), axis=1), 0.01 / np.sqrt([1, 2, 3]), rtol=1e-5)


def perturb_norms(model, seed):
  """Random LayerNorm gains and biases, so folding them is actually exercised."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  state = jax.tree_util.tree_map_with_path(
      lambda path, v: v + jnp.asarray(rng.normal(size=v.shape) * 0.3, v.dtype)
      if "norm" in jax.tree_util.keystr(path) else v, state)
  nnx.update(model, state)


def train_steps(model, x, steps=5):
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(jax.nn.log_softmax(m(x)[0])[..., 0]))(model)
    optimizer.update(model, grads)
    return loss

  for _ in range(steps):
    step(model, optimizer)


def relative_error(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


CONVERT_CASES = [("llama", dict(tie_embeddings=True)), ("llama", dict(num_kv_heads=2)),
                 # the ViT's reference init has a zero head, whose logits compare nothing
                 ("vit", dict(pool="cls", init=InitConfig(base="gpt2"))),
                 ("vit", dict(pool="mean", placement=PlacementConfig("lns"), init=InitConfig(base="gpt2")))]
CONVERT_GRID = [(i, trained) for i in range(len(CONVERT_CASES)) for trained in (False, True)]
# CI: every case once, each model both untrained and trained
CONVERT_FAST = [(0, False), (1, True), (2, True), (3, False)]


@pytest.mark.parametrize("case,trained", params(CONVERT_GRID, CONVERT_FAST))
def test_conversion_is_exact(case, trained):
  """Logits of the LN, RMS and CRMS models agree to 1e-5 relative (max |diff| / max |logit|), float32."""
  name, changes = CONVERT_CASES[case]
  cfg = ModelConfig(name=name, num_layers=3, d_model=32, num_heads=4, vocab_size=64, image_size=8,
                    patch_size=4, norm=NormConfig("layer_norm"), **changes)
  rng = np.random.default_rng(10)
  x = (jnp.asarray(rng.integers(0, 64, (4, 12))) if name == "llama"
       else jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32))
  model = build(cfg, seed=10)
  perturb_norms(model, 10)
  if trained:
    train_steps(model, x)
  reference, _ = model(x)
  rms = convert.to_rms(model)
  crms = convert.to_crms(rms)
  assert rms.cfg.norm.kind == "rms_norm" and crms.cfg.norm.kind == "crms_norm"
  assert crms.cfg.width == 31 and crms.stack.blocks.attn.q.kernel[...].shape[1] == 31
  assert relative_error(rms(x)[0], reference) < 1e-5
  assert relative_error(crms(x)[0], reference) < 1e-5
  # the RMS model's residual stream really is zero-mean in every token
  _, rms_stats = rms(x, collect_stats=True)
  assert float(jnp.max(jnp.abs(rms_stats["hidden"].mean(-1)))) < 1e-5


def test_conversion_rejects_what_it_cannot_convert():
  cfg = ModelConfig(name="llama", num_layers=2, d_model=16, num_heads=2, vocab_size=16)
  with pytest.raises(ValueError, match=r"this conversion starts from 'layer_norm'"):
    convert.to_rms(build(cfg))
  with pytest.raises(ValueError, match=r"exact only for \['pre', 'lns'\]"):
    convert.to_rms(build(cfg.replace(norm=NormConfig("layer_norm"), placement=PlacementConfig("post"))))
  with pytest.raises(ValueError, match=r"affine-free RMSNorm"):
    convert.to_crms(build(cfg))
  plain = cfg.replace(norm=NormConfig("rms_norm", {"use_scale": False}))
  with pytest.raises(ValueError, match=r"not zero-mean"):
    convert.to_crms(build(plain))
