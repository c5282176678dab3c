"""In-flight episodes (entropo/training/episodes_inflight.py) against `play`.

For a fixed key and deterministic environments, `play_in_flight` must give
`play`'s episodes: the same training sequences (tokens, masks, turns),
end reasons, turns and returns exactly, and log-probs to float32
rounding. The rows' forward passes run in batches of other shapes and
cache layouts (S rows, each at its own slot, no holes), whose matmuls and
reductions may round differently: 2e-5 is the bound of the multi-turn
sampler against `sample` (tests/test_agents.py) and of the in-flight
sampler (tests/test_inflight.py), for the same reason.

The toy environment's episodes last 1 to 5 turns, and its steps sleep 0 to
40 ms (varying by episode and turn), so the answers come back in another
order than the actions went out; there are more episodes than slots.
"""

import json
import time

import jax
import numpy as np
import pytest

from entropo import tasks
from entropo.models import agent_slots
from entropo.tasks import environment as env_lib
from entropo.tasks import pipeline
from entropo.training import episodes as episodes_lib
from entropo.training.episodes_inflight import play_in_flight
from tests.test_agents import BATCH_MODES
from tests.test_agents import _random_model
from tests.test_agents import _Scripted
from tests.test_agents import _ScriptedTask

ATOL = 2e-5  # float32 rounding (module docstring)
EPISODES, SLOTS = 10, 3


class _Toy(env_lib.Environment):
  """Deterministic: `turns` steps, observations and rewards from the
  action's text, a sleep per step that varies with episode and turn."""

  def reset(self, problem):
    self.p = problem  # pylint: disable=attribute-defined-outside-init
    self.t = 0  # pylint: disable=attribute-defined-outside-init
    return "go:"

  def step(self, action):
    time.sleep(0.01 * ((3 * self.p["id"] + 2 * self.t) % 5))
    self.t += 1
    reward = 0.1 * (len(action) % 3)
    if self.t >= self.p["turns"]:
      reason = (env_lib.SOLVED if (len(action) + self.p["id"]) % 2
                else env_lib.FAILED)
      return env_lib.Turn(done=True, reward=reward, reason=reason)
    return env_lib.Turn(observation=f"{len(action)}{'ab'[self.t % 2]}" *
                        (1 + (self.p["id"] + self.t) % 3), reward=reward)

  def final_reward(self, reason):
    return 0.5 if reason == env_lib.SOLVED else 0.0


class _ToyTask(env_lib.AgentTask):
  name = "toy"

  def environment(self):
    return _Toy()

  def prompt(self, problem):
    return "go:"

  def transcripts(self, problem):
    return []


@pytest.fixture(scope="module", name="char_model")
def _char_model():
  return _random_model(vocab=tasks.char_tokenizer().vocab_size)


def _limits(**kw):
  return episodes_lib.EpisodeLimits(**{**dict(
      max_turns=5, max_action_tokens=6, max_observation_tokens=8, context=96,
      step_timeout=1.0), **kw})


def _run(model, task, problems, *, slots=None, key=0, **kw):
  """`play` (slots None) or `play_in_flight` of the problems."""
  tok = tasks.char_tokenizer()
  batch = pipeline.prompt_batch(
      [{"id": i, "prompt": "go:", "problem": p}
       for i, p in enumerate(problems)], tok, max_prompt_len=4)
  sampling = {k: kw.pop(k) for k in ("temperature", "top_p") if k in kw}
  args = (model, task, tok, batch["prompt_tokens"], batch["prompt_mask"],
          problems)
  common = dict(key=jax.random.key(key), limits=_limits(**kw),
                stop_ids=episodes_lib.stop_token_ids(tok, ["\n"]), **sampling)
  if slots is None:
    return episodes_lib.play(*args, **common)
  return play_in_flight(*args, slots=slots, **common)


def _toy_problems(n=EPISODES):
  return [json.dumps({"id": i, "turns": 1 + (7 * i) % 5}) for i in range(n)]


def _assert_same(a, b, width=96):
  pad = tasks.char_tokenizer().pad_id
  assert a.reasons == b.reasons
  np.testing.assert_array_equal(a.turns, b.turns)
  np.testing.assert_array_equal(a.returns, b.returns)
  sa, sb = a.sequences(width, pad), b.sequences(width, pad)
  for name in ("tokens", "attention_mask", "completion_mask", "turn"):
    np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)
  np.testing.assert_allclose(sa["logps"], sb["logps"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0),
                                      dict(temperature=1.0, top_p=0.95)],
                         ids=["greedy", "temperature"])
def test_in_flight_episodes_equal_lock_step(char_model, sampling):
  problems = _toy_problems()
  lock = _run(char_model, _ToyTask(), problems, **sampling)
  flight = _run(char_model, _ToyTask(), problems, slots=SLOTS, **sampling)
  _assert_same(lock, flight)
  # Varied episodes: several turn counts and end reasons.
  assert len(set(lock.turns.tolist())) >= 3, lock.turns
  assert len(set(lock.reasons)) >= 2, lock.reasons
  assert flight.action_mask.sum() == lock.action_mask.sum()
  # Each episode in one row without holes: the prompt, then its turns.
  assert (flight.valid.sum(1) == lock.valid.sum(1)).all()


