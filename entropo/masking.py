"""Masked reductions that are exact under sharding and micro-batching.

Every reduction here is built from a global numerator and a global
denominator: with `axis_name` set (inside `jax.shard_map` or `jax.pmap` with
the batch split over that axis) both are summed over the axis before the
division, so the result equals the unsharded computation on the whole batch.
Divisions are safe: an empty denominator gives 0, never NaN, and a zero (not
NaN) gradient.
"""

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp

from entropo import _checks

AGGREGATION_MODES = (
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
)


def psum(x, axis_name):
  """Sum over `axis_name` (identity when None) with the right gradient.

  Losses here are global sums that every device holds a copy of, and each
  device differentiates its copy with respect to its own inputs. Inside
  `jax.shard_map` (with its default `check_vma=True`) JAX knows the summed
  value is varying over the axis and transposes `psum` correctly. Under
  `jax.pmap`, or `shard_map(check_vma=False)`, it cannot tell and transposes
  `psum` to another `psum`, which would multiply every gradient by the axis
  size; there the sum gets an identity backward pass instead, so gradients
  are the single-device ones in every setting.
  """
  if axis_name is None:
    return x
  if _is_varying(x, axis_name):
    return jax.lax.psum(x, axis_name)
  return _psum_identity_vjp(x, axis_name)


def _is_varying(x, axis_name) -> bool:
  axis_type = getattr(jax.typeof(x), "manual_axis_type", None)
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  return axis_type is not None and all(n in axis_type.varying for n in names)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _psum_identity_vjp(x, axis_name):
  return jax.lax.psum(x, axis_name)


def _psum_identity_fwd(x, axis_name):
  return jax.lax.psum(x, axis_name), None


def _psum_identity_bwd(axis_name, _, g):
  del axis_name
  return (g,)


_psum_identity_vjp.defvjp(_psum_identity_fwd, _psum_identity_bwd)


def pmax(x, axis_name):
  """Max over `axis_name` (identity when None), differentiable.

  `lax.pmax` has no differentiation rule, so a metric built on it breaks
  `jax.grad` of any loss that returns it as aux; the max of the gathered
  values is differentiable (the gradient goes to the device holding the max).
  """
  if axis_name is None:
    return x
  gathered = jax.lax.all_gather(x, axis_name, axis=0, to="invarying")
  return jnp.max(gathered, axis=0)


def pmin(x, axis_name):
  """Min over `axis_name` (identity when None), differentiable."""
  return x if axis_name is None else -pmax(-x, axis_name)


def all_gather(x, axis_name):
  """Concatenates `x` along axis 0 over `axis_name` (identity when None).

  The result is typed invariant over the axis (the same on every device),
  so values reduced from it (quantiles, thresholds) can leave `shard_map`
  with `out_specs=P()`.
  """
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True, to="invarying")


def scalar_metrics(metrics: dict) -> dict[str, jax.Array]:
  """A metrics dict as float32 stop-gradient values (style habit 6)."""
  return {k: jax.lax.stop_gradient(jnp.asarray(v, jnp.float32))
          for k, v in metrics.items()}


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """`num / den`, and 0 (with zero gradient) where `den == 0`."""
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def masked_sum(x, mask, *, axis_name=None) -> jax.Array:
  """Global sum of `x` over valid entries, float32."""
  x = x.astype(jnp.float32)
  return psum(jnp.sum(jnp.where(mask, x, 0.0)), axis_name)


def masked_count(mask, *, axis_name=None) -> jax.Array:
  """Global number of valid entries, float32."""
  return psum(jnp.sum(mask, dtype=jnp.float32), axis_name)


def masked_mean(x, mask, *, axis_name=None) -> jax.Array:
  """Global mean of `x` over valid entries; 0 when nothing is valid."""
  return safe_divide(
      masked_sum(x, mask, axis_name=axis_name),
      masked_count(mask, axis_name=axis_name),
  )


def masked_max(x, mask, *, axis_name=None) -> jax.Array:
  """Global max over valid entries (float32); 0 when nothing is valid."""
  x = x.astype(jnp.float32)
  value = pmax(jnp.max(jnp.where(mask, x, -jnp.inf)), axis_name)
  return jnp.where(jnp.isfinite(value), value, 0.0)


def masked_min(x, mask, *, axis_name=None) -> jax.Array:
  """Global min over valid entries (float32); 0 when nothing is valid."""
  return -masked_max(-x.astype(jnp.float32), mask, axis_name=axis_name)


