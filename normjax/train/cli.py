"""The command line of ``python -m normjax.train``: flags in, one line out for every failure.

    python -m normjax.train --config=configs/llama.py:tiny --workdir=runs/x \\
        [--config.<section>.<field>=<value> ...] [--allow_config_change]

``--config.<field>`` overrides are parsed here, not by absl's config flags, so a misspelled field
is one line naming the closest fields (``normjax.config.load``), and a norm kind's options
(``--config.model.norm.options.eps=1e-5``) are typed by that kind. Exit codes: 0 done, 1 stopped
(non-finite values, a failed save), 2 a bad config, flag or workdir, 128 + n on signal n.
"""

from __future__ import annotations

import argparse
import sys
from typing import NamedTuple

from absl import logging

from normjax import config as config_lib
from normjax.train import signals
from normjax.train.checkpoints import CheckpointError
from normjax.train.loop import NonFiniteLoss, train
from normjax.train.workdir import WorkdirError
from normjax.validation import ConfigError

PREFIX = "--config."


class Args(NamedTuple):
  config: str  # "file.py[:arg]"
  overrides: dict[str, str]  # dotted field -> text
  workdir: str
  allow_config_change: bool


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m normjax.train", allow_abbrev=False,
                                   epilog="Any config field: --config.<section>.<field>=<value>.")
  parser.add_argument("--config", required=True, help="config file and argument, e.g. configs/llama.py:tiny")
  parser.add_argument("--workdir", required=True, help="where checkpoints, metrics and statistics go")
  parser.add_argument("--allow_config_change", action="store_true",
                      help="resume a checkpoint trained with another config (recorded in the workdir)")
  return parser


def parse(argv: list[str]) -> Args:
  """The flags of ``argv`` (without the program name); ConfigError for an override that is not
  ``--config.<field>=<value>`` or ``--config.<field> <value>``."""
  known, rest = _parser().parse_known_args(argv)
  overrides: dict[str, str] = {}
  i = 0
  while i < len(rest):
    item = rest[i]
    if not item.startswith(PREFIX):
      raise ConfigError(f"unknown flag {item!r}; flags: --config, --workdir, --allow_config_change, "
                        f"{PREFIX}<field>=<value>")
    key, sep, value = item[len(PREFIX):].partition("=")
    if not sep:
      if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
        raise ConfigError(f"{item} has no value; write {item}=<value>")
      value, i = rest[i + 1], i + 1
    overrides[key] = value
    i += 1
  return Args(known.config, overrides, known.workdir, known.allow_config_change)


def main(argv: list[str]) -> int:
  """Runs the training loop from command-line flags; returns the exit code."""
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  try:
    args = parse(argv)
    config = config_lib.load(args.config, args.overrides)
    train(config, args.workdir, allow_config_change=args.allow_config_change)
  except signals.Interrupted as error:
    print(f"stopped: {error}", file=sys.stderr)
    return error.exit_code
  except (NonFiniteLoss, CheckpointError) as error:
    print(f"stopped: {error}", file=sys.stderr)
    return 1
  except ConfigError as error:
    print(f"config error: {error}", file=sys.stderr)
    return 2
  except WorkdirError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0
