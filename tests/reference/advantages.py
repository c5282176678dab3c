"""Loop-style float64 references: group advantages, REPO (method.md §2-3).

Written from the definitions one group, one sequence, one token at a time;
never imports entropo. Inputs are NumPy arrays (any float dtype, converted to
float64); advantages are `[B]` per sequence or `[B, T]` per token.
"""

import math

import numpy as np


def _groups(rewards, group_size):
  """List of groups (lists of float64), and a function back to the shape."""
  r = np.asarray(rewards, np.float64)
  if r.ndim == 2:
    groups = [[float(v) for v in row] for row in r]
  else:
    groups = []
    for start in range(0, r.shape[0], group_size):
      groups.append([float(r[start + j]) for j in range(group_size)])

  def back(values):
    out = np.array(values, np.float64)
    return out.reshape(r.shape)

  return groups, back


def _all_equal(group):
  for v in group:
    if v != group[0]:
      return False
  return True


def degenerate_groups(rewards, group_size=None):
  groups, _ = _groups(rewards, group_size)
  return np.array([_all_equal(g) for g in groups], bool)


def rloo(rewards, group_size=None):
  """`A_i = r_i - mean_{j != i} r_j`; exactly 0 in degenerate groups."""
  groups, back = _groups(rewards, group_size)
  out = []
  for g in groups:
    row = []
    for i in range(len(g)):
      if _all_equal(g):
        row.append(0.0)
        continue
      others = 0.0
      for j in range(len(g)):
        if j != i:
          others += g[j]
      row.append(g[i] - others / (len(g) - 1))
    out.append(row)
  return back(out)


def grpo(rewards, scale="group", eps=1e-6, ddof=1, group_size=None):
  """`(r_i - mean_group(r)) / (std + eps)`, std per group / batch / none."""
  groups, back = _groups(rewards, group_size)
  if scale == "batch":
    flat = [v for g in groups for v in g]
    mean = sum(flat) / len(flat)
    sq = 0.0
    for v in flat:
      sq += (v - mean) ** 2
    batch_std = math.sqrt(sq / (len(flat) - ddof))
  out = []
  for g in groups:
    mean = sum(g) / len(g)
    if scale == "group":
      sq = 0.0
      for v in g:
        sq += (v - mean) ** 2
      denom = math.sqrt(sq / (len(g) - ddof)) + eps
    elif scale == "batch":
      denom = batch_std + eps
    elif scale == "none":
      denom = 1.0
    else:
      raise ValueError(scale)
    row = []
    for v in g:
      row.append(0.0 if _all_equal(g) else (v - mean) / denom)
    out.append(row)
  return back(out)


def _token_adv(advantages, b, t):
  a = np.asarray(advantages, np.float64)
  return float(a[b]) if a.ndim == 1 else float(a[b, t])


def repo(advantages, logps, entropy, beta):
  """`A - beta * (log pi + H)` per token."""
  logps = np.asarray(logps, np.float64)
  entropy = np.asarray(entropy, np.float64)
  bsz, tlen = logps.shape
  out = np.zeros((bsz, tlen))
  for b in range(bsz):
    for t in range(tlen):
      a = _token_adv(advantages, b, t)
      out[b, t] = a - beta * (logps[b, t] + entropy[b, t])
  return out


def repo_r(advantages, logps, zeta, positive_only=False, sign_clamp=True,
           min_logp=-20.0):
  """REPO-R by cases: A>0: A(1 - zeta lp); A<0: A(1 + zeta lp)."""
  logps = np.asarray(logps, np.float64)
  bsz, tlen = logps.shape
  out = np.zeros((bsz, tlen))
  for b in range(bsz):
    for t in range(tlen):
      a = _token_adv(advantages, b, t)
      lp = max(float(logps[b, t]), min_logp)
      if a > 0:
        v = a * (1.0 - zeta * lp)
        if sign_clamp and v < 0:
          v = 0.0
      elif a < 0:
        if positive_only:
          v = a
        else:
          v = a * (1.0 + zeta * lp)
          if sign_clamp and v > 0:
            v = 0.0
      else:
        v = 0.0
      out[b, t] = v
  return out


def repo_d_coefficient(advantages, logps, entropy, mask):
  """`Cov(A, L) / Var(L)` over valid tokens; 0 when Var(L) == 0."""
  logps = np.asarray(logps, np.float64)
  entropy = np.asarray(entropy, np.float64)
  mask = np.asarray(mask, bool)
  bsz, tlen = logps.shape
  a_vals, l_vals = [], []
  for b in range(bsz):
    for t in range(tlen):
      if mask[b, t]:
        a_vals.append(_token_adv(advantages, b, t))
        l_vals.append(logps[b, t] + entropy[b, t])
  n = len(a_vals)
  if n == 0:
    return 0.0
  mean_a = sum(a_vals) / n
  mean_l = sum(l_vals) / n
  cov, var = 0.0, 0.0
  for a, l in zip(a_vals, l_vals):
    cov += (a - mean_a) * (l - mean_l)
    var += (l - mean_l) ** 2
  if var == 0.0:
    return 0.0
  return cov / var


def repo_d(advantages, logps, entropy, mask, zeta):
  """`A - zeta * coefficient * L` on valid tokens, `A` elsewhere."""
  beta = zeta * repo_d_coefficient(advantages, logps, entropy, mask)
  logps = np.asarray(logps, np.float64)
  entropy = np.asarray(entropy, np.float64)
  bsz, tlen = logps.shape
  out = np.zeros((bsz, tlen))
  for b in range(bsz):
    for t in range(tlen):
      a = _token_adv(advantages, b, t)
      if mask[b, t]:
        out[b, t] = a - beta * (logps[b, t] + entropy[b, t])
      else:
        out[b, t] = a
  return out


def masked_cov(x, y, mask):
  """Population covariance of `x`, `y` over `mask` (float64 loops)."""
  xs, ys = [], []
  for b in range(mask.shape[0]):
    for t in range(mask.shape[1]):
      if mask[b, t]:
        xs.append(float(x[b, t]))
        ys.append(float(y[b, t]))
  mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
  return sum((a - mx) * (c - my) for a, c in zip(xs, ys)) / len(xs)
