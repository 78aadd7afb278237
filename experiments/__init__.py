"""Experiments: sweeps of ordinary training-loop runs, their analysis, and the summary table.

Each study is a module with a ``runs(...)`` grid and a ``main`` (``python -m experiments.<study>``);
``sweep.run_all`` trains every run into ``<out>/<name>/`` and skips finished ones; ``summary`` and
``depth_analysis`` read the run directories. See experiments/README.md for commands and results.
"""
