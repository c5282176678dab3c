"""Clip-Cov and KL-Cov: covariance-selected tokens (Cui et al. 2025,
arXiv:2505.22617).

With the token covariance `cov_t = (log pi_t - mean)(A_t - mean)` over the
valid tokens of the global batch (`entropo.token_covariance`):

* Clip-Cov: PPO, plus: among valid tokens that PPO did not clip (on either
  side of the band, nor by the dual clip) and whose `cov_t` lies in
  `(lo_cov, hi_cov)`, `max(1, floor(r N))` are drawn at random over the
  global batch and their term is detached (zero gradient; the original
  implementation also zeroes their value).
* KL-Cov: the unclipped `-A_t rho_t` everywhere, plus
  `coef |log pi_t - log pi_old,t|` on the `max(1, floor(k N))` tokens of
  largest `cov_t` in the global batch.
"""

import jax
import jax.numpy as jnp

from entropo import covariance
from entropo import masking
from entropo.objectives import ratio as ratio_lib


def _abs_flat_at_zero(x):
  """`|x|` whose derivative at 0 is 0 (the subgradient's centre).

  `jnp.abs` differentiates to +1 at 0. KL-Cov's penalty `|log pi - log
  pi_old|` sits exactly at 0 on every iteration's first update (old log-probs
  are recomputed with the same code), where a +1 would push every selected
  token down by `coef` and cancel much of its policy-gradient signal.
  `sign(x) * x` has the same value and the derivative `sign(x)`.
  """
  return jnp.sign(x) * x


def _covariance_metrics(x: ratio_lib.TokenInputs, cov, chosen) -> dict:
  return {
      "cov/mean": masking.masked_mean(cov, x.mask, axis_name=x.axis_name),
      "cov/selected_frac": masking.masked_mean(chosen, x.mask,
                                               axis_name=x.axis_name),
  }


def clip_cov_terms(x: ratio_lib.TokenInputs, *, key: jax.Array,
                   ratio: float, bounds: tuple[float, float]
                   ) -> ratio_lib.PolicyTerms:
  """PPO with a random `ratio` of unclipped tokens in `bounds` detached.

  Args:
    x: the objective's inputs.
    key: PRNG key of the random token choice.
    ratio: fraction r of valid tokens to detach.
    bounds: `(lo_cov, hi_cov)`, the covariance window of the candidates.

  Returns:
    The per-token terms `[B, T]` float32, with `cov/mean` and
    `cov/selected_frac` metrics.
  """
  log_ratio, rho = ratio_lib.token_ratio(x)
  terms, _, ppo_clipped = ratio_lib.clipped_surrogate(x, rho)
  cov = covariance.token_covariance(x.logps, x.advantages, x.mask,
                                    axis_name=x.axis_name)  # [B, T]
  cov_lo, cov_hi = bounds
  eligible = x.mask & ~ppo_clipped & (cov > cov_lo) & (cov < cov_hi)
  k = covariance.num_selected(ratio, x.mask, axis_name=x.axis_name)
  chosen = covariance.select_random(key, eligible, k, axis_name=x.axis_name)
  terms = jnp.where(chosen, jax.lax.stop_gradient(terms), terms)
  return ratio_lib.PolicyTerms(terms, rho, log_ratio,
                               _covariance_metrics(x, cov, chosen))


def kl_cov_terms(x: ratio_lib.TokenInputs, *, ratio: float, coef: float
                 ) -> ratio_lib.PolicyTerms:
  """`-A rho` plus `coef |log rho|` on the top `ratio` tokens by covariance.

  Args:
    x: the objective's inputs.
    ratio: fraction k of valid tokens to penalise.
    coef: the coefficient on `|log pi - log pi_old|`.

  Returns:
    The per-token terms `[B, T]` float32, with `cov/mean` and
    `cov/selected_frac` metrics.
  """
  log_ratio, rho = ratio_lib.token_ratio(x)
  cov = covariance.token_covariance(x.logps, x.advantages, x.mask,
                                    axis_name=x.axis_name)  # [B, T]
  k = covariance.num_selected(ratio, x.mask, axis_name=x.axis_name)
  chosen = covariance.select_top_k(cov, x.mask, k, axis_name=x.axis_name)
  terms = -x.advantages * rho + jnp.where(
      chosen, coef * _abs_flat_at_zero(log_ratio), 0.0)
  return ratio_lib.PolicyTerms(terms, rho, log_ratio,
                               _covariance_metrics(x, cov, chosen))
