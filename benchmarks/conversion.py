"""Forward time of a Pre-LN model and its exact Pre-RMSNorm and Pre-CRMSNorm conversions, side by side.

    python benchmarks/conversion.py                 # LLaMA and ViT, default sizes
    python benchmarks/conversion.py --d_model=512 --repeats=50

Prints median milliseconds (after one warm-up call) of the three norms alone on ``[batch*seq, d]``
and of each jitted model forward, with each time as a ratio of the LayerNorm one (below 1 = faster). The conversions are exact (tests check the
logits), so any difference is the cost of the norm itself: RMSNorm skips the mean, CRMSNorm also
moves d-1 instead of d features.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from normjax import convert, norms
from normjax.models import ModelConfig, NormConfig, build


def median_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def norms_alone(rows: int, d: int, repeats: int) -> None:
  """The three norms as the converted models use them: LN with affine, RMS and CRMS without."""
  x = jax.random.normal(jax.random.key(0), (rows, d))
  xc = x[:, :-1] - x[:, -1:] / (d - 1)
  gain, bias = jnp.ones(d), jnp.zeros(d)
  cases = (("layer_norm", jax.jit(lambda x: norms.layer_norm(x, gain, bias)), x),
           ("rms_norm", jax.jit(norms.rms_norm), x), ("crms_norm", jax.jit(norms.crms_norm), xc))
  base = None
  for label, fn, arg in cases:
    ms = median_ms(fn, arg, repeats=repeats)
    base = base or ms
    print(f"{'norm op':<8}{label:<12}{ms:>9.3f}{ms / base:>8.3f}")


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
    base = None
    for label, model in (("layer_norm", ln), ("rms_norm", rms), ("crms_norm", crms)):
      ms = median_ms(forward, model, x, repeats=args.repeats)
      base = base or ms
      print(f"{name:<8}{label:<12}{ms:>9.2f}{ms / base:>8.3f}")


if __name__ == "__main__":
  main()
