"""The importance ratio and its clip: the pieces every objective shares.

Per token, `rho = exp(clamp(log pi - log pi_old))` (the clamp and the dtype
of the difference are the `Precision` policy's), and PPO's clipped surrogate
(Schulman et al. 2017, arXiv:1707.06347)

    l_t = max(-A_t rho_t, -A_t clip(rho_t, lo, hi)),

with an optional dual clip (Ye et al. 2020, arXiv:1912.09729) that caps the
loss of a negative-advantage token at `-A_t c` (c > 1).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from entropo import _checks
from entropo import masking

BANDS = ("additive", "reciprocal")


class TokenInputs(NamedTuple):
  """The cleaned inputs of one objective (see `policy_loss`).

  `logps`, `old_logps` and `advantages` are `[B, T]` float32 with padding
  zeroed; `old_logps` and `advantages` are stop-gradient. `lo`, `hi` are the
  ratio band, `dual_clip` is None or c > 1, `precision` is the `Precision`.
  """

  logps: jax.Array
  old_logps: jax.Array
  advantages: jax.Array
  mask: jax.Array
  lo: jax.Array | float
  hi: jax.Array | float
  dual_clip: float | None
  precision: object
  axis_name: object


class PolicyTerms(NamedTuple):
  """What an objective returns: per-token terms and the ratio behind them.

  `terms` is the `[B, T]` float32 per-token loss (before importance weights
  and aggregation), `ratio` and `log_ratio` the `[B, T]` float32 ratio the
  clip metrics describe, `metrics` the objective's own float32 scalars.
  """

  terms: jax.Array
  ratio: jax.Array
  log_ratio: jax.Array
  metrics: dict


def clip_band(clip_low, clip_high, band: str = "additive"):
  """`(lo, hi)` bounds of the ratio clip for a band type.

  `additive` is `[1 - clip_low, 1 + clip_high]` (asymmetric values give
  DAPO's clip-higher); `reciprocal` is `[1/(1 + clip_low), 1 + clip_high]`
  (LOOP).
  """
  _checks.check_choice("band", band, BANDS)
  if band == "additive":
    return 1.0 - clip_low, 1.0 + clip_high
  return 1.0 / (1.0 + clip_low), 1.0 + clip_high


def token_ratio(x: TokenInputs) -> tuple[jax.Array, jax.Array]:
  """`(log_ratio, ratio)` per token, each `[B, T]` float32."""
  log_ratio = x.precision.log_ratio(x.logps, x.old_logps)  # [B, T]
  return log_ratio, jnp.exp(log_ratio)


def sequence_log_ratio(log_ratio: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-sequence mean of `log_ratio: [B, T]` over valid tokens, `[B, 1]`."""
  tokens = jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.float32)
  total = jnp.sum(jnp.where(mask, log_ratio, 0.0), axis=-1, keepdims=True)
  return masking.safe_divide(total, tokens)


def clipped_surrogate(x: TokenInputs, ratio: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PPO's clipped per-token loss of `ratio: [B, T]`.

  Returns `(terms, unclipped, clipped)`, each `[B, T]`: the loss, `-A rho`,
  and the bool of tokens the clip (or the dual clip) gives no gradient.
  """
  adv = x.advantages
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, x.lo, x.hi)
  # max(unclipped, clipped), with ties resolved to the unclipped term: at a
  # tie (e.g. rho = 1 on the edge of a band with clip_low = 0) jnp.maximum
  # and jnp.clip would each pass half the gradient, where the objective's
  # one-sided derivative on the unclipped side is the whole of it.
  ppo_clipped = clipped > unclipped  # [B, T] tokens PPO gives no gradient
  terms = jnp.where(ppo_clipped, clipped, unclipped)
  if x.dual_clip is not None:
    dual = (adv < 0) & (terms > -adv * x.dual_clip)  # [B, T]
    terms = jnp.where(dual, -adv * x.dual_clip, terms)
    ppo_clipped = ppo_clipped | dual
  return terms, unclipped, ppo_clipped


def ratio_metrics(x: TokenInputs, ratio, log_ratio) -> dict:
  """Clip fractions and ratio statistics over the valid tokens."""
  adv, mask = x.advantages, x.mask
  mean = lambda v: masking.masked_mean(v, mask, axis_name=x.axis_name)
  out = {
      "pg/clipfrac_high": mean((adv > 0) & (ratio > x.hi)),
      "pg/clipfrac_low": mean((adv < 0) & (ratio < x.lo)),
      "pg/ratio_mean": mean(ratio),
      "pg/ratio_max": masking.masked_max(ratio, mask, axis_name=x.axis_name),
      "pg/ratio_min": masking.masked_min(ratio, mask, axis_name=x.axis_name),
      "pg/log_ratio_abs_mean": mean(jnp.abs(log_ratio)),
      # k3 estimate of KL(pi_old || pi_theta) from samples of pi_old.
      "pg/approx_kl": mean(ratio - 1.0 - log_ratio),
  }
  if x.dual_clip is not None:
    out["pg/clipfrac_dual"] = mean((adv < 0) & (ratio > x.dual_clip))
  return out
