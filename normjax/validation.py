"""The checks every layer of normjax shares: named choices, "did you mean" hints, strict text parsing.

A user's mistake in a config, a registry name or a command-line value raises ``ConfigError`` (a
``ValueError``) whose message names the field, the value and the valid choices. This module imports
nothing from normjax, so the norms, the models, the data pipeline and the loop can all use it.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


class ConfigError(ValueError):
  """A bad config value; the message names the field, the value and the valid choices."""


def closest(name: Any, choices: Sequence[str]) -> str | None:
  """The valid choice nearest to a mistyped ``name`` (for "did you mean" hints), or None."""
  close = difflib.get_close_matches(str(name), list(choices), n=1)
  return close[0] if close else None


def check_choice(value: Any, field: str, choices: Sequence[str]) -> Any:
  """``value`` if it is one of ``choices``; otherwise ConfigError naming the field and the choices."""
  if value not in choices:
    close = closest(value, [str(c) for c in choices])
    hint = f" (did you mean {close!r}?)" if close else ""
    raise ConfigError(f"{field}={value!r} is not valid; choose one of {list(choices)}{hint}")
  return value


def parse_value(field: str, text: str, kind: type) -> Any:
  """Text from a command line or a config argument as a value of ``kind`` (bool, int, float, str).

  Booleans are strict: ``true/false/1/0`` in any case; anything else is a ConfigError naming the
  field, never a silent False.
  """
  if kind is bool:
    if text.lower() not in BOOLEANS:
      raise ConfigError(f"{field}={text!r} is not a boolean; use one of {list(BOOLEANS)}")
    return BOOLEANS[text.lower()]
  if kind is str:
    return text
  try:
    return kind(text)
  except (TypeError, ValueError):
    raise ConfigError(f"{field}={text!r} is not a valid {kind.__name__}") from None
