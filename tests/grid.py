"""Test grids that CI covers pairwise: every case stays in the suite, the ones outside the pairwise
cover are marked ``slow`` (``python -m pytest -m slow`` runs them)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import pytest


def _pairs(case: Sequence[Any]) -> set[tuple[int, Any, int, Any]]:
  return {(i, a, j, b) for (i, a), (j, b) in itertools.combinations(enumerate(case), 2)}


def pairwise(cases: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
  """A subset of ``cases`` in which every pair of values of any two factors that occurs in
  ``cases`` occurs at least once (greedy: the case covering most uncovered pairs first, ties in
  order, so the subset is the same on every run)."""
  cases = [tuple(c) for c in cases]
  uncovered = set().union(*(_pairs(c) for c in cases))
  chosen = []
  while uncovered:
    best = max(cases, key=lambda c: len(_pairs(c) & uncovered))
    chosen.append(best)
    uncovered -= _pairs(best)
  return chosen


def params(cases: Sequence[Sequence[Any]], fast: Sequence[Sequence[Any]],
           ids: Callable[[Any], str] = str) -> list[Any]:
  """``pytest.param`` for every case; those not in ``fast`` carry the ``slow`` mark."""
  fast = {tuple(c) for c in fast}
  return [pytest.param(*c, id="-".join(ids(v) for v in c),
                       marks=() if tuple(c) in fast else pytest.mark.slow) for c in cases]
