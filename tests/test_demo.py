"""The quickstart demo and the README's loss-API example run and make sense."""

import math
import pathlib
import re

import numpy as np

import entropo
from entropo import demo

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_demo_metrics_are_finite_and_consistent():
  metrics = demo.run(seed=0)
  for key in ("pg/loss", "pg/clipfrac_high", "entropy/mean",
              "dyn/cov_logp_adv", "mismatch/ratio_bias", "repo/zeta_next"):
    assert key in metrics, key
  assert all(math.isfinite(v) for v in metrics.values())
  # Entropy of a 64-token vocabulary lies in [0, log 64].
  assert 0.0 < metrics["entropy/mean"] <= math.log(64)
  # The demo pretends entropy fell below target: zeta doubles from 1e-3.
  np.testing.assert_allclose(metrics["repo/zeta_next"], 2e-3, rtol=1e-6)
  # The covariance law's prediction is minus the covariance.
  assert metrics["dyn/pred_entropy_change"] == -metrics["dyn/cov_logp_adv"]
  # bf16 log-probs differ from float32 ones, and the demo measures it.
  assert metrics["mismatch/max_abs_diff"] > 0


def test_demo_main_prints_every_metric(capsys):
  demo.main(["--seed", "1"])
  out = capsys.readouterr().out
  assert "pg/loss" in out and "entropy/mean" in out
  assert len(out.splitlines()) == len(demo.run(seed=1)) + 1


def test_readme_example_runs(tmp_path, monkeypatch):
  """As written (its inputs defined in it), outside the repository."""
  code = re.search(r"## The loss API in 20 lines\n\n```python\n(.*?)```",
                   README.read_text(), re.S).group(1)
  assert len(code.strip().splitlines()) <= 20
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(code, str(README), "exec"), namespace)  # pylint: disable=exec-used
  assert np.isfinite(float(namespace["loss"]))
  assert "entropy/mean" in namespace["metrics"]
  assert float(namespace["state"].zeta) > 0
  assert namespace["adv"].shape == namespace["mask"].shape
