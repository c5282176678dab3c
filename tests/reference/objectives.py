"""Float64 loop-style references for masking, objectives and regularizers.

Written from method.md §2 one token, one sequence at a time, with explicit
if/else for every clipping decision. Never imports entropo. Gradients are
analytic, token by token (a finite-difference check of these analytic
gradients against the reference losses lives in the tests).

Conventions: `logps`, `old_logps`, `mask` are `[B][T]` nested arrays;
`advantages` is `[B]` or `[B, T]`; every function returns Python floats or
float64 arrays.
"""

import math

import numpy as np

MAX_LOG_RATIO = 20.0


def _adv(advantages, b, t):
  advantages = np.asarray(advantages, np.float64)
  return float(advantages[b] if advantages.ndim == 1 else advantages[b, t])


def _valid(mask):
  mask = np.asarray(mask)
  out = []
  for b in range(mask.shape[0]):
    for t in range(mask.shape[1]):
      if mask[b, t]:
        out.append((b, t))
  return out


# --------------------------------------------------------------------------
# Masked reductions and aggregation.


def safe_divide(num, den):
  return 0.0 if den == 0 else num / den


def masked_mean(x, mask):
  total, count = 0.0, 0
  for b, t in _valid(mask):
    total += float(x[b][t])
    count += 1
  return safe_divide(total, count)


def masked_max(x, mask):
  best = None
  for b, t in _valid(mask):
    v = float(x[b][t])
    if best is None or v > best:
      best = v
  return 0.0 if best is None else best


def masked_min(x, mask):
  best = None
  for b, t in _valid(mask):
    v = float(x[b][t])
    if best is None or v < best:
      best = v
  return 0.0 if best is None else best


def masked_std(x, mask):
  """Population standard deviation over valid entries (0 when none)."""
  mean = masked_mean(x, mask)
  total, count = 0.0, 0
  for b, t in _valid(mask):
    total += (float(x[b][t]) - mean) ** 2
    count += 1
  return math.sqrt(safe_divide(total, count))


def aggregate_terms(values, mask, mode, norm=None):
  """(numerator, denominator) of one (micro-)batch, spelled out per mode."""
  mask = np.asarray(mask)
  num_rows, num_cols = mask.shape
  if mode == "token_mean":
    num, den = 0.0, 0.0
    for b in range(num_rows):
      for t in range(num_cols):
        if mask[b, t]:
          num += float(values[b][t])
          den += 1.0
    return num, den
  if mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
    num, den = 0.0, 0.0
    for b in range(num_rows):
      row_sum, row_count = 0.0, 0
      for t in range(num_cols):
        if mask[b, t]:
          row_sum += float(values[b][t])
          row_count += 1
      if row_count == 0:
        continue  # a fully masked row is not a sequence
      if mode == "seq_mean_token_mean":
        num += row_sum / row_count
      else:
        num += row_sum
      den += 1.0
    return num, den
  if mode == "seq_mean_token_sum_norm":
    norm = num_cols if norm is None else norm
    num = 0.0
    for b in range(num_rows):
      for t in range(num_cols):
        if mask[b, t]:
          num += float(values[b][t])
    return num, float(num_rows * norm)
  raise ValueError(mode)


def aggregate(values, mask, mode, norm=None):
  num, den = aggregate_terms(values, mask, mode, norm)
  return safe_divide(num, den)


def aggregation_weights(mask, mode, norm=None):
  """`w[b, t]` with `aggregate(v) = sum_bt w[b, t] v[b, t]` (it is linear)."""
  mask = np.asarray(mask)
  num_rows, num_cols = mask.shape
  w = np.zeros(mask.shape, np.float64)
  counts = [int(sum(bool(mask[b, t]) for t in range(num_cols)))
            for b in range(num_rows)]
  total = sum(counts)
  rows = sum(1 for c in counts if c > 0)
  for b in range(num_rows):
    for t in range(num_cols):
      if not mask[b, t]:
        continue
      if mode == "token_mean":
        w[b, t] = 1.0 / total
      elif mode == "seq_mean_token_mean":
        w[b, t] = 1.0 / (rows * counts[b])
      elif mode == "seq_mean_token_sum":
        w[b, t] = 1.0 / rows
      elif mode == "seq_mean_token_sum_norm":
        w[b, t] = 1.0 / (num_rows * (num_cols if norm is None else norm))
      else:
        raise ValueError(mode)
  return w


