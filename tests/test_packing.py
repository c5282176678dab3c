"""Packing (entropo.packing): the plan, pack/unpack, and packed = padded.

The plan and the gathers are checked against the loop-style reference
(tests/reference/packing.py); the update's loss, every metric and the
gradients on packed rows must equal the padded computation to float32
rounding, for every aggregation mode and the objectives whose reductions
are per sequence (GSPO) or over the whole batch (Clip-Cov, KL-Cov), under
jit as the trainer runs them; under the bf16 presets, to bf16 rounding
(twice the padded path's own error against fp32).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import entropo
from entropo import packing
from entropo.models import ModelConfig
from entropo.models import Transformer
from entropo.training import step as step_lib
from entropo.training.algorithm import Algorithm
from tests import training_setup
from tests.reference import packing as ref_packing

CONFIG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     qk_norm=True, family="qwen3", attention="blockwise",
                     attention_chunk_size=8)
PROMPT, LENGTH = 5, 20  # prompt slots (left-padded), whole row


def _rollout(rng, b=8):
  """A padded batch as the rollouts make it: left-padded prompts of 2-5
  tokens, right-padded completions of 0-15 tokens (row 3: none), the loss
  mask on completion targets."""
  prompt_len = rng.integers(2, PROMPT + 1, b)
  completion = np.minimum(rng.lognormal(np.log(4), 0.8, b).astype(int),
                          LENGTH - PROMPT)
  completion[3] = 0
  completion[5] = LENGTH - PROMPT  # one row to the limit
  attention_mask = np.zeros((b, LENGTH), bool)
  mask = np.zeros((b, LENGTH - 1), bool)
  for i in range(b):
    attention_mask[i, PROMPT - prompt_len[i]:PROMPT + completion[i]] = True
    mask[i, PROMPT - 1:PROMPT - 1 + completion[i]] = True
  tokens = rng.integers(1, CONFIG.vocab_size, (b, LENGTH)) * attention_mask
  return tokens.astype(np.int32), attention_mask, mask


def test_first_fit_decreasing():
  bins = packing.first_fit_decreasing([4, 7, 2, 5, 0, 3, 3], 10)
  assert bins == [[1, 5], [3, 0], [6, 2]]  # 7+3, 5+4, 3+2; the 0 nowhere
  for capacity in (10, 16):
    lengths = np.random.default_rng(1).integers(0, 10, 50)
    bins = packing.first_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(
        np.flatnonzero(lengths))
    assert all(lengths[b].sum() <= capacity for b in bins)
    # Every bin but one is more than half full (first fit's invariant).
    assert sum(lengths[b].sum() <= capacity / 2 for b in bins) <= 1
  with pytest.raises(ValueError, match="does not fit a row of 4"):
    packing.first_fit_decreasing([5], 4)


def test_plan_pack_and_unpack_match_the_reference(rng):
  tokens, attention_mask, mask = _rollout(rng)
  attention_mask[7, PROMPT + 1] = False  # a hole: its targets are lost
  mask[7] &= attention_mask[7, :-1] & attention_mask[7, 1:]
  plan = packing.plan(attention_mask, row_tokens=LENGTH, loss_mask=mask)
  bins = packing.first_fit_decreasing(attention_mask.sum(1), LENGTH)
  targets = rng.normal(size=mask.shape)
  want_tokens, want_segments, want_targets = ref_packing.pack(
      attention_mask, tokens, targets, bins, LENGTH, plan.rows)
  np.testing.assert_array_equal(plan.segment_ids, want_segments)
  np.testing.assert_array_equal(
      packing.pack_tokens(jnp.asarray(tokens), plan.source), want_tokens)
  got = packing.pack_targets(jnp.asarray(targets), plan.unpack_index,
                             plan.rows, LENGTH, fill=np.nan)
  np.testing.assert_array_equal(got, want_targets.astype(np.float32))
  back = packing.unpack(jnp.asarray(want_targets, jnp.float32),
                        plan.unpack_index, fill=np.nan)
  want_back = ref_packing.unpack(want_targets, attention_mask, bins, LENGTH)
  np.testing.assert_array_equal(back, want_back.astype(np.float32))
  # Every loss position survives the round trip.
  np.testing.assert_array_equal(np.asarray(back)[mask],
                                targets[mask].astype(np.float32))
  rewards = jnp.arange(8.0)
  seq = packing.pack_sequence_values(rewards, plan.source, LENGTH, fill=-1)
  for r, members in enumerate(bins):
    for s, b in enumerate(sorted(members), start=1):
      assert np.all(np.asarray(seq)[r][plan.segment_ids[r] == s] == b)


def test_plan_checks():
  _, attention_mask, mask = _rollout(np.random.default_rng(0))
  with pytest.raises(ValueError, match="needs .* rows of 20 tokens; rows=1"):
    packing.plan(attention_mask, row_tokens=LENGTH, rows=1)
  attention_mask[0, PROMPT + 1] = False  # a hole under the loss mask
  mask[0, PROMPT:PROMPT + 2] = True
  with pytest.raises(ValueError, match=r"loss_mask\[0, 5\]"):
    packing.plan(attention_mask, row_tokens=LENGTH, loss_mask=mask)
  plan = packing.plan(attention_mask, row_tokens=LENGTH)
  padded = packing.with_rows(plan, plan.rows + 2)
  assert padded.rows == plan.rows + 2
  assert not padded.segment_ids[-2:].any() and (padded.source[-2:] < 0).all()


def test_rows_bucket_and_token_budget_batches():
  assert packing.rows_bucket(3, max_rows=64) == 8
  assert packing.rows_bucket(9, max_rows=64) == 16
  assert packing.rows_bucket(10, max_rows=64, multiple=3) == 18
  assert {packing.rows_bucket(n, max_rows=64) for n in range(1, 65)} == {
      8, 16, 24, 32, 40, 48, 56, 64}
  lengths = np.asarray([5, 9, 2, 2, 7, 1, 8])
  order = np.asarray([6, 0, 1, 2, 3, 4, 5])
  batches = packing.token_budget_batches(lengths, tokens_per_batch=12,
                                         order=order)
  assert [list(b) for b in batches] == [[6], [0], [1, 2], [3, 4, 5]]
  assert all(lengths[b].sum() <= 12 for b in batches)
  np.testing.assert_array_equal(np.concatenate(batches), order)
  with pytest.raises(ValueError, match="exceeds tokens_per_batch=8"):
    packing.token_budget_batches(lengths, tokens_per_batch=8)


# -- packed = padded: the update's loss, metrics and gradients


@functools.cache
def _model_state():
  model = Transformer(CONFIG, precision="fp32", rngs=nnx.Rngs(0))
  return nnx.split(model)


def _batch(rng):
  """A training batch (the pre-update's layout) and its packed form."""
  tokens, attention_mask, mask = _rollout(rng)
  graphdef, params = _model_state()
  logps, _ = jax.jit(lambda p, t, m: step_lib.sequence_logps(
      nnx.merge(graphdef, p), t, m))(params, tokens, attention_mask)
  # Old log-probs off by up to 0.3 nats: ratios clip on both sides.
  old = jnp.where(mask, logps + rng.uniform(-0.3, 0.3, mask.shape), 0.0)
  batch = dict(
      tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attention_mask),
      mask=jnp.asarray(mask), old_logps=old.astype(jnp.float32),
      ref_logps=(old + 0.1).astype(jnp.float32),
      advantages=jnp.asarray(rng.normal(size=mask.shape), jnp.float32),
      importance_weights=jnp.asarray(rng.uniform(0.5, 1.5, mask.shape),
                                     jnp.float32))
  plan = packing.plan(attention_mask, row_tokens=LENGTH, loss_mask=mask)
  assert plan.rows < 8  # the case packs
  plan = packing.with_rows(plan, packing.rows_bucket(plan.rows, max_rows=8))
  packed = {**batch, **{k: jnp.asarray(v) for k, v in plan.arrays().items()}}
  return params, batch, packed


