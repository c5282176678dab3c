"""float64 references for the dot algorithms of entropo/precision.py."""

import math

import numpy as np

_F32_MAX = float(np.finfo(np.float32).max)


def round_to_tf32(x) -> np.ndarray:
  """float32 values rounded to TF32, nearest even, as float64; loop-style.

  TF32 has float32's exponent range and 11 significant bits (10 stored). A
  normal value v = m 2^e (0.5 <= |m| < 1) is rounded to a multiple of
  2^(e - 11); float32's subnormals keep their fixed spacing 2^-149, of which
  TF32 keeps multiples of 2^-136. Python's `round` breaks ties to even.
  Values past float32's largest finite number after rounding become inf.
  """
  x = np.asarray(x, np.float32).astype(np.float64)
  out = np.empty_like(x)
  for i, v in enumerate(x.ravel()):
    if not math.isfinite(v) or v == 0.0:
      out.flat[i] = v
      continue
    _, e = math.frexp(v)
    quantum = 2.0 ** -136 if abs(v) < 2.0 ** -126 else 2.0 ** (e - 11)
    r = round(v / quantum) * quantum
    out.flat[i] = math.copysign(math.inf, v) if abs(r) > _F32_MAX else r
  return out


def matmul(a, b) -> np.ndarray:
  """`a @ b` in float64 over the last axis of `a` and first of `b`."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  out = np.zeros(a.shape[:-1] + b.shape[1:], np.float64)
  for k in range(a.shape[-1]):
    out += np.multiply.outer(a[..., k], b[k])
  return out