# --------------------------------------------------------------------------
# Per-token PPO pieces.


def band(clip_low, clip_high, kind="additive"):
  if kind == "additive":
    return 1.0 - clip_low, 1.0 + clip_high
  if kind == "reciprocal":
    return 1.0 / (1.0 + clip_low), 1.0 + clip_high
  raise ValueError(kind)


def clamped_log_ratio(diff, bound=MAX_LOG_RATIO):
  """(clamped value, derivative of the clamp) of one log-ratio."""
  if diff > bound:
    return bound, 0.0
  if diff < -bound:
    return -bound, 0.0
  return diff, 1.0


def ppo_token(ratio, a, lo, hi, dual_clip=None):
  """(term, d term / d ratio, kind) of one token of the PPO loss.

  kind is "high" (A > 0 clipped above), "low" (A < 0 clipped below),
  "dual" (A < 0 capped by the dual clip) or "none".
  """
  if a > 0 and ratio > hi:
    term, slope, kind = -a * hi, 0.0, "high"
  elif a < 0 and ratio < lo:
    term, slope, kind = -a * lo, 0.0, "low"
  else:
    term, slope, kind = -a * ratio, -a, "none"
  if dual_clip is not None and a < 0 and term > -a * dual_clip:
    term, slope, kind = -a * dual_clip, 0.0, "dual"
  return term, slope, kind


def token_covariance(logps, advantages, mask):
  """`cov[b, t] = (lp - mean lp)(A - mean A)` over valid tokens; 0 elsewhere."""
  tokens = _valid(mask)
  n = len(tokens)
  mean_lp = safe_divide(sum(float(logps[b][t]) for b, t in tokens), n)
  mean_a = safe_divide(sum(_adv(advantages, b, t) for b, t in tokens), n)
  mask = np.asarray(mask)
  cov = np.zeros(mask.shape, np.float64)
  for b, t in tokens:
    cov[b, t] = (float(logps[b][t]) - mean_lp) * (
        _adv(advantages, b, t) - mean_a)
  return cov


def num_selected(ratio, mask):
  n = len(_valid(mask))
  return max(1, int(math.floor(ratio * n)))


def top_k_tokens(scores, mask, k):
  """The set of (b, t) of the k valid tokens with the largest scores."""
  ranked = sorted(_valid(mask), key=lambda bt: -float(scores[bt[0]][bt[1]]))
  return set(ranked[:k])


def clip_cov_candidates(logps, old_logps, advantages, mask, *, clip_low,
                        clip_high, band_kind="additive", dual_clip=None,
                        bounds=(1.0, 5.0)):
  """Valid tokens inside the covariance window that PPO left unclipped."""
  lo, hi = band(clip_low, clip_high, band_kind)
  cov = token_covariance(logps, advantages, mask)
  out = set()
  for b, t in _valid(mask):
    lr, _ = clamped_log_ratio(float(logps[b][t]) - float(old_logps[b][t]))
    _, _, kind = ppo_token(math.exp(lr), _adv(advantages, b, t), lo, hi,
                           dual_clip)
    if kind == "none" and bounds[0] < cov[b, t] < bounds[1]:
      out.add((b, t))
  return out


# --------------------------------------------------------------------------
# The policy loss.


