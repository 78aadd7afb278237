"""The study runners at the ``ci`` scale: the sweep skips finished runs and records divergence, the
placement grid is what the papers ran, and the equivalence and variance-control claims hold."""

import json

import numpy as np
import pytest

from experiments import (equivalence, intervals, methods_study, placement_study, summary, sweep,
                         variance_control)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  return {"data.data_dir": str(tmp_path_factory.mktemp("tfds")), "mesh.num_devices": 1}


def test_placement_grid():
  grid = placement_study.runs("small")
  names = [run.name for run in grid]
  assert len(names) == len(set(names)) == 10 * 4 + 10 * 3
  peri_embed = next(r for r in grid if r.name == "vit_peri_embed_L02").overrides
  assert (peri_embed["model.placement.kind"], peri_embed["model.placement.embed_norm"]) == ("peri", True)
  deepnorm = next(r for r in grid if r.name == "llama_deepnorm_L08")
  assert deepnorm.overrides["model.init.scheme"] == "deepnorm"
  dyt = next(r for r in grid if r.name == "vit_dyt_L04")
  assert (dyt.overrides["model.norm.kind"], dyt.overrides["model.placement.kind"]) == ("dyt", "pre")
  llama_dyt = next(r for r in grid if r.name == "llama_dyt_L04").overrides  # the LLM recipe
  assert llama_dyt["model.embed_scale"] and llama_dyt["model.norm.options.alpha_attn"] == 1.0
  assert llama_dyt["model.norm.options.use_bias"] is False
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


def test_seeds_vary_init_and_data_order_and_keep_seed_zero_names():
  base = placement_study.runs("ci", ("vit",), ("pre",))[:1]
  runs = sweep.with_seeds(base, 3)
  assert [r.name for r in runs] == ["vit_pre_L01", "vit_pre_L01_s1", "vit_pre_L01_s2"]
  assert [(r.overrides["seed"], r.overrides["data.shuffle_seed"], r.tags["seed"]) for r in runs] == [
      (0, 0, 0), (1, 1, 1), (2, 2, 2)]
  with pytest.raises(ValueError, match="--seeds=0 must be at least 1"):
    sweep.with_seeds(base, 0)


def test_intervals_and_verdicts():
  """Mean, sample std and the t interval written out: n=3 has t_{0.975,2} = 4.303."""
  got = intervals.interval([1.0, 2.0, 3.0, float("nan")])
  assert (got["n"], got["mean"], got["std"]) == (3, 2.0, 1.0)
  assert got["ci95"] == pytest.approx(4.303 / np.sqrt(3))
  assert np.isnan(intervals.interval([1.0])["ci95"]) and intervals.t975(100) == 1.96

  def row(name, placement, loss):
    return {"name": name, "model": "vit", "placement": placement, "depth": 4, "diverged": False,
            **{m: float("nan") for m in intervals.METRICS}, "eval_loss": loss}

  rows = ([row(f"vit_pre_L04{s}", "pre", v) for s, v in zip(("", "_s1", "_s2"), (1.0, 1.01, 0.99))]
          + [row(f"vit_post_L04{s}", "post", v) for s, v in zip(("", "_s1", "_s2"), (2.0, 2.02, 1.98))]
          + [row(f"vit_peri_L04{s}", "peri", v) for s, v in zip(("", "_s1", "_s2"), (1.0, 1.3, 0.8))]
          + [row("vit_mix_L04", "mix", 0.5)])
  cells = intervals.cells(rows)
  assert [c["seeds"] for c in cells] == [3, 3, 3, 1]
  verdicts = {v["placement"]: v["verdict"] for v in intervals.compare(cells)}
  assert verdicts == {"post": "higher", "peri": "not resolved", "mix": "not resolved (1 seed)"}
  assert "1 ± 0.025" in intervals.markdown(cells)


def test_summary_writes_cells_over_seeds(tmp_path, shared):
  runs = sweep.with_seeds([r for r in placement_study.runs("ci", ("vit",), ("pre", "post"))
                           if r.tags["depth"] == 1], 2)
  sweep.run_all(runs, tmp_path, shared)
  summary.write(tmp_path)
  cells = (tmp_path / "cells.md").read_text()
  assert "| vit_pre_L01 | 2 | 0 |" in cells and "| vit | 1 | post |" in cells


def test_methods_study_grid_and_a_ci_run(tmp_path, shared):
  """Every method of the study is one run against its model's baseline, and each trains at the
  ci scale to a finite loss."""
  grid = methods_study.runs("small")
  assert [r.name for r in grid] == list(methods_study.variants(300))
  conda = next(r for r in grid if r.name == "llama_conda").overrides
  assert (conda["optim.name"], conda["optim.conda.update_proj_gap"]) == ("conda", 30)
  results = sweep.run_all(methods_study.runs("ci"), tmp_path, shared)
  assert len(results) == 9 and not any(r["diverged"] for r in results)
  assert all(np.isfinite(r["train_loss"]) for r in results)
  trainable = json.loads((tmp_path / "llama_norms_only" / "trainable.json").read_text())
  assert trainable["parameters"] < trainable["total"] / 50
