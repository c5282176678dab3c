"""Tests for entropo.advantages: RLOO, GRPO (group/batch/none scaling)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropo import advantages as adv
from tests.reference import advantages as ref

SCALES = adv.GRPO_SCALES
# (P, G) shapes, including the smallest legal group and odd sizes.
SHAPES = [(1, 2), (3, 2), (4, 5), (6, 8), (2, 13)]


def _rewards(rng, p, g, *, degenerate=()):
  """float32 `[P, G]` rewards; rows in `degenerate` are all equal."""
  r = rng.normal(size=(p, g)).astype(np.float32)
  for i in degenerate:
    r[i] = r[i, 0]
  return r


def _close(actual, expected, *, scale=1.0):
  """float32 result against a float64 reference."""
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=1e-5, atol=1e-6 * scale)


def _estimators():
  """(name, fn) for every estimator and scale; fn(rewards, group_size)."""
  out = [("rloo", lambda r, g=None: adv.rloo_advantages(r, group_size=g))]
  for scale in SCALES:
    out.append((
        f"grpo_{scale}",
        lambda r, g=None, s=scale: adv.grpo_advantages(r, scale=s,
                                                       group_size=g),
    ))
  return out


ESTIMATORS = _estimators()
EACH_ESTIMATOR = pytest.mark.parametrize("name, fn", ESTIMATORS,
                                         ids=[n for n, _ in ESTIMATORS])


def _reference(name, rewards, group_size=None):
  if name == "rloo":
    return ref.rloo(rewards, group_size)
  return ref.grpo(rewards, name.split("_")[1], 1e-6, 1, group_size)


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("p, g", SHAPES)
@pytest.mark.parametrize("flat", [False, True])
def test_rloo_matches_reference(rng, p, g, flat):
  r = _rewards(rng, p, g, degenerate=(0,) if p > 2 else ())
  if flat:
    out = adv.rloo_advantages(r.reshape(-1), group_size=g)
    expected = ref.rloo(r.reshape(-1), g)
  else:
    out = adv.rloo_advantages(r)
    expected = ref.rloo(r)
  assert out.dtype == jnp.float32 and out.shape == expected.shape
  _close(out, expected)


@pytest.mark.parametrize("p, g", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("ddof", [0, 1])
def test_grpo_matches_reference(rng, p, g, scale, ddof):
  r = _rewards(rng, p, g, degenerate=(0,) if p > 2 else ())
  eps = float(rng.choice([1e-6, 0.1]))
  out2d = adv.grpo_advantages(r, scale=scale, eps=eps, ddof=ddof)
  out_flat = adv.grpo_advantages(r.reshape(-1), scale=scale, eps=eps,
                                 ddof=ddof, group_size=g)
  expected = ref.grpo(r, scale, eps, ddof)
  assert out2d.dtype == jnp.float32 and out2d.shape == (p, g)
  assert out_flat.shape == (p * g,)
  _close(out2d, expected, scale=np.abs(expected).max())
  _close(out_flat, expected.reshape(-1), scale=np.abs(expected).max())


def test_grpo_batch_uses_one_batch_std(rng):
  """batch scale differs from group scale, and its std is the batch's."""
  r = _rewards(rng, 5, 4)
  group = adv.grpo_advantages(r, scale="group", eps=0.0)
  batch = adv.grpo_advantages(r, scale="batch", eps=0.0)
  none = adv.grpo_advantages(r, scale="none")
  assert not np.allclose(group, batch, rtol=1e-3)
  _close(batch, np.asarray(none, np.float64) / np.std(r, ddof=1))


def test_degenerate_groups_matches_reference(rng):
  r = _rewards(rng, 9, 4, degenerate=(0, 3, 8))
  r[5, :] = np.float32(0.1)
  r[6, 1] = r[6, 0]  # two equal out of four: not degenerate
  expected = ref.degenerate_groups(r)
  np.testing.assert_array_equal(adv.degenerate_groups(r), expected)
  np.testing.assert_array_equal(
      adv.degenerate_groups(r.reshape(-1), group_size=4), expected)
  np.testing.assert_array_equal(
      expected, [True, False, False, True, False, True, False, False, True])
  assert adv.degenerate_groups(r).dtype == jnp.bool_