def policy_loss(logps, old_logps, advantages, mask, *, objective="ppo",
                clip_low=0.2, clip_high=0.2, dual_clip=None,
                band_kind="additive", agg="token_mean", norm=None,
                importance_weights=None, detached=(), kl_cov_ratio=2e-4,
                kl_cov_coef=1.0):
  """(loss, d loss / d logps [B, T], per-token ratio [B, T]) in float64.

  `detached` is the set of (b, t) whose term is stop-gradient (clip_cov's
  random choice, which a reference cannot replicate, is passed in).
  """
  logps = np.asarray(logps, np.float64)
  old_logps = np.asarray(old_logps, np.float64)
  mask = np.asarray(mask)
  num_rows, num_cols = mask.shape
  lo, hi = band(clip_low, clip_high, band_kind)
  weights = aggregation_weights(mask, agg, norm)
  iw = np.ones(mask.shape) if importance_weights is None else np.asarray(
      importance_weights, np.float64)

  terms = np.zeros(mask.shape)
  grad = np.zeros(mask.shape)
  ratios = np.ones(mask.shape)

  if objective in ("gspo", "gspo_token"):
    for b in range(num_rows):
      valid = [t for t in range(num_cols) if mask[b, t]]
      if not valid:
        continue
      mean_lr = sum(logps[b, t] - old_logps[b, t] for t in valid) / len(valid)
      seq_lr, dclamp = clamped_log_ratio(mean_lr)
      s = math.exp(seq_lr)
      for t in valid:
        term, slope, _ = ppo_token(s, _adv(advantages, b, t), lo, hi,
                                   dual_clip)
        terms[b, t] = term * iw[b, t]
        ratios[b, t] = s
        # d term_t / d seq_lr = slope * s * dclamp.
        d_seq = weights[b, t] * iw[b, t] * slope * s * dclamp
        if objective == "gspo":
          for u in valid:  # seq_lr depends on every token of the row
            grad[b, u] += d_seq / len(valid)
        else:  # gspo_token: s_i,t = sg[s_i] pi_t / sg[pi_t]
          grad[b, t] += d_seq
    loss = aggregate(terms, mask, agg, norm)
    return loss, grad, ratios

  if objective == "kl_cov":
    cov = token_covariance(logps, advantages, mask)
    chosen = top_k_tokens(cov, mask, num_selected(kl_cov_ratio, mask))
  for b, t in _valid(mask):
    a = _adv(advantages, b, t)
    lr, dclamp = clamped_log_ratio(logps[b, t] - old_logps[b, t])
    rho = math.exp(lr)
    ratios[b, t] = rho
    if objective == "reinforce":
      term, dterm = -a * logps[b, t], -a
    elif objective in ("ppo", "clip_cov"):
      term, slope, _ = ppo_token(rho, a, lo, hi, dual_clip)
      dterm = slope * rho * dclamp
      if objective == "clip_cov" and (b, t) in detached:
        dterm = 0.0
    elif objective == "kl_cov":
      term, dterm = -a * rho, -a * rho * dclamp
      if (b, t) in chosen:
        term += kl_cov_coef * abs(lr)
        sign = 1.0 if lr > 0 else (-1.0 if lr < 0 else 0.0)
        dterm += kl_cov_coef * sign * dclamp
    else:
      raise ValueError(objective)
    terms[b, t] = term * iw[b, t]
    grad[b, t] = weights[b, t] * iw[b, t] * dterm
  return aggregate(terms, mask, agg, norm), grad, ratios


def policy_metrics(logps, old_logps, advantages, mask, *, clip_low=0.2,
                   clip_high=0.2, band_kind="additive", dual_clip=None,
                   sequence_ratio=False):
  """The ratio and advantage metrics of `policy_loss`, token by token."""
  logps = np.asarray(logps, np.float64)
  old_logps = np.asarray(old_logps, np.float64)
  mask = np.asarray(mask)
  lo, hi = band(clip_low, clip_high, band_kind)
  ratio = np.zeros(mask.shape)
  log_ratio = np.zeros(mask.shape)
  adv = np.zeros(mask.shape)
  for b in range(mask.shape[0]):
    valid = [t for t in range(mask.shape[1]) if mask[b, t]]
    seq_lr = 0.0
    if valid:
      seq_lr = sum(logps[b, t] - old_logps[b, t] for t in valid) / len(valid)
    for t in valid:
      raw = seq_lr if sequence_ratio else logps[b, t] - old_logps[b, t]
      log_ratio[b, t], _ = clamped_log_ratio(raw)
      ratio[b, t] = math.exp(log_ratio[b, t])
      adv[b, t] = _adv(advantages, b, t)

  def frac(pred):
    hits = 0
    tokens = _valid(mask)
    for b, t in tokens:
      if pred(b, t):
        hits += 1
    return safe_divide(hits, len(tokens))

  out = {
      "pg/clipfrac_high": frac(lambda b, t: adv[b, t] > 0 and ratio[b, t] > hi),
      "pg/clipfrac_low": frac(lambda b, t: adv[b, t] < 0 and ratio[b, t] < lo),
      "pg/ratio_mean": masked_mean(ratio, mask),
      "pg/ratio_max": masked_max(ratio, mask),
      "pg/ratio_min": masked_min(ratio, mask),
      "pg/log_ratio_abs_mean": masked_mean(np.abs(log_ratio), mask),
      "pg/approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
      "adv/mean": masked_mean(adv, mask),
      "adv/std": masked_std(adv, mask),
      "adv/max": masked_max(adv, mask),
      "adv/min": masked_min(adv, mask),
      "adv/pos_frac": frac(lambda b, t: adv[b, t] > 0),
      "adv/zero_frac": frac(lambda b, t: adv[b, t] == 0),
  }
  if dual_clip is not None:
    out["pg/clipfrac_dual"] = frac(
        lambda b, t: adv[b, t] < 0 and ratio[b, t] > dual_clip)
  return out


