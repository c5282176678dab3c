"""Tests for entropo/precision.py: presets, validation, casts, head product."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entropo
from entropo import precision as precision_lib
from tests.reference import dots as dots_ref
from tests.reference import logprobs as ref

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16

# The table in precision.py's docstring:
# name -> (param, compute, head operands, logits).
DOCUMENTED = {
    "fp32": (F32, F32, F32, F32),
    "tf32": (F32, F32, F32, F32),
    "bf16": (F32, BF16, BF16, BF16),
    "bf16_fp32_head": (F32, BF16, F32, F32),
    "bf16_fp32_logits": (F32, BF16, BF16, F32),
    "fp16": (F32, F16, F16, F16),
}


# Presets and lookup.


def test_presets_are_exactly_the_documented_ones():
  assert set(entropo.PRESETS) == set(DOCUMENTED)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_preset_dtypes_match_the_documented_table(name):
  precision = entropo.get_precision(name)
  param, compute, head, logits = DOCUMENTED[name]
  assert precision.name == name
  assert precision.param_dtype == jnp.dtype(param)
  assert precision.compute_dtype == jnp.dtype(compute)
  assert precision.head_dtype == jnp.dtype(head)
  assert precision.logits_dtype == jnp.dtype(logits)
  # The sampler runs the model body, so it uses the compute dtype.
  assert precision.sampler_dtype == jnp.dtype(compute)
  assert precision.max_log_ratio == precision_lib.DEFAULT_MAX_LOG_RATIO == 20.0


def test_get_precision_none_is_fp32():
  precision = entropo.get_precision(None)
  assert precision is entropo.PRESETS["fp32"]
  for field in ("param_dtype", "compute_dtype", "head_dtype", "logits_dtype",
                "sampler_dtype"):
    assert getattr(precision, field) == jnp.dtype(jnp.float32)


def test_get_precision_passes_a_policy_through():
  custom = entropo.Precision(name="mine", logits_dtype=jnp.float16)
  assert entropo.get_precision(custom) is custom


def test_get_precision_unknown_name_names_value_and_choices():
  with pytest.raises(ValueError, match=r"'bf32'") as info:
    entropo.get_precision("bf32")
  for name in DOCUMENTED:
    assert repr(name) in str(info.value)


# Validation of the dataclass.


@pytest.mark.parametrize("field", ["param_dtype", "compute_dtype",
                                   "head_dtype", "logits_dtype",
                                   "sampler_dtype"])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_precision_rejects_non_float_dtypes(field, dtype):
  with pytest.raises(ValueError, match=rf"Precision\.{field}.*"
                     rf"{jnp.dtype(dtype).name}"):
    entropo.Precision(**{field: dtype})


@pytest.mark.parametrize("bound", [0.0, -1.0, float("nan")])
def test_precision_rejects_non_positive_max_log_ratio(bound):
  with pytest.raises(ValueError, match=r"max_log_ratio.*got"):
    entropo.Precision(max_log_ratio=bound)


def test_precision_normalises_dtypes_is_frozen_and_replaceable():
  precision = entropo.Precision(head_dtype="bfloat16")
  assert precision.head_dtype == jnp.dtype(jnp.bfloat16)
  assert isinstance(precision.head_dtype, np.dtype)
  with pytest.raises(dataclasses.FrozenInstanceError):
    precision.head_dtype = jnp.float32
  changed = precision.replace(logits_dtype=jnp.float16)
  assert changed.logits_dtype == jnp.dtype(jnp.float16)
  assert changed.head_dtype == jnp.dtype(jnp.bfloat16)
  assert precision.logits_dtype == jnp.dtype(jnp.float32)  # original untouched
  with pytest.raises(ValueError, match="logits_dtype.*int8"):
    precision.replace(logits_dtype=jnp.int8)


def test_precision_is_keyword_only():
  with pytest.raises(TypeError):
    entropo.Precision("fp32")  # pylint: disable=too-many-function-args


# Casts.


def test_cast_params_and_compute_touch_only_floating_leaves():
  precision = entropo.get_precision("bf16")
  tree = {
      "w": jnp.ones((2, 3), jnp.float32),
      "ids": jnp.arange(3, dtype=jnp.int32),
      "flag": jnp.array([True]),
      "nested": [jnp.zeros((1,), jnp.float16)],
  }
  compute = precision.cast_compute(tree)
  assert compute["w"].dtype == jnp.bfloat16
  assert compute["nested"][0].dtype == jnp.bfloat16
  assert compute["ids"].dtype == jnp.int32
  assert compute["flag"].dtype == jnp.bool_
  params = precision.cast_params(compute)
  assert params["w"].dtype == jnp.float32
  assert params["nested"][0].dtype == jnp.float32
  assert params["ids"].dtype == jnp.int32


@pytest.mark.parametrize("name,dtype_name", [("bf16", "bfloat16"),
                                             ("fp16", "float16"),
                                             ("fp32", "float32")])
def test_round_logits_and_output_round_to_logits_dtype_return_f32(
    rng, name, dtype_name):
  precision = entropo.get_precision(name)
  x = (rng.standard_normal((4, 9)) * 5).astype(np.float32)
  expected = ref.round_to(x, dtype_name)
  for fn in (precision.round_logits, precision.round_output):
    out = fn(jnp.asarray(x))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out, np.float64), expected)
  if name == "fp32":
    np.testing.assert_array_equal(np.asarray(precision.round_logits(x)), x)
  else:
    # The rounding is real: most values move.
    assert np.mean(expected != x) > 0.9


# The head product.


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_head_product_returns_logits_dtype(rng, name):
  precision = entropo.get_precision(name)
  h = jnp.asarray(rng.standard_normal((3, 5, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((8, 11)), jnp.float32)
  out = precision.head_product(h, w)
  assert out.shape == (3, 5, 11)
  assert out.dtype == precision.logits_dtype


def test_head_product_hand_computed():
  # [1, 2^-8] . [1, 1] = 1 + 2^-8 = 1.00390625: exact in float32, and
  # exactly halfway between the bf16 neighbours 1 and 1 + 2^-7, so a bf16
  # product rounds it to even, 1.0. The operands are exact in bf16.
  h = jnp.array([[1.0, 2.0**-8]], jnp.float32)
  w = jnp.array([[1.0], [1.0]], jnp.float32)
  assert float(entropo.get_precision("fp32").head_product(h, w)[0, 0]) == (
      1.00390625)
  assert float(entropo.get_precision("bf16_fp32_logits").head_product(
      h, w)[0, 0]) == 1.00390625
  assert float(entropo.get_precision("bf16").head_product(h, w)[0, 0]) == 1.0
  # [1, 2] . [3, 4] = 11 under every preset.
  for name in DOCUMENTED:
    out = entropo.get_precision(name).head_product(
        jnp.array([[1.0, 2.0]]), jnp.array([[3.0], [4.0]]))
    assert float(out[0, 0]) == 11.0


def test_head_product_accumulates_in_logits_dtype(rng):
  # A long contraction (D = 2048) of bf16 operands. The exact product of the
  # rounded operands is the float64 reference on bf16-rounded inputs.
  h = jnp.asarray(rng.standard_normal((6, 2048)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((2048, 7)), jnp.bfloat16)
  exact = np.asarray(h, np.float64) @ np.asarray(w, np.float64)  # [6, 7]
  scale = np.sqrt(2048.0)  # typical |logit|

  f32_product = entropo.get_precision("bf16_fp32_logits").head_product(h, w)
  bf16_product = entropo.get_precision("bf16").head_product(h, w)
  assert f32_product.dtype == jnp.float32
  assert bf16_product.dtype == jnp.bfloat16

  f32_err = np.abs(np.asarray(f32_product, np.float64) - exact)
  bf16_err = np.abs(np.asarray(bf16_product, np.float64) - exact)
  # Float32 accumulation: error a few float32 ulps of the partial sums
  # (2^-24 * |partials| * D at worst), far below one bf16 ulp of the result.
  assert f32_err.max() < 2.0**-24 * scale * 2048 * 0.1
  # Bfloat16 result: within one bf16 rounding (half an ulp, 2^-9 relative)
  # of the exact value, plus the float32 accumulation error.
  assert np.all(bf16_err <= 2.0**-8 * np.abs(exact) + 1e-3)
  # And the two products genuinely differ: the bf16 one is rounded.
  np.testing.assert_array_equal(
      np.asarray(bf16_product, np.float64), ref.round_to(exact, "bfloat16"))
  assert np.mean(bf16_err > 10 * f32_err) > 0.8


def test_head_product_casts_operands_to_head_dtype(rng):
  # bf16_fp32_head: float32 operands stay float32 (no bf16 rounding of the
  # weights); bf16_fp32_logits rounds the operands, then multiplies in f32.
  h = rng.standard_normal((5, 16)).astype(np.float32)
  w = rng.standard_normal((16, 9)).astype(np.float32)
  exact = h.astype(np.float64) @ w.astype(np.float64)
  rounded = (ref.round_to(h, "bfloat16") @ ref.round_to(w, "bfloat16"))
  head32 = entropo.get_precision("bf16_fp32_head").head_product(h, w)
  logits32 = entropo.get_precision("bf16_fp32_logits").head_product(h, w)
  np.testing.assert_allclose(np.asarray(head32), exact, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits32), rounded, rtol=1e-5,
                             atol=1e-5)
  # Rounding the operands to bf16 moves the logits by ~2^-9 * |h||w|.
  assert np.abs(rounded - exact).max() > 1e-3


def test_head_product_gradient_dtypes_follow_inputs(rng):
  precision = entropo.get_precision("bf16_fp32_logits")
  h = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
  gh, gw = jax.grad(lambda a, b: jnp.sum(precision.head_product(a, b)),
                    argnums=(0, 1))(h, w)
  assert gh.dtype == jnp.float32 and gw.dtype == jnp.float32
  # d sum(h W) / dh = rows of bf16-rounded W summed (in float32); the cast
  # of h to bf16 inside the product rounds its cotangent to bf16 as well,
  # so the float32 gradient carries bf16 values: one bf16 rounding (2^-8
  # relative at most) of the exact sum.
  exact = np.broadcast_to(
      ref.round_to(np.asarray(w), "bfloat16").sum(axis=1), (4, 8))
  np.testing.assert_array_equal(np.asarray(gh),
                                ref.round_to(np.asarray(gh), "bfloat16"))
  np.testing.assert_allclose(np.asarray(gh), exact, rtol=2.0**-8, atol=0)


# Log-ratios.


def test_log_ratio_clamps_to_max_log_ratio():
  precision = entropo.get_precision("fp32")
  logps = jnp.array([-50.0, -1.0, 0.0, -30.0, -0.5], jnp.float32)
  old = jnp.array([-1.0, -50.0, 0.0, -29.0, -0.25], jnp.float32)
  out = precision.log_ratio(logps, old)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), [-20.0, 20.0, 0.0, -1.0, -0.25],
                             rtol=0, atol=1e-6)
  custom = precision.replace(max_log_ratio=0.5)
  np.testing.assert_allclose(np.asarray(custom.log_ratio(logps, old)),
                             [-0.5, 0.5, 0.0, -0.5, -0.25], rtol=0, atol=1e-6)
  assert np.all(np.isfinite(np.exp(np.asarray(out))))


def test_log_ratio_gradient_is_zero_outside_the_clamp():
  precision = entropo.get_precision("fp32")
  logps = jnp.array([-50.0, -1.0, -30.0], jnp.float32)
  old = jnp.array([-1.0, -50.0, -29.0], jnp.float32)
  g_new, g_old = jax.grad(
      lambda a, b: jnp.sum(precision.log_ratio(a, b)),
      argnums=(0, 1))(logps, old)
  np.testing.assert_array_equal(np.asarray(g_new), [0.0, 0.0, 1.0])
  np.testing.assert_array_equal(np.asarray(g_old), [0.0, 0.0, -1.0])


def test_log_ratio_rounds_to_logits_dtype_under_bf16(rng):
  logps = -rng.random(64).astype(np.float32) * 3
  old = -rng.random(64).astype(np.float32) * 3
  diff = logps.astype(np.float64) - old.astype(np.float64)
  bf16 = entropo.get_precision("bf16").log_ratio(logps, old)
  fp32 = entropo.get_precision("fp32").log_ratio(logps, old)
  assert bf16.dtype == fp32.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(fp32), diff, rtol=1e-6, atol=1e-6)
  # The float32 difference of float32 inputs is exact here (Sterbenz / same
  # binade), so bf16 output is exactly that difference rounded to bf16.
  np.testing.assert_array_equal(np.asarray(bf16, np.float64),
                                ref.round_to(np.asarray(fp32), "bfloat16"))
  assert np.abs(np.asarray(bf16) - np.asarray(fp32)).max() > 1e-4


def test_clamp_log_ratio_is_float32_and_clamped():
  x = jnp.array([-100.0, -3.0, 0.25, 7.0, 100.0], jnp.bfloat16)
  out = entropo.clamp_log_ratio(x)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), [-20.0, -3.0, 0.25, 7.0, 20.0])
  np.testing.assert_array_equal(
      np.asarray(entropo.clamp_log_ratio(x, bound=5.0)),
      [-5.0, -3.0, 0.25, 5.0, 5.0])


# The precision policy seen through token_logprobs (the paper's confound).


@pytest.mark.parametrize("name,dtype_name", [("bf16", "bfloat16"),
                                             ("fp16", "float16")])
def test_low_precision_preset_reproduces_rounded_logprobs(
    rng, name, dtype_name):
  logits = (rng.standard_normal((4, 6, 37)) * 3).astype(np.float32)
  targets = rng.integers(0, 37, (4, 6))
  out = np.asarray(entropo.token_logprobs(logits, targets, precision=name))
  assert out.dtype == np.float32
  # Expected: log-probs of the logits rounded to the low dtype, computed
  # in float64 here, then rounded to the low dtype.
  exact = ref.token_logprobs(ref.round_to(logits, dtype_name), targets)
  expected = ref.round_to(exact, dtype_name)
  # The library computes the log-softmax in float32, which can land on the
  # other side of a rounding boundary: allow one ulp of the low dtype
  # (2^-7 relative for bf16, 2^-10 for fp16), and demand most are exact.
  ulp = 2.0**-7 if dtype_name == "bfloat16" else 2.0**-10
  assert np.all(np.abs(out - expected) <= ulp * np.abs(expected) + 1e-30)
  assert np.mean(out == expected) > 0.95
  # Outputs are representable in the low dtype.
  np.testing.assert_array_equal(out, ref.round_to(out, dtype_name))
  # The preset changes the numbers (vs float32) by more than float32 noise.
  fp32 = np.asarray(entropo.token_logprobs(logits, targets, precision="fp32"))
  assert np.abs(out - fp32).max() > 1e-3


def test_fp32_preset_does_not_change_logprobs(rng):
  logits = (rng.standard_normal((5, 23)) * 3).astype(np.float32)
  targets = rng.integers(0, 23, (5,))
  default = entropo.token_logprobs(logits, targets)
  for precision in ("fp32", entropo.PRESETS["fp32"], "bf16_fp32_head",
                    "bf16_fp32_logits"):
    np.testing.assert_array_equal(
        np.asarray(entropo.token_logprobs(logits, targets,
                                          precision=precision)),
        np.asarray(default))
  np.testing.assert_allclose(np.asarray(default),
                             ref.token_logprobs(logits, targets),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,dtype_name", [("bf16", "bfloat16"),
                                             ("fp16", "float16")])
def test_rounding_survives_jit_after_a_dot(rng, name, dtype_name):
  # Regression: under jit XLA (CPU) folded `convert(dot -> bf16) -> f32`
  # into a float32 dot, so the `bf16` policy silently kept float32 logits.
  precision = entropo.get_precision(name)
  h = jnp.asarray(rng.standard_normal((6, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((16, 9)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 9, (6,)))

  def logits(a, b):
    return precision.round_logits(precision.head_product(a, b))

  eager = np.asarray(logits(h, w))
  jitted = np.asarray(jax.jit(logits)(h, w))
  np.testing.assert_array_equal(jitted, ref.round_to(jitted, dtype_name))
  np.testing.assert_array_equal(jitted, eager)

  def logps(a, b):
    return entropo.token_logprobs(precision.head_product(a, b), targets,
                                  precision=precision)

  np.testing.assert_array_equal(np.asarray(jax.jit(logps)(h, w)),
                                np.asarray(logps(h, w)))


# Dot algorithms: the policy's `dot_algorithm`, emulation where a backend
# lacks it, and the `tf32` preset's error band.


def _emulated_tf32_precision():
  """The tf32 preset, which this backend must emulate for the tests below."""
  precision = entropo.get_precision("tf32")
  algorithm = jax.lax.DotAlgorithmPreset.TF32_TF32_F32
  if precision_lib.native_precision(algorithm, F32) is not None:
    pytest.skip("TF32 is native here: the emulation is not what runs")
  return precision


def test_dot_algorithm_of_each_preset():
  algo = jax.lax.DotAlgorithmPreset
  expected = {"fp32": algo.F32_F32_F32, "tf32": algo.TF32_TF32_F32}
  for name, precision in entropo.PRESETS.items():
    assert precision.dot_algorithm == expected.get(name, algo.F32_F32_F32)
    assert precision.algorithm_for(F32) == precision.dot_algorithm
    assert precision.algorithm_for(BF16) == algo.BF16_BF16_F32
    assert precision.algorithm_for(F16) == algo.F16_F16_F32


def test_dot_algorithm_accepts_names_and_presets_and_rejects_others():
  algo = jax.lax.DotAlgorithmPreset
  assert entropo.Precision(dot_algorithm="TF32_TF32_F32").dot_algorithm == (
      algo.TF32_TF32_F32)
  assert entropo.Precision(
      dot_algorithm=algo.BF16_BF16_F32).dot_algorithm == algo.BF16_BF16_F32
  with pytest.raises(ValueError, match=r"'F16_F16_F16'.*'TF32_TF32_F32'"):
    entropo.Precision(dot_algorithm="F16_F16_F16")
  with pytest.raises(ValueError, match="at most 32 bits"):
    entropo.Precision(compute_dtype=jnp.float64)


def test_round_to_tf32_matches_the_float64_reference(rng):
  tiny = np.float32(2.0 ** -140)  # a float32 subnormal
  values = np.concatenate([
      rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000),
      rng.standard_normal(200) * tiny,
      [0.0, -0.0, np.inf, -np.inf, np.finfo(np.float32).max,
       -np.finfo(np.float32).max, np.finfo(np.float32).tiny, 1.0, -3.5],
  ]).astype(np.float32)
  # Exact ties: the 13 dropped bits are 1000000000000, the kept part odd or
  # even, so that nearest-even rounds one up and the other down.
  bits = rng.integers(0, 2 ** 31, 64, dtype=np.uint32) & np.uint32(0x7F7FE000)
  ties = (bits | np.uint32(0x1000)).view(np.float32)
  values = np.concatenate([values, ties, -ties])
  got = np.asarray(precision_lib.round_to_tf32(jnp.asarray(values)),
                   np.float64)
  want = dots_ref.round_to_tf32(values)
  np.testing.assert_array_equal(got, want)
  # Ties went both ways, so the tie-break was exercised.
  up = np.abs(want[-128:-64]) > np.abs(ties.astype(np.float64))
  assert 0 < up.sum() < 64
  assert np.isnan(np.asarray(precision_lib.round_to_tf32(jnp.float32(np.nan))))


def test_emulated_tf32_matmul_is_the_exact_product_of_rounded_operands(rng):
  precision = _emulated_tf32_precision()
  a = rng.standard_normal((24, 300)).astype(np.float32)
  b = rng.standard_normal((300, 16)).astype(np.float32)
  got = np.asarray(jax.jit(precision.matmul)(a, b), np.float64)
  want = dots_ref.matmul(dots_ref.round_to_tf32(a), dots_ref.round_to_tf32(b))
  # Only the float32 sums differ: at most K ulps of the magnitudes summed.
  bound = 300 * 2.0 ** -24 * dots_ref.matmul(np.abs(a), np.abs(b))
  assert np.all(np.abs(got - want) <= bound)


def test_emulated_tf32_error_sits_between_fp32_and_bf16_operands(rng):
  precision = _emulated_tf32_precision()
  a = rng.standard_normal((64, 512)).astype(np.float32)
  b = rng.standard_normal((512, 64)).astype(np.float32)
  exact = dots_ref.matmul(a, b)
  scale = np.abs(exact).max()

  def rel_err(x):
    return np.abs(np.asarray(x, np.float64) - exact).max() / scale

  fp32 = rel_err(jax.jit(entropo.get_precision("fp32").matmul)(a, b))
  tf32 = rel_err(jax.jit(precision.matmul)(a, b))
  bf16_matmul = functools.partial(entropo.get_precision("bf16").matmul,
                                  preferred_element_type=F32)
  bf16 = rel_err(jax.jit(bf16_matmul)(jnp.asarray(a, BF16),
                                      jnp.asarray(b, BF16)))
  # TF32 keeps 3 more mantissa bits than bfloat16 and 13 fewer than float32:
  # the measured H200 TF32 error of a 2048^2 product was 2.9e-4, float32's
  # 8.1e-7.
  assert fp32 < 3e-6
  assert 1e-4 < tf32 < 1e-3
  assert tf32 > 50 * fp32
  assert bf16 > 4 * tf32


def test_emulated_tf32_gradient_rounds_the_backward_products_too(rng):
  precision = _emulated_tf32_precision()
  a = rng.standard_normal((8, 40)).astype(np.float32)
  b = rng.standard_normal((40, 6)).astype(np.float32)
  g = rng.standard_normal((8, 6)).astype(np.float32)
  da, db = jax.jit(jax.grad(
      lambda x, y: jnp.sum(g * precision.einsum("ik,kj->ij", x, y)),
      argnums=(0, 1)))(a, b)
  ra, rb, rg = (dots_ref.round_to_tf32(x) for x in (a, b, g))
  want_da = dots_ref.matmul(rg, rb.T)
  want_db = dots_ref.matmul(ra.T, rg)
  for got, want, mag in (
      (da, want_da, dots_ref.matmul(np.abs(g), np.abs(b).T)),
      (db, want_db, dots_ref.matmul(np.abs(a).T, np.abs(g)))):
    assert got.dtype == F32
    err = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(err <= 64 * 2.0 ** -24 * mag)


def test_tf32_model_logprobs_sit_between_fp32_and_bf16(rng):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from entropo.models import ModelConfig, Transformer  # pylint: disable=g-import-not-at-top
  from entropo.training.step import sequence_logps  # pylint: disable=g-import-not-at-top
  config = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=4, num_kv_heads=2)
  tokens = jnp.asarray(rng.integers(0, 97, (4, 24)), jnp.int32)
  mask = jnp.ones(tokens.shape, bool)
  fp32 = Transformer(config, precision="fp32", rngs=nnx.Rngs(0))
  params = nnx.state(fp32, nnx.Param)
  logps = {}
  for name in ("fp32", "tf32", "bf16"):
    model = Transformer(config, precision=name, rngs=nnx.Rngs(0))
    nnx.update(model, params)
    logps[name] = np.asarray(jax.jit(
        lambda m: sequence_logps(m, tokens, mask)[0])(model), np.float64)
  tf32 = np.abs(logps["tf32"] - logps["fp32"]).max()
  bf16 = np.abs(logps["bf16"] - logps["fp32"]).max()
  assert 1e-5 < tf32 < bf16 / 4


def test_describe_names_backend_algorithms_and_emulation():
  fp32 = entropo.get_precision("fp32").describe()
  assert fp32["preset"] == "fp32"
  assert fp32["backend"] == jax.default_backend()
  assert fp32["dot_algorithm"] == "F32_F32_F32"
  assert fp32["dots"]["float32"]["algorithm"] == "F32_F32_F32"
  bf16 = entropo.get_precision("bf16").describe()
  assert bf16["dots"]["bfloat16"]["algorithm"] == "BF16_BF16_F32"
  assert bf16["compute_dtype"] == "bfloat16"
  tf32 = entropo.get_precision("tf32").describe()
  native = precision_lib.native_precision(
      jax.lax.DotAlgorithmPreset.TF32_TF32_F32, F32) is not None
  assert tf32["dots"]["float32"]["native"] == native
  if jax.default_backend() == "cpu":
    assert fp32["dots"]["float32"]["native"]
    assert not native
    assert "rounded to tf32" in tf32["dots"]["float32"]["runs_as"]


def test_native_table_per_backend():
  algo = jax.lax.DotAlgorithmPreset
  native = precision_lib.native_precision
  assert native(algo.F32_F32_F32, F32, "cpu") == algo.F32_F32_F32
  assert native(algo.TF32_TF32_F32, F32, "cpu") is None
  assert native(algo.BF16_BF16_F32, F32, "cpu") is None  # CPU would not round
  assert native(algo.BF16_BF16_F32, BF16, "cpu") == jax.lax.Precision.HIGHEST
  assert native(algo.TF32_TF32_F32, F32, "cuda") == algo.TF32_TF32_F32
  assert native(algo.F32_F32_F32, F32, "gpu") == algo.F32_F32_F32
  assert native(algo.F32_F32_F32, F32, "tpu") == algo.BF16_BF16_F32_X6
  assert native(algo.TF32_TF32_F32, F32, "tpu") is None
