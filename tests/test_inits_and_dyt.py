"""The ViT's reference init (big_vision), the selectable N(0, std^2) base, and DyT's LLM recipe
(alpha_0 per site by width, the embedding scale, scalars free of weight decay).

Every expectation is the paper's or the reference's number written out here, not read back from
``normjax.models.inits``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from normjax import config as common
from normjax import norms
from normjax.models import (InitConfig, ModelConfig, NormConfig, PlacementConfig, build, params_of,
                            with_params)
from normjax.train import optim
from normjax.validation import ConfigError

VIT = dict(name="vit", num_layers=3, d_model=96, num_heads=4, image_size=16, patch_size=4,
           channels=3, mlp_dim=192, norm=NormConfig("layer_norm"))


def test_vit_reference_init_is_big_vision():
  """Patch kernel LeCun normal (truncated at 2 sigma of the untruncated normal, variance 1/fan_in),
  positions N(0, 1/width) on the patches and 0 on the class token's row, class token and head 0,
  block kernels Xavier uniform (bound sqrt(6/(in+out)), times LIR's 1/sqrt(l) here), MLP biases
  N(0, 1e-6^2), attention biases 0. Variance tolerances 10 %: >= 4.6k draws each."""
  p = params_of(build(ModelConfig(**VIT, init=InitConfig("lir")), seed=3))
  fan_in, w = 4 * 4 * 3, 96
  patch = np.asarray(p["patch_embed"]["kernel"])
  np.testing.assert_allclose(patch.var(), 1 / fan_in, rtol=0.1)
  assert np.abs(patch).max() <= 2 / math.sqrt(fan_in) / 0.87962566103423978 + 1e-6
  position = np.asarray(p["position"])
  np.testing.assert_array_equal(position[0], 0.0)
  np.testing.assert_allclose(position[1:].var(), 1 / w, rtol=0.1)
  np.testing.assert_array_equal(p["cls"], 0.0)
  np.testing.assert_array_equal(p["head"]["kernel"], 0.0)
  blocks = p["stack"]["blocks"]
  for sublayer, role, shape in (("attn", "q", (w, w)), ("attn", "o", (w, w)), ("mlp", "fc1", (w, 192)),
                                ("mlp", "fc2", (192, w))):
    kernel = np.asarray(blocks[sublayer][role]["kernel"])
    for layer in range(3):
      bound = math.sqrt(6 / sum(shape)) / math.sqrt(layer + 1)
      assert np.abs(kernel[layer]).max() <= bound + 1e-7
      np.testing.assert_allclose(kernel[layer].var(), bound ** 2 / 3, rtol=0.1)
  np.testing.assert_allclose(np.std(blocks["mlp"]["fc1"]["bias"]), 1e-6, rtol=0.2)
  assert 0 < np.abs(blocks["mlp"]["fc2"]["bias"]).max() < 1e-5
  np.testing.assert_array_equal(blocks["attn"]["q"]["bias"], 0.0)


def test_gpt2_base_draws_every_matrix_from_one_normal_and_decoders_do_not_change():
  p = params_of(build(ModelConfig(**VIT, init=InitConfig(std=0.05, base="gpt2")), seed=3))
  for matrix in (p["patch_embed"]["kernel"], p["position"], p["head"]["kernel"],
                 p["stack"]["blocks"]["attn"]["q"]["kernel"]):
    np.testing.assert_allclose(np.std(matrix), 0.05, rtol=0.1)
  np.testing.assert_array_equal(p["stack"]["blocks"]["mlp"]["fc1"]["bias"], 0.0)
  # the decoders' reference init is N(0, std^2) already: both bases build the same weights
  for name in ("llama", "gpt2"):
    cfg = ModelConfig(name=name, num_layers=2, d_model=32, num_heads=4, vocab_size=64)
    family = params_of(build(cfg, seed=1))
    gpt2 = params_of(build(cfg.replace(init=InitConfig(base="gpt2")), seed=1))
    jax.tree.map(np.testing.assert_array_equal, family, gpt2)


@pytest.mark.parametrize("changes,match", [
    (dict(init=InitConfig(std=0.1)), r"model.init.std=0.1 is not read by the ViT's reference init"),
    (dict(init=InitConfig(base="xavier")), r"model.init.base='xavier'.*'family', 'gpt2'"),
    (dict(embed_scale=True), r"model.embed_scale=True belongs to the decoders"),
])
def test_init_and_embed_scale_refusals(changes, match):
  with pytest.raises(ConfigError, match=match):
    ModelConfig(**{**VIT, **changes})


def test_vit_reference_init_trains_the_head_first_then_everything():
  """A zero head: the first gradient reaches only the head; after one SGD step every block does."""
  model = build(ModelConfig(**VIT), seed=0)
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 16, 16, 3)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3])

  def loss(m):
    logits, _ = m(images)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

  grads = nnx.to_pure_dict(nnx.grad(loss)(model))
  assert float(jnp.abs(grads["head"]["kernel"]).max()) > 0
  assert float(jnp.abs(grads["stack"]["blocks"]["attn"]["q"]["kernel"]).max()) == 0
  model.head.kernel[...] = model.head.kernel[...] - grads["head"]["kernel"]
  again = nnx.to_pure_dict(nnx.grad(loss)(model))
  assert float(jnp.abs(again["stack"]["blocks"]["attn"]["q"]["kernel"]).max()) > 0


@pytest.mark.parametrize("width,attn,other", [(64, 1.0, 1.0), (1024, 1.0, 1.0), (2048, 1.0, 0.5),
                                              (4096, 0.8, 0.2), (5120, 0.6, 0.15), (8192, 0.2, 0.05),
                                              (16384, 0.2, 0.05)])
def test_dyt_llm_alphas_by_width(width, attn, other):
  """LLaMA 7B (4096) 0.8/0.2, 13B (5120) 0.6/0.15, 34B/70B (8192) 0.2/0.05, as the paper lists."""
  assert norms.dyt_llm_options(width) == dict(alpha_attn=attn, alpha_init=other, alpha_final=other,
                                              use_bias=False)


def test_dyt_llm_recipe_in_the_model():
  """Each site starts at its alpha_0, DyT has no bias, the embedding scale starts at sqrt(d) and
  multiplies the token embedding (set to 1 it is the model without it), scalars never decay."""
  options = dict(alpha_attn=0.8, alpha_init=0.2, alpha_final=0.3, use_bias=False)
  cfg = ModelConfig(name="llama", num_layers=2, d_model=64, num_heads=4, vocab_size=64,
                    norm=NormConfig("dyt", options), embed_scale=True,
                    placement=PlacementConfig("pre", embed_norm=True))
  model = build(cfg, seed=2)
  blocks = model.stack.blocks
  np.testing.assert_allclose(blocks.attn_norm_in.alpha[...], [0.8, 0.8], rtol=1e-7)
  np.testing.assert_allclose(blocks.mlp_norm_in.alpha[...], [0.2, 0.2], rtol=1e-7)
  assert float(model.final_norm.alpha[...]) == pytest.approx(0.3)
  assert float(model.embed_norm.alpha[...]) == pytest.approx(0.2)  # "other": alpha_init
  assert not hasattr(model.final_norm, "bias")
  assert float(model.embed_scale[...]) == pytest.approx(8.0)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 8)))
  weights = params_of(model)
  del weights["embed_scale"]
  weights["embed"] = weights["embed"] * 8.0
  plain = with_params(cfg.replace(embed_scale=False), weights)
  np.testing.assert_allclose(model(tokens)[0], plain(tokens)[0], rtol=1e-5, atol=1e-6)
  mask = optim.decay_mask(nnx.state(model, nnx.Param), decay_norms_and_biases=True)
  assert mask["embed_scale"] is False and not mask["final_norm"]["alpha"]
  assert not mask["stack"]["blocks"]["attn_norm_in"]["alpha"] and mask["final_norm"]["scale"]
  assert mask["embed"] is True


def test_a_norm_site_outside_the_known_ones_is_refused():
  """A misspelled site would silently take the kind's default options instead of its recipe's."""
  from normjax.models import layers
  cfg = ModelConfig(name="llama", num_layers=1, d_model=64, num_heads=4, vocab_size=64,
                    norm=NormConfig("dyt", dict(alpha_attn=0.8)))
  assert float(layers.activation_norm(cfg, "attn", nnx.Rngs(0)).alpha[...]) == pytest.approx(0.8)
  with pytest.raises(ValueError, match="site 'atn' is not one of"):
    layers.activation_norm(cfg, "atn", nnx.Rngs(0))


def test_llama_config_norm_dyt_takes_the_llm_recipe():
  config = common.load("configs/llama.py:tiny,norm=dyt")
  assert config.model.embed_scale is True
  assert dict(config.model.norm.options) == norms.dyt_llm_options(config.model.d_model)