def _learner(algo, batch_rows=None, **algo_fields):
  """A Learner of preset `algo` with `algo_fields` set, and its
  hyperparameters."""
  c = training_setup.tiny_config(algo)
  c.algo.update(**algo_fields)
  algorithm = Algorithm.from_config(c.algo)
  graphdef, _ = _model_state()
  learner = step_lib.Learner(graphdef, algorithm,
                             step_lib.make_optimizer(c.optim),
                             max_new_tokens=LENGTH - PROMPT, group_size=4,
                             batch_rows=batch_rows)
  hyper = algorithm.hyperparameters(algorithm.init_controllers(),
                                    algorithm.fixed_hyperparameters())
  return learner, hyper


def _close(got, want, err_msg, scale=None):
  scale = np.max(np.abs(want)) if scale is None else scale
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6 * max(scale, 1),
                             err_msg=err_msg)


@functools.cache
def _forward_and_pullback():
  """Jitted `(logps, entropy)` of a batch (padded or packed) and the
  pullback of cotangents on them to the parameters: the Learner's loss is
  `algorithm.loss(sequence_logps(...))`, so its gradient is this pullback
  of the loss's gradient in `(logps, entropy)`. Compiled once per layout
  and shared by every objective and aggregation mode."""
  graphdef, _ = _model_state()

  def forward(params, batch):
    keys = step_lib.PACK_KEYS
    packed = {k: batch[k] for k in keys} if keys[0] in batch else None
    return step_lib.sequence_logps(nnx.merge(graphdef, params),
                                   batch["tokens"], batch["attention_mask"],
                                   packing=packed)

  def pullback(params, batch, cotangents):
    _, vjp = jax.vjp(lambda p: forward(p, batch), params)
    return vjp(cotangents)[0]

  return jax.jit(forward), jax.jit(pullback)


