"""Sampler/trainer mismatch corrections: importance weights per token.

In a real RL stack the sampler (vLLM, SGLang, or here a sampler under its
own precision preset) and the trainer compute different probabilities for
the same tokens under the same parameters. Every correction here is a
function of the *behaviour-to-old* ratio

    r_t = pi_old(a_t | s_t) / pi_sampler(a_t | s_t),

the trainer's own probability at the start of the iteration (theta_old)
over the sampler's, at the same parameters. It returns a stop-gradient
weight `w_t` that multiplies the objective's per-token term:

    l_t = w_t * objective_t(rho_t),        rho_t = pi_theta / pi_old,

so it composes *outside* the PPO clip of the old-to-current ratio
`rho_t` (the decoupled objective of Hilton et al. 2021, arXiv:2110.00641,
and of AReaL, Fu et al. 2025, arXiv:2505.24298), and applies unchanged to
every objective of `entropo.policy_loss` (through `importance_weights`).
A token whose weight is 0 carries no loss and no gradient, but it stays in
the aggregation's denominator (as in IcePop, where the masked term is zero
inside the same token sum), so masking never rescales the other tokens.

Levels (`LEVELS`), each giving the ratio `R` the mode acts on:

* `token`: `R_t = r_t`.
* `sequence`: `R_i = prod_t r_t = exp(sum_t log r_t)` over the valid
  tokens of sequence i, broadcast to its tokens (the exact sequence-level
  importance ratio; verl's `rollout_is="sequence"`).
* `geometric`: `R_i = exp(mean_t log r_t)` (the geometric mean, length
  independent; verl's `"geometric"` level, GSPO's normalisation).

Modes (`MODES`), with band `[low, high]`:

* `truncate`: `w = min(R, high)`. Token level is truncated importance
  sampling (TIS; Yao, Liu et al. 2025, "Your Efficient RL Framework
  Secretly Brings You Off-Policy RL Training", fengyao.notion.site/off-
  policy-rl), sequence level its sequence form (verl
  `rollout_corr_helper.py`, `rollout_is` truncate).
* `mask`: `w = R if low <= R <= high else 0`. Token level is IcePop's
  two-sided masking (Ling team 2025, "Every Step Evolves: Scaling RL for
  Trillion-Scale Thinking Model", arXiv:2510.18855, with alpha = 0.5,
  beta = 5); sequence level is masked importance sampling (MIS; Liu, Li et
  al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the
  Training-Inference Mismatch", yingru.notion.site).
* `reject`: `w = 1 if low <= R <= high else 0`: rejection sampling, the
  surviving tokens unweighted (verl `rollout_rs` at the token, sequence or
  geometric level).
* `none`: `w = 1` (only the sequence rejections below act).

Sequence rejections, applied after the mode (a rejected sequence has
`w = 0` on every token):

* `veto`: reject a sequence if any valid token has `r_t < veto` (verl's
  `rollout_token_veto_threshold`, catastrophic tokens, e.g. 1e-4).
* `max_kl`: reject a sequence whose mean per-token k3 estimate of
  `KL(pi_sampler || pi_old)`, `mean_t (r_t - 1 - log r_t)`, exceeds
  `max_kl` (a mismatch threshold in nats per token).

When sampler and trainer agree (`r = 1`) every correction with
`low <= 1 <= high` (and `veto < 1`, `max_kl >= 0`) gives `w = 1`: the
uncorrected loss. Log-ratios are clamped to `[-20, 20]` before `exp`.
"""

import jax
import jax.numpy as jnp

from entropo import _checks
from entropo import masking
from entropo import precision as precision_lib

LEVELS = ("token", "sequence", "geometric")
MODES = ("none", "truncate", "mask", "reject")
# The names `entropo` exports them under.
CORRECTION_LEVELS, CORRECTION_MODES = LEVELS, MODES


def check_settings(*, level, mode, low, high, veto, max_kl) -> None:
  """Raises ValueError naming a bad setting of `mismatch_correction`."""
  _checks.check_choice("level", level, LEVELS)
  _checks.check_choice("mode", mode, MODES)
  if mode == "truncate" and not high >= 1:
    raise ValueError(f"mode='truncate' needs high >= 1; got {high}.")
  if mode in ("mask", "reject") and not 0 <= low <= 1 <= high:
    raise ValueError(f"mode={mode!r} needs 0 <= low <= 1 <= high; got "
                     f"low={low}, high={high}.")
  if veto is not None and not 0 < veto < 1:
    raise ValueError(f"veto must be in (0, 1) or None; got {veto}.")
  if max_kl is not None and not max_kl >= 0:
    raise ValueError(f"max_kl must be >= 0 or None; got {max_kl}.")


def level_log_ratio(log_r: jax.Array, mask: jax.Array, level: str
                    ) -> jax.Array:
  """The log of the level's ratio `R`, `[B, T]` float32 (unclamped).

  Args:
    log_r: `[B, T]` float32 per-token `log r_t`, zero on padding.
    mask: `[B, T]` bool.
    level: one of `LEVELS`.
  """
  if level == "token":
    return log_r
  total = jnp.sum(jnp.where(mask, log_r, 0.0), axis=-1, keepdims=True)
  if level == "geometric":
    count = jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.float32)
    total = masking.safe_divide(total, count)
  return jnp.broadcast_to(total, log_r.shape)  # [B, T]


