"""Config-time errors, statistics against captured activations, variance growth with depth at init,
and the statistics helpers (gradient norms, weight std, angular distance, block removal)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from normjax import placements, stats
from normjax.models import InitConfig, ModelConfig, NormConfig, PlacementConfig, build
from normjax.models.vit import patchify

BASE = dict(num_layers=3, d_model=16, num_heads=4, vocab_size=32, image_size=8, patch_size=4, mlp_dim=32)


@pytest.mark.parametrize("changes,match", [
    (dict(placement=PlacementConfig("peri_ln")),
     r"model.placement.kind='peri_ln' is not valid; choose one of .* \(did you mean 'peri'\?\)"),
    (dict(norm=NormConfig("rmsnorn")), r"model.norm: unknown norm 'rmsnorn'. Did you mean 'rmsnorm'\?"),
    (dict(norm=NormConfig("rms_norm", {"epsilon": 1e-5})), r"model.norm: .*no option 'epsilon'"),
    (dict(num_heads=5), r"model.num_heads=5 does not divide model.d_model=16"),
    (dict(num_kv_heads=3), r"model.num_kv_heads=3 does not divide model.num_heads=4"),
    (dict(norm=NormConfig("sigma_reparam")), r"transforms weights.*placement.kind='none'"),
    (dict(norm=NormConfig("batch_norm")), r"leaks future tokens"),
    (dict(norm=NormConfig("crms_norm")), r"crms_norm needs the compressed"),
    (dict(placement=PlacementConfig("lns"), init=InitConfig("scaled")), r"must not be combined"),
    (dict(dtype="float16"), r"model.dtype='float16' is not valid; choose one of \['float32', 'bfloat16'\]"),
    (dict(remat="some"), r"model.remat='some'"),
    (dict(init=InitConfig("xavier")), r"model.init.scheme='xavier'.*'lir'"),
    (dict(name="gpt"), r"model.name='gpt'.*\['llama', 'gpt2', 'vit'\]"),
])
def test_bad_model_configs_fail_before_building(changes, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**{"name": "llama", **BASE, **changes})


def test_vit_specific_errors_and_from_dict():
  with pytest.raises(ValueError, match=r"model.patch_size=3 does not divide model.image_size=8"):
    ModelConfig(name="vit", **{**BASE, "patch_size": 3})
  with pytest.raises(ValueError, match=r"model.placement.kind='mix' with stateful norm 'batch_norm'"):
    ModelConfig(name="vit", **BASE, norm=NormConfig("bn"), placement=PlacementConfig("mix"))
  with pytest.raises(ValueError, match=r"model.depth is not a model field"):
    ModelConfig.from_dict({"depth": 3})
  with pytest.raises(ValueError, match=r"model.placement.alpha is not a field"):
    ModelConfig.from_dict({"placement": {"kind": "mix", "alpha": 0.5}})
  cfg = ModelConfig.from_dict({"name": "vit", "norm": {"kind": "dyt", "options": {"alpha_init": 0.3}},
                               "placement": {"kind": "peri", "embed_norm": True}})
  assert cfg.norm.options["alpha_init"] == 0.3 and cfg.placement.embed_norm


def _rms(a):
  return float(np.sqrt(np.mean(np.square(a))))


def test_stats_match_captured_activations():
  """Pre-LN ViT: re-run every sublayer by hand from the stacked blocks and recompute each statistic."""
  cfg = ModelConfig(name="vit", **BASE, norm=NormConfig("layer_norm"),
                    init=InitConfig(std=0.2, base="gpt2"))
  model = build(cfg, seed=4)
  images = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8, 8, 1)), jnp.float32)
  _, got = model(images, collect_stats=True)
  x = model.patch_embed(patchify(images, 4))
  x = jnp.concatenate([jnp.broadcast_to(model.cls[...], (2, 1, 16)), x], 1) + model.position[...]
  np.testing.assert_allclose(got["embed/resid_var"], np.var(np.asarray(x)), rtol=1e-5)
  hidden = [np.asarray(x[:, 0])]
  graphdef, state = nnx.split(model.stack.blocks)
  for layer in range(cfg.num_layers):
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], state))
    for sublayer, module, norm in (("attn", block.attn, block.attn_norm_in),
                                   ("mlp", block.mlp, block.mlp_norm_in)):
      h = norm(x)
      out, _ = module(h)
      if sublayer == "attn":  # entropy from the captured queries and keys, in NumPy
        q = np.asarray(module.q(h)).reshape(2, -1, 4, 4)
        k = np.asarray(module.k(h)).reshape(2, -1, 4, 4)
        logits = np.einsum("bthd,bshd->bhts", q, k) / 2.0
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(got["attn/attn_entropy"][layer], -(p * np.log(p)).sum(-1).mean(),
                                   rtol=1e-5)
      x = x + out
      xa = np.asarray(x)
      expected = {"resid_var": np.var(xa), "resid_rms": np.sqrt((xa ** 2).mean(-1)).mean(),
                  "max_abs": np.abs(xa).max(), "branch_rms": _rms(out), "norm_in_rms": _rms(x - out),
                  "norm_out_rms": _rms(h)}
      for name, value in expected.items():
        np.testing.assert_allclose(got[f"{sublayer}/{name}"][layer], value, rtol=2e-5,
                                   err_msg=f"{sublayer}/{name}[{layer}]")
    hidden.append(np.asarray(x[:, 0]))
  np.testing.assert_allclose(got["hidden"], np.stack(hidden), rtol=1e-5, atol=1e-6)


def _depth_profile(placement: str):
  """Residual variance after every block of a 12-layer LayerNorm ViT at init, and x_0's variance;
  N(0, 0.02^2) weights (init base gpt2), small enough that every branch is close to linear."""
  cfg = ModelConfig(name="vit", num_layers=12, d_model=256, num_heads=4, image_size=16, patch_size=2,
                    channels=3, norm=NormConfig("layer_norm"), placement=PlacementConfig(placement),
                    init=InitConfig(base="gpt2"))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, 3)), jnp.float32)
  _, got = nnx.jit(lambda m, x: m(x, collect_stats=True))(build(cfg), images)
  return float(got["embed/resid_var"]), np.asarray(got["mlp/resid_var"]), got


def test_variance_growth_with_depth_at_init():
  """Pre-LN grows linearly, LNS like the harmonic number, Post-LN stays at 1.

  Analytic model at init: each branch sees a unit-variance (normalized) input and is close to
  linear, so it adds a roughly constant variance c uncorrelated with the stream: Pre-LN
  Var_l = Var_0 + c l; with LNS the branch input is scaled by 1/sqrt(l), so Var_l = Var_0 + c H_l
  (H_l = sum 1/k); Post-LN renormalizes every sublayer, so Var_l = 1. c is the measured first-block
  increment. Tolerances: additivity (no covariance) 5 % per sublayer; Pre-LN 30 % of the predicted
  growth (the increments drift up slowly with depth); LNS 15 %; Post-LN 1e-3 absolute.
  """
  v0, pre, pre_stats = _depth_profile("pre")
  _, lns, lns_stats = _depth_profile("lns")
  _, post, _ = _depth_profile("post")
  layers = np.arange(1, 13)
  c = pre[0] - v0
  assert np.all(np.diff(pre) > 0) and pre[-1] > 10 * pre[0]
  np.testing.assert_allclose(pre - v0, c * layers, rtol=0.30)
  np.testing.assert_allclose(lns - v0, c * np.cumsum(1.0 / layers), rtol=0.15)
  assert np.all(lns[1:] < pre[1:])
  np.testing.assert_allclose(post, 1.0, atol=1e-3)
  for got in (pre_stats, lns_stats):
    before_attn = np.concatenate([[v0], np.asarray(got["mlp/resid_var"])[:-1]])
    np.testing.assert_allclose(got["attn/resid_var"], before_attn + np.asarray(got["attn/branch_rms"]) ** 2,
                               rtol=0.05)


def test_layer_grad_norms_and_weight_std():
  model = build(ModelConfig(name="llama", **BASE), seed=5)
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 32, (2, 6)))
  grads = nnx.grad(lambda m: jnp.mean(m(tokens)[0] ** 2))(model)
  norms_ = stats.layer_grad_norms(grads)
  pure = nnx.to_pure_dict(grads)["stack"]["blocks"]
  manual = np.sqrt(sum(np.sum(np.asarray(g, np.float64).reshape(3, -1) ** 2, 1)
                       for g in jax.tree.leaves(pure)))
  np.testing.assert_allclose(norms_, manual, rtol=1e-5)
  std = stats.layer_weight_std(nnx.state(model, nnx.Param))
  q = np.asarray(model.stack.blocks.attn.q.kernel[...])
  np.testing.assert_allclose(std["stack/blocks/attn/q/kernel"], q.reshape(3, -1).std(1), rtol=1e-5)
  assert len(std) == 7  # q, k, v, o, gate, up, down


def test_angular_distance_against_numpy():
  hidden = jnp.asarray(np.random.default_rng(6).normal(size=(5, 3, 8)), jnp.float32)
  got = np.asarray(stats.angular_distance(hidden))
  h = np.asarray(hidden, np.float64)
  for start in range(5):
    for span in range(5):
      if start + span > 4:
        assert np.isnan(got[start, span])
        continue
      a, b = h[start], h[start + span]
      cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
      np.testing.assert_allclose(got[start, span], np.mean(np.arccos(np.clip(cos, -1, 1)) / np.pi),
                                 atol=1e-5)
  zero = stats.angular_distance(jnp.zeros((2, 1, 4)))
  assert float(zero[0, 1]) == 0.5


def test_removal_losses_equal_zeroed_writers():
  """Removing block l == zeroing its writers (o, fc2 kernels and biases) in a Pre-LN ViT."""
  cfg = ModelConfig(name="vit", **BASE, init=InitConfig(std=0.2, base="gpt2"))
  model = build(cfg, seed=7)
  batch = {"inputs": jnp.asarray(np.random.default_rng(7).normal(size=(2, 8, 8, 1)), jnp.float32),
           "labels": jnp.asarray([1, 2])}
  loss_fn = lambda logits, batch: -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), batch["labels"]])
  losses = np.asarray(stats.removal_losses(model, batch, loss_fn))
  np.testing.assert_allclose(losses[0], loss_fn(model(batch["inputs"])[0], batch), rtol=1e-6)
  for layer in (1, 3):
    zeroed = build(cfg, seed=7)
    for dense in (zeroed.stack.blocks.attn.o, zeroed.stack.blocks.mlp.fc2):
      for var in (dense.kernel, dense.bias):
        var[...] = var[...].at[layer - 1].set(0.0)
    np.testing.assert_allclose(losses[layer], loss_fn(zeroed(batch["inputs"])[0], batch), rtol=1e-5)
  assert len(set(np.round(losses, 6))) > 1


def test_placement_registry():
  assert set(placements.names()) == {"pre", "post", "peri", "mix", "lns", "deepnorm", "post_only", "none"}
  assert placements.get("peri").norm_slots == ("in", "out")
  assert placements.deepnorm_alpha(8) == pytest.approx(16 ** 0.25)
