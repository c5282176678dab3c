"""The code-running tasks, calc_code and apps_world: their transcripts,
observations, config limits, and apps_world's API and reward."""

import json

import numpy as np
import pytest

from entropo import tasks
from entropo.tasks import apps_world

@pytest.mark.parametrize("name", ["calc_code", "apps_world"])
def test_task_transcripts_replay(name):
  task = tasks.get_task(name)
  for record in task.records(seed=1, num=3):
    problem = json.loads(record["problem"])
    for transcript in task.transcripts(problem):
      env = task.environment()
      try:
        assert env.reset(problem) == record["prompt"]
        turn = None
        for segment in transcript:
          if segment.by_model:
            turn = env.step(segment.text)
          else:
            assert turn.observation == segment.text
        assert turn.done and turn.reason == "solved"
        assert turn.reward + env.final_reward(turn.reason) == 1.0
      finally:
        env.close()
    assert task.verify(problem, record["solution"]).correct


def test_apps_world_checks_and_api():
  task = tasks.get_task("apps_world", kinds=("pay",))
  problem = task.generate_problem(np.random.default_rng(3))
  env = task.environment()
  try:
    env.reset(problem)
    name = problem["name"]
    bad = env.step(f'run: _rpc("pay", "{name}", -5)\n')
    assert bad.observation == "ValueError: bad amount\n"
    env.step(f'run: pay("{name}", 1)\n')  # the wrong amount
    end = env.step("done\n")
    assert end.done and end.reason == "failed"
    # bob 18 -> 21, me 28 -> 25, payments [bob, 3], bob's debt 1 -> 0 are
    # to do; paying 1 did only the debt: 1 / 4.
    assert problem["name"] == "bob" and problem["amount"] == 3
    assert problem["state"]["owe"]["bob"] == 1
    assert env.final_reward(end.reason) == 0.25
  finally:
    env.close()
  world = apps_world.World(problem["state"])
  with pytest.raises(ValueError):
    world("balance", [], {})


@pytest.mark.parametrize("name", ["calc_code", "apps_world"])
def test_config_limits_fit_the_transcripts(name):
  # pylint: disable-next=g-import-not-at-top
  from experiments.configs import code_agents
  c = code_agents.get_config(name)
  task = tasks.get_task(c.task.name, **c.task.settings)
  for record in task.records(seed=0, num=40):
    problem = json.loads(record["problem"])
    assert len(record["prompt"]) <= c.data.max_prompt_len
    for transcript in task.transcripts(problem):
      for segment in transcript:
        limit = (c.agent.max_action_tokens if segment.by_model
                 else c.agent.max_observation_tokens)
        assert len(segment.text) <= limit, segment
      assert len(transcript) <= 2 * c.agent.max_turns
  # Any observation fits (an error message too), with its newline.
  assert c.agent.max_observation_tokens >= task.observation_chars + 1
  # The rollout's slots: the prompt, then max_turns actions of
  # max_action_tokens with observation chunks (padded to the bucket).
  # pylint: disable-next=g-import-not-at-top
  from entropo.training.episodes import EpisodeLimits
  bucket = EpisodeLimits().observation_bucket
  chunk = -(-c.agent.max_observation_tokens // bucket) * bucket
  turns = c.agent.max_turns
  assert (c.data.max_prompt_len + turns * c.agent.max_action_tokens
          + (turns - 1) * chunk) <= c.agent.max_context


@pytest.mark.parametrize("name", ["calc_code", "apps_world"])
def test_every_observation_fits_observation_chars(name):
  task = tasks.get_task(name)
  problem = next(task.records(seed=0, num=1))["problem"]
  env = task.environment()
  try:
    env.reset(json.loads(problem))
    for action in ["hello\n", "run: 1/0\n", "run: print('x' * 500)\n",
                   "run: undefined_name\n", "answer: 3\n"]:
      turn = env.step(action)
      assert len(turn.observation) <= task.observation_chars + 1, turn
      if turn.done:
        break
  finally:
    env.close()


def _payback_problem():
  """A hand-made `payback` problem: me owes ann 4 and bob 2."""
  return {"kind": "payback", "name": "ann",
          "state": {"balance": {"ann": 5, "bob": 3, "cy": 0, "me": 40},
                    "owe": {"ann": 4, "bob": 2},
                    "phone": {"bob": "5551111", "cy": "5552222"}}}


@pytest.mark.parametrize("payments, finished, want", [
    # Checks: ann has 9, bob has 3, cy has 0, me has 36, payments as
    # asked, debts as expected, other contacts unchanged. To do at the
    # start (failing): ann, me, payments, debts (4); holding: bob, cy,
    # contacts (3).
    ([], True, 0.0),  # untouched (the old reward: (3 + 1) / 8 = 0.5)
    ([], False, 0.0),
    ([["ann", 4]], True, 1.0),
    ([["ann", 4]], False, 0.5),  # right state, no `done`: halved
    # me has 36 (1 done); bob has 7 (1 broken): 1 / (4 + 1).
    ([["bob", 4]], True, 0.2),
    ([["bob", 4]], False, 0.1),
    # ann has 9 and debts as expected (2 done); me has 35 and cy has 1
    # (cy broken): 2 / (4 + 1).
    ([["ann", 4], ["cy", 1]], True, 0.4),
])
def test_apps_world_reward_pays_progress(payments, finished, want):
  problem = _payback_problem()
  env = apps_world.AppsEnvironment(tasks.get_task("apps_world"))
  env.problem = problem
  env.world = apps_world.World(problem["state"])  # no sandbox: the API only
  for name, amount in payments:
    env.world("pay", [name, amount], {})
  reason = "failed" if finished else "turn_budget"
  assert env.final_reward(reason) == pytest.approx(want, abs=1e-12)
  assert apps_world.progress(problem, env.world.state) == pytest.approx(
      want * 2 / (1 + finished), abs=1e-12)
  env.close()


def test_apps_world_reward_needs_done():
  task = tasks.get_task("apps_world", kinds=("pay",))
  problem = task.generate_problem(np.random.default_rng(5))
  env = task.environment()
  try:
    env.reset(problem)
    env.step(f'run: pay("{problem["name"]}",{problem["amount"]})\n')
    assert env.final_reward("turn_budget") == 0.5  # right state, no `done`
    assert env.final_reward("solved") == 1.0
  finally:
    env.close()
