"""Policy-gradient objectives behind one function, `policy_loss`.

Per token, with the importance ratio `rho = exp(clamp(log pi - log pi_old))`
and the band `[lo, hi]`:

* `reinforce`: `-A log pi` (on-policy REINFORCE / RLOO; `old_logps` is used
  only for metrics).
* `ppo`: `max(-A rho, -A clip(rho, lo, hi))`, with an optional dual clip
  that caps the loss of negative-advantage tokens at `-A c` (c > 1). The
  band is `[1 - clip_low, 1 + clip_high]` (`band="additive"`; asymmetric
  values give DAPO's clip-higher) or `[1/(1 + clip_low), 1 + clip_high]`
  (`band="reciprocal"`; LOOP uses it with clip_low = clip_high = 0.1).
* `gspo`: the PPO clip on the sequence ratio
  `s_i = exp(mean_t (log pi - log pi_old))`, differentiated through the
  mean (GSPO; use `agg="seq_mean_token_mean"` and the paper's narrow band,
  clip_low=3e-4, clip_high=4e-4).
* `gspo_token`: the same value with a per-token gradient,
  `s_i,t = sg[s_i] pi(a_t) / sg[pi(a_t)]`.
* `clip_cov`: PPO, plus: among valid tokens that PPO did not clip (on
  either side of the band, nor by the dual clip) and whose
  covariance `cov_t` lies in `(lo_cov, hi_cov)`, `max(1, floor(r N))` are
  drawn at random over the global batch and their term is detached (zero
  gradient; the original implementation also zeroes their value).
* `kl_cov`: the unclipped `-A rho` everywhere, plus
  `coef |log pi - log pi_old|` on the `max(1, floor(k N))` tokens of largest
  `cov_t` in the global batch.

The advantages and `old_logps` are stop-gradient. Optional
`importance_weights` (e.g. truncated sampler/trainer ratios) multiply each
token's term, stop-gradient. Per-token terms are reduced by `aggregate`, so
the loss is the same however the batch is sharded (`axis_name`).
"""

import jax
import jax.numpy as jnp

from entropo import _checks
from entropo import covariance
from entropo import masking
from entropo import precision as precision_lib

OBJECTIVES = ("reinforce", "ppo", "gspo", "gspo_token", "clip_cov", "kl_cov")
BANDS = ("additive", "reciprocal")


def clip_band(clip_low, clip_high, band: str = "additive"):
  """`(lo, hi)` bounds of the ratio clip for a band type."""
  _checks.check_choice("band", band, BANDS)
  if band == "additive":
    return 1.0 - clip_low, 1.0 + clip_high
  return 1.0 / (1.0 + clip_low), 1.0 + clip_high


def _check_inputs(logps, old_logps, advantages, mask):
  _checks.check_float("logps", logps)
  _checks.check_float("old_logps", old_logps)
  _checks.check_float("advantages", advantages)
  _checks.check_rank("logps", logps, 2)
  _checks.check_same_shape(logps=logps, old_logps=old_logps)
  _checks.check_mask(mask, logps.shape)
  _checks.check_rank("advantages", advantages, (1, 2))
  if advantages.shape not in (logps.shape, logps.shape[:1]):
    raise ValueError(
        f"advantages must be [B] or [B, T] = {logps.shape}; got "
        f"{advantages.shape}."
    )


def _abs_flat_at_zero(x):
  """`|x|` whose derivative at 0 is 0 (the subgradient's centre).

  `jnp.abs` differentiates to +1 at 0. KL-Cov's penalty `|log pi - log
  pi_old|` sits exactly at 0 on every iteration's first update (old log-probs
  are recomputed with the same code), where a +1 would push every selected
  token down by `coef` and cancel much of its policy-gradient signal.
  `sign(x) * x` has the same value and the derivative `sign(x)`.
  """
  return jnp.sign(x) * x


def _sequence_log_ratio(log_ratio, mask):
  """Per-sequence mean log-ratio over valid tokens, `[B, 1]`."""
  tokens = jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.float32)
  total = jnp.sum(jnp.where(mask, log_ratio, 0.0), axis=-1, keepdims=True)
  return masking.safe_divide(total, tokens)


