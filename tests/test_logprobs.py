"""Tests for entropo/logprobs.py: token_logprobs and token_entropy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entropo
from tests.reference import logprobs as ref

# Shapes: [N, V] and [B, T, V], a one-word vocabulary, and a wide one.
SHAPES = [(7, 11), (2, 5, 13), (3, 4, 1), (2, 3, 300)]


def _random_logits(rng, shape, scale=3.0):
  return (rng.standard_normal(shape) * scale).astype(np.float32)


def _tol(x):
  """Float32 vs float64: a few float32 ulps of the magnitudes involved."""
  return 1e-5 * (1.0 + np.abs(x))


def _assert_close_f64(actual, expected, scale=None):
  actual = np.asarray(actual, np.float64)
  bound = _tol(expected if scale is None else scale)
  err = np.abs(actual - expected)
  assert np.all(err <= bound), (err.max(), err[err > bound][:5])


# Against the float64 reference.


@pytest.mark.parametrize("shape", SHAPES)
def test_token_logprobs_matches_reference(rng, shape):
  logits = _random_logits(rng, shape)
  targets = rng.integers(0, shape[-1], shape[:-1])
  out = entropo.token_logprobs(logits, targets)
  assert out.shape == shape[:-1]
  assert out.dtype == jnp.float32
  _assert_close_f64(out, ref.token_logprobs(logits, targets))


@pytest.mark.parametrize("shape", SHAPES)
def test_token_entropy_matches_reference(rng, shape):
  logits = _random_logits(rng, shape)
  out = entropo.token_entropy(logits)
  assert out.shape == shape[:-1]
  assert out.dtype == jnp.float32
  expected = ref.token_entropy(logits)
  _assert_close_f64(out, expected)
  assert np.all(np.asarray(out) >= 0)
  assert np.all(np.asarray(out) <= math.log(shape[-1]) + 1e-5)


def test_int64_targets_accepted(rng):
  logits = _random_logits(rng, (4, 9))
  targets = rng.integers(0, 9, (4,)).astype(np.int64)
  _assert_close_f64(entropo.token_logprobs(logits, targets),
                    ref.token_logprobs(logits, targets))


# Hand-computed cases.


def test_hand_computed_two_tokens():
  # softmax([0, log 3]) = [1/4, 3/4].
  logits = jnp.array([[0.0, math.log(3.0)]] * 2, jnp.float32)
  targets = jnp.array([1, 0])
  logps = np.asarray(entropo.token_logprobs(logits, targets))
  np.testing.assert_allclose(logps, [math.log(0.75), math.log(0.25)],
                             rtol=1e-6)
  # H = -(1/4 log 1/4 + 3/4 log 3/4) = log 4 - (3/4) log 3 = 0.5623351...
  entropy = np.asarray(entropo.token_entropy(logits))
  np.testing.assert_allclose(entropy, [0.5623351446188083] * 2, rtol=1e-6)
  np.testing.assert_allclose(entropy, math.log(4) - 0.75 * math.log(3),
                             rtol=1e-6)


def test_hand_computed_uniform_and_one_hot():
  uniform = jnp.full((1, 2, 5), 0.7, jnp.float32)
  np.testing.assert_allclose(
      np.asarray(entropo.token_logprobs(uniform, jnp.array([[0, 4]]))),
      [[-math.log(5)] * 2], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(entropo.token_entropy(uniform)),
                             [[math.log(5)] * 2], rtol=1e-6)
  # One finite logit, the rest -inf: a point mass, H = 0, log p = 0.
  point = jnp.array([[-jnp.inf, 2.0, -jnp.inf]], jnp.float32)
  assert float(entropo.token_logprobs(point, jnp.array([1]))[0]) == 0.0
  assert float(entropo.token_entropy(point)[0]) == 0.0


# Invariances.


def test_shift_invariance_and_vocab_permutation(rng):
  logits = _random_logits(rng, (3, 4, 17))
  targets = rng.integers(0, 17, (3, 4))
  shift = rng.standard_normal((3, 4, 1)).astype(np.float32) * 10
  lp = np.asarray(entropo.token_logprobs(logits, targets))
  h = np.asarray(entropo.token_entropy(logits))
  # Adding a per-position constant (|shift| ~ 30, so float32 rounding of the
  # shifted logits is ~2e-6) leaves both unchanged.
  np.testing.assert_allclose(
      np.asarray(entropo.token_logprobs(logits + shift, targets)), lp,
      rtol=0, atol=2e-5)
  np.testing.assert_allclose(
      np.asarray(entropo.token_entropy(logits + shift)), h, rtol=0, atol=2e-5)
  # Permuting the vocabulary (and the targets with it) changes nothing.
  perm = rng.permutation(17)
  inverse = np.argsort(perm)
  np.testing.assert_allclose(
      np.asarray(entropo.token_logprobs(logits[..., perm], inverse[targets])),
      lp, rtol=0, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(entropo.token_entropy(logits[..., perm])), h, rtol=0,
      atol=2e-6)


def test_jit_equals_no_jit(rng):
  logits = _random_logits(rng, (2, 5, 31))
  targets = rng.integers(0, 31, (2, 5))
  for precision in (None, "bf16"):
    lp = entropo.token_logprobs(logits, targets, precision=precision)
    h = entropo.token_entropy(logits, precision=precision)
    lp_jit = jax.jit(lambda z, t, p=precision: entropo.token_logprobs(
        z, t, precision=p))(logits, targets)
    h_jit = jax.jit(lambda z, p=precision: entropo.token_entropy(
        z, precision=p))(logits)
    np.testing.assert_allclose(np.asarray(lp_jit), np.asarray(lp), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(h_jit), np.asarray(h), rtol=1e-6,
                               atol=1e-6)


def test_vmap_over_batch_equals_batched(rng):
  logits = _random_logits(rng, (3, 4, 9))
  targets = rng.integers(0, 9, (3, 4))
  vmapped = jax.vmap(entropo.token_logprobs)(logits, targets)
  np.testing.assert_allclose(
      np.asarray(vmapped), np.asarray(entropo.token_logprobs(logits, targets)),
      rtol=1e-6, atol=1e-6)


# Dtypes and precision.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_outputs_are_float32_whatever_the_input_dtype(rng, dtype):
  logits = jnp.asarray(_random_logits(rng, (2, 3, 10)), dtype)
  targets = jnp.asarray(rng.integers(0, 10, (2, 3)))
  for precision in (None, "bf16", "fp16", "bf16_fp32_logits"):
    assert entropo.token_entropy(logits, precision=precision).dtype == (
        jnp.float32)
    assert entropo.token_logprobs(logits, targets, precision=precision).dtype \
        == jnp.float32


def test_bf16_input_close_to_float32_input(rng):
  logits = _random_logits(rng, (4, 6, 50), scale=2.0)
  targets = rng.integers(0, 50, (4, 6))
  low = jnp.asarray(logits, jnp.bfloat16)
  # Under the default fp32 policy a bf16 input is upcast exactly: the result
  # is that of the float32 logits holding the bf16 values, to the bit.
  np.testing.assert_array_equal(
      np.asarray(entropo.token_logprobs(low, targets)),
      np.asarray(entropo.token_logprobs(low.astype(jnp.float32), targets)))
  np.testing.assert_array_equal(
      np.asarray(entropo.token_entropy(low)),
      np.asarray(entropo.token_entropy(low.astype(jnp.float32))))
  # Versus the unrounded float32 logits, the only difference is the bf16
  # rounding delta of the logits (|delta| <= 2^-9 |z|, ~1e-2 here). To first
  # order |d log p| <= 2 max|delta| and |dH| <= 2 H max|delta| (sum_v p_v
  # |log p_v + H| <= 2H); the factor 1.5 covers second order terms.
  delta = np.abs(np.asarray(low, np.float64) - logits).max(axis=-1)  # [B, T]
  assert delta.max() > 1e-3  # the rounding is real
  lp32 = np.asarray(entropo.token_logprobs(logits, targets))
  h32 = np.asarray(entropo.token_entropy(logits))
  lp16 = np.asarray(entropo.token_logprobs(low, targets))
  h16 = np.asarray(entropo.token_entropy(low))
  assert np.all(np.abs(lp16 - lp32) <= 1.5 * 2 * delta + 1e-6)
  assert np.all(np.abs(h16 - h32) <= 1.5 * 2 * h32 * delta + 1e-6)
  assert np.abs(h16 - h32).max() > 1e-5  # and it is visible


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_entropy_is_rounded_entropy_of_rounded_logits(
    rng, precision):
  dtype_name = {"bf16": "bfloat16", "fp16": "float16"}[precision]
  logits = _random_logits(rng, (3, 5, 40))
  out = np.asarray(entropo.token_entropy(logits, precision=precision))
  exact = ref.token_entropy(ref.round_to(logits, dtype_name))
  expected = ref.round_to(exact, dtype_name)
  # One ulp of the low dtype for float32-vs-float64 double rounding.
  ulp = 2.0**-7 if dtype_name == "bfloat16" else 2.0**-10
  assert np.all(np.abs(out - expected) <= ulp * expected)
  assert np.mean(out == expected) > 0.9
  fp32 = np.asarray(entropo.token_entropy(logits))
  assert np.abs(out - fp32).max() > 1e-4  # the preset changes the numbers


# Stability.


def test_stable_for_huge_logits(rng):
  vocab = 20
  # Random +-1e4 logits with O(1) structure on top: several near-ties at the
  # top so that the entropy is not trivially zero.
  base = rng.choice([-1e4, 1e4], size=(6, vocab))
  base[:, :3] = 1e4
  logits = (base + rng.standard_normal((6, vocab)) * 2).astype(np.float32)
  targets = rng.integers(0, vocab, (6,))
  targets[:3] = 0  # some targets among the top entries
  lp = np.asarray(entropo.token_logprobs(logits, targets))
  h = np.asarray(entropo.token_entropy(logits))
  assert np.all(np.isfinite(lp)) and np.all(np.isfinite(h))
  assert np.all(h >= 0) and np.all(h <= math.log(vocab) + 1e-6)
  # The float32 logits are exact inputs; the max shift z - m is exact
  # (Sterbenz), so the results keep float32 accuracy of O(1) quantities,
  # except log-probs of order -2e4, which carry float32 ulps of 2e4.
  exp_lp = ref.token_logprobs(logits, targets)
  exp_h = ref.token_entropy(logits)
  _assert_close_f64(lp, exp_lp)
  _assert_close_f64(h, exp_h)
  assert exp_h.min() > 0.1  # a real test of the near-tie entropy
  # Huge negative logits everywhere (all near -1e4, float32 spacing ~1e-3):
  # still float32-accurate for the float32 logits given.
  shifted = (_random_logits(rng, (4, vocab)) - 1e4).astype(np.float32)
  h_shifted = np.asarray(entropo.token_entropy(shifted))
  _assert_close_f64(h_shifted, ref.token_entropy(shifted))
  assert ref.token_entropy(shifted).min() > 0.1


def test_negative_infinity_logits_value_and_gradient(rng):
  logits = _random_logits(rng, (2, 3, 8))
  masked = rng.random((2, 3, 8)) < 0.4
  masked[..., 0] = False  # every row keeps a finite entry
  logits[masked] = -np.inf
  targets = np.zeros((2, 3), np.int64)
  for idx in np.ndindex(2, 3):
    targets[idx] = rng.choice(np.flatnonzero(~masked[idx]))
  lp = entropo.token_logprobs(logits, targets)
  h = entropo.token_entropy(logits)
  assert np.all(np.isfinite(lp)) and np.all(np.isfinite(h))
  _assert_close_f64(lp, ref.token_logprobs(logits, targets))
  _assert_close_f64(h, ref.token_entropy(logits))
  g_lp = rng.standard_normal((2, 3))
  g_h = rng.standard_normal((2, 3))

  def loss(z):
    return jnp.sum(g_lp * entropo.token_logprobs(z, targets)
                   + g_h * entropo.token_entropy(z))

  grad = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
  assert np.all(np.isfinite(grad))
  assert np.all(grad[masked] == 0.0)
  expected = ref.logits_vjp(logits, targets, g_lp, g_h)
  _assert_close_f64(grad, expected)


# Gradients.


def test_reference_gradient_formulas_match_finite_differences(rng):
  # Checks the analytic reference itself (float64, central differences).
  logits = rng.standard_normal((3, 6)) * 2
  targets = rng.integers(0, 6, (3,))
  g = rng.standard_normal(3)
  zero = np.zeros(3)
  fd_lp = ref.finite_difference_vjp(
      lambda z: ref.token_logprobs(z, targets), logits, g)
  fd_h = ref.finite_difference_vjp(ref.token_entropy, logits, g)
  np.testing.assert_allclose(ref.logits_vjp(logits, targets, g, zero), fd_lp,
                             rtol=1e-7, atol=1e-8)
  np.testing.assert_allclose(ref.logits_vjp(logits, targets, zero, g), fd_h,
                             rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 7)])
def test_gradients_match_analytic_reference(rng, shape):
  logits = _random_logits(rng, shape)
  targets = rng.integers(0, shape[-1], shape[:-1])
  g_lp = rng.standard_normal(shape[:-1]).astype(np.float32)
  g_h = rng.standard_normal(shape[:-1]).astype(np.float32)
  zeros = np.zeros(shape[:-1], np.float32)
  grad_lp = jax.grad(lambda z: jnp.sum(
      g_lp * entropo.token_logprobs(z, targets)))(jnp.asarray(logits))
  grad_h = jax.grad(lambda z: jnp.sum(g_h * entropo.token_entropy(z)))(
      jnp.asarray(logits))
  assert grad_lp.dtype == grad_h.dtype == jnp.float32
  _assert_close_f64(grad_lp, ref.logits_vjp(logits, targets, g_lp, zeros))
  _assert_close_f64(grad_h, ref.logits_vjp(logits, targets, zeros, g_h))
  # Each position's gradient sums to zero over the vocabulary (shift
  # invariance): a structural check independent of the reference.
  np.testing.assert_allclose(np.asarray(grad_lp).sum(-1), 0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad_h).sum(-1), 0, atol=1e-5)


def test_gradient_is_stable_for_huge_logits(rng):
  logits = (rng.standard_normal((4, 10)) * 2 + 1e4).astype(np.float32)
  logits[:, 5:] -= 2e4
  targets = rng.integers(0, 10, (4,))
  g = rng.standard_normal(4).astype(np.float32)
  grad = jax.grad(lambda z: jnp.sum(
      g * (entropo.token_logprobs(z, targets) + entropo.token_entropy(z))))(
          jnp.asarray(logits))
  assert np.all(np.isfinite(np.asarray(grad)))
  _assert_close_f64(grad, ref.logits_vjp(logits, targets, g, g))


def test_bf16_input_gradient_has_input_dtype(rng):
  logits = jnp.asarray(_random_logits(rng, (3, 9)), jnp.bfloat16)
  targets = jnp.asarray(rng.integers(0, 9, (3,)))
  grad = jax.grad(lambda z: jnp.sum(entropo.token_logprobs(z, targets)
                                    + entropo.token_entropy(z)))(logits)
  assert grad.dtype == jnp.bfloat16
  ones, zeros = np.ones(3), np.zeros(3)
  z64 = np.asarray(logits, np.float64)
  d_lp = ref.logits_vjp(z64, targets, ones, zeros)
  d_h = ref.logits_vjp(z64, targets, zeros, ones)
  # Each function's float32 cotangent is rounded to bf16 where it leaves
  # through the bf16 -> f32 cast (2^-9 relative each), and the two are
  # summed in bf16 (another 2^-9 of the sum): bound the error by 2^-8 of
  # the magnitudes involved, not of the (possibly cancelling) sum.
  err = np.abs(np.asarray(grad, np.float64) - (d_lp + d_h))
  assert np.all(err <= 2.0**-8 * (np.abs(d_lp) + np.abs(d_h)) + 1e-7)


# Bad input.


def test_wrong_logits_rank_raises():
  with pytest.raises(ValueError, match=r"logits must have rank 2 or 3; got "
                     r"rank 1 with shape \(5,\)"):
    entropo.token_entropy(jnp.zeros((5,)))
  with pytest.raises(ValueError, match=r"logits.*rank 4.*\(1, 2, 3, 4\)"):
    entropo.token_logprobs(jnp.zeros((1, 2, 3, 4)),
                           jnp.zeros((1, 2, 3), jnp.int32))


def test_integer_logits_raise():
  with pytest.raises(TypeError, match=r"logits must have a floating dtype.*"
                     r"got int32"):
    entropo.token_entropy(jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(TypeError, match=r"logits.*got bool"):
    entropo.token_logprobs(jnp.zeros((2, 3), bool), jnp.zeros(2, jnp.int32))


def test_float_targets_raise():
  with pytest.raises(TypeError, match=r"targets must have an integer dtype.*"
                     r"got float32"):
    entropo.token_logprobs(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.float32))


def test_targets_shape_mismatch_raises():
  with pytest.raises(ValueError, match=r"targets must have shape .*"
                     r"\(2, 4\).*got \(2, 5\)"):
    entropo.token_logprobs(jnp.zeros((2, 4, 3)), jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match=r"\(2,\).*got \(2, 1\)"):
    entropo.token_logprobs(jnp.zeros((2, 3)), jnp.zeros((2, 1), jnp.int32))


def test_unknown_precision_raises():
  with pytest.raises(ValueError, match=r"'fp8'.*'fp32'"):
    entropo.token_entropy(jnp.zeros((2, 3)), precision="fp8")


def test_out_of_range_targets_raise_eagerly_and_give_nan_under_jit():
  logits = jnp.zeros((2, 3, 5), jnp.float32)
  for bad in (-1, 5, 99):
    targets = np.array([[0, 1, 2], [3, bad, 4]])
    with pytest.raises(ValueError, match=rf"\[0, 5\).*{bad}.*\[\[1, 1\]\]"):
      entropo.token_logprobs(logits, targets)
    # Under jit the values are unknown: NaN there, never a wrapped-around
    # id's log-prob (take_along_axis alone reads column V - 1 for -1).
    got = np.asarray(jax.jit(entropo.token_logprobs)(logits, targets))
    assert np.isnan(got[1, 1])
    np.testing.assert_allclose(np.delete(got.ravel(), 4), -np.log(5.0),
                               rtol=1e-6)


def test_empty_vocabulary_raises():
  logits = jnp.zeros((2, 0))
  with pytest.raises(ValueError, match="empty vocabulary"):
    entropo.token_entropy(logits)
  with pytest.raises(ValueError, match="empty vocabulary"):
    entropo.token_logprobs(logits, jnp.zeros((2,), jnp.int32))
