"""LLaMA, GPT-2 and ViT: every placement x a representative set of norms (forward, gradient, scan == unrolled,
statistics), stateful and weight-space kinds, dtypes, remat and parameter metadata.

The placement x norm x model grid runs pairwise in CI (every placement with rms_norm and every norm
with pre, in both models, plus the combinations with their own code path); the rest is ``slow``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from grid import params

from normjax import placements
from normjax.models import InitConfig, ModelConfig, NormConfig, PlacementConfig, build
from normjax.nn.nnx import NormState

PLACEMENTS = placements.names()
REPRESENTATIVE_NORMS = ["layer_norm", "rms_norm", "dyt"]
MODEL_GRID = [(name, placement, norm) for name in ("llama", "gpt2", "vit") for placement in PLACEMENTS
              for norm in REPRESENTATIVE_NORMS]
MODEL_FAST = ([(name, placement, "rms_norm") for name in ("llama", "vit") for placement in PLACEMENTS]
              + [(name, "pre", norm) for name in ("llama", "vit") for norm in ("layer_norm", "dyt")]
              # their own code: LNS's out_scale folded into a biased LayerNorm, and multiplied after
              # a kind without out_scale (dyt); Mix-LN's traced switch with a biased norm
              + [("llama", "lns", "layer_norm"), ("vit", "lns", "dyt"), ("vit", "mix", "layer_norm")]
              # the GPT-2 family: learned positions, GELU, biases, on the same block
              + [("gpt2", "pre", "layer_norm"), ("gpt2", "peri", "rms_norm")])


def small(name: str, placement: str = "pre", norm: str | NormConfig = "rms_norm", **changes) -> ModelConfig:
  base = dict(name=name, num_layers=3, d_model=16, num_heads=4, vocab_size=32, image_size=8,
              patch_size=4, mlp_dim=32, norm=norm if isinstance(norm, NormConfig) else NormConfig(norm),
              placement=PlacementConfig(placement, mix_alpha=0.5))  # mix: block 1 Post-LN
  if name == "llama":
    base["num_kv_heads"] = 2
  if name == "vit":  # big_vision's zero head would zero every gradient of the logits^2 loss below
    base["init"] = InitConfig(base="gpt2")
  base.update(changes)
  return ModelConfig(**base)


def inputs(name: str, seed: int = 0) -> jax.Array:
  rng = np.random.default_rng(seed)
  if name != "vit":
    return jnp.asarray(rng.integers(0, 32, size=(2, 6)))
  return jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)


def loss_and_grads(model, x, *, train=False, collect_stats=True):
  def loss_fn(model):
    logits, stats = model(x, train=train, collect_stats=collect_stats)
    return jnp.mean(logits ** 2), (logits, stats)
  (loss, (logits, stats)), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
  return loss, logits, stats, grads


@pytest.mark.parametrize("name,placement,norm", params(MODEL_GRID, MODEL_FAST))
def test_every_placement_forward_gradient_scan_and_stats(name, placement, norm):
  cfg = small(name, placement, norm)
  x = inputs(name)
  scanned = build(cfg, seed=1)
  loss, logits, stats, grads = loss_and_grads(scanned, x)
  assert np.isfinite(float(loss))
  flat = jax.tree.leaves(grads)
  assert all(np.isfinite(g).all() for g in flat)
  assert sum(float(jnp.sum(g ** 2)) for g in flat) > 0
  # the unrolled Python loop (static layer indices, run eagerly) gives the same logits and stats
  logits_u, stats_u = build(cfg.replace(scan_layers=False), seed=1)(x, collect_stats=True)
  np.testing.assert_allclose(logits, logits_u, rtol=1e-5, atol=1e-6)
  L = cfg.num_layers
  for sublayer in ("attn", "mlp"):
    for stat in ("resid_var", "resid_rms", "max_abs", "branch_rms", "norm_in_rms", "norm_out_rms"):
      key = f"{sublayer}/{stat}"
      assert stats[key].shape == (L,), key
      np.testing.assert_allclose(stats[key], stats_u[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert stats["attn/attn_entropy"].shape == (L,)
  assert stats["hidden"].shape == (L + 1, 2, cfg.width)
  assert np.isnan(stats["attn/norm_in_rms"]).all() == (placement == "none")


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_scanned_and_unrolled_gradients_and_stats_leave_logits_unchanged(name):
  cfg = small(name, "mix", "layer_norm")
  x = inputs(name)
  _, logits, _, grads = loss_and_grads(build(cfg, seed=1), x)
  _, _, _, grads_u = loss_and_grads(build(cfg.replace(scan_layers=False), seed=1), x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads_u)
  # collecting statistics never changes the numerics of the forward pass
  plain, _ = nnx.jit(lambda m, x: m(x))(build(cfg, seed=1), x)
  with_stats, _ = nnx.jit(lambda m, x: m(x, collect_stats=True))(build(cfg, seed=1), x)
  np.testing.assert_array_equal(plain, with_stats)


@pytest.mark.parametrize("norm", ["batch_norm", "power_norm", "evonorm_b0", "batch_channel_norm",
                                  "unified_norm"])
def test_batch_statistic_norms_in_vit_update_state_scanned_and_unrolled(norm):
  options = {"num_groups": 4} if norm == "batch_channel_norm" else {}
  cfg = small("vit", "pre", NormConfig(norm, options))
  x = inputs("vit")
  models = [build(cfg, seed=2), build(cfg.replace(scan_layers=False), seed=2)]
  before = nnx.to_pure_dict(nnx.state(models[0], NormState))
  outs = [loss_and_grads(m, x, train=True, collect_stats=False) for m in models]
  np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)
  after = [nnx.to_pure_dict(nnx.state(m, NormState)) for m in models]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), after[0], after[1])
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, after[0])
  assert any(jax.tree.leaves(changed)), "train=True did not update the norm state"


def test_weight_space_norm_with_none_placement():
  cfg = small("vit", "none", "sigma_reparam")
  model = build(cfg)
  u_before = model.stack.blocks.attn.q.weight_norm.u.get_value()
  _, logits, _, grads = loss_and_grads(model, inputs("vit"), train=True)
  assert np.isfinite(logits).all()
  assert "gamma" in nnx.to_pure_dict(grads)["stack"]["blocks"]["attn"]["q"]["weight_norm"]
  assert not np.allclose(model.stack.blocks.attn.q.weight_norm.u.get_value(), u_before)


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_bfloat16_compute_and_remat(name):
  x = inputs(name)
  base = build(small(name), seed=3)
  remat = build(small(name, remat="full"), seed=3)
  _, logits, _, grads = loss_and_grads(base, x, collect_stats=False)
  _, logits_r, _, grads_r = loss_and_grads(remat, x, collect_stats=False)
  np.testing.assert_allclose(logits, logits_r, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, grads_r)
  bf16 = build(small(name, dtype="bfloat16"), seed=3)
  logits_bf16, _ = bf16(x)
  assert logits_bf16.dtype == jnp.float32
  np.testing.assert_allclose(logits_bf16, logits, atol=0.05 * float(jnp.max(jnp.abs(logits))))
  bf16_params = build(small(name, param_dtype="bfloat16"), seed=3)
  assert bf16_params.stack.blocks.attn.q.kernel[...].dtype == jnp.bfloat16
  assert np.isfinite(bf16_params(x)[0]).all()


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_every_parameter_has_logical_axes(name):
  model = build(small(name, "peri", "layer_norm"))
  for path, var in jax.tree_util.tree_flatten_with_path(
      nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable))[0]:
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == var[...].ndim, (path, axes)
    if "blocks" in jax.tree_util.keystr(path):
      assert axes[0] == "layers", (path, axes)
  kernel = model.stack.blocks.attn.q.kernel.get_metadata()["out_sharding"]
  assert kernel == ("layers", "embed", "heads")


def test_grouped_query_heads_and_tied_embeddings():
  cfg = small("llama", num_heads=4, num_kv_heads=1, tie_embeddings=True)
  model = build(cfg)
  assert model.head is None
  assert model.stack.blocks.attn.k.kernel[...].shape == (3, 16, 4)
  logits, _ = model(inputs("llama"))
  assert logits.shape == (2, 6, 32)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_causality(name):
  model = build(small(name))
  tokens = inputs(name)
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % 32)
  a, _ = model(tokens)
  b, _ = model(changed)
  np.testing.assert_allclose(a[:, :-1], b[:, :-1], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("name, placement, scan", [("llama", "pre", True), ("llama", "peri", False),
                                                   ("gpt2", "pre", True)])
def test_a_packed_row_of_two_documents_gives_each_document_its_own_logits(name, placement, scan):
  """Row = document A (5 tokens), document B (7 tokens), 4 padding tokens: with segment_ids and
  positions, A's and B's logits equal those of A alone and B alone (attention stays inside a
  document, RoPE or the learned positions restart), and so do their statistics-step logits."""
  model = build(small(name, placement, scan_layers=scan))
  rng = np.random.default_rng(3)
  a, b = rng.integers(1, 32, size=5), rng.integers(1, 32, size=7)
  row = jnp.asarray(np.concatenate([a, b, np.zeros(4, int)]))[None]
  ids = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 4])
  positions = jnp.asarray([list(range(5)) + list(range(7)) + list(range(4))])
  packed, stats = model(row, segment_ids=ids, positions=positions, collect_stats=True)
  alone_a, _ = model(jnp.asarray(a)[None])
  alone_b, _ = model(jnp.asarray(b)[None])
  np.testing.assert_allclose(packed[0, :5], alone_a[0], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(packed[0, 5:12], alone_b[0], rtol=2e-5, atol=2e-5)
  assert np.isfinite(stats["attn/attn_entropy"]).all()
  # without the segments the same row mixes the documents: B's logits change
  unpacked, _ = model(row)
  assert not np.allclose(unpacked[0, 5:12], alone_b[0], atol=1e-3)
  with pytest.raises(ValueError, match="both segment_ids and positions"):
    model(row, segment_ids=ids)


def test_mix_uses_post_then_pre():
  """mix with alpha 1/3 on 3 layers: block 1 is Post-LN (stream normalized), blocks 2-3 Pre-LN."""
  cfg = small("vit", "mix", "layer_norm").replace(
      placement=PlacementConfig("mix", mix_alpha=1 / 3), init=InitConfig(std=0.3, base="gpt2"))
  _, stats = build(cfg)(inputs("vit"), collect_stats=True)
  np.testing.assert_allclose(stats["mlp/resid_var"][0], 1.0, atol=1e-3)
  assert float(stats["mlp/resid_var"][1]) > 1.05
  assert float(stats["mlp/resid_var"][2]) > float(stats["mlp/resid_var"][1])


def _kernel_calls(fn, *args) -> list[tuple[str, int]]:
  """(name, number of outputs) of every pallas_call traced by ``fn(*args)``, nested jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.append((str(eqn.params["name"]), len(eqn.outvars)))
      for value in eqn.params.values():
        for sub in (value if isinstance(value, (list, tuple)) else [value]):
          if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)
          elif hasattr(sub, "eqns"):
            walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("name,placement,norm,fused", [
    ("llama", "lns", "rms_norm", True), ("llama", "pre", "layer_norm", True),
    ("vit", "pre", "layer_norm", True), ("vit", "peri", "layer_norm", False)])