def policy_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    objective: str = "ppo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    band: str = "additive",
    agg: str = "token_mean",
    norm: float | None = None,
    axis_name=None,
    key: jax.Array | None = None,
    clip_cov_ratio: float = 2e-4,
    clip_cov_bounds: tuple[float, float] = (1.0, 5.0),
    kl_cov_ratio: float = 2e-4,
    kl_cov_coef: float = 1.0,
    importance_weights: jax.Array | None = None,
    entropy: jax.Array | None = None,
    precision=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The policy-gradient loss of `objective` and its metrics.

  Args:
    logps: `[B, T]` float, log pi_theta of the taken tokens (differentiated).
    old_logps: `[B, T]` float, log pi_old of the same tokens (stop-gradient).
    advantages: `[B]` or `[B, T]` float (stop-gradient).
    mask: `[B, T]` bool, valid completion tokens.
    objective: one of `OBJECTIVES` (see the module docstring).
    clip_low: epsilon_low of the ratio band.
    clip_high: epsilon_high of the ratio band (may be a traced scalar, e.g.
      ADAPO's controller state).
    dual_clip: optional c > 1 capping negative-advantage losses at `-A c`.
    band: `additive` `[1-eps_low, 1+eps_high]` or `reciprocal`
      `[1/(1+eps_low), 1+eps_high]` (LOOP).
    agg: aggregation mode (see `aggregate`).
    norm: the constant of `seq_mean_token_sum_norm`.
    axis_name: optional mesh axis the batch is split over.
    key: PRNG key, required by `clip_cov` (token choice).
    clip_cov_ratio: fraction r of valid tokens Clip-Cov detaches.
    clip_cov_bounds: `(lo_cov, hi_cov)` covariance window of candidates.
    kl_cov_ratio: fraction k of valid tokens KL-Cov penalises.
    kl_cov_coef: KL-Cov's coefficient on `|log pi - log pi_old|`.
    importance_weights: optional `[B, T]` per-token weights (stop-gradient).
    entropy: optional `[B, T]` token entropy, only for metrics.
    precision: a `Precision` or preset name; decides the log-ratio dtype and
      clamp.

  Returns:
    `(loss, metrics)`: a float32 scalar and a flat dict of float32 scalars
    (`pg/loss`, `pg/clipfrac_low`, `pg/clipfrac_high`, `pg/ratio_mean`,
    `adv/mean`, ...).
  """
  _checks.check_choice("objective", objective, OBJECTIVES)
  _checks.check_choice("agg", agg, masking.AGGREGATION_MODES)
  _check_inputs(logps, old_logps, advantages, mask)
  if dual_clip is not None and isinstance(dual_clip, (int, float)):
    if dual_clip <= 1.0:
      raise ValueError(f"dual_clip must be > 1; got {dual_clip}.")
  if objective == "clip_cov" and key is None:
    raise ValueError("objective='clip_cov' needs key= (random token choice).")
  if importance_weights is not None:
    _checks.check_same_shape(logps=logps,
                             importance_weights=importance_weights)
  policy = precision_lib.get_precision(precision)
  lo, hi = clip_band(clip_low, clip_high, band)

  logps = logps.astype(jnp.float32)
  old = jax.lax.stop_gradient(old_logps.astype(jnp.float32))
  adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
  adv = jnp.broadcast_to(adv if adv.ndim == 2 else adv[:, None], logps.shape)
  # Padding may hold anything (-inf - -inf is nan): zero it before any
  # arithmetic, or a non-finite padded value turns the zero cotangent of a
  # masked token into nan in the backward pass.
  logps = jnp.where(mask, logps, 0.0)
  old = jnp.where(mask, old, 0.0)
  adv = jnp.where(mask, adv, 0.0)

  log_ratio = policy.log_ratio(logps, old)  # [B, T]
  if objective in ("gspo", "gspo_token"):
    seq = _sequence_log_ratio(logps - old, mask)  # [B, 1]
    if objective == "gspo_token":
      seq = jax.lax.stop_gradient(seq) + (
          logps - jax.lax.stop_gradient(logps)
      )
    log_ratio = policy.log_ratio(
        jnp.broadcast_to(seq, logps.shape), jnp.zeros_like(logps)
    )
  ratio = jnp.exp(log_ratio)  # [B, T]

  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, lo, hi)
  # max(unclipped, clipped), with ties resolved to the unclipped term: at a
  # tie (e.g. rho = 1 on the edge of a band with clip_low = 0) jnp.maximum
  # and jnp.clip would each pass half the gradient, where the objective's
  # one-sided derivative on the unclipped side is the whole of it.
  ppo_clipped = clipped > unclipped  # [B, T] tokens PPO gives no gradient
  terms = jnp.where(ppo_clipped, clipped, unclipped)
  if dual_clip is not None:
    dual = (adv < 0) & (terms > -adv * dual_clip)  # [B, T]
    terms = jnp.where(dual, -adv * dual_clip, terms)
    ppo_clipped = ppo_clipped | dual

  metrics = {}
  if objective == "reinforce":
    terms = -adv * logps
  elif objective in ("clip_cov", "kl_cov"):
    cov = covariance.token_covariance(logps, adv, mask, axis_name=axis_name)
    if objective == "clip_cov":
      cov_lo, cov_hi = clip_cov_bounds
      eligible = mask & ~ppo_clipped & (cov > cov_lo) & (cov < cov_hi)
      k = covariance.num_selected(clip_cov_ratio, mask, axis_name=axis_name)
      chosen = covariance.select_random(key, eligible, k, axis_name=axis_name)
      terms = jnp.where(chosen, jax.lax.stop_gradient(terms), terms)
    else:
      k = covariance.num_selected(kl_cov_ratio, mask, axis_name=axis_name)
      chosen = covariance.select_top_k(cov, mask, k, axis_name=axis_name)
      terms = unclipped + jnp.where(
          chosen, kl_cov_coef * _abs_flat_at_zero(log_ratio), 0.0
      )
    metrics["cov/mean"] = masking.masked_mean(cov, mask, axis_name=axis_name)
    metrics["cov/selected_frac"] = masking.masked_mean(
        chosen, mask, axis_name=axis_name
    )
  if importance_weights is not None:
    terms = terms * jax.lax.stop_gradient(
        jnp.where(mask, importance_weights.astype(jnp.float32), 0.0)
    )

  loss = masking.aggregate(terms, mask, mode=agg, axis_name=axis_name,
                           norm=norm)
  metrics.update(
      _ratio_metrics(ratio, log_ratio, adv, mask, lo, hi, dual_clip,
                     axis_name)
  )
  metrics.update(advantage_metrics(adv, mask, axis_name=axis_name))
  if entropy is not None:
    metrics["entropy/mean"] = masking.masked_mean(
        entropy, mask, axis_name=axis_name
    )
  metrics["pg/loss"] = loss
  metrics = masking.scalar_metrics(metrics)
  return loss, metrics


def _ratio_metrics(ratio, log_ratio, adv, mask, lo, hi, dual_clip, axis_name):
  mean = lambda x: masking.masked_mean(x, mask, axis_name=axis_name)
  out = {
      "pg/clipfrac_high": mean((adv > 0) & (ratio > hi)),
      "pg/clipfrac_low": mean((adv < 0) & (ratio < lo)),
      "pg/ratio_mean": mean(ratio),
      "pg/ratio_max": masking.masked_max(ratio, mask, axis_name=axis_name),
      "pg/ratio_min": masking.masked_min(ratio, mask, axis_name=axis_name),
      "pg/log_ratio_abs_mean": mean(jnp.abs(log_ratio)),
      # k3 estimate of KL(pi_old || pi_theta) from samples of pi_old.
      "pg/approx_kl": mean(ratio - 1.0 - log_ratio),
  }
  if dual_clip is not None:
    out["pg/clipfrac_dual"] = mean((adv < 0) & (ratio > dual_clip))
  return out


def advantage_metrics(advantages, mask, *, axis_name=None) -> dict:
  """Mean, std, max, min and sign fractions of the valid advantages."""
  mean = lambda x: masking.masked_mean(x, mask, axis_name=axis_name)
  return {
      "adv/mean": mean(advantages),
      "adv/std": masking.masked_std(advantages, mask, axis_name=axis_name),
      "adv/max": masking.masked_max(advantages, mask, axis_name=axis_name),
      "adv/min": masking.masked_min(advantages, mask, axis_name=axis_name),
      "adv/pos_frac": mean(advantages > 0),
      "adv/zero_frac": mean(advantages == 0),
  }
