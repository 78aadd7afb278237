"""Conda (arXiv:2509.24218) against a float64 transcription of the paper's algorithm as its code
runs it (PyTorch layout ``[out, in]``, ``proj_type="std"``), the basis refresh cadence, the targets by
parameter type, and a training run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from training import SMALL_LLAMA, load_config, train_losses

from normjax import models
from normjax.config import ConfigError, validate
from normjax.train import conda, train

B1, B2, EPS, LR, WD, GAP, SCALE = 0.9, 0.99, 1e-8, 0.02, 0.1, 2, 0.25


def reference(w, targets, steps, project):
  """``steps`` Conda steps of one torch-layout weight ``w`` [out, in] on 0.5 |w - targets|^2."""
  m, v, ortho = np.zeros_like(w), np.zeros_like(w), None
  for step in range(steps):
    g = w - targets
    m = B1 * m + (1 - B1) * g
    if project:
      right = w.shape[0] >= w.shape[1]
      if step % GAP == 0:
        u, _, vh = np.linalg.svd(m, full_matrices=False)
        ortho = vh if right else u
      proj = (lambda x: x @ ortho.T) if right else (lambda x: ortho.T @ x)
      g_used, m_used = proj(g), proj(m)
    else:
      g_used, m_used = g, m
    v = B2 * v + (1 - B2) * g_used * g_used
    direction = m_used / (np.sqrt(v) + EPS)
    if project:
      direction = (direction @ ortho if right else ortho @ direction) * SCALE
    w = w - LR * np.sqrt(1 - B2 ** (step + 1)) / (1 - B1 ** (step + 1)) * direction
    w = w - LR * WD * w
  return w


def test_conda_is_the_papers_algorithm_in_float64():
  """Two stacked kernels [2, in, out] (projected on either side), an embedding and a bias (Adam);
  5 steps with a refresh every 2, each layer against its own torch-layout reference."""
  rng = np.random.default_rng(0)
  shapes = {"wide": (2, 4, 6), "tall": (2, 6, 4), "embed": (10, 4), "bias": (4,)}
  params = {k: rng.normal(size=s) for k, s in shapes.items()}
  goal = {k: rng.normal(size=s) for k, s in shapes.items()}
  is_target = {k: conda.Target.matrix(s, np.float64) if k in ("wide", "tall") else conda.Target()
               for k, s in shapes.items()}
  with jax.enable_x64(True):
    tx = conda.conda(LR, targets=is_target, b1=B1, b2=B2, eps=EPS, weight_decay=WD,
                     update_proj_gap=GAP, scale=SCALE)
    ours = jax.tree.map(jnp.asarray, params)
    state = tx.init(ours)
    for _ in range(5):
      updates, state = tx.update(jax.tree.map(lambda w, t: w - t, ours, goal), state, ours)
      ours = optax.apply_updates(ours, updates)
  for k in ("wide", "tall"):
    expected = np.stack([reference(params[k][i].T, goal[k][i].T, 5, True).T for i in range(2)])
    np.testing.assert_allclose(np.asarray(ours[k]), expected, rtol=1e-9, atol=1e-12, err_msg=k)
  for k in ("embed", "bias"):
    np.testing.assert_allclose(np.asarray(ours[k]), reference(params[k], goal[k], 5, False), rtol=1e-9,
                               atol=1e-12, err_msg=k)


def test_the_basis_is_refreshed_every_gap_steps_and_orthogonal():
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)}
  tx = conda.conda(1e-2, targets={"w": conda.Target.matrix((2, 5, 7), jnp.float32)}, update_proj_gap=3)
  state = tx.init(params)
  seen = []
  for _ in range(7):
    grads = {"w": jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    seen.append(np.asarray(state.basis[0]))
  changed = [not np.array_equal(seen[i], seen[i - 1]) for i in range(1, 7)]
  assert changed == [False, False, True, False, False, True]  # refreshed at steps 0, 3, 6
  basis = seen[-1]  # [2, 5, 5]: the shorter side
  np.testing.assert_allclose(basis @ np.swapaxes(basis, -1, -2), np.broadcast_to(np.eye(5), (2, 5, 5)),
                             atol=1e-5)


def test_targets_are_the_block_kernels():
  cfg = models.ModelConfig(name="llama", num_layers=2, d_model=32, num_heads=2, vocab_size=64)
  chosen = conda.targets(nnx.state(models.build(cfg, seed=0), nnx.Param))
  blocks = chosen["stack"]["blocks"]
  assert blocks["attn"]["q"]["kernel"].basis == (2, 32, 32) and blocks["mlp"]["down"]["kernel"].basis[0] == 2
  assert conda.Target() == chosen["embed"] == chosen["head"]["kernel"] == chosen["final_norm"]["scale"]
  assert blocks["attn_norm_in"]["scale"] == conda.Target()


def test_conda_trains_a_small_llama(tmp_path, data_dir):
  config = load_config("configs/llama.py:tiny", {**SMALL_LLAMA, "train.steps": 30, "optim.lr": 1e-2,
                                                  "optim.name": "conda", "optim.conda.update_proj_gap": 10,
                                                  "stats.every": 0}, data_dir)
  result = train(config, str(tmp_path))
  losses = train_losses(tmp_path)
  assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 0.5, losses
  assert result["eval_loss"] < losses[1]


@pytest.mark.parametrize("changes, match", [
    ({"optim.conda.update_proj_gap": 0}, r"optim.conda.update_proj_gap=0 must be an integer >= 1"),
    ({"optim.conda.scale": -1.0}, r"optim.conda.scale=-1.0 must be finite and > 0"),
])
def test_bad_conda_options_fail_with_the_field(data_dir, changes, match):
  config = load_config("configs/llama.py:tiny", {**SMALL_LLAMA, **changes}, data_dir)
  with pytest.raises(ConfigError, match=match):
    validate(config, available_devices=1)
