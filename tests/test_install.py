"""The main job runs on entropo's runtime install alone.

`make demo` installs no test extras: neither torch, transformers nor peft (the
peer of the Hugging Face parity tests). The library and the main job's entry
point must not import them, and the main job must run where they are not
installed (tensorboardX, for one, imports torch if it can and does without
it otherwise). Both checks run in a fresh process, since this one may hold
torch from other tests.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_ONLY = ("torch", "transformers", "peft")

# Imports every module of the library and the main job's entry point and
# config (each entry point defines its own absl flags: one per process), then
# lists the test-only packages that got imported.
_IMPORT_ALL = """
import importlib, pkgutil, sys
import entropo
for info in pkgutil.walk_packages(entropo.__path__, "entropo."):
  importlib.import_module(info.name)
import experiments.main, experiments.configs.countdown
print("imported:", sorted(m for m in {test_only} if m in sys.modules))
"""

# Runs `python -m experiments.main ARGS` as if the test-only packages were
# not installed.
_RUN_MAIN = """
import importlib.abc, runpy, sys

class NotInstalled(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {test_only}:
      raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    return None

sys.meta_path.insert(0, NotInstalled())
sys.argv[0] = "experiments/main.py"
try:
  runpy.run_module("experiments.main", run_name="__main__", alter_sys=True)
except SystemExit as e:
  if e.code:
    raise
print("imported:", sorted(m for m in {test_only} if m in sys.modules))
"""

# The main job's own config file, shrunk to seconds: the warm start, a few
# RL iterations with an evaluation, a checkpoint, TensorBoard files and
# plots, as `make demo` does them.
_TINY = dict(
    model=dict(hidden_size=32, intermediate_size=64, num_layers=1,
               num_heads=2, num_kv_heads=1),
    warm_start=dict(steps=5, batch_size=16, num_problems=50),
    data=dict(train_size=32, eval_size=4),
    sampling=dict(prompts_per_batch=2, group_size=4, max_new_tokens=8),
    train=dict(iterations=2, eval_every=2, eval_samples=4, pass_k="(1,4)",
               checkpoint_every=2, progress=False),
)


def _env():
  env = dict(os.environ)
  # One CPU device, like a laptop running `make demo`.
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count"))
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  # The suite's persistent compilation cache comes with os.environ
  # (conftest).
  env["MPLBACKEND"] = "Agg"
  return env


def _imported(code, *args, cwd=ROOT):
  out = subprocess.run(
      [sys.executable, "-c", code.format(test_only=TEST_ONLY), *args],
      cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600,
      check=False)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout.splitlines()[-1]


def test_library_imports_no_test_only_package():
  assert _imported(_IMPORT_ALL) == "imported: []"


@pytest.mark.slow
def test_main_job_runs_without_test_only_packages(tmp_path):
  args = [f"--config={ROOT / 'experiments' / 'configs' / 'countdown.py'}",
          f"--workdir={tmp_path / 'workdir'}"]
  args += [f"--config.{section}.{k}={v}" for section, values in _TINY.items()
           for k, v in values.items()]
  assert _imported(_RUN_MAIN, *args) == "imported: []"
  assert (tmp_path / "workdir" / "metrics.jsonl").exists()
