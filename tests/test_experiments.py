"""The sweep summary and the depth analysis: on the tiny finished sweep (values against the run's own
files) and on fabricated run directories with known variance growth and a diverged run."""

from __future__ import annotations

import csv
import json
import math
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import depth_analysis, summary
from normjax.train.writer import read_stats

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAN = float("nan")
EXPECTED = [("llama", p, d) for p in ("lns", "post", "pre") for d in (1, 2)] + [("vit", "pre", 1)]


def fake_run(sweep_dir: pathlib.Path, name: str, variances: list[float], *, diverged: bool = False,
             grads: tuple[float, float] = (4.0, 2.0)) -> pathlib.Path:
  """A run directory with result.json, metrics.jsonl and two stats rows; the last row has x_0..x_L
  variances ``variances`` (the first row is a decoy the summary must not read)."""
  workdir = sweep_dir / name
  workdir.mkdir(parents=True)
  depth = len(variances) - 1
  (workdir / "result.json").write_text(json.dumps({
      "name": name, "tags": {"model": "llama", "placement": name, "depth": depth},
      "diverged": diverged, "wall_seconds": 1.5}))
  losses = [5.0, 4.0, 3.0, 2.0, NAN if diverged else 1.0]
  rows = [{"step": step, "train/loss": loss} for step, loss in enumerate(losses, 1)]
  rows += [] if diverged else [{"step": 5, "eval/loss": 1.25, "eval/accuracy": 0.5}]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  decoy = {"step": 1, "embed/resid_var": 1.0, "mlp/resid_var": [1.0] * depth, "grad_norm": [1.0] * depth}
  last = {"step": 5, "embed/resid_var": variances[0], "mlp/resid_var": variances[1:],
          "grad_norm": np.linspace(*grads, depth).tolist()}
  (workdir / "stats.jsonl").write_text(json.dumps(decoy) + "\n" + json.dumps(last) + "\n")
  return workdir


def test_growth_fit_recovers_known_rates_and_survives_nan(tmp_path):
  layers = np.arange(6)
  fake_run(tmp_path, "exp", list(0.01 * np.exp(0.3 * layers)))
  fake_run(tmp_path, "power", [7.0] + list(2.0 * layers[1:] ** 1.7))  # x_0 is not part of the fit
  fake_run(tmp_path, "diverged", [1.0, 2.0, NAN, 4.0, 5.0, math.inf], diverged=True)
  rows = {row["name"]: row for row in summary.summarize(tmp_path)}
  assert rows["exp"]["var_growth_per_layer"] == pytest.approx(0.3, rel=1e-9)
  assert rows["power"]["var_growth_power"] == pytest.approx(1.7, rel=1e-9)
  assert rows["exp"]["var_growth_power"] != pytest.approx(0.3)  # the two fits differ
  assert rows["exp"]["var_ratio"] == pytest.approx(math.exp(0.3 * 4))  # block 5 / block 1
  assert rows["exp"]["var_first"] == pytest.approx(0.01 * math.exp(0.3))
  assert rows["exp"]["grad_ratio"] == 2.0
  assert rows["exp"]["train_loss"] == pytest.approx(2.0)  # mean of the last 3 of 5
  assert (rows["exp"]["eval_loss"], rows["exp"]["eval_accuracy"]) == (1.25, 0.5)
  assert math.isnan(rows["exp"]["removable_fraction"])  # no depth_analysis.json
  bad = rows["diverged"]
  assert bad["diverged"] is True and bad["depth"] == 5
  for key in ("train_loss", "eval_loss", "var_last", "var_ratio", "var_growth_per_layer",
              "var_growth_power"):
    assert math.isnan(bad[key]), key
  assert bad["var_first"] == 2.0
  csv_path, md_path = summary.write(tmp_path)
  with open(csv_path, newline="") as f:
    parsed = {row["name"]: row for row in csv.DictReader(f)}
  assert parsed["diverged"]["var_ratio"] == "" and parsed["diverged"]["diverged"] == "True"
  assert float(parsed["exp"]["var_growth_per_layer"]) == rows["exp"]["var_growth_per_layer"]
  assert "| power | llama | power | 5 |" in md_path.read_text()