def test_slots_and_keys(char_model):
  """The tokens depend on the key, not on the number of slots."""
  problems = _toy_problems(6)
  one = _run(char_model, _ToyTask(), problems, slots=1, key=5)
  many = _run(char_model, _ToyTask(), problems, slots=4, key=5)
  _assert_same(one, many)
  other = _run(char_model, _ToyTask(), problems, slots=4, key=6)
  assert not np.array_equal(other.sequences(96, 0)["tokens"],
                            many.sequences(96, 0)["tokens"])


def test_bad_environments_end_their_own_episode(char_model):
  """Raises, hangs, floods...: `play`'s reasons and returns, and the hung
  step costs its 2 s limit (not its 30 s) while the other rows go on. (A
  limit of 2 s, not 1: a well-behaved call's thread must answer within
  it while the host compiles on a loaded 2-core machine.)"""
  modes = BATCH_MODES + ["plain", "solve"]
  problems = [json.dumps({"mode": m}) for m in modes]
  lock = _run(char_model, _ScriptedTask(), problems, max_turns=3,
              step_timeout=2.0)
  _Scripted.log.clear()
  t0 = time.perf_counter()
  flight = _run(char_model, _ScriptedTask(), problems, slots=3, max_turns=3,
                step_timeout=2.0)
  assert time.perf_counter() - t0 < 25
  _assert_same(lock, flight)
  reasons = dict(zip(modes, flight.reasons))
  assert reasons["raise"] == env_lib.ENV_ERROR
  assert reasons["hang"] == env_lib.ENV_TIMEOUT
  assert reasons["flood"] == env_lib.OBSERVATION_TOO_LONG
  assert reasons["solve"] == env_lib.SOLVED
  assert flight.env_seconds < 5
  # Every environment closed once; the timed-out one gets no final reward.
  assert sorted(m for c, m in _Scripted.log if c == "close") == sorted(modes)
  assert sorted(m for c, m in _Scripted.log if c == "final") == sorted(
      m for m in modes if m != "hang")


def test_context_full_counts_the_episodes_own_tokens(char_model):
  """An episode ends with context_full when its own next observation and a
  whole action would not fit: each episode played alone by `play` (no
  other rows' holes; observation chunks unpadded) ends the same."""
  problems = _toy_problems()
  kw = dict(temperature=0.0, context=30, observation_bucket=1)
  flight = _run(char_model, _ToyTask(), problems, slots=SLOTS, **kw)
  assert env_lib.CONTEXT_FULL in flight.reasons
  assert flight.truncated.sum() == flight.reasons.count(env_lib.CONTEXT_FULL)
  for e, problem in enumerate(problems):
    alone = _run(char_model, _ToyTask(), [problem], **kw)
    assert alone.reasons == [flight.reasons[e]]
    seq = flight.sequences(30, 0)
    np.testing.assert_array_equal(alone.sequences(30, 0)["tokens"][0],
                                  seq["tokens"][e])
  assert flight.valid.sum(1).max() <= 30


def test_turn_budget(char_model):
  problems = _toy_problems()
  lock = _run(char_model, _ToyTask(), problems, max_turns=2)
  flight = _run(char_model, _ToyTask(), problems, slots=SLOTS, max_turns=2)
  _assert_same(lock, flight)
  assert env_lib.TURN_BUDGET in flight.reasons
  assert flight.turns.max() == 2


def test_bad_arguments(char_model):
  with pytest.raises(ValueError, match="slots"):
    _run(char_model, _ToyTask(), _toy_problems(2), slots=0)


def test_frozen_rows_keep_their_cache(char_model):
  """`feed` and `decode` leave the rows outside the call bitwise as they
  were (cache entries, validity, hidden state), the padding rows of a
  call's power-of-two batch included."""
  rows, context = 5, 24
  bound = agent_slots.bind(char_model)
  s = agent_slots.open_slots(char_model, rows=rows, context=context)
  tokens = np.random.default_rng(0).integers(3, 20, (rows, 6))
  s = agent_slots.feed(bound, s, tokens, np.ones((rows, 6), bool),
                       rows=np.ones(rows, bool), start=np.zeros(rows),
                       reset=np.ones(rows, bool))
  snap = lambda s: jax.tree.leaves(jax.tree.map(np.array, s))  # noqa: E731
  before = snap(s)
  on = np.array([True, False, True, True, False])  # 3 rows: a batch of 4
  settings = agent_slots.sampling(char_model, stop_ids=[], eos_ids=[])
  s, block = agent_slots.decode(
      bound, s, key=jax.random.key(0), slot=np.full(rows, 6), active=on,
      step=np.zeros(rows), turn=np.zeros(rows), episode=np.arange(rows),
      settings=settings, max_tokens=4, block=4)
  assert block.mask[on].all() and not block.mask[~on].any()
  assert block.fed == 4 * 4
  decoded = snap(s)
  for a, b in zip(before, decoded):
    np.testing.assert_array_equal(a[~on], b[~on])
  fed = np.arange(rows) == 1
  s = agent_slots.feed(bound, s, tokens, np.ones((rows, 6), bool),
                       rows=fed, start=np.full(rows, 6),
                       reset=np.zeros(rows, bool))
  for a, b in zip(decoded, snap(s)):
    np.testing.assert_array_equal(a[~fed], b[~fed])
  valid = np.asarray(s.cache["valid"])
  assert (valid.sum(1) == [10, 12, 10, 10, 6]).all()