def masked_std(x, mask, *, axis_name=None) -> jax.Array:
  """Global population standard deviation over valid entries."""
  mean = masked_mean(x, mask, axis_name=axis_name)
  var = masked_mean(jnp.square(x - mean), mask, axis_name=axis_name)
  return jnp.sqrt(var)


def masked_quantiles(
    x: jax.Array,
    mask: jax.Array,
    quantiles: Sequence[float],
    *,
    axis_name=None,
) -> jax.Array:
  """Global quantiles of the valid entries (linear interpolation).

  Matches `numpy.quantile(x[mask], q)` (its default "linear" method); gives
  0 for every quantile when nothing is valid. Under `axis_name` the valid
  values of all shards are gathered, so this costs one all-gather of `x`.

  Args:
    x: any shape, float.
    mask: same shape, bool.
    quantiles: values in [0, 1].
    axis_name: optional mesh axis the batch is split over.

  Returns:
    `[len(quantiles)]` float32.
  """
  qs = jnp.asarray(quantiles, jnp.float32)
  values = jnp.where(mask, x.astype(jnp.float32), jnp.inf).reshape(-1)
  values = jnp.sort(all_gather(values, axis_name))
  n = masked_count(mask, axis_name=axis_name)
  pos = qs * jnp.maximum(n - 1, 0)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0).astype(jnp.int32))
  frac = pos - lo
  v_lo, v_hi = values[lo], values[hi]
  # Avoid inf * 0 when both neighbours are the same finite value.
  out = v_lo + jnp.where(frac > 0, frac * (v_hi - v_lo), 0.0)
  return jnp.where(n > 0, out, 0.0)


def aggregate_terms(
    values: jax.Array,
    mask: jax.Array,
    *,
    mode: str = "token_mean",
    norm: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Local numerator and denominator of `aggregate` (float32 scalars).

  Numerators and denominators of micro-batches or shards add up: the
  aggregate of a whole batch is `sum(num) / sum(den)`. See `aggregate`.
  """
  _checks.check_choice("aggregation mode", mode, AGGREGATION_MODES)
  _checks.check_rank("values", values, 2)
  _checks.check_mask(mask, values.shape)
  values = jnp.where(mask, values.astype(jnp.float32), 0.0)  # [B, T]
  tokens = jnp.sum(mask, axis=-1, dtype=jnp.float32)  # [B]
  seq_sum = jnp.sum(values, axis=-1)  # [B]
  has_tokens = tokens > 0  # [B]
  if mode == "token_mean":
    return jnp.sum(seq_sum), jnp.sum(tokens)
  if mode == "seq_mean_token_mean":
    return (
        jnp.sum(safe_divide(seq_sum, tokens)),
        jnp.sum(has_tokens, dtype=jnp.float32),
    )
  if mode == "seq_mean_token_sum":
    return jnp.sum(seq_sum), jnp.sum(has_tokens, dtype=jnp.float32)
  # seq_mean_token_sum_norm: a constant normaliser (Dr.GRPO): the number of
  # rows times `norm` (by default the padded length T), whatever the mask.
  norm = values.shape[-1] if norm is None else norm
  _checks.check_positive("norm", norm)
  return jnp.sum(seq_sum), jnp.asarray(values.shape[0] * norm, jnp.float32)


def aggregate(
    values: jax.Array,
    mask: jax.Array,
    *,
    mode: str = "token_mean",
    axis_name=None,
    norm: float | None = None,
) -> jax.Array:
  """Reduces per-token values `[B, T]` to a float32 scalar.

  Modes (method.md §2):

  * `token_mean` (DAPO): sum over all valid tokens / number of valid tokens.
  * `seq_mean_token_mean` (GRPO): mean over sequences with at least one
    valid token of each sequence's token mean.
  * `seq_mean_token_sum`: mean over such sequences of each token sum.
  * `seq_mean_token_sum_norm` (Dr.GRPO): sum over all valid tokens divided
    by the constant `B * norm` (`norm` defaults to T), independent of the
    mask.

  With `axis_name`, numerator and denominator are summed over the axis
  first, so the loss is the same however the batch is sharded. An all-masked
  batch gives 0 with zero gradients.

  Args:
    values: `[B, T]` float.
    mask: `[B, T]` bool, valid tokens.
    mode: one of `AGGREGATION_MODES`.
    axis_name: optional mesh axis the batch is split over.
    norm: the constant of `seq_mean_token_sum_norm` (default T).

  Returns:
    float32 scalar.
  """
  num, den = aggregate_terms(values, mask, mode=mode, norm=norm)
  return safe_divide(psum(num, axis_name), psum(den, axis_name))
