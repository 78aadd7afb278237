#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs that the GPU machine's image lacks (it has jax 0.11,
# flax, optax, orbax, triton 3.6, pytest, pytest-xdist, tensorstore, but not these), for Python 3.12,
# into .whl/ (ignored by git; carried to the machine). Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d .whl ml_collections tensorboardX jax-triton==0.3.1  # 0.4 wants triton >= 3.7; the image has 3.6
ls -la .whl
