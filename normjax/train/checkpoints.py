"""Checkpoints that are complete, good and the run's own, or refused with one message.

  checkpoints/<step>/          orbax: the train state and its metadata (the step, the full config)
  skipped_checkpoints/<step>/  a newer checkpoint that did not restore, moved aside (kept for you)

- **Saves** are asynchronous (orbax copies the state off the devices, then writes in a background
  thread). ``poll`` (every step) notices the first failed save (disk full, read-only) and raises
  ``CheckpointError`` naming the step, the path and the OS error; orbax's own error logs are
  silenced, so that is the only message. The partial folder is removed to free its space.
- **Good** means the next step was finite: a checkpoint is saved after its step's loss was checked,
  but it only counts once the step after it has also been checked (loss, gradient norm, updated
  parameters). ``discard`` removes a checkpoint whose next step was not finite; ``keep`` counts good
  checkpoints, and the newest one stays besides them until its next step is checked.
- **Restore** tries the newest checkpoint first and falls back to older ones, saying which it
  skipped and why (a truncated data file, a missing ``_METADATA`` or ``state/``). Before restoring,
  the saved config is compared with the new one (``normjax.config.resume_changes``): a difference
  is refused (``ResumeRefused``) unless the caller allows it.
- Temporary folders of a save that a kill interrupted are removed when the run starts.
- **Several processes** save and restore through orbax's multi-process support (each writes and
  reads its own shards). Folder operations of ours run on process 0 only, and every decision (which
  checkpoint restores, which ones to delete) is taken alike by all processes: retention runs only
  where every process has waited for the previous save (``save``, ``finish``), never on a timing.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import shutil
import sys
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from normjax import config as config_lib
from normjax.train import distributed
from normjax.train.workdir import describe
from normjax.validation import ConfigError

_ORBAX_DIR = os.path.dirname(ocp.__file__)
_FILTERED = ("absl", "asyncio")  # the loggers orbax's background errors reach
_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved, or none of the workdir's checkpoints restores."""


class ResumeRefused(ConfigError):
  """The workdir's checkpoint was trained with a different config."""


class Restored(NamedTuple):
  step: int
  state: Any
  changes: dict[str, tuple[Any, Any]]  # field -> (saved, new), allowed by the caller
  skipped: dict[int, str]  # step -> why it did not restore (moved to skipped_checkpoints/)


class _OrbaxErrors(logging.Filter):
  """Drops orbax's error logs (one per failed background thread, with tracebacks) and keeps the
  last exception, which ``Checkpoints`` reports once, in its own words."""

  def __init__(self) -> None:
    super().__init__()
    self.last: BaseException | None = None

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and record.pathname.startswith(_ORBAX_DIR):
      if record.exc_info and record.exc_info[1] is not None:
        self.last = record.exc_info[1]
      return False
    # asyncio's "exception was never retrieved" for the same failed write, when orbax's gathered
    # futures are collected with their error unread
    return not (record.name == "asyncio" and "never retrieved" in record.getMessage())


def _without_closed_loop_errors(previous: Any) -> Any:
  """An unraisable-exception hook that drops "Event loop is closed": when a save fails, the rest of
  tensorstore's writes complete into orbax's closed event loop and each would print a traceback,
  before and around the one message."""
  def hook(unraisable: Any) -> None:
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)
  return hook


def reason(error: BaseException | None) -> str:
  """An exception as one short line: the OS error when there is one (tensorstore reports it as
  ``os_error_code``), else the first line of the message."""
  for cause in _chain(error):
    if isinstance(cause, OSError) and cause.errno:
      return describe(cause)
    code = re.search(r"os_error_code='(\d+)'", str(cause))
    if code:
      return f"{os.strerror(int(code[1]))} (errno {code[1]})"
  if error is None:
    return "unknown error (the checkpoint folder was not written)"
  text = (str(error).strip().splitlines() or [""])[0]
  return f"{type(error).__name__}: {text[:300]}"


def _chain(error: BaseException | None) -> list[BaseException]:
  out = []
  while error is not None and error not in out:
    out.append(error)
    error = error.__cause__ or error.__context__
  return out


def _remove_unfinished(directory: pathlib.Path, step: int | None = None) -> list[str]:
  """Removes orbax temporary folders (of ``step``, or all): a save that did not complete."""
  if not directory.is_dir():
    return []
  removed = [p for p in directory.iterdir()
             if _TMP_MARK in p.name and (step is None or p.name.split(".")[0] == str(step))]
  for path in removed:
    shutil.rmtree(path, ignore_errors=True)
  return sorted(p.name for p in removed)


