"""Agents: the multi-turn sampler, episodes, environments and their loss.

* A multi-turn rollout with a fixed key gives the tokens of sampling each
  turn from scratch with the whole context (`entropo.models.sample`), and
  feeds every slot to the model once (the prefix is never recomputed).
* Observation tokens carry exactly zero loss, gradient, entropy, KL and
  clip statistics: the loss equals the float64 reference over the action
  tokens alone, for every objective family.
* A bad environment (raises, hangs, floods) ends its own episode with a
  named reason; the batch goes on.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from entropo import tasks
from entropo.models import ModelConfig
from entropo.models import Transformer
from entropo.models import multiturn
from entropo.models import sample
from entropo.tasks import environment as env_lib
from entropo.tasks import pipeline
from entropo.training import config as config_lib
from entropo.training import episodes as episodes_lib
from entropo.training.algorithm import Algorithm
from tests.reference import objectives as ref

VOCAB = 29
STOP, EOS = 4, 1


def _random_model(vocab=VOCAB, context=96, std=0.5, seed=0):
  cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=2,
                    max_position_embeddings=context, family="qwen3",
                    qk_norm=True, tie_word_embeddings=True)
  model = Transformer(cfg, precision="fp32", rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    var.set_value(jnp.asarray(rng.normal(0, std, value.shape), value.dtype))
  return model


@pytest.fixture(scope="module", name="model")
def _model():
  return _random_model()


@pytest.fixture(scope="module", name="char_model")
def _char_model():
  """A model over the character tokenizer's vocabulary (episodes)."""
  return _random_model(vocab=tasks.char_tokenizer().vocab_size)


BATCH_MODES = ["raise", "hang", "flood", "not_a_turn", "solve", "bad_final",
               "plain"]


def _play(model, modes, **limits):
  """Episodes of `_ScriptedTask` with one mode per row (shared shapes:
  7 rows, 4 prompt slots, 64 context slots, actions of 6 tokens)."""
  tok = tasks.char_tokenizer()
  problems = [json.dumps({"mode": m}) for m in modes]
  batch = pipeline.prompt_batch(
      [{"id": i, "prompt": "go:", "problem": p}
       for i, p in enumerate(problems)], tok, max_prompt_len=4)
  limits = episodes_lib.EpisodeLimits(**{**dict(
      max_turns=3, max_action_tokens=6, max_observation_tokens=8, context=64,
      step_timeout=1.0), **limits})
  return episodes_lib.play(model, _ScriptedTask(), tok, batch["prompt_tokens"],
                           batch["prompt_mask"], problems,
                           key=jax.random.key(0), limits=limits,
                           stop_ids=episodes_lib.stop_token_ids(tok, ["\n"]))


