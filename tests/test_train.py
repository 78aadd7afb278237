"""The training loop end to end: workdir contents, resume after a real kill (bitwise), SIGTERM,
1 vs 8 devices, golden partition specs, non-finite loss, bad configs failing before any JAX work."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

import numpy as np
import pytest
from training import (CLI_ENV, ROOT, SMALL_LLAMA, checkpoint_steps, cli, load_config, start,
                            train_losses, train_losses_or_empty, wait_for)

from normjax.config import ConfigError
from normjax.data import corpus, sources
from normjax.models import config as model_config_lib
from normjax.train import NonFiniteLoss, train
from normjax.train.loop import due
from normjax.train.writer import Writer, read_jsonl, read_stats

GOLDEN = ROOT / "tests" / "golden" / "llama_small_partition_specs.json"


def test_llama_run_leaves_everything_in_the_workdir(tmp_path, data_dir, monkeypatch):
  config = load_config("configs/llama.py:tiny", {**SMALL_LLAMA, "train.steps": 30,
                                                  "optim.lr": 1e-2}, data_dir)
  checks = {"data": 0, "model": 0}  # count the validations: the loop validates each section once

  def counting(name, fn):
    def wrapped(*args, **kwargs):
      checks[name] += 1
      return fn(*args, **kwargs)
    return wrapped
  monkeypatch.setattr(sources, "_check_seq_len", counting("data", sources._check_seq_len))
  monkeypatch.setattr(model_config_lib, "_check", counting("model", model_config_lib._check))
  result = train(config, str(tmp_path))
  assert checks == {"data": 1, "model": 1}
  losses = train_losses(tmp_path)
  assert sorted(losses) == list(range(1, 31))
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert {"train/lr", "train/grad_norm", "train/tokens_per_second"} <= set(rows[-2]) | set(rows[-1])
  assert any("eval/loss" in row for row in rows)
  assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 0.5, losses  # the loss falls
  assert result["eval_loss"] < losses[1]
  assert json.loads((tmp_path / "config.json").read_text())["model"]["norm"]["kind"] == "rms_norm"
  stats_rows = read_jsonl(tmp_path / "stats.jsonl")
  assert [row["step"] for row in stats_rows] == [1, 5, 10, 15, 20, 25, 30]
  stats = read_stats(tmp_path)
  assert stats["mlp/resid_var"].shape == (7, 2)  # one row per logged step, one column per layer
  np.testing.assert_allclose(stats["mlp/resid_var"][-1], stats_rows[-1]["mlp/resid_var"], rtol=1e-6)
  assert stats["steps"].tolist() == [1, 5, 10, 15, 20, 25, 30]
  assert stats["angular_distance"].shape == (7, 3, 3)
  assert stats["grad_norm"].shape == (7, 2)
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [10, 20, 30]
  mask = json.loads((tmp_path / "weight_decay_mask.json").read_text())
  assert mask["embed"] is True and mask["final_norm/scale"] is False


def test_tiny_bpe_trains_on_packed_bpe_tokens_and_resumes_bitwise(tmp_path, data_dir):
  """The README's BPE preset from the command line: a vocabulary trained on the standard library,
  packed documents with segment ids; the loss falls, and a resumed run repeats it exactly."""
  overrides = {**SMALL_LLAMA, "train.steps": 24, "ckpt.every": 12, "optim.lr": 1e-2}
  run = subprocess.run(cli("configs/llama.py:tiny_bpe", overrides, data_dir, tmp_path / "a"),
                       env=CLI_ENV, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "hf vocabulary of 1024, packed in 2049-token chunks" in run.stdout
  assert (data_dir / "tokenizers" / f"{corpus.stdlib_config_name()}-hf-1024.json").is_file()
  losses = train_losses(tmp_path / "a")
  assert losses[1] > 6.5 and np.mean([losses[s] for s in range(20, 25)]) < losses[1] - 1.0, losses
  # resume from step 12 in a copy: steps 13..24 repeat bitwise
  resumed = tmp_path / "b"
  shutil.copytree(tmp_path / "a", resumed, ignore=shutil.ignore_patterns(".lock"))
  shutil.rmtree(resumed / "checkpoints" / "24")
  again = subprocess.run(cli("configs/llama.py:tiny_bpe", overrides, data_dir, resumed), env=CLI_ENV,
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert train_losses(resumed) == losses


def test_gpt2_variant_learns_and_refuses_sequences_past_its_positions(tmp_path, data_dir):
  """configs/llama.py:gpt2_tiny: the GPT-2 family (learned positions, tanh GELU, biases, tied
  LayerNorm model) trains on the same data; a sequence longer than its learned positions is a
  config error before anything is built."""
  config = load_config("configs/llama.py:gpt2_tiny", {**SMALL_LLAMA, "optim.lr": 1e-2}, data_dir)
  train(config, str(tmp_path / "run"))
  losses = train_losses(tmp_path / "run")
  assert np.mean([losses[s] for s in range(16, 21)]) < losses[1] - 1.0, losses
  model = json.loads((tmp_path / "run" / "model.json").read_text())
  assert (model["name"], model["tie_embeddings"], model["norm"]["kind"]) == ("gpt2", True, "layer_norm")
  too_long = load_config("configs/llama.py:gpt2_tiny", {**SMALL_LLAMA, "model.max_positions": 16},
                         data_dir)
  with pytest.raises(ConfigError, match="data.seq_len=32 exceeds model.max_positions=16"):
    train(too_long, str(tmp_path / "long"))


def test_vit_run_on_local_images(tmp_path, data_dir):
  config = load_config("configs/vit.py:tiny", {"train.steps": 20, "train.batch_size": 32,
                                                "train.eval_every": 20, "stats.every": 10,
                                                "mesh.num_devices": 1, "optim.warmup_steps": 2},
                       data_dir)
  result = train(config, str(tmp_path))
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert result["eval_accuracy"] == [row["eval/accuracy"] for row in rows if "eval/accuracy" in row][-1]
  assert "train/accuracy" in rows[-2] or "train/accuracy" in rows[-1]
  assert any("train/images_per_second" in row for row in rows)
  assert read_stats(tmp_path)["attn/attn_entropy"].shape == (3, 4)


def test_tvr_hook_rescales_every_k_steps(tmp_path, data_dir):
  """A 0.001 target is below every init-0.02 kernel: all 7 kernels x 2 layers rescale at steps 5, 10."""
  config = load_config("configs/llama.py:tiny", {**SMALL_LLAMA, "train.steps": 10, "tvr.enabled": True,
                                                  "tvr.every": 5, "tvr.target_std": 0.001,
                                                  "ckpt.every": 0, "train.eval_every": 0}, data_dir)
  train(config, str(tmp_path))
  rows = [row for row in read_jsonl(tmp_path / "metrics.jsonl") if "tvr/rescaled" in row]
  assert [(row["step"], row["tvr/rescaled"]) for row in rows] == [(5, 14), (10, 14)]


def test_resume_after_kill_is_bitwise_identical(tmp_path, data_dir):
  """Killed once checkpoint 10 exists (somewhere before step 60): the resumed run's losses,
  evaluation rows and statistics equal an uninterrupted run's exactly (throughput aside)."""
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  overrides = {**SMALL_LLAMA, "train.steps": 60}
  subprocess.run(cli("configs/llama.py:tiny", overrides, data_dir, straight), check=True, env=CLI_ENV,
                 capture_output=True)
  process = start("configs/llama.py:tiny", overrides, data_dir, killed)
  wait_for(lambda: 10 in checkpoint_steps(killed), process, "checkpoint 10", interval=0.005)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  restart = max(checkpoint_steps(killed))
  assert max(train_losses(killed)) < 60
  resumed = subprocess.run(cli("configs/llama.py:tiny", overrides, data_dir, killed), check=True,
                           env=CLI_ENV, capture_output=True, text=True)
  assert f"resuming from step {restart}" in resumed.stdout

  def rows(workdir):
    return [{k: v for k, v in row.items() if not k.endswith("_per_second")}
            for row in read_jsonl(workdir / "metrics.jsonl")]
  assert rows(killed) == rows(straight)  # bitwise: floats compared exactly, eval rows included
  assert [r["step"] for r in rows(killed) if "eval/loss" in r] == [10, 20, 30, 40, 50, 60]
  straight_stats = read_jsonl(straight / "stats.jsonl")
  assert read_jsonl(killed / "stats.jsonl") == straight_stats
  killed_arrays, straight_arrays = read_stats(killed), read_stats(straight)
  assert killed_arrays.keys() == straight_arrays.keys()
  for key, value in straight_arrays.items():
    np.testing.assert_array_equal(killed_arrays[key], value, err_msg=key)