class Checkpoints:
  """The checkpoints of one workdir (see the module docstring)."""

  def __init__(self, workdir: pathlib.Path, keep: int):
    self.directory = workdir / "checkpoints"
    self.skipped_directory = workdir / "skipped_checkpoints"
    self.keep = keep
    self.removed_unfinished = distributed.on_primary(
        "remove-unfinished", lambda: _remove_unfinished(self.directory)) or []
    self._errors = _OrbaxErrors()
    for logger in _FILTERED:
      logging.getLogger(logger).addFilter(self._errors)
    self._unraisable_hook = sys.unraisablehook
    sys.unraisablehook = _without_closed_loop_errors(self._unraisable_hook)
    self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, enable_async_checkpointing=True))  # retention: ``_prune``
    self.unverified: int | None = None  # the newest checkpoint, until its next step is checked
    self.in_flight: int | None = None  # the step being written in the background
    self._failed = False

  def latest(self) -> int | None:
    return self.manager.latest_step()

  # ------------------------------------------------------------------ restore
  def restore(self, abstract_state: Any, config: Any, allow_changes: bool) -> Restored | None:
    """The newest checkpoint that restores into ``abstract_state`` (None when there is none)."""
    skipped: dict[int, str] = {}
    for step in sorted(self.manager.all_steps(), reverse=True):
      meta, why = self._read(f"meta-{step}", lambda: self.manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
      if why:
        skipped[step] = f"its metadata does not read ({why})"
        continue
      changes = config_lib.resume_changes(meta["config"], config)
      if changes and not allow_changes:
        raise ResumeRefused(_refusal(step, self.directory, changes))
      state, why = self._read(f"state-{step}", lambda: self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))["state"])
      if why:
        skipped[step] = why
        continue
      distributed.on_primary("set-aside", lambda: self._set_aside(skipped))
      if skipped:
        self.manager.reload()
      self.unverified = step
      return Restored(step, state, changes, skipped)
    if skipped:
      listed = "; ".join(f"step {s}: {why}" for s, why in skipped.items())
      raise CheckpointError(f"no checkpoint in {self.directory} restores ({listed}); move them away "
                            "to start afresh in this workdir")
    return None

  @staticmethod
  def _read(name: str, read: Any) -> tuple[Any, str | None]:
    """``read()`` and None, or None and why it failed (on any process: all skip it alike)."""
    try:
      value, why = read(), None
    except Exception as error:  # noqa: BLE001 - any failure to read makes the checkpoint unusable
      where = f" (process {jax.process_index()})" if jax.process_count() > 1 else ""
      value, why = None, reason(error) + where
    return value, distributed.first_reason(f"restore-{name}", why)

  def _set_aside(self, skipped: dict[int, str]) -> None:
    """Moves checkpoints that did not restore out of the way of the saves that will replace them."""
    for step in skipped:
      target = self.skipped_directory / str(step)
      suffix = 0
      while target.exists():
        suffix += 1
        target = self.skipped_directory / f"{step}.{suffix}"
      target.parent.mkdir(parents=True, exist_ok=True)
      os.replace(self.directory / str(step), target)

  # ------------------------------------------------------------------ save
  def save(self, step: int, state: Any, config_json: dict[str, Any]) -> None:
    """Starts writing checkpoint ``step`` (the previous save must have succeeded)."""
    if self.in_flight is not None:
      self._check_saved()
    self._prune()
    self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": step, "config": config_json})))
    self.in_flight, self.unverified = step, step

  def poll(self) -> None:
    """CheckpointError as soon as a background save has failed (cheap while it still runs)."""
    if self.in_flight is not None and not self.manager.is_saving_in_progress():
      self._check_saved()

  def _check_saved(self) -> None:
    step, self.in_flight = self.in_flight, None
    error = None
    try:
      self.manager.wait_until_finished()
    except Exception as raised:  # noqa: BLE001 - reported below, in one message
      error = raised
    if error is None and (self.directory / str(step)).is_dir():
      return
    self._failed = True
    _remove_unfinished(self.directory, step)  # frees the space the partial save took
    self.manager.reload()
    good = [s for s in self.manager.all_steps() if s != step]
    raise CheckpointError(
        f"saving the checkpoint of step {step} to {self.directory / str(step)} failed: "
        f"{reason(error or self._errors.last)}; training stopped. Newest complete checkpoint: "
        f"{f'step {max(good)}' if good else 'none'}")

  # ------------------------------------------------------------------ good checkpoints
  def checked(self, step: int) -> None:
    """Step ``step`` was finite, so the checkpoint before it (if any) is good (old ones are deleted
    at the next ``save`` or ``finish``)."""
    if self.unverified is not None and self.unverified < step:
      self.unverified = None

  def discard(self, step: int) -> int | None:
    """Step ``step`` was not finite: removes the checkpoint it started from (it would fail the same
    way) and returns it, or None when that step has no checkpoint."""
    if self.unverified != step - 1:
      return None
    if self.in_flight is not None:
      self._check_saved()
    self.manager.delete(step - 1)
    self.unverified = None
    return step - 1

  def _prune(self) -> None:
    """Deletes good checkpoints beyond the newest ``keep`` (no save in flight: see ``save``)."""
    good = sorted(s for s in self.manager.all_steps() if s != self.unverified)
    for step in good[:-self.keep]:
      self.manager.delete(step)

  def finish(self) -> None:
    """Waits for the last save and checks it; the last checkpoint counts as good (no next step)."""
    if self.in_flight is not None:
      self._check_saved()
    self.unverified = None
    self._prune()

  def close(self) -> None:
    """Releases orbax (never raises: a failure was reported by ``poll``/``finish`` already)."""
    try:
      self.manager.close()
    except Exception:  # noqa: BLE001, S110
      pass
    if not self._failed:  # after a failed save, stragglers may still log: keep them out
      for logger in _FILTERED:
        logging.getLogger(logger).removeFilter(self._errors)
      sys.unraisablehook = self._unraisable_hook


def _refusal(step: int, directory: pathlib.Path, changes: dict[str, tuple[Any, Any]]) -> str:
  listed = "\n".join(f"  {field}: {old!r} -> {new!r}" for field, (old, new) in changes.items())
  return (f"resume refused: checkpoint {step} in {directory} was trained with a different config:\n"
          f"{listed}\nUse a new workdir, or pass --allow_config_change "
          "(train(..., allow_config_change=True)) to resume anyway; the change is then recorded in "
          "config_changes.jsonl.")
