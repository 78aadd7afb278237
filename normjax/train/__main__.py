"""``python -m normjax.train --config=configs/llama.py:tiny --workdir=DIR [--config.train.steps=100 ...]``."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from normjax.train.loop import NonFiniteLoss, train
from normjax.validation import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/llama.py:tiny",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and statistics go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except NonFiniteLoss as error:
    print(f"stopped: {error}", file=sys.stderr)
    sys.exit(1)
  except ConfigError as error:
    print(f"config error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
