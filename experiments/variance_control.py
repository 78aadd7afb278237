"""Weight-space variance control (Owen et al., arXiv:2503.17500): baseline init vs LIR vs LIR + TVR.

  python -m experiments.variance_control --out runs/variance_control

LLaMA runs that differ only in initialization and rescaling:

  baseline        N(0, 0.02) everywhere
  lir             layer-index rescaling: block l's kernels get std 0.02 / sqrt(l)
  lir_tvr         LIR + target variance rescaling every 50 steps to sigma_t = 0.01
  lir_tvr_006     the paper's headline recipe: base std 0.006, LIR, TVR(0.01)

The report takes from each run's per-depth statistics the largest activation magnitude per layer
(``mlp/max_abs``: the residual stream after each block) and the std of each block kernel per layer
(``w_std/*``) over training, and writes ``variance_control.json``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from experiments import sweep
from normjax.train.writer import read_stats

SCALES = {  # d_model, layers, heads, steps, batch, seq_len, stats_every, tvr_every
    "ci": (32, 2, 2, 6, 8, 32, 3, 3),
    "small": (64, 8, 4, 400, 16, 64, 25, 50),
    "paper": (2048, 16, 32, 100_000, 512, 256, 1000, 50),
}
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "lir": {"model.init.scheme": "lir"},
    "lir_tvr": {"model.init.scheme": "lir", "tvr.enabled": True},
    "lir_tvr_006": {"model.init.scheme": "lir", "model.init.std": 0.006, "tvr.enabled": True},
}


def runs(scale: str = "small") -> list[sweep.Run]:
  width, layers, heads, steps, batch, seq_len, stats_every, tvr_every = sweep.pick_scale(SCALES, scale)
  base = {"model.d_model": width, "model.num_layers": layers, "model.num_heads": heads,
          "train.steps": steps, "train.batch_size": batch, "data.seq_len": seq_len,
          "optim.warmup_steps": max(1, steps // 10), "stats.every": stats_every,
          "tvr.every": tvr_every, "tvr.target_std": 0.01, "train.eval_every": 0,
          "ckpt.every": max(1, steps // 2)}
  return [sweep.Run(name, "configs/llama.py:tiny", {**base, **changes},
                    {"study": "variance_control", "model": "llama", "placement": "pre",
                     "depth": layers, "variant": name}) for name, changes in VARIANTS.items()]


def report(out: str | pathlib.Path) -> dict[str, dict[str, Any]]:
  """Per finished run: max |activation| per layer (first and last logged step), kernel std per layer."""
  out = pathlib.Path(out)
  result = {}
  for name in VARIANTS:
    workdir = out / name
    if not (workdir / sweep.RESULT).exists():
      continue
    stats = read_stats(workdir)
    max_abs = stats["mlp/max_abs"]  # [logged steps, L]
    w_std = {key[len("w_std/"):].replace("/", "."): value  # [logged steps, L]
             for key, value in sorted(stats.items()) if key.startswith("w_std/")}
    final = json.loads((workdir / sweep.RESULT).read_text())
    result[name] = {
        "steps": stats["steps"].tolist(),
        "max_abs_first": max_abs[0].tolist(), "max_abs_last": max_abs[-1].tolist(),
        "top_activation": float(np.max(max_abs[-1])),
        "w_std_last": {k: v[-1].tolist() for k, v in w_std.items()},
        "w_std_mean_last": float(np.mean([v[-1] for v in w_std.values()])),
        "train_loss": final.get("train_loss"), "eval_loss": final.get("eval_loss"),
        "diverged": final.get("diverged"),
    }
  (out / "variance_control.json").write_text(json.dumps(result, indent=1))
  return result


def main() -> None:
  args = sweep.arguments(__doc__).parse_args()
  if not sweep.main(runs(args.scale), args, {}):
    return
  print(f"{'variant':12s} {'top |act|':>10s} {'max|act| per layer (last)':40s} {'mean w std':>10s} "
        f"{'eval loss':>9s}")
  for name, row in report(args.out).items():
    per_layer = " ".join(f"{v:.2f}" for v in row["max_abs_last"])
    print(f"{name:12s} {row['top_activation']:10.3f} {per_layer:40s} {row['w_std_mean_last']:10.4f} "
          f"{row['eval_loss']:9.4f}")


if __name__ == "__main__":
  main()
