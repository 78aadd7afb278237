"""Pre-LN vs Pre-RMSNorm vs Pre-CRMSNorm trained side by side (Jiang et al., NeurIPS 2023).

  python -m experiments.equivalence --out runs/equivalence

Four LLaMA runs on the same data order and seed:

  pre_ln          standard Pre-LN (LayerNorm with scale and bias)
  pre_rms         RMSNorm with scale and bias, zero-mean writers (``model.zero_mean_writers``)
  pre_rms_plain   RMSNorm without zero-mean writers: the control
  pre_crms        Compressed RMSNorm on the d-1 stored coordinates (its own fresh initialization)

The claim tested: with writers parameterized as ``W - mean_out(W)`` the residual stream has zero mean
for ANY parameters, so ``rms_norm == layer_norm`` and pre_rms computes the same function of the same
parameters as pre_ln (whose LayerNorm ignores the stream's mean anyway). Same function, same
gradients, so the loss curves coincide up to float32 rounding under any optimizer: the report gives the
largest relative difference. pre_rms_plain shows the centring is what makes it exact. pre_crms starts
from a different (compressed) initialization and follows Adam in another parameterization, so its
curve only matches statistically. The step-time ratios come from the logged tokens per second.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from experiments import depth_analysis, sweep
from normjax import convert
from normjax.train.step import task_loss
from normjax.train.writer import read_jsonl

SCALES = {  # d_model, layers, heads, steps, batch, seq_len
    "ci": (32, 2, 2, 6, 8, 32),
    "small": (128, 4, 4, 300, 16, 128),
    "paper": (768, 12, 12, 20_000, 512, 256),
}
VARIANTS: dict[str, dict[str, Any]] = {
    "pre_ln": {"model.norm.kind": "layer_norm"},
    "pre_rms": {"model.norm.kind": "rms_norm", "model.norm.options": {"use_bias": True},
                "model.zero_mean_writers": True},
    "pre_rms_plain": {"model.norm.kind": "rms_norm", "model.norm.options": {"use_bias": True}},
    "pre_crms": {"model.norm.kind": "crms_norm", "model.norm.options": {"use_bias": True},
                 "model.compressed": True},
}


def runs(scale: str = "small") -> list[sweep.Run]:
  width, layers, heads, steps, batch, seq_len = sweep.pick_scale(SCALES, scale)
  base = {"model.d_model": width, "model.num_layers": layers, "model.num_heads": heads,
          "train.steps": steps, "train.batch_size": batch, "data.seq_len": seq_len,
          "optim.warmup_steps": max(1, steps // 10), "train.log_every": 1, "stats.every": 0,
          "train.eval_every": 0, "ckpt.every": 0}
  return [sweep.Run(name, "configs/llama.py:tiny", {**base, **changes},
                    {"study": "equivalence", "model": "llama", "placement": "pre", "depth": layers,
                     "variant": name}) for name, changes in VARIANTS.items()]


def _curve(workdir: pathlib.Path, key: str) -> dict[int, float]:
  return {row["step"]: row[key] for row in read_jsonl(workdir / "metrics.jsonl") if key in row}


def compare(out: str | pathlib.Path, reference: str = "pre_ln") -> dict[str, dict[str, float]]:
  """Per variant vs ``reference``: largest and final relative loss difference, step-time ratio."""
  out = pathlib.Path(out)
  ref_loss = _curve(out / reference, "train/loss")
  ref_speed = np.median(list(_curve(out / reference, "train/tokens_per_second").values()))
  report = {}
  for name in VARIANTS:
    if not (out / name / sweep.RESULT).exists():
      continue
    loss = _curve(out / name, "train/loss")
    steps = sorted(set(loss) & set(ref_loss))
    rel = np.array([abs(loss[s] - ref_loss[s]) / abs(ref_loss[s]) for s in steps])
    speed = np.median(list(_curve(out / name, "train/tokens_per_second").values()))
    report[name] = {"max_rel_loss_diff": float(rel.max()), "final_rel_loss_diff": float(rel[-1]),
                    "first_step_over_1e-3": int(next((s for s, r in zip(steps, rel) if r > 1e-3), -1)),
                    "final_loss": loss[steps[-1]], "step_time_vs_ln": float(ref_speed / speed)}
  if (out / reference / sweep.RESULT).exists():
    report["converted"] = converted_losses(out / reference)
  (out / "equivalence.json").write_text(json.dumps(report, indent=1))
  return report


def converted_losses(workdir: pathlib.Path, num_batches: int = 4) -> dict[str, float]:
  """The paper's conversion applied to the TRAINED Pre-LN model: validation loss of the model, of
  ``convert.to_rms`` of it and of ``convert.to_crms`` of that (equal up to float32 rounding)."""
  config, steps, state = depth_analysis.restore(workdir)
  batch = depth_analysis.validation_batch(config, num_batches)
  ln = steps.model(state["params"], state["norm_state"])
  rms = convert.to_rms(ln)
  loss = lambda model: float(task_loss(model(batch["inputs"])[0], batch)[0])
  return {"pre_ln": loss(ln), "to_rms": loss(rms), "to_crms": loss(convert.to_crms(rms))}


def main() -> None:
  args = sweep.arguments(__doc__).parse_args()
  if not sweep.main(runs(args.scale), args, {}):
    return
  report = compare(args.out)
  print(f"converted after training (validation loss): {report.pop('converted', None)}")
  print(f"{'variant':14s} {'max rel diff':>12s} {'final rel':>10s} {'>1e-3 at':>9s} {'final loss':>10s} "
        f"{'time/LN':>8s}")
  for name, row in report.items():
    print(f"{name:14s} {row['max_rel_loss_diff']:12.2e} {row['final_rel_loss_diff']:10.2e} "
          f"{row['first_step_over_1e-3']:9d} {row['final_loss']:10.4f} {row['step_time_vs_ln']:8.3f}")


if __name__ == "__main__":
  main()
