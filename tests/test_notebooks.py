"""Executes the analysis notebooks top to bottom (nbclient) on a tiny sweep and fabricated kernel
benchmark results, and checks that they ran without error and wrote their figures.

The kernel is a kernelspec written at runtime into a temporary directory whose command is this
interpreter (``sys.executable -m ipykernel_launcher``), so the notebooks run in the same environment
as pytest whatever kernels (or none) are installed system-wide or in the user's Jupyter paths.
"""

import json
import pathlib
import shutil
import sys

import nbclient
import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "normjax-pytest"
# Every test here that starts a kernel runs on one xdist worker (the tiny sweep's group): two
# kernels starting at once on different workers can race for the same free ZMQ ports, and the
# loser dies before replying to kernel_info (seen once on the Python 3.12 CI leg).
ONE_WORKER = pytest.mark.xdist_group("tiny_sweep")


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
  """A kernelspec manager that knows only a kernel running ``sys.executable``."""
  root = tmp_path_factory.mktemp("kernels")
  (root / KERNEL).mkdir()
  (root / KERNEL / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "normjax (pytest)", "language": "python"}))
  return KernelSpecManager(kernel_dirs=[str(root)])


def execute(name: str, kernel_specs: KernelSpecManager, monkeypatch, **env: str):
  """Runs notebooks/<name> with cwd = notebooks/ and ``env`` set; returns the executed notebook
  (nbclient raises CellExecutionError on the first failing cell)."""
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv("MPLBACKEND", "Agg")  # headless; the notebooks must not need a display
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
      f"{name} is stored with outputs; clear them before committing"
  km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
  client = nbclient.NotebookClient(nb, km=km, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute()
  return nb


def text_outputs(nb) -> str:
  parts = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      parts.append(output.get("text", ""))
      parts += [str(v) for k, v in output.get("data", {}).items() if k.startswith("text/")]
  return "\n".join(parts)


def assert_pngs(paths):
  for path in paths:
    assert path.exists(), f"{path.name} was not written"
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


@ONE_WORKER
def test_kernel_runs_this_interpreter(kernel_specs, monkeypatch, tmp_path):
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
  km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
  nbclient.NotebookClient(nb, km=km, timeout=60).execute()
  assert nb.cells[0].outputs[0]["text"].strip() == sys.executable


@pytest.fixture(scope="module")
def seeded_sweep(tiny_sweep, tmp_path_factory) -> pathlib.Path:
  """A copy of the tiny sweep (the shared one stays untouched) where LLaMA pre and post at L=2 also
  ran under seed 1, with every run's ``depth_analysis.json``: cells of two seeds and of one."""
  from experiments import depth_analysis, placement_study, sweep
  out = shutil.copytree(tiny_sweep, tmp_path_factory.mktemp("seeded") / "sweep")
  runs = [r for r in placement_study.runs("ci", ("llama",), ("pre", "post")) if r.tags["depth"] == 2]
  sweep.run_all(sweep.with_seeds(runs, 2), out, {"data.data_dir": str(tiny_sweep.parent / "tiny_sweep_tfds"),
                                                 "mesh.num_devices": 1})
  depth_analysis.analyze_sweep(out, num_batches=1)
  return out


def test_bands_are_the_intervals_of_the_seeds():
  """``_plots.mean_band`` is ``experiments.intervals.interval`` per column (and in log10 for log axes)."""
  sys.path.insert(0, str(NOTEBOOKS))
  import _plots
  from experiments import intervals
  values = np.array([[1.0, 10.0, 2.0], [3.0, 1000.0, np.nan], [8.0, 100.0, 4.0]])  # [seeds, layers]
  for log, transform in ((False, lambda v: v), (True, np.log10)):
    mean, low, high = (transform(v) for v in _plots.mean_band(values, log=log))
    for column in range(values.shape[1]):
      expected = intervals.interval(list(transform(values[:, column])))
      np.testing.assert_allclose([mean[column], high[column] - mean[column], mean[column] - low[column]],
                                 [expected["mean"], expected["ci95"], expected["ci95"]], rtol=1e-12)
  single = _plots.mean_band(values[:1])
  assert all(np.array_equal(part, values[0]) for part in single)  # one seed: no band


@ONE_WORKER  # also with the sweep's builder (conftest)
def test_variance_growth(seeded_sweep, kernel_specs, monkeypatch):
  nb = execute("variance_growth.ipynb", kernel_specs, monkeypatch, NORMJAX_SWEEP=str(seeded_sweep))
  assert_pngs(seeded_sweep / f"variance_growth_{v}.png"
              for v in ("resid_heatmap", "resid_profile", "grad_heatmap", "grad_profile", "max_abs"))
  assert "llama, depth 2, runs per placement: lns x1, post x2, pre x2" in text_outputs(nb)


@ONE_WORKER  # also with the sweep's builder (conftest)
def test_placement_comparison(seeded_sweep, kernel_specs, monkeypatch):
  nb = execute("placement_comparison.ipynb", kernel_specs, monkeypatch, NORMJAX_SWEEP=str(seeded_sweep))
  assert_pngs([seeded_sweep / f"placement_{v}.png" for v in (
      "loss_curves", "final_metric", "angular_distance_llama", "angular_distance_vit", "removal_loss")])
  table = text_outputs(nb)
  for name in ("llama_pre_L01", "llama_post_L02", "llama_post_L02_s1", "llama_lns_L02", "vit_pre_L01"):
    assert f"| {name} |" in table, f"{name} missing from the summary table"
  assert "| llama_pre_L02 | 2 | 0 |" in table and "| llama_lns_L02 | 1 | 0 |" in table  # cells: seeds
  assert "llama d=32, 6 steps x batch 8, seeds 0-1; vit d=32, 6 steps x batch 8, seed 0" in table


def fake_kernel_results():
  rows = []
  for shape in ("64x128", "64x1000"):
    rows.append({"op": "copy", "fused": False, "shape": shape, "impl": "x*2", "fwd_ms": 0.01,
                 "fwd_bwd_ms": float("nan"), "fwd_frac_copy": 1.0, "fwd_bwd_frac_copy": float("nan")})
    for op in ("layer_norm", "rms_norm", "crms_norm"):
      for fused in (False, True):
        for i, impl in enumerate(("xla", "pallas")):
          rows.append({"op": op, "fused": fused, "shape": shape, "impl": impl, "fwd_ms": 0.02 + i,
                       "fwd_bwd_ms": 0.05 + i, "fwd_frac_copy": 0.5 + 0.1 * i,
                       "fwd_bwd_frac_copy": 0.4 + 0.1 * i})
  return rows


@ONE_WORKER
def test_kernels_with_results(kernel_specs, monkeypatch, tmp_path):
  results = tmp_path / "kernels_results.json"
  results.write_text(json.dumps(fake_kernel_results()))  # NaN as the json module writes it
  nb = execute("kernels.ipynb", kernel_specs, monkeypatch, NORMJAX_KERNEL_RESULTS=str(results))
  assert_pngs([tmp_path / "kernels_results_frac_copy.png"])
  assert "24 rows" in text_outputs(nb)  # the two copy rows are dropped


@ONE_WORKER
def test_kernels_without_results(kernel_specs, monkeypatch, tmp_path):
  absent = tmp_path / "absent.json"
  nb = execute("kernels.ipynb", kernel_specs, monkeypatch, NORMJAX_KERNEL_RESULTS=str(absent))
  assert "is absent" in text_outputs(nb)
  assert not list(tmp_path.glob("*.png"))