def gspo_sequence_loss(logps, old_logps, seq_advantages, mask, *, clip_low,
                       clip_high):
  """GSPO's sequence objective, negated: mean_i -min(s_i A_i, clip(s_i) A_i).

  Averaged over sequences with at least one valid token.
  """
  total, rows = 0.0, 0
  for b in range(len(seq_advantages)):
    valid = [t for t in range(len(mask[b])) if mask[b][t]]
    if not valid:
      continue
    mean_lr = sum(float(logps[b][t]) - float(old_logps[b][t])
                  for t in valid) / len(valid)
    s = math.exp(mean_lr)
    a = float(seq_advantages[b])
    clipped_s = min(max(s, 1.0 - clip_low), 1.0 + clip_high)
    total += -min(s * a, clipped_s * a)
    rows += 1
  return safe_divide(total, rows)


def gspo_sequence_grad(logps, old_logps, seq_advantages, mask, *, clip_low,
                       clip_high):
  """GSPO paper's gradient of the negated objective above, per token.

  `-(1/G) s_i A_i (1/|y_i|) grad log pi(y_i,t)` on sequences the clip left
  alone, 0 on clipped ones.
  """
  mask = np.asarray(mask)
  grad = np.zeros(mask.shape)
  rows = sum(1 for b in range(mask.shape[0]) if mask[b].any())
  for b in range(mask.shape[0]):
    valid = [t for t in range(mask.shape[1]) if mask[b, t]]
    if not valid:
      continue
    mean_lr = sum(float(logps[b][t]) - float(old_logps[b][t])
                  for t in valid) / len(valid)
    s = math.exp(mean_lr)
    a = float(seq_advantages[b])
    clipped = (a > 0 and s > 1.0 + clip_high) or (a < 0 and s < 1.0 - clip_low)
    for t in valid:
      grad[b, t] = 0.0 if clipped else -s * a / (len(valid) * rows)
  return grad


# --------------------------------------------------------------------------
# Regularizers.


def kl_token(logp, ref_logp, estimator, clamp=10.0):
  """(estimate, d estimate / d logp) of KL(pi || ref) at one token."""
  d = float(ref_logp) - float(logp)
  dd = -1.0  # d d / d logp
  if clamp is not None:
    if d > clamp:
      d, dd = clamp, 0.0
    elif d < -clamp:
      d, dd = -clamp, 0.0
  if estimator == "k1":
    return -d, -dd
  if estimator == "k2":
    return 0.5 * d * d, d * dd
  if estimator == "k3":
    return math.exp(d) - d - 1.0, (math.exp(d) - 1.0) * dd
  raise ValueError(estimator)


def kl_divergence(logps, ref_logps, estimator, clamp=10.0):
  """(values [B, T], gradients [B, T])."""
  logps = np.asarray(logps, np.float64)
  out = np.zeros(logps.shape)
  grad = np.zeros(logps.shape)
  for b in range(logps.shape[0]):
    for t in range(logps.shape[1]):
      out[b, t], grad[b, t] = kl_token(logps[b, t], ref_logps[b][t],
                                       estimator, clamp)
  return out, grad
