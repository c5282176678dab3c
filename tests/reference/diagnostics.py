"""Float64 loop-style references for `entropo.diagnostics`.

Written from method.md (§1 covariance law, §5 precision, §6 pass@k) one
token at a time. Never imports entropo.
"""

import math

import numpy as np


def _valid_tokens(mask):
  """The (b, t) index pairs of valid tokens, row-major."""
  mask = np.asarray(mask)
  out = []
  for b in range(mask.shape[0]):
    for t in range(mask.shape[1]):
      if mask[b, t]:
        out.append((b, t))
  return out


def _mean(values):
  if not values:
    return 0.0
  total = 0.0
  for v in values:
    total += float(v)
  return total / len(values)


def quantile(values, q):
  """Linear-interpolation quantile (numpy's default); 0 for no values."""
  values = sorted(float(v) for v in values)
  n = len(values)
  if n == 0:
    return 0.0
  pos = q * (n - 1)
  lo = int(math.floor(pos))
  hi = min(lo + 1, n - 1)
  frac = pos - lo
  if frac == 0:
    return values[lo]
  return values[lo] + frac * (values[hi] - values[lo])


def entropy_dynamics(logps, advantages, mask, *, entropy=None,
                     step_size=1.0, quantiles=(0.1, 0.25, 0.5, 0.75, 0.9),
                     high_entropy_threshold=math.log(2.0)):
  """Covariance-law diagnostics over valid tokens (population moments)."""
  logps = np.asarray(logps, np.float64)
  advantages = np.asarray(advantages, np.float64)
  tokens = _valid_tokens(mask)

  def adv(b, t):
    return advantages[b] if advantages.ndim == 1 else advantages[b, t]

  lps = [logps[b, t] for b, t in tokens]
  advs = [adv(b, t) for b, t in tokens]
  mean_lp, mean_adv = _mean(lps), _mean(advs)
  cov = _mean([(l - mean_lp) * (a - mean_adv) for l, a in zip(lps, advs)])
  var_lp = _mean([(l - mean_lp) ** 2 for l in lps])
  var_adv = _mean([(a - mean_adv) ** 2 for a in advs])
  denom = math.sqrt(var_lp * var_adv)
  out = {
      "dyn/cov_logp_adv": cov,
      "dyn/corr_logp_adv": cov / denom if denom > 0 else 0.0,
      "dyn/pred_entropy_change": -step_size * cov,
  }
  if entropy is not None:
    entropy = np.asarray(entropy, np.float64)
    ents = [entropy[b, t] for b, t in tokens]
    mean_h = _mean(ents)
    out["entropy/mean"] = mean_h
    out["entropy/std"] = math.sqrt(_mean([(h - mean_h) ** 2 for h in ents]))
    for q in quantiles:
      out[f"entropy/q{round(100 * q):02d}"] = quantile(ents, q)
    out["entropy/high_frac"] = _mean(
        [1.0 if h > high_entropy_threshold else 0.0 for h in ents]
    )
  return out


def precision_mismatch(logps_a, logps_b, mask, *, clip_low=0.2,
                       clip_high=0.2):
  """Ratio bias and phantom clips of `pi_a / pi_b` over valid tokens."""
  logps_a = np.asarray(logps_a, np.float64)
  logps_b = np.asarray(logps_b, np.float64)
  diffs, ratios = [], []
  for b, t in _valid_tokens(mask):
    d = logps_a[b, t] - logps_b[b, t]
    diffs.append(d)
    ratios.append(math.exp(min(max(d, -20.0), 20.0)))
  return {
      "mismatch/ratio_bias": _mean([r - 1.0 for r in ratios]),
      "mismatch/log_ratio_mean": _mean(diffs),
      "mismatch/abs_diff_mean": _mean([abs(d) for d in diffs]),
      "mismatch/max_abs_diff": max((abs(d) for d in diffs), default=0.0),
      "mismatch/phantom_clipfrac_low": _mean(
          [1.0 if r < 1.0 - clip_low else 0.0 for r in ratios]
      ),
      "mismatch/phantom_clipfrac_high": _mean(
          [1.0 if r > 1.0 + clip_high else 0.0 for r in ratios]
      ),
      "mismatch/kl_k3": _mean(
          [1.0 / r - 1.0 + d for r, d in zip(ratios, diffs)]
      ),
  }


def pass_at_k(num_correct, num_samples, k):
  """`1 - C(n - c, k) / C(n, k)` with exact integer binomials."""
  c = np.asarray(num_correct)
  n = np.asarray(num_samples)
  c, n = np.broadcast_arrays(c, n)
  out = np.zeros(c.shape, np.float64)
  for idx in np.ndindex(c.shape):
    ci, ni = int(c[idx]), int(n[idx])
    # math.comb(m, k) is 0 for m < k: all k draws then include a correct one.
    out[idx] = 1.0 - math.comb(ni - ci, k) / math.comb(ni, k)
  return out
