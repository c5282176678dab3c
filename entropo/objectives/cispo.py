"""CISPO: REINFORCE weighted by the clipped, stop-gradient importance ratio.

Source: MiniMax-M1 (MiniMax 2025, arXiv:2506.13585, §3.1, eq. 4-5), "Clipped
IS-weight Policy Optimization":

    J(θ) = E[ 1/Σ_i|o_i| Σ_i Σ_t sg(r̂_i,t(θ)) Â_i,t log π_θ(o_i,t | q, o_i,<t) ]
    r̂_i,t(θ) = clip(r_i,t(θ), 1 - ε_low^IS, 1 + ε_high^IS),
    r_i,t(θ) = π_θ(o_i,t | ...) / π_old(o_i,t | ...)

so the per-token loss is

    l_t = -sg(clip(ρ_t, 1 - ε_low, 1 + ε_high)) A_t log π(a_t).

Unlike PPO's clip no token loses its gradient: a token whose ratio left the
band keeps the gradient `-A_t ∇log π(a_t)` scaled by the clipped weight
(the paper's point: rare "fork" tokens such as "However" stay trainable).
The paper imposes no lower bound (ε_low^IS large) and tunes ε_high^IS
only, so the defaults are `cispo_eps_low = 1` (weights down to 0, i.e.
unbounded below) and `cispo_eps_high = 0.28` (the paper states no value;
0.28 is DAPO's clip-higher width, which open implementations of CISPO
use). The paper aggregates over all tokens of the batch
(`agg="token_mean"`). CISPO's band is its own: `policy_loss`'s
`clip_low` / `clip_high` / `dual_clip` do not act on it (ADAPO's
controller does not move it); `cispo/clipfrac_low` and
`cispo/clipfrac_high` report how often the weight is clipped.

At ratio 1 (one optax step per batch, old log-probs from the trainer) the
value and gradient are REINFORCE's.
"""

import dataclasses

import jax
import jax.numpy as jnp

from entropo import masking
from entropo.objectives import ratio as ratio_lib
from entropo.objectives import registry


@dataclasses.dataclass(frozen=True, kw_only=True)
class CISPOSettings(registry.Settings):
  """The IS-weight band `[1 - cispo_eps_low, 1 + cispo_eps_high]`."""

  cispo_eps_low: float = registry.setting(
      1.0, "CISPO: the IS weight's lower clip is 1 - eps_low (1: none)",
      low=0, high=1)
  cispo_eps_high: float = registry.setting(
      0.28, "CISPO: the IS weight's upper clip is 1 + eps_high", low=0)


@registry.register(
    "cispo", settings=CISPOSettings, uses_band=False,
    summary="`-sg(clip(ρ, 1-ε_low, 1+ε_high)) A log π` (MiniMax-M1's "
    "CISPO)")
def cispo_terms(x: ratio_lib.TokenInputs, settings: CISPOSettings
                ) -> ratio_lib.PolicyTerms:
  """CISPO's per-token loss, `[B, T]` float32 (formula above)."""
  log_ratio, ratio = ratio_lib.token_ratio(x)  # [B, T]
  lo = 1.0 - settings.cispo_eps_low
  hi = 1.0 + settings.cispo_eps_high
  weight = jax.lax.stop_gradient(jnp.clip(ratio, lo, hi))  # [B, T]
  terms = -weight * x.advantages * x.logps
  mean = lambda v: masking.masked_mean(v, x.mask, axis_name=x.axis_name)
  metrics = {
      "cispo/clipfrac_low": mean(ratio < lo),
      "cispo/clipfrac_high": mean(ratio > hi),
      "cispo/weight_mean": mean(weight),
  }
  return ratio_lib.PolicyTerms(terms, ratio, log_ratio, metrics)
