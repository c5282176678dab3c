"""GSPO: PPO's clip on the sequence-level ratio (Zheng et al. 2025,
arXiv:2507.18071).

    s_i = exp( (1/|y_i|) sum_t log(pi(a_t) / pi_old(a_t)) )
    l_i,t = max(-A_i s_i, -A_i clip(s_i, lo, hi))

differentiated through the mean (`gspo`), or with the per-token gradient of
GSPO-token, `s_i,t = sg[s_i] pi(a_t) / sg[pi(a_t)]` (same value). Use
`agg="seq_mean_token_mean"` and the paper's narrow band (clip_low=3e-4,
clip_high=4e-4).
"""

import jax
import jax.numpy as jnp

from entropo.objectives import ratio as ratio_lib
from entropo.objectives import registry


def gspo_terms(x: ratio_lib.TokenInputs, *, token_level: bool = False
               ) -> ratio_lib.PolicyTerms:
  """The clipped surrogate of the sequence ratio, `[B, T]` float32.

  `token_level=True` is GSPO-token: the same value, per-token gradient.
  """
  seq = ratio_lib.sequence_log_ratio(x.logps - x.old_logps, x.mask)  # [B, 1]
  if token_level:
    seq = jax.lax.stop_gradient(seq) + (
        x.logps - jax.lax.stop_gradient(x.logps)
    )
  log_ratio = x.precision.log_ratio(
      jnp.broadcast_to(seq, x.logps.shape), jnp.zeros_like(x.logps)
  )
  ratio = jnp.exp(log_ratio)  # [B, T]
  terms, _, _ = ratio_lib.clipped_surrogate(x, ratio)
  return ratio_lib.PolicyTerms(terms, ratio, log_ratio, {})


@registry.register(
    "gspo", summary="PPO clip on the sequence ratio `exp(mean_t log ρ)`, "
    "gradient through the mean")
def gspo_sequence_terms(x: ratio_lib.TokenInputs, settings=None
                        ) -> ratio_lib.PolicyTerms:
  """GSPO: the sequence ratio's clipped surrogate, differentiated through
  the mean."""
  del settings  # the band's only
  return gspo_terms(x, token_level=False)


@registry.register("gspo_token",
                   summary="same value as `gspo`, per-token gradient")
def gspo_token_terms(x: ratio_lib.TokenInputs, settings=None
                     ) -> ratio_lib.PolicyTerms:
  """GSPO-token: the same value as GSPO, the per-token gradient."""
  del settings  # the band's only
  return gspo_terms(x, token_level=True)
