"""The seed methods beyond placements, each once against its baseline, where its paper ran it.

  python -m experiments.methods_study --out runs/methods_study          # CPU "small" scale
  python -m experiments.summary runs/methods_study                       # the table

Optimizers and norm-only training on LLaMA (byte-level text, Pre-RMSNorm), norm kinds and
reparametrizations on the ViT (8x8 digits, Pre-LN):

  llama_adamw                   the baseline
  llama_adamp                   AdamP (arXiv:2006.08217)
  llama_conda                   Conda (arXiv:2509.24218), basis refreshed every tenth of the run
  llama_norms_only              only the norms' gains train (BatchNorm-only / LN tuning, arXiv:2003.00152)
  vit_layer_norm                the baseline
  vit_prepbn                    PRepBN (arXiv:2405.11582): LayerNorm for a tenth of the run, blended
                                into RepBN over the next half, eta starting at 0
  vit_unified_norm              Unified Normalization (arXiv:2208.01313) with the outlier filter (its
                                vision setting), warmup a tenth of the run, r held for a fifth
  vit_sigma_reparam_ln          sigmaReparam on every dense layer with the LayerNorms kept
  vit_sigma_reparam_no_norm     sigmaReparam with every norm removed (the paper's ViT recipe)

Each run is an ordinary training-loop workdir; ``--seeds N`` repeats every run under N seeds, and
``experiments.summary`` gives the cells with intervals.
"""

from __future__ import annotations

from typing import Any

from experiments import sweep

# scale: model -> (layers, d_model, heads, steps, batch, seq_len or 0, stats_every)
SCALES: dict[str, dict[str, tuple[int, ...]]] = {
    "ci": {"llama": (2, 32, 2, 6, 8, 32, 3), "vit": (2, 32, 2, 6, 8, 0, 3)},
    "small": {"llama": (8, 64, 4, 300, 16, 64, 25), "vit": (8, 64, 4, 300, 32, 0, 25)},
    "paper": {"llama": (12, 768, 12, 20_000, 256, 256, 500), "vit": (12, 384, 6, 20_000, 256, 0, 500)},
}
CONFIGS = {"llama": "configs/llama.py:tiny", "vit": "configs/vit.py:tiny"}


def variants(steps: int) -> dict[str, tuple[str, dict[str, Any]]]:
  """name -> (model, config changes) for a run of ``steps`` steps."""
  return {
      "llama_adamw": ("llama", {}),
      "llama_adamp": ("llama", {"optim.name": "adamp"}),
      "llama_conda": ("llama", {"optim.name": "conda", "optim.conda.update_proj_gap": max(1, steps // 10)}),
      "llama_norms_only": ("llama", {"train.trainable": "norms"}),
      "vit_layer_norm": ("vit", {}),
      "vit_prepbn": ("vit", {"model.norm.kind": "prepbn", "model.norm.options.eta_init": 0.0,
                             "model.norm.options.warmup_steps": max(1, steps // 10),
                             "model.norm.options.decay_steps": max(1, steps // 2)}),
      "vit_unified_norm": ("vit", {"model.norm.kind": "unified_norm",
                                   "model.norm.options.outlier_filtration": True,
                                   "model.norm.options.warmup_steps": max(1, steps // 10),
                                   "model.norm.options.hold_steps": max(1, steps // 5)}),
      "vit_sigma_reparam_ln": ("vit", {"model.reparam": "sigma"}),
      "vit_sigma_reparam_no_norm": ("vit", {"model.reparam": "sigma", "model.placement.kind": "none",
                                            "model.placement.final_norm": False}),
  }


def runs(scale: str = "small") -> list[sweep.Run]:
  sizes = sweep.pick_scale(SCALES, scale)
  result = []
  for name, (model, changes) in variants(sizes["llama"][3]).items():
    layers, width, heads, steps, batch, seq_len, stats_every = sizes[model]
    base = {"model.num_layers": layers, "model.d_model": width, "model.num_heads": heads,
            "train.steps": steps, "train.batch_size": batch, "optim.warmup_steps": max(1, steps // 10),
            "stats.every": stats_every, "train.eval_every": 0, "ckpt.every": max(steps // 2, 1)}
    if seq_len:
      base["data.seq_len"] = seq_len
    result.append(sweep.Run(name=name, config=CONFIGS[model], overrides={**base, **changes},
                            tags={"study": "methods", "model": model, "placement": name.split("_", 1)[1],
                                  "depth": layers}))
  return result


def main() -> None:
  args = sweep.arguments(__doc__).parse_args()
  sweep.main(runs(args.scale), args, {})


if __name__ == "__main__":
  main()