def _padded(rows, pad=0):
  width = max(len(r) for r in rows)
  tokens = np.full((len(rows), width), pad, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    mask[i, :len(r)] = True
  return tokens, mask


def test_turns_equal_sampling_each_turn_from_scratch(model, rng):
  """Same tokens and log-probs as `sample` on the whole context, turn by
  turn, with rows ending at different turns and observations of different
  lengths (holes between the turns)."""
  batch = 5
  prompts = [list(rng.integers(5, VOCAB, n)) for n in (6, 2, 4, 6, 3)]
  rows = [list(p) for p in prompts]
  tokens, mask = _padded(prompts)
  ctx = multiturn.start(model, tokens, mask, slots=90)
  live = np.ones(batch, bool)
  key = jax.random.key(3)
  compared = 0
  for turn in range(4):
    k = jax.random.fold_in(key, turn)
    ctx, act = multiturn.act(model, ctx, live, key=k, max_tokens=6,
                             stop_ids=[STOP], eos_ids=[EOS])
    ref_tokens, ref_mask = _padded(rows)
    want = sample(model, ref_tokens, ref_mask, key=k, max_new_tokens=6,
                  eos_id=[STOP, EOS])
    width = ref_tokens.shape[1]
    for b in np.flatnonzero(live):
      got = act.tokens[b][act.mask[b]]
      cmask = np.asarray(want.completion_mask)[b, width:]
      np.testing.assert_array_equal(got, np.asarray(want.tokens)[b, width:][
          cmask])
      np.testing.assert_allclose(act.logps[b][act.mask[b]], np.asarray(
          want.logps)[b, width:][cmask], atol=2e-5)
      rows[b] += list(got)
      compared += len(got)
    assert not act.mask[~live].any()  # ended rows only get holes
    live &= ~act.ended_by_eos
    live[turn] = False  # rows end at different turns
    obs = [list(rng.integers(5, VOCAB, rng.integers(0, 5))) if live[b] else []
           for b in range(batch)]
    obs_tokens, obs_mask = _padded([o + [0] for o in obs])
    obs_mask[np.arange(batch), [len(o) for o in obs]] = False  # no dummy
    ctx = multiturn.extend(model, ctx, obs_tokens, obs_mask)
    for b in range(batch):
      rows[b] += obs[b]
  assert compared > 20
  # Every slot was fed once: never a second pass over a prefix.
  assert ctx.fed == ctx.slot * batch


def test_the_prefix_is_never_fed_again(model, rng, monkeypatch):
  """The model only ever sees the new chunk or one token (traced shapes)."""
  widths = []
  call = Transformer.__call__

  def spy(self, tokens, **kwargs):
    widths.append(tokens.shape[1])
    return call(self, tokens, **kwargs)

  monkeypatch.setattr(Transformer, "__call__", spy)
  multiturn._extend_jit.clear_cache()  # pylint: disable=protected-access
  multiturn._act_jit.clear_cache()  # pylint: disable=protected-access
  tokens = rng.integers(5, VOCAB, (2, 7))
  ctx = multiturn.start(model, tokens, np.ones((2, 7), bool), slots=64)
  live = np.ones(2, bool)
  for turn in range(3):
    ctx, _ = multiturn.act(model, ctx, live, key=jax.random.key(turn),
                           max_tokens=5, stop_ids=[STOP])
    ctx = multiturn.extend(model, ctx, rng.integers(5, VOCAB, (2, 3)),
                           np.ones((2, 3), bool))
  multiturn._extend_jit.clear_cache()  # pylint: disable=protected-access
  multiturn._act_jit.clear_cache()  # pylint: disable=protected-access
  assert sorted(set(widths)) == [1, 3, 7]
  assert ctx.fed == 2 * ctx.slot


def test_act_checks_its_arguments(model, rng):
  tokens = rng.integers(5, VOCAB, (2, 4))
  ctx = multiturn.start(model, tokens, np.ones((2, 4), bool), slots=10)
  live = np.ones(2, bool)
  with pytest.raises(ValueError, match="does not fit"):
    multiturn.act(model, ctx, live, key=jax.random.key(0), max_tokens=7)
  with pytest.raises(ValueError, match="stop and EOS ids"):
    multiturn.act(model, ctx, live, key=jax.random.key(0), max_tokens=2,
                  stop_ids=[VOCAB])
  with pytest.raises(ValueError, match="slots"):
    multiturn.start(model, tokens, np.ones((2, 4), bool), slots=3)


# -- the loss of a trajectory


def _trajectory():
  """Two hand-made episodes: prompt | action | observation | action."""
  #          p  p  a  a  o  o  o  a  a  pad
  mask = np.array([[0, 0, 1, 1, 0, 0, 0, 1, 1, 0],
                   [0, 1, 1, 0, 0, 1, 1, 1, 0, 0],
                   [0, 0, 0, 1, 1, 1, 0, 0, 1, 1],
                   [0, 1, 1, 1, 0, 0, 1, 0, 0, 0]], bool)
  return mask


ALGOS = ("grpo", "loop", "dapo", "gspo", "rloo", "loop+repo_r", "adapo",
         "clip_cov", "kl_cov", "entropy_bonus")


@pytest.mark.parametrize("name", ALGOS)
def test_observation_tokens_carry_no_loss_or_gradient(name, rng):
  """d loss / d (log pi, entropy) is exactly 0 off the action mask; values
  there (log-probs, old log-probs, advantages, entropy, reference) change
  nothing; on PPO-type objectives the loss and its gradient equal the
  float64 reference over the action tokens alone."""
  fields = config_lib.algorithm(name)
  fields.update(kl_coef=0.05)  # the KL term must ignore observations too
  algo = Algorithm.from_config(config_lib.ConfigDict(fields))
  mask = jnp.asarray(_trajectory())
  shape = mask.shape
  logps = jnp.asarray(rng.uniform(-3, -0.05, shape), jnp.float32)
  entropy = jnp.asarray(rng.uniform(0.1, 2, shape), jnp.float32)
  batch = dict(mask=mask,
               old_logps=logps + jnp.asarray(rng.normal(0, 0.2, shape),
                                             jnp.float32),
               ref_logps=logps + 0.1,
               advantages=jnp.asarray(np.repeat(rng.normal(0, 1, (4, 1)),
                                                shape[1], 1), jnp.float32),
               importance_weights=jnp.ones(shape))
  hyper = {k: jnp.float32(v) for k, v in algo.initial.items()}
  key = jax.random.key(0)

  @jax.jit
  def run(logps, entropy, batch):
    return jax.value_and_grad(
        lambda lp, ent: algo.loss(lp, ent, batch, hyper, key, norm=8.0,
                                  precision="fp32"),
        argnums=(0, 1), has_aux=True)(logps, entropy)

  (loss, metrics), (d_logps, d_entropy) = run(logps, entropy, batch)
  off = ~np.asarray(mask)
  assert np.all(np.asarray(d_logps)[off] == 0.0)
  assert np.all(np.asarray(d_entropy)[off] == 0.0)
  assert np.abs(np.asarray(d_logps)[~off]).max() > 0
  noise = lambda x: jnp.where(mask, x, x + 7.0 * jnp.asarray(
      rng.normal(size=shape), jnp.float32))
  (loss2, metrics2), (d2, _) = run(noise(logps), noise(entropy), {
      k: noise(v) if k in ("old_logps", "ref_logps", "advantages") else v
      for k, v in batch.items()})
  assert float(loss2) == float(loss)
  for k in metrics:
    np.testing.assert_array_equal(np.asarray(metrics2[k]),
                                  np.asarray(metrics[k]), err_msg=k)
  np.testing.assert_array_equal(np.asarray(d2)[~off],
                                np.asarray(d_logps)[~off])
  if algo.objective in ("ppo", "gspo") and algo.repo == "none" and (
      not algo.entropy_bonus):
    want, want_grad, _ = ref.policy_loss(
        np.asarray(logps), np.asarray(batch["old_logps"]),
        np.asarray(batch["advantages"]), np.asarray(mask),
        objective=algo.objective, clip_low=algo.clip_low,
        clip_high=float(hyper["clip_high"]), band_kind=algo.band,
        agg=algo.agg, norm=8.0)
    kl, kl_grad = _reference_k3(np.asarray(logps), np.asarray(
        batch["ref_logps"]), np.asarray(mask), algo.agg)
    np.testing.assert_allclose(float(loss), want + 0.05 * kl, rtol=2e-6,
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(d_logps), want_grad + 0.05 *
                               kl_grad, rtol=2e-5, atol=1e-7)


def _reference_k3(logps, ref_logps, mask, agg):
  """k3 KL aggregated like the loss, and its gradient (float64)."""
  d = ref_logps.astype(np.float64) - logps
  terms = np.exp(d) - 1 - d
  weights = ref.aggregation_weights(mask, agg, 8.0)
  return float((terms * weights).sum()), weights * (1 - np.exp(d))


# -- environments that misbehave


class _Scripted(env_lib.Environment):
  """Answers per the problem's `mode` on the first step."""

  def reset(self, problem):
    self.mode = problem["mode"]  # pylint: disable=attribute-defined-outside-init
    return "go:"

  def step(self, action):
    if self.mode == "raise":
      raise RuntimeError("boom")
    if self.mode == "hang":
      time.sleep(30)
    if self.mode == "flood":
      return env_lib.Turn(observation="x" * 10_000_000)
    if self.mode == "not_a_turn":
      return "hello"
    if self.mode == "solve":
      return env_lib.Turn(done=True, reward=1.0, reason=env_lib.SOLVED)
    return env_lib.Turn(observation="ok\n")

  def final_reward(self, reason):
    _Scripted.log.append(("final", self.mode))
    if self.mode == "bad_final":
      raise ValueError("no final reward")
    return 0.25

  def close(self):
    _Scripted.log.append(("close", self.mode))

  log = []  # calls of final_reward and close, across episodes


class _ScriptedTask(env_lib.AgentTask):
  name = "scripted"

  def environment(self):
    return _Scripted()

  def prompt(self, problem):
    return "go:"

  def transcripts(self, problem):
    return []


def test_bad_environments_end_their_own_episode(char_model):
  modes = BATCH_MODES
  _Scripted.log.clear()
  t0 = time.perf_counter()
  ep = _play(char_model, modes)
  took = time.perf_counter() - t0
  reasons = dict(zip(modes, ep.reasons))
  assert reasons["raise"] == env_lib.ENV_ERROR
  assert reasons["hang"] == env_lib.ENV_TIMEOUT
  assert reasons["flood"] == env_lib.OBSERVATION_TOO_LONG
  assert reasons["not_a_turn"] == env_lib.ENV_ERROR
  assert reasons["solve"] == env_lib.SOLVED
  assert reasons["bad_final"] in (env_lib.ENV_ERROR,)
  # The well-behaved episode plays every turn (unless the policy wrote EOS).
  assert reasons["plain"] in (env_lib.TURN_BUDGET, env_lib.GAVE_UP,
                              env_lib.CONTEXT_FULL)
  returns = dict(zip(modes, ep.returns))
  assert returns["solve"] == pytest.approx(1.25)
  assert returns["plain"] == pytest.approx(0.25)
  assert returns["bad_final"] == 0.0
  # The hung step cost its 1 s limit, not 30 s (compiles excluded).
  assert ep.env_seconds < 5, (ep.env_seconds, took)
  # The hung episode's turn took no slot after it ended.
  hung = modes.index("hang")
  assert ep.turns[hung] == 1 and ep.action_mask[hung].sum() > 0
  # Every environment is closed once; a timed-out one gets no final reward.
  assert sorted(m for c, m in _Scripted.log if c == "close") == sorted(modes)
  assert sorted(m for c, m in _Scripted.log if c == "final") == sorted(
      m for m in modes if m != "hang")
  seq = ep.sequences(64, tasks.char_tokenizer().pad_id)
  assert (seq["completion_mask"] <= seq["attention_mask"]).all()
  assert seq["completion_mask"].sum() == ep.action_mask.sum()


def test_context_full_and_turn_budget_are_truncations(char_model):
  modes = ["plain"] * len(BATCH_MODES)
  ep = _play(char_model, modes, max_turns=12, max_observation_tokens=4)
  assert set(ep.reasons) <= {env_lib.CONTEXT_FULL, env_lib.GAVE_UP}
  assert env_lib.CONTEXT_FULL in ep.reasons
  assert ep.tokens.shape[1] <= 64
  assert ep.truncated.sum() == ep.reasons.count(env_lib.CONTEXT_FULL)
  ep = _play(char_model, modes, max_turns=1)
  assert set(ep.reasons) <= {env_lib.TURN_BUDGET, env_lib.GAVE_UP}
  assert ep.truncated.sum() == ep.reasons.count(env_lib.TURN_BUDGET)


# -- the built-in environments


@pytest.mark.parametrize("name", ["countdown_calc", "quiz"])
def test_transcripts_solve_their_problems(name):
  task = tasks.get_task(name)
  for record in task.records(7, 20):
    problem = json.loads(record["problem"])
    for transcript in task.transcripts(problem):
      env = task.environment()
      assert env.reset(problem) == record["prompt"]
      total, reason = 0.0, None
      for segment in transcript:
        if segment.by_model:
          assert segment.text.endswith("\n")
          turn = env.step(segment.text)
          total += turn.reward
          if turn.done:
            reason = turn.reason
        else:
          assert segment.text == turn.observation
      assert reason == env_lib.SOLVED
      assert total + env.final_reward(reason) == 1.0
      assert len(transcript) <= 2 * task.max_turns
    assert task.verify(problem, record["solution"]).correct


def test_malformed_actions_never_raise():
  for name in ("countdown_calc", "quiz"):
    task = tasks.get_task(name)
    problem = json.loads(next(task.records(0, 1))["problem"])
    env = task.environment()
    env.reset(problem)
    for action in ("", "calc:", "calc:1/0\n", "calc:" + "(" * 5000, "ans:",
                   "ans:9" * 300, "\x00\n", "ans:1+1\n", "7\n"):
      turn = env.step(action)
      assert isinstance(turn, env_lib.Turn)
      if turn.done:
        break
    assert 0.0 <= env.final_reward(env_lib.FAILED) <= 1.0


def test_task_environment_is_the_one_turn_case():
  task = tasks.get_task("countdown")
  record = next(task.records(0, 1))
  problem = json.loads(record["problem"])
  env = env_lib.TaskEnvironment(task)
  assert env.reset(problem) == record["prompt"]
  turn = env.step(record["solution"])
  assert turn.done and turn.reason == env_lib.SOLVED and turn.reward == 1.0
  turn = env_lib.TaskEnvironment(task)
  turn.reset(problem)
  assert turn.step("1+").reason == env_lib.FAILED


@pytest.mark.parametrize("name, settings, match", [
    ("quiz", dict(num_questions=0), "num_questions"),
    ("quiz", dict(num_questions=4, max_turns=3), "max_turns"),
    ("quiz", dict(ops="/"), "ops"),
    ("countdown_calc", dict(max_turns=0), "max_turns"),
    ("countdown_calc", dict(num_count=9), "num_count"),
])
def test_bad_environment_settings(name, settings, match):
  with pytest.raises(ValueError, match=match):
    tasks.get_task(name, **settings)


def test_transcripts_train_on_actions_only():
  """The warm start's loss mask covers the policy's segments only."""
  tok = tasks.char_tokenizer()
  segments = [env_lib.Segment("calc:1+2\n", True),
              env_lib.Segment("=3\n", False),
              env_lib.Segment("ans:1+2\n", True)]
  batch = next(iter(pipeline.sft_batches([("1 2>3:\n", segments)], tok,
                                         batch_size=1, max_len=40, seed=0)))
  ids, loss = batch["tokens"][0], batch["loss_mask"][0]
  text = "1 2>3:\ncalc:1+2\n=3\nans:1+2\n"
  assert tok.decode(list(ids[batch["mask"][0]])) == text
  learned = "".join(c for c, l in zip(text, loss) if l)
  assert learned == "calc:1+2\nans:1+2\n"
  assert not batch["mask"][0][len(text):].any()  # no EOS after a transcript


def test_the_docs_example_is_the_example_file():
  """docs/agents.md shows experiments/envs/guess_number.py whole, and the
  file's environment plays its own transcripts to `solved`."""
  root = __import__("pathlib").Path(__file__).resolve().parents[1]
  doc = (root / "docs" / "agents.md").read_text()
  source = (root / "experiments" / "envs" / "guess_number.py").read_text()
  assert f"```python\n{source}```" in doc
  task = tasks.get_task(f"{root}/experiments/envs/guess_number.py:"
                        "GuessNumber")
  for record in task.records(0, 10):
    assert task.verify(record["problem"], record["solution"]).correct
  with pytest.raises(ValueError, match="Cannot load task"):
    tasks.get_task(f"{root}/experiments/envs/guess_number.py:Nope")
  with pytest.raises(ValueError, match="Unknown task"):
    tasks.get_task("guess_number")


def test_evaluation_plays_at_most_eval_rows_episodes_at_once():
  """An agent task's `max_concurrent_episodes` bounds each evaluation call
  (sandboxed environments start a process per episode)."""
  from entropo.training import evaluation  # pylint: disable=g-import-not-at-top
  from entropo.training import rollouts as rollouts_lib  # pylint: disable=g-import-not-at-top
  sizes = []

  class Fake:
    tokenizer = tasks.char_tokenizer()
    placement = type("P", (), {"shards": 1})()

    def evaluate_rows(self, model, batch, key, temperature):
      rows = len(batch["problem"])
      sizes.append(rows)
      return (np.ones(rows, bool), np.ones((rows, 3)),
              np.ones((rows, 3), bool),
              [env_lib.SOLVED] * (rows - 1) + [env_lib.ENV_TIMEOUT])

  task = tasks.get_task("calc_code")
  records = list(task.records(0, 20))
  fake = Fake()
  fake.eval_rows = task.max_concurrent_episodes
  out = evaluation.evaluate(None, records, fake, jax.random.key(0),
                            samples=16, pass_k=(1,), max_prompt_len=32,
                            temperature=1.0)
  assert max(sizes) <= 64 and sum(sizes) == 20 * 16
  assert out["eval/pass@1"] == 1.0
  # The end reasons of the episodes, the padding rows left out.
  timeouts = len(sizes) / (20 * 16)
  assert out["eval/end/env_timeout"] == pytest.approx(timeouts)
  assert out["eval/end/solved"] == pytest.approx(1 - timeouts)
  assert rollouts_lib.Rollouts.eval_rows == 512
