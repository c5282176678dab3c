"""Tests for entropo/models/inflight.py: in-flight batching.

For a fixed key, `sample_in_flight` must give `sample`'s tokens, masks and
lengths exactly, and its log-probs and entropies to float32 rounding: the
rows' forward passes run in batches of other shapes (the slots, the refill
chunks), whose matmuls and reductions may round differently. 2e-5 is the
bound the multi-turn sampler is held to against `sample` (tests/
test_agents.py) for the same reason: logits of these models stay within
about +-6, and float32 carries ~7 digits through two layers. Measured here:
about 1.5e-6.

All tests share one model and one prompt batch (more prompts than slots),
so each setting compiles once.
"""

import jax
import numpy as np
import pytest

from entropo.models import sample
from entropo.models import sampler as sampler_lib
from entropo.models.inflight import sample_in_flight
from tests import hf_models

VOCAB = 97
BATCH, WIDTH, N = 12, 7, 20
EOS, STOP = 3, 40  # STOP stands for a stop string's token id
ATOL = 2e-5  # float32 rounding (module docstring)


@pytest.fixture(scope="module")
def model():
  return hf_models.entropo_model("llama", std=0.5)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, VOCAB, (BATCH, WIDTH))
  mask = np.ones((BATCH, WIDTH), bool)
  for i in range(BATCH):  # lengths 1..7, padded left, right or both
    n = 1 + i % WIDTH
    start = [0, WIDTH - n, (WIDTH - n) // 2][i % 3]
    mask[i] = False
    mask[i, start:start + n] = True
  return tokens, mask


KW = dict(key=jax.random.key(3), max_new_tokens=N, eos_id=[EOS, 11, STOP],
          top_p=0.95)


@pytest.fixture(scope="module")
def static(model, prompts):
  return sample(model, *prompts, **KW)


def _assert_same(a, b):
  for name in ("tokens", "prompt_mask", "completion_mask", "lengths"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name),
                                  err_msg=name)
  for name in ("logps", "processed_logps", "entropy"):
    np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0,
                               atol=ATOL, err_msg=name)


@pytest.mark.parametrize("slots, refill_rows, steps", [
    (3, 1, 4),  # refills one row at a time, every 4 steps
    (5, 2, 1),  # refills after every step
    (12, 12, 16),  # a slot per prompt: one prefill, like the static batch
])
def test_in_flight_equals_static(model, prompts, static, slots, refill_rows,
                                 steps):
  got, stats = sample_in_flight(model, *prompts, slots=slots,
                                refill_rows=refill_rows,
                                steps_per_check=steps, return_stats=True,
                                **KW)
  _assert_same(static, got)
  # The rows end in all three ways, at different steps.
  comp, toks = np.asarray(got.completion_mask), np.asarray(got.tokens)
  lengths = np.asarray(got.lengths)
  last = toks[np.arange(BATCH), WIDTH + lengths - 1]
  assert (last == EOS).any() and (last == STOP).any() and (lengths == N).any()
  assert len(set(lengths.tolist())) > 4
  assert comp.sum() == lengths.sum()
  # One compiled call; every prompt prefilled once; the loop's counts.
  assert stats.host_calls == 1 and stats.prefill_rows == BATCH
  assert stats.decode_steps == stats.trips * steps
  assert -(-BATCH // slots) <= stats.prefills <= BATCH
  if slots < BATCH:  # slots are refilled: fewer steps than B / S waves
    assert stats.decode_steps < -(-BATCH // slots) * N + steps


def test_endings_and_padding(model, prompts, static):
  # A row stops at its first EOS or stop id (kept), or after N tokens; the
  # slots after it hold the pad id (the first EOS id) with zero log-probs.
  got = sample_in_flight(model, *prompts, slots=4, **KW)
  toks, comp = np.asarray(got.tokens), np.asarray(got.completion_mask)
  for i in range(BATCH):
    n = int(got.lengths[i])
    np.testing.assert_array_equal(comp[i, WIDTH:], np.arange(N) < n)
    gen = toks[i, WIDTH:WIDTH + n]
    ends = np.isin(gen, KW["eos_id"])
    assert not ends[:-1].any() and (ends[-1] or n == N)
    assert (toks[i, WIDTH + n:] == EOS).all()
    for field in (got.logps, got.processed_logps, got.entropy):
      assert (np.asarray(field[i])[~comp[i]] == 0).all()
  _assert_same(static, got)


def test_row_budgets_end_rows_by_length(model, prompts):
  limits = np.random.default_rng(2).integers(1, N + 1, BATCH)
  kw = dict(KW, eos_id=None, row_max_new_tokens=limits)
  a = sample(model, *prompts, **kw)
  b = sample_in_flight(model, *prompts, slots=5, refill_rows=2, **kw)
  np.testing.assert_array_equal(a.lengths, limits)
  _assert_same(a, b)


def test_a_samples_tokens_do_not_depend_on_its_batch(model, prompts, static):
  # Rows 2, 7 and 9 alone, under their identities in the full batch.
  rows = np.array([9, 2, 7])
  sub = sample(model, prompts[0][rows], prompts[1][rows], sample_ids=rows,
               **KW)
  for k, r in enumerate(rows):
    np.testing.assert_array_equal(sub.tokens[k], static.tokens[r])
  # Without the identities the rows draw other streams.
  other = sample(model, prompts[0][rows], prompts[1][rows], **KW)
  assert not np.array_equal(other.tokens, sub.tokens)


def test_more_slots_than_prompts(model, prompts, static):
  # An evaluation batch smaller than the trainer's slots: a slot per row.
  rows = np.arange(3)
  got = sample_in_flight(model, prompts[0][rows], prompts[1][rows], slots=8,
                         refill_rows=4, **KW)
  for name in ("tokens", "completion_mask"):
    np.testing.assert_array_equal(getattr(got, name),
                                  np.asarray(getattr(static, name))[rows])


def test_greedy_equals_static(model, prompts):
  kw = dict(KW, temperature=0.0)
  _assert_same(sample(model, *prompts, **kw),
               sample_in_flight(model, *prompts, slots=3, **kw))


@pytest.mark.parametrize("kwargs, match", [
    (dict(slots=0), "slots must be a positive int"),
    (dict(slots=2.0), "slots must be a positive int"),
    (dict(slots=4, refill_rows=5), r"refill_rows must be an int in \[1, "),
    (dict(slots=4, refill_rows=0), "refill_rows"),
    (dict(slots=4, sample_ids=np.arange(3)), "sample_ids must be"),
    (dict(slots=4, row_max_new_tokens=np.full(BATCH, N + 1)),
     "row_max_new_tokens must be in"),
])
def test_bad_arguments(model, prompts, kwargs, match):
  with pytest.raises(ValueError, match=match):
    sample_in_flight(model, *prompts, **{**KW, **kwargs})


def test_step_keys_are_per_row_and_step():
  keys = sampler_lib.row_keys(jax.random.key(0), np.arange(3, dtype=np.int32))
  a = jax.random.key_data(sampler_lib.step_keys(keys, 5))
  b = jax.random.key_data(sampler_lib.step_keys(keys[1:2], 5))
  np.testing.assert_array_equal(a[1:2], b)
  want = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 2), 5)
  np.testing.assert_array_equal(a[2], jax.random.key_data(want))


