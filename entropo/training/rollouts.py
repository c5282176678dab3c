"""Rollouts: sample completions, score them, and dynamic sampling.

`Rollouts.collect` draws prompt batches from the data iterator, samples
`group_size` completions per prompt from the KV-cache sampler and scores
them with the task's verifier. With dynamic sampling (DAPO) it drops groups
whose rewards are all equal (`entropo.degenerate_groups`) and samples again,
up to `max_resample` times, to refill the batch.

`AgentRollouts` does the same for an `AgentTask`: each row is a whole
multi-turn episode (episodes.py), one training sequence with the
observations masked out of the loss, and its reward the episode's return.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from entropo import advantages as advantages_lib
from entropo.models import sample
from entropo.models import sample_in_flight
from entropo.training import episodes as episodes_lib
from entropo.training.episodes_inflight import play_in_flight


@dataclasses.dataclass
class Rollout:
  """One scored batch of completions.

  The sequences are `[B, L]` global arrays on the batch sharding; the
  rewards and verdicts of the whole batch are on the host, the same on
  every process.
  """

  tokens: jax.Array
  attention_mask: jax.Array
  completion_mask: jax.Array
  sampler_logps: jax.Array
  rewards: np.ndarray  # [B]
  reasons: list[str]  # [B]
  # Per-row host arrays `[B, ...]` of episodes (AgentRollouts): turns,
  # token counts, entropy by turn.
  info: dict = dataclasses.field(default_factory=dict)

  def arrays(self) -> tuple[jax.Array, ...]:
    return (self.tokens, self.attention_mask, self.completion_mask,
            self.sampler_logps)


@functools.partial(jax.jit, static_argnums=0, static_argnames="fill")
def gather_rows(sharding, parts, rows, *, fill=False):
  """Rows `rows` of the concatenation of `parts` (pytrees of `[B, ...]`);
  with `fill`, an index past the end gives a row of zeros (no token, no
  loss: a minibatch's padding, made on the mesh, no host array)."""
  whole = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
  take = ((lambda x: x.at[rows].get(mode="fill", fill_value=0)) if fill
          else (lambda x: x[rows]))
  return jax.lax.with_sharding_constraint(jax.tree.map(take, whole),
                                          sharding)


class Rollouts:
  """Samples and scores completions of one task for one run.

  `timing` accumulates the seconds spent sampling and scoring since it was
  last reset. An evaluation samples at most `eval_rows` rows per call.
  """

  eval_rows = 512

  def __init__(self, task, tokenizer, placement, sampling, *,
               dynamic_sampling: bool, max_resample: int):
    self.task = task
    self.tokenizer = tokenizer
    self.placement = placement
    self.sampling = sampling
    self.dynamic_sampling = dynamic_sampling
    self.max_resample = max_resample
    self.timing = self.reset_timing()

  def reset_timing(self) -> dict[str, float]:
    """Zeroes `timing` (and returns it)."""
    self.timing = {"time/sample": 0.0, "time/score": 0.0}
    return self.timing

  def sample(self, model, prompt_tokens, prompt_mask, key, **settings):
    """Samples from `model`; the result on the batch sharding."""
    if not isinstance(key.sharding, NamedSharding):  # evaluation's keys
      # Replicated over the mesh, like the training keys, so that both
      # share one compiled sampler.
      key = jax.random.wrap_key_data(jax.device_put(
          np.asarray(jax.random.key_data(key)),
          NamedSharding(self.placement.mesh, PartitionSpec())))
    s = self.sampling
    kwargs = dict(key=key, max_new_tokens=s.max_new_tokens,
                  eos_id=self.tokenizer.eos_ids,
                  steps_per_check=s.steps_per_check, **settings)
    # Row b of the global batch is sample b % G of prompt b // G: its
    # identity, and so its random stream, is b either way (sampler.py,
    # "Randomness"); in-flight batching changes no token.
    if s.in_flight_slots:
      result = sample_in_flight(model, prompt_tokens, prompt_mask,
                                slots=s.in_flight_slots,
                                refill_rows=s.refill_rows or None, **kwargs)
    else:
      result = sample(model, prompt_tokens, prompt_mask, **kwargs)
    return self.placement.put(result)

  def score(self, tokens, completion_mask, problems):
    """Rewards and verdicts of completions (NumPy rows) by the verifier."""
    rewards, reasons = [], []
    eos = set(self.tokenizer.eos_ids)
    for row, mask, problem in zip(tokens, completion_mask, problems):
      ids = [int(t) for t in row[mask] if int(t) not in eos]
      reward = self.task.verify(str(problem), self.tokenizer.decode(ids))
      rewards.append(reward.score)
      reasons.append(reward.reason)
    return np.asarray(rewards, np.float32), reasons

  def score_global(self, result, problems, num_rows: int):
    """The whole batch's rewards and verdicts; `problems` are this
    process's rows, and so is what it scores."""
    return self.placement.gather_scores(*self.score(
        self.placement.local_rows(result.tokens),
        self.placement.local_rows(result.completion_mask), problems),
                                        num_rows)

  def evaluate_rows(self, model, batch: dict, key, temperature: float):
    """`(correct [B] bool, entropy [B, T], completion mask [B, T])` of the
    global prompt batch `batch` (host arrays, every row)."""
    placement, size = self.placement, len(batch["problem"])
    local = placement.local_slice(size)
    result = self.sample(
        model, *(placement.to_global(batch[k][local], size)
                 for k in ("prompt_tokens", "prompt_mask")), key,
        temperature=temperature)
    rewards, _ = self.score_global(result, batch["problem"][local], size)
    return (rewards == 1.0, placement.to_host(result.entropy),
            placement.to_host(result.completion_mask))

  def rollout(self, model, batch: dict, key) -> Rollout:
    """Samples completions for a prompt batch and scores them.

    `batch` holds this process's rows of the global batch (the pipeline's
    slice); the rollout is global.
    """
    s = self.sampling
    t0 = time.perf_counter()
    size = s.prompts_per_batch * s.group_size
    result = self.sample(
        model, self.placement.to_global(batch["prompt_tokens"], size),
        self.placement.to_global(batch["prompt_mask"], size), key,
        temperature=s.temperature)
    t1 = time.perf_counter()
    rewards, reasons = self.score_global(result, batch["problem"], size)
    self.timing["time/sample"] += t1 - t0
    self.timing["time/score"] += time.perf_counter() - t1
    return Rollout(result.tokens, result.attention_mask,
                   result.completion_mask, result.logps, rewards, reasons)

  def collect(self, model, data_iter, key) -> tuple[Rollout, dict]:
    """A full batch; with dynamic sampling, of informative groups only.

    Every process sees all rewards, so all choose the same groups.
    """
    g, want = self.sampling.group_size, self.sampling.prompts_per_batch
    draws, kept, degenerate = [], [], []  # groups as (draw, first row)
    while True:
      key, sub = jax.random.split(key)
      roll = self.rollout(model, next(data_iter), sub)
      if not self.dynamic_sampling:
        return roll, {"dynamic/draws": 1.0}
      flat = np.asarray(advantages_lib.degenerate_groups(roll.rewards,
                                                         group_size=g))
      for i, is_flat in enumerate(flat):
        (degenerate if is_flat else kept).append((len(draws), i * g))
      draws.append(roll)
      if len(kept) >= want or len(draws) > self.max_resample:
        break
    informative = min(len(kept), want)
    size = want * g
    rows = np.concatenate([np.arange(d * size + r, d * size + r + g)
                           for d, r in (kept + degenerate)[:want]])
    arrays = gather_rows(self.placement.sharding,
                         [roll.arrays() for roll in draws], rows)
    rewards = np.concatenate([roll.rewards for roll in draws])[rows]
    reasons = sum((roll.reasons for roll in draws), [])
    info = {k: np.concatenate([roll.info[k] for roll in draws])[rows]
            for k in draws[0].info}
    return Rollout(*arrays, rewards, [reasons[i] for i in rows], info), {
        "dynamic/draws": float(len(draws)),
        "dynamic/kept_fraction": informative / want}


class AgentRollouts(Rollouts):
  """Rollouts of an `AgentTask`: each row a whole episode (episodes.py).

  One process only: the episodes' turns are driven from this host.
  `timing` also holds `time/env`, the wall time of environment calls.
  """

  def __init__(self, task, tokenizer, placement, sampling, agent, **kwargs):
    super().__init__(task, tokenizer, placement, sampling, **kwargs)
    self.limits = episodes_lib.EpisodeLimits(
        max_turns=agent.max_turns, max_action_tokens=agent.max_action_tokens,
        max_observation_tokens=agent.max_observation_tokens,
        context=agent.max_context, step_timeout=agent.step_timeout,
        env_workers=agent.env_workers)
    self.stop_ids = episodes_lib.stop_token_ids(tokenizer, task.stop)
    self.eval_rows = task.max_concurrent_episodes or Rollouts.eval_rows
    self.in_flight_slots = agent.in_flight_slots

  def reset_timing(self):
    super().reset_timing()["time/env"] = 0.0
    return self.timing

  def play(self, model, batch: dict, key, temperature: float):
    """The batch's episodes, in lock-step or in flight
    (`agent.in_flight_slots`)."""
    args = (model, self.task, self.tokenizer, batch["prompt_tokens"],
            batch["prompt_mask"], list(batch["problem"]))
    kwargs = dict(key=key, limits=self.limits, stop_ids=self.stop_ids,
                  temperature=temperature)
    if self.in_flight_slots:
      return play_in_flight(*args, slots=self.in_flight_slots,
                            steps_per_check=self.sampling.steps_per_check,
                            **kwargs)
    return episodes_lib.play(*args, **kwargs)

  def evaluate_rows(self, model, batch, key, temperature):
    """As `Rollouts.evaluate_rows`, and each row's end reason."""
    episodes = self.play(model, batch, key, temperature)
    return (episodes.solved, episodes.entropy, episodes.action_mask,
            list(episodes.reasons))

  def rollout(self, model, batch: dict, key) -> Rollout:
    t0 = time.perf_counter()
    episodes = self.play(model, batch, key, self.sampling.temperature)
    seq = episodes.sequences(self.limits.context, self.tokenizer.pad_id)
    self.timing["time/env"] += episodes.env_seconds
    self.timing["time/sample"] += (time.perf_counter() - t0
                                   - episodes.env_seconds)
    arrays = self.placement.put(tuple(jnp.asarray(seq[k]) for k in (
        "tokens", "attention_mask", "completion_mask", "logps")))
    return Rollout(*arrays, episodes.returns, list(episodes.reasons),
                   episode_info(episodes, self.limits.max_turns))


def episode_info(episodes, max_turns: int) -> dict[str, np.ndarray]:
  """Per-row numbers of the episodes for the iteration's metrics."""
  model_tokens = episodes.action_mask.sum(1)
  by_turn = np.arange(max_turns)[None, :, None] == episodes.turn[:, None, :]
  return {
      "turns": episodes.turns.astype(np.float32),
      "truncated": episodes.truncated.astype(np.float32),
      "model_tokens": model_tokens.astype(np.float32),
      "env_tokens": (episodes.valid.sum(1) - model_tokens).astype(np.float32),
      "turn_tokens": by_turn.sum(2).astype(np.float32),  # [B, turns]
      "turn_entropy": (by_turn * episodes.entropy[:, None, :]).sum(2),
  }
