"""Faults against the training loop, each made real: SIGKILL in the middle of a save, a full and a
read-only filesystem (a tmpfs mounted in a private mount namespace), truncated and half-deleted
checkpoints, a second run on the same workdir, a resume with another config, signals at start-up,
and typos on the command line. Each checks what is kept, what is refused and the one message."""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest
from training import (CLI_ENV, ROOT, SMALL_LLAMA, checkpoint_steps, cli, load_config, start,
                      train_losses, train_losses_or_empty, wait_for)

from normjax import config as common
from normjax.config import ConfigError
from normjax.train import CheckpointError, ResumeRefused, WorkdirError, train
from normjax.train import cli as train_cli
from normjax.train.writer import read_jsonl

QUIET = {"train.eval_every": 0, "stats.every": 0}  # only what a test looks at


def _can_mount() -> bool:
  return shutil.which("unshare") is not None and subprocess.run(
      ["unshare", "--mount", "true"], capture_output=True).returncode == 0


needs_mounts = pytest.mark.skipif(not _can_mount(), reason="needs `unshare --mount` (root or "
                                  "CAP_SYS_ADMIN) to mount a small or read-only tmpfs")


def run_on_tmpfs(mountpoint: pathlib.Path, size: str, command: list[str], *, read_only: bool = False,
                 copy_to: pathlib.Path | None = None) -> subprocess.CompletedProcess:
  """``command`` with a fresh tmpfs of ``size`` at ``mountpoint`` (private to it: the mount ends
  with the process, so its files are first copied to ``copy_to``)."""
  mountpoint.mkdir(parents=True, exist_ok=True)
  script = ('mount -t tmpfs -o "size=$1" tmpfs "$2" || exit 99\n'
            + ('mount -o remount,ro "$2" || exit 99\n' if read_only else '')
            + 'mount_point="$2"; copy_to="$3"; shift 3\n"$@"; rc=$?\n'
            'if [ -n "$copy_to" ]; then cp -a "$mount_point/." "$copy_to/"; fi\nexit $rc\n')
  if copy_to is not None:
    copy_to.mkdir(parents=True, exist_ok=True)
  return subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", size, str(mountpoint),
                         str(copy_to or ""), *command], capture_output=True, text=True, env=CLI_ENV,
                        timeout=300)


def _unfinished(workdir: pathlib.Path) -> list[str]:
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return []
  return [p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]


# ---------------------------------------------------------------------------- kills and disks
def test_kill_during_a_save_leaves_nothing_behind(tmp_path, data_dir, capsys):
  """SIGKILL while orbax writes a checkpoint leaves its temporary folder; the next start removes
  it, says so and resumes from the newest complete checkpoint."""
  overrides = {**SMALL_LLAMA, **QUIET, "train.steps": 2000, "ckpt.every": 1, "ckpt.keep": 2}
  process = start("configs/llama.py:tiny", overrides, data_dir, tmp_path)

  def caught_mid_save() -> bool:  # and one complete checkpoint to resume from
    if not _unfinished(tmp_path) or not checkpoint_steps(tmp_path):
      return False
    process.send_signal(signal.SIGSTOP)  # freeze it, then look again: the save may just have ended
    if _unfinished(tmp_path):
      return True
    process.send_signal(signal.SIGCONT)
    return False
  wait_for(caught_mid_save, process, "a save in progress", interval=0.001)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  left = _unfinished(tmp_path)
  assert left
  restart = max(checkpoint_steps(tmp_path))
  train(load_config("configs/llama.py:tiny", {**overrides, "train.steps": restart + 3}, data_dir),
        str(tmp_path))
  out = capsys.readouterr().out
  assert f"removed the unfinished save(s) of a killed run: {left}" in out
  assert f"resuming from step {restart}" in out
  assert _unfinished(tmp_path) == [] and max(checkpoint_steps(tmp_path)) == restart + 3


