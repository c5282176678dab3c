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

import dataclasses
import math

import jax
import jax.numpy as jnp

from entropo import covariance
from entropo import masking
from entropo.objectives import ratio as ratio_lib
from entropo.objectives import registry


def _check_window(bounds) -> str | None:
  """Why `bounds` is not a covariance window `(lo, hi)` with lo < hi."""
  if hasattr(bounds, "dtype"):  # traced
    return None
  numbers = (isinstance(bounds, (tuple, list)) and len(bounds) == 2
             and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                     and not math.isnan(b) for b in bounds))
  if numbers and bounds[0] < bounds[1]:
    return None
  return f"must be a pair (lo, hi) of numbers with lo < hi; got {bounds!r}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipCovSettings(registry.Settings):
  """Clip-Cov's settings (Cui et al. 2025 use r = 2e-4, window (1, 5))."""

  clip_cov_ratio: float = registry.setting(
      2e-4, "Clip-Cov: fraction r of valid tokens detached", low=0,
      high=1, low_open=True)
  clip_cov_bounds: tuple[float, float] = registry.setting(
      (1.0, 5.0), "Clip-Cov: covariance window (lo, hi) of the candidates",
      check=_check_window)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KLCovSettings(registry.Settings):
  """KL-Cov's settings (Cui et al. 2025: k = 2e-3 for 7B models; note that
  `policy_loss`'s own `kl_cov_ratio=` keyword defaults to 2e-4)."""

  kl_cov_ratio: float = registry.setting(
      2e-3, "KL-Cov: fraction k of valid tokens penalised", low=0, high=1,
      low_open=True)
  kl_cov_coef: float = registry.setting(
      1.0, "KL-Cov: coefficient of |log pi - log pi_old|", low=0)


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


@registry.register(
    "clip_cov", settings=ClipCovSettings, needs_key=True,
    summary="PPO with `max(1, ⌊rN⌋)` random unclipped tokens in the "
    "covariance window detached")
def clip_cov_objective(x: ratio_lib.TokenInputs, settings: ClipCovSettings,
                       *, key: jax.Array) -> ratio_lib.PolicyTerms:
  """`clip_cov_terms` with its registered settings."""
  return clip_cov_terms(x, key=key, ratio=settings.clip_cov_ratio,
                        bounds=settings.clip_cov_bounds)


@registry.register(
    "kl_cov", settings=KLCovSettings, uses_band=False,
    summary="`-Aρ` plus `coef |log ρ|` on the top `max(1, ⌊kN⌋)` tokens by "
    "covariance")
def kl_cov_objective(x: ratio_lib.TokenInputs, settings: KLCovSettings
                     ) -> ratio_lib.PolicyTerms:
  """`kl_cov_terms` with its registered settings."""
  return kl_cov_terms(x, ratio=settings.kl_cov_ratio,
                      coef=settings.kl_cov_coef)