# ------------------------------------------------------------ hand-computed


def test_rloo_hand_computed():
  out = adv.rloo_advantages(jnp.array([1.0, 0.0, 0.0, 1.0]), group_size=4)
  np.testing.assert_allclose(out, [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6)


def test_grpo_hand_computed():
  r = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
  # group: centred +-0.5, std (ddof 1) = sqrt(4 * 0.25 / 3) = sqrt(1/3).
  np.testing.assert_allclose(
      adv.grpo_advantages(r[:1], scale="group", eps=0.0),
      [[math.sqrt(3) / 2, -math.sqrt(3) / 2, -math.sqrt(3) / 2,
        math.sqrt(3) / 2]], rtol=1e-6)
  np.testing.assert_allclose(
      adv.grpo_advantages(r[:1], scale="none"), [[0.5, -0.5, -0.5, 0.5]])
  # batch: mean 5/8, squares 5 * (3/8)^2 + 3 * (5/8)^2 = 1.875, ddof 1.
  std = math.sqrt(1.875 / 7)
  np.testing.assert_allclose(
      adv.grpo_advantages(r, scale="batch", eps=0.0),
      [[0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std],
       [0.25 / std, 0.25 / std, 0.25 / std, -0.75 / std]], rtol=1e-6)


def test_degenerate_groups_hand_computed():
  r = jnp.array([[1.0, 1.0], [0.0, 1.0], [0.1, 0.1]])
  np.testing.assert_array_equal(adv.degenerate_groups(r),
                                [True, False, True])


# ---------------------------------------------------- reductions/invariances


@pytest.mark.parametrize("g", [2, 3, 7, 16])
def test_rloo_is_scaled_dr_grpo(rng, g):
  r = _rewards(rng, 5, g)
  rloo = adv.rloo_advantages(r)
  dr = adv.grpo_advantages(r, scale="none")
  np.testing.assert_allclose(rloo, g / (g - 1) * np.asarray(dr), rtol=1e-5,
                             atol=1e-6)


@EACH_ESTIMATOR
@pytest.mark.parametrize("value", [0.0, 0.1, 1 / 3, -2.7, 1e-8, 123.456])
def test_degenerate_groups_give_exact_zeros(rng, name, fn, value):
  for g in (2, 3, 7, 13):
    r = _rewards(rng, 4, g, degenerate=())
    r[1] = np.float32(value)
    r[3] = np.float32(value)
    out = np.asarray(fn(r))
    assert np.all(out[[1, 3]] == 0.0), (g, out[[1, 3]])
    assert np.all(out[[0, 2]] != 0.0)
    np.testing.assert_array_equal(adv.degenerate_groups(r),
                                  [False, True, False, True])
    # A batch made only of degenerate groups (batch std 0): still exact 0.
    flat = np.full((3 * g,), np.float32(value))
    assert np.all(np.asarray(fn(flat, g)) == 0.0), g


@EACH_ESTIMATOR
def test_jit_matches_eager(rng, name, fn):
  r = _rewards(rng, 6, 4, degenerate=(2,))
  eager = fn(r.reshape(-1), 4)
  jitted = jax.jit(lambda x: fn(x, 4))(r.reshape(-1))
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(jitted)[8:12] == 0.0)


@EACH_ESTIMATOR
def test_bf16_rewards_close_to_float32(rng, name, fn):
  r = _rewards(rng, 6, 8)
  r16 = jnp.asarray(r, jnp.bfloat16)
  out16 = fn(r16)
  assert out16.dtype == jnp.float32
  # Exactly the float32 computation on the bf16-rounded values ...
  rounded = np.asarray(r16.astype(jnp.float32))
  np.testing.assert_allclose(out16, fn(jnp.asarray(rounded)), rtol=1e-6,
                             atol=1e-6)
  # ... and within bf16 rounding of float32: each reward moves by at most
  # 2^-9 relative, an advantage combines a few of them (observed worst over
  # 50 draws: 0.0042 of the largest advantage).
  expected = np.asarray(fn(r), np.float64)
  np.testing.assert_allclose(out16, expected, rtol=0,
                             atol=2**-6 * np.abs(expected).max())