def _sequence_rejected(log_r, mask, *, veto, max_kl):
  """`[B, 1]` bool: sequences the veto or the KL threshold rejects."""
  rejected = jnp.zeros(mask.shape[:1] + (1,), bool)
  if veto is not None:
    low_token = mask & (log_r < jnp.log(jnp.float32(veto)))
    rejected = rejected | jnp.any(low_token, axis=-1, keepdims=True)
  if max_kl is not None:
    k3 = jnp.where(mask, jnp.expm1(log_r) - log_r, 0.0)  # [B, T]
    count = jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.float32)
    seq_kl = masking.safe_divide(jnp.sum(k3, axis=-1, keepdims=True), count)
    rejected = rejected | (seq_kl > max_kl)
  return rejected


def mismatch_correction(
    old_logps: jax.Array,
    sampler_logps: jax.Array,
    mask: jax.Array,
    *,
    level: str = "token",
    mode: str = "truncate",
    low: float = 0.0,
    high: float = 2.0,
    veto: float | None = None,
    max_kl: float | None = None,
    axis_name=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Importance weights that correct the sampler/trainer mismatch.

  See the module docstring for the formulas and their sources.

  Args:
    old_logps: `[B, T]` float, log pi_old of the sampled tokens under the
      trainer's own computation (stop-gradient).
    sampler_logps: `[B, T]` float, the sampler's log-probs of the same
      tokens (stop-gradient).
    mask: `[B, T]` bool, valid completion tokens.
    level: `token`, `sequence` (product of ratios) or `geometric` (their
      geometric mean).
    mode: `truncate`, `mask`, `reject` or `none`.
    low, high: the band `[low, high]` (`truncate` uses `high` only).
    veto: optional token-ratio threshold in (0, 1) that rejects a sequence.
    max_kl: optional per-token KL threshold (nats) that rejects a sequence.
    axis_name: optional mesh axis the batch is split over (metrics only;
      the weights are per sequence and need no collective).

  Returns:
    `(weights, metrics)`: `weights` `[B, T]` float32, 0 on padding, and a
    flat dict of float32 scalars: `corr/weight_mean`, `corr/ess` (the
    normalised effective sample size `(mean w)^2 / mean w^2` over valid
    tokens, 1 when every weight is equal), `corr/truncated_frac`,
    `corr/masked_frac`, `corr/rejected_frac` (fractions of valid tokens),
    `corr/seq_masked_frac` and `corr/seq_rejected_frac` (fractions of
    sequences with a valid token that carry no loss at all, and that a
    rejection removed).
  """
  _checks.check_float("old_logps", old_logps)
  _checks.check_float("sampler_logps", sampler_logps)
  _checks.check_rank("old_logps", old_logps, 2)
  _checks.check_same_shape(old_logps=old_logps, sampler_logps=sampler_logps)
  _checks.check_mask(mask, old_logps.shape)
  check_settings(level=level, mode=mode, low=low, high=high, veto=veto,
                  max_kl=max_kl)
  old = jax.lax.stop_gradient(old_logps.astype(jnp.float32))
  sampler = jax.lax.stop_gradient(sampler_logps.astype(jnp.float32))
  log_r = jnp.where(mask, old - sampler, 0.0)  # [B, T] log r_t
  ratio = jnp.exp(precision_lib.clamp_log_ratio(
      level_log_ratio(log_r, mask, level)))  # [B, T] R
  in_band = (ratio >= low) & (ratio <= high)
  truncated = jnp.zeros(mask.shape, bool)
  if mode == "truncate":
    truncated = ratio > high
    weights = jnp.minimum(ratio, high)
  elif mode == "mask":
    weights = jnp.where(in_band, ratio, 0.0)
  elif mode == "reject":
    weights = jnp.where(in_band, 1.0, 0.0)
  else:
    weights = jnp.ones(mask.shape, jnp.float32)
  masked = (mode in ("mask", "reject")) & ~in_band
  rejected = jnp.broadcast_to(_sequence_rejected(
      precision_lib.clamp_log_ratio(log_r), mask, veto=veto, max_kl=max_kl),
                              mask.shape)  # [B, T]
  weights = jnp.where(mask & ~rejected, weights, 0.0)
  metrics = _correction_metrics(weights, mask, truncated=truncated,
                                masked=masked, rejected=rejected,
                                axis_name=axis_name)
  return jax.lax.stop_gradient(weights), metrics


def _correction_metrics(weights, mask, *, truncated, masked, rejected,
                        axis_name) -> dict:
  mean = lambda x: masking.masked_mean(x, mask, axis_name=axis_name)
  valid_seq = jnp.any(mask, axis=-1)  # [B]
  dead_seq = ~jnp.any(mask & (weights != 0), axis=-1)  # [B]
  seq_mean = lambda x: masking.masked_mean(x, valid_seq,
                                           axis_name=axis_name)
  w_mean = mean(weights)
  return masking.scalar_metrics({
      "corr/weight_mean": w_mean,
      # <= 1 by Cauchy-Schwarz; the min only removes float32 rounding.
      "corr/ess": jnp.minimum(masking.safe_divide(
          jnp.square(w_mean), mean(jnp.square(weights))), 1.0),
      "corr/truncated_frac": mean(truncated),
      "corr/masked_frac": mean(masked & ~rejected),
      "corr/rejected_frac": mean(rejected),
      "corr/seq_masked_frac": seq_mean(dead_seq),
      "corr/seq_rejected_frac": seq_mean(rejected[:, 0]),
  })