@needs_mounts
def test_a_failed_save_on_a_full_disk_stops_at_once_with_one_message(tmp_path, data_dir):
  """800 KiB hold one ~0.5 MiB checkpoint, not two: the second save fails with ENOSPC. The run stops
  there (not at a later save) with one line naming the step, the path and the OS error, frees the
  partial folder and keeps the complete checkpoint."""
  mount, kept = tmp_path / "disk", tmp_path / "kept"
  overrides = {**SMALL_LLAMA, **QUIET, "train.steps": 40, "ckpt.every": 2, "train.log_every": 1000}
  result = run_on_tmpfs(mount, "800k", cli("configs/llama.py:tiny", overrides, data_dir, mount / "run"),
                        copy_to=kept)
  assert result.returncode == 1, result.stderr[-3000:]
  line = [row for row in result.stderr.splitlines() if row.startswith("stopped:")]
  assert len(line) == 1 and "Traceback" not in result.stderr and "RESOURCE_EXHAUSTED" not in result.stderr
  assert f"stopped: saving the checkpoint of step 4 to {mount / 'run' / 'checkpoints' / '4'} failed: " \
         "No space left on device (errno 28); training stopped. Newest complete checkpoint: step 2" in line[0]
  assert checkpoint_steps(kept / "run") == [2] and _unfinished(kept / "run") == []


@needs_mounts
@pytest.mark.parametrize("size,read_only,message", [
    ("4m", True, "cannot be created: Read-only file system (errno 30)"),
    ("100k", False, "MiB free on its filesystem, but one checkpoint needs about 0.5 MiB; free space or "
                    "use another workdir"),
])
def test_a_read_only_or_too_small_filesystem_is_refused_before_compiling(tmp_path, data_dir, size,
                                                                        read_only, message):
  mount, kept = tmp_path / "disk", tmp_path / "kept"
  result = run_on_tmpfs(mount, size, cli("configs/llama.py:tiny", SMALL_LLAMA, data_dir, mount / "run"),
                        read_only=read_only, copy_to=kept)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
  assert errors[0].startswith(f"error: workdir {mount / 'run'}") and message in errors[0]
  assert not (kept / "run").exists()  # a refused run leaves no workdir behind


def test_a_workdir_that_is_or_is_under_a_file_is_refused(tmp_path, data_dir):
  config = load_config("configs/llama.py:tiny", SMALL_LLAMA, data_dir)
  (tmp_path / "file").write_text("x")
  with pytest.raises(WorkdirError, match=r"workdir .*/file is a file, not a directory"):
    train(config, str(tmp_path / "file"))
  with pytest.raises(WorkdirError,
                     match=r"workdir .*/file/run cannot be created: Not a directory \(errno 20\)"):
    train(config, str(tmp_path / "file" / "run"))


# ---------------------------------------------------------------------------- checkpoints
def _truncate_data(checkpoint: pathlib.Path) -> None:
  for path in (checkpoint / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[:16])


def test_corrupt_newest_checkpoints_fall_back_to_one_that_restores(tmp_path, data_dir, capsys):
  overrides = {**SMALL_LLAMA, **QUIET, "train.steps": 8, "ckpt.every": 2, "ckpt.keep": 4}
  train(load_config("configs/llama.py:tiny", overrides, data_dir), str(tmp_path))
  first = train_losses(tmp_path)
  checkpoints = tmp_path / "checkpoints"
  _truncate_data(checkpoints / "8")
  (checkpoints / "6" / "state" / "_METADATA").unlink()
  shutil.rmtree(checkpoints / "4" / "state")
  capsys.readouterr()
  train(load_config("configs/llama.py:tiny", overrides, data_dir), str(tmp_path))
  out = capsys.readouterr().out
  for step, why in [(8, "OUT_OF_RANGE"), (6, "Error"), (4, "'Item \"state\" was not found")]:
    assert f"skipped checkpoint {step}: " in out and why in out.split(f"skipped checkpoint {step}: ")[1]
    assert (tmp_path / "skipped_checkpoints" / str(step)).is_dir()  # kept, out of the way
  assert "resuming from step 2" in out
  resumed = train_losses(tmp_path)
  assert {s: resumed[s] for s in first} == first  # steps 3..8 recomputed exactly
  assert checkpoint_steps(tmp_path) == [2, 4, 6, 8]
  for step in checkpoint_steps(tmp_path):
    shutil.rmtree(checkpoints / str(step) / "state")
  with pytest.raises(CheckpointError, match=r"no checkpoint in .* restores \(step 8: .*; step 2: .*\); "
                                            r"move them away"):
    train(load_config("configs/llama.py:tiny", {**overrides, "train.steps": 12}, data_dir), str(tmp_path))