@pytest.mark.parametrize("agg", entropo.AGGREGATION_MODES)
@pytest.mark.parametrize("algo", ["grpo", "gspo", "kl_cov", "clip_cov"])
def test_packed_loss_metrics_and_gradients_equal_padded(rng, algo, agg):
  params, batch, packed = _batch(rng)
  learner, hyper = _learner(algo, agg=agg, kl_coef=0.1,
                           entropy_coef=0.01)
  forward, pullback = _forward_and_pullback()
  key = jax.random.key(4)

  def loss(logps, entropy, batch):
    return learner.algorithm.loss(logps, entropy, batch, hyper, key,
                                  norm=learner.norm, precision="fp32")

  loss_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  results = []
  for b in (batch, packed):
    logps, entropy = forward(params, b)
    (value, metrics), cotangents = loss_fn(logps, entropy, b)
    results.append((value, metrics, pullback(params, b, cotangents)))
  (loss, metrics, grads), (p_loss, p_metrics, p_grads) = results
  assert float(loss) != 0.0
  _close(p_loss, loss, "loss")
  assert p_metrics.keys() == metrics.keys()
  for name in metrics:
    _close(p_metrics[name], metrics[name], name)
  flat, p_flat = (jax.tree_util.tree_leaves_with_path(g)
                  for g in (grads, p_grads))
  for (path, want), (_, got) in zip(flat, p_flat):
    _close(got, want, jax.tree_util.keystr(path))


def test_packed_update_equals_padded_update(rng):
  """One optax step of the Learner end to end (its loss picks the packed
  forward from the batch's keys): the same parameters after it."""
  params, batch, packed = _batch(rng)
  learner, hyper = _learner("dapo", agg="token_mean", kl_coef=0.1,
                           entropy_coef=0.01)
  opt_state = learner.optimizer.init(params)
  key = jax.random.key(0)
  new, _, metrics = learner.update(params, opt_state, batch, hyper, key)
  p_new, _, p_metrics = learner.update(params, opt_state, packed, hyper, key)
  _close(p_metrics["grad_norm"], metrics["grad_norm"], "grad_norm")
  for (path, want), (_, got) in zip(jax.tree_util.tree_leaves_with_path(new),
                                    jax.tree_util.tree_leaves_with_path(p_new)):
    _close(got, want, jax.tree_util.keystr(path))


@pytest.mark.parametrize("algo", ["grpo+repo_r", "dr_grpo+repo_d"])
def test_packed_pre_update_equals_padded(rng, algo):
  """The pre-update pass on packed rows: the same advantages (REPO's use
  the log-probs and entropy), old and reference log-probs on the loss
  mask, and the same metrics."""
  params, batch, packed = _batch(rng)
  learner, hyper = _learner(algo, kl_coef=0.1)
  hyper["zeta"] = np.float32(0.5)
  mask = batch["mask"]
  args = (params, params, batch["tokens"], batch["attention_mask"], mask,
          batch["old_logps"], jnp.asarray([1.0, 0, 0, 1, 0, 1, 1, 0]), hyper,
          None)
  want, want_metrics = learner.pre_update(*args)
  got, got_metrics = learner.pre_update(
      *args, {k: packed[k] for k in step_lib.PACK_KEYS})
  for name in ("advantages", "old_logps", "ref_logps",
               "importance_weights"):
    _close(np.asarray(got[name])[np.asarray(mask)],
           np.asarray(want[name])[np.asarray(mask)], name)
  assert got_metrics.keys() == want_metrics.keys()
  for name in want_metrics:
    _close(got_metrics[name], want_metrics[name], name)


