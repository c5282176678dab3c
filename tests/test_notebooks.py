"""The notebooks in notebooks/: stored clean, and they run headlessly.

Each notebook is executed with nbclient in a fresh IPython kernel on CPU
with its smoke settings (`ENTROPO_NOTEBOOK_SMOKE=1`, read by its parameters
cell) and its work directory under the test's tmp_path; any cell error fails
the test. The checks then read what the cells printed, drew and wrote.
"""

import ast
import inspect
import json
import os
import pathlib
import re

import nbclient
import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

import entropo

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("quickstart.ipynb", "entropy_dynamics.ipynb", "precision.ipynb")
TIMEOUT_S = 600  # per cell


def _read(name):
  return nbformat.read(NOTEBOOKS / name, as_version=4)


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", NAMES)
def test_stored_clean_with_a_parameters_cell(name):
  nb = _read(name)
  nbformat.validate(nb)
  cells = _code_cells(nb)
  for cell in cells:
    assert not cell.outputs and cell.execution_count is None, (
        f"{name}: store notebooks without outputs")
  first = cells[0]
  assert "parameters" in first.metadata.get("tags", []), (
      f"{name}: the first code cell must be the tagged parameters cell")
  assert "ENTROPO_NOTEBOOK_SMOKE" in first.source
  assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NAMES)
def test_imports_entropo_and_redefines_none_of_it(name):
  """Notebooks use the library; they define no function entropo exports."""
  nb = _read(name)
  source = "\n".join(c.source for c in _code_cells(nb))
  assert re.search(r"^import entropo$", source, re.MULTILINE)
  public = {n for n in dir(entropo) if not n.startswith("_")
            and not inspect.ismodule(getattr(entropo, n))}
  for cell in _code_cells(nb):
    python = TransformerManager().transform_cell(cell.source)  # magics
    for node in ast.walk(ast.parse(python)):
      if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        assert node.name not in public, (
            f"{name} defines {node.name}, which entropo already provides")


def _kernel_env(tmp_path):
  env = dict(os.environ)
  # conftest gives this process 8 virtual CPU devices; the kernel gets one,
  # like a laptop.
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count"))
  env["JAX_PLATFORMS"] = "cpu"
  env["ENTROPO_NOTEBOOK_SMOKE"] = "1"
  env["ENTROPO_NOTEBOOK_WORKDIR"] = str(tmp_path / "workdir")
  env["IPYTHONDIR"] = str(tmp_path / "ipython")
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  env.pop("MPLBACKEND", None)  # the kernel's inline backend returns PNGs
  # The suite's persistent compilation cache comes with os.environ
  # (conftest's JAX_COMPILATION_CACHE_DIR): reruns skip most of the
  # kernels' compile time.
  return env


def _execute(name, tmp_path, monkeypatch):
  """Runs the notebook in tmp_path (its cwd); raises on any cell error."""
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  nb = _read(name)
  client = nbclient.NotebookClient(
      nb, timeout=TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=_kernel_env(tmp_path))
  return nb


def _stdout(nb) -> str:
  return "".join(o.text for c in _code_cells(nb) for o in c.outputs
                 if o.output_type == "stream" and o.name == "stdout")


def _images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in _code_cells(nb)
             for o in c.outputs)


def _number(pattern, text) -> float:
  match = re.search(pattern, text)
  assert match, f"{pattern!r} not in the output:\n{text[-3000:]}"
  return float(match.group(1))


@pytest.mark.slow
def test_quickstart_trains_and_plots(tmp_path, monkeypatch):
  nb = _execute("quickstart.ipynb", tmp_path, monkeypatch)
  workdir = tmp_path / "workdir"
  records = [json.loads(line) for line in
             (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["iteration"] for r in records] == [0, 1]  # smoke: 2 iterations
  for r in records:
    assert r["entropy/mean"] > 0 and 0 <= r["reward/mean"] <= 1
    assert "controller/zeta" in r  # GRPO + REPO-R
  assert "eval/pass@4" in records[-1]
  assert "eval/entropy" in json.loads((workdir / "baseline.json").read_text())
  assert (workdir / "warm_start" / "config.json").is_file()
  assert (workdir / "plots" / "quickstart.png").stat().st_size > 0
  assert list((workdir / "checkpoints").iterdir())
  assert _images(nb) >= 1
  out = _stdout(nb)
  assert "already installed; nothing to do" in out
  assert re.search(r"1 x .* \(cpu\)", out)
  assert "trained in" in out
  # Nothing escaped the tmp dir into the notebooks folder.
  assert not (NOTEBOOKS / "workdir").exists()


@pytest.mark.slow
def test_entropy_dynamics_runs(tmp_path, monkeypatch):
  nb = _execute("entropy_dynamics.ipynb", tmp_path, monkeypatch)
  out = _stdout(nb)
  # Part 1: the covariance law predicts the actual entropy change.
  assert _number(r"corr\(actual, exact\)\s+([-\d.]+)", out) > 0.99
  assert _number(r"corr\(actual, entropo est\.\)\s+([-\d.]+)", out) > 0.9
  # One batch: REPO-D with zeta = 1 decorrelates A from L exactly.
  assert abs(_number(r"REPO-D, ζ=1\s+\S+\s+\S+\s+(\S+)", out)) < 1e-4
  # Part 2: all five runs trained; part 3: the sweep covered every eps.
  for run in ("GRPO", "DAPO", "ADAPO", "GRPO+REPO-R", "GRPO+REPO-D"):
    assert re.search(rf"^{re.escape(run)}\s+entropy [\d.]+ -> [\d.]+", out,
                     re.MULTILINE), run
  assert len(re.findall(r"^eps_high [\d.]+: dH", out, re.MULTILINE)) == 6
  assert _images(nb) >= 4


@pytest.mark.slow
def test_precision_runs(tmp_path, monkeypatch):
  nb = _execute("precision.ipynb", tmp_path, monkeypatch)
  out = _stdout(nb)
  assert "every ratio is exactly 1" in out

  def row(preset, after):
    # The first table row of `preset` after the line containing `after`.
    text = out[out.index(after):]
    match = re.search(rf"^{preset}\s+(.+)$", text, re.MULTILINE)
    return [float(x) for x in match.group(1).split()]

  table = "ratio_bias"  # the full mismatch table, columns as printed
  assert row("fp32", table) == [0.0] * 7
  bf16 = row("bf16", table)
  assert bf16[3] > 0  # max |d log pi|: bf16 disagrees with float32
  # Head only: the float32 head (the paper's fix) adds no error, bf16 does.
  assert row("bf16_fp32_head", "head only")[:2] == [0.0, 0.0]
  assert row("bf16", "head only")[1] > 0
  assert _images(nb) >= 4