def test_stats_writer_appends_and_resume_drops_rows_past_the_restored_step(tmp_path):
  """Each statistics step writes one new file and touches none before it (no quadratic rewrite);
  a writer resuming at step 2 drops the rows and files of steps 3 and 4."""
  writer = Writer(tmp_path, 0)
  rows = {step: {"mlp/resid_var": np.full(3, step, np.float32),
                 "angular_distance": np.eye(4, dtype=np.float32) * step} for step in (1, 2, 3, 4)}
  written = {}
  for step, values in rows.items():
    writer.stats(step, values)
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stats").iterdir()}
    assert len(files) == step and all(files[name] == mtime for name, mtime in written.items())
    written = files
  writer.close()
  stats = read_stats(tmp_path)
  assert stats["steps"].tolist() == [1, 2, 3, 4]
  np.testing.assert_array_equal(stats["mlp/resid_var"], np.repeat([[1.], [2.], [3.], [4.]], 3, 1))
  assert stats["angular_distance"].shape == (4, 4, 4)
  (tmp_path / "stats" / "000000005.npz.tmp").write_bytes(b"torn")  # a kill mid-write
  Writer(tmp_path, 2).close()
  assert read_stats(tmp_path)["steps"].tolist() == [1, 2]
  assert [row["step"] for row in read_jsonl(tmp_path / "stats.jsonl")] == [1, 2]
  assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["000000001.npz", "000000002.npz"]


