"""Step-indexed batches over a random-access source: batch ``step`` needs nothing but ``step``.

Example index ``i = step * batch_size + j`` (j < batch_size) is read from epoch ``i // N`` at
position ``i % N`` of that epoch's permutation
``np.random.default_rng([shuffle_seed, epoch]).permutation(N)``; a resumed run therefore
continues exactly where it stopped, with no iterator state to checkpoint.

A *fetch* function maps example indices ``int64 [B]`` to the batch dict; the ones here read a
random-access source (``tfds`` ``ArrayRecordDataSource``: ``__getitems__(keys) -> list of dicts``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from normjax.data import corpus

Batch = dict[str, np.ndarray]
Fetch = Callable[[np.ndarray], Batch]


class StepIndexedBatches:
  """A deterministic, endless, reshuffled-every-epoch stream of batches, indexed by step.

  ``batch(step)`` depends only on (source, batch_size, shuffle_seed, step); two objects built from
  the same arguments, in any process, return identical batches.
  """

  def __init__(self, num_examples: int, batch_size: int, shuffle_seed: int, fetch: Fetch):
    if num_examples < 1:
      raise ValueError(f"num_examples={num_examples}: the split is empty")
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.shuffle_seed = shuffle_seed
    self._fetch = fetch
    self._permutations: dict[int, np.ndarray] = {}

  def indices(self, step: int) -> np.ndarray:
    """Example indices ``int64 [batch_size]`` of batch ``step``; a batch may straddle two epochs."""
    step = operator.index(step)  # numpy/jax integer scalars work, floats fail loudly
    if step < 0:
      raise ValueError(f"step={step} must be >= 0")
    index = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    epoch, position = np.divmod(index, self.num_examples)
    example = np.empty_like(index)
    for e in np.unique(epoch):
      mask = epoch == e
      example[mask] = self._permutation(int(e))[position[mask]]
    return example

  def batch(self, step: int, rows: np.ndarray | None = None) -> Batch:
    """Batch ``step``: text ``inputs``/``targets`` int32 [B, T]; images ``inputs`` f32 [B, H, W, C],
    ``labels`` int32 [B]. With ``rows`` (int [R], positions in the batch), only those rows
    ([R, ...]): what one process of several reads."""
    indices = self.indices(step)
    return self._fetch(indices if rows is None else indices[rows])

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      if len(self._permutations) >= 2:  # consecutive steps touch at most two epochs
        self._permutations.pop(min(self._permutations))
      rng = np.random.default_rng([self.shuffle_seed, epoch])
      self._permutations[epoch] = rng.permutation(self.num_examples)
    return self._permutations[epoch]


def windows_per_chunk(seq_len: int) -> int:
  """How many disjoint ``seq_len + 1``-byte windows one stored chunk holds."""
  return (corpus.CHUNK_LEN + 1) // (seq_len + 1)


def _lm_batch(sequences: np.ndarray) -> Batch:
  """``uint8 [B, T + 1]`` -> inputs and next-byte targets, ``int32 [B, T]`` each."""
  sequences = sequences.astype(np.int32)
  return {"inputs": sequences[:, :-1], "targets": sequences[:, 1:]}


def chunk_windows(source: Sequence[Any], seq_len: int) -> Fetch:
  """Fetch for built-in text: window w is bytes ``[o, o + seq_len + 1)`` of chunk ``w // k``, with
  ``k = windows_per_chunk(seq_len)``, ``o = (w % k) * (seq_len + 1)``; N = ``len(source) * k``."""
  per_chunk = windows_per_chunk(seq_len)
  columns = np.arange(seq_len + 1)

  def fetch(windows: np.ndarray) -> Batch:
    chunk, slot = np.divmod(windows, per_chunk)
    unique, inverse = np.unique(chunk, return_inverse=True)  # read each chunk once
    records = source.__getitems__(unique.tolist())
    data = np.stack([r["chunk"] for r in records])[inverse]
    offsets = slot * (seq_len + 1)
    return _lm_batch(np.take_along_axis(data, offsets[:, None] + columns, axis=1))

  return fetch


def text_examples(source: Sequence[Any], seq_len: int) -> Fetch:
  """Fetch for a prepared TFDS dataset with a ``text`` feature: one window per example, the UTF-8
  bytes truncated or padded with byte 0 to ``seq_len + 1``."""

  def fetch(indices: np.ndarray) -> Batch:
    sequences = np.zeros((len(indices), seq_len + 1), np.uint8)
    for row, record in zip(sequences, source.__getitems__(indices.tolist())):
      text = record["text"]
      data = np.frombuffer(text.encode() if isinstance(text, str) else text, np.uint8)[:seq_len + 1]
      row[:len(data)] = data
    return _lm_batch(sequences)

  return fetch


def image_examples(source: Sequence[Any]) -> Fetch:
  """Fetch for ``image`` (uint8 [H, W, C]) and ``label`` features; pixels scaled to [0, 1]."""

  def fetch(indices: np.ndarray) -> Batch:
    records = source.__getitems__(indices.tolist())
    images = np.stack([r["image"] for r in records]).astype(np.float32) / 255.0
    return {"inputs": images, "labels": np.array([r["label"] for r in records], np.int32)}

  return fetch
