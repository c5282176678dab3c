"""Rollouts: sample completions, score them, and dynamic sampling.

`Rollouts.collect` draws prompt batches from the data iterator, samples
`group_size` completions per prompt from the KV-cache sampler and scores
them with the task's verifier. With dynamic sampling (DAPO) it drops groups
whose rewards are all equal (`entropo.degenerate_groups`) and samples again,
up to `max_resample` times, to refill the batch.
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

  def arrays(self) -> tuple[jax.Array, ...]:
    return (self.tokens, self.attention_mask, self.completion_mask,
            self.sampler_logps)


@functools.partial(jax.jit, static_argnums=0)
def gather_rows(sharding, parts, rows):
  """Rows `rows` of the concatenation of `parts` (pytrees of `[B, ...]`)."""
  whole = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
  return jax.lax.with_sharding_constraint(
      jax.tree.map(lambda x: x[rows], whole), sharding)


class Rollouts:
  """Samples and scores completions of one task for one run.

  `timing` accumulates the seconds spent sampling and scoring since it was
  last reset.
  """

  def __init__(self, task, tokenizer, placement, sampling, *,
               dynamic_sampling: bool, max_resample: int):
    self.task = task
    self.tokenizer = tokenizer
    self.placement = placement
    self.sampling = sampling
    self.dynamic_sampling = dynamic_sampling
    self.max_resample = max_resample
    self.timing = {"time/sample": 0.0, "time/score": 0.0}

  def sample(self, model, prompt_tokens, prompt_mask, key, **settings):
    """Samples from `model`; the result on the batch sharding."""
    if not isinstance(key.sharding, NamedSharding):  # evaluation's keys
      # Replicated over the mesh, like the training keys, so that both
      # share one compiled sampler.
      key = jax.random.wrap_key_data(jax.device_put(
          np.asarray(jax.random.key_data(key)),
          NamedSharding(self.placement.mesh, PartitionSpec())))
    result = sample(model, prompt_tokens, prompt_mask, key=key,
                    max_new_tokens=self.sampling.max_new_tokens,
                    eos_id=self.tokenizer.eos_ids,
                    steps_per_check=self.sampling.steps_per_check, **settings)
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
    return Rollout(*arrays, rewards, [reasons[i] for i in rows]), {
        "dynamic/draws": float(len(draws)),
        "dynamic/kept_fraction": informative / want}
