"""Test setup: 8 fake CPU devices and a per-run JAX compilation cache (both set before JAX
initializes), and shared fixtures."""

import os
import tempfile

# 8 fake CPU devices; LLVM's optimization off: the suite's programs are tiny, so compiling them
# dominates and optimizing them buys nothing (subprocess tests run the CLI with the user's flags).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
# Many tests (and the training subprocesses they start) compile the same tiny programs: one
# persistent cache per test run lets every repeat skip XLA compilation. The controller (or a plain
# run) creates it; xdist workers and subprocesses inherit it through the environment.
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE = tempfile.mkdtemp(prefix="normjax-jax-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"  # train steps, not tiny ops
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import fcntl  # noqa: E402  (after the environment above, which must be set before JAX loads)
import pathlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402


def pytest_unconfigure(config):
  if "_RUN_CACHE" in globals():
    shutil.rmtree(_RUN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """Where the training tests build and cache their datasets (once per worker)."""
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> pathlib.Path:
  """A finished placement-study sweep at the ``ci`` scale: LLaMA pre/post/lns x 1-2 layers and a
  1-layer ViT, 6 steps each with statistics and checkpoints.

  Built once per test session: under xdist every worker shares the session's base directory and
  waits on a lock while the first one trains; the others find the runs finished and skip them."""
  from experiments import placement_study, sweep
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session directory above the per-worker ones
  out = root / "tiny_sweep"
  runs = placement_study.runs("ci", ("llama",), ("pre", "post", "lns"))
  runs += [r for r in placement_study.runs("ci", ("vit",), ("pre",)) if r.tags["depth"] == 1]
  with open(root / "tiny_sweep.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    sweep.run_all(runs, out, {"data.data_dir": str(root / "tiny_sweep_tfds"), "mesh.num_devices": 1})
  return out
