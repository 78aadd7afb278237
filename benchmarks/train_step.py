"""Train-step throughput of a config, with and without per-depth statistics, side by side.

    python benchmarks/train_step.py --config=configs/llama.py:130m --config.model.dtype=bfloat16
    python benchmarks/train_step.py --config=configs/llama.py:tiny --steps=20

Builds the real train state and the two compiled steps of ``normjax.train`` (no workdir, synthetic
packed batches of the right shape, so it measures the step, not the input pipeline:
``benchmarks/loader.py`` does that) and prints compile
time, median step time, tokens (or images) per second, model FLOPs utilization (6N + 12 L d T per
token against the device's dense bf16 peak, when known) and the statistics step's cost relative to
the plain step.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from normjax import config as config_lib
from normjax import data
from normjax.data.batches import packed_batch
from normjax.train.loop import build_sharded

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps per variant (after one warm-up step)")

# dense bf16 peak FLOP/s by device kind (NVIDIA spec sheets); CPUs have no entry (MFU not shown)
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def synthetic_batch(config, model_cfg) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  b = config.train.batch_size
  if model_cfg.name == "llama":  # packed rows as the loop reads them: a document every 64 tokens
    tokens = rng.integers(1, model_cfg.vocab_size, (b, config.data.seq_len + 1), dtype=np.int32)
    tokens[:, 63::64] = 0
    return packed_batch(tokens, eos=0)
  shape = (b, model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
  return {"inputs": rng.random(shape, dtype=np.float32),
          "labels": rng.integers(0, model_cfg.num_classes, (b,), dtype=np.int32)}


def synthetic_data(config) -> data.DataConfig:
  """What the model is told of the data: bytes for LLaMA, 32x32x3 images in 10 classes for ViT."""
  if config.model.name == "llama":
    return data.DataConfig("synthetic", "", 0, "text", seq_len=config.data.seq_len, vocab_size=256)
  return data.DataConfig("synthetic", "", 0, "image", image_shape=(32, 32, 3), num_classes=10)


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  sizes = config_lib.validate(config, jax.device_count()).mesh
  model_cfg = config_lib.model_config(config, synthetic_data(config))
  sharded = build_sharded(config, model_cfg, sizes)
  state, compiled = sharded.state, sharded.compiled
  batch = jax.device_put(synthetic_batch(config, model_cfg), sharded.batch_sharding)
  num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  tokens = config.train.batch_size * (config.data.seq_len if model_cfg.name == "llama" else 1)
  seq = config.data.seq_len if model_cfg.name == "llama" else (model_cfg.image_size // model_cfg.patch_size) ** 2
  flops_per_item = (6 * num_params + 12 * model_cfg.num_layers * model_cfg.d_model * seq) * (
      1 if model_cfg.name == "llama" else seq)
  peak = PEAK_FLOPS.get(jax.devices()[0].device_kind)
  print(f"device {jax.devices()[0].device_kind} x{math.prod(sizes.values())}, jax {jax.__version__}, "
        f"{model_cfg.name} L={model_cfg.num_layers} d={model_cfg.d_model} params {num_params / 1e6:.1f}M "
        f"dtype {model_cfg.dtype}, batch {config.train.batch_size}")
  print(f"{'variant':<10}{'compile s':>10}{'step ms':>10}{'items/s':>12}{'MFU':>8}{'vs plain':>10}")
  base = None
  for label, collect in (("plain", False), ("stats", True)):
    start = time.perf_counter()
    lowered = compiled.train_step(collect).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics = lowered(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_STEPS.value):
      start = time.perf_counter()
      state, metrics = lowered(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    base = base or step_s
    mfu = f"{flops_per_item * tokens / step_s / peak:.1%}" if peak else "n/a"
    print(f"{label:<10}{compile_s:>10.2f}{1e3 * step_s:>10.2f}{tokens / step_s:>12.0f}{mfu:>8}"
          f"{step_s / base:>10.3f}")


if __name__ == "__main__":
  app.run(main)
