"""The wiring: dependencies point one way, every setting has one home, knowledge lives in types,
configs show what they set, and the documentation is self-contained."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from experiments import sweep
from normjax import config as common
from normjax import norms
from normjax.models import ModelConfig, NormConfig
from normjax.train.loop import build_steps
from normjax.treeutil import path_names
from normjax.validation import ConfigError, parse_value

ROOT = pathlib.Path(__file__).resolve().parents[1]
MASKS = ROOT / "tests" / "golden" / "weight_decay_masks.json"
# The shipped configs (and variants that add norm parameters, biases, tied heads and weight norms)
MASK_CASES = {
    "llama_tiny": ("configs/llama.py:tiny", {}),
    "vit_tiny": ("configs/vit.py:tiny", {}),
    "llama_peri_embed_dyt_tied": ("configs/llama.py:tiny,norm=dyt,placement=peri",
                                  # the golden predates DyT's LLM recipe: its bias back, no embed scale
                                  {"model.placement.embed_norm": True, "model.tie_embeddings": True,
                                   "model.norm.options.use_bias": True, "model.embed_scale": False}),
    "vit_none_sigma": ("configs/vit.py:tiny,norm=sigma_reparam,placement=none", {}),
    "vit_mean_ln_bias": ("configs/vit.py:tiny", {"model.pool": "mean"}),
    "llama_decay_all": ("configs/llama.py:tiny,norm=layer_norm", {"optim.decay_norms_and_biases": True}),
}


def _fresh(code: str) -> str:
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr
  return done.stdout


def test_norms_never_import_the_kernels():
  out = _fresh("import sys, normjax.norms, normjax.nn.nnx, normjax.nn.linen; "
               "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pallas_kernels'))")
  assert out.strip() == "[]"
  assert _fresh("import pallas_kernels, normjax.models; print('ok')").strip() == "ok"


def test_the_signal_handlers_load_without_jax():
  """``python -m normjax.train`` installs them first, so no signal during the import of JAX (seconds)
  goes unanswered; ``normjax.norms`` still loads on first use."""
  out = _fresh("import sys, normjax.train.signals; print('jax' in sys.modules); import normjax; "
               "print(normjax.norms.names()[:1])")
  assert out.split() == ["False", "['batch_channel_norm']"]


@pytest.mark.parametrize("option,home", [("impl", "model.norm.impl"), ("param_dtype", "model.param_dtype")])
def test_a_setting_given_twice_is_an_error_naming_both(option, home):
  with pytest.raises(ConfigError, match=rf"model.norm.options.{option}=.* duplicates {home}"):
    ModelConfig(norm=NormConfig("rms_norm", {option: "xla" if option == "impl" else "bfloat16"}))


def test_mixes_positions_is_declared_by_the_registry():
  mixing = {name for name in norms.names() if norms.get(name).mixes_positions}
  assert mixing == {"batch_norm", "batch_channel_norm", "power_norm", "evonorm_b0", "prepbn", "unified_norm"}
  for name in mixing:  # and that is what keeps them out of the causal decoder
    with pytest.raises(ConfigError, match="leaks future tokens"):
      ModelConfig(norm=NormConfig(name))


def test_option_records_reject_misspellings_and_bad_choices():
  spec = norms.get("power_norm")
  assert spec.options(backward="code").backward == "code"
  with pytest.raises(ConfigError, match=r"no option 'bakward'; valid options: \[.*'backward'.*did you mean 'backward'"):
    spec.options(bakward="code")
  with pytest.raises(ConfigError, match=r"backward='torch' is not valid; choose one of \['paper', 'code'\]"):
    spec.options(backward="torch")


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True), ("false", False),
                                        ("FALSE", False), ("0", False)])
def test_booleans_parse_strictly(text, value):
  assert parse_value("tvr.enabled", text, bool) is value


@pytest.mark.parametrize("text", ["yes", "no", "on", "", "2", "tru"])
def test_anything_else_is_not_a_boolean_in_every_parser(text):
  with pytest.raises(ConfigError, match=rf"tvr.enabled='{text}' is not a boolean"):
    common.load("configs/llama.py:tiny", {"tvr.enabled": text})
  with pytest.raises(ConfigError, match=rf"tvr.enabled='{text}' is not a boolean"):
    common.load("configs/llama.py:tiny", sweep.parse_overrides([f"tvr.enabled={text}"]))


def test_text_values_take_the_fields_type():
  config = common.load("configs/llama.py:tiny,depth=3,steps=7",
                       sweep.parse_overrides(["optim.lr=2e-3", "model.mlp_dim=96", "data.name=text_files"]))
  assert (config.model.num_layers, config.train.steps, config.optim.lr) == (3, 7, 2e-3)
  assert config.model.mlp_dim == 96 and config.data.name == "text_files"
  assert common.load("configs/llama.py:tiny").model.mlp_dim is None  # None = the default, not 0
  with pytest.raises(ConfigError, match=r"config argument depth='three' is not a valid int"):
    common.load("configs/llama.py:tiny,depth=three")
  with pytest.raises(ConfigError, match=r"variant='7b' is not valid; choose one of \['tiny'"):
    common.load("configs/llama.py:7b")


@pytest.mark.parametrize("path", ["configs/llama.py", "configs/vit.py"])
def test_configs_show_every_field_a_researcher_tunes(path):
  """Every field of the sections the loop reads is written in the config file itself (TVR's come
  from its typed record, the one home of its defaults)."""
  source = (ROOT / path).read_text()
  config = common.load(path)
  for section in ("model", "data", "train", "optim", "ckpt", "stats", "mesh"):
    assert f"c.{section} = " in source, section
    for field in config[section]:
      assert re.search(rf"\b{field}=", source), f"{section}.{field} is not visible in {path}"
  assert set(config.tvr) == {"enabled", "every", "target_std", "threshold", "per_layer_target"}
  if "vit" in path:
    assert "seq_len" not in config.data and "text_dir" not in config.data


def test_weight_decay_masks_of_the_shipped_configs_do_not_change():
  """The mask now follows the parameter types; it is the one the path rules produced before."""
  golden = json.loads(MASKS.read_text())
  for name, (spec, overrides) in MASK_CASES.items():
    config = common.load(spec, overrides)
    model_cfg = common.validate(config, jax.device_count()).model.replace(num_layers=2)
    _, _, (decay, _) = build_steps(config, model_cfg)
    flat = {"/".join(path_names(p)): bool(v) for p, v in jax.tree_util.tree_flatten_with_path(decay)[0]}
    assert flat == golden[name], name


def test_documentation_is_self_contained():
  """Docstrings and docs cite papers and docs/, never notes outside the repository."""
  outside = re.compile(r"METHODS\.md|KERNELS\.md|ENVIRONMENT\.md|BASELINES\.md|FRAMEWORKS\.md|"
                       r"shared/docs|\bM[1-9]\b")
  files = [p for pattern in ("*.py", "*.md", "*.ipynb") for p in ROOT.rglob(pattern)
           if not {".venv", ".git", "build"} & set(p.relative_to(ROOT).parts)]
  assert len(files) > 50
  offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files if p != pathlib.Path(__file__)
               for m in [outside.search(p.read_text())] if m]
  assert not offenders, offenders
  cited = {m for p in files for m in re.findall(r"docs/[a-z_]+\.md", p.read_text())}
  assert cited and all((ROOT / doc).exists() for doc in cited), cited