def test_pallas_kernels_in_the_model_match_xla(name, placement, norm, fused):
  """model.norm.impl='pallas' (interpret mode on CPU) changes no loss, logit, gradient or per-depth
  statistic. Pre-LN-style placements defer every residual add into the next norm's kernel: the
  forward kernels of both sublayers (traced once, in the scanned block) take the residual (4
  outputs: y, x + r, mean, rstd) and give ``norm_in_rms`` from their row statistics; other
  placements and the final norm call the plain kernel (3 outputs)."""
  x = inputs(name)
  models = [build(small(name, placement, NormConfig(norm, impl=impl)), seed=1) for impl in ("xla", "pallas")]
  (loss, logits, stats, grads), (loss_p, logits_p, stats_p, grads_p) = [loss_and_grads(m, x) for m in models]
  np.testing.assert_allclose(loss_p, loss, rtol=1e-5)
  np.testing.assert_allclose(logits_p, logits, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_p, grads)
  assert stats_p.keys() == stats.keys()
  for key in stats:
    np.testing.assert_allclose(stats_p[key], stats[key], rtol=1e-4, atol=1e-6, err_msg=key)
  graphdef, state = nnx.split(models[1])
  calls = _kernel_calls(lambda state, x: nnx.merge(graphdef, state)(x), state, x)
  forward = [outputs for kernel, outputs in calls if kernel.endswith("_fwd")]
  assert forward.count(4) == (2 if fused else 0) and forward.count(3) == len(forward) - forward.count(4)


