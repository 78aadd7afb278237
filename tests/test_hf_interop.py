"""Hugging Face import/export against transformers itself: tiny random models saved with
``save_pretrained``, imported with ``normjax.interop.from_hf``, compared logit for logit, exported
with ``to_hf`` and loaded back with ``from_pretrained``."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import hf_models  # skips this module where torch is absent (the 3.12 leg)

from normjax import convert  # noqa: E402
from normjax.config import ConfigError  # noqa: E402
from normjax.interop import checkpoint_files, from_hf, to_hf  # noqa: E402

torch, transformers = hf_models.torch, hf_models.transformers


def rel(ours, ref) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """``{name: (directory, transformers model)}`` for every case of ``hf_models.CONFIGS``."""
  root = tmp_path_factory.mktemp("hf")
  return {name: (root / name, hf_models.save(name, root / name)) for name in hf_models.CONFIGS}


@pytest.mark.parametrize("name", list(hf_models.CONFIGS))
def test_import_matches_transformers_logits(saved, name):
  path, reference = saved[name]
  cfg, model = from_hf(path)
  x = hf_models.inputs(name)
  ours, _ = model(jnp.asarray(x))
  assert rel(ours, hf_models.logits(reference, x)) < 1e-5
  hf = json.loads((path / "config.json").read_text())
  if name == "llama":  # the GQA and untied-head case really is one
    assert (cfg.kv_heads, cfg.tie_embeddings, cfg.head_dim) == (2, False, 8)
  if name == "llama_tied":
    assert (cfg.tie_embeddings, cfg.head_dim, cfg.d_model // cfg.num_heads) == (True, 16, 8)
  if name == "gpt2":
    assert (cfg.position_kind, cfg.mlp_kind, cfg.max_positions) == ("learned", "gelu_tanh", hf["n_positions"])


@pytest.mark.parametrize("name", list(hf_models.CONFIGS))
def test_export_round_trip_is_bit_exact_and_loads_in_transformers(saved, tmp_path, name):
  path, reference = saved[name]
  _, model = from_hf(path)
  out = to_hf(model, tmp_path / "out", max_shard_bytes=16_000)  # several shards and an index
  assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
  index = json.loads((tmp_path / "out" / checkpoint_files.INDEX).read_text())
  loaded = type(reference).from_pretrained(out).eval()
  original, back = reference.state_dict(), loaded.state_dict()
  assert original.keys() == back.keys()
  for key in original:
    assert torch.equal(original[key], back[key]), key
  x = hf_models.inputs(name)
  np.testing.assert_array_equal(hf_models.logits(loaded, x), hf_models.logits(reference, x))
  _, again = from_hf(out)  # the sharded directory reads back too
  np.testing.assert_array_equal(np.asarray(again(jnp.asarray(x))[0]), np.asarray(model(jnp.asarray(x))[0]))
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in checkpoint_files.read_tensors(out).values())


def test_bfloat16_import_follows_transformers(tmp_path):
  """A bfloat16 checkpoint stays bfloat16 (compute too) with casting='hf': the logits agree with
  transformers' bfloat16 forward to bfloat16 precision, and much better than to a float32 run's
  distance would allow if the roundings were in different places (checked loosely: rel 2e-2)."""
  reference = hf_models.save("llama", tmp_path, dtype=torch.bfloat16)
  cfg, model = from_hf(tmp_path)
  assert (cfg.param_dtype, cfg.dtype, cfg.norm.options["casting"]) == ("bfloat16", "bfloat16", "hf")
  x = hf_models.inputs("llama")
  ours, _ = model(jnp.asarray(x))
  assert rel(ours, hf_models.logits(reference, x)) < 2e-2


@pytest.mark.parametrize("name", ["gpt2", "vit"])
def test_converting_an_imported_pre_ln_model_keeps_its_logits(saved, name):
  path, reference = saved[name]
  _, model = from_hf(path)
  x = jnp.asarray(hf_models.inputs(name))
  original = np.asarray(model(x)[0], np.float64)
  rms = convert.to_rms(model)
  crms = convert.to_crms(rms)
  assert rel(rms(x)[0], original) < 1e-5
  assert rel(crms(x)[0], original) < 1e-5


def _edit_config(path, **changes):
  config = json.loads((path / "config.json").read_text())
  config.update(changes)
  (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("name, changes, field", [
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ("llama", {"attention_bias": True, "mlp_bias": False}, "attention_bias"),  # Qwen-2 style
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"activation_function": "relu"}, "activation_function"),
    ("vit", {"qkv_bias": False}, "qkv_bias"),
    ("llama", {"model_type": "mixtral"}, "model_type"),
])
def test_import_refuses_what_normjax_cannot_express(saved, tmp_path, name, changes, field):
  import shutil
  shutil.copytree(saved[name][0], tmp_path / "m")
  _edit_config(tmp_path / "m", **changes)
  with pytest.raises(ConfigError, match=f"config.json {field}="):
    from_hf(tmp_path / "m")


def test_import_refuses_missing_and_unknown_tensors(saved, tmp_path):
  from safetensors.numpy import save_file
  tensors = checkpoint_files.read_tensors(saved["llama"][0])
  (tmp_path / "config.json").write_text((saved["llama"][0] / "config.json").read_text())
  extra = dict(tensors, **{"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)})
  save_file(extra, tmp_path / "model.safetensors", metadata=checkpoint_files.METADATA)
  with pytest.raises(ConfigError, match="tensors normjax's llama does not: .*q_norm"):
    from_hf(tmp_path)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, tmp_path / "model.safetensors", metadata=checkpoint_files.METADATA)
  with pytest.raises(ConfigError, match="lacks model.layers.1.mlp.up_proj.weight"):
    from_hf(tmp_path)
  with pytest.raises(ConfigError, match="no config.json"):
    from_hf(tmp_path / "nowhere")


def test_export_refuses_models_hf_cannot_hold(saved, tmp_path):
  _, model = from_hf(saved["gpt2"][0])
  with pytest.raises(ConfigError, match="model.norm.kind='rms_norm': GPT2LMHeadModel needs 'layer_norm'"):
    to_hf(convert.to_rms(model), tmp_path / "rms")
  from normjax import models
  mix = models.build(model.cfg.replace(placement=model.cfg.placement.__class__(kind="mix")))
  with pytest.raises(ConfigError, match="model.placement.kind='mix'"):
    to_hf(mix, tmp_path / "mix")
  from normjax.models.config import FixedNormConfig, FixedStd
  ln_free = models.build(model.cfg.replace(fixed_norm=FixedNormConfig(final=FixedStd((1.0,)))))
  with pytest.raises(ConfigError, match=r"model.fixed_norm=\('final',\)"):
    to_hf(ln_free, tmp_path / "ln_free")  # GPT2LMHeadModel would silently get its LayerNorm back
  assert not any((tmp_path / name).exists() for name in ("rms", "mix", "ln_free"))


def test_fine_tune_from_a_hugging_face_directory_and_export_the_result(tmp_path, data_dir):
  """``train.init_from`` on an HF directory: the first loss equals a start from the same weights
  saved as a normjax model directory, and the fine-tuned workdir exports to a directory that
  transformers loads to the same logits."""
  from normjax import interop
  from normjax.train import train
  from training import SMALL_LLAMA, load_config, train_losses

  config = hf_models.CONFIGS["llama"]()
  config.vocab_size = 256  # the byte-level corpus of the tiny config
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
  interop.save(from_hf(tmp_path / "hf")[1], tmp_path / "native")
  overrides = {**SMALL_LLAMA, "train.steps": 3, "train.eval_every": 0, "ckpt.every": 3, "stats.every": 0}
  losses = {}
  for name in ("hf", "native"):
    run = load_config("configs/llama.py:tiny", {**overrides, "train.init_from": str(tmp_path / name)},
                      data_dir)
    train(run, str(tmp_path / f"run_{name}"))
    losses[name] = train_losses(tmp_path / f"run_{name}")
  np.testing.assert_allclose(losses["hf"][1], losses["native"][1], rtol=1e-6)
  cfg, tuned = interop.load(tmp_path / "run_hf")
  to_hf(tuned, tmp_path / "tuned")
  loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "tuned").eval()
  x = np.random.RandomState(1).randint(0, 256, (2, 9))
  assert rel(tuned(jnp.asarray(x))[0], hf_models.logits(loaded, x)) < 1e-5


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_analyze_an_imported_model_on_a_text_file(tmp_path, data_dir, name):
  """``python -m experiments.analyze --hf DIR --text FILE`` writes a workdir the notebooks read;
  each removal loss equals the loss of the model rebuilt without that block (an (L-1)-block model
  holding the other blocks' parameters, not ``skip_layer``), and the full loss is its eval loss."""
  import argparse
  import sys

  import jax

  from experiments import analyze, depth_analysis
  from normjax import models
  from normjax.train.step import task_loss
  sys.path.insert(0, str(hf_models.pathlib.Path(__file__).resolve().parents[1] / "notebooks"))
  import _plots

  text = hf_models.text_file(tmp_path / "corpus.txt")
  hf_models.save_with_tokenizer(name, tmp_path / "hf", text)
  args = ["--hf", str(tmp_path / "hf"), "--text", str(text), "--workdir", str(tmp_path / "runs" / name),
          "--seq-len", "32", "--batch-size", "4", "--num-batches", "2", "--data-dir", str(data_dir)]
  assert analyze.main(args) == 0
  workdir = tmp_path / "runs" / name
  result = json.loads((workdir / depth_analysis.ANALYSIS).read_text())
  (run,) = _plots.load_runs(tmp_path / "runs")
  assert (run["model"], run["depth"], _plots.resid_var(run).shape) == (name, 2, (1, 3))
  eval_row = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][0]
  np.testing.assert_allclose(eval_row["eval/loss"], result["full_loss"], rtol=1e-6)
  cfg, model = from_hf(tmp_path / "hf")
  config = analyze.measurement_config(argparse.Namespace(
      hf=str(tmp_path / "hf"), text=str(text), tokenizer="", batch_size=4, num_batches=2, seq_len=32,
      data_dir=str(data_dir)), workdir)
  batch = depth_analysis.validation_batch(config, 2)
  params = models.params_of(model)
  for removed in range(cfg.num_layers):
    blocks = jax.tree.map(lambda a: np.delete(np.asarray(a), removed, axis=0), params["stack"]["blocks"])
    smaller = models.with_params(cfg.replace(num_layers=cfg.num_layers - 1),
                                 {**params, "stack": {"blocks": blocks}})
    logits, _ = smaller(jnp.asarray(batch["inputs"]), segment_ids=jnp.asarray(batch["segment_ids"]),
                        positions=jnp.asarray(batch["positions"]))
    loss = float(task_loss(logits, batch)[0])
    np.testing.assert_allclose(result["removed_loss"][removed], loss, rtol=1e-5)