def test_a_changed_config_is_refused_unless_allowed_and_then_recorded(tmp_path, data_dir, capsys):
  base = {**SMALL_LLAMA, **QUIET, "train.steps": 4, "ckpt.every": 2}
  train(load_config("configs/llama.py:tiny", base, data_dir), str(tmp_path))
  saved_config, rows = (tmp_path / "config.json").read_text(), read_jsonl(tmp_path / "metrics.jsonl")
  changed = {"model.placement.kind": "lns", "train.batch_size": 16, "seed": 1, "model.dtype": "bfloat16",
             "train.steps": 6, "ckpt.every": 3}  # the last two may change
  with pytest.raises(ResumeRefused) as info:
    train(load_config("configs/llama.py:tiny", {**base, **changed}, data_dir), str(tmp_path))
  assert str(info.value).splitlines()[1:5] == [
      "  model.dtype: 'float32' -> 'bfloat16'", "  model.placement.kind: 'pre' -> 'lns'",
      "  seed: 0 -> 1", "  train.batch_size: 8 -> 16"]
  assert "--allow_config_change" in str(info.value)
  assert (tmp_path / "config.json").read_text() == saved_config
  assert read_jsonl(tmp_path / "metrics.jsonl") == rows
  with pytest.raises(ResumeRefused, match=r"model.d_model: 32 -> 64"):  # not an orbax shape traceback
    train(load_config("configs/llama.py:tiny", {**base, "model.d_model": 64}, data_dir), str(tmp_path))

  lns = load_config("configs/llama.py:tiny", {**base, "model.placement.kind": "lns", "train.steps": 6},
                    data_dir)
  train(lns, str(tmp_path), allow_config_change=True)
  assert read_jsonl(tmp_path / "config_changes.jsonl") == [
      {"step": 4, "changes": {"model.placement.kind": ["pre", "lns"]}}]
  assert json.loads((tmp_path / "config.json").read_text())["model"]["placement"]["kind"] == "lns"
  assert "resuming with a changed config (allowed" in capsys.readouterr().out
  assert max(train_losses(tmp_path)) == 6
  wide = load_config("configs/llama.py:tiny", {**base, "model.placement.kind": "lns", "model.d_model": 64,
                                               "train.steps": 8}, data_dir)
  with pytest.raises(CheckpointError, match=r"no checkpoint in .* restores \(step 6: "):
    train(wide, str(tmp_path), allow_config_change=True)


def test_a_finished_run_rewrites_a_lost_evaluation_row(tmp_path, data_dir):
  """A kill between a checkpoint and its evaluation row (possible before evaluations were written
  first) lost the row for good; a rerun evaluates the restored step again and writes it."""
  config = load_config("configs/llama.py:tiny", {**SMALL_LLAMA, "train.steps": 6, "train.eval_every": 3,
                                                  "ckpt.every": 3, "stats.every": 0}, data_dir)
  first = train(config, str(tmp_path))
  metrics = tmp_path / "metrics.jsonl"
  rows = read_jsonl(metrics)
  kept = [row for row in rows if not (row["step"] == 6 and "eval/loss" in row)]
  metrics.write_text("".join(json.dumps(row) + "\n" for row in kept))
  again = train(config, str(tmp_path))
  assert read_jsonl(metrics) == rows and again["eval_loss"] == first["eval_loss"]
  assert train(config, str(tmp_path))["eval_loss"] == first["eval_loss"]  # reported from the row
  assert read_jsonl(metrics) == rows


