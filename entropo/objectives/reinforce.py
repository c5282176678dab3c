"""REINFORCE (Williams 1992) with any baseline, e.g. RLOO.

Per token, `l_t = -A_t log pi(a_t)`: on-policy, no ratio (RLOO: Ahmadian et
al. 2024, arXiv:2402.14740). The ratio to `old_logps` is computed only for
the clip metrics.
"""

from entropo.objectives import ratio as ratio_lib
from entropo.objectives import registry


@registry.register("reinforce", uses_band=False, summary="`-A log π`")
def reinforce_terms(x: ratio_lib.TokenInputs, settings=None
                    ) -> ratio_lib.PolicyTerms:
  """`-A log pi` per token, `[B, T]` float32."""
  del settings  # none
  log_ratio, ratio = ratio_lib.token_ratio(x)
  return ratio_lib.PolicyTerms(-x.advantages * x.logps, ratio, log_ratio, {})
