"""Float64 loop-style references for log-probs, entropy and the fused head.

Everything here follows the definitions one position at a time:

    log pi(v) = z_v - (m + log sum_u exp(z_u - m)),   m = max_u z_u
    H         = -sum_v pi(v) log pi(v)   (terms with pi(v) = 0 are 0)
    dlog pi(t)/dz_v = 1[v = t] - pi(v)
    dH/dz_v         = -pi(v) (log pi(v) + H)

Inputs of any float dtype (bfloat16 included) are read as float64, so the
reference sees exactly the numbers the library was given. Never imports
entropo.
"""

import math

import ml_dtypes
import numpy as np


def _f64(x):
  return np.asarray(x).astype(np.float64)


def _positions(shape):
  """All leading-index tuples of an array whose last axis is the vocab."""
  return list(np.ndindex(*shape[:-1]))


def log_softmax_row(z):
  """Log-softmax of one row `[V]` of float64 logits, max-shifted."""
  m = -math.inf
  for zv in z:
    if zv > m:
      m = zv
  total = 0.0
  for zv in z:
    total += math.exp(zv - m)  # exp(-inf) = 0 for masked entries.
  lse = m + math.log(total)
  out = np.empty(len(z), np.float64)
  for v, zv in enumerate(z):
    out[v] = zv - lse
  return out


def entropy_row(z):
  """Entropy of one row: -sum_v p_v log p_v, skipping p_v = 0."""
  logp = log_softmax_row(z)
  h = 0.0
  for lp in logp:
    p = math.exp(lp)
    if p > 0.0:
      h -= p * lp
  return h


def token_logprobs(logits, targets):
  """`[..., V]` logits, `[...]` int targets -> `[...]` float64 log pi(t)."""
  z = _f64(logits)
  t = np.asarray(targets)
  out = np.empty(z.shape[:-1], np.float64)
  for idx in _positions(z.shape):
    out[idx] = log_softmax_row(z[idx])[int(t[idx])]
  return out


def token_entropy(logits):
  """`[..., V]` logits -> `[...]` float64 entropy."""
  z = _f64(logits)
  out = np.empty(z.shape[:-1], np.float64)
  for idx in _positions(z.shape):
    out[idx] = entropy_row(z[idx])
  return out


def logits_vjp(logits, targets, g_logp, g_entropy):
  """Gradient of `sum(g_logp * log pi(t) + g_entropy * H)` w.r.t. logits.

  Analytic, per position and per vocabulary entry:
  `dz_v = g_logp (1[v = t] - p_v) - g_entropy p_v (log p_v + H)`; entries
  with p_v = 0 (logit -inf) get exactly 0.
  """
  z = _f64(logits)
  t = np.asarray(targets)
  g_lp = _f64(g_logp)
  g_h = _f64(g_entropy)
  dz = np.zeros(z.shape, np.float64)
  for idx in _positions(z.shape):
    logp = log_softmax_row(z[idx])
    h = entropy_row(z[idx])
    for v in range(z.shape[-1]):
      p = math.exp(logp[v])
      onehot = 1.0 if v == int(t[idx]) else 0.0
      d = g_lp[idx] * (onehot - p)
      if p > 0.0:
        d -= g_h[idx] * p * (logp[v] + h)
      dz[idx + (v,)] = d
  return dz


def finite_difference_vjp(fn, logits, cotangent, *, eps=1e-6):
  """Central differences of `sum(cotangent * fn(logits))`, float64.

  `fn` maps float64 logits `[..., V]` to `[...]`; used to check the analytic
  formulas above, not the library.
  """
  z = _f64(logits)
  g = _f64(cotangent)
  grad = np.zeros(z.shape, np.float64)
  for idx in np.ndindex(*z.shape):
    up = z.copy()
    up[idx] += eps
    down = z.copy()
    down[idx] -= eps
    grad[idx] = (np.sum(g * fn(up)) - np.sum(g * fn(down))) / (2 * eps)
  return grad


def head_logits(hidden, lm_head):
  """`hidden @ lm_head` as explicit float64 dot products: `[..., V]`."""
  h = _f64(hidden)
  w = _f64(lm_head)
  d, vocab = w.shape
  out = np.zeros(h.shape[:-1] + (vocab,), np.float64)
  for idx in np.ndindex(*h.shape[:-1]):
    for v in range(vocab):
      acc = 0.0
      for k in range(d):
        acc += h[idx + (k,)] * w[k, v]
      out[idx + (v,)] = acc
  return out


def fused_vjp(hidden, lm_head, targets, g_logp, g_entropy):
  """Gradients of `sum(g_logp * log pi(t) + g_entropy * H)` of `h @ W`.

  Returns `(d_hidden [..., D], d_lm_head [D, V])`, float64, by the chain
  rule through the materialised logits: `dh = dz W^T`, `dW = h^T dz`.
  """
  h = _f64(hidden)
  w = _f64(lm_head)
  dz = logits_vjp(head_logits(h, w), targets, g_logp, g_entropy)
  d, vocab = w.shape
  dh = np.zeros(h.shape, np.float64)
  dw = np.zeros(w.shape, np.float64)
  for idx in np.ndindex(*h.shape[:-1]):
    for v in range(vocab):
      for k in range(d):
        dh[idx + (k,)] += dz[idx + (v,)] * w[k, v]
        dw[k, v] += h[idx + (k,)] * dz[idx + (v,)]
  return dh, dw


def round_to(x, dtype_name):
  """Rounds float64 values to `bfloat16` / `float16` / `float32`, as float64."""
  dtype = {
      "bfloat16": ml_dtypes.bfloat16,
      "float16": np.float16,
      "float32": np.float32,
  }[dtype_name]
  return _f64(np.asarray(x, np.float64).astype(dtype))
