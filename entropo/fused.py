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
their gradients.
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
    targets: `[B, T]` (or `[N]`) int token ids in `[0, V)`; an id outside
      (e.g. padding) gives a meaningless value at that position (its logit
      counts as 0), so mask it.
    chunk_size: vocabulary columns per chunk (clipped to V). Smaller saves
      memory; larger has fewer, bigger matmuls.
    precision: a `Precision`, a preset name, or None (`fp32`).

  Returns:
    `(logps, entropy)`, each `[B, T]` (or `[N]`) float32, differentiable in
    `hidden` and `lm_head`.
  """
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
  policy = precision_lib.get_precision(precision)
  lead = hidden.shape[:-1]
  chunk = min(chunk_size, lm_head.shape[1])
  logps, entropy = _fused(
      hidden.reshape(-1, hidden.shape[-1]),
      lm_head,
      targets.reshape(-1),
      chunk,
      policy,
  )
  logps = policy.round_output(logps).reshape(lead)
  entropy = policy.round_output(entropy).reshape(lead)
  return logps, entropy


def _num_chunks(vocab: int, chunk: int) -> int:
  return -(-vocab // chunk)


def _chunk_logits(h, w, c, chunk, policy):
  """Float32 logits `[N, C]` of chunk `c`, and its column ids and validity.

  The last chunk is shifted left to stay inside the vocabulary (so no padded
  copy of `lm_head` is ever made); columns it shares with the previous chunk
  are marked invalid and set to -inf so that nothing is counted twice.
  """
  vocab = w.shape[1]
  start = jnp.minimum(c * chunk, vocab - chunk)
  w_c = jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=1)  # [D, C]
  cols = start + jnp.arange(chunk)  # [C]
  valid = cols >= c * chunk  # [C]
  z = policy.round_logits(policy.head_product(h, w_c))  # [N, C] float32
  z = jnp.where(valid, z, -jnp.inf)
  return z, w_c, cols, valid, start


def _forward(h, w, targets, chunk, policy):
  n = h.shape[0]

  def body(carry, c):
    m, s, u, z_t = carry  # each [N]
    z, _, cols, valid, _ = _chunk_logits(h, w, c, chunk, policy)
    m_new = jnp.maximum(m, jnp.max(z, axis=-1))  # [N], finite
    delta = jnp.where(jnp.isfinite(m), m - m_new, 0.0)  # [N]
    scale = jnp.exp(delta)
    d = z - m_new[:, None]  # [N, C], -inf on invalid columns
    e = jnp.exp(d)
    ed = jnp.where(valid, e * jnp.where(valid, d, 0.0), 0.0)
    s_new = scale * s + jnp.sum(e, axis=-1)
    u_new = scale * (u + s * delta) + jnp.sum(ed, axis=-1)
    hit = (cols == targets[:, None]) & valid  # [N, C]
    z_t = z_t + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
    return (m_new, s_new, u_new, z_t), None

  init = (
      jnp.full((n,), -jnp.inf, jnp.float32),
      jnp.zeros((n,), jnp.float32),
      jnp.zeros((n,), jnp.float32),
      jnp.zeros((n,), jnp.float32),
  )
  chunks = jnp.arange(_num_chunks(w.shape[1], chunk))
  (m, s, u, z_t), _ = jax.lax.scan(body, init, chunks)
  log_s = jnp.log(s)
  # (z_t - m) - log s, never z_t - (m + log s): at |z| ~ 1e4 the sum m +
  # log s would round to float32 steps of 1e-3 and so would every log-prob.
  return (z_t - m) - log_s, log_s - u / s, (m, log_s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(h, w, targets, chunk, policy):
  logps, entropy, _ = _forward(h, w, targets, chunk, policy)
  return logps, entropy


def _fused_fwd(h, w, targets, chunk, policy):
  logps, entropy, (m, log_s) = _forward(h, w, targets, chunk, policy)
  return (logps, entropy), (h, w, targets, m, log_s, entropy)


def _fused_bwd(chunk, policy, residuals, cotangents):
  h, w, targets, m, log_s, entropy = residuals
  g_lp, g_h = (g.astype(jnp.float32) for g in cotangents)  # [N] each
  dot = functools.partial(
      jnp.matmul, preferred_element_type=jnp.float32
  )

  def body(carry, c):
    dh, dw = carry  # [N, D], [D, V] float32
    z, w_c, cols, valid, start = _chunk_logits(h, w, c, chunk, policy)
    logp = jnp.where(valid, (z - m[:, None]) - log_s[:, None], 0.0)  # [N, C]
    p = jnp.where(valid, jnp.exp(logp), 0.0)
    onehot = (cols == targets[:, None]) & valid
    dz = g_lp[:, None] * (onehot - p) - g_h[:, None] * p * (
        logp + entropy[:, None]
    )  # [N, C] float32
    dz_op = dz.astype(policy.head_dtype)
    dh = dh + dot(dz_op, w_c.astype(policy.head_dtype).T)
    dw_c = dot(h.astype(policy.head_dtype).T, dz_op)  # [D, C]
    # Invalid columns of a shifted last chunk have dz = 0, so adding keeps
    # the previous chunk's gradient for them intact.
    old = jax.lax.dynamic_slice_in_dim(dw, start, chunk, axis=1)
    dw = jax.lax.dynamic_update_slice_in_dim(dw, old + dw_c, start, axis=1)
    return (dh, dw), None

  init = (
      jnp.zeros(h.shape, jnp.float32),
      jnp.zeros(w.shape, jnp.float32),
  )
  chunks = jnp.arange(_num_chunks(w.shape[1], chunk))
  (dh, dw), _ = jax.lax.scan(body, init, chunks)
  return dh.astype(h.dtype), dw.astype(w.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)
