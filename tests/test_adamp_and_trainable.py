"""AdamP (arXiv:2006.08217) against a float64 transcription of the paper's Algorithm 2 in the
PyTorch layout, its one claim (no norm growth on scale-invariant weights), and ``train.trainable``
(only the selected parameters move; the count is logged).

The reference below is written from the paper, per weight and per output row of a ``[out, in]``
matrix, independently of ``normjax.train.adamp``."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from training import SMALL_LLAMA, load_config, train_losses

from experiments import depth_analysis
from normjax import config as common
from normjax import models
from normjax.config import ConfigError, model_config
from normjax.data import validate as validate_data
from normjax.params import NormParam, variables
from normjax.train import adamp, train
from normjax.train.optim import OptimConfig, make_optimizer

B1, B2, EPS, LR, WD, DELTA, RATIO = 0.9, 0.999, 1e-8, 0.05, 0.1, 0.1, 0.1


def reference_step(w, g, m, v, t, nesterov=False):
  """One AdamP step of a torch-layout weight ``w`` [out, ...] (rows = channels), float64."""
  m = B1 * m + (1 - B1) * g
  v = B2 * v + (1 - B2) * g * g
  denom = np.sqrt(v) / np.sqrt(1 - B2 ** t) + EPS
  p = ((B1 * m + (1 - B1) * g) if nesterov else m) / denom
  ratio = 1.0
  if w.ndim > 1:
    for rows in (w.reshape(w.shape[0], -1), w.reshape(1, -1)):  # channels, then the whole weight
      grads = g.reshape(rows.shape)
      cos = np.abs(np.sum(rows * grads, 1)) / (np.maximum(np.linalg.norm(rows, axis=1), EPS)
                                               * np.maximum(np.linalg.norm(grads, axis=1), EPS))
      if cos.max() < DELTA / np.sqrt(rows.shape[1]):
        unit = rows / (np.linalg.norm(rows, axis=1, keepdims=True) + EPS)
        flat = p.reshape(rows.shape)
        p = (flat - unit * np.sum(unit * flat, 1, keepdims=True)).reshape(w.shape)
        ratio = RATIO
        break
  w = w * (1 - LR * WD * ratio) - LR / (1 - B1 ** t) * p
  return w, m, v


def grad_channel_invariant(w, c):
  """d/dw of sum(c * w_row / |w_row|) (torch layout): orthogonal to every row of w."""
  norm = np.linalg.norm(w, axis=1, keepdims=True)
  unit = w / norm
  return (c - unit * np.sum(c * unit, 1, keepdims=True)) / norm


def grad_layer_invariant(w, c):
  """d/dw of sum(c * w / |w|): orthogonal to w as a whole, not row by row."""
  norm = np.linalg.norm(w)
  return (c - w / norm * np.sum(c * w / norm)) / norm


GRADS = {"channel": grad_channel_invariant, "layer": grad_layer_invariant,
         "plain": lambda w, c: w - c}  # 0.5 |w - c|^2: not scale-invariant


@pytest.mark.parametrize("nesterov", [False, True])
def test_adamp_is_the_papers_algorithm_in_float64(nesterov):
  """Flax kernels [in, out] (channel = a column), one stacked [2, in, out] kernel whose layers test
  differently, and a bias: 4 steps each against the torch-layout reference."""
  rng = np.random.default_rng(0)
  kinds = {"channel": "channel", "layer": "layer", "plain": "plain"}
  flax_w = {k: rng.normal(size=(6, 5)) for k in kinds}  # [in, out]
  flax_w["stacked"] = rng.normal(size=(2, 6, 5))
  flax_w["bias"] = rng.normal(size=(5,))
  targets = {k: rng.normal(size=np.shape(v)) for k, v in flax_w.items()}
  views = {**{k: adamp.View(0, 1) for k in kinds}, "stacked": adamp.View(1, 2), "bias": adamp.View(0, None)}

  def grads_of(w):  # every kernel through its torch layout [out, in]
    g = {k: GRADS[k](w[k].T, targets[k].T).T for k in kinds}
    g["stacked"] = np.stack([grad_channel_invariant(w["stacked"][0].T, targets["stacked"][0].T).T,
                             GRADS["plain"](w["stacked"][1], targets["stacked"][1])])
    g["bias"] = w["bias"] - targets["bias"]
    return g

  with jax.enable_x64(True):
    tx = adamp.adamp(LR, views=views, b1=B1, b2=B2, eps=EPS, weight_decay=WD, delta=DELTA,
                     wd_ratio=RATIO, nesterov=nesterov)
    params = jax.tree.map(jnp.asarray, flax_w)
    state = tx.init(params)
    ref = {k: v.copy() for k, v in flax_w.items()}
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in flax_w.items()}
    for t in range(1, 5):
      updates, state = tx.update(jax.tree.map(jnp.asarray, grads_of(jax.tree.map(np.asarray, params))),
                                 state, params)
      params = optax.apply_updates(params, updates)
      g = grads_of(ref)
      for k in flax_w:
        if k == "stacked":
          layers = [reference_step(ref[k][i].T, g[k][i].T, moments[k][0][i].T, moments[k][1][i].T, t,
                                   nesterov) for i in range(2)]
          ref[k] = np.stack([layer[0].T for layer in layers])
          moments[k] = tuple(np.stack([layer[j].T for layer in layers]) for j in (1, 2))
        else:
          transpose = np.transpose if ref[k].ndim == 2 else (lambda x: x)
          w, m, v = reference_step(transpose(ref[k]), transpose(g[k]), *map(transpose, moments[k]), t,
                                   nesterov)
          ref[k], moments[k] = transpose(w), (transpose(m), transpose(v))
    for k in flax_w:
      np.testing.assert_allclose(np.asarray(params[k]), ref[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_without_scale_invariant_weights_adamp_is_adamw():
  """Gradients far from orthogonal to the weights (cos near 1): no projection, AdamW's update."""
  rng = np.random.default_rng(1)
  params = {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  target = jax.tree.map(lambda p: 3 * p + 0.1 * jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  views = {"kernel": adamp.View(0, 1), "bias": adamp.View(0, None)}
  ours = adamp.adamp(1e-2, views=views, weight_decay=0.1)
  theirs = optax.adamw(1e-2, weight_decay=0.1)
  a, b = params, params
  sa, sb = ours.init(a), theirs.init(b)
  for _ in range(5):
    ua, sa = ours.update(jax.tree.map(lambda p, t: p - t, a, target), sa, a)
    ub, sb = theirs.update(jax.tree.map(lambda p, t: p - t, b, target), sb, b)
    a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_adamp_keeps_the_norm_of_scale_invariant_weights():
  """The paper's claim (Sec. 3): Adam's momentum inflates |w| of a scale-invariant weight, which
  shrinks its effective step. AdamP's update is orthogonal to each column, so by Pythagoras
  |w_T|^2 = |w_0|^2 + sum_t |update_t|^2 exactly (growth of second order only), while AdamW's
  radial component adds 2 w.update per step on top."""
  rng = np.random.default_rng(2)
  w0 = rng.normal(size=(16, 8)) * 0.1  # [in, out]; the loss sees only the column directions
  target = rng.normal(size=w0.shape)
  growth, squares = {}, np.zeros(w0.shape[1])
  for name, tx in (("adamw", optax.adamw(1e-2, weight_decay=0.0)),
                   ("adamp", adamp.adamp(1e-2, views={"w": adamp.View(0, 1)}))):
    with jax.enable_x64(True):
      params = {"w": jnp.asarray(w0)}
      state = tx.init(params)
      for _ in range(50):
        g = {"w": jnp.asarray(grad_channel_invariant(np.asarray(params["w"]).T, target.T).T)}
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        if name == "adamp":
          squares += np.sum(np.asarray(updates["w"]) ** 2, axis=0)
      growth[name] = np.sum(np.asarray(params["w"]) ** 2, axis=0) - np.sum(w0 ** 2, axis=0)
  np.testing.assert_allclose(growth["adamp"], squares, rtol=1e-6)
  assert np.all(growth["adamw"] > 3 * growth["adamp"]), growth


def test_views_follow_the_parameter_types():
  cfg = models.ModelConfig(name="llama", num_layers=2, d_model=32, num_heads=2, vocab_size=64)
  views = adamp.views(nnx.state(models.build(cfg, seed=0), nnx.Param))
  assert views["stack"]["blocks"]["attn"]["q"]["kernel"] == adamp.View(1, 2)  # [L, in, out]
  assert views["embed"] == adamp.View(0, 0)  # [vocab, d]: a row per token, as the paper's code
  assert views["final_norm"]["scale"] == adamp.View(0, None)
  assert views["stack"]["blocks"]["attn_norm_in"]["scale"] == adamp.View(1, None)  # [L, d]


def test_adamp_trains_a_small_llama(tmp_path, data_dir):
  config = load_config("configs/llama.py:tiny", {**SMALL_LLAMA, "train.steps": 30, "optim.lr": 1e-2,
                                                  "optim.name": "adamp", "stats.every": 0}, data_dir)
  result = train(config, str(tmp_path))
  losses = train_losses(tmp_path)
  assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 0.5, losses
  assert result["eval_loss"] < losses[1]


def name(path) -> str:
  return "/".join(str(getattr(key, "key", key)) for key in path)


def count(state: nnx.State, kind: type) -> int:
  return sum(int(np.prod(var[...].shape)) for _, var in variables(state) if isinstance(var, kind))


@pytest.mark.parametrize("trainable", ["norms", "head"])
def test_only_the_trainable_parameters_move(tmp_path, data_dir, trainable):
  """BatchNorm-only / LayerNorm-tuning training: the rest keeps its init, the count is logged, and
  the loss still falls. (The loop draws the init inside jit, this test eagerly: they agree to ~1e-8,
  while a trained parameter moves by ~lr per step.)"""
  config = load_config("configs/llama.py:tiny", {**SMALL_LLAMA, "train.steps": 30, "optim.lr": 0.1,
                                                  "train.trainable": trainable, "stats.every": 0,
                                                  "train.eval_every": 0}, data_dir)
  train(config, str(tmp_path))
  cfg = model_config(config, validate_data(config.data))
  init = nnx.state(models.build(cfg, seed=config.seed), nnx.Param)
  _, _, state = depth_analysis.restore(tmp_path)
  after = {name(path): value for path, value in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  moved = {name(path): np.abs(np.asarray(var[...]) - np.asarray(after[name(path)])).max() > 1e-6
           for path, var in variables(init)}
  selected = {name(path): isinstance(var, NormParam) if trainable == "norms" else "head" in name(path)
              for path, var in variables(init)}
  assert moved == selected
  logged = json.loads((tmp_path / "trainable.json").read_text())
  expected = count(init, NormParam) if trainable == "norms" else sum(
      int(np.prod(var[...].shape)) for path, var in variables(init) if "head" in name(path))
  assert (logged["trainable"], logged["parameters"], logged["total"]) == (trainable, expected,
                                                                          count(init, nnx.Param))
  losses = train_losses(tmp_path)
  assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 0.1, losses


@pytest.mark.parametrize("changes, match", [
    ({"optim.name": "sgd"},
     r"optim.name='sgd' is not an optimizer; choose one of \['adamw', 'adamp', 'conda'\]"),
    ({"optim.adamp.wd_ratio": 2.0}, r"optim.adamp.wd_ratio=2.0 must be in \[0, 1\]"),
    ({"train.trainable": "(norm"}, r"train.trainable='\(norm' is not all, norms or a regular expression"),
])
def test_bad_optimizer_and_trainable_values_fail_with_the_field(data_dir, changes, match):
  from normjax.config import validate
  config = load_config("configs/llama.py:tiny", {**SMALL_LLAMA, **changes}, data_dir)
  with pytest.raises(ConfigError, match=match):
    validate(config, available_devices=1)


def test_a_trainable_pattern_that_selects_nothing_names_the_paths():
  cfg = models.ModelConfig(name="llama", num_layers=1, d_model=32, num_heads=2, vocab_size=64)
  params = nnx.state(models.build(cfg, seed=0), nnx.Param)
  optim = OptimConfig.from_section(common.load("configs/llama.py:tiny").optim)
  with pytest.raises(ConfigError, match=r"train.trainable='lora' selects no parameter; .*'embed'"):
    make_optimizer(params, optim, 10, "lora")


def test_a_workdir_saved_before_these_fields_resumes_and_restores(tmp_path, data_dir):
  """A config.json from before optim.name / optim.adamp / optim.conda / train.trainable /
  model.reparam existed means AdamW, all trainable, plain kernels: resuming it with today's
  defaults is no change, and its optimizer section still builds."""
  from normjax.config import resume_changes
  config = load_config("configs/llama.py:tiny", SMALL_LLAMA, data_dir)
  saved = json.loads(config.to_json_best_effort())
  for section, key in (("optim", "name"), ("optim", "adamp"), ("optim", "conda"), ("train", "trainable"),
                       ("model", "reparam")):
    del saved[section][key]
  assert resume_changes(saved, config) == {}
  assert OptimConfig.from_section(saved["optim"]).name == "adamw"
  changed = load_config("configs/llama.py:tiny", {**SMALL_LLAMA, "optim.adamp.delta": 0.2}, data_dir)
  assert resume_changes(json.loads(config.to_json_best_effort()), changed) == {}  # adamp unused
  changed = load_config("configs/llama.py:tiny", {**SMALL_LLAMA, "train.trainable": "norms"}, data_dir)
  assert resume_changes(saved, changed) == {"train.trainable": ("<absent>", "norms")}
