"""Step-indexed batches over a random-access source: batch ``step`` needs nothing but ``step``.

Example index ``i = step * batch_size + j`` (j < batch_size) is read from epoch ``i // N`` at
position ``i % N`` of that epoch's permutation
``np.random.default_rng([shuffle_seed, epoch]).permutation(N)``; a resumed run therefore
continues exactly where it stopped, with no iterator state to checkpoint.

A *fetch* function maps example indices ``int64 [B]`` to the batch dict; the ones here read a
random-access source (``tfds`` ``ArrayRecordDataSource``: ``__getitems__(keys) -> list of dicts``).
"""

from __future__ import annotations

import concurrent.futures
import operator
import threading
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
    self._lock = threading.Lock()

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
    """Batch ``step``: text ``inputs``/``targets``/``segment_ids``/``positions``/``loss_mask`` int32
    [B, T] (``packed_batch``); images ``inputs`` f32 [B, H, W, C], ``labels`` int32 [B]. With
    ``rows`` (int [R], positions in the batch), only those rows ([R, ...]): what one process of
    several reads."""
    indices = self.indices(step)
    return self._fetch(indices if rows is None else indices[rows])

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:  # ``Prefetched`` reads batches from several threads
      if epoch not in self._permutations:
        if len(self._permutations) >= 3:  # the steps in flight touch at most a few epochs
          self._permutations.pop(min(self._permutations))
        rng = np.random.default_rng([self.shuffle_seed, epoch])
        self._permutations[epoch] = rng.permutation(self.num_examples)
      return self._permutations[epoch]


class Prefetched:
  """``batches.batch(step, rows)`` computed ``depth`` steps ahead on background threads, so reading
  the next batches overlaps the device's step. Batches are pure functions of the step, so this
  changes no value and needs no state: ``get(step)`` returns exactly ``batches.batch(step, rows)``.
  """

  def __init__(self, source: "StepIndexedBatches", rows: np.ndarray | None = None, depth: int = 4):
    self.source, self.rows, self.depth = source, rows, depth
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=depth, thread_name_prefix="batches")
    self.pending: dict[int, concurrent.futures.Future] = {}

  def get(self, step: int) -> Batch:
    for ahead in range(step, step + self.depth):
      if ahead not in self.pending:
        self.pending[ahead] = self.pool.submit(self.source.batch, ahead, self.rows)
    for stale in [s for s in self.pending if s < step]:  # a jump (resume, evaluation restart)
      self.pending.pop(stale).cancel()
    return self.pending.pop(step).result()

  def close(self) -> None:
    self.pool.shutdown(wait=False, cancel_futures=True)


def windows_per_chunk(seq_len: int) -> int:
  """How many disjoint ``seq_len + 1``-token windows one stored chunk holds."""
  return (corpus.CHUNK_LEN + 1) // (seq_len + 1)


PACKING = ("segment_ids", "positions")  # the batch keys of packed documents (the model's inputs)


def packing(batch: dict[str, Any]) -> dict[str, Any]:
  """The packed-document inputs of a batch (``segment_ids``, ``positions``), if it has them: the
  keyword arguments a decoder's forward takes besides ``inputs``."""
  return {key: batch[key] for key in PACKING if key in batch}


def packed_batch(windows: np.ndarray, eos: int, boundary_loss: bool = False) -> Batch:
  """``[B, T + 1]`` token windows of a packed stream (every document ends with ``eos``) -> the LM
  batch, ``int32 [B, T]`` each: ``inputs``, ``targets`` (the next token), ``segment_ids`` (1, 2,
  ... for the documents of the row, a new one after every EOS), ``positions`` (within the
  document, from 0 at its first token in the row) and ``loss_mask`` (1 where the target is in the
  input's document: padding, a run of EOS, never counts; with ``boundary_loss`` every target
  counts)."""
  windows = windows.astype(np.int32)
  ends = windows == eos
  segments = 1 + np.cumsum(ends, axis=1) - ends  # the EOS belongs to the document it ends
  starts = np.zeros_like(ends)
  starts[:, 0], starts[:, 1:] = True, ends[:, :-1]
  index = np.arange(windows.shape[1])
  positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  same = segments[:, 1:] == segments[:, :-1]
  return {"inputs": windows[:, :-1], "targets": windows[:, 1:],
          "segment_ids": segments[:, :-1].astype(np.int32), "positions": positions[:, :-1].astype(np.int32),
          "loss_mask": (np.ones_like(same) if boundary_loss else same).astype(np.int32)}


def chunk_windows(source: Sequence[Any], seq_len: int, eos: int, boundary_loss: bool = False) -> Fetch:
  """Fetch for packed text: window w is tokens ``[o, o + seq_len + 1)`` of chunk ``w // k``, with
  ``k = windows_per_chunk(seq_len)``, ``o = (w % k) * (seq_len + 1)``; N = ``len(source) * k``.
  Batches as ``packed_batch``."""
  per_chunk = windows_per_chunk(seq_len)
  columns = np.arange(seq_len + 1)

  def fetch(windows: np.ndarray) -> Batch:
    chunk, slot = np.divmod(windows, per_chunk)
    unique, inverse = np.unique(chunk, return_inverse=True)  # read each chunk once
    records = source.__getitems__(unique.tolist())
    data = np.stack([r["chunk"] for r in records])[inverse]
    offsets = slot * (seq_len + 1)
    return packed_batch(np.take_along_axis(data, offsets[:, None] + columns, axis=1), eos, boundary_loss)

  return fetch


def image_examples(source: Sequence[Any]) -> Fetch:
  """Fetch for ``image`` (uint8 [H, W, C]) and ``label`` features; pixels scaled to [0, 1]."""

  def fetch(indices: np.ndarray) -> Batch:
    records = source.__getitems__(indices.tolist())
    images = np.stack([r["image"] for r in records]).astype(np.float32) / 255.0
    return {"inputs": images, "labels": np.array([r["label"] for r in records], np.int32)}

  return fetch