# -- packed = padded under the bf16 presets


@functools.cache
def _precision_learner(preset):
  """A GRPO Learner (token_mean, KL and entropy terms) whose model runs
  under `preset`, the same float32 parameters as `_model_state`'s, and its
  jitted loss-and-gradient (XLA:CPU runs the bf16 backward's transposed
  dots only inside jit)."""
  c = training_setup.tiny_config("grpo")
  c.algo.update(agg="token_mean", kl_coef=0.1, entropy_coef=0.01)
  algorithm = Algorithm.from_config(c.algo)
  graphdef, _ = nnx.split(Transformer(CONFIG, precision=preset,
                                      rngs=nnx.Rngs(0)))
  learner = step_lib.Learner(graphdef, algorithm,
                             step_lib.make_optimizer(c.optim),
                             max_new_tokens=LENGTH - PROMPT, group_size=4)
  hyper = algorithm.hyperparameters(algorithm.init_controllers(),
                                    algorithm.fixed_hyperparameters())

  def forward(params, batch):
    keys = step_lib.PACK_KEYS
    packed = {k: batch[k] for k in keys} if keys[0] in batch else None
    return step_lib.sequence_logps(
        nnx.merge(graphdef, params), batch["tokens"],
        batch["attention_mask"], packing=packed)

  grad = jax.jit(jax.value_and_grad(
      lambda p, b: learner.loss(p, b, hyper, jax.random.key(4)),
      has_aux=True))
  return jax.jit(forward), grad


@pytest.mark.parametrize("preset", ["bf16", "bf16_fp32_head",
                                    "bf16_fp32_logits"])
def test_packed_equals_padded_to_bf16_rounding(rng, preset):
  """Under a bf16 preset packed and padded are two bf16 computations of
  the same float32 function: each differs from the exact (fp32) values by
  its own bf16 rounding, so they differ from each other by at most twice
  the padded path's own error against fp32 (the triangle inequality; the
  bound the test checks, per quantity and per gradient leaf).

  They are not bit-identical: in fp32 the two layouts already differ by
  ~1e-6 (differently-shaped matmuls and attention blocks reduce in another
  order), and under bf16 such a difference flips the rounding of an
  intermediate activation now and then (one bf16 ulp, 2^-8 relative), which
  propagates like any bf16 rounding: measured here 0.01-0.03 nats per token
  packed vs padded against 0.023-0.025 padded vs fp32, gradients 0.076-0.078
  against 0.072-0.080 (max-abs), i.e. the size of bf16 rounding itself and
  no more (worst ratio to the padded path's own error: 1.25 for the
  log-probs under `bf16`, where 93 % of them are bit-identical, 1.13 for a
  gradient leaf; the bound is 2).
  """
  params, batch, packed = _batch(rng)
  mask = np.asarray(batch["mask"])
  exact_forward, exact_grad = _precision_learner("fp32")
  forward, grad = _precision_learner(preset)
  (exact_loss, _), exact_grads = exact_grad(params, batch)
  exact = [np.asarray(x)[mask] for x in exact_forward(params, batch)]
  padded, packed_ = ([np.asarray(x)[mask] for x in forward(params, b)]
                     for b in (batch, packed))
  for name, want, got, ref in zip(("logps", "entropy"), padded, packed_,
                                  exact):
    error = np.max(np.abs(want - ref))
    assert 0 < error < 0.1, (name, error)  # bf16 rounding, not a bug
    assert np.max(np.abs(got - want)) <= 2 * error, name
  (loss, _), grads = grad(params, batch)
  (p_loss, _), p_grads = grad(params, packed)
  loss_error = abs(float(loss) - float(exact_loss))
  # (The loss is a mean over ~50 tokens: its own rounding error may cancel
  # by chance, so its bound is that of the per-token log-probs.)
  assert abs(float(p_loss) - float(loss)) <= 2 * max(
      loss_error, float(np.max(np.abs(padded[0] - exact[0])))), preset
  for (path, want), (_, got), (_, ref) in zip(
      *(jax.tree_util.tree_leaves_with_path(g)
        for g in (grads, p_grads, exact_grads))):
    error = float(jnp.max(jnp.abs(want - ref)))
    diff = float(jnp.max(jnp.abs(got - want)))
    assert diff <= 2 * error, (jax.tree_util.keystr(path), diff, error)


