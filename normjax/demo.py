"""Norm kinds inside a small Flax NNX model, trained side by side on real data.

    python -m normjax.demo                       # layer_norm, rms_norm, dyt, batch_norm, identity
    python -m normjax.demo --norms=rms,power_norm --steps=400

The data is scikit-learn's bundled handwritten digits (1797 real 8x8 images, no download). Each
image is read as a sequence of 8 row-tokens of 8 pixels; a learned position embedding, pre-norm
residual MLP blocks, a final norm, mean pooling and a linear head classify it. Every norm is a
``normjax.nn.nnx.Norm`` of the chosen kind, so this is also the smallest example of dropping the
norms into a model, stateful ones (batch_norm, power_norm) included. The full, config-driven
training loop is ``python -m normjax.train``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

from normjax import norms
from normjax.nn.nnx import Norm, NormState

DEFAULT_NORMS = "layer_norm,rms_norm,dyt,batch_norm,identity"


class Block(nnx.Module):
  """Pre-norm residual MLP: ``x + W2 gelu(W1 N(x))``; ``[B, T, d] -> [B, T, d]``."""

  def __init__(self, width: int, kind: str, *, rngs: nnx.Rngs):
    self.norm = Norm(kind, width, rngs=rngs)
    self.up = nnx.Linear(width, 2 * width, rngs=rngs)
    self.down = nnx.Linear(2 * width, width, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return x + self.down(jax.nn.gelu(self.up(self.norm(x, train=train))))


class DigitsNet(nnx.Module):
  """Row tokens ``[B, 8, 8]`` -> logits ``[B, 10]``."""

  def __init__(self, kind: str, width: int = 64, depth: int = 2, *, rngs: nnx.Rngs):
    self.embed = nnx.Linear(8, width, rngs=rngs)
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (8, width)))
    self.blocks = nnx.List([Block(width, kind, rngs=rngs) for _ in range(depth)])
    self.final_norm = Norm(kind, width, rngs=rngs)
    self.head = nnx.Linear(width, 10, rngs=rngs)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    h = self.embed(images) + self.position[...]
    for block in self.blocks:
      h = block(h, train)
    return self.head(self.final_norm(h, train=train).mean(axis=1))


def load_data(seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Digits scaled to [0, 1], split 80/20 with a fixed permutation."""
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)
  order = np.random.default_rng(seed).permutation(len(images))
  cut = int(0.8 * len(images))
  train, test = order[:cut], order[cut:]
  return (images[train], digits.target[train]), (images[test], digits.target[test])


def train_one(kind: str, steps: int, batch_size: int, lr: float, seed: int = 0) -> dict[str, float]:
  """Trains a DigitsNet with norm ``kind``; returns final train loss, test accuracy and seconds."""
  (x_train, y_train), (x_test, y_test) = load_data(seed)
  model = DigitsNet(kind, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.Param)

  # Differentiate the norm state too: PowerNorm's backward pass advances nu through it.
  wrt = nnx.DiffState(0, nnx.Any(nnx.Param, NormState))

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = nnx.value_and_grad(loss_fn, argnums=wrt)(model)
    optimizer.update(model, nnx.filter_state(grads, nnx.Param))
    norm_state = nnx.state(model, NormState)
    nnx.update(model, norms.update_backward_state(norm_state, nnx.filter_state(grads, NormState)))
    return loss

  start = time.perf_counter()
  order = np.random.default_rng(seed).integers(0, len(x_train), size=(steps, batch_size))
  for indices in order:
    loss = step(model, optimizer, x_train[indices], y_train[indices])
  loss = float(loss)
  predictions = jnp.argmax(nnx.jit(lambda m, x: m(x, train=False))(model, x_test), -1)
  return {"loss": loss, "accuracy": float(jnp.mean(predictions == y_test)),
          "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--norms", default=DEFAULT_NORMS,
                      help=f"comma-separated kinds from {norms.names()} or their aliases")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--lr", type=float, default=3e-3)
  args = parser.parse_args(argv)
  kinds = [norms.get(name).name for name in args.norms.split(",")]  # fail fast on a bad name
  print(f"digits, {args.steps} steps of batch {args.batch_size}, AdamW lr {args.lr}")
  print(f"{'norm':<20}{'train loss':>12}{'test acc':>10}{'seconds':>9}")
  for kind in kinds:
    result = train_one(kind, args.steps, args.batch_size, args.lr)
    print(f"{kind:<20}{result['loss']:>12.4f}{result['accuracy']:>10.3f}{result['seconds']:>9.1f}")


if __name__ == "__main__":
  main()
