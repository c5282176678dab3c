"""Float64 loop-style references for entropo.corrections and the sampler
mismatch diagnostics.

Written from the published definitions (TIS, IcePop, MIS, verl's rollout
correction), one sequence and one token at a time. Never imports entropo.
"""

import math

import numpy as np

MAX_LOG_RATIO = 20.0


def _clamp(x):
  return min(max(x, -MAX_LOG_RATIO), MAX_LOG_RATIO)


def _valid_cols(mask, b):
  return [t for t in range(mask.shape[1]) if mask[b, t]]


def mismatch_correction(old_logps, sampler_logps, mask, *, level="token",
                        mode="truncate", low=0.0, high=2.0, veto=None,
                        max_kl=None):
  """(weights [B, T] float64, metrics dict of floats)."""
  old = np.asarray(old_logps, np.float64)
  samp = np.asarray(sampler_logps, np.float64)
  mask = np.asarray(mask)
  num_rows, num_cols = mask.shape
  weights = np.zeros((num_rows, num_cols))
  truncated = np.zeros((num_rows, num_cols), bool)
  masked = np.zeros((num_rows, num_cols), bool)
  rejected = np.zeros((num_rows, num_cols), bool)
  for b in range(num_rows):
    cols = _valid_cols(mask, b)
    if not cols:
      continue
    log_r = {t: old[b, t] - samp[b, t] for t in cols}
    seq_sum = sum(log_r.values())
    reject = False
    if veto is not None and any(math.exp(_clamp(v)) < veto
                                for v in log_r.values()):
      reject = True
    if max_kl is not None:
      kl = sum(math.exp(_clamp(v)) - 1.0 - _clamp(v)
               for v in log_r.values()) / len(cols)
      if kl > max_kl:
        reject = True
    for t in cols:
      if level == "token":
        big_r = math.exp(_clamp(log_r[t]))
      elif level == "sequence":
        big_r = math.exp(_clamp(seq_sum))
      else:
        big_r = math.exp(_clamp(seq_sum / len(cols)))
      inside = low <= big_r <= high
      if mode == "truncate":
        w = min(big_r, high)
        truncated[b, t] = big_r > high
      elif mode == "mask":
        w = big_r if inside else 0.0
        masked[b, t] = not inside
      elif mode == "reject":
        w = 1.0 if inside else 0.0
        masked[b, t] = not inside
      else:
        w = 1.0
      if reject:
        w = 0.0
        rejected[b, t] = True
        masked[b, t] = False
      weights[b, t] = w
  return weights, _metrics(weights, mask, truncated, masked, rejected)


def _metrics(weights, mask, truncated, masked, rejected):
  tokens = [(b, t) for b in range(mask.shape[0]) for t in _valid_cols(mask, b)]
  rows = [b for b in range(mask.shape[0]) if _valid_cols(mask, b)]

  def mean(values):
    return sum(values) / len(values) if values else 0.0

  w_mean = mean([weights[b, t] for b, t in tokens])
  w_sq = mean([weights[b, t] ** 2 for b, t in tokens])
  return {
      "corr/weight_mean": w_mean,
      "corr/ess": w_mean ** 2 / w_sq if w_sq else 0.0,
      "corr/truncated_frac": mean([float(truncated[b, t]) for b, t in tokens]),
      "corr/masked_frac": mean([float(masked[b, t]) for b, t in tokens]),
      "corr/rejected_frac": mean([float(rejected[b, t]) for b, t in tokens]),
      "corr/seq_masked_frac": mean([
          float(all(weights[b, t] == 0 for t in _valid_cols(mask, b)))
          for b in rows]),
      "corr/seq_rejected_frac": mean([
          float(rejected[b, _valid_cols(mask, b)[0]]) for b in rows]),
  }


def sampler_mismatch(trainer_logps, sampler_logps, mask):
  """The sampler-vs-trainer KL, chi-square, log-PPL and correlation."""
  tr = np.asarray(trainer_logps, np.float64)
  sa = np.asarray(sampler_logps, np.float64)
  mask = np.asarray(mask)
  tok_k3, tok_k1, tok_r2, p_t, p_s = [], [], [], [], []
  seq_kl, seq_r2, ppl_diff = [], [], []
  for b in range(mask.shape[0]):
    cols = _valid_cols(mask, b)
    if not cols:
      continue
    kl, log_seq = 0.0, 0.0
    for t in cols:
      d = _clamp(tr[b, t] - sa[b, t])
      r = math.exp(d)
      tok_k3.append(r - 1.0 - d)
      tok_k1.append(sa[b, t] - tr[b, t])
      tok_r2.append(r * r)
      p_t.append(math.exp(tr[b, t]))
      p_s.append(math.exp(sa[b, t]))
      kl += r - 1.0 - d
      log_seq += tr[b, t] - sa[b, t]
    seq_kl.append(kl)
    seq_r2.append(math.exp(2 * _clamp(log_seq)))
    # log PPL = -mean log p; trainer minus sampler.
    ppl_diff.append(-(sum(tr[b, t] for t in cols)
                      - sum(sa[b, t] for t in cols)) / len(cols))

  def mean(values):
    return sum(values) / len(values) if values else 0.0

  mt, ms = mean(p_t), mean(p_s)
  cov = mean([(x - mt) * (y - ms) for x, y in zip(p_t, p_s)])
  var_t = mean([(x - mt) ** 2 for x in p_t])
  var_s = mean([(y - ms) ** 2 for y in p_s])
  den = math.sqrt(var_t * var_s)
  return {
      "mismatch/kl_token": mean(tok_k3),
      "mismatch/kl_token_k1": mean(tok_k1),
      "mismatch/kl_seq": mean(seq_kl),
      "mismatch/chi2_token": mean(tok_r2) - 1.0 if tok_r2 else 0.0,
      "mismatch/chi2_seq": mean(seq_r2) - 1.0 if seq_r2 else 0.0,
      "mismatch/log_ppl_diff": mean(ppl_diff),
      "mismatch/log_ppl_abs_diff": mean([abs(x) for x in ppl_diff]),
      "mismatch/prob_corr": cov / den if den else 0.0,
  }
