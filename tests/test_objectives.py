"""Tests for entropo.objectives.policy_loss and entropo.covariance.

Single device; the sharded == unsharded tests live with the sharding tests.
Every float32 result is compared with the float64 loop-style reference in
tests/reference/objectives.py evaluated on the very same (float32) inputs.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropo import covariance
from entropo import objectives
from entropo.objectives import policy_loss
from tests import inputs
from tests.reference import objectives as ref

MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
         "seq_mean_token_sum_norm")
KEY = jax.random.key(0)


def _batch(rng, shape=(6, 8), *, spread=0.3, seq_adv=False, empty_rows=(3,)):
  """float32 (logps, old_logps, advantages, mask) with a fully masked row.

  `spread` is the scale of log pi - log pi_old; padded positions hold
  garbage that must not matter.
  """
  logps = rng.uniform(-3.0, -0.05, shape).astype(np.float32)
  old = (logps - rng.normal(0.0, spread, shape)).astype(np.float32)
  adv_shape = shape[:1] if seq_adv else shape
  adv = rng.normal(size=adv_shape).astype(np.float32)
  mask = inputs.random_mask(rng, shape, 0.7)
  for b in empty_rows:
    mask[b] = False
  logps[~mask] = 5.0  # garbage: not even a log-probability
  old[~mask] = -60.0
  return logps, old, adv, mask


def _run(logps, old, adv, mask, **kwargs):
  """(loss, metrics, d loss / d logps) of `policy_loss`."""
  def f(lp):
    return policy_loss(lp, old, adv, mask, **kwargs)
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(
      jnp.asarray(logps))
  return loss, metrics, grad


def _close(actual, expected, *, scale=1.0):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=1e-5, atol=1e-6 * scale)


def _assert_away_from_kinks(ratios, mask, points, rel=1e-4):
  """Guards the test data: no valid ratio sits on a clip edge, where float32
  and float64 could legitimately take different branches."""
  r = np.asarray(ratios)[np.asarray(mask)]
  for p in points:
    assert np.all(np.abs(r - p) > rel * p), f"test data too close to {p}"


def _ref_kwargs(kwargs):
  """policy_loss kwargs -> reference kwargs."""
  out = dict(kwargs)
  if "band" in out:
    out["band_kind"] = out.pop("band")
  return out


# ------------------------------------------------- loss and gradient vs ref


@pytest.mark.parametrize("agg", MODES)
@pytest.mark.parametrize(
    "objective", ["reinforce", "ppo", "gspo", "gspo_token", "kl_cov"])
def test_loss_and_gradient_match_reference(rng, objective, agg):
  logps, old, adv, mask = _batch(rng)
  kwargs = dict(objective=objective, agg=agg, kl_cov_ratio=0.1,
                kl_cov_coef=0.5)
  loss, metrics, grad = _run(logps, old, adv, mask, **kwargs)
  ref_loss, ref_grad, ratios = ref.policy_loss(logps, old, adv, mask,
                                               **kwargs)
  _assert_away_from_kinks(ratios, mask, (0.8, 1.2))
  assert loss.dtype == jnp.float32 and loss.shape == ()
  _close(loss, ref_loss)
  _close(grad, ref_grad)
  assert float(metrics["pg/loss"]) == float(loss)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(clip_low=0.2, clip_high=0.28),  # DAPO clip-higher
        dict(clip_low=0.1, clip_high=0.1, band="reciprocal"),  # LOOP
        dict(clip_low=0.3, clip_high=0.05, band="reciprocal"),
        dict(dual_clip=2.0),
        dict(dual_clip=2.0, clip_low=0.2, clip_high=0.28,
             agg="seq_mean_token_mean"),
        dict(agg="seq_mean_token_sum_norm", norm=3.0),
    ],
    ids=["asym", "loop", "recip-asym", "dual", "dual-asym", "norm"])
@pytest.mark.parametrize("objective", ["ppo", "gspo"])
def test_ppo_variants_match_reference(rng, objective, kwargs):
  logps, old, adv, mask = _batch(rng, spread=0.6)
  kwargs = dict(kwargs, objective=objective)
  loss, metrics, grad = _run(logps, old, adv, mask, **kwargs)
  ref_loss, ref_grad, ratios = ref.policy_loss(logps, old, adv, mask,
                                               **_ref_kwargs(kwargs))
  lo, hi = ref.band(kwargs.get("clip_low", 0.2), kwargs.get("clip_high", 0.2),
                    kwargs.get("band", "additive"))
  _assert_away_from_kinks(ratios, mask, (lo, hi, kwargs.get("dual_clip", 9)))
  _close(loss, ref_loss)
  _close(grad, ref_grad)
  ref_metrics = ref.policy_metrics(
      logps, old, adv, mask, sequence_ratio=objective == "gspo",
      **{k: v for k, v in _ref_kwargs(kwargs).items()
         if k in ("clip_low", "clip_high", "band_kind", "dual_clip")})
  for name, value in ref_metrics.items():
    _close(metrics[name], value, scale=10)


def test_dual_clip_data_exercises_every_branch(rng):
  """The variant test above must really hit each clipping branch."""
  logps, old, adv, mask = _batch(rng, spread=0.6)
  lo, hi = 0.8, 1.2
  kinds = set()
  for b, t in zip(*np.nonzero(mask)):
    rho = math.exp(float(logps[b, t]) - float(old[b, t]))
    kinds.add(ref.ppo_token(rho, float(adv[b, t]), lo, hi, 2.0)[2])
  assert kinds == {"none", "low", "high", "dual"}


def test_reference_gradient_matches_finite_differences(rng):
  """The analytic reference gradients agree with float64 central
  differences of the reference losses (checks the reference itself)."""
  logps, old, adv, mask = _batch(rng, (3, 5), spread=0.6, empty_rows=())
  logps = logps.astype(np.float64)
  cases = [dict(objective=o) for o in ("reinforce", "ppo", "gspo",
                                       "gspo_token", "kl_cov")]
  cases += [dict(objective="ppo", dual_clip=2.0, agg="seq_mean_token_mean"),
            dict(objective="gspo", band_kind="reciprocal",
                 agg="seq_mean_token_sum")]
  h = 1e-6
  for kwargs in cases:
    _, grad, _ = ref.policy_loss(logps, old, adv, mask, **kwargs)
    for b, t in zip(*np.nonzero(mask)):
      up, down = logps.copy(), logps.copy()
      up[b, t] += h
      down[b, t] -= h
      if kwargs["objective"] == "gspo_token":
        continue  # value == gspo; its gradient is not the value's gradient
      fd = (ref.policy_loss(up, old, adv, mask, **kwargs)[0]
            - ref.policy_loss(down, old, adv, mask, **kwargs)[0]) / (2 * h)
      assert fd == pytest.approx(grad[b, t], abs=1e-7), (kwargs, b, t)


def test_metrics_match_reference(rng):
  logps, old, adv, mask = _batch(rng, spread=0.6)
  entropy = rng.uniform(0, 3, mask.shape).astype(np.float32)
  _, metrics, _ = _run(logps, old, adv, mask, dual_clip=2.5, clip_high=0.3,
                       entropy=entropy)
  expected = ref.policy_metrics(logps, old, adv, mask, clip_high=0.3,
                                dual_clip=2.5)
  expected["entropy/mean"] = ref.masked_mean(entropy, mask)
  assert expected["pg/clipfrac_low"] > 0 and expected["pg/clipfrac_high"] > 0
  assert expected["pg/clipfrac_dual"] > 0
  for name, value in expected.items():
    assert metrics[name].dtype == jnp.float32 and metrics[name].shape == ()
    _close(metrics[name], value, scale=10)
  assert "pg/clipfrac_dual" not in _run(logps, old, adv, mask)[1]
  assert "entropy/mean" not in _run(logps, old, adv, mask)[1]


def test_metric_keys_and_dtypes(rng):
  logps, old, adv, mask = _batch(rng)
  for objective in objectives.OBJECTIVES:
    _, metrics, _ = _run(logps, old, adv, mask, objective=objective, key=KEY)
    for name, value in metrics.items():
      assert "/" in name and value.dtype == jnp.float32 and value.shape == ()
    assert {"pg/loss", "pg/clipfrac_low", "pg/clipfrac_high",
            "pg/ratio_mean", "pg/ratio_max", "pg/ratio_min", "adv/mean",
            "adv/std"} <= set(metrics)
    has_cov = objective in ("clip_cov", "kl_cov")
    assert ("cov/mean" in metrics) == has_cov


# ------------------------------------------------------- hand-computed cases


def test_ppo_hand_computed_both_sides():
  # eps = 0.2: band [0.8, 1.2].
  ratios = np.array([1.5, 0.5, 1.0, 1.5, 3.0], np.float64)
  adv = jnp.array([[1.0, -1.0, 2.0, -1.0, 7.0]])
  old = jnp.full((1, 5), -1.0)
  logps = old + jnp.asarray(np.log(ratios), jnp.float32)[None]
  mask = jnp.array([[True, True, True, True, False]])
  loss, metrics, grad = _run(logps, old, adv, mask)
  # terms: -1.2 (high clip), +0.8 (low clip), -2 (in band), +1.5 (A<0 above
  # the band: unclipped); the masked fifth token is ignored.
  assert float(loss) == pytest.approx((-1.2 + 0.8 - 2.0 + 1.5) / 4, rel=1e-6)
  np.testing.assert_allclose(grad, [[0.0, 0.0, -2.0 / 4, 1.5 / 4, 0.0]],
                             rtol=1e-6, atol=1e-7)
  assert float(metrics["pg/clipfrac_high"]) == 0.25
  assert float(metrics["pg/clipfrac_low"]) == 0.25
  assert float(metrics["pg/ratio_mean"]) == pytest.approx(1.125, rel=1e-6)
  assert float(metrics["pg/ratio_max"]) == pytest.approx(1.5, rel=1e-6)
  assert float(metrics["pg/ratio_min"]) == pytest.approx(0.5, rel=1e-6)
  assert float(metrics["adv/mean"]) == pytest.approx(0.25)
  assert float(metrics["adv/pos_frac"]) == 0.5


def test_ppo_hand_computed_dual_clip():
  ratios = np.array([4.0, 2.0, 4.0, 0.5], np.float64)
  adv = jnp.array([[-1.0, -2.0, 1.0, -1.0]])
  old = jnp.full((1, 4), -2.0)
  logps = old + jnp.asarray(np.log(ratios), jnp.float32)[None]
  mask = jnp.ones((1, 4), bool)
  loss, metrics, grad = _run(logps, old, adv, mask, dual_clip=3.0)
  # terms: min(4, 3) = 3 (dual), 2*2 = 4 (below the cap 6), -1.2 (high
  # clip), 0.8 (low clip).
  assert float(loss) == pytest.approx((3.0 + 4.0 - 1.2 + 0.8) / 4, rel=1e-6)
  np.testing.assert_allclose(grad, [[0.0, 4.0 / 4, 0.0, 0.0]], rtol=1e-6,
                             atol=1e-7)
  assert float(metrics["pg/clipfrac_dual"]) == 0.25
  assert float(metrics["pg/clipfrac_low"]) == 0.25
  assert float(metrics["pg/clipfrac_high"]) == 0.25
  # Without the dual clip the first token costs 4 and keeps its gradient.
  loss2, _, grad2 = _run(logps, old, adv, mask)
  assert float(loss2) == pytest.approx((4.0 + 4.0 - 1.2 + 0.8) / 4, rel=1e-6)
  assert float(grad2[0, 0]) == pytest.approx(1.0, rel=1e-6)


# ------------------------------------------------- special cases reduce


@pytest.mark.parametrize("agg", MODES)
def test_ppo_at_ratio_one_has_reinforce_gradient(rng, agg):
  logps, _, adv, mask = _batch(rng)
  old = logps.copy()
  _, _, g_ppo = _run(logps, old, adv, mask, objective="ppo", agg=agg,
                     dual_clip=3.0)
  _, _, g_rf = _run(logps, old, adv, mask, objective="reinforce", agg=agg)
  # -A grad log pi / aggregation, exactly.
  expected = -np.asarray(adv, np.float64) * ref.aggregation_weights(mask, agg)
  _close(g_rf, expected)
  _close(g_ppo, expected)
  # GSPO-token's per-token gradient at s = 1, and Clip-Cov with an empty
  # covariance window, reduce to it too.
  for objective in ("gspo_token", "clip_cov"):
    _, _, g = _run(logps, old, adv, mask, objective=objective, agg=agg,
                   key=KEY, clip_cov_bounds=(1e9, 2e9))
    _close(g, expected)


@pytest.mark.parametrize("agg", MODES)
def test_kl_cov_at_ratio_one_has_reinforce_gradient(rng, agg):
  # The trainer recomputes old log-probs with the same code, so the first
  # update of every iteration has log pi == log pi_old exactly: there the
  # penalty coef * |log pi - log pi_old| is at its minimum and must add no
  # gradient (jnp.abs would add +coef on every selected token).
  logps, _, adv, mask = _batch(rng, (8, 10))
  old = logps.copy()
  _, metrics, g = _run(logps, old, adv, mask, objective="kl_cov", agg=agg,
                       kl_cov_ratio=0.3, kl_cov_coef=1.0)
  assert float(metrics["cov/selected_frac"]) > 0.2  # tokens were selected
  expected = -np.asarray(adv, np.float64) * ref.aggregation_weights(mask, agg)
  _close(g, expected)


@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
def test_ppo_on_a_band_edge_keeps_the_whole_gradient(rng, adv_sign):
  # clip_low = 0 puts rho = 1 exactly on the lower edge; clip_high = 0 on
  # the upper one. The loss max(-A rho, -A clip(rho)) is then a tie, and
  # the gradient must be the unclipped term's, not a share of it.
  logps, _, adv, mask = _batch(rng)
  adv = adv_sign * np.abs(adv)
  old = logps.copy()
  expected = -adv.astype(np.float64) * ref.aggregation_weights(
      mask, "token_mean")
  for kwargs in (dict(clip_low=0.0), dict(clip_high=0.0),
                 dict(clip_low=0.0, clip_high=0.0)):
    _, _, g = _run(logps, old, adv, mask, objective="ppo", **kwargs)
    _close(g, expected)


def test_gspo_equals_gspo_token_in_value(rng):
  for spread in (0.05, 0.6):
    logps, old, adv, mask = _batch(rng, spread=spread)
    for agg in MODES:
      l_seq, m_seq, _ = _run(logps, old, adv, mask, objective="gspo", agg=agg)
      l_tok, m_tok, _ = _run(logps, old, adv, mask, objective="gspo_token",
                             agg=agg)
      _close(l_tok, float(l_seq))
      for name in m_seq:
        _close(m_tok[name], float(m_seq[name]))


def test_gspo_gradient_is_the_sequence_level_gradient(rng):
  # Narrow band (paper defaults) and small moves: a mix of clipped and
  # unclipped sequences.
  logps, old, adv, mask = _batch(rng, (8, 6), spread=1.5e-3, seq_adv=True)
  kw = dict(clip_low=3e-4, clip_high=4e-4)
  expected = ref.gspo_sequence_grad(logps, old, adv, mask, **kw)
  clipped_rows = [b for b in range(8)
                  if mask[b].any() and not np.any(expected[b])]
  assert 0 < len(clipped_rows) < 7  # both kinds of sequences present
  for objective in ("gspo", "gspo_token"):
    loss, _, grad = _run(logps, old, adv, mask, objective=objective,
                         agg="seq_mean_token_mean", **kw)
    _close(grad, expected)
    _close(loss, ref.gspo_sequence_loss(logps, old, adv, mask, **kw))


def test_gspo_token_gradient_differs_with_token_advantages(rng):
  """With per-token advantages GSPO-token is a per-token estimator, GSPO
  not: their gradients differ (each matches its reference above)."""
  logps, old, adv, mask = _batch(rng, spread=0.05)
  _, _, g_seq = _run(logps, old, adv, mask, objective="gspo")
  _, _, g_tok = _run(logps, old, adv, mask, objective="gspo_token")
  assert not np.allclose(g_seq, g_tok, atol=1e-4)


def test_clip_band():
  assert objectives.clip_band(0.2, 0.28) == pytest.approx((0.8, 1.28))
  lo, hi = objectives.clip_band(0.1, 0.1, "reciprocal")
  assert lo == pytest.approx(1 / 1.1) and hi == pytest.approx(1.1)
  lo, hi = objectives.clip_band(0.25, 0.05, "reciprocal")
  assert lo == pytest.approx(0.8) and hi == pytest.approx(1.05)


def test_reciprocal_band_clips_where_additive_does_not():
  # A < 0 token at ratio 0.905: inside [0.9, 1.1] but below 1/1.1 = 0.909.
  # A > 0 token at ratio 1.105: above both upper edges (1.1).
  old = jnp.array([[-1.0, -1.0, -1.0]])
  logps = old + jnp.log(jnp.array([[0.905, 1.105, 0.95]]))
  adv = jnp.array([[-1.0, 1.0, -1.0]])
  mask = jnp.ones((1, 3), bool)
  kw = dict(clip_low=0.1, clip_high=0.1)
  _, m_add, g_add = _run(logps, old, adv, mask, **kw)
  _, m_rec, g_rec = _run(logps, old, adv, mask, band="reciprocal", **kw)
  assert float(g_add[0, 0]) > 0 and float(g_rec[0, 0]) == 0.0
  assert float(g_add[0, 1]) == 0.0 and float(g_rec[0, 1]) == 0.0
  assert float(g_rec[0, 2]) > 0
  assert float(m_add["pg/clipfrac_low"]) == 0.0
  assert float(m_rec["pg/clipfrac_low"]) == pytest.approx(1 / 3)


def test_asymmetric_clip_high_only_moves_the_upper_edge():
  old = jnp.full((1, 4), -2.0)
  logps = old + jnp.log(jnp.array([[1.25, 1.25, 0.75, 0.85]]))
  adv = jnp.array([[1.0, -1.0, -1.0, -1.0]])
  mask = jnp.ones((1, 4), bool)
  _, _, g_sym = _run(logps, old, adv, mask, clip_low=0.2, clip_high=0.2)
  _, _, g_asym = _run(logps, old, adv, mask, clip_low=0.2, clip_high=0.28)
  _, _, g_low = _run(logps, old, adv, mask, clip_low=0.1, clip_high=0.2)
  assert float(g_sym[0, 0]) == 0.0 and float(g_asym[0, 0]) < 0  # A>0, 1.25
  np.testing.assert_array_equal(g_sym[0, 1:], g_asym[0, 1:])
  assert float(g_sym[0, 2]) == 0.0  # A<0 at 0.75 < 0.8: clipped
  assert float(g_sym[0, 3]) > 0 and float(g_low[0, 3]) == 0.0  # 0.85 vs 0.9


def test_clip_high_traced_under_jit(rng):
  logps, old, adv, mask = _batch(rng, spread=0.6)
  traces = []

  @jax.jit
  def f(lp, clip_high):
    traces.append(1)
    return policy_loss(lp, old, adv, mask, clip_high=clip_high)[0]

  for clip_high in (0.2, 0.28, 0.5):
    value, grad = jax.value_and_grad(f)(jnp.asarray(logps),
                                        jnp.float32(clip_high))
    expected, expected_grad, _ = ref.policy_loss(logps, old, adv, mask,
                                                 clip_high=clip_high)
    _close(value, expected)
    _close(grad, expected_grad)
  assert len(traces) == 1  # one compilation for every clip_high


# ---------------------------------------------------------- invariances


@pytest.mark.parametrize("objective", objectives.OBJECTIVES)
def test_sequence_advantages_broadcast_like_tiled(rng, objective):
  logps, old, adv, mask = _batch(rng, seq_adv=True)
  tiled = np.repeat(adv[:, None], mask.shape[1], axis=1)
  kw = dict(objective=objective, key=KEY, clip_cov_bounds=(0.2, 5.0),
            clip_cov_ratio=0.1, kl_cov_ratio=0.1)
  l1, m1, g1 = _run(logps, old, adv, mask, **kw)
  l2, m2, g2 = _run(logps, old, tiled, mask, **kw)
  assert float(l1) == float(l2)
  np.testing.assert_array_equal(g1, g2)
  for name in m1:
    assert float(m1[name]) == float(m2[name]), name


@pytest.mark.parametrize("objective",
                         ["reinforce", "ppo", "gspo", "gspo_token", "kl_cov"])
def test_importance_weights_multiply_each_term(rng, objective):
  logps, old, adv, mask = _batch(rng, spread=0.6)
  iw = rng.uniform(0.0, 2.0, mask.shape).astype(np.float32)
  kw = dict(objective=objective, dual_clip=2.0, kl_cov_ratio=0.1)
  loss, _, grad = _run(logps, old, adv, mask, importance_weights=iw, **kw)
  ref_loss, ref_grad, _ = ref.policy_loss(logps, old, adv, mask,
                                          importance_weights=iw, **kw)
  _close(loss, ref_loss)
  _close(grad, ref_grad)
  # Weights of one are no weights; the weights themselves get no gradient.
  ones = np.ones(mask.shape, np.float32)
  l1, _, g1 = _run(logps, old, adv, mask, importance_weights=ones, **kw)
  l0, _, g0 = _run(logps, old, adv, mask, **kw)
  assert float(l1) == float(l0)
  np.testing.assert_array_equal(g1, g0)
  g_iw = jax.grad(lambda w: policy_loss(logps, old, adv, mask,
                                        importance_weights=w, **kw)[0])(
                                            jnp.asarray(iw))
  np.testing.assert_array_equal(g_iw, np.zeros(mask.shape))


@pytest.mark.parametrize("objective", objectives.OBJECTIVES)
def test_jit_equals_eager(rng, objective):
  logps, old, adv, mask = _batch(rng, spread=0.6)
  kw = dict(objective=objective, key=KEY, dual_clip=3.0, kl_cov_ratio=0.1,
            clip_cov_ratio=0.1, clip_cov_bounds=(0.2, 5.0))
  loss, metrics, grad = _run(logps, old, adv, mask, **kw)
  f = jax.jit(jax.value_and_grad(
      functools.partial(policy_loss, **kw), has_aux=True))
  (j_loss, j_metrics), j_grad = f(jnp.asarray(logps), old, adv, mask)
  np.testing.assert_allclose(j_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(j_grad, grad, rtol=1e-6, atol=1e-9)
  for name in metrics:
    np.testing.assert_allclose(j_metrics[name], metrics[name], rtol=1e-6,
                               atol=1e-9, err_msg=name)


@pytest.mark.parametrize("padding", ["finite", "inf", "nan"])
@pytest.mark.parametrize("objective", objectives.OBJECTIVES)
def test_masked_tokens_have_exactly_zero_gradient(rng, objective, padding):
  logps, old, adv, mask = _batch(rng, spread=0.6)
  fill = {"finite": 1e4, "inf": -np.inf, "nan": np.nan}[padding]
  logps_p, old_p, adv_p = logps.copy(), old.copy(), adv.copy()
  logps_p[~mask] = fill
  old_p[~mask] = fill  # -inf - -inf is nan
  adv_p[~mask] = fill
  iw = rng.uniform(0.5, 1.5, mask.shape).astype(np.float32)
  iw_p = np.where(mask, iw, fill).astype(np.float32)
  kw = dict(objective=objective, key=KEY, dual_clip=3.0, kl_cov_ratio=0.1,
            clip_cov_ratio=0.1, clip_cov_bounds=(0.2, 5.0))
  entropy = np.where(mask, 1.0, fill).astype(np.float32)
  loss, metrics, grad = _run(logps_p, old_p, adv_p, mask,
                             importance_weights=iw_p, entropy=entropy, **kw)
  clean_loss, clean_metrics, clean_grad = _run(
      logps, old, adv, mask, importance_weights=iw,
      entropy=np.ones(mask.shape, np.float32), **kw)
  grad = np.asarray(grad)
  assert np.all(grad[~mask] == 0.0)
  assert np.all(np.isfinite(grad))
  # Padding values change nothing at all.
  assert float(loss) == float(clean_loss)
  np.testing.assert_array_equal(grad, clean_grad)
  for name in metrics:
    assert float(metrics[name]) == float(clean_metrics[name]), name


@pytest.mark.parametrize("agg", MODES)
@pytest.mark.parametrize("objective", objectives.OBJECTIVES)
def test_all_masked_batch(rng, objective, agg):
  logps, old, adv, _ = _batch(rng)
  mask = np.zeros(logps.shape, bool)
  loss, metrics, grad = _run(logps, old, adv, mask, objective=objective,
                             agg=agg, key=KEY, dual_clip=3.0)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, np.zeros(logps.shape))
  for name, value in metrics.items():
    assert np.isfinite(float(value)), name


def test_log_ratio_clamp(rng):
  # One token moved by e^25: the ratio is e^20 and the gradient through the
  # clamp is zero.
  logps, old, adv, mask = _batch(rng, (2, 4), empty_rows=())
  mask[:] = True
  old[0, 1] = logps[0, 1] - 25.0
  adv[0, 1] = -0.5
  for objective in ("ppo", "kl_cov", "gspo"):
    loss, metrics, grad = _run(logps, old, adv, mask, objective=objective,
                               kl_cov_ratio=0.5)
    ref_loss, ref_grad, _ = ref.policy_loss(logps, old, adv, mask,
                                            objective=objective,
                                            kl_cov_ratio=0.5)
    _close(loss, ref_loss)
    _close(grad, ref_grad)
    if objective != "gspo":
      assert float(grad[0, 1]) == 0.0
      assert float(metrics["pg/ratio_max"]) == pytest.approx(math.exp(20),
                                                             rel=1e-5)


def test_bf16_inputs_are_upcast(rng):
  logps, old, adv, mask = _batch(rng, spread=0.6)
  low = [np.asarray(jnp.asarray(x, jnp.bfloat16)) for x in (logps, old, adv)]
  loss, _, grad = _run(*[jnp.asarray(x) for x in low], mask, dual_clip=3.0)
  assert loss.dtype == jnp.float32
  as64 = [np.asarray(x, np.float64) for x in low]
  ref_loss, ref_grad, _ = ref.policy_loss(*as64, mask, dual_clip=3.0)
  _close(loss, ref_loss)
  # JAX returns the gradient in the dtype of the input it is taken w.r.t.:
  # the float32 cotangent is rounded once to bfloat16 (8 significant bits).
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad,
                             rtol=2.0**-8, atol=1e-7)


# ------------------------------------------------------------- Clip-Cov


def _clip_cov(logps, old, adv, mask, key, **kw):
  """(loss, metrics, grad, chosen set) of clip_cov; the chosen tokens are the
  valid ones whose PPO gradient is non-zero and whose clip_cov one is 0."""
  loss, metrics, grad = _run(logps, old, adv, mask, objective="clip_cov",
                             key=key, **kw)
  ppo_kw = {k: v for k, v in kw.items() if not k.startswith("clip_cov")}
  _, _, g_ppo = _run(logps, old, adv, mask, objective="ppo", **ppo_kw)
  g, g_ppo = np.asarray(grad), np.asarray(g_ppo)
  assert np.all((g == g_ppo) | (g == 0.0))
  chosen = {(int(b), int(t)) for b, t in zip(*np.nonzero(mask & (g != g_ppo)))}
  return loss, metrics, grad, chosen


@pytest.mark.parametrize("ratio", [0.02, 0.1, 0.5])
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_clip_cov_selection(rng, ratio, dual_clip):
  logps, old, adv, mask = _batch(rng, (8, 10), spread=0.6)
  kw = dict(clip_cov_ratio=ratio, clip_cov_bounds=(0.3, 4.0),
            dual_clip=dual_clip)
  loss, metrics, grad, chosen = _clip_cov(logps, old, adv, mask, KEY, **kw)
  candidates = ref.clip_cov_candidates(
      logps, old, adv, mask, clip_low=0.2, clip_high=0.2,
      dual_clip=dual_clip, bounds=(0.3, 4.0))
  k = ref.num_selected(ratio, mask)
  assert chosen <= candidates
  assert len(chosen) == min(k, len(candidates))
  # The loss value and every other token's gradient are PPO's.
  ref_loss, ref_grad, _ = ref.policy_loss(logps, old, adv, mask,
                                          objective="clip_cov",
                                          dual_clip=dual_clip,
                                          detached=chosen)
  _close(loss, ref_loss)
  _close(grad, ref_grad)
  ppo_loss = _run(logps, old, adv, mask, dual_clip=dual_clip)[0]
  assert float(loss) == float(ppo_loss)
  _close(metrics["cov/selected_frac"], len(chosen) / mask.sum())
  _close(metrics["cov/mean"],
         ref.masked_mean(ref.token_covariance(logps, adv, mask), mask))


def test_clip_cov_data_has_all_regimes(rng):
  """The selection test sees fewer, more, and dual-clipped candidates."""
  logps, old, adv, mask = _batch(rng, (8, 10), spread=0.6)
  cands = ref.clip_cov_candidates(logps, old, adv, mask, clip_low=0.2,
                                  clip_high=0.2, bounds=(0.3, 4.0))
  cands_dual = ref.clip_cov_candidates(logps, old, adv, mask, clip_low=0.2,
                                       clip_high=0.2, bounds=(0.3, 4.0),
                                       dual_clip=1.5)
  assert ref.num_selected(0.02, mask) < len(cands_dual)
  assert ref.num_selected(0.5, mask) > len(cands)
  assert cands_dual < cands  # some window tokens are dual-clipped


def test_clip_cov_random_choice(rng):
  logps, old, adv, mask = _batch(rng, (8, 10), spread=0.6)
  kw = dict(clip_cov_ratio=0.02, clip_cov_bounds=(0.3, 4.0))
  first = _clip_cov(logps, old, adv, mask, KEY, **kw)
  again = _clip_cov(logps, old, adv, mask, KEY, **kw)
  assert first[3] == again[3]  # deterministic given the key
  np.testing.assert_array_equal(first[2], again[2])
  choices = {frozenset(_clip_cov(logps, old, adv, mask,
                                 jax.random.key(seed), **kw)[3])
             for seed in range(1, 9)}
  assert len(choices) > 1  # different keys choose differently


def test_clip_cov_no_candidates_is_ppo(rng):
  logps, old, adv, mask = _batch(rng)
  loss, _, grad, chosen = _clip_cov(logps, old, adv, mask, KEY,
                                    clip_cov_bounds=(50.0, 60.0))
  assert not chosen


# --------------------------------------------------------------- KL-Cov


@pytest.mark.parametrize("ratio", [2e-4, 0.1, 0.3])
def test_kl_cov_penalises_top_covariance_tokens(rng, ratio):
  logps, old, adv, mask = _batch(rng, (8, 10), spread=0.6)
  cov = ref.token_covariance(logps, adv, mask)
  k = ref.num_selected(ratio, mask)
  ranked = np.sort(cov[mask])[::-1]
  assert ranked[k - 1] - ranked[k] > 1e-4  # unambiguous top-k in float32
  top = ref.top_k_tokens(cov, mask, k)
  loss, metrics, grad = _run(logps, old, adv, mask, objective="kl_cov",
                             kl_cov_ratio=ratio, kl_cov_coef=0.3)
  # Unclipped surrogate: PPO with a band too wide to bind.
  base, _, g_base = _run(logps, old, adv, mask, clip_low=1e6, clip_high=1e6)
  n = mask.sum()
  penalty = sum(0.3 * abs(float(logps[b, t]) - float(old[b, t]))
                for b, t in top)
  _close(loss, float(base) + penalty / n)
  diff = np.asarray(grad) - np.asarray(g_base)
  changed = {(int(b), int(t)) for b, t in zip(*np.nonzero(np.abs(diff) > 0))}
  assert changed == top
  for b, t in top:
    assert diff[b, t] == pytest.approx(
        0.3 * np.sign(logps[b, t] - old[b, t]) / n, rel=1e-5)
  _close(metrics["cov/selected_frac"], k / n)


# ----------------------------------------------------------- covariance


def test_token_covariance_matches_reference(rng):
  logps, _, adv, mask = _batch(rng)
  cov = covariance.token_covariance(logps, adv, mask)
  _close(cov, ref.token_covariance(logps, adv, mask), scale=10)
  assert np.all(np.asarray(cov)[~mask] == 0.0)
  g = jax.grad(lambda lp: jnp.sum(covariance.token_covariance(lp, adv, mask)))(
      jnp.asarray(logps))
  np.testing.assert_array_equal(g, np.zeros(mask.shape))  # stop-gradient


def test_token_covariance_hand_computed():
  lp = jnp.array([[-1.0, -3.0, 99.0]])
  adv = jnp.array([[2.0, 0.0, 99.0]])
  mask = jnp.array([[True, True, False]])
  # means -2 and 1: (1)(1) and (-1)(-1).
  np.testing.assert_allclose(covariance.token_covariance(lp, adv, mask),
                             [[1.0, 1.0, 0.0]])


def test_num_selected():
  mask = jnp.ones((4, 25), bool)  # N = 100
  assert int(covariance.num_selected(2e-4, mask)) == 1
  assert int(covariance.num_selected(0.05, mask)) == 5
  assert int(covariance.num_selected(0.059, mask)) == 5  # floor
  assert int(covariance.num_selected(0.1, jnp.zeros((4, 25), bool))) == 1


def test_select_top_k_hand_computed():
  scores = jnp.array([[3.0, 1.0, 9.0, 2.0], [3.0, 5.0, 0.5, 8.0]])
  eligible = jnp.array([[True, True, False, True], [True, True, True, True]])
  top2 = covariance.select_top_k(scores, eligible, jnp.int32(2))
  np.testing.assert_array_equal(
      top2, [[False, False, False, False], [False, True, False, True]])
  # Ties at the k-th score are all selected.
  top3 = covariance.select_top_k(scores, eligible, 3)
  np.testing.assert_array_equal(
      top3, [[True, False, False, False], [True, True, False, True]])
  # More than the eligible count: every eligible token.
  everything = covariance.select_top_k(scores, eligible, 50)
  np.testing.assert_array_equal(everything, eligible)
  nothing = covariance.select_top_k(scores, jnp.zeros_like(eligible), 1)
  assert not np.any(nothing)


def test_select_random(rng):
  eligible = jnp.asarray(inputs.random_mask(rng, (6, 9), 0.4))
  n = int(eligible.sum())
  counts = np.zeros(eligible.shape)
  for seed in range(30):
    chosen = covariance.select_random(jax.random.key(seed), eligible, 3)
    assert int(chosen.sum()) == 3
    assert not np.any(np.asarray(chosen) & ~np.asarray(eligible))
    counts += np.asarray(chosen)
  assert np.count_nonzero(counts) > 3  # not always the same tokens
  a = covariance.select_random(KEY, eligible, 3)
  np.testing.assert_array_equal(a, covariance.select_random(KEY, eligible, 3))
  np.testing.assert_array_equal(
      covariance.select_random(KEY, eligible, n + 5), eligible)


# ------------------------------------------------------------ bad input


def test_bad_input_raises():
  lp = jnp.zeros((2, 3))
  adv = jnp.zeros(2)
  mask = jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match=r"Unknown objective 'grpo'; expected "
                     r"one of 'reinforce', 'ppo'.*'kl_cov'"):
    policy_loss(lp, lp, adv, mask, objective="grpo")
  with pytest.raises(ValueError, match=r"Unknown agg 'sum'; expected one of "
                     r"'token_mean'.*'seq_mean_token_sum_norm'"):
    policy_loss(lp, lp, adv, mask, agg="sum")
  with pytest.raises(ValueError, match=r"Unknown band 'multiplicative'; "
                     r"expected one of 'additive', 'reciprocal'"):
    policy_loss(lp, lp, adv, mask, band="multiplicative")
  with pytest.raises(ValueError, match="logps must have rank 2; got rank 1"):
    policy_loss(lp[0], lp[0], adv, mask[0])
  with pytest.raises(ValueError, match="logps must have rank 2; got rank 3"):
    policy_loss(lp[..., None], lp[..., None], adv, mask[..., None])
  with pytest.raises(TypeError, match="logps must have a floating dtype.*int"):
    policy_loss(jnp.zeros((2, 3), jnp.int32), lp, adv, mask)
  with pytest.raises(TypeError, match="old_logps must have a floating dtype"):
    policy_loss(lp, jnp.zeros((2, 3), jnp.int32), adv, mask)
  with pytest.raises(TypeError, match="advantages must have a floating"):
    policy_loss(lp, lp, jnp.zeros(2, jnp.int32), mask)
  with pytest.raises(TypeError, match="mask must be a bool array.*int32"):
    policy_loss(lp, lp, adv, jnp.ones((2, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\); got "
                     r"\(2, 4\)"):
    policy_loss(lp, lp, adv, jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match=r"Shapes must match; got logps=\(2, 3\)"
                     r", old_logps=\(2, 4\)"):
    policy_loss(lp, jnp.zeros((2, 4)), adv, mask)
  with pytest.raises(ValueError, match=r"advantages must be \[B\] or \[B, T\]"
                     r".*got \(3,\)"):
    policy_loss(lp, lp, jnp.zeros(3), mask)
  with pytest.raises(ValueError, match="advantages must have rank 1 or 2"):
    policy_loss(lp, lp, jnp.zeros((2, 3, 1)), mask)
  with pytest.raises(ValueError, match=r"importance_weights=\(3, 2\)"):
    policy_loss(lp, lp, adv, mask, importance_weights=jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="clip_cov' needs key="):
    policy_loss(lp, lp, adv, mask, objective="clip_cov")
  for bad in (1.0, 0.5, -3):
    with pytest.raises(ValueError, match=f"dual_clip must be > 1; got {bad}"):
      policy_loss(lp, lp, adv, mask, dual_clip=bad)
  with pytest.raises(ValueError, match="Unknown band 'x'"):
    objectives.clip_band(0.2, 0.2, "x")


def test_negative_clip_widths_raise():
  lp = jnp.zeros((2, 3))
  adv = jnp.zeros(2)
  mask = jnp.ones((2, 3), bool)
  for name in ("clip_low", "clip_high"):
    with pytest.raises(ValueError, match=f"{name} must be >= 0; got -0.1"):
      policy_loss(lp, lp, adv, mask, **{name: -0.1})
  # Zero is a valid (degenerate) band; a traced clip_high is not checked.
  policy_loss(lp, lp, adv, mask, clip_low=0.0, clip_high=0.0)
  jax.jit(lambda hi: policy_loss(lp, lp, adv, mask, clip_high=hi)[0])(0.2)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=["B=0", "T=0"])
def test_empty_batch_raises_naming_it(shape):
  logps = jnp.zeros(shape)
  with pytest.raises(ValueError, match=r"logps is empty \(shape"):
    policy_loss(logps, logps, jnp.zeros(shape[:1]), jnp.ones(shape, bool))
  with pytest.raises(ValueError, match="logps is empty"):  # shapes: static
    jax.jit(lambda x: policy_loss(x, x, jnp.zeros(shape[:1]),
                                  jnp.ones(shape, bool)))(logps)
