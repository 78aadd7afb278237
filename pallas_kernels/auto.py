"""``impl='auto'``: the implementation the benchmark measured fastest for this device, op and shape.

The table (``auto_table.json`` beside this file) is written by ``python -m benchmarks.kernels
--write-auto-table`` on a GPU. Entries are keyed by device kind, then ``op|dtype|D|fused``, and hold
the forward+backward times in milliseconds of every implementation measured at that width:

  {"NVIDIA H100 80GB HBM3": {"rms_norm|bfloat16|4096|add": {"xla": 0.41, "pallas": 0.22, ...}}}

``choose`` returns "pallas" only for an exact (device, op, dtype, D, fused) entry in which Pallas was
faster than XLA, so ``auto`` never picks a kernel measured slower than XLA; everything else (CPU, TPU,
unmeasured widths, float64) gets "xla".
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from pallas_kernels import _compat

TABLE_PATH = pathlib.Path(__file__).with_name("auto_table.json")
Table = Mapping[str, Mapping[str, Mapping[str, float]]]


def key(op: str, dtype: Any, width: int, fused: bool) -> str:
  return f"{op}|{jnp.dtype(dtype).name}|{width}|{'add' if fused else 'plain'}"


@functools.cache
def load_table(path: pathlib.Path = TABLE_PATH) -> Table:
  if not path.exists():
    return {}
  return json.loads(path.read_text())


def choose(op: str, shape: Sequence[int], dtype: Any, fused: bool, *, table: Table | None = None,
           device_kind: str | None = None) -> str:
  """"pallas" where the table shows it beating XLA for this device, op, dtype, width and fusion."""
  device_kind = device_kind or _compat.device_kind()
  if table is None:
    if _compat.backend() not in _compat.GPU_PLATFORMS:
      return "xla"
    table = load_table()
  times = table.get(device_kind, {}).get(key(op, dtype, shape[-1], fused), {})
  if "pallas" in times and "xla" in times and times["pallas"] < times["xla"]:
    return "pallas"
  return "xla"
