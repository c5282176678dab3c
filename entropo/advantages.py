"""Group-relative advantage estimators: RLOO, GRPO and Dr.GRPO.

Rewards come as `[P, G]` (P prompts, G completions each) or flat `[B]` with
`group_size=G` (B = P * G, completions of one prompt adjacent). The result
has the shape of the input. In a group whose rewards are all equal every
estimator returns exactly 0 (not a rounding residue), and
`degenerate_groups` flags those groups so a trainer can drop and refill them
(DAPO's dynamic sampling).
"""

import jax
import jax.numpy as jnp
import numpy as np

from entropo import _checks
from entropo import masking

GRPO_SCALES = ("group", "batch", "none")


def _as_groups(rewards, group_size) -> jax.Array:
  """`[P, G]` view of the rewards (float32)."""
  _checks.check_float("rewards", rewards)
  _checks.check_rank("rewards", rewards, (1, 2))
  rewards = rewards.astype(jnp.float32)
  if rewards.ndim == 2:
    if group_size is not None and group_size != rewards.shape[1]:
      raise ValueError(
          f"group_size={group_size} contradicts rewards of shape "
          f"{rewards.shape} ([P, G] with G={rewards.shape[1]})."
      )
    return rewards
  if group_size is None:
    raise ValueError(
        "Flat rewards [B] need group_size=G (completions per prompt); got "
        "group_size=None."
    )
  if not isinstance(group_size, (int, np.integer)) or group_size < 1:
    raise ValueError(f"group_size must be a positive int; got {group_size!r}.")
  if rewards.shape[0] % group_size:
    raise ValueError(
        f"group_size={group_size} does not divide the batch of "
        f"{rewards.shape[0]} rewards; accepted group sizes are the divisors "
        f"of {rewards.shape[0]}."
    )
  return rewards.reshape(-1, group_size)


def _check_group_of_two(groups):
  if groups.shape[1] < 2:
    raise ValueError(
        f"Group-relative advantages need a group size of at least 2; got "
        f"G={groups.shape[1]}."
    )


def degenerate_groups(rewards, *, group_size=None) -> jax.Array:
  """True for each group whose rewards are all equal (no learning signal).

  Args:
    rewards: `[P, G]` float, or `[B]` with `group_size`.
    group_size: G, for flat rewards.

  Returns:
    `[P]` bool.
  """
  groups = _as_groups(rewards, group_size)
  return jnp.max(groups, axis=1) == jnp.min(groups, axis=1)


def _finish(adv, groups, rewards):
  """Exact zeros in degenerate groups, reshaped like the input rewards."""
  flat = (jnp.max(groups, axis=1) == jnp.min(groups, axis=1))[:, None]
  adv = jnp.where(flat, 0.0, adv)
  return adv.reshape(rewards.shape)


def rloo_advantages(rewards, *, group_size=None) -> jax.Array:
  """Leave-one-out advantages `A_i = r_i - mean_{j != i} r_j`.

  Args:
    rewards: `[P, G]` float, or `[B]` with `group_size`. G >= 2.
    group_size: G, for flat rewards.

  Returns:
    float32 advantages, shaped like `rewards`. No gradient flows to rewards
    (they are data).
  """
  groups = jax.lax.stop_gradient(_as_groups(rewards, group_size))  # [P, G]
  _check_group_of_two(groups)
  g = groups.shape[1]
  others = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (g - 1)
  return _finish(groups - others, groups, rewards)


def grpo_advantages(
    rewards,
    *,
    scale: str = "group",
    eps: float = 1e-6,
    ddof: int = 1,
    group_size=None,
    axis_name=None,
) -> jax.Array:
  """GRPO advantages `(r_i - mean(r)) / (std + eps)` and their variants.

  `scale` chooses the denominator:

  * `group`: the group's standard deviation (GRPO).
  * `batch`: the standard deviation of all rewards in the (global) batch,
    keeping group-mean centring (Lite-PPO; TRL's `scale_rewards="batch"`).
  * `none`: no scaling, `r_i - mean(r)` (Dr.GRPO).

  The standard deviation uses `ddof` (1, the unbiased estimate, as TRL and
  verl do; 0 for the population value).

  Args:
    rewards: `[P, G]` float, or `[B]` with `group_size`. G >= 2.
    scale: one of `GRPO_SCALES`.
    eps: added to the standard deviation.
    ddof: delta degrees of freedom of the standard deviation.
    group_size: G, for flat rewards.
    axis_name: mesh axis the prompts are split over (only `batch` scaling
      reduces across groups).

  Returns:
    float32 advantages shaped like `rewards`; exactly 0 in groups whose
    rewards are all equal.
  """
  _checks.check_choice("scale", scale, GRPO_SCALES)
  groups = jax.lax.stop_gradient(_as_groups(rewards, group_size))  # [P, G]
  _check_group_of_two(groups)
  g = groups.shape[1]
  if not 0 <= ddof < g:
    raise ValueError(
        f"ddof={ddof} would divide by {g} - {ddof} <= 0 or inflate the "
        f"standard deviation; accepted: 0 <= ddof < {g} (the group size)."
    )
  centred = groups - jnp.mean(groups, axis=1, keepdims=True)  # [P, G]
  if scale == "group":
    var = jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (g - ddof)
    adv = centred / (jnp.sqrt(var) + eps)
  elif scale == "batch":
    ones = jnp.ones(groups.shape, bool)
    n = masking.masked_count(ones, axis_name=axis_name)
    mean = masking.masked_sum(groups, ones, axis_name=axis_name) / n
    sq = masking.masked_sum(jnp.square(groups - mean), ones,
                            axis_name=axis_name)
    adv = centred / (jnp.sqrt(sq / (n - ddof)) + eps)
  else:
    adv = centred
  return _finish(adv, groups, rewards)
