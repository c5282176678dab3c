"""REPO: regulate entropy by modifying the advantages.

Petrenko, Lipkin et al., "Entropy-Preserving Reinforcement Learning"
(ICLR 2026, arXiv:2603.11682); the working summary is method.md §3.

The family is `A_REPO = A - beta * L` with `L = log pi(a|s) + H(s)` the
centred log-probability of the taken token. Subtracting `beta * L` adds
`+beta * E_pi[pi L^2] >= 0` to the first-order entropy change, so `beta > 0`
pushes entropy up and `beta < 0` pulls it down. `log pi` and `H` are
stop-gradient in every variant: the modification changes the weights of the
policy gradient, never what is differentiated.

Variants:

* `repo_advantages`: the exact, centred form with a given `beta`.
* `repo_r_advantages` (REPO-R, the paper's recommended variant):
  `beta = zeta * |A|` on the raw `log pi`: `A_R = A - zeta |A| log pi`.
* `repo_d_advantages` (REPO-D; a reconstruction, see below).

Advantages may be per sequence `[B]` (broadcast over tokens) or per token
`[B, T]`; the results are `[B, T]` float32.
"""

import jax
import jax.numpy as jnp

from entropo import _checks
from entropo import masking


def _token_advantages(advantages, logps):
  _checks.check_float("advantages", advantages)
  _checks.check_float("logps", logps)
  _checks.check_rank("logps", logps, 2)
  _checks.check_rank("advantages", advantages, (1, 2))
  if advantages.ndim == 1:
    if advantages.shape[0] != logps.shape[0]:
      raise ValueError(
          f"Per-sequence advantages {advantages.shape} do not match logps "
          f"{logps.shape} (expected [B] with B={logps.shape[0]})."
      )
    advantages = advantages[:, None]
  elif advantages.shape != logps.shape:
    raise ValueError(
        f"advantages {advantages.shape} must be [B] or match logps "
        f"{logps.shape}."
    )
  adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
  return jnp.broadcast_to(adv, logps.shape)  # [B, T]


def _centred_logp(logps, entropy):
  _checks.check_float("entropy", entropy)
  _checks.check_same_shape(logps=logps, entropy=entropy)
  return jax.lax.stop_gradient(
      logps.astype(jnp.float32) + entropy.astype(jnp.float32)
  )  # [B, T]


def repo_advantages(advantages, logps, entropy, *, beta) -> jax.Array:
  """Centred REPO: `A - beta * (log pi + H)`, `log pi` and `H` stop-gradient.

  With constant `beta` this is a score-function estimate of the entropy
  bonus `beta * grad H` that needs only sampled-token log-probs.

  Args:
    advantages: `[B]` or `[B, T]` float.
    logps: `[B, T]` float, log pi of the taken tokens under the current
      policy.
    entropy: `[B, T]` float, full-vocabulary entropy at each position.
    beta: scalar (Python or traced).

  Returns:
    `[B, T]` float32.
  """
  adv = _token_advantages(advantages, logps)
  return adv - beta * _centred_logp(logps, entropy)


def repo_r_advantages(
    advantages,
    logps,
    *,
    zeta,
    positive_only: bool = False,
    sign_clamp: bool = True,
    min_logp: float = -20.0,
) -> jax.Array:
  """REPO-R: `A_R = A - zeta * |A| * log pi` (paper's final version).

  For `A > 0` this is `A (1 - zeta log pi)`: rare correct tokens are
  amplified; for `A < 0` it is `A (1 + zeta log pi)`: rare wrong tokens are
  penalised less. `log pi` is stop-gradient and clamped below at `min_logp`.

  Args:
    advantages: `[B]` or `[B, T]` float.
    logps: `[B, T]` float, log pi of the taken tokens.
    zeta: scalar coefficient (Python or traced, e.g. a controller's state).
    positive_only: rescale only positive advantages (the submitted version
      of the paper); negative ones pass through unchanged.
    sign_clamp: keep the sign of `A` (clamp at 0); matters when
      `|zeta log pi| > 1`: for `zeta < 0` on positive advantages, and for
      `zeta > -1 / min_logp` (0.05 at the default clamp) on negative ones.
    min_logp: lower clamp of `log pi`.

  Returns:
    `[B, T]` float32.
  """
  adv = _token_advantages(advantages, logps)
  logp = jnp.maximum(
      jax.lax.stop_gradient(logps.astype(jnp.float32)), min_logp
  )
  out = adv - zeta * jnp.abs(adv) * logp
  if positive_only:
    out = jnp.where(adv > 0, out, adv)
  if sign_clamp:
    out = jnp.where(adv > 0, jnp.maximum(out, 0.0), out)
    out = jnp.where(adv < 0, jnp.minimum(out, 0.0), out)
    out = jnp.where(adv == 0, 0.0, out)
  return out


def repo_d_coefficient(
    advantages, logps, entropy, mask, *, axis_name=None
) -> jax.Array:
  """`Cov(A, L) / Var(L)` over the valid tokens of the global batch.

  The regression coefficient of the advantage on the centred log-prob `L`;
  exactly 0 when `L` is constant over the valid tokens (or none is valid).
  Float32 scalar, stop-gradient.
  """
  adv = _token_advantages(advantages, logps)
  _checks.check_mask(mask, logps.shape)
  # Shifted by a valid value (the global max, exact under sharding): a
  # constant L becomes exactly 0, so Var(L) is exactly 0 rather than a
  # rounding residue of the mean that would make beta arbitrary.
  centred = _centred_logp(logps, entropy)
  centred = centred - masking.masked_max(centred, mask, axis_name=axis_name)
  mean_a = masking.masked_mean(adv, mask, axis_name=axis_name)
  mean_l = masking.masked_mean(centred, mask, axis_name=axis_name)
  cov = masking.masked_mean(
      (adv - mean_a) * (centred - mean_l), mask, axis_name=axis_name
  )
  var = masking.masked_mean(
      jnp.square(centred - mean_l), mask, axis_name=axis_name
  )
  return masking.safe_divide(cov, var)


def repo_d_advantages(
    advantages, logps, entropy, mask, *, zeta, axis_name=None
) -> jax.Array:
  """REPO-D: `A - beta L` with the decorrelating `beta = zeta Cov(A,L)/Var(L)`.

  A reconstruction (the paper defines beta from the entropy change of a
  gradient step; its exact formula was not available): with `zeta = 1` the
  batch covariance between the modified advantage and `L` is exactly 0, so
  the first-order entropy change of a natural-gradient step vanishes;
  `zeta < 1` removes only part of the entropy-reducing correlation, and
  `zeta > 1` reverses it. Statistics are over the valid tokens of the global
  batch (`axis_name`), so sharding does not change the result.

  Args:
    advantages: `[B]` or `[B, T]` float.
    logps: `[B, T]` float, log pi of the taken tokens.
    entropy: `[B, T]` float, token entropy.
    mask: `[B, T]` bool, valid tokens.
    zeta: scalar coefficient.
    axis_name: optional mesh axis the batch is split over.

  Returns:
    `[B, T]` float32 (masked positions hold the unmodified advantage).
  """
  beta = zeta * repo_d_coefficient(
      advantages, logps, entropy, mask, axis_name=axis_name
  )
  modified = repo_advantages(advantages, logps, entropy, beta=beta)
  return jnp.where(mask, modified, _token_advantages(advantages, logps))
