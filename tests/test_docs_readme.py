"""The README's Python example runs as written, from any directory."""

import os
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_loss_example_runs(tmp_path, monkeypatch):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks
  monkeypatch.chdir(tmp_path)  # not the repository root
  for code in blocks:
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)  # pylint: disable=exec-used
  assert np.isfinite(float(namespace["loss"]))
  assert np.isfinite(float(namespace["metrics"]["entropy/mean"]))
  assert os.getcwd() == str(tmp_path)
