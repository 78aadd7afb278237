"""One process of a run started the way a user's own launcher starts it: this script initializes
``jax.distributed`` itself, then calls ``normjax.train.train`` (twice, as a sweep would: the
second call finds the run finished). Afterwards it reports, as JSON on
its last stdout line, what this process holds of the train state and of a batch, measured on the
arrays the loop builds (``build_sharded``, ``BatchRows.put``).

  python tests/multihost_worker.py PORT NUM_PROCESSES PROCESS_ID WORKDIR CONFIG [key=value ...]
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

from normjax import config as config_lib  # noqa: E402
from normjax import data  # noqa: E402
from normjax.train import train  # noqa: E402
from normjax.train.loop import build_sharded  # noqa: E402


def held_bytes(array: jax.Array) -> int:
  """Bytes of ``array`` on this process's devices, each distinct shard counted once."""
  return sum({shard.index.__repr__(): shard.data.nbytes for shard in array.addressable_shards}.values())


def main(port: str, num_processes: str, process_id: str, workdir: str, spec: str, *overrides: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", int(num_processes), int(process_id),
                             heartbeat_timeout_seconds=10)
  config = config_lib.load(spec, dict(item.split("=", 1) for item in overrides))
  result = train(config, workdir)
  again = train(config, workdir)  # a second run in the same processes (as a sweep does): done already
  assert again["eval_loss"] == result["eval_loss"], (again, result)
  run = config_lib.validate(config, jax.device_count(), jax.process_count())
  sharded = build_sharded(config, run.model, run.mesh)
  batch = sharded.rows.put(data.load(run.data, "train", config.train.batch_size).batch(0, sharded.rows.rows))
  leaves = jax.tree.leaves(sharded.state)
  print(json.dumps({
      "train_loss": result["train_loss"],
      "state_bytes": sum(x.nbytes for x in leaves), "held_state_bytes": sum(map(held_bytes, leaves)),
      "batch_bytes": batch["inputs"].nbytes, "held_batch_bytes": held_bytes(batch["inputs"]),
      "rows": np.asarray(sharded.rows.rows).tolist()}))


if __name__ == "__main__":
  main(*sys.argv[1:])
