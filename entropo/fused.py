"""Log-probs and entropy straight from hidden states, in vocabulary chunks.

`fused_logprobs_entropy(hidden, lm_head, targets)` returns what
`token_logprobs(hidden @ lm_head, targets)` and `token_entropy(...)` return,
without ever holding the `[B, T, V]` logits, in the forward or the backward
pass. A `lax.scan` walks the vocabulary in chunks of `chunk_size` columns and
keeps four float32 running statistics per token (an online log-sum-exp):

    m = running max of the logits z
    s = sum_v exp(z_v - m)
    u = sum_v exp(z_v - m) (z_v - m)
    z_target (the target's logit, picked from whichever chunk holds it)

so that `log pi(target) = (z_target - m) - log s` and
`H = log s - u / s`, all centred and stable for logits of any size.

The gradient is a custom VJP that recomputes each chunk's logits (one more
matmul per chunk) instead of storing them. With `p = softmax(z)`,
`dlogp/dz_v = 1[v = target] - p_v` and `dH/dz_v = -p_v (log p_v + H)`, so
for upstream cotangents `g_lp` and `g_H`

    dz = g_lp (onehot - p) - g_H p (log p + H)
    d hidden = sum over chunks of dz @ W_c^T,   d W_c = hidden^T @ dz.

Memory is `O(N * chunk_size)` for temporaries, on top of the inputs and
their gradients (and, for a bf16/fp16 head, one `[V, D]` copy of the head
in that dtype in the backward, half the size of the float32 `lm_head`).
"""

import functools

import jax
import jax.numpy as jnp

from entropo import _checks
from entropo import precision as precision_lib

DEFAULT_CHUNK_SIZE = 2048


