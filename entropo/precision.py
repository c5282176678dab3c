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
* `dot_algorithm`: the `jax.lax.DotAlgorithmPreset` of every contraction
  whose operands are float32 (see "Dot algorithms" below).
* `max_log_ratio`: log-ratios are clamped to `[-max, max]` before `exp`.

Presets (`get_precision(name)`):

| name             | params | compute | head operands | logits / log-probs |
|------------------|--------|---------|---------------|--------------------|
| `fp32`           | f32    | f32     | f32           | f32                |
| `tf32`           | f32    | f32 (TF32 dots) | f32 (TF32 dot) | f32 (JAX's silent GPU default, named) |
| `bf16`           | f32    | bf16    | bf16          | bf16 (the paper's warning) |
| `bf16_fp32_head` | f32    | bf16    | f32           | f32 (the paper's fix) |
| `bf16_fp32_logits` | f32  | bf16    | bf16          | f32 (bf16 operands, f32 product) |
| `fp16`           | f32    | f16     | f16           | f16 (uniform fp16, Qi et al.) |

All presets keep float32 master weights: mixed precision with float32 master
weights is the standard recipe (and optax updates in bf16 lose small steps),
so the presets differ only where the paper locates the confound.

Dot algorithms. A float32 dtype does not make a float32 matmul: JAX's default
float32 dot is TF32 on NVIDIA GPUs (10 mantissa bits per operand) and one
bfloat16 pass on TPUs. So every contraction in entropo (the model's
projections, attention scores and values, MLP, the head, the fused head's
forward and backward, the sampler) goes through `Precision.einsum` or
`Precision.matmul`, which name the algorithm, picked by the dtype of the
operands:

| operands | algorithm                                   | CPU      | GPU      | TPU      |
|----------|---------------------------------------------|----------|----------|----------|
| float32  | `dot_algorithm`: `F32_F32_F32` (`fp32`, ...) | native   | native   | native: 6 bf16 passes (`BF16_BF16_F32_X6`), about float32 |
| float32  | `TF32_TF32_F32` (`tf32`)                     | emulated | native (Ampere+) | emulated |
| float32  | `BF16_BF16_F32` (custom policies)            | emulated | native   | native   |
| bfloat16 | `BF16_BF16_F32`                              | native (as `HIGHEST`) | native | native |
| float16  | `F16_F16_F32`                                | native (as `HIGHEST`) | native | emulated |

Emulated means: the operands are rounded to the algorithm's input format
(TF32: 10 explicit mantissa bits, round to nearest even; bfloat16, float16:
a cast), then multiplied exactly and accumulated in float32 with the
backend's float32 algorithm, which is what the hardware algorithm computes
up to the order of the float32 sums. So every preset runs on every backend,
and the precision ablation, `tf32` included, runs on a CPU. The backend is
JAX's default backend at trace time. `Precision.describe()` gives the
resolved table for run metadata. The TPU column follows JAX's documentation
and has not been run here.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from entropo import _checks

DType = Any

DEFAULT_MAX_LOG_RATIO = 20.0

_ALGO = jax.lax.DotAlgorithmPreset
# What `dot_algorithm` (the algorithm of float32 contractions) may be: each
# can be emulated by rounding the operands where a backend lacks it.
DOT_ALGORITHMS = ("F32_F32_F32", "TF32_TF32_F32", "BF16_BF16_F32")
# The algorithm of low-precision operands, under every policy: their products
# are exact in float32, so there is one sensible choice, float32 sums.
_LOW_PRECISION_ALGORITHMS = {
    jnp.dtype(jnp.bfloat16): _ALGO.BF16_BF16_F32,
    jnp.dtype(jnp.float16): _ALGO.F16_F16_F32,
}
# The input format of each algorithm, for emulation.
_INPUT_FORMAT = {
    _ALGO.F32_F32_F32: "float32",
    _ALGO.TF32_TF32_F32: "tf32",
    _ALGO.BF16_BF16_F32: "bfloat16",
    _ALGO.F16_F16_F32: "float16",
}
# What each backend runs natively, as the value to pass as `precision=`;
# `None` in a key matches any operand dtype. XLA:CPU (measured on jax 0.10):
# float32 dots are float32 (F32_F32_F32 accepted); BF16_BF16_F32 is accepted
# but does not round float32 operands, and its small dots fail to compile
# ("not supported by the ElementalIrEmitter"); TF32 and F16 algorithms are
# rejected. Its bfloat16 and float16 dots multiply exactly and sum in
# float32 (the error of a 16384-long dot is the output's rounding alone), so
# for operands already in those dtypes `Precision.HIGHEST` is the algorithm.
_HIGHEST = jax.lax.Precision.HIGHEST
_NATIVE = {
    "cpu": {(_ALGO.F32_F32_F32, "float32"): _ALGO.F32_F32_F32,
            (_ALGO.BF16_BF16_F32, "bfloat16"): _HIGHEST,
            (_ALGO.F16_F16_F32, "float16"): _HIGHEST},
    "gpu": {(_ALGO.F32_F32_F32, None): _ALGO.F32_F32_F32,
            (_ALGO.TF32_TF32_F32, None): _ALGO.TF32_TF32_F32,
            (_ALGO.BF16_BF16_F32, None): _ALGO.BF16_BF16_F32,
            (_ALGO.F16_F16_F32, None): _ALGO.F16_F16_F32},
    "tpu": {(_ALGO.F32_F32_F32, None): _ALGO.BF16_BF16_F32_X6,
            (_ALGO.BF16_BF16_F32, None): _ALGO.BF16_BF16_F32},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Precision:
  """A named numerical recipe. See the module docstring for the fields."""

  name: str = "custom"
  param_dtype: DType = jnp.float32
  compute_dtype: DType = jnp.float32
  head_dtype: DType = jnp.float32
  logits_dtype: DType = jnp.float32
  sampler_dtype: DType = jnp.float32
  dot_algorithm: "str | jax.lax.DotAlgorithmPreset" = "F32_F32_F32"
  max_log_ratio: float = DEFAULT_MAX_LOG_RATIO

  def __post_init__(self):
    for field in ("param_dtype", "compute_dtype", "head_dtype",
                  "logits_dtype", "sampler_dtype"):
      dtype = jnp.dtype(getattr(self, field))
      if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"Precision.{field} must be a floating dtype; got {dtype}."
        )
      if dtype.itemsize > 4:
        raise ValueError(
            f"Precision.{field} must be at most 32 bits wide; got {dtype}."
        )
      object.__setattr__(self, field, dtype)
    algorithm = self.dot_algorithm
    name = algorithm.name if isinstance(algorithm, _ALGO) else algorithm
    _checks.check_choice("Precision.dot_algorithm", name, DOT_ALGORITHMS)
    object.__setattr__(self, "dot_algorithm", _ALGO[name])
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

  # Contractions. Every dot in entropo goes through these two methods.

  def algorithm_for(self, dtype) -> jax.lax.DotAlgorithmPreset:
    """The dot algorithm of a contraction whose operands are `dtype`."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
      return self.dot_algorithm
    if dtype in _LOW_PRECISION_ALGORITHMS:
      return _LOW_PRECISION_ALGORITHMS[dtype]
    raise ValueError(
        f"entropo contracts float32, bfloat16 or float16 operands; got "
        f"{dtype}."
    )

  def einsum(self, spec: str, a: jax.Array, b: jax.Array, *,
             preferred_element_type=None) -> jax.Array:
    """`jnp.einsum(spec, a, b)` with the policy's dot algorithm.

    The algorithm is `algorithm_for` the less precise operand dtype; the
    result has `preferred_element_type` if given, else the operands'
    promoted dtype (so bfloat16 operands give a bfloat16 result, summed in
    float32).
    """
    return self._contract(functools.partial(jnp.einsum, spec), a, b,
                          preferred_element_type)

  def matmul(self, a: jax.Array, b: jax.Array, *,
             preferred_element_type=None) -> jax.Array:
    """`jnp.matmul(a, b)` with the policy's dot algorithm (see `einsum`)."""
    return self._contract(jnp.matmul, a, b, preferred_element_type)

  def _contract(self, op, a, b, preferred):
    out_dtype = jnp.result_type(a, b) if preferred is None else preferred
    algorithm = self.algorithm_for(_narrower(a.dtype, b.dtype))
    native = native_precision(algorithm, _narrower(a.dtype, b.dtype))
    if native is not None:
      return op(a, b, precision=native, preferred_element_type=out_dtype)
    return _emulated(op, _INPUT_FORMAT[algorithm], out_dtype, a, b)

  def describe(self) -> dict:
    """The policy as run metadata: preset, backend, resolved algorithms."""
    dots = {}
    for dtype in sorted({self.compute_dtype, self.head_dtype,
                         self.sampler_dtype, jnp.dtype(jnp.float32)},
                        key=str):
      algorithm = self.algorithm_for(dtype)
      native = native_precision(algorithm, dtype)
      dots[str(dtype)] = {
          "algorithm": algorithm.name,
          "native": native is not None,
          "runs_as": (_spelling(native) if native is not None else
                      f"operands rounded to {_INPUT_FORMAT[algorithm]}, "
                      f"then {_spelling(native_precision(_ALGO.F32_F32_F32, jnp.float32))}"),
      }
    return {
        "preset": self.name,
        "backend": jax.default_backend(),
        **{f: str(getattr(self, f)) for f in (
            "param_dtype", "compute_dtype", "head_dtype", "logits_dtype",
            "sampler_dtype")},
        "dot_algorithm": self.dot_algorithm.name,
        "dots": dots,
        "max_log_ratio": self.max_log_ratio,
    }

  def head_product(self, hidden: jax.Array, lm_head: jax.Array) -> jax.Array:
    """`hidden @ lm_head` under the policy: `[..., D] x [D, V] -> [..., V]`.

    Operands are cast to `head_dtype`; the product accumulates into and
    returns `logits_dtype` (`preferred_element_type`), so a float32 product
    on bfloat16 operands never rounds the logits to bfloat16.
    """
    return self.matmul(
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


def _emulated(op, fmt, out_dtype, a, b):
  """`op(a, b)` as an algorithm with input format `fmt` computes it.

  Operands rounded to `fmt`, products and sums in float32. The gradient is
  the hardware's too: each backward product is the same emulated
  contraction, its cotangent operand rounded to `fmt` like the rest, and
  the rounding itself passes gradients straight through.
  """
  exact = native_precision(_ALGO.F32_F32_F32, jnp.float32)
  dot = functools.partial(op, precision=exact,
                          preferred_element_type=jnp.float32)
  in_dtypes = (a.dtype, b.dtype)

  @jax.custom_vjp
  def contract(a, b):
    return dot(round_to_format(a, fmt), round_to_format(b, fmt))

  def forward(a, b):
    a, b = round_to_format(a, fmt), round_to_format(b, fmt)
    return dot(a, b), (a, b)

  def backward(operands, cotangent):
    _, pullback = jax.vjp(dot, *operands)
    grads = pullback(round_to_format(cotangent, fmt))
    return tuple(g.astype(t) for g, t in zip(grads, in_dtypes))

  contract.defvjp(forward, backward)
  return contract(a, b).astype(out_dtype)


def _narrower(a, b):
  """The less precise of two float dtypes (the one a dot rounds to)."""
  a, b = jnp.dtype(a), jnp.dtype(b)
  return a if jnp.finfo(a).nmant <= jnp.finfo(b).nmant else b


def _backend_kind(backend: str) -> str:
  return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def native_precision(algorithm, operand_dtype, backend: str | None = None):
  """The `precision=` value that runs `algorithm` natively, or None.

  None means the backend lacks it and `Precision` emulates it. `backend`
  defaults to JAX's default backend; unknown backends emulate everything
  but float32, which they are given as `Precision.HIGHEST`.
  """
  backend = _backend_kind(backend or jax.default_backend())
  operand = str(jnp.dtype(operand_dtype))
  table = _NATIVE.get(backend)
  if table is None:
    return (jax.lax.Precision.HIGHEST if algorithm == _ALGO.F32_F32_F32
            else None)
  if (algorithm, None) in table:
    native = table[(algorithm, None)]
  else:
    native = table.get((algorithm, operand))
  if (native == _ALGO.TF32_TF32_F32 and backend == "gpu"
      and not _has_tensor_float32()):
    return None
  return native


@functools.cache
def _has_tensor_float32() -> bool:
  """Whether the GPU in use has TF32 tensor cores (compute capability 8+).

  True when no GPU is in use (a question about GPUs in general).
  """
  if _backend_kind(jax.default_backend()) != "gpu":
    return True
  capability = getattr(jax.devices()[0], "compute_capability", None)
  try:
    return float(capability) >= 8.0
  except (TypeError, ValueError):
    return True  # ROCm and others: let XLA decide


def _spelling(precision) -> str:
  return getattr(precision, "name", str(precision))


def round_to_tf32(x: jax.Array) -> jax.Array:
  """float32 `x` rounded to TF32 (10 explicit mantissa bits), nearest even.

  TF32 keeps float32's 8-bit exponent, so only the 13 low mantissa bits go:
  add half an ulp of TF32 (plus one if the kept part is odd, for ties to
  even) and clear them. A carry into the exponent is the correct rounding
  up (to the next binade, or to inf past the largest float32). NaN is kept.
  """
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  odd = (bits >> 13) & 1
  rounded = (bits + jnp.uint32(0xFFF) + odd) & jnp.uint32(0xFFFFE000)
  out = jax.lax.bitcast_convert_type(rounded, jnp.float32)
  return jnp.where(jnp.isnan(x), x, out)


def round_to_format(x: jax.Array, fmt: str) -> jax.Array:
  """`x` rounded to a dot algorithm's input format, held in float32."""
  if fmt == "float32":
    return x.astype(jnp.float32)
  if fmt == "tf32":
    return round_to_tf32(x)
  return _round_to(x, fmt)


def _cast_floating(tree, dtype):
  def cast(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x

  return jax.tree.map(cast, tree)


PRESETS: dict[str, Precision] = {
    "fp32": Precision(name="fp32", dot_algorithm="F32_F32_F32"),
    "tf32": Precision(name="tf32", dot_algorithm="TF32_TF32_F32"),
    "bf16": Precision(
        name="bf16",
        dot_algorithm="F32_F32_F32",
        compute_dtype=jnp.bfloat16,
        head_dtype=jnp.bfloat16,
        logits_dtype=jnp.bfloat16,
        sampler_dtype=jnp.bfloat16,
    ),
    "bf16_fp32_head": Precision(
        name="bf16_fp32_head",
        dot_algorithm="F32_F32_F32",
        compute_dtype=jnp.bfloat16,
        head_dtype=jnp.float32,
        logits_dtype=jnp.float32,
        sampler_dtype=jnp.bfloat16,
    ),
    "bf16_fp32_logits": Precision(
        name="bf16_fp32_logits",
        dot_algorithm="F32_F32_F32",
        compute_dtype=jnp.bfloat16,
        head_dtype=jnp.bfloat16,
        logits_dtype=jnp.float32,
        sampler_dtype=jnp.bfloat16,
    ),
    "fp16": Precision(
        name="fp16",
        dot_algorithm="F32_F32_F32",
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
