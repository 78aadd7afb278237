"""One process or many: ``jax.distributed`` start-up, and what the processes of one run agree on.

A run on N processes is N copies of one program (JAX's multi-controller model): each process drives
its own devices, and every collective (a train step, an evaluation, a checkpoint save) must be
entered by all of them at the same step. So anything that can turn out differently on one process
(a file operation, a signal, a failed check) is decided once and shared:

- ``on_primary(name, fn)``: ``fn`` runs on process 0 only (it owns the workdir's files and builds
  the datasets); the others wait for it, and its error is raised on every process.
- ``everywhere(name, fn)``: ``fn`` runs on every process; if it fails on any, every process raises
  that error (the lowest failing process's). ``first_reason`` shares a decision the same way
  (a checkpoint that does not restore on one process is skipped by all), ``share`` a value.
- ``StopVote``: each step the processes all-reduce their pending signal; all read the result one
  step later, so they save at the same step without waiting on the device.
- ``abandon(code)``: a process that failed alone exits without JAX's shutdown barrier. The others
  are then stopped by JAX's runtime within the heartbeat timeout (``Terminating process because the
  JAX distributed service detected fatal errors ... tasks are unhealthy``), instead of waiting.

An error raised on every process together is marked (``raised_everywhere``), so the command line
exits normally on all of them. With one process every helper is the plain call.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from normjax.validation import ConfigError

T = TypeVar("T")
ENV = {"coordinator_address": "NORMJAX_COORDINATOR_ADDRESS", "num_processes": "NORMJAX_NUM_PROCESSES",
       "process_id": "NORMJAX_PROCESS_ID"}
# Start-up waits on process 0 (a dataset build can take minutes); a dead process 0 is noticed
# sooner, by the heartbeat.
WAIT_MS = 3600 * 1000
_EVERYWHERE = "_normjax_raised_everywhere"
_run = 0  # ``begin_run`` counts the runs of this program: each has its own keys in the store


class DistributedError(RuntimeError):
  """``jax.distributed`` could not start, or another process failed during start-up."""


def _launch_values(given: dict[str, Any]) -> dict[str, Any]:
  """Flags first, then ``NORMJAX_*`` environment variables; all three or none."""
  values = {key: given.get(key) if given.get(key) is not None else os.environ.get(env)
            for key, env in ENV.items()}
  missing = [key for key, value in values.items() if value in (None, "")]
  if len(missing) == len(values):
    return {}
  if missing:
    raise ConfigError(f"multi-process launch: {', '.join('--' + k for k in missing)} not set (flag, or "
                      f"{', '.join(ENV[k] for k in missing)}); give all of --coordinator_address, "
                      "--num_processes and --process_id, or none")
  for key in ("num_processes", "process_id"):
    try:
      values[key] = int(values[key])
    except ValueError:
      raise ConfigError(f"--{key}={values[key]!r} is not an int") from None
  if values["num_processes"] < 1 or not 0 <= values["process_id"] < values["num_processes"]:
    raise ConfigError(f"--process_id={values['process_id']} must be in [0, --num_processes="
                      f"{values['num_processes']})")
  if ":" not in str(values["coordinator_address"]):
    raise ConfigError(f"--coordinator_address={values['coordinator_address']!r} must be host:port")
  return values


def _detected_cluster() -> str | None:
  """The cluster manager JAX's own detection finds running this as one of several processes
  (SLURM, Open MPI, Cloud TPU, GKE, Kubernetes), or None."""
  from jax._src import clusters  # jax.distributed.initialize() reads the same, privately
  for env in clusters.ClusterEnv._cluster_types:  # noqa: SLF001
    if not env.opt_in_only_method and env.is_env_present() and env.get_process_count() > 1:
      return env.__name__
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: int = 100) -> str:
  """Starts ``jax.distributed`` before any JAX computation, from the arguments, else the
  ``NORMJAX_*`` environment variables, else JAX's cluster detection; one process (nothing given,
  no cluster) changes nothing. Already initialized (a user's own launcher): kept. Returns a
  one-line description of what it did."""
  if jax.distributed.is_initialized():
    return f"jax.distributed already initialized: process {jax.process_index()} of {jax.process_count()}"
  values = _launch_values({"coordinator_address": coordinator_address, "num_processes": num_processes,
                           "process_id": process_id})
  cluster = None if values else _detected_cluster()
  if (not values and cluster is None) or values.get("num_processes") == 1:
    return "single process"
  # our signal handlers decide when to save (``StopVote``); JAX's preemption notifier would take
  # SIGTERM from them
  jax.config.update("jax_enable_preemption_service", False)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU runs: collectives across hosts
  try:
    jax.distributed.initialize(**values, heartbeat_timeout_seconds=heartbeat_timeout_s)
  except (RuntimeError, ValueError) as error:  # jaxlib raises XlaRuntimeError (a RuntimeError)
    where = f"coordinator {values['coordinator_address']}" if values else f"detected by {cluster}"
    first = (str(error).strip().splitlines() or [""])[0]
    raise DistributedError(f"jax.distributed did not start ({where}): {first}") from None
  how = "flags/environment" if values else cluster
  return f"process {jax.process_index()} of {jax.process_count()} (jax.distributed from {how})"


def primary() -> bool:
  """Whether this is process 0: the one that writes files and prints."""
  return jax.process_index() == 0


def _client() -> Any:
  from jax._src import distributed  # the coordination service's key-value store and barriers
  return distributed.global_state.client


def raised_everywhere(error: BaseException) -> BaseException:
  """Marks ``error`` as raised by every process at the same point (so they all exit normally)."""
  setattr(error, _EVERYWHERE, True)
  return error


def is_raised_everywhere(error: BaseException) -> bool:
  return jax.process_count() == 1 or getattr(error, _EVERYWHERE, False)


def _encode(error: BaseException) -> str:
  kind = type(error)
  return json.dumps({"module": kind.__module__, "type": kind.__qualname__, "message": str(error)})


def _decode(text: str, name: str, process: int) -> BaseException:
  """The error another process raised, as the same class when it takes one message."""
  record = json.loads(text)
  try:
    kind = getattr(importlib.import_module(record["module"]), record["type"])
    error = kind(record["message"]) if issubclass(kind, Exception) else None
  except Exception:  # noqa: BLE001 - any class we cannot rebuild is reported as text
    error = None
  if error is None:
    error = DistributedError(f"process {process} failed during {name}: {record['type']}: "
                             f"{record['message']}")
  return raised_everywhere(error)


def begin_run() -> None:
  """Starts the keys of a new run (``train`` calls it first), so that one program may train several
  runs in turn (a sweep) on the same processes."""
  global _run
  _run += 1


def _key(name: str, process: int) -> str:
  return f"normjax/run{_run}/{name}/{process}"


def _gather(name: str, payload: str) -> list[str]:
  """Every process's ``payload`` for ``name`` (a name unique within the run), in process order."""
  client, me = _client(), jax.process_index()
  client.key_value_set(_key(name, me), payload)
  return [payload if process == me else client.blocking_key_value_get(_key(name, process), WAIT_MS)
          for process in range(jax.process_count())]


def share(name: str, value: str | None) -> str:
  """Process 0's ``value`` on every process (the others' ``value`` is not used)."""
  if jax.process_count() == 1:
    return value or ""
  if primary():
    _client().key_value_set(_key(name, 0), value or "")
    return value or ""
  return _client().blocking_key_value_get(_key(name, 0), WAIT_MS)


def on_primary(name: str, fn: Callable[[], T]) -> T | None:
  """``fn()`` on process 0 (its value there, None elsewhere); the others wait until it is done and
  raise its error, if any. ``name`` must be unique within the run."""
  if jax.process_count() == 1:
    return fn()
  value, error = None, None
  if primary():
    try:
      value = fn()
    except BaseException as raised:  # a signal too: the others must not wait for the hour
      error = raised
  outcome = share(f"on_primary/{name}", None if error is None else _encode(error))
  if error is not None:
    raise raised_everywhere(error)
  if outcome:
    raise _decode(outcome, name, 0)
  return value


def everywhere(name: str, fn: Callable[[], T]) -> T:
  """``fn()`` on every process; if it raised on any, every process raises the lowest failing
  process's error. ``name`` must be unique within the run."""
  if jax.process_count() == 1:
    return fn()
  value, error = None, None
  try:
    value = fn()
  except Exception as raised:  # noqa: BLE001 - shared below, raised on every process
    error = raised
  for process, outcome in enumerate(_gather(f"everywhere/{name}", "" if error is None else _encode(error))):
    if outcome:
      raise raised_everywhere(error) if process == jax.process_index() else _decode(outcome, name, process)
  return value


def first_reason(name: str, reason: str | None) -> str | None:
  """The lowest process's non-empty ``reason`` (the same on every process), or None: for a
  decision such as "this checkpoint does not restore" that every process must take alike."""
  if jax.process_count() == 1:
    return reason
  return next((r for r in _gather(f"reason/{name}", reason or "") if r), None)


class StopVote:
  """The signal every process acts on: each ``__call__`` dispatches an all-reduce (max) of this
  process's pending signal over the mesh and returns the result of the previous call's, which the
  device finished while the step ran, so no step waits on it. With one process, the local signal,
  at once."""

  def __init__(self, mesh: jax.sharding.Mesh):
    self.multi = jax.process_count() > 1
    self.shape = tuple(mesh.devices.shape)
    self.sharding = NamedSharding(mesh, PartitionSpec(*mesh.axis_names))  # one vote per device
    self.reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))
    self.previous: jax.Array | None = None

  def __call__(self, local: int | None) -> int | None:
    """The signal number to stop on now (None: go on)."""
    if not self.multi:
      return local
    block = np.full((1,) * len(self.shape), local or 0, np.int32)
    votes = jax.make_array_from_callback(self.shape, self.sharding, lambda _: block)
    previous, self.previous = self.previous, self.reduce(votes)
    agreed = 0 if previous is None else int(previous.addressable_data(0))
    return agreed or None


def abandon(code: int) -> None:
  """Exits now with ``code``, skipping JAX's shutdown barrier (which would wait for processes that
  are still training): the distributed runtime tells them this process is gone."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)
