"""Token log-probabilities and full-vocabulary entropy from logits.

Both are computed from logits rounded to the precision policy's
`logits_dtype` (float32 by default, whatever the input dtype), with float32
reductions, and returned as float32 (rounded to `logits_dtype` first, so a
`bf16` policy reproduces bfloat16 log-probs). They are stable
for logits of any magnitude: the log-softmax is shifted by the row maximum
and the entropy is computed from centred log-probabilities,
`H = -sum_v p_v log p_v`, never as the difference of two large numbers.
Logits of `-inf` (masked vocabulary entries) are allowed.
"""

import jax
import jax.numpy as jnp

from entropo import _checks
from entropo import precision as precision_lib


def _log_softmax(logits: jax.Array, precision) -> jax.Array:
  precision = precision_lib.get_precision(precision)
  z = precision.round_logits(logits)  # [..., V] float32
  z = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  return z - jnp.log(jnp.sum(jnp.exp(z), axis=-1, keepdims=True))


def _check_logits(logits):
  _checks.check_float("logits", logits)
  _checks.check_rank("logits", logits, (2, 3))
  if logits.shape[-1] == 0:
    raise ValueError(f"logits have an empty vocabulary (shape "
                     f"{tuple(logits.shape)}); need V >= 1.")


def token_logprobs(
    logits: jax.Array, targets: jax.Array, *, precision=None
) -> jax.Array:
  """Log-probability of each target token under `softmax(logits)`.

  Args:
    logits: `[B, T, V]` (or `[N, V]`) float, any float dtype.
    targets: `[B, T]` (or `[N]`) int token ids in `[0, V)`. An id outside
      raises ValueError when `targets` is concrete; under `jax.jit` it gives
      NaN at that position (never a wrapped-around value), so mask it.
    precision: a `Precision`, a preset name, or None (`fp32`). Its
      `logits_dtype` is the dtype of the log-softmax.

  Returns:
    `[B, T]` (or `[N]`) float32 `log pi(target)`, differentiable in logits.
  """
  _check_logits(logits)
  _checks.check_int("targets", targets)
  if targets.shape != logits.shape[:-1]:
    raise ValueError(
        f"targets must have shape logits.shape[:-1] = {logits.shape[:-1]}; "
        f"got {targets.shape}."
    )
  vocab = logits.shape[-1]
  _checks.check_token_ids("targets", targets, vocab)
  logp = _log_softmax(logits, precision)  # [B, T, V]
  inside = (targets >= 0) & (targets < vocab)
  picked = jnp.take_along_axis(
      logp, jnp.clip(targets, 0, vocab - 1)[..., None], axis=-1)[..., 0]
  picked = jnp.where(inside, picked, jnp.nan)
  return precision_lib.get_precision(precision).round_output(picked)


def token_entropy(logits: jax.Array, *, precision=None) -> jax.Array:
  """Full-vocabulary entropy `H = -sum_v pi(v) log pi(v)` of each position.

  Args:
    logits: `[B, T, V]` (or `[N, V]`) float, any float dtype.
    precision: a `Precision`, a preset name, or None (`fp32`).

  Returns:
    `[B, T]` (or `[N]`) float32 in `[0, log V]`, differentiable in logits.
  """
  _check_logits(logits)
  logp = _log_softmax(logits, precision)  # [B, T, V]
  p = jnp.exp(logp)
  # For -inf logits p * logp is 0 * -inf = nan; those terms are 0. The inner
  # `where` keeps the gradient finite as well as the value.
  plogp = p * jnp.where(p > 0, logp, 0.0)
  entropy = -jnp.sum(plogp, axis=-1)
  return precision_lib.get_precision(precision).round_output(entropy)
