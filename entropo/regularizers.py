"""Loss terms added to the policy gradient: entropy bonus and reference KL.

Both return `(loss, metrics)` like `policy_loss`, so a trainer sums losses
and merges metric dicts.
"""

import jax
import jax.numpy as jnp

from entropo import _checks
from entropo import masking

KL_ESTIMATORS = ("k1", "k2", "k3")


def entropy_bonus(
    entropy: jax.Array,
    mask: jax.Array,
    *,
    coef,
    mode: str = "token_mean",
    axis_name=None,
    norm: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Explicit entropy regulariser: loss `-coef * aggregate(H)`.

  Minimising it raises entropy for `coef > 0`. The gradient flows through
  `entropy`, which therefore has to come from the full distribution
  (`token_entropy` or `fused_logprobs_entropy`).

  Args:
    entropy: `[B, T]` float, token entropy (differentiable).
    mask: `[B, T]` bool.
    coef: scalar alpha (Python or traced, e.g. a controller's state).
    mode: aggregation mode.
    axis_name: optional mesh axis the batch is split over.
    norm: the constant of `seq_mean_token_sum_norm`.

  Returns:
    `(loss, {"entropy/mean", "entropy/bonus_coef", "entropy/bonus_loss"})`.
  """
  _checks.check_float("entropy", entropy)
  agg = masking.aggregate(entropy, mask, mode=mode, axis_name=axis_name,
                          norm=norm)
  loss = -coef * agg
  metrics = {
      "entropy/mean": masking.masked_mean(entropy, mask, axis_name=axis_name),
      "entropy/bonus_coef": jnp.asarray(coef, jnp.float32),
      "entropy/bonus_loss": loss,
  }
  metrics = masking.scalar_metrics(metrics)
  return loss.astype(jnp.float32), metrics


def kl_divergence(
    logps: jax.Array,
    ref_logps: jax.Array,
    *,
    estimator: str = "k3",
    clamp: float | None = 10.0,
) -> jax.Array:
  """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta.

  With `d = log pi_ref - log pi_theta` (Schulman's estimators):

  * `k1`: `-d` (unbiased, high variance, can be negative);
  * `k2`: `d^2 / 2` (biased, low variance);
  * `k3`: `exp(d) - d - 1` (unbiased, non-negative).

  `d` is clamped to `[-clamp, clamp]` before use (None disables), which
  keeps `exp` finite when a reference log-prob is far off.

  Args:
    logps: `[B, T]` float, log pi_theta (differentiated).
    ref_logps: `[B, T]` float, log pi_ref (stop-gradient).
    estimator: one of `KL_ESTIMATORS`.
    clamp: bound on `|d|`, or None.

  Returns:
    `[B, T]` float32.
  """
  _checks.check_choice("estimator", estimator, KL_ESTIMATORS)
  _checks.check_float("logps", logps)
  _checks.check_float("ref_logps", ref_logps)
  _checks.check_same_shape(logps=logps, ref_logps=ref_logps)
  d = jax.lax.stop_gradient(ref_logps.astype(jnp.float32)) - logps.astype(
      jnp.float32
  )
  if clamp is not None:
    d = jnp.clip(d, -clamp, clamp)
  if estimator == "k1":
    return -d
  if estimator == "k2":
    return 0.5 * jnp.square(d)
  return jnp.exp(d) - d - 1.0


def kl_penalty(
    logps: jax.Array,
    ref_logps: jax.Array,
    mask: jax.Array,
    *,
    coef,
    estimator: str = "k3",
    mode: str = "token_mean",
    clamp: float | None = 10.0,
    axis_name=None,
    norm: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`coef * aggregate(KL estimate)` to a reference policy.

  Returns:
    `(loss, {"kl/mean", "kl/coef", "kl/loss"})`; `kl/mean` is the token
    mean of the chosen estimator.
  """
  _checks.check_same_shape(logps=logps, ref_logps=ref_logps)
  _checks.check_mask(mask, jnp.shape(logps))
  # Padding may hold anything (-inf - -inf is nan): zero it, or a non-finite
  # padded value turns the zero cotangent of a masked token into nan.
  pad = lambda x: jnp.where(mask, x, jnp.zeros((), jnp.result_type(x)))
  kl = kl_divergence(pad(logps), pad(ref_logps), estimator=estimator,
                     clamp=clamp)
  loss = coef * masking.aggregate(kl, mask, mode=mode, axis_name=axis_name,
                                  norm=norm)
  metrics = {
      "kl/mean": masking.masked_mean(kl, mask, axis_name=axis_name),
      "kl/coef": jnp.asarray(coef, jnp.float32),
      "kl/loss": loss,
  }
  metrics = masking.scalar_metrics(metrics)
  return loss.astype(jnp.float32), metrics
