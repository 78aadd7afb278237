"""SIGTERM and SIGINT (Ctrl-C) as a request to stop, the same for both.

Before training starts there is nothing to save, so a signal stops the run at once with a message
(``Interrupted``). Once steps run, the handler only records the signal: the loop finishes the step
it is in, saves a checkpoint, then raises ``Interrupted``. A second signal while that save runs
stops at once (the half-written checkpoint is a temporary folder that the next start removes).

Standard library only: ``python -m normjax.train`` installs the handlers before it imports JAX, so
no signal during start-up goes unanswered.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
  """The run stopped on a signal; ``exit_code`` is 128 + the signal number (SIGINT 130, SIGTERM 143),
  so a scheduler sees that the run did not finish. A BaseException, like KeyboardInterrupt, so that
  no ``except Exception`` in library code on the way swallows it."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum
    self.exit_code = 128 + signum


def name(signum: int) -> str:
  return signal.Signals(signum).name


class StopRequest:
  """The process's stop handler; ``requested`` is the first signal received (or None)."""

  def __init__(self) -> None:
    self.requested: int | None = None
    self.training = False  # False: start-up, a signal raises at once

  def _handle(self, signum: int, frame: object) -> None:
    del frame
    if self.training and self.requested is None:
      self.requested = signum  # the loop saves after this step, then raises
      return
    self.requested = self.requested or signum  # kept, should the exception below be swallowed
    stage = "a second signal during the save" if self.training else "start-up: no step has run"
    raise Interrupted(signum, f"{name(signum)} during {stage}; stopped without saving (the run "
                              "resumes from its last complete checkpoint)")


_STOP = StopRequest()
_installed = False


def install() -> StopRequest:
  """Installs the handlers for the whole process (idempotent; the main thread only)."""
  global _installed
  if not _installed and threading.current_thread() is threading.main_thread():
    for signum in SIGNALS:
      signal.signal(signum, _STOP._handle)
    _installed = True
  return _STOP


@contextlib.contextmanager
def handled() -> Iterator[StopRequest]:
  """The stop handler for one run: installed on entry (unless it already is), in start-up mode;
  on exit the previous handlers come back and a pending request is cleared."""
  global _installed
  was_installed = _installed
  previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
  stop = install()
  stop.requested, stop.training = None, False
  try:
    yield stop
  finally:
    stop.requested, stop.training = None, False
    if not was_installed and _installed:
      for signum, handler in previous.items():
        signal.signal(signum, handler)
      _installed = False
