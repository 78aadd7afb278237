"""LayerNorm removal (Heimersheim 2024, arXiv:2409.13710): the fixed-scale norm, the model switch
``ModelConfig.fixed_norm`` (per-layer stds as ``NormState``, q/k and v reading ln_1 apart) and
``python -m experiments.ln_removal`` end to end, resumed, on a normjax GPT-2 and on an HF one."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from experiments import ln_removal
from normjax import interop, models, norms, placements
from normjax.config import ConfigError
from normjax.data import tokenizers
from normjax.models import InitConfig, ModelConfig, NormConfig, PlacementConfig
from normjax.models.block import Block
from normjax.models.config import FixedNormConfig, FixedStd
from normjax.models.layers import RemovableLayerNorm
from normjax.nn.nnx import Norm
from normjax.params import NormState

GPT2 = ModelConfig(name="gpt2", num_layers=2, d_model=32, num_heads=4, vocab_size=300,
                   max_positions=64, norm=NormConfig("layer_norm", {"eps": 1e-5}),
                   tie_embeddings=True)
ALL_FIXED = FixedNormConfig(mlp_in=FixedStd((0.7, 1.1), (2.0, 3.0)), attn_qk=FixedStd((0.5, 0.9)),
                            attn_v=FixedStd((0.6, 0.8), (1.5, 2.5)), final=FixedStd((1.3,)))
COMMAND = ["--steps-per-stage", "3", "--seq-len", "32", "--batch-size", "4", "--eval-batches", "1",
           "--measure-batches", "1", "--lr", "3e-3"]
# the NormState leaves each stage's model holds, below stack/blocks/ (``final_norm/`` at the top)
STATE = {1: {"mlp_norm_in/fixed_main", "mlp_norm_in/fixed_main_first"},
         2: {"mlp_norm_in/fixed_main", "mlp_norm_in/fixed_main_first", "attn_norm_in/fixed_main",
             "attn_norm_in/fixed_main_first"},
         3: {"mlp_norm_in/fixed_main", "mlp_norm_in/fixed_main_first", "attn_norm_in/fixed_main",
             "attn_norm_in/fixed_main_first", "attn_norm_in/fixed_v", "attn_norm_in/fixed_v_first"},
         4: {"mlp_norm_in/fixed_main", "attn_norm_in/fixed_main", "attn_norm_in/fixed_v",
             "final_norm/fixed_main"}}


def _by_name(tree: Any) -> dict[str, np.ndarray]:
  """The leaves of a nested dict by path, blocks' without their ``stack/blocks/`` prefix."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(k.key) for k in path).removeprefix("stack/blocks/"): np.asarray(v)
          for path, v in leaves}


def _state_leaves(model: nnx.Module) -> dict[str, np.ndarray]:
  return _by_name(nnx.to_pure_dict(nnx.state(model, NormState)))


def _perturbed(cfg: ModelConfig, seed: int = 0, scale: float = 0.05) -> nnx.Module:
  """``cfg``'s model with every parameter moved off its init (unit gains would hide mistakes)."""
  model = models.build(cfg, seed=seed)
  params = models.params_of(model)
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
  params = jax.tree.map(lambda p: p + scale * jax.random.normal(next(keys), p.shape), params)
  return models.with_params(cfg, params)


