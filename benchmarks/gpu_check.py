"""The whole GPU verification in one command, one markdown report.

On one H100/H200 with nothing prepared (the wheels it lacks travel along, ``benchmarks/gpu_wheels.sh``):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 -m benchmarks.gpu_check --out $OUT        # under 8 minutes

Steps, each a subprocess with its own time limit, its output kept in the report:

1. **kernel tests**, compiled (not interpreted): ``tests/test_kernels.py`` and
   ``tests/test_kernels_cuda.py`` (the CUDA lowering, mask and sm_90a spill checks);
2. **kernel benchmark**: ``benchmarks/kernels.py`` on bf16 16384x1024, 8192x4096, 4096x8192 and
   32768x2048 (copy ceiling, fraction of copy for fwd and fwd+bwd, xla vs pallas vs tokamax when
   importable), writing the measured ``auto_table.json`` (copied into the output folder);
3. **train step**: ``benchmarks/train_step.py`` on the 130m LLaMA in bfloat16 per norm
   implementation, xla, pallas and triton (MFU, statistics-step overhead; the dry run leaves out
   triton, which needs a GPU and jax-triton).

``--dry-run`` (CPU, in CI) runs the same steps with everything but the timing: the tests are
collected, not run (CI runs them anyway), the benchmark runs its CPU smoke shapes once, the train
step the tiny config for one step; the report says so. Targets (docs/kernels.md): forward >= 0.90
and forward+backward >= 0.85 of copy for D 1K-8K, never slower than XLA; training MFU >= 45 %,
statistics step < 3 %.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_IMPLS = ("xla", "pallas", "triton")


class Step(NamedTuple):
  title: str
  command: list[str]
  timeout_s: int


def steps(dry_run: bool, out: pathlib.Path) -> list[Step]:
  """The steps of a GPU run, or of a dry run (same scripts, no timing)."""
  py = sys.executable
  tests = [py, "-m", "pytest", "tests/test_kernels.py", "tests/test_kernels_cuda.py", "-q",
           "-p", "no:cacheprovider", "-m", "slow or not slow"]
  bench = [py, "-m", "benchmarks.kernels", "--markdown", "--json", str(out / "kernels.json")]
  plan = []
  if dry_run:
    plan.append(Step("kernel tests (collected only)", tests + ["--collect-only"], 300))
    plan.append(Step("kernel benchmark (one CPU smoke shape, one sample)",
                     bench + ["--shapes", "64x1000", "--repeats", "1", "--inner", "1"], 300))
  else:
    plan.append(Step("kernel tests (compiled)", tests + ["-n", "8"], 180))
    plan.append(Step("kernel benchmark", bench + ["--write-auto-table"], 180))
  config = "configs/llama.py:tiny" if dry_run else "configs/llama.py:130m"
  for impl in TRAIN_IMPLS[:2] if dry_run else TRAIN_IMPLS:
    command = [py, "benchmarks/train_step.py", f"--config={config},dtype=bfloat16,impl={impl}",
               f"--steps={1 if dry_run else 10}"]
    if dry_run:  # the smallest model that still runs every code path
      command += ["--config.model.num_layers=1", "--config.train.batch_size=2", "--config.data.seq_len=32",
                  "--config.mesh.num_devices=1"]
    plan.append(Step(f"train step, model.norm.impl={impl}", command, 300 if dry_run else 240))
  return plan


def run(step: Step) -> tuple[int | str, float, str]:
  """(exit code or "timeout", seconds, output) of one step."""
  env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1"}
  start = time.perf_counter()
  try:
    done = subprocess.run(step.command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=step.timeout_s)
    code, output = done.returncode, done.stdout + done.stderr
  except subprocess.TimeoutExpired as expired:
    code = "timeout"
    output = "".join(part.decode() if isinstance(part, bytes) else (part or "")
                     for part in (expired.stdout, expired.stderr))
  return code, time.perf_counter() - start, output


def _tail(text: str, lines: int = 60) -> str:
  kept = [line for line in text.splitlines() if "\r" not in line]  # drop progress bars
  return "\n".join(kept[-lines:])


def report(results: list[tuple[Step, int | str, float, str]], dry_run: bool, header: str) -> str:
  failed = [step.title for step, code, _, _ in results if code != 0]
  lines = [f"# GPU check{' (dry run: no timing)' if dry_run else ''}", "", header, "",
           f"**{'all steps passed' if not failed else 'failed: ' + ', '.join(failed)}**", "",
           "| step | exit | seconds |", "|---|---|---|"]
  lines += [f"| {step.title} | {code} | {seconds:.0f} |" for step, code, seconds, _ in results]
  for step, code, seconds, output in results:
    lines += ["", f"## {step.title}", "", f"`{' '.join(step.command[1:])}` (exit {code}, {seconds:.0f} s)",
              "", "```", _tail(output), "```"]
  return "\n".join(lines) + "\n"


def _header() -> str:
  import jax
  try:
    import triton
    triton_version = triton.__version__
  except ImportError:
    triton_version = "not installed"
  device = jax.devices()[0]
  return (f"{datetime.datetime.now():%Y-%m-%d %H:%M}; device {device.device_kind} ({jax.default_backend()}, "
          f"{jax.device_count()} devices); jax {jax.__version__}, triton {triton_version}, "
          f"python {sys.version.split()[0]}")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for report.md and the results")
  parser.add_argument("--dry-run", action="store_true", help="everything but the timing (CPU, CI)")
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  results = []
  for step in steps(args.dry_run, args.out.resolve()):
    print(f"[gpu_check] {step.title} ...", flush=True)
    code, seconds, output = run(step)
    print(f"[gpu_check] {step.title}: exit {code} in {seconds:.0f} s", flush=True)
    results.append((step, code, seconds, output))
  table = REPO / "pallas_kernels" / "auto_table.json"
  if not args.dry_run and table.exists():
    shutil.copy(table, args.out / "auto_table.json")
  (args.out / "report.md").write_text(report(results, args.dry_run, _header()))
  print(f"[gpu_check] wrote {args.out / 'report.md'}")
  return 0 if all(code == 0 for _, code, _, _ in results) else 1


if __name__ == "__main__":
  sys.exit(main())
