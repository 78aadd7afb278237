"""Training on several processes: two processes on localhost (2 CPU devices each, gloo
collectives), started through the command line's flags and through a user's own
``jax.distributed.initialize``, against one process with 4 devices.

Every subprocess runs under a hard timeout: a hang fails the test, it never stalls CI.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest
from training import ROOT, SMALL_LLAMA, checkpoint_steps, cli, train_losses, wait_for

from normjax import config as common
from normjax.train import distributed
from normjax.train import mesh as mesh_lib
from normjax.train.writer import read_jsonl
from normjax.validation import ConfigError

pytestmark = pytest.mark.xdist_group("multihost")  # the runs share one dataset and compile cache

XLA = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count="
RUN = {**SMALL_LLAMA, "train.steps": 8, "train.eval_every": 4, "ckpt.every": 4, "stats.every": 4,
       "mesh.num_devices": 0, "mesh.data": 2, "mesh.fsdp": 2}
TIMEOUT = 150  # seconds for any one run (they take 10-40 s)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict[str, str]:
  return {**os.environ, "XLA_FLAGS": XLA + str(devices)}


def launch(workdir: pathlib.Path, data_dir: pathlib.Path, overrides: dict, processes: int = 2,
           workdirs: list[pathlib.Path] | None = None) -> list[subprocess.Popen]:
  """``processes`` runs of ``python -m normjax.train`` forming one run (2 devices each), or one
  plain run with 4 devices when ``processes`` is 1."""
  if processes == 1:
    return [subprocess.Popen(cli("configs/llama.py", overrides, data_dir, workdir), env=env(4),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
  flags = [f"--coordinator_address=localhost:{free_port()}", f"--num_processes={processes}",
           "--heartbeat_timeout=10"]
  workdirs = workdirs or [workdir] * processes
  return [subprocess.Popen(cli("configs/llama.py", overrides, data_dir, workdirs[i]) + flags +
                           [f"--process_id={i}"], env=env(2), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for i in range(processes)]


def finish(processes: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[tuple[int, str, str]]:
  """(exit code, stdout, stderr) of each; all are killed, and the test fails, past ``timeout``."""
  deadline, results = time.time() + timeout, []
  for process in processes:
    try:
      out, err = process.communicate(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for p in processes:
        p.kill()
      pytest.fail(f"a process did not exit within {timeout} s:\n" +
                  "\n".join(p.communicate()[1][-3000:] for p in processes))
    results.append((process.returncode, out, err))
  return results


def succeed(processes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
  results = finish(processes)
  for i, (code, _, err) in enumerate(results):
    assert code == 0, f"process {i} exited {code}:\n{err[-4000:]}"
  return results


def close(a: dict[int, float], b: dict[int, float], rtol: float = 1e-5) -> bool:
  return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= rtol * abs(b[k]) for k in a)


def written_once(workdir: pathlib.Path, steps: int, sessions: int = 1) -> None:
  """Every row and file of a finished run exists exactly once: one TensorBoard file per session
  (start or resume), no temporary files left."""
  rows = read_jsonl(workdir / "metrics.jsonl")
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == list(range(1, steps + 1))
  assert [r["step"] for r in rows if "eval/loss" in r] == [4, 8]
  assert [r["step"] for r in read_jsonl(workdir / "stats.jsonl")] == [1, 4, 8]
  assert sorted(p.name for p in (workdir / "stats").iterdir()) == [f"{s:09d}.npz" for s in (1, 4, 8)]
  assert len(list((workdir / "tb").iterdir())) == sessions
  assert not list(workdir.rglob("*.tmp"))


def test_two_processes_match_one_and_resume_across_process_counts(tmp_path, data_dir):
  one, two = tmp_path / "one", tmp_path / "two"
  succeed(launch(one, data_dir, RUN, processes=1))
  results = succeed(launch(two, data_dir, RUN))
  written_once(two, 8)
  assert close(train_losses(two), train_losses(one))
  # process 0 alone prints: the start-up lines and the final line appear once
  assert "done: step 8/8" in results[0][1] and "done:" not in results[1][1]
  assert "mesh: {'data': 2, 'fsdp': 2, 'tensor': 1}" in results[0][1]
  assert checkpoint_steps(two) == [4, 8]

  # resume each run's step-4 checkpoint with the other process count: the same losses follow
  for source, processes in ((two, 1), (one, 2)):
    resumed = tmp_path / f"{source.name}_resumed_by_{processes}"
    shutil.copytree(source, resumed, ignore=shutil.ignore_patterns(".lock"))
    shutil.rmtree(resumed / "checkpoints" / "8")
    results = succeed(launch(resumed, data_dir, RUN, processes=processes))
    assert "resuming from step 4" in results[0][1]
    written_once(resumed, 8, sessions=2)
    assert close(train_losses(resumed), train_losses(source))


def test_sigterm_to_one_process_saves_one_checkpoint_and_both_stop(tmp_path, data_dir):
  workdir = tmp_path / "run"
  processes = launch(workdir, data_dir, {**RUN, "train.steps": 2000, "ckpt.every": 0, "stats.every": 0,
                                         "train.eval_every": 0})

  def trained_a_few_steps() -> bool:
    rows = read_jsonl(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else []
    return len(rows) >= 3
  wait_for(trained_a_few_steps, processes[0], "three steps", timeout=TIMEOUT)
  processes[1].send_signal(signal.SIGTERM)  # not process 0: the signal must reach the others
  results = finish(processes)
  assert [code for code, _, _ in results] == [143, 143], results[0][2][-3000:] + results[1][2][-3000:]
  (step,) = checkpoint_steps(workdir)
  assert f"SIGTERM: checkpoint saved at step {step}" in results[0][2]
  assert "SIGTERM" not in results[1][2]  # lockstep: process 0 alone reports it
  assert max(train_losses(workdir)) == step


def test_a_dead_process_stops_the_other(tmp_path, data_dir):
  workdir = tmp_path / "run"
  processes = launch(workdir, data_dir, {**RUN, "train.steps": 2000, "ckpt.every": 0, "stats.every": 0,
                                         "train.eval_every": 0})
  wait_for(lambda: (workdir / "metrics.jsonl").exists(), processes[0], "the first step", timeout=TIMEOUT)
  processes[1].kill()
  started = time.time()
  (code, _, err), _ = finish(processes, timeout=60)
  assert code != 0 and time.time() - started < 40  # the heartbeat timeout is 10 s
  # whichever notices first: the collective that lost its peer, or JAX's heartbeat
  assert ("another process of this run died" in err or "tasks are unhealthy" in err), err[-3000:]
  assert "Traceback" not in err


def test_separate_workdirs_are_refused_with_one_message(tmp_path, data_dir):
  dirs = [tmp_path / "a", tmp_path / "b"]
  results = finish(launch(dirs[0], data_dir, RUN, workdirs=dirs))
  assert [code for code, _, _ in results] == [2, 2]
  assert (f"workdir {dirs[1]}: process 1 (host {socket.gethostname()}) does not find the token that "
          "process 0") in results[0][2]
  assert "does not find" not in results[1][2]  # printed once, by process 0
  assert not dirs[0].exists() and not dirs[1].exists()  # nothing left behind


def test_processes_given_different_configs_are_refused(tmp_path, data_dir):
  ports = free_port()
  commands = [cli("configs/llama.py", {**RUN, "optim.lr": lr}, data_dir, tmp_path / "run") +
              [f"--coordinator_address=localhost:{ports}", "--num_processes=2", f"--process_id={i}"]
              for i, lr in enumerate((1e-3, 2e-3))]
  results = finish([subprocess.Popen(c, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True) for c in commands])
  assert [code for code, _, _ in results] == [2, 2]
  assert ("config error: process 1 was given another config than process 0: optim.lr: 0.001 "
          "(process 0) vs 0.002") in results[0][2]
  assert not (tmp_path / "run").exists()


def test_users_own_launcher_and_no_process_holds_the_whole_state_or_batch(tmp_path):
  """Also: a dataset not built yet is built once, by process 0, while the other waits."""
  workdir, port, fresh = tmp_path / "run", free_port(), tmp_path / "tfds"
  shutil.copytree(ROOT / "normjax", tmp_path / "texts")  # a corpus nobody edits during the test
  overrides = {**RUN, "mesh.across_processes": "fsdp", "data.data_dir": str(fresh),
               "data.name": "text_files", "data.text_dir": str(tmp_path / "texts")}
  args = [f"{k}={v}" for k, v in overrides.items()]
  processes = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "multihost_worker.py"), str(port), "2",
                                 str(i), str(workdir), str(ROOT / "configs/llama.py"), *args],
                                env=os.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  results = succeed(processes)
  reports = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
  assert "Downloading and preparing dataset" in results[0][1] + results[0][2]  # tfds: a build
  assert "Downloading and preparing dataset" not in results[1][1] + results[1][2]
  written_once(workdir, 8, sessions=2)  # trained, then called again (finished: nothing new)
  for report in reports:
    # fsdp across the processes: each holds half of every sharded parameter and Adam moment
    assert report["held_state_bytes"] < 0.6 * report["state_bytes"]
    assert report["held_batch_bytes"] == report["batch_bytes"] // 2
  assert sorted(reports[0]["rows"] + reports[1]["rows"]) == list(range(RUN["train.batch_size"]))
  (built,) = (fresh / "text_files").iterdir()  # one build (its hash folder), complete
  assert [p.name for p in built.iterdir()] == ["2.0.0"] and not list(fresh.rglob("*incomplete*"))


# ---------------------------------------------------------------- in-process, no second process

def test_mesh_split_over_processes_and_refusals():
  assert mesh_lib.split_over_processes({"data": 2, "fsdp": 2, "tensor": 1}, 2) == (
      {"data": 1, "fsdp": 2, "tensor": 1}, {"data": 2, "fsdp": 1, "tensor": 1})
  assert mesh_lib.split_over_processes({"data": 2, "fsdp": 4, "tensor": 2}, 4, "fsdp") == (
      {"data": 2, "fsdp": 1, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 1})
  with pytest.raises(ConfigError, match=r"fsdp=1 is not divisible by the remaining 2"):
    mesh_lib.split_over_processes({"data": 2, "fsdp": 1, "tensor": 4}, 4)
  config = common.load(str(ROOT / "configs/llama.py"), {"mesh.num_devices": 3})
  with pytest.raises(ConfigError, match=r"mesh.num_devices=3: a run on 2 processes uses every device"):
    common.validate(config, 4, 2)
  config = common.load(str(ROOT / "configs/llama.py"), {"mesh.across_processes": "tensor"})
  with pytest.raises(ConfigError, match=r"mesh.across_processes='tensor' is not valid; choose one of"):
    common.validate(config, 4, 1)


def test_batch_rows_build_the_global_batch_from_this_process_rows():
  """With one process every row is local, and ``put`` places exactly what ``device_put`` would."""
  import numpy as np
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rows = mesh_lib.BatchRows(mesh_lib.batch_sharding(mesh), 8)
  assert rows.rows.tolist() == list(range(8))
  batch = {"inputs": np.arange(8 * 3).reshape(8, 3)}
  placed = rows.put(batch)["inputs"]
  assert placed.sharding == mesh_lib.batch_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(placed), batch["inputs"])
  assert {s.data.shape for s in placed.addressable_shards} == {(2, 3)}


def test_launch_flags_must_come_together(monkeypatch):
  for name in distributed.ENV.values():
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() in ("single process", f"jax.distributed already initialized: process "
                                                         f"{jax.process_index()} of {jax.process_count()}")
  monkeypatch.setenv("NORMJAX_NUM_PROCESSES", "2")
  with pytest.raises(ConfigError, match=r"--coordinator_address, --process_id not set"):
    distributed.initialize()
  with pytest.raises(ConfigError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
    distributed.initialize("localhost:1", process_id=2)
