"""Tests for entropo.regularizers: entropy bonus and reference KL."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropo import regularizers
from tests import inputs
from tests.reference import objectives as ref

MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
         "seq_mean_token_sum_norm")
ESTIMATORS = ("k1", "k2", "k3")


def _close(actual, expected, *, scale=1.0):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=1e-5, atol=1e-6 * scale)


def _mask(rng, shape=(5, 7)):
  mask = inputs.random_mask(rng, shape, 0.6)
  mask[2] = False  # a fully masked row
  return mask


# ---------------------------------------------------------- entropy bonus


@pytest.mark.parametrize("mode", MODES)
def test_entropy_bonus_matches_reference(rng, mode):
  mask = _mask(rng)
  entropy = rng.uniform(0.0, 4.0, mask.shape).astype(np.float32)
  coef = 0.03
  f = lambda h: regularizers.entropy_bonus(h, mask, coef=coef, mode=mode)
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(
      jnp.asarray(entropy))
  assert loss.dtype == jnp.float32 and loss.shape == ()
  _close(loss, -coef * ref.aggregate(entropy, mask, mode))
  _close(grad, -coef * ref.aggregation_weights(mask, mode))
  assert np.all(np.asarray(grad)[~mask] == 0.0)
  _close(metrics["entropy/mean"], ref.masked_mean(entropy, mask))
  _close(metrics["entropy/bonus_coef"], coef)
  assert float(metrics["entropy/bonus_loss"]) == float(loss)
  for value in metrics.values():
    assert value.dtype == jnp.float32 and value.shape == ()


def test_entropy_bonus_hand_computed():
  entropy = jnp.array([[1.0, 3.0, 9.0], [2.0, 9.0, 9.0]])
  mask = jnp.array([[True, True, False], [True, False, False]])
  loss, _ = regularizers.entropy_bonus(entropy, mask, coef=0.5)
  assert float(loss) == pytest.approx(-0.5 * 2.0)  # token mean 2
  loss, _ = regularizers.entropy_bonus(entropy, mask, coef=0.5,
                                       mode="seq_mean_token_sum")
  assert float(loss) == pytest.approx(-0.5 * (4.0 + 2.0) / 2)
  loss, _ = regularizers.entropy_bonus(entropy, mask, coef=0.5,
                                       mode="seq_mean_token_sum_norm", norm=2)
  assert float(loss) == pytest.approx(-0.5 * 6.0 / 4)


def test_entropy_bonus_traced_coef_and_jit(rng):
  mask = _mask(rng)
  entropy = rng.uniform(0.0, 4.0, mask.shape).astype(np.float32)
  traces = []

  @jax.jit
  def f(h, coef):
    traces.append(1)
    return regularizers.entropy_bonus(h, mask, coef=coef)

  for coef in (0.01, -0.2):
    loss, metrics = f(entropy, jnp.float32(coef))
    _close(loss, -coef * ref.aggregate(entropy, mask, "token_mean"))
    _close(metrics["entropy/bonus_coef"], coef)
    eager, _ = regularizers.entropy_bonus(entropy, mask, coef=coef)
    np.testing.assert_allclose(loss, eager, rtol=1e-6)
  assert len(traces) == 1


def test_entropy_bonus_all_masked(rng):
  entropy = jnp.full((3, 4), jnp.nan)
  mask = jnp.zeros((3, 4), bool)
  f = lambda h: regularizers.entropy_bonus(h, mask, coef=0.1)
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(entropy)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, np.zeros((3, 4)))
  assert all(np.isfinite(float(v)) for v in metrics.values())


def test_entropy_bonus_bad_input():
  mask = jnp.ones((2, 3), bool)
  with pytest.raises(TypeError, match="entropy must have a floating dtype"):
    regularizers.entropy_bonus(jnp.ones((2, 3), jnp.int32), mask, coef=0.1)
  with pytest.raises(ValueError, match="Unknown aggregation mode 'sum'"):
    regularizers.entropy_bonus(jnp.ones((2, 3)), mask, coef=0.1, mode="sum")
  with pytest.raises(TypeError, match="mask must be a bool array"):
    regularizers.entropy_bonus(jnp.ones((2, 3)), jnp.ones((2, 3)), coef=0.1)
  with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\)"):
    regularizers.entropy_bonus(jnp.ones((2, 3)), mask.T, coef=0.1)


# ---------------------------------------------------------- KL divergence


def _kl_inputs(rng, shape=(4, 6)):
  logps = rng.uniform(-4.0, -0.05, shape).astype(np.float32)
  ref_logps = (logps + rng.normal(0.0, 1.0, shape)).astype(np.float32)
  ref_logps[0, 0] = logps[0, 0] + 14.0  # beyond the clamp of 10
  ref_logps[0, 1] = logps[0, 1] - 12.5  # and on the other side
  return logps, ref_logps


@pytest.mark.parametrize("clamp", [10.0, None, 0.5])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_divergence_matches_reference(rng, estimator, clamp):
  logps, ref_logps = _kl_inputs(rng)
  f = lambda lp: regularizers.kl_divergence(lp, ref_logps,
                                            estimator=estimator, clamp=clamp)
  out, vjp = jax.vjp(f, jnp.asarray(logps))
  (grad,) = vjp(jnp.ones_like(out))
  expected, expected_grad = ref.kl_divergence(logps, ref_logps, estimator,
                                              clamp)
  assert out.dtype == jnp.float32 and out.shape == logps.shape
  # exp(14) ~ 1.2e6 without a clamp: compare relative to the magnitude.
  _close(out, expected, scale=10)
  _close(grad, expected_grad, scale=10)
  if clamp is not None:  # gradient stops outside the clamp
    assert float(grad[0, 0]) == 0.0 and float(grad[0, 1]) == 0.0
  # The reference log-probs are stop-gradient.
  g_ref = jax.grad(lambda r: jnp.sum(regularizers.kl_divergence(
      jnp.asarray(logps), r, estimator=estimator, clamp=clamp)))(
          jnp.asarray(ref_logps))
  np.testing.assert_array_equal(g_ref, np.zeros(logps.shape))


def test_kl_divergence_hand_computed():
  logps = jnp.array([[-1.0, -2.0, -1.0]])
  ref_logps = jnp.array([[-1.0, -1.0, -30.0]])  # d = 0, 1, -29 (clamped -10)
  k1 = regularizers.kl_divergence(logps, ref_logps, estimator="k1")
  k2 = regularizers.kl_divergence(logps, ref_logps, estimator="k2")
  k3 = regularizers.kl_divergence(logps, ref_logps, estimator="k3")
  np.testing.assert_allclose(k1, [[0.0, -1.0, 10.0]], rtol=1e-6)
  np.testing.assert_allclose(k2, [[0.0, 0.5, 50.0]], rtol=1e-6)
  np.testing.assert_allclose(
      k3, [[0.0, math.e - 2.0, math.exp(-10) + 9.0]], rtol=1e-6)
  # k3 is non-negative, k1 can be negative.
  assert np.all(np.asarray(k3) >= 0)


def test_kl_estimators_are_unbiased_on_exact_expectation():
  # KL(p || q) for two categorical distributions, estimated from "samples"
  # weighted by p: k1 and k3 are exact in expectation.
  p = np.array([0.5, 0.3, 0.2])
  q = np.array([0.2, 0.2, 0.6])
  exact = float(np.sum(p * np.log(p / q)))
  logps = jnp.asarray(np.log(p), jnp.float32)[None]
  ref_logps = jnp.asarray(np.log(q), jnp.float32)[None]
  for estimator in ("k1", "k3"):
    per_token = regularizers.kl_divergence(logps, ref_logps,
                                           estimator=estimator)
    assert float(jnp.sum(per_token * p)) == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty_matches_reference(rng, estimator, mode):
  logps, ref_logps = _kl_inputs(rng, (5, 7))
  mask = _mask(rng)
  coef = 0.05
  f = lambda lp: regularizers.kl_penalty(lp, ref_logps, mask, coef=coef,
                                         estimator=estimator, mode=mode)
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(
      jnp.asarray(logps))
  kl, kl_grad = ref.kl_divergence(logps, ref_logps, estimator)
  _close(loss, coef * ref.aggregate(kl, mask, mode), scale=10)
  _close(grad, coef * ref.aggregation_weights(mask, mode) * kl_grad)
  assert np.all(np.asarray(grad)[~mask] == 0.0)
  _close(metrics["kl/mean"], ref.masked_mean(kl, mask), scale=10)
  _close(metrics["kl/coef"], coef)
  assert float(metrics["kl/loss"]) == float(loss)
  assert loss.dtype == jnp.float32
  for value in metrics.values():
    assert value.dtype == jnp.float32 and value.shape == ()


def test_kl_penalty_jit_and_traced_coef(rng):
  logps, ref_logps = _kl_inputs(rng)
  mask = _mask(rng, logps.shape)
  f = jax.jit(functools.partial(regularizers.kl_penalty, estimator="k2"))
  for coef in (0.1, 0.02):
    loss, _ = f(logps, ref_logps, mask, coef=jnp.float32(coef))
    eager, _ = regularizers.kl_penalty(logps, ref_logps, mask, coef=coef,
                                       estimator="k2")
    np.testing.assert_allclose(loss, eager, rtol=1e-6)


@pytest.mark.parametrize("padding", [1e4, -np.inf, np.nan])
def test_kl_penalty_masked_padding_gets_zero_gradient(rng, padding):
  logps, ref_logps = _kl_inputs(rng)
  mask = _mask(rng, logps.shape)
  lp_p, ref_p = logps.copy(), ref_logps.copy()
  lp_p[~mask] = padding
  ref_p[~mask] = padding
  f = lambda lp, r: regularizers.kl_penalty(lp, r, mask, coef=0.1)[0]
  loss, grad = jax.value_and_grad(f)(jnp.asarray(lp_p), ref_p)
  clean_loss, clean_grad = jax.value_and_grad(f)(jnp.asarray(logps),
                                                 ref_logps)
  assert float(loss) == float(clean_loss)
  np.testing.assert_array_equal(grad, clean_grad)
  assert np.all(np.asarray(grad)[~mask] == 0.0)


def test_kl_penalty_all_masked(rng):
  logps, ref_logps = _kl_inputs(rng)
  mask = np.zeros(logps.shape, bool)
  for estimator in ESTIMATORS:
    f = lambda lp, e=estimator: regularizers.kl_penalty(
        lp, ref_logps, mask, coef=1.0, estimator=e)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(
        jnp.asarray(logps))
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad, np.zeros(logps.shape))
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_kl_bad_input():
  lp = jnp.zeros((2, 3))
  mask = jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match=r"Unknown estimator 'k4'; expected one "
                     r"of 'k1', 'k2', 'k3'"):
    regularizers.kl_divergence(lp, lp, estimator="k4")
  with pytest.raises(TypeError, match="logps must have a floating dtype"):
    regularizers.kl_divergence(jnp.zeros((2, 3), jnp.int32), lp)
  with pytest.raises(TypeError, match="ref_logps must have a floating dtype"):
    regularizers.kl_divergence(lp, jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"Shapes must match; got "
                     r"logps=\(2, 3\), ref_logps=\(3, 2\)"):
    regularizers.kl_divergence(lp, jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\); got "
                     r"\(2, 2\)"):
    regularizers.kl_penalty(lp, lp, jnp.ones((2, 2), bool), coef=0.1)
  with pytest.raises(TypeError, match="mask must be a bool array"):
    regularizers.kl_penalty(lp, lp, jnp.ones((2, 3)), coef=0.1)
  with pytest.raises(TypeError, match="logps must have a floating dtype"):
    regularizers.kl_penalty(jnp.zeros((2, 3), jnp.int32), lp, mask, coef=0.1)
  with pytest.raises(TypeError, match="ref_logps must have a floating dtype"):
    regularizers.kl_penalty(lp, jnp.zeros((2, 3), jnp.int32), mask, coef=0.1)
  with pytest.raises(ValueError, match=r"Shapes must match; got "
                     r"logps=\(2, 3\), ref_logps=\(3, 2\)"):
    regularizers.kl_penalty(lp, jnp.zeros((3, 2)), mask, coef=0.1)
  with pytest.raises(ValueError, match="Unknown estimator 'kl'"):
    regularizers.kl_penalty(lp, lp, mask, coef=0.1, estimator="kl")
  with pytest.raises(ValueError, match="Unknown aggregation mode 'x'"):
    regularizers.kl_penalty(lp, lp, mask, coef=0.1, mode="x")
