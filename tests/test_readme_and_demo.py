"""The README's promises: its Python example runs as written, its commands are the ones CI runs,
and the main job trains real models."""

from __future__ import annotations

import pathlib
import re

import pytest

from normjax import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README, re.S)
  assert blocks, "README lost its Python example"
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})
  out = capsys.readouterr().out
  assert "(2, 16, 64)" in out
  assert out.count("[") >= 2  # the per-depth statistics example printed its arrays


def test_readme_marks_the_commands_ci_runs():
  ci = (ROOT / ".ci" / "run").read_text()
  for marker in ("install", "main-job", "tests"):
    assert re.search(rf"\s# {marker}$", README, re.M), marker
    assert f"readme_command {marker}" in ci


def test_demo_learns_and_prints_a_table(capsys):
  demo.main(["--norms=rms,power_norm", "--steps=150"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[1].split() == ["norm", "train", "loss", "test", "acc", "seconds"]
  rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[2:]}
  assert set(rows) == {"rms_norm", "power_norm"}
  for name, (loss, accuracy, _) in rows.items():
    assert accuracy > 0.8, f"{name}: test accuracy {accuracy} (chance is 0.1)"
    assert loss < 0.7


def test_demo_rejects_unknown_norm():
  with pytest.raises(ValueError, match="Did you mean 'layer_norm'"):
    demo.main(["--norms=layer_nrm"])
