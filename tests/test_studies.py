"""The study runners at the ``ci`` scale: the sweep skips finished runs and records divergence, the
placement grid is what the papers ran, and the equivalence and variance-control claims hold."""

import json

import numpy as np
import pytest

from experiments import equivalence, placement_study, sweep, variance_control


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  return {"data.data_dir": str(tmp_path_factory.mktemp("tfds")), "mesh.num_devices": 1}


def test_placement_grid():
  grid = placement_study.runs("small")
  names = [run.name for run in grid]
  assert len(names) == len(set(names)) == 9 * 4 + 9 * 3
  deepnorm = next(r for r in grid if r.name == "llama_deepnorm_L08")
  assert deepnorm.overrides["model.init.scheme"] == "deepnorm"
  dyt = next(r for r in grid if r.name == "vit_dyt_L04")
  assert (dyt.overrides["model.norm.kind"], dyt.overrides["model.placement.kind"]) == ("dyt", "pre")
  with pytest.raises(ValueError, match=r"--scale='huge' is unknown; choose one of \['ci', 'small'"):
    placement_study.runs("huge")


def test_sweep_skips_finished_runs_and_records_divergence(tmp_path, shared):
  runs = [r for r in placement_study.runs("ci", ("llama",), ("pre",)) if r.tags["depth"] == 1]
  runs.append(sweep.Run("blows_up", runs[0].config, {**runs[0].overrides, "optim.lr": 1e6,
                                                     "optim.clip_norm": 0.0, "optim.warmup_steps": 0}))
  first = sweep.run_all(runs, tmp_path, shared)
  assert [r["diverged"] for r in first] == [False, True]
  assert "non-finite " in first[1]["message"] and " at step " in first[1]["message"]
  assert np.isfinite(first[0]["train_loss"]) and first[0]["tags"]["placement"] == "pre"
  assert sweep.run_all(runs, tmp_path, shared) == []  # both finished: nothing runs again
  with pytest.raises(ValueError, match="run names repeat"):
    sweep.run_all(runs + runs[:1], tmp_path, shared)


def test_pre_rms_with_zero_mean_writers_trains_exactly_like_pre_ln(tmp_path, shared):
  sweep.run_all(equivalence.runs("ci"), tmp_path, shared)
  report = equivalence.compare(tmp_path)
  assert report["pre_ln"]["max_rel_loss_diff"] == 0.0
  assert report["pre_rms"]["max_rel_loss_diff"] < 1e-5  # same function, same gradients
  assert report["pre_rms_plain"]["max_rel_loss_diff"] > 1e-4  # without centring they drift apart
  converted = report["converted"]  # the trained Pre-LN model converted: same validation loss
  assert abs(converted["to_rms"] - converted["pre_ln"]) < 1e-4 * converted["pre_ln"]
  assert abs(converted["to_crms"] - converted["pre_ln"]) < 1e-4 * converted["pre_ln"]
  assert json.loads((tmp_path / "equivalence.json").read_text()).keys() == report.keys()


def test_tvr_holds_the_weight_std_at_its_target(tmp_path, shared):
  sweep.run_all(variance_control.runs("ci"), tmp_path, shared)
  report = variance_control.report(tmp_path)
  assert set(report) == set(variance_control.VARIANTS)
  assert report["baseline"]["w_std_mean_last"] > 0.015  # N(0, 0.02), barely trained
  assert report["lir"]["w_std_mean_last"] < report["baseline"]["w_std_mean_last"]  # std / sqrt(l)
  for name in ("lir_tvr", "lir_tvr_006"):  # rescaled to sigma_t = 0.01 (within the 1.2 threshold)
    assert report[name]["w_std_mean_last"] < 0.012, (name, report[name]["w_std_mean_last"])
  assert len(report["baseline"]["max_abs_last"]) == 2