def test_depth_analysis_cli_skips_unfinished_diverged_and_analyzed_runs(tmp_path):
  fake_run(tmp_path, "diverged", [1.0, NAN], diverged=True)
  fake_run(tmp_path, "analyzed", [1.0, 2.0])
  (tmp_path / "analyzed" / depth_analysis.ANALYSIS).write_text("{}")
  (tmp_path / "unfinished").mkdir()
  done = subprocess.run([sys.executable, "-m", "experiments.depth_analysis", str(tmp_path)],
                        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines() == ["analyzed: already analyzed, skipped",
                                      "diverged: diverged, skipped", "unfinished: not finished, skipped"]


@pytest.mark.xdist_group("tiny_sweep")  # with the sweep\'s builder (conftest)
def test_summary_of_the_tiny_sweep_matches_the_run_files(tiny_sweep):
  rows = summary.summarize(tiny_sweep)
  assert [(r["model"], r["placement"], r["depth"]) for r in rows] == EXPECTED
  for row in rows:
    stats = read_stats(tiny_sweep / row["name"])
    resid = stats["mlp/resid_var"][-1]  # [L] at the last logged step
    grads = stats["grad_norm"][-1]
    assert len(resid) == row["depth"] and not row["diverged"]
    assert row["var_ratio"] == pytest.approx(resid[-1] / resid[0], rel=1e-6)
    assert row["var_last"] == pytest.approx(resid[-1], rel=1e-6)
    assert row["grad_ratio"] == pytest.approx(grads[0] / grads[-1], rel=1e-6)
    result = json.loads((tiny_sweep / row["name"] / "result.json").read_text())
    assert row["eval_loss"] == pytest.approx(result["eval_loss"])
    for key in ("train_loss", "eval_loss", "wall_seconds"):
      assert math.isfinite(row[key]), (row["name"], key)
    for key in ("var_growth_per_layer", "var_growth_power"):  # a fit needs two blocks
      assert math.isfinite(row[key]) == (row["depth"] >= 2), (row["name"], key)
    assert math.isfinite(row["eval_accuracy"]) == (row["model"] == "vit")


@pytest.mark.xdist_group("tiny_sweep")  # with the sweep\'s builder (conftest)
def test_summary_files_and_cli(tiny_sweep):
  rows = summary.summarize(tiny_sweep)
  csv_path, md_path = summary.write(tiny_sweep)
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    parsed = list(reader)
  assert tuple(reader.fieldnames) == summary.COLUMNS
  assert [r["name"] for r in parsed] == [r["name"] for r in rows]
  for got, row in zip(parsed, rows, strict=True):
    assert float(got["var_ratio"]) == row["var_ratio"] and int(got["depth"]) == row["depth"]
  lines = md_path.read_text().splitlines()
  assert len(lines) == 2 + len(rows)
  assert all(line.count("|") == len(summary.COLUMNS) + 1 for line in lines)
  done = subprocess.run([sys.executable, "-m", "experiments.summary", str(tiny_sweep)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines() == lines


@pytest.mark.xdist_group("tiny_sweep")  # with the sweep\'s builder (conftest)
def test_depth_analysis_of_a_two_layer_run(tiny_sweep, tmp_path):
  name = "llama_pre_L02"
  workdir = shutil.copytree(tiny_sweep / name, tmp_path / name)  # the shared sweep stays untouched
  result = depth_analysis.analyze(workdir, num_batches=4, threshold=0.05)
  assert json.loads((workdir / depth_analysis.ANALYSIS).read_text()) == result
  full, removed = result["full_loss"], np.asarray(result["removed_loss"])
  assert removed.shape == (2,) and np.all(np.isfinite(removed))
  # train.eval_steps is 4: the same batches as the loop's final evaluation of the same params
  assert full == pytest.approx(json.loads((workdir / "result.json").read_text())["eval_loss"], rel=1e-5)
  np.testing.assert_allclose(result["loss_increase"], removed - full, rtol=1e-6)
  relative = (removed - full) / full
  np.testing.assert_allclose(result["relative_increase"], relative, rtol=1e-6)
  assert result["removable_fraction"] == np.mean(relative < 0.05)
  angular = read_stats(workdir)["angular_distance"][-1]  # [L+1, L+1]
  got = np.asarray(result["angular_distance"], np.float64)  # null -> NaN
  np.testing.assert_allclose(got, angular, rtol=1e-6)
  assert np.isnan(got[1, 2]) and got[0, 2] > 0
  np.testing.assert_allclose(result["angular_distance_next"], angular[:-1, 1], rtol=1e-6)
  row = summary.summarize(tmp_path)[0]
  assert row["removable_fraction"] == result["removable_fraction"]
