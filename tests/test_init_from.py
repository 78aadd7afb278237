"""``train.init_from``: a run starts from a training workdir, or from a model directory written by
``python -m normjax.convert``, and the model directories read back exactly."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from normjax import convert, interop, models
from normjax.config import ConfigError
from normjax.train import train
from training import CLI_ENV, SMALL_LLAMA, load_config, train_losses

LN_LLAMA = {**SMALL_LLAMA, "model.norm.kind": "layer_norm", "train.steps": 4, "train.eval_every": 0,
            "ckpt.every": 4, "stats.every": 0}


def _run(workdir, data_dir, **overrides):
  train(load_config("configs/llama.py:tiny", {**LN_LLAMA, **overrides}, data_dir), str(workdir))
  return train_losses(workdir)


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_dir):
  """A finished 4-step LayerNorm LLaMA run (its workdir is a source) and its RMSNorm conversion
  written by the command line."""
  root = tmp_path_factory.mktemp("init_from")
  _run(root / "run", data_dir)
  out = subprocess.run([sys.executable, "-m", "normjax.convert", str(root / "run"), "--to", "rms",
                        "--out", str(root / "rms")], env=CLI_ENV, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  rel = float(out.stdout.split("logits differ by ")[1].split()[0])
  assert rel < 1e-5
  return root


def test_a_run_starts_from_a_workdir_and_from_its_exact_conversion(source, tmp_path, data_dir):
  """The first loss (computed before any update) of a run started from the trained workdir equals
  the one started from its RMSNorm conversion (an exact rewrite of the same function), and both
  are far from a fresh init's: the weights, not a seed, decide the first step."""
  fresh = _run(tmp_path / "fresh", data_dir)
  from_run = _run(tmp_path / "a", data_dir, **{"train.init_from": str(source / "run")})
  from_rms = _run(tmp_path / "b", data_dir, **{"train.init_from": str(source / "rms")})
  np.testing.assert_allclose(from_rms[1], from_run[1], rtol=1e-5)
  assert abs(from_run[1] - fresh[1]) > 0.05
  assert from_run[4] < from_run[1]  # and it trains on
  model = json.loads((tmp_path / "b" / "model.json").read_text())
  assert (model["norm"]["kind"], model["compressed"]) == ("rms_norm", False)  # the source's


def test_model_directory_round_trip_is_exact(source, tmp_path):
  cfg, model = interop.load(source / "run")
  interop.save(model, tmp_path / "copy")
  cfg2, again = interop.load(tmp_path / "copy")
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(models.params_of(model)),
                  jax.tree.leaves(models.params_of(again))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  crms = convert.to_crms(convert.to_rms(model))
  interop.save(crms, tmp_path / "crms")
  assert interop.load(tmp_path / "crms")[0].compressed


def test_init_from_refusals(source, tmp_path, data_dir):
  with pytest.raises(ConfigError, match="holds no weights normjax reads"):
    _run(tmp_path / "x", data_dir, **{"train.init_from": str(tmp_path)})
  with pytest.raises(ConfigError, match="needs image data"):  # a ViT source for a text run
    vit = models.build(models.ModelConfig(name="vit", image_size=8, patch_size=4, d_model=16))
    interop.save(vit, tmp_path / "vit")
    _run(tmp_path / "y", data_dir, **{"train.init_from": str(tmp_path / "vit")})
  small_vocab = models.build(models.ModelConfig(vocab_size=32, d_model=16, num_heads=2))
  interop.save(small_vocab, tmp_path / "small_vocab")
  with pytest.raises(ConfigError, match="has a vocabulary of 32, smaller than the tokenizer's 256"):
    _run(tmp_path / "z", data_dir, **{"train.init_from": str(tmp_path / "small_vocab")})
  assert not any((tmp_path / name).exists() for name in ("x", "y", "z"))