@EACH_ESTIMATOR
def test_shift_invariant(rng, name, fn):
  """Adding a constant to every reward changes no advantage."""
  r = rng.integers(-3, 4, size=(5, 6)).astype(np.float32)
  np.testing.assert_allclose(fn(r + 5.0), fn(r), rtol=1e-6, atol=1e-6)


@EACH_ESTIMATOR
def test_no_gradient_to_rewards(rng, name, fn):
  r = _rewards(rng, 3, 4)
  w = rng.normal(size=r.shape).astype(np.float32)
  grad = jax.grad(lambda x: jnp.sum(fn(x) * w))(jnp.asarray(r))
  assert np.all(np.asarray(grad) == 0.0)


def test_eps_is_added_to_the_std(rng):
  r = _rewards(rng, 4, 5)
  none = np.asarray(adv.grpo_advantages(r, scale="none"), np.float64)
  std = np.std(r.astype(np.float64), axis=1, ddof=1, keepdims=True)
  np.testing.assert_allclose(adv.grpo_advantages(r, scale="group", eps=0.5),
                             none / (std + 0.5), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bad input


@EACH_ESTIMATOR
def test_bad_rank(name, fn):
  with pytest.raises(ValueError, match=r"rewards must have rank 1 or 2; got "
                     r"rank 3"):
    fn(jnp.zeros((2, 2, 2)), 2)
  with pytest.raises(ValueError, match="rank 1 or 2; got rank 0"):
    fn(jnp.float32(1.0), 2)


@EACH_ESTIMATOR
def test_non_float_rewards(name, fn):
  with pytest.raises(TypeError, match="rewards must have a floating dtype.*"
                     "got int32"):
    fn(jnp.array([1, 0, 0, 1], jnp.int32), 2)
  with pytest.raises(TypeError, match="got bool"):
    adv.degenerate_groups(jnp.array([True, False]), group_size=2)


@EACH_ESTIMATOR
def test_group_size_must_divide(name, fn):
  with pytest.raises(ValueError, match="group_size=4 does not divide the "
                     "batch of 6 rewards; accepted group sizes are the "
                     "divisors of 6"):
    fn(jnp.zeros(6), 4)


@EACH_ESTIMATOR
def test_group_of_one(name, fn):
  with pytest.raises(ValueError, match="group size of at least 2; got G=1"):
    fn(jnp.zeros(6), 1)
  with pytest.raises(ValueError, match="at least 2; got G=1"):
    fn(jnp.zeros((6, 1)))


@EACH_ESTIMATOR
def test_bad_group_size(name, fn):
  with pytest.raises(ValueError, match="need group_size=G.*got "
                     "group_size=None"):
    fn(jnp.zeros(6), None)
  with pytest.raises(ValueError, match="group_size must be a positive int; "
                     "got 0"):
    fn(jnp.zeros(6), 0)
  with pytest.raises(ValueError, match=r"group_size=3 contradicts rewards of "
                     r"shape \(3, 2\)"):
    fn(jnp.zeros((3, 2)), 3)


def test_unknown_scale():
  with pytest.raises(ValueError, match="Unknown scale 'std'; expected one of "
                     "'group', 'batch', 'none'"):
    adv.grpo_advantages(jnp.zeros((2, 2)), scale="std")


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_bad_ddof(scale):
  with pytest.raises(ValueError, match=r"ddof=2 .*accepted: 0 <= ddof < 2"):
    adv.grpo_advantages(jnp.zeros((3, 2)), scale=scale, ddof=2)
  with pytest.raises(ValueError, match=r"ddof=-1"):
    adv.grpo_advantages(jnp.zeros((3, 2)), scale=scale, ddof=-1)
