"""Forward time of a Pre-LN model and its exact Pre-RMSNorm and Pre-CRMSNorm conversions, side by side.

    python benchmarks/conversion.py                 # LLaMA and ViT, default sizes
    python benchmarks/conversion.py --d_model=512 --repeats=50

Prints median milliseconds (after one warm-up call; the three variants alternate call by call) of
the three norms alone on ``[batch*seq, d]`` and of each jitted model forward, with each time as a
ratio of the LayerNorm one (below 1 = faster). The conversions are exact (tests check the
logits), so any difference is the cost of the norm itself: RMSNorm skips the mean, CRMSNorm also
moves d-1 instead of d features.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from normjax import convert, norms
from normjax.models import ModelConfig, NormConfig, build


def interleaved_ms(cases: list[tuple[Any, tuple[Any, ...]]], repeats: int) -> list[float]:
  """Median ms per case; the cases alternate call by call, so machine drift hits them equally."""
  for fn, args in cases:
    jax.block_until_ready(fn(*args))
  times = [[] for _ in cases]
  for _ in range(repeats):
    for i, (fn, args) in enumerate(cases):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[i].append(time.perf_counter() - start)
  return [1e3 * float(np.median(t)) for t in times]


def print_rows(group: str, labels: list[str], ms: list[float]) -> None:
  for label, value in zip(labels, ms):
    print(f"{group:<8}{label:<12}{value:>9.3f}{value / ms[0]:>8.3f}")


def norms_alone(rows: int, d: int, repeats: int) -> None:
  """The three norms as the converted models use them: LN with affine, RMS and CRMS without."""
  x = jax.random.normal(jax.random.key(0), (rows, d))
  xc = x[:, :-1] - x[:, -1:] / (d - 1)
  gain, bias = jnp.ones(d), jnp.zeros(d)
  labels = ["layer_norm", "rms_norm", "crms_norm"]
  cases = [(jax.jit(lambda x: norms.layer_norm(x, gain, bias)), (x,)), (jax.jit(norms.rms_norm), (x,)),
           (jax.jit(norms.crms_norm), (xc,))]
  print_rows("norm op", labels, interleaved_ms(cases, repeats))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--num_layers", type=int, default=4)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, d={args.d_model}, "
        f"L={args.num_layers}, batch {args.batch}")
  print(f"{'model':<8}{'norm':<12}{'ms':>9}{'vs LN':>8}")
  norms_alone(args.batch * args.seq, args.d_model, args.repeats)
  rng = np.random.default_rng(0)
  forward = nnx.jit(lambda m, x: m(x)[0])
  for name in ("llama", "vit"):
    cfg = ModelConfig(name=name, num_layers=args.num_layers, d_model=args.d_model, num_heads=4,
                      image_size=32, patch_size=2, channels=3, norm=NormConfig("layer_norm"))
    x = (jnp.asarray(rng.integers(0, 256, (args.batch, args.seq))) if name == "llama"
         else jnp.asarray(rng.normal(size=(args.batch, 32, 32, 3)), jnp.float32))
    ln = build(cfg)
    rms = convert.to_rms(ln)
    crms = convert.to_crms(rms)
    ms = interleaved_ms([(forward, (model, x)) for model in (ln, rms, crms)], args.repeats)
    print_rows(name, ["layer_norm", "rms_norm", "crms_norm"], ms)


if __name__ == "__main__":
  main()