def test_minibatches_by_tokens_keep_the_constant_normaliser(rng):
  """seq_mean_token_sum_norm divides by the constant B x norm: a Learner
  of minibatches by tokens (`batch_rows`, train.minibatch_tokens) keeps the
  whole batch's B for minibatches of any row count, so the losses of a
  split add up to the whole batch's (every token weighs 1 / (B norm)); a
  row-split Learner divides each by its own rows."""
  params, batch, _ = _batch(rng)
  key = jax.random.key(4)
  split = (np.asarray([0, 3, 5]), np.asarray([1, 2]), np.asarray([4, 6, 7]))
  sums = {}
  for batch_rows in (None, 8):
    learner, hyper = _learner("grpo", batch_rows, kl_coef=0.1,
                              agg="seq_mean_token_sum_norm",
                              entropy_coef=0.01)
    loss = jax.jit(lambda b, learner=learner, hyper=hyper: learner.loss(
        params, b, hyper, key)[0])
    whole = float(loss(batch))
    sums[batch_rows] = sum(float(loss({k: v[rows] for k, v in batch.items()}))
                           for rows in split)
  assert sums[8] == pytest.approx(whole, rel=1e-5)
  assert abs(sums[None] - whole) > 0.1 * abs(whole)


@pytest.mark.parametrize("agg", entropo.AGGREGATION_MODES)
@pytest.mark.parametrize("algo", ["grpo", "gspo", "kl_cov", "clip_cov"])
def test_empty_rows_change_no_loss_metric_or_gradient(rng, algo, agg):
  """The trainer pads a minibatch by tokens with empty rows (no token, no
  loss) to one of 8 row counts: with `batch_rows` set (the constant of
  seq_mean_token_sum_norm stays the batch's), the loss, every metric and
  the cotangents of the real rows' log-probs and entropy (so the
  gradient) are those of the minibatch without them, and the empty rows
  get none."""
  _, batch, _ = _batch(rng)
  learner, hyper = _learner(algo, 8, agg=agg, kl_coef=0.1, entropy_coef=0.01)
  key = jax.random.key(4)
  rows = np.asarray([0, 2, 5, 6, 7])  # a minibatch of 5
  mb = {k: v[rows] for k, v in batch.items()}
  padded = {k: jnp.concatenate([v, jnp.zeros((3,) + v.shape[1:], v.dtype)])
            for k, v in mb.items()}
  rng_logps = rng.normal(-1.0, 0.3, (8, LENGTH - 1)).astype(np.float32)
  logps = jnp.asarray(rng_logps)[rows]
  entropy = jnp.abs(logps)

  def loss(logps, entropy, b):
    norm = learner.norm * learner.batch_rows / b["tokens"].shape[0]
    return learner.algorithm.loss(logps, entropy, b, hyper, key, norm=norm,
                                  precision="fp32")

  loss_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (want, want_metrics), want_cot = loss_fn(logps, entropy, mb)
  pad = lambda x: jnp.concatenate([x, jnp.zeros((3,) + x.shape[1:])])  # noqa
  (got, got_metrics), got_cot = loss_fn(pad(logps), pad(entropy), padded)
  assert float(want) != 0.0
  _close(got, want, "loss")
  assert got_metrics.keys() == want_metrics.keys()
  for name in want_metrics:
    _close(got_metrics[name], want_metrics[name], name)
  for w, g in zip(want_cot, got_cot):
    _close(g[:5], w, "cotangent")
    assert not np.asarray(g[5:]).any()


def test_learners_of_equal_settings_share_their_steps():
  """Learners of equal settings (a resumed run, a study's runs of one
  configuration) share one pair of jitted steps, so the second compiles
  nothing; any setting that changes the program gives its own."""
  learner, _ = _learner("grpo", kl_coef=0.1)
  again, _ = _learner("grpo", kl_coef=0.1)
  assert learner is not again
  assert again.update is learner.update
  assert again.pre_update is learner.pre_update
  for other in (_learner("grpo", kl_coef=0.2)[0],  # the algorithm
                _learner("grpo", 8, kl_coef=0.1)[0]):  # batch_rows
    assert other.update is not learner.update
    assert other.pre_update is not learner.pre_update
  c = training_setup.tiny_config("grpo")
  c.optim.learning_rate *= 2  # the optimizer's settings
  other = step_lib.Learner(learner.graphdef, learner.algorithm,
                           step_lib.make_optimizer(c.optim),
                           max_new_tokens=LENGTH - PROMPT, group_size=4)
  assert other.update is not learner.update