def test_fixed_norm_matches_a_float64_formula():
  """(x - mean) / std * gain + bias against NumPy in float64, with a per-position std (the first
  position's own) and through ``RemovableLayerNorm``, whose unfixed readers stay LayerNorms."""
  rng = np.random.RandomState(0)
  x = (rng.randn(3, 5, 16) * 3 + 1).astype(np.float32)
  gain, bias = rng.randn(16).astype(np.float32), rng.randn(16).astype(np.float32)
  first = np.arange(5)[None] == 0
  std = np.where(first, 7.0, 2.0)[..., None]
  x64 = x.astype(np.float64)
  want = (x64 - x64.mean(-1, keepdims=True)) / std * gain + bias
  np.testing.assert_allclose(norms.fixed_norm(x, jnp.asarray(std, jnp.float32), gain, bias), want,
                             rtol=1e-5, atol=1e-5)
  norm = RemovableLayerNorm(16, {"main": (2.0, 7.0)}, eps=1e-5)
  norm.scale[...], norm.bias[...] = gain, bias
  np.testing.assert_allclose(norm(x, first=first), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(norm(x, reader="v"), norms.layer_norm(x, gain, bias, eps=1e-5))
  with pytest.raises(ValueError, match="pass first="):
    norm(x)
  with pytest.raises(ValueError, match="std must be a scalar or have rank 3"):
    norms.fixed_norm(x, jnp.ones(5))


@pytest.mark.parametrize("slot", ["attn_qk", "attn_v"])
def test_queries_keys_and_values_read_ln1_apart(slot):
  """A block with ln_1 fixed for one attention reader: q, k (or v) read the fixed-scale norm, the
  other reads the LayerNorm; the block equals that composition done by hand."""
  cfg = GPT2.replace(num_layers=1, fixed_norm=FixedNormConfig(**{slot: FixedStd((2.5,))}))
  block = Block(cfg, 1, nnx.Rngs(0))
  rng = np.random.RandomState(1)
  for norm in (block.attn_norm_in, block.mlp_norm_in):
    norm.scale[...], norm.bias[...] = 1 + 0.3 * rng.randn(32), 0.3 * rng.randn(32)
  x = jnp.asarray(rng.randn(2, 6, 32), jnp.float32)
  ln = lambda n, h: norms.layer_norm(h, n.scale[...], n.bias[...], eps=1e-5)
  fixed = norms.fixed_norm(x, 2.5, block.attn_norm_in.scale[...], block.attn_norm_in.bias[...])
  layer_norm = ln(block.attn_norm_in, x)
  qk, v = (fixed, layer_norm) if slot == "attn_qk" else (layer_norm, fixed)
  h = x + block.attn(qk, v_input=v)[0]
  want = h + block.mlp(ln(block.mlp_norm_in, h))[0]
  got, _ = block(x, placements.Context(layer=1, num_layers=1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_switch_changes_only_what_it_fixes(tmp_path):
  """Same parameters as the LayerNorm model (so weights carry over), NormState only for the fixed
  readers, scan == unrolled, statistics still collected, and model.json round-trips the stds."""
  plain = _perturbed(GPT2)
  assert not jax.tree.leaves(nnx.state(plain, nnx.Not(nnx.Param)))
  assert not any(isinstance(m, RemovableLayerNorm) for _, m in nnx.iter_modules(plain))
  cfg = GPT2.replace(fixed_norm=ALL_FIXED)
  fixed = models.with_params(cfg, models.params_of(plain))
  shapes = lambda model: jax.tree.map(jnp.shape, models.params_of(model))
  assert shapes(fixed) == shapes(plain)
  leaves = _state_leaves(fixed)
  assert set(leaves) == (STATE[3] | {"final_norm/fixed_main"}) - {"attn_norm_in/fixed_main_first"}
  np.testing.assert_array_equal(leaves["attn_norm_in/fixed_v_first"], np.float32([1.5, 2.5]))
  tokens = np.random.RandomState(0).randint(0, 300, (2, 12))
  logits, stats = fixed(tokens, collect_stats=True)
  unrolled = models.with_params(cfg.replace(scan_layers=False), models.params_of(plain))
  np.testing.assert_allclose(unrolled(tokens)[0], logits, rtol=1e-6, atol=1e-6)
  assert np.isfinite(stats["mlp/norm_in_rms"]).all() and stats["mlp/norm_out_rms"].shape == (2,)
  assert not np.allclose(logits, plain(tokens)[0], atol=1e-3)
  interop.save(fixed, tmp_path / "fixed")
  cfg2, again = interop.load(tmp_path / "fixed")
  assert cfg2 == cfg
  np.testing.assert_array_equal(again(tokens)[0], logits)


def test_kernel_norms_measure_alike_and_mix_with_fixed_ones():
  """With fused-kernel norms (``impl="pallas"``, interpreted on CPU) the blocks defer the residual
  add, and the measured stds are those of the XLA model; a partly fixed model keeps kernels for
  its LayerNorms, stops deferring, and computes what the XLA model does."""
  plain = _perturbed(GPT2)
  kernel_cfg = GPT2.replace(norm=dataclasses.replace(GPT2.norm, impl="pallas"))
  kernels = models.with_params(kernel_cfg, models.params_of(plain))
  assert kernels.stack.blocks.deferred_add
  batch = {"inputs": np.random.RandomState(0).randint(0, 300, (2, 9))}
  xla, fused = ln_removal.measure(plain, [batch]), ln_removal.measure(kernels, [batch])
  for name in ("attn", "mlp", "final"):
    np.testing.assert_allclose(fused[name], xla[name], rtol=1e-5)
  fixed = FixedNormConfig(mlp_in=FixedStd((0.7, 1.1)))
  mixed = models.with_params(kernel_cfg.replace(fixed_norm=fixed), models.params_of(plain))
  assert not mixed.stack.blocks.deferred_add
  assert type(mixed.stack.blocks.attn_norm_in).__name__ == "KernelNorm"
  reference = models.with_params(GPT2.replace(fixed_norm=fixed), models.params_of(plain))
  np.testing.assert_allclose(mixed(batch["inputs"])[0], reference(batch["inputs"])[0], rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("changes,match", [
    (dict(norm=NormConfig("rms_norm")), (r"model.norm.kind='rms_norm' is not valid when "
                                         r"model.fixed_norm sets \['final'\]; choose one of "
                                         r"\['layer_norm'\]")),
    (dict(placement=PlacementConfig("post")), r"model.placement.kind='post'.*\['pre'\]"),
    (dict(placement=PlacementConfig(embed_norm=True)),
     r"model.placement.embed_norm=True.*\[False\]"),
    (dict(fixed_norm=FixedNormConfig(mlp_in=FixedStd((1.0,)))),
     r"model.fixed_norm.mlp_in.std=\(1.0,\) must hold 2 positive finite std\(s\)"),
    (dict(fixed_norm=FixedNormConfig(final=FixedStd((1.0,), (2.0,)))),
     r"model.fixed_norm.final.first"),
    (dict(fixed_norm=FixedNormConfig(attn_v={"std": [1.0, float("nan")]})),
     r"attn_v.std=.*positive"),
])
def test_bad_fixed_norm_configs_are_refused(changes, match):
  with pytest.raises(ConfigError, match=match):
    GPT2.replace(**{"fixed_norm": FixedNormConfig(final=FixedStd((1.0,))), **changes})


def test_refusals_name_the_field():
  with pytest.raises(ConfigError, match=r"fixed_norm.final=\{'sd': \[1.0\]\}.*\['std', 'first'\]"):
    FixedNormConfig(final={"sd": [1.0]})
  with pytest.raises(ConfigError, match=r"FixedStd.std=1.0 must be a list of floats"):
    FixedStd(1.0)
  with pytest.raises(ConfigError, match=r"model.fixed_norm.ln_2 is not a field"):
    ModelConfig.from_dict({"fixed_norm": {"ln_2": None}})


def test_the_measured_std_moves_the_loss_within_the_derived_bound():
  """The paper's premise, for ln_f on the batch it was measured on. With u = LN(h), rho = the
  token's std over the fixed one and b the bias, fixed(h) = b + rho (u - b): the logits move along
  z(s) = z_b + s d, d = z - z_b, s from 1 to rho. Along that segment the token's cross-entropy has
  slope E_p[d] - d_target and curvature Var_p(d) <= range(d)^2 / 4, so (Taylor with remainder)
  |delta loss - mean((rho - 1) slope(1))| <= mean((rho - 1)^2 range(d)^2) / 8, and |delta loss| <=
  mean(|rho - 1| range(d)). The measured std keeps rho near 1, so both bounds are small; twice
  that std moves the loss several times more."""
  cfg = GPT2.replace(init=InitConfig(std=0.1))
  model = _perturbed(cfg, seed=2, scale=0.1)
  tokens = np.random.RandomState(3).randint(0, 300, (4, 33))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  loss = ln_removal.evaluate(model, [batch])
  h, _ = model.stack(jnp.take(model.embed[...], batch["inputs"], 0) + model.position[...][:32])
  gain, bias = model.final_norm.scale[...], model.final_norm.bias[...]
  u = norms.layer_norm(h, gain, bias, eps=1e-5)
  z, d = u @ model.embed[...].T, (u - bias) @ model.embed[...].T  # the tied head
  target = jnp.take_along_axis(d, batch["targets"][..., None], -1)[..., 0]
  slope = jnp.sum(jax.nn.softmax(z) * d, -1) - target
  spread = d.max(-1) - d.min(-1)
  sigma = norms.token_std(h, eps=1e-5)

  def check(std: np.ndarray) -> float:
    new_cfg = ln_removal.removal_config(cfg, ("final",), {"final": std}, "own")
    fixed = models.with_params(new_cfg, models.params_of(model))
    change = ln_removal.evaluate(fixed, [batch]) - loss
    rho = sigma / new_cfg.fixed_norm.final.std[0] - 1
    first_order = float(jnp.mean(rho * slope))
    remainder = float(jnp.mean(rho ** 2 * spread ** 2) / 8)
    assert abs(change - first_order) <= remainder + 1e-5, (change, first_order, remainder)
    assert abs(change) <= float(jnp.mean(jnp.abs(rho) * spread)) + 1e-5
    return abs(first_order) + remainder, abs(change)

  measured = ln_removal.measure(model, [batch])["final"]
  allowed, change = check(measured)
  assert allowed < 0.02 * loss, (allowed, loss)  # the switch moves the loss by under 2 %
  assert check(2 * measured)[1] > 5 * change


def test_the_command_refuses_a_source_it_cannot_apply_to(tmp_path, capsys):
  """An RMSNorm LLaMA fails before any training, naming the field, the value and the choices."""
  interop.save(models.build(ModelConfig(num_layers=1, d_model=16, num_heads=2)), tmp_path / "llama")
  argv = ["--source", str(tmp_path / "llama"), "--text", str(tmp_path),
          "--workdir", str(tmp_path / "out")]
  assert ln_removal.main(argv) == 2
  assert "model.norm.kind='rms_norm' is not valid when model.fixed_norm" in capsys.readouterr().out
  assert not (tmp_path / "out").exists()


def _torch_free_source(root: pathlib.Path) -> None:
  """A random GPT-2 as a normjax model directory with a byte-level BPE ``tokenizer.json`` trained
  on a text directory (this repository's Python sources)."""
  text = root / "text"
  text.mkdir(parents=True, exist_ok=True)
  sources = sorted((pathlib.Path(__file__).resolve().parents[1] / "normjax").rglob("*.py"))[:12]
  (text / "corpus.txt").write_text("\n".join(p.read_text() for p in sources))
  source = root / "source"
  source.mkdir(exist_ok=True)
  tokenizers.train("hf", (text / "corpus.txt").read_text().splitlines(), 300,
                   str(source / "tokenizer.json"))
  vocab = tokenizers.HuggingFace(str(source / "tokenizer.json")).vocab_size
  interop.save(models.build(GPT2.replace(vocab_size=vocab)), source)


@pytest.fixture(scope="session")
def removal_run(tmp_path_factory) -> pathlib.Path:
  """The command on the torch-free source, once per test session (xdist workers share it: the
  first builds it under a lock, the others find the stages finished)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  with open(root / "ln_removal.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    source, text = root / "ln_removal" / "source", root / "ln_removal" / "text"
    if not (source / "model.json").is_file():
      _torch_free_source(root / "ln_removal")
    out = root / "ln_removal" / "out"
    argv = ["--source", str(source), "--text", str(text), "--workdir", str(out),
            "--data-dir", str(root / "ln_removal" / "tfds"), *COMMAND]
    assert ln_removal.main(argv) == 0
  return out


def test_the_command_runs_every_stage(removal_run):
  summary = json.loads((removal_run / ln_removal.SUMMARY).read_text())
  assert [s["name"] for s in summary["stages"]] == ["vanilla", "ln2", "ln1_qk", "ln1_v", "lnf"]
  assert summary["paper_gpt2_small_owt"] == {"original": 3.1006, "vanilla_ft": 3.0126,
                                             "ln_free": 3.0797}
  losses = [s[key] for s in summary["stages"] for key in ("loss_before", "loss_after")]
  assert np.isfinite(losses).all() and summary["ln_free"] == summary["stages"][-1]["loss_after"]
  assert summary["stages"][0]["loss_after"] < summary["stages"][0]["loss_before"]
  assert (summary["vanilla_ft_steps"], summary["ln_free_steps"]) == (3, 15)
  for k in range(5):  # the ordinary training workdir layout
    names = {p.name for p in (removal_run / f"stage_{k}").iterdir()}
    assert {"metrics.jsonl", "model.json", "checkpoints"} <= names


def test_each_stage_fixes_exactly_its_norms_and_training_leaves_the_stds(removal_run):
  """Stage k's start model holds the stds of the stages so far and the previous result's weights;
  the stds in its final checkpoint (the optimizer's output) are still the config's."""
  for k in range(1, 5):
    record = json.loads((removal_run / f"stage_{k}" / ln_removal.STAGE_JSON).read_text())
    cfg, start = interop.load(removal_run / f"stage_{k}" / "start")
    leaves = _state_leaves(start)
    assert set(leaves) == STATE[k], k
    assert record["fixed_slots"] == list(cfg.fixed_norm.slots)
    np.testing.assert_array_equal(leaves["mlp_norm_in/fixed_main"],
                                  np.float32(record["std"]["mlp_in"]["std"]))
    previous = interop.load(removal_run / f"stage_{k - 1}")[1]
    for a, b in zip(jax.tree.leaves(models.params_of(previous)),
                    jax.tree.leaves(models.params_of(start))):
      np.testing.assert_array_equal(a, b)
    checkpoints = removal_run / f"stage_{k}" / "checkpoints"
    step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    with ocp.StandardCheckpointer() as checkpointer:
      saved = _by_name(checkpointer.restore(checkpoints / str(step) / "state")["norm_state"])
    assert saved.keys() == leaves.keys()
    for key, value in saved.items():
      np.testing.assert_array_equal(value, leaves[key])


def _readers(model: nnx.Module) -> list[tuple[str, Norm, str]]:
  """(name, norm of one layer, reader) for every reader of every norm of a decoder."""
  graphdef, state = nnx.split(model.stack.blocks)
  out = [("final", model.final_norm, "main")]
  for layer in range(model.cfg.num_layers):
    block = nnx.merge(graphdef, jax.tree.map(lambda a, layer=layer: a[layer], state))
    out += [(f"{layer}/attn", block.attn_norm_in, "main"),
            (f"{layer}/attn", block.attn_norm_in, "v"), (f"{layer}/mlp", block.mlp_norm_in, "main")]
  return out


def _is_affine(norm: Norm, reader: str) -> bool:
  """Whether ``norm`` as ``reader`` sees it is affine: f(a x + (1-a) y) = a f(x) + (1-a) f(y)."""
  rng = np.random.RandomState(0)
  x, y = (jnp.asarray(rng.randn(2, 5, norm.scale[...].shape[-1]) * s, jnp.float32)
          for s in (1.0, 4.0))
  first = jnp.zeros((2, 5), bool)
  removable = isinstance(norm, RemovableLayerNorm)
  f = (lambda h: norm(h, reader=reader, first=first)) if removable else norm
  return bool(np.allclose(f(0.3 * x + 0.7 * y), 0.3 * f(x) + 0.7 * f(y), rtol=1e-4, atol=1e-4))


def test_the_last_stage_has_no_per_token_std_left(removal_run):
  """Every reader of every norm of the final model is affine in its input (a LayerNorm reader is
  not: the previous stage's ln_f fails the same check), and no first-position std is left."""
  _, final = interop.load(removal_run / "stage_4")
  assert all(_is_affine(norm, reader) for _, norm, reader in _readers(final))
  assert not any(key.endswith("_first") for key in _state_leaves(final))
  _, before = interop.load(removal_run / "stage_3")
  not_affine = [name for name, norm, reader in _readers(before) if not _is_affine(norm, reader)]
  assert not_affine == ["final"]


def test_a_rerun_skips_finished_stages(removal_run, tmp_path, capsys):
  """A finished run is skipped whole; with the last stage gone, only it runs again, and its
  measured stds and losses come out the same."""
  copy = tmp_path / "out"
  shutil.copytree(removal_run, copy, symlinks=True)
  root = removal_run.parent
  argv = ["--source", str(root / "source"), "--text", str(root / "text"), "--workdir", str(copy),
          "--data-dir", str(root / "tfds"), *COMMAND]
  stamps = lambda: [(copy / f"stage_{k}" / ln_removal.STAGE_JSON).stat().st_mtime_ns
                    for k in range(4)]
  before = stamps()
  assert ln_removal.main(argv) == 0
  assert capsys.readouterr().out.count("finished, skipped") == 5
  old = json.loads((copy / "stage_4" / ln_removal.STAGE_JSON).read_text())
  shutil.rmtree(copy / "stage_4")
  assert ln_removal.main(argv) == 0
  assert capsys.readouterr().out.count("finished, skipped") == 4
  assert stamps() == before
  new = json.loads((copy / "stage_4" / ln_removal.STAGE_JSON).read_text())
  assert new["std"] == old["std"]
  np.testing.assert_allclose([new["loss_before"], new["loss_after"]],
                             [old["loss_before"], old["loss_after"]], rtol=1e-5)


def test_the_command_on_a_hugging_face_gpt2(tmp_path, data_dir):
  from tests import hf_models  # skips without torch (the Python 3.12 leg)
  text = hf_models.text_file(tmp_path / "corpus.txt")
  hf_models.save_with_tokenizer("gpt2", tmp_path / "hf", text)
  argv = ["--source", str(tmp_path / "hf"), "--text", str(text), "--workdir", str(tmp_path / "out"),
          "--data-dir", str(data_dir), *COMMAND]
  assert ln_removal.main(argv) == 0
  summary = json.loads((tmp_path / "out" / ln_removal.SUMMARY).read_text())
  assert summary["stages"][-1]["fixed_slots"] == ["mlp_in", "attn_qk", "attn_v", "final"]
  assert np.isfinite([summary["original"], summary["vanilla_ft"], summary["ln_free"]]).all()
  cfg, model = interop.load(tmp_path / "out" / "stage_4")
  assert cfg.norm.options["eps"] == 1e-5  # the imported LayerNorm's options carry over
  assert all(_is_affine(norm, reader) for _, norm, reader in _readers(model))
