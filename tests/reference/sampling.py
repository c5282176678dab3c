"""Float64 loop-style reference for the sampler's processed distribution.

For one row of logits `z` (any float dtype, read as float64):

    s = z / T
    top-k:  keep s_v >= the k-th largest s
    top-p:  walk the kept tokens from most to least likely under
            softmax(kept s), adding them until their mass reaches p; then
            keep every token whose s is >= the last one added
    log q(v) = s_v - log sum_{kept u} exp(s_u)   (-inf outside the support)

Ties with the last token kept by either cut are kept. Never imports entropo.
"""

import numpy as np


def log_softmax(z):
  """Float64 log-softmax over the last axis (`-inf` entries allowed)."""
  z = np.asarray(z, np.float64)
  z = z - np.max(z, axis=-1, keepdims=True)
  return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def support(z, *, temperature=1.0, top_k=None, top_p=None):
  """Returns `(keep [V] bool, log q [V] float64)` for logits `z: [V]`."""
  s = np.asarray(z, np.float64) / temperature
  vocab = s.shape[0]
  keep = np.ones(vocab, bool)
  if top_k is not None and top_k < vocab:
    kth = sorted(s.tolist(), reverse=True)[top_k - 1]
    keep = np.array([s[v] >= kth for v in range(vocab)])
  if top_p is not None:
    masked = np.where(keep, s, -np.inf)
    p = np.exp(masked - masked.max())
    p /= p.sum()
    mass, last = 0.0, None
    for v in sorted(range(vocab), key=lambda v: -p[v]):
      if mass >= top_p:
        break
      mass += p[v]
      last = masked[v]
    keep = keep & (masked >= last)
  logq = np.full(vocab, -np.inf)
  kept = s[keep]
  m = kept.max()
  lse = m + np.log(sum(np.exp(x - m) for x in kept))
  logq[keep] = s[keep] - lse
  return keep, logq
