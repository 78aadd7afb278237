"""Unified Normalization (arXiv:2208.01313) against a float64 transcription of the authors'
``UN2dFunction`` (forward, backward and every buffer, over steps that cross the warmup, the window
fill, the ratio hold and an outlier), the exact gradient where UN reduces to a batch RMS norm, the
training loop's state update, a ViT that trains with it, and its refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from training import load_config

from normjax import norms
from normjax.models import ModelConfig, NormConfig
from normjax.train import train
from normjax.validation import ConfigError

C, EPS, MOM = 6, 1e-5, 0.9


class TorchUN:
  """The authors' UN1d/UN2dFunction step by step in numpy float64 (mask: True keeps a token)."""

  def __init__(self, window, grad_window, warmup, hold, clip, outliers):
    self.w, self.gw, self.warmup, self.hold, self.clip, self.outliers = (
        window, grad_window, warmup, hold, clip, outliers)
    self.running_var, self.ema_gz = np.ones(C), np.zeros(C)
    self.buffer_x2, self.buffer_gz = np.zeros((window, C)), np.zeros((grad_window, C))
    self.iters, self.skips = 0, 0

  def step(self, x, weight, bias, dy, mask):
    self.iters += 1
    it = self.iters
    kept = x[mask]
    x2 = (kept * kept).mean(0)
    skip = self.w <= 1
    recorded = np.var(np.sqrt(self.buffer_x2), ddof=1)
    self.buffer_x2[it % self.w] = x2
    if it >= self.warmup and self.outliers:
      am = self.buffer_x2.mean(0)
      gm = np.exp(np.log(self.buffer_x2).mean(0))
      if ((am - gm) > recorded * self.w).sum() > 0:
        self.buffer_x2[it % self.w] = self.running_var
        skip = True
        self.skips += 1
    if it <= self.w or it < self.warmup or skip:
      var = x2
    else:
      var = np.exp(np.log(self.buffer_x2).mean(0))
    r = np.sqrt(var + EPS) / np.sqrt(self.running_var + EPS)
    r = np.ones(C) if it <= max(self.hold, self.warmup) or skip else np.clip(r, 1 / self.clip, self.clip)
    z = x / np.sqrt(var + EPS)
    self.running_var = MOM * self.running_var + (1 - MOM) * var
    y = weight * z + bias
    # backward
    g = dy * weight * r
    gz = (g * z)[mask].mean(0)
    self.buffer_gz[it % self.gw] = self.ema_gz if skip else gz
    mean_gz = gz if (it <= self.gw or it < self.warmup or skip) else self.buffer_gz.mean(0)
    self.ema_gz = self.ema_gz * MOM + (1 - MOM) * mean_gz
    dx = (g - (mean_gz if skip else self.ema_gz) * z) / np.sqrt(var + EPS)
    axes = (0, 1)
    return y, dx, (dy * r * z).sum(axes), dy.sum(axes)


