"""Agents in the trainer: presets train, killed runs resume exactly, a
user's environment file trains through the launcher."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from entropo.training import Trainer
from entropo.training import logger as logger_lib
from entropo.training import train
from experiments.configs import agents
from experiments.configs import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOLATILE = ("time/", "throughput/")


def _config(env="countdown_calc", algo="loop", **train_section):
  c = tiny.shrink(agents.get_config(f"{env}:{algo}" if algo else env),
                  warm_start_steps=30)
  c.sampling.update(max_new_tokens=16)  # unused by agents
  c.agent.update(max_context=64)
  c.train.update(**{**dict(iterations=3, eval_every=2, eval_samples=2,
                           pass_k=(1, 2), checkpoint_every=2,
                           progress=False, plots=False), **train_section})
  return c


def _records(workdir):
  return logger_lib.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")


def _stable(record):
  return {k: v for k, v in record.items() if not k.startswith(VOLATILE)}


@pytest.fixture(scope="module", name="shared")
def _shared(tmp_path_factory):
  """A warm start and data directory shared by the runs of this module."""
  root = tmp_path_factory.mktemp("agents")
  c = _config()
  train(c, root / "first")
  return root


def _with_shared(c, shared):
  c.model.init_from = str(shared / "first" / "warm_start")
  c.data.data_dir = str(shared / "first" / "data")
  return c


def test_an_agent_run_logs_episode_metrics(shared):
  records = _records(shared / "first")
  assert len(records) == 3
  last = records[-1]
  for key in ("agent/turns", "agent/truncated", "agent/model_tokens",
              "agent/env_tokens", "end/solved", "entropy/turn0",
              "time/env", "eval/pass@1", "entropy/mean"):
    assert key in last, key
  ends = sum(v for k, v in last.items() if k.startswith("end/"))
  assert ends == pytest.approx(1.0)
  assert 1 <= last["agent/turns"] <= 3
  # Sampler and trainer agree on the episode layout: same log-probs.
  assert last["mismatch/max_abs_diff"] < 1e-4


def test_in_flight_episodes_train(shared, tmp_path):
  """`agent.in_flight_slots` plays the episodes in flight: the trainer's
  log-probs of their sequences equal the sampler's, and run.json records
  the batching (the first run's: lock-step)."""
  c = _with_shared(_config(iterations=1, eval_every=1), shared)
  c.agent.update(in_flight_slots=3)
  train(c, tmp_path)
  last = _records(tmp_path)[-1]
  assert last["mismatch/max_abs_diff"] < 1e-4
  assert 1 <= last["agent/turns"] <= 3 and "eval/pass@1" in last
  batching = {name: json.loads((root / "run.json").read_text())[
      "launches"][0]["episode_batching"] for name, root in (
          ("lock", shared / "first"), ("flight", tmp_path))}
  assert batching == {"lock": {"mode": "lock_step"},
                      "flight": {"mode": "in_flight", "slots": 3}}


def test_resume_equals_an_uninterrupted_run(shared, tmp_path):
  c = _with_shared(_config(algo="loop+repo_r", iterations=4), shared)
  train(c, tmp_path / "whole")
  whole = _records(tmp_path / "whole")
  c.train.iterations = 2
  train(c, tmp_path / "split")
  c.train.iterations = 4
  train(c, tmp_path / "split")
  split = _records(tmp_path / "split")
  assert [_stable(r) for r in split] == [_stable(r) for r in whole]
  a = Trainer(c, tmp_path / "whole").state.params
  b = Trainer(c, tmp_path / "split").state.params
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_a_user_environment_file_trains_through_the_launcher(shared, tmp_path):
  env = "experiments/envs/guess_number.py:GuessNumber"
  flags = [f"--config=experiments/configs/agents.py:{env}:grpo",
           f"--workdir={tmp_path}", "--config.train.iterations=2",
           "--config.train.eval_every=2", "--config.train.eval_samples=2",
           "--config.train.pass_k=(1,)", "--config.train.progress=False",
           "--config.train.plots=False", "--config.warm_start.steps=20",
           "--config.warm_start.num_problems=64",
           "--config.data.train_size=32", "--config.data.eval_size=2",
           "--config.sampling.prompts_per_batch=2",
           "--config.sampling.group_size=2",
           "--config.model.hidden_size=32", "--config.model.num_layers=1",
           "--config.model.intermediate_size=64",
           "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
           "--config.agent.max_context=48"]
  subprocess.run([sys.executable, "-m", "experiments.main", *flags],
                 cwd=ROOT, check=True, timeout=600,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
  records = _records(tmp_path)
  assert len(records) == 2 and "end/solved" in records[-1]
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["task"]["name"] == env
  assert config["algo"]["name"] == "grpo"


def test_a_misbehaving_environment_never_stops_the_run(tmp_path):
  """Steps that raise, hang past the limit or flood the context end their
  own episodes (named in end/*); the run trains on."""
  c = _config("tests/flaky_env.py:Flaky", algo="grpo", iterations=2,
              eval_every=2)
  c.task.settings = {}
  c.warm_start.steps = 0
  c.sampling.update(prompts_per_batch=4, group_size=2)
  c.agent.update(max_turns=2, step_timeout=0.5, max_action_tokens=4)
  train(c, tmp_path)
  records = _records(tmp_path)
  assert len(records) == 2
  ends = {k: sum(r[k] for r in records) for k in records[0]
          if k.startswith("end/")}
  for reason in ("env_error", "env_timeout", "observation_too_long"):
    assert ends[f"end/{reason}"] > 0, ends
  # Two slow steps (0.5 s limit) per iteration at most, not 5 s each.
  assert all(r["time/env"] < 4 for r in records)


def test_the_agents_study_report_on_fake_runs(tmp_path):
  """report/agents.md has one row per algorithm with the entropy change of
  the first and last turn; the plots are written."""
  from experiments import study_agents  # pylint: disable=g-import-not-at-top
  settings = study_agents.Settings(algorithms=("loop", "dapo"), seeds=(0, 1))
  for algo, fall in (("loop", 0.5), ("dapo", 0.9)):
    for seed in (0, 1):
      out = study_agents.run_dir(tmp_path, algo, seed)
      out.mkdir(parents=True)
      (out / "baseline.json").write_text(json.dumps(
          {"eval/entropy": 1.0, "eval/pass@1": 0.1, "eval/pass@16": 0.5}))
      records = []
      for i in range(10):
        h = 1.0 - fall * i / 9
        records.append({
            "iteration": i, "entropy/mean": h, "entropy/change_pct":
            100 * (h - 1), "entropy/cumulative": 0.0, "reward/mean": 0.1,
            "agent/turns": 2.0, "entropy/turn0": h, "entropy/turn1": 1.0,
            "mismatch/ratio_bias": 0.0, "mismatch/phantom_clipfrac_low": 0.0,
            "mismatch/phantom_clipfrac_high": 0.0,
            "mismatch/max_abs_diff": 0.0,
            **({"eval/pass@1": 0.2, "eval/pass@16": 0.6, "eval/entropy": h}
               if i == 9 else {})})
      (out / "metrics.jsonl").write_text(
          "".join(json.dumps(r) + "\n" for r in records))
  text = study_agents.report(tmp_path, settings)
  rows = {line.split(" | ")[0][2:]: line.split(" | ")
          for line in text.splitlines()[2:]}
  assert set(rows) == {"loop", "dapo"}
  assert rows["loop"][9].startswith("-50.000")  # turn 0's entropy change
  assert rows["dapo"][10].startswith("0.000")  # turn 1 did not move
  for name in ("agents.md", "agents_entropy.png", "agents_entropy_by_turn.png"):
    assert (tmp_path / "report" / name).is_file()
