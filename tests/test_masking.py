"""Tests for entropo.masking (single device; sharding is tested elsewhere)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropo import masking
from tests import inputs
from tests.reference import objectives as ref

MODES = masking.AGGREGATION_MODES
B, T = 6, 9


def _values_and_mask(rng, shape=(B, T), *, empty_rows=(1, 4)):
  """float32 values and a mask with some fully masked rows."""
  values = rng.normal(size=shape).astype(np.float32) * 3.0
  mask = inputs.random_mask(rng, shape, 0.6)
  for b in empty_rows:
    mask[b] = False
  return values, mask


def _close(actual, expected, *, scale=1.0):
  """float32 result against a float64 reference."""
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=1e-5, atol=1e-6 * scale)


# ---------------------------------------------------------------- aggregate


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_matches_reference(rng, mode):
  values, mask = _values_and_mask(rng)
  out = masking.aggregate(jnp.asarray(values), jnp.asarray(mask), mode=mode)
  assert out.dtype == jnp.float32 and out.shape == ()
  _close(out, ref.aggregate(values, mask, mode))


def test_aggregate_norm_argument(rng):
  values, mask = _values_and_mask(rng)
  out = masking.aggregate(values, mask, mode="seq_mean_token_sum_norm",
                          norm=512.0)
  _close(out, ref.aggregate(values, mask, "seq_mean_token_sum_norm", 512.0))
  with pytest.raises(ValueError, match="norm must be > 0; got 0"):
    masking.aggregate(values, mask, mode="seq_mean_token_sum_norm", norm=0)


@pytest.mark.parametrize(
    "mode, expected",
    [
        # valid: row0 = 1, 2, 3; row1 = 4; row2 = none.
        ("token_mean", (1 + 2 + 3 + 4) / 4),
        ("seq_mean_token_mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),
        ("seq_mean_token_sum", ((1 + 2 + 3) + 4) / 2),
        ("seq_mean_token_sum_norm", (1 + 2 + 3 + 4) / (3 * 4)),
    ],
)
def test_aggregate_hand_computed(mode, expected):
  values = jnp.array([[1.0, 2.0, 3.0, 100.0],
                      [-50.0, 4.0, 7.0, 8.0],
                      [9.0, 9.0, 9.0, 9.0]])
  mask = jnp.array([[True, True, True, False],
                    [False, True, False, False],
                    [False, False, False, False]])
  np.testing.assert_allclose(masking.aggregate(values, mask, mode=mode),
                             expected, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_terms_micro_batches_sum_to_whole(rng, mode):
  values, mask = _values_and_mask(rng, (7, T), empty_rows=(2,))
  whole = masking.aggregate(values, mask, mode=mode, norm=16.0)
  for pieces in ([0, 3, 7], [0, 2, 5, 7]):  # 2 and 3 unequal micro-batches
    nums, dens = [], []
    for lo, hi in zip(pieces[:-1], pieces[1:]):
      num, den = masking.aggregate_terms(values[lo:hi], mask[lo:hi],
                                         mode=mode, norm=16.0)
      ref_num, ref_den = ref.aggregate_terms(values[lo:hi], mask[lo:hi], mode,
                                             16.0)
      _close(num, ref_num, scale=10)
      _close(den, ref_den)
      nums.append(num)
      dens.append(den)
    _close(sum(nums) / sum(dens), float(whole))


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_gradient_matches_reference_weights(rng, mode):
  values, mask = _values_and_mask(rng)
  grad = jax.grad(lambda v: masking.aggregate(v, mask, mode=mode))(
      jnp.asarray(values))
  _close(grad, ref.aggregation_weights(mask, mode))
  assert np.all(np.asarray(grad)[~mask] == 0.0)


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_all_masked_is_zero_with_zero_gradient(mode):
  values = jnp.full((3, 4), jnp.nan).at[0, 0].set(1e30)  # garbage padding
  mask = jnp.zeros((3, 4), bool)
  out, grad = jax.value_and_grad(
      lambda v: masking.aggregate(v, mask, mode=mode))(values)
  assert out == 0.0
  assert np.array_equal(np.asarray(grad), np.zeros((3, 4)))


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_ignores_non_finite_padding(rng, mode):
  values, mask = _values_and_mask(rng)
  garbage = np.where(mask, values, np.nan).astype(np.float32)
  garbage[~mask & (rng.random(mask.shape) < 0.5)] = np.inf
  out, grad = jax.value_and_grad(
      lambda v: masking.aggregate(v, mask, mode=mode))(jnp.asarray(garbage))
  _close(out, ref.aggregate(values, mask, mode))
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0)


@pytest.mark.parametrize(
    "mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_aggregate_masked_equals_sliced(rng, mode):
  values, mask = _values_and_mask(rng, empty_rows=())
  base = masking.aggregate(values, mask, mode=mode)
  # Padding columns and padding rows, filled with large garbage.
  padded_values = np.full((B + 3, T + 5), 7e3, np.float32)
  padded_values[:B, :T] = values
  padded_mask = np.zeros((B + 3, T + 5), bool)
  padded_mask[:B, :T] = mask
  padded = masking.aggregate(padded_values, padded_mask, mode=mode)
  _close(padded, float(base))
  # And the values at masked positions do not matter.
  noisy = np.where(mask, values, rng.normal(size=values.shape) * 1e3)
  _close(masking.aggregate(noisy.astype(np.float32), mask, mode=mode),
         float(base))


def test_aggregate_jit_equals_eager(rng):
  values, mask = _values_and_mask(rng)
  for mode in MODES:
    f = jax.jit(lambda v, m, mode=mode: masking.aggregate(v, m, mode=mode))
    assert float(f(values, mask)) == pytest.approx(
        float(masking.aggregate(values, mask, mode=mode)), rel=1e-6)


def test_aggregate_bf16_values_are_upcast(rng):
  values, mask = _values_and_mask(rng)
  low = jnp.asarray(values, jnp.bfloat16)
  out = masking.aggregate(low, mask, mode="token_mean")
  assert out.dtype == jnp.float32
  # Exact float64 mean of the bf16-rounded inputs: no bf16 accumulation.
  _close(out, ref.aggregate(np.asarray(low, np.float64), mask, "token_mean"))


# ------------------------------------------------------- masked statistics


def test_masked_statistics_match_reference(rng):
  values, mask = _values_and_mask(rng)
  for fn, ref_fn in [(masking.masked_mean, ref.masked_mean),
                     (masking.masked_max, ref.masked_max),
                     (masking.masked_min, ref.masked_min),
                     (masking.masked_std, ref.masked_std)]:
    out = fn(jnp.asarray(values), jnp.asarray(mask))
    assert out.dtype == jnp.float32
    _close(out, ref_fn(values, mask), scale=10)
  assert float(masking.masked_sum(values, mask)) == pytest.approx(
      float(np.sum(values[mask], dtype=np.float64)), rel=1e-5)
  assert float(masking.masked_count(mask)) == mask.sum()


def test_masked_statistics_hand_computed():
  x = jnp.array([[3.0, -1.0, 50.0], [1.0, -9.0, 5.0]])
  mask = jnp.array([[True, True, False], [True, False, True]])
  assert float(masking.masked_mean(x, mask)) == pytest.approx(2.0)
  assert float(masking.masked_max(x, mask)) == 5.0
  assert float(masking.masked_min(x, mask)) == -1.0
  # values 3, -1, 1, 5: mean 2, squared deviations 1, 9, 1, 9.
  assert float(masking.masked_std(x, mask)) == pytest.approx(np.sqrt(5.0))


def test_masked_statistics_all_masked_are_zero():
  x = jnp.array([[jnp.nan, jnp.inf, -jnp.inf]])
  mask = jnp.zeros((1, 3), bool)
  for fn in (masking.masked_mean, masking.masked_max, masking.masked_min,
             masking.masked_std, masking.masked_sum):
    assert float(fn(x, mask)) == 0.0, fn.__name__
  grad = jax.grad(lambda v: masking.masked_mean(v, mask))(jnp.zeros((1, 3)))
  assert np.array_equal(np.asarray(grad), np.zeros((1, 3)))


def test_masked_max_min_all_negative_or_positive():
  # A max over only negative values must not return the 0 fill.
  x = jnp.array([[-3.0, -2.0, 10.0]])
  mask = jnp.array([[True, True, False]])
  assert float(masking.masked_max(x, mask)) == -2.0
  assert float(masking.masked_min(-x, mask)) == 2.0


# ------------------------------------------------------------- quantiles


@pytest.mark.parametrize("p_valid", [0.3, 0.8, 1.0])
def test_masked_quantiles_match_numpy(rng, p_valid):
  values = rng.normal(size=(5, 11)).astype(np.float32)
  mask = rng.random((5, 11)) < p_valid
  mask[0, 0] = True
  qs = [0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 1.0]
  out = masking.masked_quantiles(values, mask, qs)
  assert out.shape == (len(qs),) and out.dtype == jnp.float32
  expected = np.quantile(values[mask].astype(np.float64), qs)
  _close(out, expected, scale=10)


def test_masked_quantiles_edge_cases():
  x = jnp.array([[4.0, 1.0, 7.0, 2.0]])
  one = jnp.array([[False, False, True, False]])
  np.testing.assert_array_equal(masking.masked_quantiles(x, one, [0, 0.5, 1]),
                                [7.0, 7.0, 7.0])
  none = jnp.zeros((1, 4), bool)
  np.testing.assert_array_equal(masking.masked_quantiles(x, none, [0, 0.5, 1]),
                                [0.0, 0.0, 0.0])
  # Repeated values: no inf * 0 from the masked fill.
  same = jnp.array([[2.0, 2.0, 2.0, 9.0]])
  some = jnp.array([[True, True, True, False]])
  np.testing.assert_array_equal(
      masking.masked_quantiles(same, some, [0, 0.5, 0.99, 1]), [2.0] * 4)
  # Hand-computed interpolation: sorted 1, 2, 4, 7; q=0.5 -> pos 1.5 -> 3.
  full = jnp.ones((1, 4), bool)
  np.testing.assert_allclose(masking.masked_quantiles(x, full, [0.5, 0.25]),
                             [3.0, 1.75])


def test_masked_quantiles_jit(rng):
  values = rng.normal(size=(4, 6)).astype(np.float32)
  mask = inputs.random_mask(rng, (4, 6))
  qs = (0.1, 0.5, 0.9)
  f = jax.jit(lambda v, m: masking.masked_quantiles(v, m, qs))
  _close(f(values, mask), np.quantile(values[mask].astype(np.float64), qs))


# ------------------------------------------------------------ safe_divide


def test_safe_divide_value_and_gradient():
  num = jnp.array([1.0, 2.0, 0.0, -3.0])
  den = jnp.array([2.0, 0.0, 0.0, 4.0])
  np.testing.assert_array_equal(masking.safe_divide(num, den),
                                [0.5, 0.0, 0.0, -0.75])
  g_num, g_den = jax.grad(lambda n, d: jnp.sum(masking.safe_divide(n, d)),
                          argnums=(0, 1))(num, den)
  np.testing.assert_allclose(g_num, [0.5, 0.0, 0.0, 0.25])
  np.testing.assert_allclose(g_den, [-0.25, 0.0, 0.0, 3.0 / 16])
  assert np.all(np.isfinite(g_num)) and np.all(np.isfinite(g_den))


# -------------------------------------------------------------- bad input


def test_aggregate_rejects_bad_input():
  values = jnp.zeros((2, 3))
  mask = jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match=r"Unknown aggregation mode 'mean'.*"
                     r"'token_mean'.*'seq_mean_token_sum_norm'"):
    masking.aggregate(values, mask, mode="mean")
  with pytest.raises(ValueError, match="values must have rank 2; got rank 1"):
    masking.aggregate(jnp.zeros(3), jnp.ones(3, bool))
  with pytest.raises(ValueError, match="values must have rank 2; got rank 3"):
    masking.aggregate(jnp.zeros((2, 3, 1)), jnp.ones((2, 3, 1), bool))
  with pytest.raises(TypeError, match="mask must be a bool array.*float32"):
    masking.aggregate(values, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\); got "
                     r"\(3, 2\)"):
    masking.aggregate(values, jnp.ones((3, 2), bool))
