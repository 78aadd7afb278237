"""Packed-token throughput of the input pipeline: what the training loop reads per second.

    python benchmarks/loader.py                          # tiny_bpe: BPE-packed standard library
    python benchmarks/loader.py --config=configs/llama.py:tiny --batch_size=512 --seq_len=256

Opens (building if needed) the config's packed dataset and reads consecutive batches ``batch(step)``
of the real loop, side by side: one at a time in the caller (``direct``), and through the loop's
``data.Prefetched`` with 1, 2 and 4 background threads. Prints tokens per second and the ratio to
the target: 10x what the 130m config consumes on one H100 (about 450K tokens/s: 6 x 134M FLOPs per
token at about 40 % of the 989 TFLOP/s bf16 peak), so 4.5M tokens/s.
"""

from __future__ import annotations

import argparse
import time

from normjax import config as config_lib
from normjax import data

CONSUMED_130M_H100 = 450_000  # tokens/s the 130m config trains at on one H100
TARGET = 10 * CONSUMED_130M_H100


def tokens_per_second(read, steps: int, tokens_per_batch: int) -> float:
  read(0)  # opens files, first permutation
  start = time.perf_counter()
  for step in range(1, steps + 1):
    read(step)
  return steps * tokens_per_batch / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/llama.py:tiny_bpe")
  parser.add_argument("--batch_size", type=int, default=512, help="global batch (the 130m run's: 512)")
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--data_dir", default="")
  args = parser.parse_args()
  overrides = {"data.seq_len": args.seq_len}
  if args.data_dir:
    overrides["data.data_dir"] = args.data_dir
  config = config_lib.load(args.config, overrides)
  cfg = data.validate(config.data)
  print(f"source: {data.info(cfg)['source']}")
  batches = data.load(cfg, "train", args.batch_size)
  tokens = args.batch_size * args.seq_len
  print(f"batch {args.batch_size} x {args.seq_len} = {tokens} tokens, {args.steps} steps; "
        f"target {TARGET:,} tokens/s")
  results = {"direct": tokens_per_second(batches.batch, args.steps, tokens)}
  for depth in (1, 2, 4):
    feed = data.Prefetched(batches, depth=depth)
    results[f"prefetch {depth}"] = tokens_per_second(feed.get, args.steps, tokens)
    feed.close()
  for name, rate in results.items():
    print(f"{name:>12}: {rate:12,.0f} tokens/s  {rate / TARGET:5.2f}x target  "
          f"{rate / results['direct']:5.2f}x direct")


if __name__ == "__main__":
  main()
