"""Tests for entropo.corrections and entropo.sampler_mismatch against the
float64 references in tests/reference/corrections.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entropo
from tests import inputs
from tests.reference import corrections as ref
from tests.reference import objectives as ref_obj

B, T = 6, 8
# (level, mode, settings): every level x mode, and the two rejections.
CASES = [
    ("token", "truncate", dict(high=1.5)),
    ("token", "mask", dict(low=0.5, high=1.6)),  # IcePop's two-sided band
    ("token", "reject", dict(low=0.7, high=1.4)),
    ("sequence", "truncate", dict(high=2.0)),
    ("sequence", "mask", dict(low=0.3, high=3.0)),  # sequence MIS
    ("sequence", "reject", dict(low=0.3, high=3.0)),
    ("geometric", "truncate", dict(high=1.1)),
    ("geometric", "mask", dict(low=0.9, high=1.1)),
    ("geometric", "reject", dict(low=0.9, high=1.1)),
    ("token", "none", dict(veto=0.4)),
    ("token", "truncate", dict(high=2.0, max_kl=0.05)),
]


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  old = -rng.exponential(1.5, (B, T))
  # A wide spread of mismatches, so every band cuts somewhere.
  sampler = old + rng.normal(0.0, 0.4, (B, T))
  mask = inputs.random_mask(rng, (B, T))
  mask[2] = False  # a fully-masked row
  sampler = np.where(mask, sampler, 1e4)  # garbage on padding
  adv = rng.normal(0.0, 1.0, (B, T))
  logps = old + rng.normal(0.0, 0.15, (B, T))
  f32 = lambda x: np.asarray(x, np.float32)
  return f32(old), f32(sampler), mask, f32(adv), f32(logps)


OLD, SAMPLER, MASK, ADV, LOGPS = _inputs()


@functools.partial(jax.jit, static_argnames=("level", "mode", "low", "high",
                                             "veto", "max_kl"))
def _correction(old, sampler, mask, **settings):
  return entropo.mismatch_correction(old, sampler, mask, **settings)


def _corrected_loss(logps, old, sampler, adv, mask, *, objective, settings):
  weights, _ = entropo.mismatch_correction(old, sampler, mask,
                                           **dict(settings))
  return entropo.policy_loss(logps, old, adv, mask, objective=objective,
                             clip_low=0.2, clip_high=0.28,
                             agg="seq_mean_token_mean",
                             importance_weights=weights)[0]


_loss_and_grad = jax.jit(jax.value_and_grad(_corrected_loss),
                         static_argnames=("objective", "settings"))


@pytest.mark.parametrize("level,mode,settings", CASES)
def test_correction_matches_reference(level, mode, settings):
  got_w, got_m = _correction(OLD, SAMPLER, MASK, level=level, mode=mode,
                             **settings)
  want_w, want_m = ref.mismatch_correction(OLD, SAMPLER, MASK, level=level,
                                           mode=mode, **settings)
  assert got_w.dtype == jnp.float32
  np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
  assert set(got_m) == set(want_m)
  for name, value in want_m.items():
    np.testing.assert_allclose(got_m[name], value, rtol=1e-5, atol=1e-6,
                               err_msg=name)


def test_cases_exercise_every_branch():
  """The inputs really truncate, mask and reject (else the above is weak)."""
  seen = set()
  for level, mode, settings in CASES:
    _, m = ref.mismatch_correction(OLD, SAMPLER, MASK, level=level,
                                   mode=mode, **settings)
    for name in ("truncated", "masked", "rejected"):
      if 0 < m[f"corr/{name}_frac"] < 1:
        seen.add((level if name != "rejected" else "seq", name))
  assert {("token", "truncated"), ("token", "masked"),
          ("sequence", "truncated"), ("sequence", "masked"),
          ("geometric", "truncated"), ("geometric", "masked"),
          ("seq", "rejected")} <= seen


@pytest.mark.parametrize("objective", ["ppo", "gspo", "reinforce"])
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 4, 8, 10)])
def test_corrected_loss_and_gradient_match_reference(objective, case):
  level, mode, settings = case
  settings = dict(level=level, mode=mode, **settings)
  loss, grad = _loss_and_grad(LOGPS, OLD, SAMPLER, ADV, MASK,
                              objective=objective,
                              settings=tuple(sorted(settings.items())))
  weights, _ = ref.mismatch_correction(OLD, SAMPLER, MASK, **settings)
  want, want_grad, _ = ref_obj.policy_loss(
      LOGPS, OLD, ADV, MASK, objective=objective, clip_low=0.2,
      clip_high=0.28, agg="seq_mean_token_mean", importance_weights=weights)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("objective", ["ppo", "gspo", "reinforce"])
def test_agreeing_sampler_gives_the_uncorrected_loss(objective):
  """Sampler == trainer: every weight is exactly 1, so the loss and its
  gradient (a separate program fed the weights, as in the trainer's
  update) are those of unit weights, i.e. of no correction, bit for bit;
  and within float32 rounding of no weights at all."""
  ones = jnp.ones((B, T), jnp.float32)
  loss_fn = jax.jit(jax.value_and_grad(lambda lp, w: entropo.policy_loss(
      lp, OLD, ADV, MASK, objective=objective, clip_low=0.2, clip_high=0.28,
      agg="seq_mean_token_mean", importance_weights=w)[0]))
  want, want_grad = loss_fn(LOGPS, ones)
  bare, bare_grad = loss_fn(LOGPS, None)
  np.testing.assert_allclose(bare, want, rtol=1e-6)
  np.testing.assert_allclose(bare_grad, want_grad, rtol=1e-6, atol=1e-9)
  for level, mode, settings in CASES:
    w, _ = _correction(OLD, OLD, MASK, level=level, mode=mode, **settings)
    np.testing.assert_array_equal(np.asarray(w)[MASK], 1.0)
    loss, grad = loss_fn(LOGPS, jnp.where(MASK, w, 1.0))
    np.testing.assert_array_equal(loss, want)
    np.testing.assert_array_equal(grad, want_grad)


def test_weights_are_stop_gradient_and_zero_on_padding():
  grad = jax.grad(lambda o, s: jnp.sum(entropo.mismatch_correction(
      o, s, MASK, level="sequence", mode="mask", low=0.3, high=3.0)[0]),
                  argnums=(0, 1))(OLD, SAMPLER)
  for g in grad:
    np.testing.assert_array_equal(g, 0.0)
  w, _ = _correction(OLD, SAMPLER, MASK, level="token", mode="truncate",
                     high=2.0)
  np.testing.assert_array_equal(np.asarray(w)[~MASK], 0.0)


def test_hand_computed_icepop():
  old = np.log(np.array([[0.5, 0.5, 0.5]], np.float32))
  sampler = np.log(np.array([[0.5, 0.05, 0.9]], np.float32))  # r: 1, 10, .56
  w, m = entropo.mismatch_correction(old, sampler, np.ones((1, 3), bool),
                                     mode="mask", low=0.6, high=5.0)
  np.testing.assert_allclose(w, [[1.0, 0.0, 0.0]], atol=1e-6)
  np.testing.assert_allclose(m["corr/masked_frac"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(m["corr/ess"], 1 / 3, rtol=1e-6)


def test_all_masked_batch_is_finite_and_zero():
  mask = np.zeros((B, T), bool)
  w, m = _correction(OLD, SAMPLER, mask, level="sequence", mode="mask",
                     low=0.3, high=3.0)
  np.testing.assert_array_equal(w, 0.0)
  for name, value in m.items():
    assert value == 0.0, name


@pytest.mark.parametrize("settings,match", [
    (dict(level="tokens"), "level"),
    (dict(mode="clip"), "mode"),
    (dict(mode="truncate", high=0.5), "high >= 1"),
    (dict(mode="mask", low=1.2, high=2.0), "low <= 1 <= high"),
    (dict(veto=1.5), "veto"),
    (dict(max_kl=-1.0), "max_kl"),
])
def test_bad_settings_raise(settings, match):
  with pytest.raises(ValueError, match=match):
    entropo.mismatch_correction(OLD, SAMPLER, MASK, **settings)


# ---------------------------------------------------------------------------
# sampler_mismatch
# ---------------------------------------------------------------------------


def test_sampler_mismatch_matches_reference():
  got = jax.jit(entropo.sampler_mismatch)(OLD, SAMPLER, MASK)
  want = ref.sampler_mismatch(OLD, SAMPLER, MASK)
  assert set(got) == set(want)
  for name, value in want.items():
    assert got[name].dtype == jnp.float32 and got[name].shape == ()
    np.testing.assert_allclose(got[name], value, rtol=2e-5, atol=1e-6,
                               err_msg=name)


def test_sampler_mismatch_tiny_rounding_is_accurate():
  """bf16-rounded log-probs: KLs of ~1e-6 are still exact to 1e-4."""
  sampler = OLD.astype(jnp.bfloat16).astype(np.float32)
  got = entropo.sampler_mismatch(OLD, sampler, MASK)
  want = ref.sampler_mismatch(OLD, sampler, MASK)
  for name in ("mismatch/kl_token", "mismatch/kl_seq", "mismatch/chi2_token"):
    assert 0 < want[name] < 1e-3, name
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4,
                               err_msg=name)


def test_sampler_mismatch_of_identical_logps():
  got = entropo.sampler_mismatch(OLD, OLD, MASK)
  for name, value in got.items():
    want = 1.0 if name == "mismatch/prob_corr" else 0.0
    np.testing.assert_allclose(value, want, rtol=1e-6, atol=0, err_msg=name)