def test_norm_impl_is_validated():
  with pytest.raises(ValueError, match=r"model.norm.impl='cuda' is not valid; choose one of \['xla'"):
    small("llama", norm=NormConfig("rms_norm", impl="cuda"))
  with pytest.raises(ValueError, match=r"model.norm.impl='pallas' needs a kind with a fused kernel"):
    small("llama", norm=NormConfig("dyt", impl="pallas"))


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_zero_mean_writers_make_layer_norm_and_rms_norm_one_function(name):
  """With W - mean_out(W) writers the stream has zero mean for ANY parameters: LN == RMSNorm, so the
  two models share logits AND gradients, and therefore whole training trajectories."""
  x = inputs(name)
  norm = lambda kind: NormConfig(kind, options={"use_bias": False})
  results = {}
  for centred in (True, False):
    ln, rms = (build(small(name, "pre", norm(kind), zero_mean_writers=centred, dense_bias=True), seed=3)
               for kind in ("layer_norm", "rms_norm"))
    results[centred] = (loss_and_grads(ln, x), loss_and_grads(rms, x))
  (loss_ln, logits_ln, stats_ln, grads_ln), (loss_rms, logits_rms, _, grads_rms) = results[True]
  np.testing.assert_allclose(logits_rms, logits_ln, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), grads_rms, grads_ln)
  assert np.abs(stats_ln["hidden"].mean(-1)).max() < 1e-5  # every residual vector has zero mean
  (_, uncentred_ln, _, _), (_, uncentred_rms, _, _) = results[False]
  assert np.abs(uncentred_ln - uncentred_rms).max() > 1e-3  # the claim needs the centring