# ---------------------------------------------------------------------------- concurrency, signals
def test_a_second_run_on_the_same_workdir_is_refused_with_the_holders_pid(tmp_path, data_dir):
  overrides = {**SMALL_LLAMA, **QUIET, "train.steps": 100_000, "ckpt.every": 0}
  process = start("configs/llama.py:tiny", overrides, data_dir, tmp_path)
  try:
    wait_for(lambda: len(train_losses_or_empty(tmp_path)) >= 2, process, "step 2")
    with pytest.raises(WorkdirError, match=rf"workdir {tmp_path} is in use by another run \(pid "
                                           rf"{process.pid} on "):
      train(load_config("configs/llama.py:tiny", overrides, data_dir), str(tmp_path))
  finally:
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
  steps = [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")]
  assert steps == sorted(set(steps))  # one writer: no row twice


def _catches(pid: int, signum: int) -> bool:
  """Whether process ``pid`` has a handler for ``signum`` (the SigCgt mask in /proc)."""
  status = pathlib.Path(f"/proc/{pid}/status").read_text()
  mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
  return bool(mask >> (signum - 1) & 1)


@pytest.mark.parametrize("moment", ["before JAX loads", "in train's start-up"])
def test_sigterm_during_start_up_stops_with_a_message(tmp_path, data_dir, moment):
  workdir = tmp_path / "run"
  process = start("configs/llama.py:tiny", SMALL_LLAMA, data_dir, workdir)
  if moment == "before JAX loads":
    wait_for(lambda: _catches(process.pid, signal.SIGTERM), process, "the handler is installed",
             interval=0.001)
  else:
    wait_for(lambda: (workdir / ".lock").exists(), process, "the workdir is claimed", interval=0.001)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 143, err
  assert err.startswith("stopped: SIGTERM during start-up: no step has run; stopped without saving")
  assert "Traceback" not in err
  assert not workdir.exists()  # the run created it and ran no step: nothing is left


# ---------------------------------------------------------------------------- the command line
def test_command_line_overrides_type_a_kinds_options_in_any_order():
  args = train_cli.parse(["--config=configs/llama.py:tiny", "--workdir", "w",
                          "--config.model.norm.options.alpha_init=0.25", "--config.model.norm.kind", "dyt",
                          "--allow_config_change"])
  assert args.allow_config_change and args.workdir == "w"
  config = common.load(args.config, args.overrides)
  assert config.model.norm.options.to_dict() == {"alpha_init": 0.25}
  assert common.validate(config, 1).model.norm.options == {"alpha_init": 0.25}
  rms = common.load("configs/llama.py:tiny", {"model.norm.options.eps": "1e-5",
                                              "model.norm.options.use_bias": "true"})
  assert rms.model.norm.options.to_dict() == {"eps": 1e-5, "use_bias": True}
  with pytest.raises(ConfigError, match=r"^model.norm.options.epz: norm 'rms_norm' has no option 'epz' "
                                        r"\(did you mean 'eps'\?\); valid options: \["):
    common.load("configs/llama.py:tiny", {"model.norm.options.epz": "1e-5"})
  with pytest.raises(ConfigError, match=r"^train.stepz is not a config field \(did you mean train.steps\?\)"):
    common.load("configs/llama.py:tiny", {"train.stepz": "5"})
  with pytest.raises(ConfigError, match=r"unknown flag '--stepz=5'"):
    train_cli.parse(["--config=configs/llama.py:tiny", "--workdir=w", "--stepz=5"])
  with pytest.raises(ConfigError, match=r"--config.train.steps has no value"):
    train_cli.parse(["--config=configs/llama.py:tiny", "--workdir=w", "--config.train.steps"])


def test_cli_help_lists_the_flags():
  result = subprocess.run([sys.executable, "-m", "normjax.train", "--help"], capture_output=True,
                          text=True, env=CLI_ENV, cwd=ROOT)
  assert result.returncode == 0
  assert "--allow_config_change" in result.stdout and "--config.<section>.<field>=<value>" in result.stdout
