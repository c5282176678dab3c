"""The precision policy: the one place that decides every cast.

The paper (method.md §5) shows that computing the log-probabilities behind the
importance ratio in bfloat16 biases the ratio upward and turns entropy growth
into collapse. Every dtype decision in entropo therefore goes through a
`Precision` policy, so that an experiment can switch the whole numerical
recipe with one flag and the precision ablation can compare recipes side by
side.

The fields, in the order data flows through them:

* `param_dtype`: how weights are stored (the optimizer's master copy).
* `compute_dtype`: activations and matmuls in the model body.
* `head_dtype`: operand dtype of the output projection `hidden @ lm_head`.
* `logits_dtype`: the dtype the product accumulates into and returns
  (`preferred_element_type`); logits are rounded to it, and so are the
  log-probs, entropies and log-ratios computed from them (the reductions
  inside log-softmax accumulate in float32, as XLA does for low-precision
  reductions). Outputs that are log-probs, entropies, losses or metrics are
  always returned as float32: a `bf16` policy rounds them to bfloat16 (to
  reproduce the bias), then upcasts.
* `sampler_dtype`: the compute dtype of the sampler's forward pass.
* `max_log_ratio`: log-ratios are clamped to `[-max, max]` before `exp`.

Presets (`get_precision(name)`):

| name             | params | compute | head operands | logits / log-probs |
|------------------|--------|---------|---------------|--------------------|
| `fp32`           | f32    | f32     | f32           | f32                |
| `bf16`           | f32    | bf16    | bf16          | bf16 (the paper's warning) |
| `bf16_fp32_head` | f32    | bf16    | f32           | f32 (the paper's fix) |
| `bf16_fp32_logits` | f32  | bf16    | bf16          | f32 (bf16 operands, f32 product) |
| `fp16`           | f32    | f16     | f16           | f16 (uniform fp16, Qi et al.) |

All presets keep float32 master weights: mixed precision with float32 master
weights is the standard recipe (and optax updates in bf16 lose small steps),
so the presets differ only where the paper locates the confound.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from entropo import _checks

DType = Any

DEFAULT_MAX_LOG_RATIO = 20.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Precision:
  """A named numerical recipe. See the module docstring for the fields."""

  name: str = "custom"
  param_dtype: DType = jnp.float32
  compute_dtype: DType = jnp.float32
  head_dtype: DType = jnp.float32
  logits_dtype: DType = jnp.float32
  sampler_dtype: DType = jnp.float32
  max_log_ratio: float = DEFAULT_MAX_LOG_RATIO

  def __post_init__(self):
    for field in ("param_dtype", "compute_dtype", "head_dtype",
                  "logits_dtype", "sampler_dtype"):
      dtype = jnp.dtype(getattr(self, field))
      if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"Precision.{field} must be a floating dtype; got {dtype}."
        )
      object.__setattr__(self, field, dtype)
    if not self.max_log_ratio > 0:
      raise ValueError(
          f"Precision.max_log_ratio must be > 0; got {self.max_log_ratio}."
      )

  def replace(self, **changes) -> "Precision":
    return dataclasses.replace(self, **changes)

  # Casts. Callers never call `astype` on a dtype of their own choosing.

  def cast_params(self, tree):
    return _cast_floating(tree, self.param_dtype)

  def cast_compute(self, tree):
    return _cast_floating(tree, self.compute_dtype)

  def round_logits(self, x: jax.Array) -> jax.Array:
    """Logits rounded to `logits_dtype`, held in float32 for the reductions.

    Log-softmax sums are accumulated in float32 whatever the policy (as XLA
    does for low-precision reductions on GPU and TPU); what a low-precision
    policy changes is the rounding of the logits and of the results.
    """
    return _round_to(x, self.logits_dtype)

  def round_output(self, x: jax.Array) -> jax.Array:
    """A log-prob or entropy rounded to `logits_dtype`, returned float32."""
    return _round_to(x, self.logits_dtype)

  def head_product(self, hidden: jax.Array, lm_head: jax.Array) -> jax.Array:
    """`hidden @ lm_head` under the policy: `[..., D] x [D, V] -> [..., V]`.

    Operands are cast to `head_dtype`; the product accumulates into and
    returns `logits_dtype` (`preferred_element_type`), so a float32 product
    on bfloat16 operands never rounds the logits to bfloat16.
    """
    return jnp.matmul(
        hidden.astype(self.head_dtype),
        lm_head.astype(self.head_dtype),
        preferred_element_type=self.logits_dtype,
    )

  def log_ratio(self, logps: jax.Array, old_logps: jax.Array) -> jax.Array:
    """Clamped `logps - old_logps`, computed in `logits_dtype`.

    Returns float32. The clamp keeps `exp` finite for tokens whose
    probability moved by more than e^max_log_ratio (or that are garbage in
    padded positions), and passes zero gradient outside the clamp.
    """
    diff = self.round_output(
        logps.astype(jnp.float32) - old_logps.astype(jnp.float32)
    )
    bound = self.max_log_ratio
    return jnp.clip(diff, -bound, bound)


def _round_to(x: jax.Array, dtype) -> jax.Array:
  """`x` rounded to `dtype` (exactly as `astype`), returned float32.

  Under jit XLA may drop a rounding it deems excess precision: on CPU it
  folds `convert(dot(..) -> bf16) -> f32` into a float32 dot, so a `bf16`
  policy would silently keep float32 logits. The optimization barrier pins
  the low-precision value, so the rounding the policy asks for happens.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return x.astype(jnp.float32)
  low = jax.lax.optimization_barrier(x.astype(dtype))
  return low.astype(jnp.float32)


def _cast_floating(tree, dtype):
  def cast(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x

  return jax.tree.map(cast, tree)


PRESETS: dict[str, Precision] = {
    "fp32": Precision(name="fp32"),
    "bf16": Precision(
        name="bf16",
        compute_dtype=jnp.bfloat16,
        head_dtype=jnp.bfloat16,
        logits_dtype=jnp.bfloat16,
        sampler_dtype=jnp.bfloat16,
    ),
    "bf16_fp32_head": Precision(
        name="bf16_fp32_head",
        compute_dtype=jnp.bfloat16,
        head_dtype=jnp.float32,
        logits_dtype=jnp.float32,
        sampler_dtype=jnp.bfloat16,
    ),
    "bf16_fp32_logits": Precision(
        name="bf16_fp32_logits",
        compute_dtype=jnp.bfloat16,
        head_dtype=jnp.bfloat16,
        logits_dtype=jnp.float32,
        sampler_dtype=jnp.bfloat16,
    ),
    "fp16": Precision(
        name="fp16",
        compute_dtype=jnp.float16,
        head_dtype=jnp.float16,
        logits_dtype=jnp.float16,
        sampler_dtype=jnp.float16,
    ),
}


def get_precision(precision: "str | Precision | None") -> Precision:
  """Returns a `Precision` from a preset name, a policy, or None (`fp32`)."""
  if precision is None:
    return PRESETS["fp32"]
  if isinstance(precision, Precision):
    return precision
  _checks.check_choice("precision preset", precision, PRESETS)
  return PRESETS[precision]


def clamp_log_ratio(
    log_ratio: jax.Array, *, bound: float = DEFAULT_MAX_LOG_RATIO
) -> jax.Array:
  """Clamps a log-ratio to `[-bound, bound]` (float32) before `exp`."""
  return jnp.clip(log_ratio.astype(jnp.float32), -bound, bound)
