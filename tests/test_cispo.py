"""CISPO (entropo/objectives/cispo.py) against a float64 NumPy reference.

The reference below is written loop-style from the paper's formula
(MiniMax-M1, arXiv:2506.13585, eq. 4-5), independently of the module; the
aggregation reference is the shared one of tests/reference/objectives.py.
Objective-generic properties (jit == eager, zero gradient on padding, an
all-masked batch, sharded == unsharded) are run for every registered
objective by test_objectives.py and test_sharding.py.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import entropo
from entropo import objectives
from entropo.objectives import cispo
from entropo.objectives import policy_loss
from entropo.objectives import registry
from entropo.training import validate
from entropo.training.algorithm import CLIPPED_OBJECTIVES
from entropo.training.algorithm import Algorithm
from tests import inputs
from tests.reference import objectives as ref
from tests.training_setup import tiny_config

MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
         "seq_mean_token_sum_norm")
MAX_LOG_RATIO = ref.MAX_LOG_RATIO


def reference_cispo(logps, old_logps, advantages, mask, *, eps_low, eps_high,
                    agg, norm=None):
  """(loss, d loss / d logps, clipfrac_low, clipfrac_high) in float64.

  Per valid token: r = exp(clamp(log pi - log pi_old)), w = clip(r, 1 -
  eps_low, 1 + eps_high) held constant, term = -w A log pi, d term / d log
  pi = -w A. The loss aggregates the terms; it is linear in them, so its
  gradient is the aggregation weight times the term's derivative.
  """
  mask = np.asarray(mask)
  rows, cols = mask.shape
  terms = np.zeros((rows, cols))
  dterms = np.zeros((rows, cols))
  low = high = valid = 0
  for b in range(rows):
    for t in range(cols):
      if not mask[b, t]:
        continue
      lp = float(logps[b, t])
      diff = lp - float(old_logps[b, t])
      diff = min(max(diff, -MAX_LOG_RATIO), MAX_LOG_RATIO)
      r = math.exp(diff)
      w = min(max(r, 1.0 - eps_low), 1.0 + eps_high)
      a = float(advantages[b, t])
      terms[b, t] = -w * a * lp
      dterms[b, t] = -w * a
      low += r < 1.0 - eps_low
      high += r > 1.0 + eps_high
      valid += 1
  loss = ref.aggregate(terms, mask, agg, norm)
  grad = ref.aggregation_weights(mask, agg, norm) * dterms
  return loss, grad, low / max(valid, 1), high / max(valid, 1)


def _batch(rng, shape=(6, 8), spread=0.4):
  logps = rng.uniform(-3.0, -0.05, shape).astype(np.float32)
  old = (logps - rng.normal(0.0, spread, shape)).astype(np.float32)
  adv = rng.normal(size=shape).astype(np.float32)
  mask = inputs.random_mask(rng, shape, 0.7)
  mask[3] = False
  logps[~mask] = 5.0  # garbage that must not matter
  old[~mask] = -60.0
  return logps, old, adv, mask


def _run(logps, old, adv, mask, **kwargs):
  def f(lp):
    return policy_loss(lp, old, adv, mask, objective="cispo", **kwargs)
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(
      jnp.asarray(logps))
  return loss, metrics, grad


def _close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=1e-5, atol=1e-6)


def _away_from_edges(logps, old, mask, edges):
  r = np.exp(np.asarray(logps, np.float64) - old)[np.asarray(mask)]
  for edge in edges:
    assert np.all(np.abs(r - edge) > 1e-4 * edge), "data too near an edge"


@pytest.mark.parametrize("agg", MODES)
@pytest.mark.parametrize("eps", [(1.0, 0.28), (0.2, 0.1), (0.05, 2.0)])
def test_loss_gradient_and_clip_fractions_match_reference(rng, agg, eps):
  logps, old, adv, mask = _batch(rng)
  eps_low, eps_high = eps
  _away_from_edges(logps, old, mask, (1 - eps_low, 1 + eps_high))
  settings = cispo.CISPOSettings(cispo_eps_low=eps_low,
                                 cispo_eps_high=eps_high)
  loss, metrics, grad = _run(logps, old, adv, mask, agg=agg,
                             settings=settings)
  want_loss, want_grad, low, high = reference_cispo(
      logps, old, adv, mask, eps_low=eps_low, eps_high=eps_high, agg=agg)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  _close(loss, want_loss)
  _close(grad, want_grad)
  _close(metrics["cispo/clipfrac_low"], low)
  _close(metrics["cispo/clipfrac_high"], high)
  if eps == (0.2, 0.1):  # the data exercises both edges
    assert low > 0 and high > 0


def test_hand_computed():
  """Two tokens, one row: r = e^0.5 ≈ 1.6487 (clipped to 1.28) with A = 1,
  and r = e^-0.5 ≈ 0.6065 (inside [0, 1.28]) with A = -2."""
  logps = jnp.array([[-1.0, -2.0]])
  old = jnp.array([[-1.5, -1.5]])
  adv = jnp.array([[1.0, -2.0]])
  mask = jnp.array([[True, True]])
  loss, metrics, grad = _run(logps, old, adv, mask, agg="token_mean")
  r2 = math.exp(-0.5)
  terms = [-1.28 * 1.0 * -1.0, -r2 * -2.0 * -2.0]
  np.testing.assert_allclose(loss, sum(terms) / 2, rtol=1e-6)
  np.testing.assert_allclose(grad, [[-1.28 / 2, 2.0 * r2 / 2]], rtol=1e-6)
  assert float(metrics["cispo/clipfrac_high"]) == 0.5
  assert float(metrics["cispo/clipfrac_low"]) == 0.0


@pytest.mark.parametrize("agg", MODES)
def test_at_ratio_one_it_is_reinforce(rng, agg):
  logps, _, adv, mask = _batch(rng)
  got = _run(logps, logps, adv, mask, agg=agg)
  want = jax.value_and_grad(
      lambda lp: policy_loss(lp, logps, adv, mask, objective="reinforce",
                             agg=agg)[0])(jnp.asarray(logps))
  _close(got[0], float(want[0]))
  _close(got[2], np.asarray(want[1], np.float64))


def test_a_clipped_token_keeps_its_gradient(rng):
  """PPO gives a token whose ratio left the band no gradient; CISPO gives
  it -A (1 + eps_high) (times the aggregation weight)."""
  logps = jnp.array([[-0.5, -1.0]])
  old = jnp.array([[-1.5, -1.0]])  # r = e ≈ 2.72 on the first token
  adv = jnp.array([[1.0, 1.0]])
  mask = jnp.array([[True, True]])
  _, _, grad = _run(logps, old, adv, mask, agg="token_mean")
  ppo_grad = jax.grad(lambda lp: policy_loss(
      lp, old, adv, mask, objective="ppo", agg="token_mean")[0])(logps)
  assert float(ppo_grad[0, 0]) == 0.0
  np.testing.assert_allclose(grad[0, 0], -1.28 / 2, rtol=1e-6)


def test_wide_band_is_the_unclipped_importance_weight(rng):
  logps, old, adv, mask = _batch(rng)
  wide = dict(cispo_eps_low=1.0, cispo_eps_high=1e6)
  _, _, grad = _run(logps, old, adv, mask, agg="token_mean", settings=wide)
  r = np.exp(np.asarray(logps, np.float64) - old)
  weights = ref.aggregation_weights(mask, "token_mean")
  _close(grad, np.where(mask, -r * adv * weights, 0.0))


def test_masked_equals_sliced(rng):
  logps, old, adv, mask = _batch(rng)
  mask[:, 5:] = False
  full = _run(logps, old, adv, mask, agg="seq_mean_token_mean")
  cut = _run(logps[:, :5], old[:, :5], adv[:, :5], mask[:, :5],
             agg="seq_mean_token_mean")
  _close(full[0], float(cut[0]))
  _close(np.asarray(full[2])[:, :5], np.asarray(cut[2], np.float64))
  for name in ("cispo/clipfrac_high", "cispo/weight_mean"):
    _close(full[1][name], float(cut[1][name]))


def test_jit_equals_eager_and_ignores_the_ppo_band(rng):
  logps, old, adv, mask = _batch(rng)
  eager = _run(logps, old, adv, mask)
  jitted = jax.jit(lambda *a: _run(*a))(logps, old, adv, mask)
  _close(jitted[0], float(eager[0]))
  _close(jitted[2], np.asarray(eager[2], np.float64))
  banded = _run(logps, old, adv, mask, clip_low=0.01, clip_high=0.01,
                dual_clip=1.5)
  _close(banded[0], float(eager[0]))


def test_bf16_inputs_close_to_float32(rng):
  logps, old, adv, mask = _batch(rng)
  f32 = _run(logps, old, adv, mask)
  bf16 = _run(jnp.asarray(logps, jnp.bfloat16), jnp.asarray(
      old, jnp.bfloat16), jnp.asarray(adv, jnp.bfloat16), mask)
  assert bf16[0].dtype == jnp.float32
  np.testing.assert_allclose(float(bf16[0]), float(f32[0]), rtol=0.05,
                             atol=0.02)


@pytest.mark.parametrize("field,value", [
    ("cispo_eps_low", -0.1), ("cispo_eps_low", 1.5),
    ("cispo_eps_high", -1.0), ("cispo_eps_high", float("nan")),
    ("cispo_eps_high", "wide")])
def test_bad_settings_are_refused_by_name(rng, field, value):
  logps, old, adv, mask = _batch(rng)
  with pytest.raises(ValueError, match=field):
    _run(logps, old, adv, mask, settings={field: value})
  values = tiny_config().to_dict()
  values["algo"].update({"objective": "cispo", field: value})
  with pytest.raises(ValueError, match=f"Invalid config: algo.{field}: "):
    validate(ml_collections.ConfigDict(values))


def test_registered_everywhere():
  """One module, no other edit: the name, the config, the docs table."""
  assert "cispo" in entropo.OBJECTIVES and "cispo" in objectives.OBJECTIVES
  assert "| `cispo` |" in registry.table()
  c = tiny_config()
  assert c.algo.cispo_eps_high == 0.28 and c.algo.cispo_eps_low == 1.0
  c.algo.objective = "cispo"
  c.algo.cispo_eps_high = 0.5
  algo = Algorithm.from_config(c.algo)
  assert algo.settings == cispo.CISPOSettings(cispo_eps_low=1.0,
                                              cispo_eps_high=0.5)
  assert "cispo" not in CLIPPED_OBJECTIVES
