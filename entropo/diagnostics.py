"""Entropy-dynamics and precision diagnostics, and the pass@k estimator.

* `entropy_dynamics`: the batch covariance of log pi and A, whose negative
  is the first-order entropy change of a natural-gradient step (method.md
  §1), with entropy statistics.
* `precision_mismatch`: how far two computations of the same log-probs
  (e.g. bf16 vs float32, sampler vs trainer) disagree, in the units that
  matter for clipping: the ratio bias and the tokens a PPO band would clip
  although the true ratio is 1 ("phantom" clips).
* `sampler_mismatch`: the distances between the sampler's and the trainer's
  distributions that the mismatch literature reports (KL per token and per
  sequence, chi-square, log-perplexity difference, probability
  correlation), estimated from the sampler's own tokens.
* `pass_at_k`: the unbiased estimator `1 - C(n-c, k) / C(n, k)`.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from entropo import _checks
from entropo import masking
from entropo import precision as precision_lib

DEFAULT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
# A token is "high entropy" (a fork) when it spreads more than a fair coin.
DEFAULT_HIGH_ENTROPY_THRESHOLD = math.log(2.0)


def entropy_dynamics(
    logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    entropy: jax.Array | None = None,
    step_size: float = 1.0,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    high_entropy_threshold: float = DEFAULT_HIGH_ENTROPY_THRESHOLD,
    axis_name=None,
) -> dict[str, jax.Array]:
  """Covariance law diagnostics over the valid tokens of the global batch.

  Args:
    logps: `[B, T]` float, log pi of the taken tokens.
    advantages: `[B]` or `[B, T]` float.
    mask: `[B, T]` bool.
    entropy: optional `[B, T]` token entropy; adds `entropy/*` statistics.
    step_size: eta in the prediction `dH ~ -eta * Cov(log pi, A)`.
    quantiles: entropy quantiles to report, in [0, 1], distinct at whole
      percents (keys `entropy/qNN`).
    high_entropy_threshold: nats above which a token counts as high entropy
      (default ln 2).
    axis_name: optional mesh axis the batch is split over.

  Returns:
    Flat dict of float32 scalars: `dyn/cov_logp_adv`, `dyn/corr_logp_adv`,
    `dyn/pred_entropy_change`; with `entropy`: `entropy/mean`, `entropy/std`,
    `entropy/q{percent}`, `entropy/high_frac`.
  """
  _checks.check_float("logps", logps)
  _checks.check_rank("logps", logps, 2)
  _checks.check_nonempty("logps", logps)
  _checks.check_mask(mask, logps.shape)
  _checks.check_float("advantages", advantages)
  _checks.check_rank("advantages", advantages, (1, 2))
  names = [f"entropy/q{round(100 * q):02d}" for q in quantiles]
  if len(set(names)) < len(names) or not all(0 <= q <= 1 for q in quantiles):
    raise ValueError(
        f"quantiles must lie in [0, 1] and be distinct at whole percents "
        f"(they are reported as entropy/qNN); got {tuple(quantiles)}."
    )
  adv = advantages if advantages.ndim == 2 else advantages[:, None]
  adv = jnp.broadcast_to(adv.astype(jnp.float32), logps.shape)
  lp = logps.astype(jnp.float32)
  mean = lambda x: masking.masked_mean(x, mask, axis_name=axis_name)
  lp_c = lp - mean(lp)
  adv_c = adv - mean(adv)
  cov = mean(lp_c * adv_c)
  var_lp, var_adv = mean(jnp.square(lp_c)), mean(jnp.square(adv_c))
  out = {
      "dyn/cov_logp_adv": cov,
      "dyn/corr_logp_adv": masking.safe_divide(cov,
                                               jnp.sqrt(var_lp * var_adv)),
      "dyn/pred_entropy_change": -step_size * cov,
  }
  if entropy is not None:
    _checks.check_float("entropy", entropy)
    _checks.check_same_shape(logps=logps, entropy=entropy)
    ent = entropy.astype(jnp.float32)
    out["entropy/mean"] = mean(ent)
    out["entropy/std"] = masking.masked_std(ent, mask, axis_name=axis_name)
    values = masking.masked_quantiles(ent, mask, quantiles,
                                      axis_name=axis_name)
    for i, name in enumerate(names):
      out[name] = values[i]
    out["entropy/high_frac"] = mean(ent > high_entropy_threshold)
  return masking.scalar_metrics(out)


def precision_mismatch(
    logps_a: jax.Array,
    logps_b: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    axis_name=None,
) -> dict[str, jax.Array]:
  """Disagreement between two computations of the same token log-probs.

  `logps_a` is the computation under test (e.g. bf16 trainer, or sampler)
  and `logps_b` the reference (e.g. float32 trainer). With identical
  parameters the true ratio `pi_a / pi_b` is exactly 1, so any deviation is
  numerical: its mean is the ratio bias of arXiv:2603.11682 (Thm. 3;
  method.md §5), and a token whose ratio leaves `[1 - clip_low,
  1 + clip_high]` would be clipped by PPO for no reason ("phantom" clip).

  Args:
    logps_a: `[B, T]` float.
    logps_b: `[B, T]` float.
    mask: `[B, T]` bool.
    clip_low: epsilon_low of the band.
    clip_high: epsilon_high of the band.
    axis_name: optional mesh axis the batch is split over.

  Returns:
    Flat dict of float32 scalars: `mismatch/ratio_bias` (mean ratio - 1),
    `mismatch/log_ratio_mean`, `mismatch/abs_diff_mean`,
    `mismatch/max_abs_diff`, `mismatch/phantom_clipfrac_low`,
    `mismatch/phantom_clipfrac_high`, `mismatch/kl_k3`.
  """
  _checks.check_float("logps_a", logps_a)
  _checks.check_float("logps_b", logps_b)
  _checks.check_rank("logps_a", logps_a, 2)
  _checks.check_same_shape(logps_a=logps_a, logps_b=logps_b)
  _checks.check_mask(mask, logps_a.shape)
  diff = logps_a.astype(jnp.float32) - logps_b.astype(jnp.float32)
  diff_c = precision_lib.clamp_log_ratio(diff)
  ratio = jnp.exp(diff_c)
  mean = lambda x: masking.masked_mean(x, mask, axis_name=axis_name)
  out = {
      # mean(ratio - 1), not mean(ratio) - 1: expm1 keeps the tiny bias of
      # near-1 ratios exact in float32, and an all-masked batch gives 0.
      "mismatch/ratio_bias": mean(jnp.expm1(diff_c)),
      "mismatch/log_ratio_mean": mean(diff),
      "mismatch/abs_diff_mean": mean(jnp.abs(diff)),
      "mismatch/max_abs_diff": masking.masked_max(jnp.abs(diff), mask,
                                                  axis_name=axis_name),
      "mismatch/phantom_clipfrac_low": mean(ratio < 1.0 - clip_low),
      "mismatch/phantom_clipfrac_high": mean(ratio > 1.0 + clip_high),
      # k3 estimate of KL(pi_b || pi_a) with samples from pi_b: non-negative.
      "mismatch/kl_k3": mean(_k3(diff_c)),
  }
  return masking.scalar_metrics(out)


def sampler_mismatch(
    trainer_logps: jax.Array,
    sampler_logps: jax.Array,
    mask: jax.Array,
    *,
    axis_name=None,
) -> dict[str, jax.Array]:
  """Sampler-vs-trainer distances, estimated on the sampler's tokens.

  With `d_t = log pi_trainer(a_t) - log pi_sampler(a_t)` and
  `r_t = exp(d_t)` (clamped to `|d| <= 20`), tokens drawn from the sampler:

  * `mismatch/kl_token`: `mean_t (r_t - 1 - d_t)`, the k3 estimate of
    `KL(pi_sampler || pi_trainer)` per token (non-negative, unbiased);
  * `mismatch/kl_token_k1`: `mean_t (-d_t)`, its k1 estimate;
  * `mismatch/kl_seq`: the k3 sum over a sequence's tokens, averaged over
    sequences (the sequence-level KL);
  * `mismatch/chi2_token`: `mean_t r_t^2 - 1`, the chi-square divergence
    `chi^2(pi_trainer || pi_sampler)` per token; `mismatch/chi2_seq` the
    same of the sequence ratio `prod_t r_t` (verl's `rollout_corr/chi2_*`);
  * `mismatch/log_ppl_diff`: per sequence, `log PPL_trainer - log
    PPL_sampler = mean_t (-d_t)`, averaged over sequences, and
    `mismatch/log_ppl_abs_diff` the mean of its absolute value;
  * `mismatch/prob_corr`: the Pearson correlation of `pi_trainer(a_t)` and
    `pi_sampler(a_t)` over valid tokens (1 when they agree).

  Token statistics are means over the valid tokens of the global batch,
  sequence statistics over sequences with a valid token; every reduction
  is a global sum over `axis_name`, so sharding changes nothing.

  Args:
    trainer_logps: `[B, T]` float, the trainer's log-probs.
    sampler_logps: `[B, T]` float, the sampler's log-probs.
    mask: `[B, T]` bool.
    axis_name: optional mesh axis the batch is split over.

  Returns:
    Flat dict of float32 scalars (the keys above).
  """
  _checks.check_float("trainer_logps", trainer_logps)
  _checks.check_float("sampler_logps", sampler_logps)
  _checks.check_rank("trainer_logps", trainer_logps, 2)
  _checks.check_same_shape(trainer_logps=trainer_logps,
                           sampler_logps=sampler_logps)
  _checks.check_mask(mask, trainer_logps.shape)
  tr = jnp.where(mask, trainer_logps.astype(jnp.float32), 0.0)
  sa = jnp.where(mask, sampler_logps.astype(jnp.float32), 0.0)
  diff = tr - sa  # [B, T]
  d = precision_lib.clamp_log_ratio(diff)
  k3 = _k3(-d)  # [B, T] r - 1 - d, series-accurate near d = 0
  mean = lambda x: masking.masked_mean(x, mask, axis_name=axis_name)
  rows = jnp.any(mask, axis=-1)  # [B]
  row_mean = lambda x: masking.masked_mean(x, rows, axis_name=axis_name)
  count = jnp.sum(mask, axis=-1, dtype=jnp.float32)  # [B]
  row_sum = lambda x: jnp.sum(jnp.where(mask, x, 0.0), axis=-1)  # [B]
  ppl_diff = masking.safe_divide(-row_sum(diff), count)  # [B]
  seq_log_ratio = precision_lib.clamp_log_ratio(row_sum(diff))  # [B]
  p_t, p_s = jnp.exp(tr), jnp.exp(sa)
  p_t_c, p_s_c = p_t - mean(p_t), p_s - mean(p_s)
  cov = mean(p_t_c * p_s_c)
  var = mean(jnp.square(p_t_c)) * mean(jnp.square(p_s_c))
  out = {
      "mismatch/kl_token": mean(k3),
      "mismatch/kl_token_k1": mean(-diff),
      "mismatch/kl_seq": row_mean(row_sum(k3)),
      # r^2 - 1 = expm1(2d): exact near r = 1, where the bias lives.
      "mismatch/chi2_token": mean(jnp.expm1(2.0 * d)),
      "mismatch/chi2_seq": row_mean(jnp.expm1(2.0 * seq_log_ratio)),
      "mismatch/log_ppl_diff": row_mean(ppl_diff),
      "mismatch/log_ppl_abs_diff": row_mean(jnp.abs(ppl_diff)),
      "mismatch/prob_corr": masking.safe_divide(cov, jnp.sqrt(var)),
  }
  return masking.scalar_metrics(out)


def _k3(d):
  """`exp(-d) - 1 + d`, accurate in float32 for the tiny `d` of rounding.

  The direct form cancels to noise (~1e-7 absolute) when `d ~ 1e-3`, where
  the value is ~5e-7; below |d| = 0.5 its Taylor series to `d^8`
  replaces it (relative error ~1e-6 at worst).
  """
  small = jnp.abs(d) < 0.5
  x = jnp.where(small, d, 0.0)
  series = 1 - x / 8
  for n in (7, 6, 5, 4, 3):
    series = 1 - x / n * series
  series = 0.5 * x * x * series
  return jnp.where(small, series, jnp.expm1(-d) + d)


def pass_at_k(num_correct, num_samples, k: int):
  """Unbiased pass@k, `1 - C(n - c, k) / C(n, k)` (Chen et al., 2021).

  Computed as `1 - prod_{i=0}^{k-1} (n - c - i) / (n - i)`, which is exact
  and never forms a large binomial coefficient.

  Args:
    num_correct: int or int array c (per problem), `0 <= c <= n`.
    num_samples: int or int array n, broadcastable with c; must be >= k.
    k: Python int >= 1.

  Returns:
    float32 array shaped like the broadcast of c and n (scalar for scalars).
  """
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive int; got {k!r}.")
  c = jnp.asarray(num_correct)
  n = jnp.asarray(num_samples)
  for name, x in (("num_correct", c), ("num_samples", n)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"{name} must be integers (counts); got {x.dtype}.")
  # Value checks on whatever is concrete (traced counts are checked by the
  # caller's own data flow).
  concrete = lambda x: (None if isinstance(x, jax.core.Tracer)
                        else np.asarray(x))
  c_np, n_np = concrete(num_correct), concrete(num_samples)
  for name, x in (("num_correct", c_np), ("num_samples", n_np)):
    if x is not None and np.any(x < 0):
      raise ValueError(f"{name} must be >= 0; got {x}.")
  if n_np is not None and np.any(n_np < k):
    raise ValueError(
        f"pass@{k} needs at least k={k} samples per problem; got "
        f"num_samples={n_np}."
    )
  if c_np is not None and n_np is not None and np.any(c_np > n_np):
    raise ValueError(
        f"num_correct must be <= num_samples; got {c_np} > {n_np}."
    )
  c = c.astype(jnp.float32)[..., None]
  n = n.astype(jnp.float32)[..., None]
  i = jnp.arange(k, dtype=jnp.float32)
  factors = jnp.clip((n - c - i) / (n - i), 0.0, 1.0)  # [..., k]
  return 1.0 - jnp.prod(factors, axis=-1)
