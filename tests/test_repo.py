"""Tests for entropo.repo: REPO, REPO-R and REPO-D (method.md §3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropo import repo
from tests import inputs
from tests.reference import advantages as ref

B, T = 6, 11


def _batch(rng, b=B, t=T, *, per_token=False, p_valid=0.7):
  """float32 advantages ([B] or [B, T]), logps, entropy and a mask.

  logps span ~[-25, 0] so that some fall below REPO-R's -20 clamp; some
  advantages are exactly 0.
  """
  shape = (b, t) if per_token else (b,)
  a = rng.normal(size=shape).astype(np.float32)
  a.reshape(-1)[::5] = 0.0
  logps = -(rng.exponential(2.0, size=(b, t)) ** 1.5).astype(np.float32)
  logps[0, :3] = [-25.0, -20.0, -19.5]
  entropy = rng.uniform(0.0, 3.0, size=(b, t)).astype(np.float32)
  mask = inputs.random_mask(rng, (b, t), p_valid)
  return a, logps, entropy, mask


def _close(actual, expected, *, scale=1.0):
  """float32 result against a float64 reference."""
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=1e-5, atol=1e-6 * scale)


PER_TOKEN = pytest.mark.parametrize("per_token", [False, True],
                                    ids=["seq", "token"])


# ---------------------------------------------------------------- reference


@PER_TOKEN
@pytest.mark.parametrize("beta", [0.3, -0.07, 2.0])
def test_repo_matches_reference(rng, per_token, beta):
  a, logps, entropy, _ = _batch(rng, per_token=per_token)
  out = repo.repo_advantages(a, logps, entropy, beta=beta)
  expected = ref.repo(a, logps, entropy, beta)
  assert out.dtype == jnp.float32 and out.shape == (B, T)
  _close(out, expected, scale=np.abs(expected).max())


@PER_TOKEN
@pytest.mark.parametrize("zeta", [0.03, -0.03, 0.2, -0.2])
@pytest.mark.parametrize("positive_only", [False, True])
@pytest.mark.parametrize("sign_clamp", [False, True])
def test_repo_r_matches_reference(rng, per_token, zeta, positive_only,
                                  sign_clamp):
  a, logps, _, _ = _batch(rng, per_token=per_token)
  out = repo.repo_r_advantages(a, logps, zeta=zeta,
                               positive_only=positive_only,
                               sign_clamp=sign_clamp)
  expected = ref.repo_r(a, logps, zeta, positive_only, sign_clamp)
  assert out.dtype == jnp.float32 and out.shape == (B, T)
  _close(out, expected, scale=np.abs(expected).max())


@PER_TOKEN
@pytest.mark.parametrize("zeta", [1.0, 0.5, -2.0, 10.0])
def test_repo_d_matches_reference(rng, per_token, zeta):
  a, logps, entropy, mask = _batch(rng, per_token=per_token)
  mask[2] = False  # a fully masked row
  coef = repo.repo_d_coefficient(a, logps, entropy, mask)
  expected_coef = ref.repo_d_coefficient(a, logps, entropy, mask)
  assert coef.dtype == jnp.float32 and coef.shape == ()
  _close(coef, expected_coef)
  out = repo.repo_d_advantages(a, logps, entropy, mask, zeta=zeta)
  expected = ref.repo_d(a, logps, entropy, mask, zeta)
  assert out.dtype == jnp.float32 and out.shape == (B, T)
  _close(out, expected, scale=np.abs(expected).max())


# ------------------------------------------------------------ hand-computed


def test_repo_hand_computed():
  a = jnp.array([1.0, -2.0])
  logps = jnp.array([[-1.0, -0.5], [-3.0, 0.0]])
  entropy = jnp.array([[0.5, 0.5], [1.0, 0.0]])
  # L = [[-0.5, 0], [-2, 0]]; A - 0.5 L.
  np.testing.assert_allclose(
      repo.repo_advantages(a, logps, entropy, beta=0.5),
      [[1.25, 1.0], [-1.0, -2.0]], rtol=1e-6)


def test_repo_r_hand_computed():
  a = jnp.array([2.0, -2.0, 0.0])
  logps = jnp.array([[-0.5, -3.0, -30.0]] * 3)
  # A>0: 2 (1 - 0.1 lp); A<0: -2 (1 + 0.1 lp); lp clamped at -20.
  np.testing.assert_allclose(
      repo.repo_r_advantages(a, logps, zeta=0.1),
      [[2.1, 2.6, 6.0], [-1.9, -1.4, 0.0], [0.0, 0.0, 0.0]], rtol=1e-6)


def test_repo_d_hand_computed():
  a = jnp.array([[1.0, 0.0, 0.0, 9.0]])
  logps = jnp.array([[-1.0, 0.0, -3.0, -7.0]])
  entropy = jnp.zeros((1, 4))
  mask = jnp.array([[True, True, True, False]])
  # valid: A = (1, 0, 0), L = (-1, 0, -3); means 1/3, -4/3.
  # cov = (2/3 * 1/3 + -1/3 * 4/3 + -1/3 * -5/3) / 3 = (1/3) / 3 = 1/9.
  # var = (1/9 + 16/9 + 25/9) / 3 = 42/27; coefficient = 1/14.
  np.testing.assert_allclose(
      repo.repo_d_coefficient(a, logps, entropy, mask), 1 / 14, rtol=1e-6)
  np.testing.assert_allclose(
      repo.repo_d_advantages(a, logps, entropy, mask, zeta=2.0),
      [[1 + 1 / 7, 0.0, 3 / 7, 9.0]], rtol=1e-6)


# ------------------------------------------------------- special reductions


@PER_TOKEN
def test_zero_coefficients_are_identity(rng, per_token):
  a, logps, entropy, mask = _batch(rng, per_token=per_token)
  full = np.broadcast_to(a if per_token else a[:, None], (B, T))
  np.testing.assert_array_equal(
      repo.repo_advantages(a, logps, entropy, beta=0.0), full)
  for positive_only in (False, True):
    for sign_clamp in (False, True):
      np.testing.assert_array_equal(
          repo.repo_r_advantages(a, logps, zeta=0.0,
                                 positive_only=positive_only,
                                 sign_clamp=sign_clamp), full)
  np.testing.assert_array_equal(
      repo.repo_d_advantages(a, logps, entropy, mask, zeta=0.0), full)


@PER_TOKEN
@pytest.mark.parametrize("zeta", [0.04, 0.5])
def test_repo_r_by_sign_of_advantage(rng, per_token, zeta):
  a, logps, _, _ = _batch(rng, per_token=per_token)
  full = np.broadcast_to(a if per_token else a[:, None], (B, T))
  lp = np.maximum(logps.astype(np.float64), -20.0)
  out = np.asarray(repo.repo_r_advantages(a, logps, zeta=zeta,
                                          sign_clamp=False))
  pos, neg = full > 0, full < 0
  assert pos.any() and neg.any()
  np.testing.assert_allclose(out[pos], (full * (1 - zeta * lp))[pos],
                             rtol=1e-6)
  np.testing.assert_allclose(out[neg], (full * (1 + zeta * lp))[neg],
                             rtol=1e-5, atol=1e-6)
  # REPO-R is REPO on raw log pi with beta = zeta |A| per token.
  np.testing.assert_allclose(
      out, full - zeta * np.abs(full) * lp, rtol=1e-5, atol=1e-6)
  # Rare correct tokens gain more than common ones; rare wrong lose less.
  assert np.all(out[pos] >= full[pos]) and np.all(out[neg] >= full[neg])


@pytest.mark.parametrize("zeta", [0.05, -0.05, 0.5, -0.5])
@pytest.mark.parametrize("sign_clamp", [False, True])
def test_repo_r_positive_only_leaves_negatives(rng, zeta, sign_clamp):
  a, logps, _, _ = _batch(rng, per_token=True)
  out = np.asarray(repo.repo_r_advantages(a, logps, zeta=zeta,
                                          positive_only=True,
                                          sign_clamp=sign_clamp))
  np.testing.assert_array_equal(out[a <= 0], a[a <= 0])
  changed = repo.repo_r_advantages(a, logps, zeta=zeta,
                                   sign_clamp=sign_clamp)
  np.testing.assert_array_equal(out[a > 0], np.asarray(changed)[a > 0])


@pytest.mark.parametrize("zeta", [-0.08, -0.3, 0.3])
def test_repo_r_sign_clamp(rng, zeta):
  a, logps, _, _ = _batch(rng, per_token=True)
  clamped = np.asarray(repo.repo_r_advantages(a, logps, zeta=zeta))
  assert np.all(clamped * a >= 0)  # never the opposite sign
  assert np.all(clamped[a == 0] == 0)
  free = np.asarray(repo.repo_r_advantages(a, logps, zeta=zeta,
                                           sign_clamp=False))
  flipped = free * a < 0
  # These inputs do flip without the clamp (|zeta log pi| > 1 somewhere) ...
  assert flipped.any()
  # ... and the clamp sets exactly those to 0 and leaves the rest.
  np.testing.assert_array_equal(clamped[flipped], 0.0)
  np.testing.assert_array_equal(clamped[~flipped], free[~flipped])


def test_repo_r_min_logp(rng):
  a, logps, _, _ = _batch(rng, per_token=True)
  for min_logp in (-20.0, -5.0):
    out = repo.repo_r_advantages(a, logps, zeta=0.02, min_logp=min_logp)
    floored = repo.repo_r_advantages(a, np.maximum(logps, min_logp),
                                     zeta=0.02, min_logp=-1e9)
    np.testing.assert_array_equal(out, floored)
    assert np.any(logps < min_logp)
  # The default clamp is at -20.
  deep = jnp.full((1, 2), -1e4)
  np.testing.assert_allclose(
      repo.repo_r_advantages(jnp.array([1.0]), deep, zeta=0.01),
      [[1.2, 1.2]], rtol=1e-6)


@PER_TOKEN
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_repo_d_zeta_one_decorrelates(per_token, seed):
  rng = np.random.default_rng(seed)
  a, logps, entropy, mask = _batch(rng, 12, 17, per_token=per_token)
  # Correlate A with L so there is something to remove.
  full = np.broadcast_to(a if per_token else a[:, None], (12, 17))
  lvals = logps.astype(np.float64) + entropy
  before = ref.masked_cov(full, lvals, mask)
  out = np.asarray(repo.repo_d_advantages(a, logps, entropy, mask, zeta=1.0),
                   np.float64)
  after = ref.masked_cov(out, lvals, mask)
  scale = np.sqrt(ref.masked_cov(full, full, mask)
                  * ref.masked_cov(lvals, lvals, mask))
  assert abs(before) > 1e-3 * scale
  assert abs(after) < 1e-5 * scale, (after, scale)
  # zeta = 2 reverses the covariance.
  out2 = np.asarray(repo.repo_d_advantages(a, logps, entropy, mask, zeta=2.0),
                    np.float64)
  np.testing.assert_allclose(ref.masked_cov(out2, lvals, mask), -before,
                             rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("value", [0.0, 0.1, -0.4, -2.3, 0.7])
@pytest.mark.parametrize("b", [7, 37, 101])
def test_repo_d_zero_variance_gives_zero_beta(rng, value, b):
  """Constant L (e.g. a uniform policy): beta exactly 0, A unchanged."""
  a = rng.normal(size=(b,)).astype(np.float32)
  logps = np.full((b, 13), value - 0.25, np.float32)
  entropy = np.full((b, 13), 0.25, np.float32)
  mask = inputs.random_mask(rng, (b, 13))
  coef = repo.repo_d_coefficient(a, logps, entropy, mask)
  assert coef == 0.0, coef
  out = repo.repo_d_advantages(a, logps, entropy, mask, zeta=10.0)
  np.testing.assert_array_equal(out, np.broadcast_to(a[:, None], (b, 13)))


def test_repo_d_empty_and_single_token(rng):
  a, logps, entropy, mask = _batch(rng)
  single = np.zeros_like(mask)
  single[3, 5] = True
  for m in (np.zeros_like(mask), single):
    coef = repo.repo_d_coefficient(a, logps, entropy, m)
    assert coef == 0.0
    out = repo.repo_d_advantages(a, logps, entropy, m, zeta=5.0)
    np.testing.assert_array_equal(out, np.broadcast_to(a[:, None], (B, T)))


@PER_TOKEN
def test_repo_d_masked_positions_keep_advantage(rng, per_token):
  a, logps, entropy, mask = _batch(rng, per_token=per_token)
  logps[~mask] = np.nan  # garbage under the mask must not leak
  entropy[~mask] = np.inf
  full = np.broadcast_to(a if per_token else a[:, None], (B, T))
  out = np.asarray(repo.repo_d_advantages(a, logps, entropy, mask, zeta=1.0))
  np.testing.assert_array_equal(out[~mask], full[~mask])
  assert np.all(np.isfinite(out))
  assert np.isfinite(repo.repo_d_coefficient(a, logps, entropy, mask))


@PER_TOKEN
def test_repo_d_masked_equals_sliced(rng, per_token):
  a, logps, entropy, mask = _batch(rng, 8, 9, per_token=per_token)
  mask[[1, 6]] = False  # fully masked rows
  # Pad with 4 masked columns of garbage, then slice rows and padding away.
  pad = lambda x, v: np.concatenate([x, np.full((8, 4), v, x.dtype)], 1)
  a_pad = pad(a, 99.0) if per_token else a
  big = (a_pad, pad(logps, -3.0), pad(entropy, 7.0), pad(mask, False))
  keep = np.array([0, 2, 3, 4, 5, 7])
  small = (a[keep], logps[keep], entropy[keep], mask[keep])
  np.testing.assert_allclose(repo.repo_d_coefficient(*big),
                             repo.repo_d_coefficient(*small), rtol=1e-5)
  out_big = repo.repo_d_advantages(*big, zeta=1.5)
  out_small = repo.repo_d_advantages(*small, zeta=1.5)
  np.testing.assert_allclose(np.asarray(out_big)[keep, :9], out_small,
                             rtol=1e-5, atol=1e-6)


@PER_TOKEN
def test_per_sequence_equals_broadcast(rng, per_token):
  a, logps, entropy, mask = _batch(rng)
  full = np.broadcast_to(a[:, None], (B, T)).copy()
  pairs = [
      lambda x: repo.repo_advantages(x, logps, entropy, beta=0.4),
      lambda x: repo.repo_r_advantages(x, logps, zeta=-0.1),
      lambda x: repo.repo_d_advantages(x, logps, entropy, mask, zeta=0.7),
      lambda x: repo.repo_d_coefficient(x, logps, entropy, mask),
  ]
  for fn in pairs:
    np.testing.assert_allclose(fn(a), fn(full), rtol=1e-6, atol=1e-7)


# ------------------------------------------------ gradients, jit, precision


def _all_fns(mask):
  return {
      "repo": lambda a, lp, h: repo.repo_advantages(a, lp, h, beta=0.3),
      "repo_r": lambda a, lp, h: repo.repo_r_advantages(a, lp, zeta=0.04),
      "repo_r_neg": lambda a, lp, h: repo.repo_r_advantages(
          a, lp, zeta=-0.3, positive_only=True),
      "repo_d": lambda a, lp, h: repo.repo_d_advantages(a, lp, h, mask,
                                                        zeta=1.0),
      "repo_d_coef": lambda a, lp, h: repo.repo_d_coefficient(a, lp, h, mask),
  }


@PER_TOKEN
def test_stop_gradients(rng, per_token):
  a, logps, entropy, mask = _batch(rng, per_token=per_token)
  for name, fn in _all_fns(mask).items():
    loss = lambda a, lp, h, fn=fn: jnp.sum(fn(a, lp, h) * 1.7)
    grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(a),
                                              jnp.asarray(logps),
                                              jnp.asarray(entropy))
    for g in grads:
      assert np.all(np.asarray(g) == 0.0), name


def test_jit_matches_eager(rng):
  a, logps, entropy, mask = _batch(rng, per_token=True)
  for name, fn in _all_fns(mask).items():
    np.testing.assert_allclose(jax.jit(fn)(a, logps, entropy),
                               fn(a, logps, entropy), rtol=1e-6, atol=1e-6,
                               err_msg=name)
  # Traced coefficients (e.g. a controller's state).
  traced = jax.jit(lambda z, b: (
      repo.repo_r_advantages(a, logps, zeta=z),
      repo.repo_d_advantages(a, logps, entropy, mask, zeta=z),
      repo.repo_advantages(a, logps, entropy, beta=b)))
  got = traced(jnp.float32(0.05), jnp.float32(-0.2))
  want = (repo.repo_r_advantages(a, logps, zeta=0.05),
          repo.repo_d_advantages(a, logps, entropy, mask, zeta=0.05),
          repo.repo_advantages(a, logps, entropy, beta=-0.2))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@PER_TOKEN
def test_bf16_inputs_close_to_float32(rng, per_token):
  a, logps, entropy, mask = _batch(rng, per_token=per_token)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  up = lambda x: np.asarray(bf(x).astype(jnp.float32))
  for name, fn in _all_fns(mask).items():
    out16 = fn(bf(a), bf(logps), bf(entropy))
    assert out16.dtype == jnp.float32, name
    # float32 maths on the bf16-rounded inputs ...
    np.testing.assert_allclose(out16, fn(up(a), up(logps), up(entropy)),
                               rtol=1e-6, atol=1e-6, err_msg=name)
    # ... close to the float32 inputs (bf16 rounds by <= 2^-9 relative).
    expected = np.asarray(fn(a, logps, entropy))
    np.testing.assert_allclose(out16, expected, rtol=2**-6,
                               atol=2**-6 * np.abs(expected).max(),
                               err_msg=name)


# ---------------------------------------------------------------- bad input


def test_bad_ranks_and_shapes():
  a, lp = jnp.zeros(3), jnp.zeros((3, 4))
  with pytest.raises(ValueError, match=r"logps must have rank 2; got rank 1"):
    repo.repo_r_advantages(a, jnp.zeros(3), zeta=0.1)
  with pytest.raises(ValueError, match=r"advantages must have rank 1 or 2; "
                     r"got rank 3"):
    repo.repo_advantages(jnp.zeros((3, 4, 1)), lp, lp, beta=0.1)
  with pytest.raises(ValueError, match=r"Per-sequence advantages \(2,\) do "
                     r"not match logps \(3, 4\) \(expected \[B\] with B=3\)"):
    repo.repo_r_advantages(jnp.zeros(2), lp, zeta=0.1)
  with pytest.raises(ValueError, match=r"advantages \(3, 5\) must be \[B\] "
                     r"or match logps \(3, 4\)"):
    repo.repo_d_coefficient(jnp.zeros((3, 5)), lp, lp, jnp.ones((3, 4), bool))
  with pytest.raises(ValueError, match=r"Shapes must match; got "
                     r"logps=\(3, 4\), entropy=\(3, 5\)"):
    repo.repo_advantages(a, lp, jnp.zeros((3, 5)), beta=0.1)
  with pytest.raises(ValueError, match=r"mask must have shape \(3, 4\); got "
                     r"\(3, 5\)"):
    repo.repo_d_advantages(a, lp, lp, jnp.ones((3, 5), bool), zeta=1.0)


def test_bad_dtypes():
  a, lp = jnp.zeros(3), jnp.zeros((3, 4))
  with pytest.raises(TypeError, match="advantages must have a floating "
                     "dtype.*got int32"):
    repo.repo_r_advantages(jnp.zeros(3, jnp.int32), lp, zeta=0.1)
  with pytest.raises(TypeError, match="logps must have a floating dtype.*"
                     "got int32"):
    repo.repo_advantages(a, jnp.zeros((3, 4), jnp.int32), lp, beta=0.1)
  with pytest.raises(TypeError, match="entropy must have a floating dtype"):
    repo.repo_advantages(a, lp, jnp.zeros((3, 4), jnp.int32), beta=0.1)
  with pytest.raises(TypeError, match="mask must be a bool array of valid "
                     "tokens; got dtype float32"):
    repo.repo_d_advantages(a, lp, lp, jnp.ones((3, 4)), zeta=1.0)
