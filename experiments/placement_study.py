"""Placement x depth sweep for LLaMA (byte-level text) and ViT (local images).

  python -m experiments.placement_study --out runs/placement_study                # CPU "small" scale
  python -m experiments.placement_study --out runs/placement_study --scale paper  # GPU: 6..48 layers
  python -m experiments.summary runs/placement_study                               # the table

Placements: pre, post, peri, mix, lns, deepnorm, post_only, none (no block norms, final norm kept),
dyt (Pre placement with DyT in place of the norm) and peri_embed (Peri-LN with the embedding output
normalized too, which the paper leaves open). Every run is an ordinary training-loop workdir
with per-depth statistics every ``stats.every`` steps; the sweep skips finished runs and resumes the
interrupted one.
"""

from __future__ import annotations

from typing import Any

from experiments import sweep
from normjax import norms

PLACEMENTS = ("pre", "post", "peri", "mix", "lns", "deepnorm", "post_only", "none", "dyt", "peri_embed")
# scale: model -> (depths, d_model, heads, steps, batch, seq_len or 0, stats_every)
SCALES: dict[str, dict[str, tuple[Any, ...]]] = {
    "ci": {"llama": ((1, 2), 32, 2, 6, 8, 32, 3), "vit": ((1, 2), 32, 2, 6, 8, 0, 3)},
    "small": {"llama": ((2, 4, 8, 16), 64, 4, 300, 16, 64, 25),
              "vit": ((2, 4, 8), 64, 4, 300, 32, 0, 25)},
    "paper": {"llama": ((6, 12, 24, 48), 512, 8, 10_000, 256, 256, 250),
              "vit": ((6, 12, 24), 384, 6, 10_000, 256, 0, 250)},
}
CONFIGS = {"llama": "configs/llama.py:tiny", "vit": "configs/vit.py:tiny"}


def placement_overrides(placement: str, model: str, width: int) -> dict[str, Any]:
  """Config changes that make a placement what its paper ran (DyT: its LLM recipe in LLaMA at
  ``width``, the vision recipe's alpha_0 0.5 in the ViT)."""
  if placement == "dyt":
    changes = {"model.norm.kind": "dyt", "model.placement.kind": "pre"}
    if model == "llama":
      changes["model.embed_scale"] = True
      changes.update({f"model.norm.options.{key}": value
                      for key, value in norms.dyt_llm_options(width).items()})
    return changes
  if placement == "peri_embed":
    return {"model.placement.kind": "peri", "model.placement.embed_norm": True}
  changes = {"model.placement.kind": placement}
  if placement == "deepnorm":
    changes["model.init.scheme"] = "deepnorm"  # DeepNet's beta init belongs to the method
  return changes


def runs(scale: str = "small", models: tuple[str, ...] = ("llama", "vit"),
         placements: tuple[str, ...] = PLACEMENTS) -> list[sweep.Run]:
  sizes = sweep.pick_scale(SCALES, scale)
  result = []
  for model in models:
    depths, width, heads, steps, batch, seq_len, stats_every = sizes[model]
    base = {"model.d_model": width, "model.num_heads": heads, "train.steps": steps,
            "train.batch_size": batch, "optim.warmup_steps": max(1, steps // 10),
            "stats.every": stats_every, "train.eval_every": 0, "ckpt.every": max(steps // 2, 1)}
    if seq_len:
      base["data.seq_len"] = seq_len
    for placement in placements:
      for depth in depths:
        result.append(sweep.Run(
            name=f"{model}_{placement}_L{depth:02d}", config=CONFIGS[model],
            overrides={**base, "model.num_layers": depth, **placement_overrides(placement, model, width)},
            tags={"study": "placement", "model": model, "placement": placement, "depth": depth}))
  return result


def main() -> None:
  parser = sweep.arguments(__doc__)
  parser.add_argument("--models", default="llama,vit", help="comma-separated: llama, vit")
  parser.add_argument("--placements", default=",".join(PLACEMENTS))
  args = parser.parse_args()
  grid = runs(args.scale, tuple(args.models.split(",")), tuple(args.placements.split(",")))
  sweep.main(grid, args, {})


if __name__ == "__main__":
  main()