@pytest.mark.parametrize("outliers", [False, True])
def test_unified_norm_matches_the_authors_algorithm_in_float64(outliers):
  """14 steps: window 3, gradient window 2, warmup 4, r held for 6 steps and clipped to [1/2, 2];
  step 9's batch is 30x larger, which the outlier filter must skip; padded tokens in every batch."""
  rng = np.random.default_rng(0)
  options = dict(window=3, grad_window=2, warmup_steps=4, hold_steps=6, ratio_clip=2.0,
                 outlier_filtration=outliers)
  ref = TorchUN(3, 2, 4, 6, 2.0, outliers)
  spec = norms.get("unified_norm")
  weight, bias, channel_scale = rng.uniform(0.5, 1.5, C), rng.normal(size=C), rng.uniform(0.5, 2.0, C)
  with jax.enable_x64(True):
    state = jax.tree.map(lambda v: v.astype(jnp.float64),
                         spec.init_state(jnp.zeros((1, C)), window=3, grad_window=2))

    @jax.jit
    def step(x, dy, mask, state):
      def f(x, p, s):
        return spec.apply(x, p, s, train=True, mask=mask, **options)
      (y, new_state), vjp = jax.vjp(f, x, {"scale": jnp.asarray(weight), "bias": jnp.asarray(bias)},
                                    state)
      dx, dp, ds = vjp((dy, jax.tree.map(jnp.zeros_like, new_state)))
      return y, dx, dp, norms.update_backward_state(new_state, ds)

    for t in range(1, 15):
      x = rng.normal(size=(3, 5, C)) * channel_scale * (30.0 if t == 9 else 1.0)
      dy = rng.normal(size=x.shape)
      mask = np.ones((3, 5), bool)
      mask[:, 3 + t % 2:] = False
      y, dx, dp, state = step(jnp.asarray(x), jnp.asarray(dy), jnp.asarray(mask), state)
      ry, rdx, rdw, rdb = ref.step(x, weight, bias, dy, mask)
      for ours, theirs in ((y, ry), (dx, rdx), (dp["scale"], rdw), (dp["bias"], rdb),
                           (state["running_var"], ref.running_var), (state["ema_gz"], ref.ema_gz),
                           (state["buffer_x2"], ref.buffer_x2), (state["buffer_gz"], ref.buffer_gz)):
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-10, atol=1e-12, err_msg=f"step {t}")
    assert float(state["skipped"]) == ref.skips == (1 if outliers else 0)


def test_with_one_step_windows_the_backward_is_the_exact_gradient_of_a_batch_rms_norm():
  """window = 1 means every step is 'skipped': plain batch statistics, r = 1, and the backward
  subtracts this batch's own mean(g z) z, which is exactly the gradient through mean(x^2)."""
  rng = np.random.default_rng(1)
  spec = norms.get("unified_norm")
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(4, 3, C)))
    p = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, C)), "bias": jnp.asarray(rng.normal(size=C))}
    state = jax.tree.map(lambda v: v.astype(jnp.float64),
                         spec.init_state(x, window=1, grad_window=1))

    def un(x, p):
      return spec.apply(x, p, state, train=True, window=1, grad_window=1, momentum=0.0)[0]

    def batch_rms(x, p):
      return x / jnp.sqrt(jnp.mean(x * x, (0, 1)) + EPS) * p["scale"] + p["bias"]

    dy = jnp.asarray(rng.normal(size=x.shape))
    ours = jax.vjp(un, x, p)[1](dy)
    exact = jax.vjp(batch_rms, x, p)[1](dy)
    np.testing.assert_allclose(np.asarray(un(x, p)), np.asarray(batch_rms(x, p)), rtol=1e-12, atol=1e-15)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(exact)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
    # eval is a fixed affine map of x with ordinary autodiff
    check_grads(lambda x, s, b: spec.apply(x, {"scale": s, "bias": b}, state, train=False)[0],
                (x, p["scale"], p["bias"]), order=2, modes=("rev",))


def test_a_vit_trains_with_unified_norm_and_the_loop_advances_its_backward_state(tmp_path, data_dir):
  """The paper's vision setting (outlier filter on) with a short warmup and hold, so that 120
  steps cover the smoothed statistics and the gradient compensation."""
  config = load_config("configs/vit.py:tiny", {
      "train.steps": 120, "train.batch_size": 32, "train.eval_every": 0, "stats.every": 0,
      "mesh.num_devices": 1, "optim.warmup_steps": 10, "model.norm.kind": "unified_norm",
      "model.norm.options.warmup_steps": 20, "model.norm.options.hold_steps": 40,
      "model.norm.options.outlier_filtration": True}, data_dir)
  result = train(config, str(tmp_path))
  assert result["eval_accuracy"] > 0.7, result


def test_unified_norm_is_refused_in_a_causal_decoder_and_checks_its_options():
  with pytest.raises(ConfigError, match="leaks future tokens"):
    ModelConfig(norm=NormConfig("un"))
  with pytest.raises(ConfigError, match=r"window=0 must be an integer >= 1"):
    norms.get("unified_norm").options(window=0)
  with pytest.raises(ConfigError, match=r"ratio_clip=0.5 must be >= 1"):
    norms.get("unified_norm").options(ratio_clip=0.5)
