"""A code-running agent's training data is the episodes it played.

A briefly warm-started tiny model plays `apps_world` episodes (actions are
Python run in a sandbox, the world lives in the trainer). Each row's
training sequence (`Episodes.sequences`, what the trainer's loss sees) is
replayed, action by action, in a fresh environment of the same problem:
the tokens on the loss mask decode to exactly the actions, the tokens off
it to exactly the prompt and the observations the replay gives, each row's
return is the replay's reward, and every group's rows hold one problem.
"""

import json

import jax
import numpy as np
import pytest

from entropo import tasks
from entropo.models import from_pretrained
from entropo.tasks import environment as env_lib
from entropo.tasks import pipeline
from entropo.training import episodes as episodes_lib
from entropo.training import warm_start as warm_start_lib
from experiments.configs import code_agents
from experiments.configs import tiny

GROUP = 4


@pytest.fixture(scope="module", name="played")
def _played(tmp_path_factory):
  c = tiny.shrink(code_agents.get_config("apps_world"), warm_start_steps=200)
  task = tasks.get_task("apps_world", **c.task.settings)
  tok = tasks.char_tokenizer()
  path = warm_start_lib.warm_start(c, task, tok,
                                   tmp_path_factory.mktemp("apps") / "ws")
  model = from_pretrained(path, precision="fp32")
  rng = np.random.default_rng(0)
  problems = [task.generate_problem(rng) for _ in range(4)]
  records = [{"id": i, "prompt": task.prompt(p), "problem": json.dumps(p)}
             for i, p in enumerate(problems)]
  batch = pipeline.prompt_batch(records, tok, group_size=GROUP,
                                max_prompt_len=c.data.max_prompt_len)
  a = c.agent
  limits = episodes_lib.EpisodeLimits(
      max_turns=a.max_turns, max_action_tokens=a.max_action_tokens,
      max_observation_tokens=a.max_observation_tokens, context=a.max_context)
  episodes = episodes_lib.play(
      model, task, tok, batch["prompt_tokens"], batch["prompt_mask"],
      list(batch["problem"]), key=jax.random.key(1), limits=limits,
      stop_ids=episodes_lib.stop_token_ids(tok, task.stop))
  return task, tok, batch, episodes, limits


def _pieces(seq, row, tok):
  """The row's valid text cut into runs on and off the loss mask."""
  ids, on = seq["tokens"][row], seq["completion_mask"][row]
  valid = seq["attention_mask"][row]
  pieces, last = [], None
  for i in np.flatnonzero(valid):
    if bool(on[i]) != last:
      pieces.append((bool(on[i]), []))
      last = bool(on[i])
    pieces[-1][1].append(int(ids[i]))
  return [(action, tok.decode([t for t in part if t not in tok.eos_ids]))
          for action, part in pieces]


def test_training_sequences_replay_to_the_same_episodes(played):
  task, tok, batch, episodes, limits = played
  seq = episodes.sequences(limits.context, tok.pad_id)
  kinds = set()
  for row, problem in enumerate(batch["problem"]):
    assert problem == batch["problem"][row - row % GROUP]  # one per group
    pieces = _pieces(seq, row, tok)
    assert not pieces[0][0] and pieces[0][1] == task.prompt(
        json.loads(problem))
    env = task.environment()
    try:
      assert env.reset(env_lib.problem_dict(problem)) == pieces[0][1]
      turn, expected = None, []
      for action, text in pieces[1:]:
        if action:
          turn = env.step(text)
          kinds.add(text.split(":")[0].strip())
        else:  # the observation fed after the previous action
          assert not turn.done and text == turn.observation
      assert sum(a for a, _ in pieces) == episodes.turns[row]
      if turn.done:
        expected.append(turn.reason)
      reward = turn.reward + env.final_reward(episodes.reasons[row])
    finally:
      env.close()
    assert episodes.returns[row] == np.float32(reward), row
    if expected:
      assert episodes.reasons[row] == expected[0]
  # The episodes ran code and finished: the check is not vacuous.
  assert {"run", "done"} <= kinds, kinds
  assert len(set(episodes.returns.tolist())) > 1