def test_the_loss_averages_over_the_tokens_the_mask_keeps():
  import jax.numpy as jnp
  import optax
  from normjax.train.step import task_loss
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
  targets = jnp.asarray([[1, 2, 3], [4, 0, 1]])
  per_token = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
  mask = jnp.asarray([[1, 1, 0], [0, 1, 0]])
  loss, _ = task_loss(logits, {"targets": targets, "loss_mask": mask})
  np.testing.assert_allclose(loss, (per_token[0, 0] + per_token[0, 1] + per_token[1, 1]) / 3, rtol=1e-6)
  unmasked, _ = task_loss(logits, {"targets": targets})
  np.testing.assert_allclose(unmasked, per_token.mean(), rtol=1e-6)
  empty, _ = task_loss(logits, {"targets": targets, "loss_mask": jnp.zeros((2, 3))})
  assert float(empty) == 0.0  # a batch of padding only: no NaN


def test_due_is_the_one_cadence_rule():
  assert [s for s in range(1, 11) if due(s, 4)] == [4, 8]
  assert [s for s in range(1, 11) if due(s, 4, last=10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if due(s, 4, first=True)] == [1, 4, 8]
  assert [s for s in range(1, 11) if due(s, 0, last=10)] == [10]  # 0: only at the end


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_exits_128_plus_its_number(tmp_path, data_dir, signum):
  """SIGTERM (preemption) and SIGINT (Ctrl-C) alike: the step in flight finishes, its checkpoint is
  saved, the run says so and exits 143 / 130 (not 0: a scheduler must see it did not finish)."""
  overrides = {**SMALL_LLAMA, "train.steps": 10_000, "ckpt.every": 0, "train.eval_every": 0}
  process = start("configs/llama.py:tiny", overrides, data_dir, tmp_path)
  wait_for(lambda: len(train_losses_or_empty(tmp_path)) >= 5, process, "step 5")
  process.send_signal(signum)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 128 + signum, err
  saved = checkpoint_steps(tmp_path)
  assert len(saved) == 1 and saved[0] >= 5
  assert f"{signal.Signals(signum).name}: checkpoint saved at step {saved[0]}" in out + err
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  assert max(train_losses(tmp_path)) == saved[0]  # nothing ran past the checkpoint


# pallas: the fused norm kernels (interpret mode here) run per shard in shard_map under the loop's
# mesh; CI keeps its fast representatives (tests/test_kernels.py::test_sharded_rows_under_a_mesh,
# tests/test_models.py::test_pallas_kernels_in_the_model_match_xla) and this xla run.
@pytest.mark.parametrize("impl", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
def test_eight_devices_match_one_and_golden_partition_specs(tmp_path, data_dir, impl):
  import jax
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  overrides = {**SMALL_LLAMA, "train.steps": 6, "stats.every": 3, "ckpt.every": 0,
               "train.eval_every": 0, "model.num_heads": 4, "model.vocab_size": 256}
  one = load_config("configs/llama.py:tiny", overrides, data_dir)
  eight = load_config("configs/llama.py:tiny", {**overrides, "mesh.num_devices": 0, "mesh.data": 2,
                                                 "mesh.fsdp": 2, "mesh.tensor": 2,
                                                 "model.norm.impl": impl}, data_dir)
  train(one, str(tmp_path / "one"))
  train(eight, str(tmp_path / "eight"))
  losses_one, losses = train_losses(tmp_path / "one"), train_losses(tmp_path / "eight")
  # different reduction orders across shards: agreement to float32 rounding, compounded over 6 steps
  np.testing.assert_allclose([losses[s] for s in range(1, 7)], [losses_one[s] for s in range(1, 7)],
                             rtol=1e-5)
  specs = json.loads((tmp_path / "eight" / "partition_specs.json").read_text())
  assert specs == json.loads(GOLDEN.read_text()), "partition specs changed; regenerate the golden file"
  assert specs["stack/blocks/attn/q/kernel"] == "P(None, 'fsdp', 'tensor')"


def test_non_finite_loss_names_a_checkpoint_whose_next_step_is_finite(tmp_path, data_dir):
  """lr=1e6 diverges at some step s. Checkpoint s-1 was saved before step s's loss was known: it is
  removed, and the checkpoint named instead restarts into a finite step (the rerun, same config,
  resumes there, computes finite steps up to s and stops at s again with the same message)."""
  config = load_config("configs/llama.py:tiny", {**SMALL_LLAMA, "optim.lr": 1e6, "optim.clip_norm": 0.0,
                                                  "optim.warmup_steps": 0, "ckpt.every": 1, "ckpt.keep": 2,
                                                  "stats.every": 1, "train.steps": 50}, data_dir)
  with pytest.raises(NonFiniteLoss) as info:
    train(config, str(tmp_path))
  message = str(info.value)
  step = int(message.split(" at step ")[1].split(";")[0])
  assert step >= 3, message  # the test needs two good checkpoints before the divergence
  good = step - 2
  assert f"removed checkpoint {step - 1} (its next step is this one)" in message
  assert f"last good checkpoint: step {good} in" in message
  assert f"last statistics: step {step}" in message
  assert checkpoint_steps(tmp_path) == [s for s in (good - 1, good) if s >= 1]  # keep=2 good ones
  rows = read_jsonl(tmp_path / "metrics.jsonl")  # every row still parses
  assert rows[-1]["step"] == step
  assert not (np.isfinite(rows[-1]["train/loss"]) and np.isfinite(rows[-1]["train/grad_norm"]))
  with pytest.raises(NonFiniteLoss) as again:
    train(config, str(tmp_path))
  assert str(again.value) == message
  assert np.isfinite(train_losses(tmp_path)[good + 1])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 1e39 -> float32 inf, the point
def test_non_finite_parameters_stop_the_run_although_the_loss_is_finite(tmp_path, data_dir):
  """lr=1e39 (inf in float32) makes every updated parameter inf in step 1, while step 1's loss and
  gradient (from the init) are finite: the parameter check stops it there."""
  config = load_config("configs/llama.py:tiny", {**SMALL_LLAMA, "optim.lr": 1e39, "optim.clip_norm": 0.0,
                                                  "optim.warmup_steps": 0, "ckpt.every": 1}, data_dir)
  with pytest.raises(NonFiniteLoss, match=r"non-finite updated parameters at step 1; last good "
                                          r"checkpoint: none"):
    train(config, str(tmp_path))
  assert np.isfinite(train_losses(tmp_path)[1]) and checkpoint_steps(tmp_path) == []


@pytest.mark.parametrize("overrides,match", [
    ({"model.norm.kind": "rms_nrom"}, r"Did you mean 'rms_norm'"),
    ({"model.placement.kind": "sandwich"}, r"model.placement.kind='sandwich' is not valid"),
    ({"model.num_heads": 3}, r"model.num_heads=3 does not divide model.d_model=32"),
    ({"mesh.data": 3, "mesh.fsdp": -1, "mesh.num_devices": 8}, r"mesh: .* do not divide the 8 devices"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.num_devices": 8}, r"mesh: data\*fsdp\*tensor"),
    ({"train.batch_size": 6, "mesh.data": 4, "mesh.num_devices": 4}, r"train.batch_size=6 is not divisible"),
    ({"data.name": "c4_local"}, r"data.name='c4_local'"),
    ({"optim.lr": 0.0}, r"optim.lr=0.0 must be finite and in \(0, inf\)"),
    ({"optim.lr": "nan"}, r"optim.lr=nan must be finite"),
    ({"optim.lr": "inf"}, r"optim.lr=inf must be finite"),
    ({"optim.min_lr_ratio": -3.0}, r"optim.min_lr_ratio=-3.0 must be finite and in \[0, 1\]"),
    ({"optim.b1": 1.5}, r"optim.b1=1.5 must be finite and in \[0, 1\)"),
    ({"optim.b2": 1.0}, r"optim.b2=1.0 must be finite and in \[0, 1\)"),
    ({"optim.eps": 0.0}, r"optim.eps=0.0 must be finite and in \(0, inf\)"),
    ({"optim.clip_norm": -1.0}, r"optim.clip_norm=-1.0 must be finite and in \[0, inf\)"),
    ({"optim.weight_decay": -0.1}, r"optim.weight_decay=-0.1 must be finite and in \[0, inf\)"),
    ({"mesh.num_devices": 9}, r"mesh.num_devices=9 but 8 devices are visible"),
    ({"data.name": "sklearn_digits"}, r"model.name='llama' needs text data, but data.name='sklearn_digits'"),
    ({"model.mlp_dim": 0}, r"model.mlp_dim=0 must be a positive int \(None = the default\)"),
    ({"model.norm.options": {"impl": "pallas"}}, r"model.norm.options.impl='pallas' duplicates model.norm.impl"),
])
def test_bad_configs_fail_before_any_jax_work(tmp_path, data_dir, overrides, match):
  config = load_config("configs/llama.py:tiny", {**SMALL_LLAMA, **overrides}, data_dir)
  with pytest.raises(ConfigError, match=match):
    train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,line", [
    ({"model.num_heads": 3}, "config error: model.num_heads=3 does not divide model.d_model=128"),
    ({"model.nrom.kind": "rms_norm"}, "config error: model.nrom.kind: model.nrom is not a config field "
                                      "(did you mean model.norm?); fields of model: ["),
])
def test_cli_reports_config_errors_in_one_line(tmp_path, data_dir, overrides, line):
  result = subprocess.run(cli("configs/llama.py:tiny", overrides, data_dir, tmp_path / "run"),
                          capture_output=True, text=True, env=CLI_ENV)
  assert result.returncode == 2
  assert result.stderr.startswith(line) and result.stderr.count("\n") == 1, result.stderr
  assert not (tmp_path / "run").exists()
