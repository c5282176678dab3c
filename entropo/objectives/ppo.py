"""PPO's clipped surrogate and the variants that only change its band.

Per token, with `rho_t = pi(a_t) / pi_old(a_t)`:

    l_t = max(-A_t rho_t, -A_t clip(rho_t, lo, hi))

* PPO (Schulman et al. 2017, arXiv:1707.06347): `[1 - eps, 1 + eps]`;
* DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476):
  `[1 - eps_low, 1 + eps_high]` with `eps_high > eps_low`;
* LOOP (Chen et al. 2025, arXiv:2502.01600): the reciprocal band
  `[1/(1 + eps_low), 1 + eps_high]`;
* the dual clip (Ye et al. 2020, arXiv:1912.09729) caps the loss of
  `A_t < 0` tokens at `-A_t c`.

The band comes from `clip_band`; ties resolve to the unclipped term.
"""

from entropo.objectives import ratio as ratio_lib
from entropo.objectives import registry


@registry.register(
    "ppo", summary="`max(-Aρ, -A clip(ρ, lo, hi))`, optional dual clip "
    "`min(·, -A c)` for `A < 0`; `band=\"additive\"` `[1-ε_low, 1+ε_high]`, "
    "`band=\"reciprocal\"` `[1/(1+ε_low), 1+ε_high]` (LOOP)")
def ppo_terms(x: ratio_lib.TokenInputs, settings=None
              ) -> ratio_lib.PolicyTerms:
  """The clipped surrogate per token, `[B, T]` float32."""
  del settings  # PPO's only settings are the band's (`x.lo`, `x.hi`)
  log_ratio, ratio = ratio_lib.token_ratio(x)
  terms, _, _ = ratio_lib.clipped_surrogate(x, ratio)
  return ratio_lib.PolicyTerms(terms, ratio, log_ratio, {})
