"""Token covariance of log-prob and advantage, and global token selection.

`cov_t = (log pi_t - mean(log pi)) (A_t - mean(A))` over the valid tokens of
the global batch is the per-token term of the first-order entropy change
(method.md §1); Clip-Cov and KL-Cov (Cui et al., arXiv 2505.22617) pick
tokens by it. Existing implementations select per device; here selection is
over the global batch: with `axis_name` the scores are all-gathered, so the
chosen tokens are the same however the batch is sharded, and random choices
are drawn from one global random field keyed by `key`, so they are
deterministic given the key.
"""

import jax
import jax.numpy as jnp

from entropo import masking


def token_covariance(logps, advantages, mask, *, axis_name=None) -> jax.Array:
  """`[B, T]` float32 centred products, stop-gradient; 0 at masked tokens.

  Args:
    logps: `[B, T]` float.
    advantages: `[B, T]` float.
    mask: `[B, T]` bool.
    axis_name: optional mesh axis the batch is split over (means are
      global).
  """
  lp = jax.lax.stop_gradient(logps.astype(jnp.float32))
  adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
  mean_lp = masking.masked_mean(lp, mask, axis_name=axis_name)
  mean_adv = masking.masked_mean(adv, mask, axis_name=axis_name)
  return jnp.where(mask, (lp - mean_lp) * (adv - mean_adv), 0.0)


def num_selected(ratio: float, mask, *, axis_name=None) -> jax.Array:
  """`max(1, floor(ratio * N))` with N the global number of valid tokens."""
  n = masking.masked_count(mask, axis_name=axis_name)
  return jnp.maximum(1, jnp.floor(ratio * n)).astype(jnp.int32)


def select_top_k(scores, eligible, k, *, axis_name=None) -> jax.Array:
  """The `k` eligible tokens with the largest scores, over the global batch.

  Ties at the k-th score are all selected (deterministically). When fewer
  than `k` tokens are eligible, all of them are.

  Args:
    scores: `[B, T]` float.
    eligible: `[B, T]` bool.
    k: int32 scalar >= 1 (may be traced).
    axis_name: optional mesh axis the batch is split over.

  Returns:
    `[B, T]` bool.
  """
  masked = jnp.where(eligible, scores.astype(jnp.float32), -jnp.inf)
  everything = masking.all_gather(masked.reshape(-1), axis_name)
  ranked = -jnp.sort(-everything)  # descending
  threshold = ranked[jnp.clip(k - 1, 0, ranked.shape[0] - 1)]
  return eligible & (masked >= threshold)


def global_uniform(key, shape, *, axis_name=None) -> jax.Array:
  """This shard's slice of one uniform field over the global batch.

  The field has shape `[B * axis_size, ...]` and is the same on every
  device, so an unsharded run with the same key sees the same numbers.
  """
  if axis_name is None:
    return jax.random.uniform(key, shape)
  size = jax.lax.axis_size(axis_name)
  full = jax.random.uniform(key, (shape[0] * size, *shape[1:]))
  start = jax.lax.axis_index(axis_name) * shape[0]
  return jax.lax.dynamic_slice_in_dim(full, start, shape[0], axis=0)


def select_random(key, eligible, k, *, axis_name=None) -> jax.Array:
  """`k` eligible tokens chosen uniformly at random over the global batch."""
  priority = global_uniform(key, eligible.shape, axis_name=axis_name)
  return select_top_k(priority, eligible, k, axis_name=axis_name)