def _ulps(x, k: int) -> float:
  """k float32 spacings at the largest magnitude of `x`."""
  return k * float(np.spacing(np.abs(np.asarray(x, np.float32)).max()))


def test_per_row_cache_index_equals_each_row_alone(model):
  # Rows written at their own slots (a [B] cache_index, [B, T] query
  # slots) compute what each row computes alone at a scalar index, to
  # float32 rounding: the batch of 3 and the single row are different
  # programs, whose dot kernels may order or fuse their multiply-adds
  # differently, which moves a sum of n products by up to about n float32
  # spacings of its magnitude (n = 48, the model's longest reduction).
  # Measured: bitwise equal at XLA:CPU's default optimisation level; at the
  # suite's level 0 (conftest) the decode step differs in 1 of 96 entries by
  # 9 spacings (1.07e-6 at 1.65). A wrong slot or mask differs by orders
  # more.
  rng = np.random.default_rng(4)
  tokens = rng.integers(0, VOCAB, (3, 4))
  index = np.array([0, 5, 9])
  cache = model.init_cache(3, 16)
  hidden, new = model(jax.numpy.asarray(tokens), cache=cache,
                      cache_index=jax.numpy.asarray(index))
  for b in range(3):
    alone, one = model(jax.numpy.asarray(tokens[b:b + 1]),
                       cache=model.init_cache(1, 16), cache_index=int(index[b]))
    np.testing.assert_allclose(hidden[b], alone[0], rtol=0,
                               atol=_ulps(hidden, 48))
    np.testing.assert_array_equal(new["valid"][b], one["valid"][0])
    np.testing.assert_array_equal(new["k"][0][b], one["k"][0][0])
  # A decode step per row at different slots, after those prefills.
  step, _ = model(jax.numpy.asarray(tokens[:, :1]), cache=new,
                  cache_index=jax.numpy.asarray(index + 4))
  for b in range(3):
    _, one = model(jax.numpy.asarray(tokens[b:b + 1]),
                   cache=model.init_cache(1, 16), cache_index=int(index[b]))
    alone, _ = model(jax.numpy.asarray(tokens[b:b + 1, :1]), cache=one,
                     cache_index=int(index[b]) + 4)
    np.testing.assert_allclose(step[b], alone[0], rtol=0,
                               atol=_ulps(step, 48))


@pytest.mark.parametrize("impl, t", [("reference", 2), ("blockwise", 2),
                                     ("blockwise", 1)])  # 1: the decode loop
def test_attention_takes_query_slots_per_row(impl, t):
  from entropo import precision  # pylint: disable=g-import-not-at-top
  from entropo.models import attention  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  b, kv, g, hd, s = 3, 2, 2, 8, 12
  q = jax.numpy.asarray(rng.normal(size=(b, t, kv, g, hd)), np.float32)
  k, v = (jax.numpy.asarray(rng.normal(size=(b, kv, s, hd)), np.float32)
          for _ in range(2))
  valid = jax.numpy.asarray(rng.random((b, s)) < 0.8)
  slots = np.array([[3, 4], [7, 8], [10, 11]])[:, :t]
  fp32 = precision.get_precision("fp32")
  got = attention.attend(q, k, v, valid, jax.numpy.asarray(slots),
                         precision=fp32, implementation=impl, chunk_size=4)
  for r in range(b):
    want = attention.attend(q[r:r + 1], k[r:r + 1], v[r:r + 1],
                            valid[r:r + 1], jax.numpy.asarray(slots[r]),
                            precision=fp32, implementation=impl, chunk_size=4)
    np.testing.assert_allclose(got[r], want[0], rtol=0, atol=1e-6)
