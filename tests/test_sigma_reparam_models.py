"""``model.reparam="sigma"``: every dense layer of LLaMA and the ViT as gamma / sigma(W) * W
(sigmaReparam, arXiv:2303.06296), its two defining properties checked on whole models, the
norm-free ViT recipe trained, and the refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from training import load_config

from normjax import interop, models
from normjax.models import InitConfig, NormConfig, PlacementConfig
from normjax.params import Kernel, NormState, variables
from normjax.train import train
from normjax.train.writer import read_stats
from normjax.validation import ConfigError

LLAMA = models.ModelConfig(name="llama", num_layers=2, d_model=32, num_heads=2, vocab_size=64)
VIT = models.ModelConfig(name="vit", num_layers=2, d_model=32, num_heads=2, image_size=8, patch_size=2,
                         init=InitConfig(base="gpt2"), norm=NormConfig("layer_norm"))


def inputs(cfg: models.ModelConfig) -> jax.Array:
  rng = np.random.default_rng(0)
  if cfg.name == "vit":
    return jnp.asarray(rng.uniform(size=(2, 8, 8, 1)), jnp.float32)
  return jnp.asarray(rng.integers(0, 64, (2, 8)))


@pytest.mark.parametrize("cfg", [LLAMA, VIT], ids=["llama", "vit"])
def test_at_init_the_model_is_the_plain_one_and_every_dense_layer_is_reparametrized(cfg):
  """gamma starts at sigma(W0) (the torch reference), so W_hat = W0 and the logits are the plain
  model's; each kernel (blocks, head, patch embedding) carries its gamma and power-iteration u."""
  plain, sigma = models.build(cfg, seed=0), models.build(cfg.replace(reparam="sigma"), seed=0)
  np.testing.assert_allclose(sigma(inputs(cfg))[0], plain(inputs(cfg))[0], rtol=1e-4, atol=1e-5)
  kernels = [path for path, var in variables(nnx.state(sigma, nnx.Param)) if isinstance(var, Kernel)]
  states = [path for path, var in variables(nnx.state(sigma, NormState))]
  # LLaMA: q k v o gate up down head; ViT: q k v o fc1 fc2 head patch_embed
  assert len(kernels) == len(states) == 8
  assert {p[:-1] for p in kernels} == {p[:-2] for p in states}  # kernel's module holds weight_norm/u


@pytest.mark.parametrize("cfg", [LLAMA, VIT], ids=["llama", "vit"])
def test_the_model_is_invariant_to_the_scale_of_every_kernel(cfg):
  """W_hat = gamma W / sigma(W) does not change when W is multiplied by c (sigma(cW) = c sigma(W),
  and the power iteration's u is the same): scaling every kernel by 3 leaves the logits alone,
  while the plain model's change."""
  sigma = models.build(cfg.replace(reparam="sigma"), seed=0)
  plain = models.build(cfg, seed=0)
  before, before_plain = sigma(inputs(cfg))[0], plain(inputs(cfg))[0]
  for model in (sigma, plain):
    for _, var in variables(nnx.state(model, nnx.Param)):
      if isinstance(var, Kernel):
        var[...] = 3.0 * var[...]
  np.testing.assert_allclose(sigma(inputs(cfg))[0], before, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(plain(inputs(cfg))[0] - before_plain)).max() > 1e-2


def test_the_norm_free_vit_recipe_trains(tmp_path, data_dir):
  """The paper's ViT recipe: every norm removed, every dense layer reparametrized (the reference
  init, its head N(0, 0.02^2) instead of zero); it leaves chance on the digits and the attention
  entropy is recorded."""
  config = load_config("configs/vit.py:tiny", {
      "train.steps": 100, "train.batch_size": 32, "train.eval_every": 0, "stats.every": 25,
      "mesh.num_devices": 1, "optim.warmup_steps": 6, "model.reparam": "sigma",
      "model.placement.kind": "none", "model.placement.final_norm": False},
      data_dir)
  result = train(config, str(tmp_path))
  assert result["eval_accuracy"] > 0.5, result  # chance is 0.1; 0.77 after 150 steps
  assert read_stats(tmp_path)["attn/attn_entropy"].shape[1] == config.model.num_layers


@pytest.mark.parametrize("base, changes, match", [
    (LLAMA, dict(reparam="spectral"),
     r"model.reparam='spectral' is not valid; choose one of \['none', 'sigma'\]"),
    (LLAMA, dict(reparam="sigma", norm=NormConfig("sigma_reparam"), placement=PlacementConfig("none")),
     r"both reparametrize the block kernels"),
])
def test_refusals(base, changes, match):
  with pytest.raises(ConfigError, match=match):
    base.replace(**changes)


def test_hugging_face_export_refuses_a_reparametrized_model():
  with pytest.raises(ConfigError, match="model.reparam"):  # no HF class has sigmaReparam
    interop.hf.check_exportable(LLAMA.replace(reparam="sigma"))