def test_norm_layer_dispatches_to_the_kernels_only_where_they_apply():
  """impl='auto' or 'pallas' goes through pallas_kernels (which picks XLA on CPU for 'auto') for the
  three fused kinds; impl='xla' or a kind without a kernel stays on the registry's XLA reference,
  and both build the same parameters and logits."""
  from normjax.models.layers import KernelNorm
  built = {(norm, impl): build(small("llama", norm=NormConfig(norm, impl=impl)), seed=4)
           for norm, impl in [("rms_norm", "auto"), ("rms_norm", "xla"), ("layer_norm", "pallas"),
                              ("dyt", "auto")]}
  kinds = {key: type(model.final_norm).__name__ for key, model in built.items()}
  assert kinds == {("rms_norm", "auto"): KernelNorm.__name__, ("rms_norm", "xla"): "Norm",
                   ("layer_norm", "pallas"): KernelNorm.__name__, ("dyt", "auto"): "Norm"}
  x = inputs("llama")
  auto, xla = built["rms_norm", "auto"], built["rms_norm", "xla"]
  assert jax.tree.structure(nnx.state(auto, nnx.Param)) == jax.tree.structure(nnx.state(xla, nnx.Param))
  np.testing.assert_allclose(auto(x)[0], xla(x)[0], rtol=1e-6)