def fused_logprobs_entropy(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    precision=None,
    head_grad: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Target log-probs and full-vocabulary entropy of `hidden @ lm_head`.

  The product runs under the precision policy (`head_dtype` operands,
  `logits_dtype` product, e.g. the `bf16_fp32_logits` preset for a float32
  product on bfloat16 operands); reductions are float32; outputs are rounded
  to `logits_dtype` and returned float32, exactly as `token_logprobs` and
  `token_entropy` do on materialised logits.

  Args:
    hidden: `[B, T, D]` (or `[N, D]`) float, final hidden states.
    lm_head: `[D, V]` float, the output projection (the transposed embedding
      for tied models).
    targets: `[B, T]` (or `[N]`) int token ids in `[0, V)`. An id outside
      raises ValueError when `targets` is concrete; under `jax.jit` it gives
      a NaN log-prob at that position (the entropy is still the row's), so
      mask it.
    chunk_size: vocabulary columns per chunk (clipped to V). Smaller saves
      memory; larger has fewer, bigger matmuls.
    precision: a `Precision`, a preset name, or None (`fp32`).
    head_grad: False when `lm_head` is frozen (LoRA): the backward pass
      then skips the `[D, V]` float32 head gradient and its products, and
      gives `lm_head` a zero cotangent. The gradient in `hidden` is the
      same either way.

  Returns:
    `(logps, entropy)`, each `[B, T]` (or `[N]`) float32, differentiable in
    `hidden` and `lm_head`.
  """
  if not isinstance(head_grad, bool):
    raise ValueError(f"head_grad must be a bool; got {head_grad!r}.")
  _checks.check_float("hidden", hidden)
  _checks.check_float("lm_head", lm_head)
  _checks.check_int("targets", targets)
  _checks.check_rank("hidden", hidden, (2, 3))
  _checks.check_rank("lm_head", lm_head, 2)
  if hidden.shape[-1] != lm_head.shape[0]:
    raise ValueError(
        f"hidden width {hidden.shape[-1]} does not match lm_head rows "
        f"{lm_head.shape[0]} (lm_head must be [D, V])."
    )
  if targets.shape != hidden.shape[:-1]:
    raise ValueError(
        f"targets must have shape hidden.shape[:-1] = {hidden.shape[:-1]}; "
        f"got {targets.shape}."
    )
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
      or chunk_size <= 0):
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
  if lm_head.shape[1] == 0:
    raise ValueError("lm_head has no columns: the vocabulary must be "
                     "non-empty ([D, V] with V >= 1).")
  _checks.check_token_ids("targets", targets, lm_head.shape[1])
  precision = precision_lib.get_precision(precision)
  lead = hidden.shape[:-1]
  chunk = min(chunk_size, lm_head.shape[1])
  logps, entropy = _fused(
      hidden.reshape(-1, hidden.shape[-1]),
      lm_head,
      targets.reshape(-1),
      chunk,
      precision,
      head_grad,
  )
  inside = (targets >= 0) & (targets < lm_head.shape[1])
  logps = jnp.where(inside.reshape(-1), logps, jnp.nan)
  logps = precision.round_output(logps).reshape(lead)
  entropy = precision.round_output(entropy).reshape(lead)
  return logps, entropy


def _target_column(targets, start, width):
  """Each target's column within the chunk `[start, start + width)`.

  Returns `(column, inside)`: the column clipped into the chunk (a valid
  index to gather or scatter at) and whether the target lies in it.
  """
  idx = targets - start
  return jnp.clip(idx, 0, width - 1), (idx >= 0) & (idx < width)


def _target_logit(z, targets, start):
  """`z[n, targets[n] - start]` where the target lies in this chunk, else 0.

  A gather of one element per row, not a compare over the whole chunk.
  """
  col, inside = _target_column(targets, start, z.shape[1])
  picked = jnp.take_along_axis(z, col[:, None], 1)
  return jnp.where(inside, picked[:, 0], 0.0)


def _scan_chunks(body, init, vocab, chunk):
  """Runs `carry = body(carry, start, width)` over the vocabulary chunks.

  The `vocab // chunk` full chunks go through a `lax.scan` (`start` traced,
  `width = chunk`); a narrower last chunk, when `chunk` does not divide V,
  is one more call with its own static start and width, so no column is
  ever padded, masked or seen twice.
  """
  full, rest = divmod(vocab, chunk)

  def step(carry, c):
    return body(carry, c * chunk, chunk), None

  carry, _ = jax.lax.scan(step, init, jnp.arange(full))
  if rest:
    carry = body(carry, full * chunk, rest)
  return carry


def _cols(x, start, width, axis):
  """`width` rows or columns of `x` from `start` along `axis`."""
  return jax.lax.dynamic_slice_in_dim(x, start, width, axis=axis)


def _forward(h, w, targets, chunk, precision):
  n = h.shape[0]
  h_op = h.astype(precision.head_dtype)  # cast once, not per chunk

  def body(carry, start, width):
    m, s, u, z_t = carry  # each [N]
    w_c = _cols(w, start, width, axis=1)  # [D, C]
    z = precision.round_logits(precision.head_product(h_op, w_c))  # [N, C] f32
    m_new = jnp.maximum(m, jnp.max(z, axis=-1))  # [N], finite
    delta = jnp.where(jnp.isfinite(m), m - m_new, 0.0)  # [N]
    scale = jnp.exp(delta)
    d = z - m_new[:, None]  # [N, C]
    e = jnp.exp(d)
    s_new = scale * s + jnp.sum(e, axis=-1)
    # A logit so far below the maximum that its difference overflows to
    # -inf has e = 0: its term is 0, not 0 * -inf (likewise a scale of 0).
    u_new = (jnp.where(scale > 0, scale * (u + s * delta), 0.0)
             + jnp.sum(jnp.where(e > 0, e * d, 0.0), axis=-1))
    return m_new, s_new, u_new, z_t + _target_logit(z, targets, start)

  init = (
      jnp.full((n,), -jnp.inf, jnp.float32),
      jnp.zeros((n,), jnp.float32),
      jnp.zeros((n,), jnp.float32),
      jnp.zeros((n,), jnp.float32),
  )
  m, s, u, z_t = _scan_chunks(body, init, w.shape[1], chunk)
  log_s = jnp.log(s)
  # (z_t - m) - log s, never z_t - (m + log s): at |z| ~ 1e4 the sum m +
  # log s would round to float32 steps of 1e-3 and so would every log-prob.
  return (z_t - m) - log_s, log_s - u / s, (m, log_s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(h, w, targets, chunk, precision, head_grad):
  del head_grad  # the backward pass's business
  logps, entropy, _ = _forward(h, w, targets, chunk, precision)
  return logps, entropy


def _fused_fwd(h, w, targets, chunk, precision, head_grad):
  del head_grad
  logps, entropy, (m, log_s) = _forward(h, w, targets, chunk, precision)
  return (logps, entropy), (h, w, targets, m, log_s, entropy)


def _fused_bwd(chunk, precision, head_grad, residuals, cotangents):
  h, w, targets, m, log_s, entropy = residuals
  g_lp, g_h = (g.astype(jnp.float32) for g in cotangents)  # [N] each
  h_op = h.astype(precision.head_dtype)
  rows = jnp.arange(h.shape[0])
  # Both gradient products take operands transposed once, here, outside the
  # loop: XLA:CPU runs a bfloat16 dot whose operand is transposed inside
  # the loop (`dz @ w_c.T`, `h.T @ dz`) about 3x slower than on a row-major
  # copy, and that made the whole bf16 forward+backward 1.5x slower
  # (float32 dots do not care; docs/benchmarks.md). `h.T` is `[D, N]`;
  # `w.T` is a `[V, D]` copy of the head in `head_dtype`, made only for
  # low-precision heads.
  # The barrier keeps XLA from folding the transposes back into the dots:
  # besides undoing the point of the copies, a folded bfloat16 x bfloat16
  # -> float32 dot with a transposed operand is one XLA:CPU (jax 0.10)
  # cannot run ("Unsupported element type for DotThunk"), which is what
  # happens when the whole vocabulary is a single chunk, outside the loop.
  low_precision = jnp.dtype(precision.head_dtype).itemsize < 4
  w_t = w.astype(precision.head_dtype).T if low_precision else None  # [V, D]
  h_t, w_t = jax.lax.optimization_barrier((h_op.T, w_t))  # [D, N], [V, D]
  dot = functools.partial(precision.matmul, preferred_element_type=jnp.float32)

  def body(carry, start, width):
    dh, dw = carry  # [N, D], [D, V] float32
    w_c = _cols(w, start, width, axis=1)  # [D, C]
    z = precision.round_logits(precision.head_product(h_op, w_c))  # [N, C]
    logp = (z - m[:, None]) - log_s[:, None]
    p = jnp.exp(logp)
    # dz = g_lp (onehot - p) - g_h p (log p + H): the dense part here, the
    # one-hot part as a scatter of one value per row.
    dz = -jnp.where(
        p > 0, p * (g_lp[:, None] + g_h[:, None] * (logp + entropy[:, None])),
        0.0)
    col, inside = _target_column(targets, start, width)
    dz = dz.at[rows, col].add(jnp.where(inside, g_lp, 0.0))
    dz_op = dz.astype(precision.head_dtype)
    w_c_t = (_cols(w_t, start, width, axis=0) if low_precision
             else w_c.astype(precision.head_dtype).T)  # [C, D]
    dh = dh + dot(dz_op, w_c_t)
    if not head_grad:  # a frozen head: no [D, V] gradient is built
      return dh, dw
    dw_c = dot(h_t, dz_op)  # [D, C]
    return dh, jax.lax.dynamic_update_slice_in_dim(dw, dw_c, start, axis=1)

  init = (
      jnp.zeros(h.shape, jnp.float32),
      jnp.zeros(w.shape if head_grad else (), jnp.float32),
  )
  dh, dw = _scan_chunks(body, init, w.shape[1], chunk)
  if not head_grad:
    return dh.astype(h.dtype), jnp.zeros(w.shape, w.dtype), None
  # And keeps a transpose of the result (the gradient of a tied embedding
  # is `dw.T`) from being folded into the last chunk's dot.
  dh, dw = jax.lax.optimization_barrier((dh, dw))
  return dh.astype(h.dtype), dw.astype(w.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)
