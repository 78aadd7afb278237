"""``benchmarks/gpu_check.py --dry-run``: the one-command GPU verification runs every step on CPU
(everything but the timing) and writes its report, so the script cannot rot between GPU runs."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_a_passing_report(tmp_path):
  result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = (tmp_path / "report.md").read_text()
  assert report.startswith("# GPU check (dry run: no timing)") and "**all steps passed**" in report
  for title in ("kernel tests (collected only)", "kernel benchmark", "train step, model.norm.impl=xla",
                "train step, model.norm.impl=pallas"):
    assert f"## {title}" in report
  assert "test_every_block_load_and_store_of_every_kernel_is_masked" in report  # the tests it would run
  rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
  assert {row["impl"] for row in rows} >= {"xla", "pallas"}
