"""Tests for entropo.diagnostics against float64 loop-style references."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import entropo
from tests import inputs
from tests.reference import diagnostics as ref

B, T = 6, 9
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def _assert_dicts_close(got, want, *, rtol=1e-5, atol=1e-6):
  assert set(got) == set(want)
  for name in want:
    assert got[name].dtype == jnp.float32, name
    assert got[name].shape == (), name
    np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol,
                               err_msg=name)


def _dynamics_inputs(rng, per_token=True):
  logps = -rng.exponential(1.5, (B, T)).astype(np.float32)
  shape = (B, T) if per_token else (B,)
  adv = rng.normal(0.0, 1.0, shape).astype(np.float32)
  entropy = rng.exponential(0.8, (B, T)).astype(np.float32)
  mask = inputs.random_mask(rng, (B, T))
  mask[2] = False  # a fully-masked row
  # Garbage at masked positions must not leak into any statistic.
  logps = np.where(mask, logps, 1e4).astype(np.float32)
  entropy = np.where(mask, entropy, -1e4).astype(np.float32)
  return logps, adv, entropy, mask


# ---------------------------------------------------------------------------
# entropy_dynamics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("per_token", [True, False])
def test_entropy_dynamics_matches_reference(rng, per_token):
  logps, adv, entropy, mask = _dynamics_inputs(rng, per_token)
  got = entropo.entropy_dynamics(
      jnp.asarray(logps), jnp.asarray(adv), jnp.asarray(mask),
      entropy=jnp.asarray(entropy), step_size=0.3, quantiles=QUANTILES,
      high_entropy_threshold=0.5,
  )
  want = ref.entropy_dynamics(logps, adv, mask, entropy=entropy,
                              step_size=0.3, quantiles=QUANTILES,
                              high_entropy_threshold=0.5)
  _assert_dicts_close(got, want)


def test_entropy_dynamics_without_entropy_has_only_dyn_keys(rng):
  logps, adv, _, mask = _dynamics_inputs(rng)
  got = entropo.entropy_dynamics(jnp.asarray(logps), jnp.asarray(adv),
                                 jnp.asarray(mask))
  _assert_dicts_close(got, ref.entropy_dynamics(logps, adv, mask))
  assert all(name.startswith("dyn/") for name in got)


def test_entropy_dynamics_hand_computed():
  # Valid tokens: logp (-1, -2, -3), A (1, 1, -1); entropy (0.5, 1, 2).
  # mean logp -2, mean A 1/3; centred logp (1, 0, -1), centred A
  # (2/3, 2/3, -4/3); cov = (2/3 + 0 + 4/3) / 3 = 2/3; var logp = 2/3,
  # var A = 8/9, corr = (2/3) / sqrt(16/27) = sqrt(3)/2.
  logps = jnp.array([[-1.0, -2.0], [-3.0, 50.0]])
  adv = jnp.array([1.0, -1.0])
  entropy = jnp.array([[0.5, 1.0], [2.0, 99.0]])
  mask = jnp.array([[True, True], [True, False]])
  got = entropo.entropy_dynamics(logps, adv, mask, entropy=entropy,
                                 step_size=0.5, quantiles=(0.25, 0.5))
  want = {
      "dyn/cov_logp_adv": 2 / 3,
      "dyn/corr_logp_adv": math.sqrt(3) / 2,
      "dyn/pred_entropy_change": -1 / 3,
      "entropy/mean": 7 / 6,
      "entropy/std": math.sqrt(7 / 18),  # deviations (-2/3, -1/6, 5/6)
      "entropy/q25": 0.75,  # position 0.5 between 0.5 and 1.0
      "entropy/q50": 1.0,
      "entropy/high_frac": 2 / 3,  # 1.0 and 2.0 exceed ln 2
  }
  _assert_dicts_close(got, want)


def test_entropy_quantiles_equal_numpy_quantile(rng):
  logps, adv, entropy, mask = _dynamics_inputs(rng)
  qs = tuple(np.linspace(0.0, 1.0, 11)) + (0.33, 0.97)
  got = entropo.entropy_dynamics(jnp.asarray(logps), jnp.asarray(adv),
                                 jnp.asarray(mask),
                                 entropy=jnp.asarray(entropy), quantiles=qs)
  want = np.quantile(entropy[mask].astype(np.float64), qs)
  for q, value in zip(qs, want):
    np.testing.assert_allclose(got[f"entropy/q{round(100 * q):02d}"], value,
                               rtol=1e-6, atol=1e-7, err_msg=str(q))


@pytest.mark.parametrize("quantiles", [(0.5, 1.5), (-0.1,), (0.999, 1.0),
                                       (0.5, 0.5)])
def test_entropy_dynamics_rejects_bad_quantiles(rng, quantiles):
  # Out-of-range quantiles would index past the valid values; two quantiles
  # with the same `entropy/qNN` key would silently overwrite each other.
  logps, adv, entropy, mask = _dynamics_inputs(rng)
  with pytest.raises(ValueError, match="quantiles must lie in"):
    entropo.entropy_dynamics(jnp.asarray(logps), jnp.asarray(adv),
                             jnp.asarray(mask), entropy=jnp.asarray(entropy),
                             quantiles=quantiles)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_predicted_entropy_change_sign(rng, sign):
  # Method §1: when A and log pi are positively correlated, entropy falls.
  logps = -rng.exponential(1.0, (B, T)).astype(np.float32)
  adv = (sign * (logps - logps.mean())
         + 0.3 * rng.normal(size=(B, T))).astype(np.float32)
  mask = inputs.random_mask(rng, (B, T))
  got = entropo.entropy_dynamics(jnp.asarray(logps), jnp.asarray(adv),
                                 jnp.asarray(mask), step_size=0.1)
  assert sign * got["dyn/cov_logp_adv"] > 0
  assert sign * got["dyn/pred_entropy_change"] < 0
  assert sign * got["dyn/corr_logp_adv"] > 0.8
  np.testing.assert_allclose(got["dyn/pred_entropy_change"],
                             -0.1 * got["dyn/cov_logp_adv"], rtol=1e-6)


def test_entropy_dynamics_no_gradient_leaks(rng):
  logps, adv, entropy, mask = _dynamics_inputs(rng)

  def f(lp, h):
    out = entropo.entropy_dynamics(lp, jnp.asarray(adv), jnp.asarray(mask),
                                   entropy=h)
    return sum(out.values())

  g_lp, g_h = jax.grad(f, argnums=(0, 1))(jnp.asarray(logps),
                                          jnp.asarray(entropy))
  np.testing.assert_array_equal(g_lp, 0.0)
  np.testing.assert_array_equal(g_h, 0.0)


# ---------------------------------------------------------------------------
# precision_mismatch
# ---------------------------------------------------------------------------


def _bf16_round(x):
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(
      np.float32)


def test_precision_mismatch_matches_reference(rng):
  a = -rng.exponential(2.0, (B, T)).astype(np.float32)
  b = (a + rng.normal(0.0, 0.2, (B, T))).astype(np.float32)
  mask = inputs.random_mask(rng, (B, T))
  mask[4] = False
  a = np.where(mask, a, 300.0).astype(np.float32)  # would dominate if leaked
  got = entropo.precision_mismatch(jnp.asarray(a), jnp.asarray(b),
                                   jnp.asarray(mask), clip_low=0.15,
                                   clip_high=0.1)
  want = ref.precision_mismatch(a, b, mask, clip_low=0.15, clip_high=0.1)
  assert 0 < want["mismatch/phantom_clipfrac_low"] < 1
  assert 0 < want["mismatch/phantom_clipfrac_high"] < 1
  _assert_dicts_close(got, want)


def test_precision_mismatch_identical_inputs_is_exactly_zero(rng):
  a = -rng.exponential(3.0, (B, T)).astype(np.float32)
  mask = inputs.random_mask(rng, (B, T))
  got = entropo.precision_mismatch(jnp.asarray(a), jnp.asarray(a),
                                   jnp.asarray(mask), clip_low=1e-6,
                                   clip_high=1e-6)
  for name, value in got.items():
    assert float(value) == 0.0, (name, value)


def test_precision_mismatch_bf16_rounding_matches_reference(rng):
  # Large |log pi| so that bf16's ~2^-9 relative rounding moves the ratio
  # past a narrow band on some tokens (method.md §5's phantom clips).
  b = -rng.uniform(0.0, 60.0, (16, 32)).astype(np.float32)
  a = _bf16_round(b)
  mask = inputs.random_mask(rng, (16, 32))
  clip_low, clip_high = 0.02, 0.03
  ratio = np.exp(a.astype(np.float64) - b.astype(np.float64))
  # Keep the test well posed: no ratio within float32 noise of a bound.
  assert np.min(np.abs(ratio - (1 - clip_low))) > 1e-5
  assert np.min(np.abs(ratio - (1 + clip_high))) > 1e-5
  got = entropo.precision_mismatch(jnp.asarray(a), jnp.asarray(b),
                                   jnp.asarray(mask), clip_low=clip_low,
                                   clip_high=clip_high)
  want = ref.precision_mismatch(a, b, mask, clip_low=clip_low,
                                clip_high=clip_high)
  assert want["mismatch/phantom_clipfrac_low"] > 0
  assert want["mismatch/phantom_clipfrac_high"] > 0
  assert want["mismatch/max_abs_diff"] > 0
  _assert_dicts_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [1e-4, 3e-3, 0.3])
def test_precision_mismatch_tiny_differences_keep_relative_accuracy(rng,
                                                                   scale):
  # Rounding-level mismatches give a ratio bias and a k3 KL of order
  # scale^2; they must be measured to float32 relative accuracy, not lost
  # to the cancellation in mean(ratio) - 1 or 1/ratio - 1 + d.
  b = -rng.uniform(0.5, 3.0, (16, 32)).astype(np.float32)
  a = (b + rng.normal(scale, scale, b.shape)).astype(np.float32)
  mask = inputs.random_mask(rng, b.shape)
  got = entropo.precision_mismatch(jnp.asarray(a), jnp.asarray(b),
                                   jnp.asarray(mask))
  want = ref.precision_mismatch(a, b, mask)
  for name in ("mismatch/ratio_bias", "mismatch/kl_k3",
               "mismatch/log_ratio_mean", "mismatch/abs_diff_mean"):
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=0,
                               err_msg=name)


def test_precision_mismatch_bf16_input_dtype(rng):
  b = -rng.uniform(0.0, 10.0, (B, T)).astype(np.float32)
  a16 = jnp.asarray(b, jnp.bfloat16)
  mask = inputs.random_mask(rng, (B, T))
  got = entropo.precision_mismatch(a16, jnp.asarray(b), jnp.asarray(mask))
  want = ref.precision_mismatch(_bf16_round(b), b, mask)
  _assert_dicts_close(got, want, rtol=1e-5, atol=1e-7)


def test_precision_mismatch_hand_computed():
  # Valid ratios 1, 1.5, 0.7 (band [0.8, 1.2]): one clip on each side.
  la = jnp.array([[0.0, math.log(1.5)], [math.log(0.7), 100.0]])
  lb = jnp.zeros((2, 2))
  mask = jnp.array([[True, True], [True, False]])
  got = entropo.precision_mismatch(la, lb, mask)
  l15, l07 = math.log(1.5), math.log(0.7)
  want = {
      "mismatch/ratio_bias": (1.0 + 1.5 + 0.7) / 3 - 1.0,
      "mismatch/log_ratio_mean": (l15 + l07) / 3,
      "mismatch/abs_diff_mean": (l15 - l07) / 3,
      "mismatch/max_abs_diff": l15,
      "mismatch/phantom_clipfrac_low": 1 / 3,
      "mismatch/phantom_clipfrac_high": 1 / 3,
      "mismatch/kl_k3": ((1 / 1.5 - 1 + l15) + (1 / 0.7 - 1 + l07)) / 3,
  }
  _assert_dicts_close(got, want)


# ---------------------------------------------------------------------------
# jit and all-masked behaviour of both diagnostics
# ---------------------------------------------------------------------------


def test_diagnostics_jit_equals_no_jit(rng):
  logps, adv, entropy, mask = _dynamics_inputs(rng)
  args = tuple(jnp.asarray(x) for x in (logps, adv, mask))
  dyn = lambda lp, a, m, h: entropo.entropy_dynamics(lp, a, m, entropy=h)
  eager = dyn(*args, jnp.asarray(entropy))
  jitted = jax.jit(dyn)(*args, jnp.asarray(entropy))
  _assert_dicts_close(jitted, {k: float(v) for k, v in eager.items()},
                      rtol=1e-6, atol=1e-7)

  b = logps + rng.normal(0, 0.1, logps.shape).astype(np.float32)
  mis = lambda x, y, m: entropo.precision_mismatch(x, y, m, clip_low=0.05)
  args = (jnp.asarray(logps), jnp.asarray(b), jnp.asarray(mask))
  eager = mis(*args)
  jitted = jax.jit(mis)(*args)
  _assert_dicts_close(jitted, {k: float(v) for k, v in eager.items()},
                      rtol=1e-6, atol=1e-7)


def test_diagnostics_all_masked_give_finite_zeros(rng):
  logps, adv, entropy, _ = _dynamics_inputs(rng)
  mask = jnp.zeros((B, T), bool)
  dyn = entropo.entropy_dynamics(jnp.asarray(logps), jnp.asarray(adv), mask,
                                 entropy=jnp.asarray(entropy))
  mis = entropo.precision_mismatch(jnp.asarray(logps),
                                   jnp.asarray(logps) + 0.5, mask)
  for name, value in {**dyn, **mis}.items():
    assert float(value) == 0.0, (name, value)

  def f(lp, h):
    out = entropo.entropy_dynamics(lp, jnp.asarray(adv), mask, entropy=h)
    return sum(out.values())

  grads = jax.grad(f, argnums=(0, 1))(jnp.asarray(logps),
                                      jnp.asarray(entropy))
  for g in grads:
    assert np.all(np.isfinite(g))


# ---------------------------------------------------------------------------
# pass_at_k
# ---------------------------------------------------------------------------


def test_pass_at_k_matches_reference_vectorised(rng):
  n = rng.integers(8, 200, size=(5, 7))
  c = rng.integers(0, 1000, size=(5, 7)) % (n + 1)
  for k in (1, 2, 5, 8):
    got = entropo.pass_at_k(jnp.asarray(c), jnp.asarray(n), k)
    assert got.shape == (5, 7) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref.pass_at_k(c, n, k), rtol=2e-6,
                               atol=1e-7, err_msg=f"k={k}")


def test_pass_at_k_broadcasts_counts_against_sample_sizes():
  c = np.array([[0], [3], [10]])  # [3, 1]
  n = np.array([10, 16, 40])  # [3]
  got = entropo.pass_at_k(c, n, 4)
  assert got.shape == (3, 3)
  np.testing.assert_allclose(got, ref.pass_at_k(c, n, 4), rtol=2e-6,
                             atol=1e-7)


def test_pass_at_k_hand_computed():
  # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10.
  np.testing.assert_allclose(entropo.pass_at_k(2, 5, 2), 0.7, rtol=1e-6)
  # n=4, c=1, k=3: 1 - C(3,3)/C(4,3) = 3/4.
  np.testing.assert_allclose(entropo.pass_at_k(1, 4, 3), 0.75, rtol=1e-6)


def test_pass_at_k_special_cases(rng):
  n = rng.integers(1, 100, size=50)
  c = rng.integers(0, 1000, size=50) % (n + 1)
  # k = 1 is the plain success rate c/n.
  np.testing.assert_allclose(entropo.pass_at_k(c, n, 1), c / n, rtol=1e-6,
                             atol=1e-7)
  # No correct sample: exactly 0.
  np.testing.assert_array_equal(entropo.pass_at_k(np.zeros_like(n), n, 1),
                                0.0)
  assert float(entropo.pass_at_k(0, 50, 7)) == 0.0
  # Fewer than k incorrect samples: every draw of k contains a correct one.
  for n_, c_, k in ((10, 8, 3), (10, 10, 1), (10, 1, 10), (7, 3, 5)):
    assert float(entropo.pass_at_k(c_, n_, k)) == 1.0, (n_, c_, k)
  # n - c == k exactly is not yet certain.
  np.testing.assert_allclose(entropo.pass_at_k(7, 10, 3), 1 - 1 / 120,
                             rtol=1e-6)


def test_pass_at_k_monotone_in_k(rng):
  got = [float(entropo.pass_at_k(3, 64, k)) for k in (1, 2, 4, 8, 16, 32)]
  assert all(x < y for x, y in zip(got, got[1:]))


def test_pass_at_k_jit_equals_no_jit(rng):
  n = rng.integers(10, 60, size=20)
  c = rng.integers(0, 1000, size=20) % (n + 1)
  for k in (1, 3, 10):
    eager = entropo.pass_at_k(jnp.asarray(c), jnp.asarray(n), k)
    jitted = jax.jit(lambda c, n, k=k: entropo.pass_at_k(c, n, k))(
        jnp.asarray(c), jnp.asarray(n))
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jitted, ref.pass_at_k(c, n, k), rtol=2e-6,
                               atol=1e-7)


@pytest.mark.parametrize(
    "c, n, k, error, match",
    [
        (1, 5, 0, ValueError, "k must be a positive int"),
        (1, 5, -2, ValueError, "k must be a positive int"),
        (1, 5, 2.0, ValueError, "k must be a positive int"),
        (1, 3, 4, ValueError, "at least k=4 samples"),
        (np.array([1, 1]), np.array([5, 2]), 3, ValueError,
         "at least k=3 samples"),
        (6, 5, 2, ValueError, "num_correct must be <= num_samples"),
        (np.array([2, 9]), np.array([8, 8]), 1, ValueError,
         "num_correct must be <= num_samples"),
        (-1, 5, 2, ValueError, "num_correct must be >= 0"),
        (1.0, 5, 2, TypeError, "num_correct must be integers"),
        (1, 5.0, 2, TypeError, "num_samples must be integers"),
        (np.array([0.5]), np.array([4]), 1, TypeError,
         "num_correct must be integers"),
    ],
)
def test_pass_at_k_bad_inputs_raise(c, n, k, error, match):
  with pytest.raises(error, match=match):
    entropo.pass_at_k(c, n, k)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=["B=0", "T=0"])
def test_entropy_dynamics_of_an_empty_batch_raises(shape):
  with pytest.raises(ValueError, match=r"logps is empty \(shape"):
    entropo.entropy_dynamics(jnp.zeros(shape), jnp.zeros(shape[:1]),
                             jnp.ones(shape, bool))
