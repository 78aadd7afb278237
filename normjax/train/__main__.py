"""``python -m normjax.train --config=configs/llama.py:tiny --workdir=DIR [--config.train.steps=100 ...]``
(flags: ``normjax/train/cli.py``)."""

import sys

from normjax.train import signals


def _main() -> int:
  try:
    # First, before JAX loads: a signal during the start-up still stops with a message. Inside the
    # ``try``, so that one arriving right after the handlers are in place is caught too.
    signals.install()
    from normjax.train import cli  # imports JAX
    return cli.main(sys.argv[1:])
  except signals.Interrupted as error:
    print(f"stopped: {error}", file=sys.stderr)
    return error.exit_code


if __name__ == "__main__":
  sys.exit(_main())
