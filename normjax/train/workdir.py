"""The workdir: created or reused, checked writable, and held by one run at a time.

``claim(path)`` makes the directory (naming the path and the OS error when it cannot: a file in
the way, a read-only or full filesystem), takes an exclusive ``fcntl.flock`` on ``<workdir>/.lock``
(released by the kernel when the process ends, however it ends) and writes the holder's pid into
it, so a second run on the same workdir is refused with the pid of the first. A workdir the run
created is removed again if start-up fails before the first step, so a rejected run leaves nothing.

A run on several processes uses one workdir on a filesystem they all see: process 0 claims it and
writes a random token into ``<workdir>/.processes`` (``Workdir.token``); every other process
``join``s it, which reads the token back and refuses, naming the path and the host, when it is not
there (separate directories per host would otherwise hang in the first checkpoint save).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
import socket
import time
import uuid
from collections.abc import Iterator

LOCK = ".lock"
TOKEN = ".processes"


class WorkdirError(RuntimeError):
  """The workdir cannot be used; the message names the path and the reason."""


def describe(error: OSError) -> str:
  """An OS error as one short phrase: ``No space left on device (errno 28)``."""
  return f"{error.strerror or error} (errno {error.errno})" if error.errno else str(error)


def _megabytes(num_bytes: float) -> str:
  return f"{num_bytes / 2**20:.1f} MiB"


class Workdir:
  """A claimed workdir (``claim``); ``path`` is absolute."""

  def __init__(self, path: pathlib.Path, created: bool, lock_file: int | None):
    self.path, self.created, self._lock_file = path, created, lock_file  # no lock: ``join``
    self.started = False  # set when the first step runs: from then on the workdir is kept

  def token(self) -> str:
    """Writes a new random token for the other processes of this run to find (``join``)."""
    token = f"{uuid.uuid4().hex} {socket.gethostname()} {os.getpid()}"
    try:
      (self.path / TOKEN).write_text(token + "\n")
    except OSError as error:
      raise WorkdirError(f"workdir {self.path} is not writable: {describe(error)}") from None
    return token

  def require_free(self, num_bytes: int, what: str) -> None:
    """WorkdirError when the filesystem has less than ``num_bytes`` free (checked before compiling,
    so a run that could never save a checkpoint does not start)."""
    stat = os.statvfs(self.path)
    free = stat.f_bavail * stat.f_frsize
    if free < num_bytes:
      raise WorkdirError(f"workdir {self.path}: {_megabytes(free)} free on its filesystem, but "
                         f"{what} needs about {_megabytes(num_bytes)}; free space or use another workdir")

  def release(self) -> None:
    if self._lock_file is not None:
      os.close(self._lock_file)  # closing the descriptor drops the flock


def _make(path: pathlib.Path) -> bool:
  """Creates ``path`` (and parents); True when it did not exist."""
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"workdir {path} is a file, not a directory")
  existed = path.is_dir()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise WorkdirError(f"workdir {path} cannot be created: {describe(error)}") from None
  return not existed


def _lock(path: pathlib.Path) -> int:
  """The open, exclusively locked lock file, with this process's pid written into it."""
  lock_path = path / LOCK
  try:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as error:
    raise WorkdirError(f"workdir {path} is not writable: {describe(error)}") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.read(fd, 200).decode(errors="replace").split()
    os.close(fd)
    pid = holder[0] if holder else "unknown"
    raise WorkdirError(f"workdir {path} is in use by another run (pid {pid}"
                       f"{' on ' + holder[1] if len(holder) > 1 else ''}); wait for it to finish, "
                       "stop it, or use another workdir") from None
  try:
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
    os.fsync(fd)
  except OSError as error:
    os.close(fd)
    raise WorkdirError(f"workdir {path} is not writable: {describe(error)}") from None
  return fd


@contextlib.contextmanager
def claim(path: str | os.PathLike) -> Iterator[Workdir]:
  """The workdir, created if needed and locked for this run; on a failure before ``started`` is set,
  a workdir this call created is removed."""
  path = pathlib.Path(path).absolute()
  created = _make(path)
  try:
    workdir = Workdir(path, created, _lock(path))
  except BaseException:  # a WorkdirError, or a signal during start-up
    if created:
      shutil.rmtree(path, ignore_errors=True)
    raise
  try:
    yield workdir
  except BaseException:
    if created and not workdir.started:
      shutil.rmtree(path, ignore_errors=True)
    raise
  finally:
    workdir.release()


def join(path: str | os.PathLike, token: str, process: int) -> Workdir:
  """The workdir that process 0 claimed, as process ``process`` of the same run sees it;
  WorkdirError when ``<path>/.processes`` does not hold process 0's ``token`` (no shared directory)."""
  path = pathlib.Path(path).absolute()
  try:
    found = (path / TOKEN).read_text().strip()
    why = "" if found == token else f"{TOKEN} holds another run's token"
  except OSError as error:
    why = f"{TOKEN}: {describe(error)}"
  if why:
    host = token.split()[1] if len(token.split()) > 1 else "?"
    raise WorkdirError(
        f"workdir {path}: process {process} (host {socket.gethostname()}) does not find the token that "
        f"process 0 (host {host}) wrote into its workdir ({why}), so the processes do not share one "
        "directory; give every process the same --workdir on a filesystem all hosts mount (NFS, "
        "Lustre, a bucket mount)")
  return Workdir(path, created=False, lock_file=None)
