"""The command line of ``python -m normjax.train``: flags in, one line out for every failure.

    python -m normjax.train --config=configs/llama.py:tiny --workdir=runs/x \\
        [--config.<section>.<field>=<value> ...] [--allow_config_change] \\
        [--coordinator_address=HOST:PORT --num_processes=N --process_id=I] [--heartbeat_timeout=S]

``--config.<field>`` overrides are parsed here, not by absl's config flags, so a misspelled field
is one line naming the closest fields (``normjax.config.load``), and a norm kind's options
(``--config.model.norm.options.eps=1e-5``) are typed by that kind. Exit codes: 0 done, 1 stopped
(non-finite values, a failed save), 2 a bad config, flag or workdir, 128 + n on signal n.

On several processes (``--coordinator_address`` ..., the ``NORMJAX_*`` variables, or a cluster
that JAX detects: ``distributed.initialize``) an error every process raised together is printed
by process 0 and all exit normally; a process that failed alone prints its error and exits at once
(``distributed.abandon``), and JAX's runtime stops the others within ``--heartbeat_timeout``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import NamedTuple

import jax
from absl import logging

from normjax import config as config_lib
from normjax.train import distributed, signals
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
  launch: dict[str, int | str | None]  # the keyword arguments of ``distributed.initialize``


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m normjax.train", allow_abbrev=False,
                                   epilog="Any config field: --config.<section>.<field>=<value>.")
  parser.add_argument("--config", required=True, help="config file and argument, e.g. configs/llama.py:tiny")
  parser.add_argument("--workdir", required=True, help="where checkpoints, metrics and statistics go")
  parser.add_argument("--allow_config_change", action="store_true",
                      help="resume a checkpoint trained with another config (recorded in the workdir)")
  group = parser.add_argument_group("several processes (else $NORMJAX_COORDINATOR_ADDRESS, "
                                    "$NORMJAX_NUM_PROCESSES, $NORMJAX_PROCESS_ID, or the cluster's)")
  group.add_argument("--coordinator_address", help="host:port of process 0, the same for every process")
  group.add_argument("--num_processes", type=int)
  group.add_argument("--process_id", type=int, help="0 .. num_processes - 1")
  group.add_argument("--heartbeat_timeout", type=int, default=100,
                     help="seconds after which the others stop when a process has died")
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
                        f"--coordinator_address, --num_processes, --process_id, --heartbeat_timeout, "
                        f"{PREFIX}<field>=<value>")
    key, sep, value = item[len(PREFIX):].partition("=")
    if not sep:
      if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
        raise ConfigError(f"{item} has no value; write {item}=<value>")
      value, i = rest[i + 1], i + 1
    overrides[key] = value
    i += 1
  launch = {"coordinator_address": known.coordinator_address, "num_processes": known.num_processes,
            "process_id": known.process_id, "heartbeat_timeout_s": known.heartbeat_timeout}
  return Args(known.config, overrides, known.workdir, known.allow_config_change, launch)


def main(argv: list[str]) -> int:
  """Runs the training loop from command-line flags; returns the exit code."""
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  try:
    args = parse(argv)
    distributed.initialize(**args.launch)  # before any JAX computation
    config = config_lib.load(args.config, args.overrides)
    train(config, args.workdir, allow_config_change=args.allow_config_change)
  except signals.Interrupted as error:
    return _failed(error, "stopped", error.exit_code)
  except (NonFiniteLoss, CheckpointError) as error:
    return _failed(error, "stopped", 1)
  except ConfigError as error:
    return _failed(error, "config error", 2)
  except (WorkdirError, distributed.DistributedError) as error:
    return _failed(error, "error", 2)
  except jax.errors.JaxRuntimeError as error:
    if not _several_processes():
      raise
    first = (str(error).strip().splitlines() or [""])[0]  # a collective that lost its peer
    return _failed(RuntimeError(f"a collective operation failed, most likely because another process "
                                f"of this run died (its output says why): {first}"), "stopped", 1)
  except Exception:
    if not _several_processes():
      raise
    traceback.print_exc()  # a bug: the traceback, then out without waiting for the others
    distributed.abandon(1)
  return 0


def _several_processes() -> bool:
  return jax.distributed.is_initialized() and jax.process_count() > 1


def _failed(error: BaseException, what: str, code: int) -> int:
  """Prints ``error`` once (process 0, or the process that alone raised it) and returns ``code``;
  a process that failed alone exits at once (``distributed.abandon``)."""
  alone = _several_processes() and not distributed.is_raised_everywhere(error)
  if alone or not _several_processes() or distributed.primary():
    prefix = f"process {jax.process_index()}: " if alone else ""
    print(f"{prefix}{what}: {error}", file=sys.stderr)
  if alone:
    distributed.abandon(code)
  return code
