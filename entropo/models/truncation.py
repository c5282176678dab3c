"""Top-k and top-p (nucleus) truncation of logits, exact and sort-free.

`truncate_logits(logits, top_k=k, top_p=p)` sets every logit outside the
kept support to `-inf`, so `softmax` of the result is the renormalised
distribution a sampler draws from and `token_logprobs` of it is the
sampler's processed log-prob. The sampler uses it at every step; a trainer
that wants to renormalise its own log-probs over the same support can call
it on its logits.

The support, for one row of logits `s`:

* top-k keeps `s_v >= s_(k)`, the k-th largest value;
* top-p then keeps `s_v >= c`, where `c` is the largest value whose kept
  mass `sum_{u: s_u >= c} softmax(s)_u` (the top-k renormalised
  distribution) is at least `p`: the smallest most-likely set whose mass
  reaches `p`. The most likely token always survives.

Ties with the value at either cut are kept, so the support is a function of
the values alone (a sort-based cut would split ties by index).

Both cuts are found by bisection over the 32-bit order-preserving integer
image of the float32 logits: 32 passes of a compare and a sum over `[B, V]`,
exact (the cut is always one of the row's values). On CPU this is an order
of magnitude faster than sorting a 151936-entry vocabulary per step, which
is what `jnp.sort` and `lax.top_k` (lowered to a sort there) cost.
"""

import jax
import jax.numpy as jnp


def truncate_logits(logits: jax.Array, *, top_k: int | None = None,
                    top_p=None) -> jax.Array:
  """Logits with the entries outside the top-k / top-p support at `-inf`.

  Args:
    logits: `[B, V]` float (e.g. temperature-scaled logits).
    top_k: None (no cut) or an int >= 1; values >= V keep everything.
    top_p: None (no cut) or a float (a Python number in `(0, 1]`, or a
      traced scalar); 1 keeps everything.

  Returns:
    `[B, V]` float32: the kept logits unchanged, the others `-inf`.
  """
  if logits.ndim != 2:
    raise ValueError(f"logits must be [B, V]; got shape {logits.shape}.")
  if top_k is not None and (isinstance(top_k, bool)
                            or not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"top_k must be None or an int >= 1; got {top_k!r}.")
  if isinstance(top_p, (int, float)) and not 0 < top_p <= 1:
    raise ValueError(f"top_p must be None or in (0, 1]; got {top_p!r}.")
  s = logits.astype(jnp.float32)
  keys = _order_keys(s)  # [B, V]
  if top_k is not None and top_k < s.shape[-1]:
    cut = _largest_key(keys, lambda kept: jnp.sum(kept, axis=-1) >= top_k)
    s = jnp.where(keys >= cut[:, None], s, -jnp.inf)
  if top_p is not None and not (isinstance(top_p, (int, float))
                                and top_p == 1):
    probs = jax.nn.softmax(s, axis=-1)  # [B, V], 0 outside the top-k
    mass = lambda kept: jnp.sum(jnp.where(kept, probs, 0.0), axis=-1)
    cut = _largest_key(keys, lambda kept: mass(kept) >= top_p)
    s = jnp.where(keys >= cut[:, None], s, -jnp.inf)
  return s


def _order_keys(x):
  """uint32 keys ordered as the float32 values `x` (-0 before +0)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(1 << 31))


def _largest_key(keys, holds):
  """Per row, the largest `u` with `holds(keys >= u)`: `[B, V] -> [B]`.

  `holds` must be monotone (true for small `u`, false for large) and true
  at the row minimum; the answer is then one of the row's keys. Each of the
  32 steps halves `[lo, hi]`, which starts at most 2^32 wide.
  """
  def body(_, bounds):
    lo, hi = bounds
    gap = hi - lo
    mid = lo + gap // 2 + gap % 2  # the upper middle; no uint32 overflow
    ok = holds(keys >= mid[:, None])
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  init = (jnp.min(keys, axis=-1), jnp.max(keys, axis=-1))
  lo, _ = jax.lax.fori_loop(0, 32, body, init)
  return lo
