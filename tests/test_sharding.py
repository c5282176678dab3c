"""Sharded == unsharded: every reduction uses global numerators/denominators.

Each entropo function is run under `jax.shard_map` (and, for the core
losses, `jax.pmap`) with the batch split over 8 CPU devices and
`axis_name="data"`, and compared with one call on the whole batch without
`axis_name`. The batch has fully-masked rows and one fully-masked shard
(rows 4..7), so any reduction that divides per shard, counts per shard or
selects per shard gives a different answer.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import entropo

# Meshes of the 8 virtual CPU devices (tests/conftest.py), one built at
# import: without them the module is skipped before it fails to collect.
pytestmark = pytest.mark.multidevice
if jax.device_count() < 8:
  pytest.skip("multidevice: needs the 8 virtual CPU devices of the default "
              "test setup", allow_module_level=True)

AXIS = "data"
NUM_DEVICES = 8
B, T = 32, 12
MESH = jax.make_mesh((NUM_DEVICES,), (AXIS,),
                     axis_types=(jax.sharding.AxisType.Auto,))
# float32 summation-order noise: a psum of 8 partial sums vs one sum over
# ~250 O(1) terms moves a scalar by a few ulps of the terms' magnitude (not
# of the result, which can be smaller through cancellation): 1e-6 relative
# to that O(1) scale. Arrays (gradients, advantages) are compared relative
# to their own largest entry. A non-global reduction errs by > 1e-3 (see
# test_per_shard_reductions_would_differ).
RTOL, ATOL = 1e-6, 1e-6

POLICY_CASES = {
    "reinforce": dict(agg="seq_mean_token_sum"),
    "ppo": dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                agg="seq_mean_token_mean"),
    "gspo": dict(clip_low=0.05, clip_high=0.08, agg="seq_mean_token_mean"),
    "gspo_token": dict(clip_low=0.05, clip_high=0.08,
                       agg="seq_mean_token_mean"),
    "clip_cov": dict(clip_cov_ratio=0.05, clip_cov_bounds=(0.3, 5.0)),
    "kl_cov": dict(kl_cov_ratio=0.05, kl_cov_coef=1.0,
                   agg="seq_mean_token_sum_norm"),
}


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  mask = rng.random((B, T)) < 0.7
  mask[:, 0] = True
  mask[[1, 10, 11, 25]] = False  # fully-masked rows
  mask[4:8] = False  # a fully-masked shard (device 1)
  old = -rng.exponential(1.2, (B, T)).astype(np.float32)
  logps = (old + rng.normal(0.0, 0.3, (B, T))).astype(np.float32)
  seq_adv = rng.normal(0.0, 1.0, (B, 1))
  adv = (seq_adv + 0.5 * rng.normal(size=(B, T))).astype(np.float32)
  entropy = rng.exponential(1.0, (B, T)).astype(np.float32)
  weights = rng.uniform(0.5, 1.5, (B, T)).astype(np.float32)
  ref_logps = (logps + rng.normal(0.0, 0.2, (B, T))).astype(np.float32)
  # Garbage at masked positions: must not leak through any reduction.
  logps = np.where(mask, logps, -30.0).astype(np.float32)
  entropy = np.where(mask, entropy, 50.0).astype(np.float32)
  arrays = dict(mask=mask, old=old, logps=logps, adv=adv, entropy=entropy,
                weights=weights, ref_logps=ref_logps)
  return {k: jnp.asarray(v) for k, v in arrays.items()}


BATCH = _batch()
KEY = jax.random.key(7)


def _shard(fn, in_specs, out_specs):
  return jax.jit(jax.shard_map(fn, mesh=MESH, in_specs=in_specs,
                               out_specs=out_specs))


def _assert_trees_close(got, want, *, rtol=RTOL, atol=ATOL):
  got_flat, got_def = jax.tree.flatten_with_path(got)
  want_flat, want_def = jax.tree.flatten_with_path(want)
  assert got_def == want_def, (got_def, want_def)
  for (path, g), (_, w) in zip(got_flat, want_flat):
    assert g.dtype == w.dtype and g.shape == w.shape, path
    w = np.asarray(w, np.float64)
    scale = 1.0 if w.ndim == 0 else np.max(np.abs(w), initial=0.0)
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol,
                               atol=atol * scale,
                               err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------
# aggregate and the canary that makes these tests meaningful
# ---------------------------------------------------------------------------


def _all_modes(values, mask, axis_name=None):
  return {
      mode: jax.value_and_grad(
          lambda v, mode=mode: entropo.aggregate(
              v, mask, mode=mode, axis_name=axis_name,
              norm=None if mode != "seq_mean_token_sum_norm" else 16.0))(
                  values)
      for mode in entropo.AGGREGATION_MODES
  }


def test_aggregate_sharded_equals_unsharded():
  values, mask = BATCH["adv"], BATCH["mask"]
  # Losses are replicated scalars: out_specs P() for them, P(AXIS) for grads.
  sharded = _shard(
      functools.partial(_all_modes, axis_name=AXIS), (P(AXIS), P(AXIS)),
      {m: (P(), P(AXIS)) for m in entropo.AGGREGATION_MODES},
  )
  _assert_trees_close(sharded(values, mask),
                      jax.jit(_all_modes)(values, mask))


def test_per_shard_reductions_would_differ():
  # Canary: the batch is built so that a shard-local token mean differs
  # from the global one on every shard, so a non-global reduction inside
  # any entropo function would be caught by the tests below.
  local = _shard(
      lambda v, m: entropo.aggregate(v, m, mode="token_mean")[None],
      (P(AXIS), P(AXIS)), P(AXIS))(BATCH["adv"], BATCH["mask"])
  whole = entropo.aggregate(BATCH["adv"], BATCH["mask"])
  assert np.all(np.abs(np.asarray(local) - float(whole)) > 1e-3)
  assert float(local[1]) == 0.0  # the fully-masked shard


# ---------------------------------------------------------------------------
# policy_loss: loss, every metric, and per-token gradients
# ---------------------------------------------------------------------------


def _policy(logps, old, adv, mask, entropy, weights, key, *, objective,
            axis_name=None, **kwargs):
  def loss_fn(lp):
    return entropo.policy_loss(
        lp, old, adv, mask, objective=objective, key=key,
        importance_weights=weights, entropy=entropy, axis_name=axis_name,
        **{**POLICY_CASES.get(objective, {}), **kwargs})

  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(logps)
  return loss, metrics, grad


_POLICY_SPECS = (P(AXIS),) * 6 + (P(),)


@functools.cache
def _policy_fns(objective, **kwargs):
  sharded = _shard(
      functools.partial(_policy, objective=objective, axis_name=AXIS,
                        **kwargs),
      _POLICY_SPECS, (P(), P(), P(AXIS)))
  unsharded = jax.jit(functools.partial(_policy, objective=objective,
                                        **kwargs))
  return sharded, unsharded


def _policy_args(batch=BATCH, key=KEY):
  return (batch["logps"], batch["old"], batch["adv"], batch["mask"],
          batch["entropy"], batch["weights"], key)


@pytest.mark.parametrize("objective", entropo.OBJECTIVES)
def test_policy_loss_sharded_equals_unsharded(objective):
  sharded, unsharded = _policy_fns(objective)
  got = sharded(*_policy_args())
  want = unsharded(*_policy_args())
  _assert_trees_close(got, want)
  loss, metrics, grad = want
  # The comparison is only meaningful if something is clipped / selected.
  if objective in ("ppo", "gspo", "gspo_token"):
    assert metrics["pg/clipfrac_high"] > 0 and metrics["pg/clipfrac_low"] > 0
  assert np.count_nonzero(np.asarray(grad)) > 0
  np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(BATCH["mask"])],
                                0.0)


def _numpy_covariance(batch):
  mask = np.asarray(batch["mask"])
  lp = np.asarray(batch["logps"], np.float64)
  adv = np.asarray(batch["adv"], np.float64)
  cov = (lp - lp[mask].mean()) * (adv - adv[mask].mean())
  return np.where(mask, cov, 0.0)


def test_clip_cov_selects_the_same_tokens_sharded():
  lo, hi = POLICY_CASES["clip_cov"]["clip_cov_bounds"]
  ratio_cfg = POLICY_CASES["clip_cov"]["clip_cov_ratio"]
  mask = np.asarray(BATCH["mask"])
  n_valid = int(mask.sum())
  k = max(1, int(np.floor(ratio_cfg * n_valid)))

  # The smallest ratio (one token) with an empty window: no candidate.
  ppo_sharded, _ = _policy_fns("clip_cov", clip_cov_ratio=1e-9,
                               clip_cov_bounds=(1e9, 2e9))
  cc_sharded, cc_unsharded = _policy_fns("clip_cov")
  # Without candidates Clip-Cov is PPO: its gradient is the baseline.
  base = np.asarray(ppo_sharded(*_policy_args())[2])
  selections = {}
  for name, fn in (("sharded", cc_sharded), ("unsharded", cc_unsharded)):
    _, metrics, grad = fn(*_policy_args())
    grad = np.asarray(grad)
    selections[name] = (base != 0) & (grad == 0)
    np.testing.assert_allclose(metrics["cov/selected_frac"], k / n_valid,
                               rtol=1e-6)
  np.testing.assert_array_equal(selections["sharded"],
                                selections["unsharded"])
  chosen = selections["sharded"]
  assert chosen.sum() == k

  # Non-trivial: more candidates than chosen, spread over several shards.
  cov = _numpy_covariance(BATCH)
  candidates = mask & (cov > lo) & (cov < hi) & (base != 0)
  assert candidates.sum() > 2 * k, (candidates.sum(), k)
  assert np.all(candidates[chosen])
  shards_hit = {int(b) // (B // NUM_DEVICES) for b in np.nonzero(chosen)[0]}
  assert len(shards_hit) >= 3, shards_hit

  # The choice depends on the key (so "same key, same tokens" is a real
  # check), and a different key is again the same sharded and unsharded.
  other = jax.random.key(8)
  g_sh = np.asarray(cc_sharded(*_policy_args(key=other))[2])
  g_un = np.asarray(cc_unsharded(*_policy_args(key=other))[2])
  np.testing.assert_array_equal(g_sh == 0, g_un == 0)
  assert not np.array_equal((base != 0) & (g_sh == 0), chosen)


def test_kl_cov_selects_the_same_tokens_sharded():
  mask = np.asarray(BATCH["mask"])
  n_valid = int(mask.sum())
  k = max(1, int(np.floor(POLICY_CASES["kl_cov"]["kl_cov_ratio"] * n_valid)))
  penalised = {}
  for coef in (0.0, 1.0):
    sharded, unsharded = _policy_fns("kl_cov", kl_cov_coef=coef)
    got, want = sharded(*_policy_args()), unsharded(*_policy_args())
    _assert_trees_close(got, want)
    penalised[coef] = np.asarray(got[2])
    np.testing.assert_allclose(got[1]["cov/selected_frac"], k / n_valid,
                               rtol=1e-6)
  # The penalty's gradient marks the chosen tokens: the top-k global cov.
  chosen = penalised[1.0] != penalised[0.0]
  assert chosen.sum() == k
  cov = _numpy_covariance(BATCH)
  top = np.argsort(np.where(mask, cov, -np.inf).ravel())[::-1][:k]
  expected = np.zeros(B * T, bool)
  expected[top] = True
  np.testing.assert_array_equal(chosen, expected.reshape(B, T))
  shards_hit = {int(b) // (B // NUM_DEVICES) for b in np.nonzero(chosen)[0]}
  assert len(shards_hit) >= 3, shards_hit


def test_policy_loss_bf16_logps_sharded():
  # bf16 log-probs: the sharded loss equals the unsharded loss of the same
  # (rounded) values exactly up to summation order, and is close to the
  # float32 loss within the bound implied by the rounding.
  lp16 = BATCH["logps"].astype(jnp.bfloat16)
  old16 = BATCH["old"].astype(jnp.bfloat16)
  sharded, unsharded = _policy_fns("ppo", agg="token_mean", dual_clip=None)
  args16 = (lp16, old16) + _policy_args()[2:]
  loss16, metrics16, grad16 = sharded(*args16)
  assert loss16.dtype == jnp.float32 and grad16.dtype == jnp.bfloat16
  rounded = (lp16.astype(jnp.float32), old16.astype(jnp.float32))
  want = unsharded(*rounded, *_policy_args()[2:])
  _assert_trees_close((loss16, metrics16),
                      (want[0], want[1]))
  np.testing.assert_array_equal(grad16, want[2].astype(jnp.bfloat16))

  loss32 = sharded(*_policy_args())[0]
  # Each token term is 1-Lipschitz in rho times |A w| (clip and max are), so
  # |dloss| <= mean(|A| w rho |exp(d log rho) - 1|) over valid tokens.
  mask = np.asarray(BATCH["mask"])
  lr32 = (np.asarray(BATCH["logps"], np.float64)
          - np.asarray(BATCH["old"], np.float64))
  lr16 = np.asarray(rounded[0], np.float64) - np.asarray(rounded[1],
                                                          np.float64)
  dev = (np.abs(np.asarray(BATCH["adv"]) * np.asarray(BATCH["weights"]))
         * np.exp(lr32) * np.abs(np.expm1(lr16 - lr32)))
  bound = dev[mask].mean()
  assert 0 < abs(float(loss16) - float(loss32)) <= bound * (1 + 1e-4) + ATOL
  assert bound < 0.02


# ---------------------------------------------------------------------------
# regularisers, REPO-D, GRPO batch scaling
# ---------------------------------------------------------------------------


def _regularizers(entropy, logps, ref_logps, mask, axis_name=None):
  out = {}
  for mode in entropo.AGGREGATION_MODES:
    out[f"bonus/{mode}"] = jax.value_and_grad(
        lambda h, mode=mode: entropo.entropy_bonus(
            h, mask, coef=0.01, mode=mode, axis_name=axis_name),
        has_aux=True)(entropy)
  for est, mode in (("k1", "token_mean"), ("k2", "seq_mean_token_mean"),
                    ("k3", "seq_mean_token_sum")):
    out[f"kl/{est}"] = jax.value_and_grad(
        lambda lp, est=est, mode=mode: entropo.kl_penalty(
            lp, ref_logps, mask, coef=0.1, estimator=est, mode=mode,
            axis_name=axis_name),
        has_aux=True)(logps)
  return out


def test_entropy_bonus_and_kl_penalty_sharded_equal_unsharded():
  args = (BATCH["entropy"], BATCH["logps"], BATCH["ref_logps"],
          BATCH["mask"])
  want = jax.jit(_regularizers)(*args)
  specs = {name: ((P(), P()), P(AXIS)) for name in want}
  got = _shard(functools.partial(_regularizers, axis_name=AXIS),
               (P(AXIS),) * 4, specs)(*args)
  _assert_trees_close(got, want)


def _repo_d(adv, seq_adv, logps, entropy, mask, axis_name=None):
  return {
      "coef": entropo.repo_d_coefficient(adv, logps, entropy, mask,
                                         axis_name=axis_name),
      "adv": entropo.repo_d_advantages(adv, logps, entropy, mask, zeta=1.0,
                                       axis_name=axis_name),
      "seq_adv": entropo.repo_d_advantages(seq_adv, logps, entropy, mask,
                                           zeta=0.5, axis_name=axis_name),
  }


def test_repo_d_sharded_equals_unsharded():
  seq_adv = BATCH["adv"][:, 0]
  args = (BATCH["adv"], seq_adv, BATCH["logps"], BATCH["entropy"],
          BATCH["mask"])
  want = jax.jit(_repo_d)(*args)
  got = _shard(functools.partial(_repo_d, axis_name=AXIS), (P(AXIS),) * 5,
               {"coef": P(), "adv": P(AXIS), "seq_adv": P(AXIS)})(*args)
  assert abs(float(want["coef"])) > 1e-2  # a non-trivial correction
  _assert_trees_close(got, want)


def _grpo(rewards, axis_name=None):
  return {
      scale: entropo.grpo_advantages(rewards, scale=scale, axis_name=axis_name)
      for scale in entropo.GRPO_SCALES
  }


def test_grpo_batch_scale_sharded_over_prompts():
  rng = np.random.default_rng(3)
  rewards = rng.binomial(1, 0.4, (16, 4)).astype(np.float32)
  rewards[:8] *= rng.uniform(0.5, 2.0, (8, 1)).astype(np.float32)
  rewards[5] = 1.0  # a degenerate group
  rewards = jnp.asarray(rewards)
  want = jax.jit(_grpo)(rewards)
  got = _shard(functools.partial(_grpo, axis_name=AXIS), (P(AXIS),),
               P(AXIS))(rewards)
  _assert_trees_close(got, want)
  np.testing.assert_array_equal(got["batch"][5], 0.0)
  # Batch scaling really is batch-wide: per-shard scaling would differ.
  local = _shard(lambda r: entropo.grpo_advantages(r, scale="batch"),
                 (P(AXIS),), P(AXIS))(rewards)
  assert not np.allclose(local, want["batch"], rtol=1e-3)


# ---------------------------------------------------------------------------
# diagnostics and quantiles
# ---------------------------------------------------------------------------

QUANTILES = (0.0, 0.1, 0.25, 0.37, 0.5, 0.75, 0.9, 1.0)


def _diagnostics(logps, adv, entropy, logps_b, mask, axis_name=None):
  return {
      **entropo.entropy_dynamics(logps, adv, mask, entropy=entropy,
                                 quantiles=QUANTILES, step_size=0.1,
                                 axis_name=axis_name),
      **entropo.precision_mismatch(logps, logps_b, mask, clip_low=0.01,
                                   clip_high=0.01, axis_name=axis_name),
      "quantiles": entropo.masked_quantiles(entropy, mask, QUANTILES,
                                            axis_name=axis_name),
  }


def _diagnostics_and_grad(logps, adv, entropy, logps_b, mask,
                          axis_name=None):
  # Diagnostics are logged as aux of a differentiated loss: they must trace
  # under jax.grad (no non-differentiable collective) and pass no gradient.
  def f(lp):
    out = _diagnostics(lp, adv, entropy, logps_b, mask, axis_name=axis_name)
    return sum(jnp.sum(v) for v in out.values()), out

  grad, out = jax.grad(f, has_aux=True)(logps)
  return out, grad


def test_diagnostics_and_quantiles_sharded_equal_unsharded():
  logps_b = (BATCH["logps"].astype(jnp.bfloat16).astype(jnp.float32)
             + 1e-3 * BATCH["adv"])
  args = (BATCH["logps"], BATCH["adv"], BATCH["entropy"], logps_b,
          BATCH["mask"])
  want, grad_want = jax.jit(_diagnostics_and_grad)(*args)
  got, grad = _shard(functools.partial(_diagnostics_and_grad, axis_name=AXIS),
                     (P(AXIS),) * 5, (P(), P(AXIS)))(*args)
  _assert_trees_close(got, want)
  np.testing.assert_array_equal(grad, 0.0)
  np.testing.assert_array_equal(grad_want, 0.0)
  mask = np.asarray(BATCH["mask"])
  np.testing.assert_allclose(
      got["quantiles"], np.quantile(np.asarray(BATCH["entropy"])[mask],
                                    QUANTILES), rtol=1e-6)
  assert 0 < want["mismatch/phantom_clipfrac_low"] < 1


def _mismatch_and_correction(logps, sampler, mask, axis_name=None):
  weights, metrics = entropo.mismatch_correction(
      logps, sampler, mask, level="geometric", mode="mask", low=0.9,
      high=1.1, veto=0.8, axis_name=axis_name)
  return weights, {**metrics, **entropo.sampler_mismatch(
      logps, sampler, mask, axis_name=axis_name)}


def test_sampler_mismatch_and_corrections_sharded_equal_unsharded():
  sampler = BATCH["logps"] + 0.2 * BATCH["adv"]
  args = (BATCH["logps"], sampler, BATCH["mask"])
  want = jax.jit(_mismatch_and_correction)(*args)
  got = _shard(functools.partial(_mismatch_and_correction, axis_name=AXIS),
               (P(AXIS),) * 3, (P(AXIS), P()))(*args)
  _assert_trees_close(got, want)
  assert 0 < want[1]["corr/masked_frac"] < 1
  assert 0 < want[1]["corr/seq_rejected_frac"] < 1


def test_masked_quantiles_all_masked_shards():
  # Only device 3 holds valid values: the others contribute nothing.
  mask = np.zeros((B, T), bool)
  mask[12:16, 2:5] = True
  x = BATCH["entropy"]
  f = lambda x, m, axis_name=None: entropo.masked_quantiles(
      x, m, QUANTILES, axis_name=axis_name)
  got = _shard(functools.partial(f, axis_name=AXIS), (P(AXIS), P(AXIS)),
               P())(x, jnp.asarray(mask))
  np.testing.assert_allclose(got, f(x, jnp.asarray(mask)), rtol=RTOL)
  np.testing.assert_allclose(got, np.quantile(np.asarray(x)[mask], QUANTILES),
                             rtol=1e-6)


# ---------------------------------------------------------------------------
# jax.pmap over the same 8 devices
# ---------------------------------------------------------------------------


def _core(values, logps, old, adv, mask, entropy, key, axis_name=None):
  out = {f"agg/{mode}": entropo.aggregate(values, mask, mode=mode,
                                          axis_name=axis_name)
         for mode in entropo.AGGREGATION_MODES}
  for objective in ("ppo", "clip_cov", "kl_cov"):
    out[objective] = _policy(logps, old, adv, mask, entropy, None, key,
                             objective=objective, axis_name=axis_name)
  out["bonus"] = entropo.entropy_bonus(entropy, mask, coef=0.01,
                                       axis_name=axis_name)
  return out


def test_pmap_core_losses_equal_unsharded():
  arrays = (BATCH["adv"], BATCH["logps"], BATCH["old"], BATCH["adv"],
            BATCH["mask"], BATCH["entropy"])
  split = [x.reshape(NUM_DEVICES, B // NUM_DEVICES, T) for x in arrays]
  got = jax.pmap(functools.partial(_core, axis_name=AXIS), axis_name=AXIS,
                 in_axes=(0,) * 6 + (None,))(*split, KEY)
  want = jax.jit(_core)(*arrays, KEY)
  grads = {}
  for objective in ("ppo", "clip_cov", "kl_cov"):
    grads[objective] = np.asarray(got[objective][2]).reshape(B, T)
    got[objective] = got[objective][:2]
    want[objective], grad = want[objective][:2], np.asarray(want[objective][2])
    # entropo's psum has an identity backward pass where JAX cannot see
    # that the summed value varies over the axis (pmap), so each device's
    # gradient is exactly the single-device one for its tokens. The same
    # tokens get zero gradient: Clip-Cov/KL-Cov choose the same ones.
    np.testing.assert_array_equal(grads[objective] == 0, grad == 0)
    np.testing.assert_allclose(grads[objective], grad,
                               rtol=RTOL, atol=ATOL * np.abs(grad).max())
  for d in range(NUM_DEVICES):
    _assert_trees_close(jax.tree.map(lambda x, d=d: x[d], got), want)
  assert want["clip_cov"][1]["cov/selected_frac"] > 0
  # Clip-Cov's choice is visible only in the gradient (the value is kept).
  assert np.sum((grads["ppo"] != 0) & (grads["clip_cov"] == 0)) > 0


@pytest.mark.parametrize("objective", ["ppo", "kl_cov"])
def test_policy_loss_gradients_exact_without_vma_checks(objective):
  # With check_vma=False JAX cannot tell that a summed value varies over the
  # axis and would transpose psum to psum (gradients x 8); entropo's psum
  # gives the single-device gradients there too.
  sharded = jax.jit(jax.shard_map(
      functools.partial(_policy, objective=objective, axis_name=AXIS),
      mesh=MESH, in_specs=_POLICY_SPECS, out_specs=(P(), P(), P(AXIS)),
      check_vma=False))
  _, unsharded = _policy_fns(objective)
  _assert_trees_close(sharded(*_policy_args()), unsharded(*_policy_args()))
