"""Tests for entropo/models/sampler.py: sample().

Greedy decoding is checked token for token against `transformers`
`generate` on tiny random Llama / Qwen2 / Qwen3 models; sampled log-probs
against the trainer's recomputation (float32, 1e-5) and against float64
NumPy references of the truncated distributions; sampling frequencies
against softmax probabilities; bad arguments against their error messages.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import entropo
from entropo import sharding
from entropo.models import sample
from entropo.models import sampler as sampler_lib
from tests import hf_models
from tests.reference import sampling as ref

# Greedy parity uses weights of std 1.0: peaked, well-separated logits
# (entropy ~1 nat, top-2 gaps >= 0.05 on these prompts), so no argmax is
# decided by float32 rounding. The log-prob tests use std 0.5 (|logits| <= 6,
# entropy ~3.7 nats): at std 1.0 the logits reach ~25 and float32 rounding in
# the model body (cached single-token steps vs the trainer's full-sequence
# matmuls) alone moves log-probs by up to ~4e-5; the head is bitwise shared.
GREEDY_STD = 1.0
STD = 0.5
VOCAB = 97


@pytest.fixture(scope="module")
def hf_llama():
  return hf_models.hf_model("llama", std=GREEDY_STD)


@pytest.fixture(scope="module")
def model():
  return hf_models.entropo_model("llama", std=STD)


def _prompts(rng, batch=6, width=7):
  """Prompts of different lengths, padded on the left, right and both."""
  tokens = rng.integers(0, VOCAB, (batch, width))
  mask = np.ones((batch, width), bool)
  lengths = [width, 3, 5, 1, 6, 2, 4, 7][:batch]
  for i, n in enumerate(lengths):
    mask[i] = False
    start = {0: 0, 1: width - n, 2: (width - n) // 2}[i % 3]
    mask[i, start:start + n] = True
  return tokens, mask


def _trainer_logps(model, result):
  """The trainer's recomputation, aligned with `result.tokens`: `[B, T]`."""
  hidden = model(result.tokens, attention_mask=result.attention_mask)
  logps, _ = entropo.fused_logprobs_entropy(
      hidden[:, :-1], model.lm_head_matrix(), result.tokens[:, 1:],
      precision=model.precision)
  return jnp.pad(logps, ((0, 0), (1, 0)))


def _ref_logits(model, result):
  """Float64 logits predicting each slot of `result.tokens`: `[B, T, V]`."""
  logits = np.asarray(
      model.logits(result.tokens, attention_mask=result.attention_mask),
      np.float64)
  return np.pad(logits[:, :-1], ((0, 0), (1, 0), (0, 0)))


def _completion(result, i, width):
  mask = np.asarray(result.completion_mask[i, width:])
  return np.asarray(result.tokens[i, width:])[mask]


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_greedy_matches_transformers(family, rng):
  torch = pytest.importorskip("torch", reason=hf_models.SKIP_REASON)

  hf = hf_models.hf_model(family, std=GREEDY_STD)
  model = hf_models.to_entropo(hf)
  tokens, mask = _prompts(rng, batch=5)
  n = 12
  result = sample(model, tokens, mask, key=jax.random.key(0),
                  max_new_tokens=n, temperature=0.0)
  width = tokens.shape[1]
  assert result.tokens.shape == (5, width + n)
  assert np.asarray(result.completion_mask[:, width:]).all()
  distinct = set()
  for i in range(len(tokens)):
    prompt = tokens[i][mask[i]]
    with torch.no_grad():
      out = hf.generate(
          torch.tensor(prompt[None]),
          attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
          do_sample=False, max_new_tokens=n, eos_token_id=None,
          pad_token_id=0)
    expected = out.numpy()[0, len(prompt):]
    got = _completion(result, i, width)
    np.testing.assert_array_equal(got, expected, err_msg=f"row {i}")
    distinct.update(got.tolist())
  assert len(distinct) >= 10, distinct  # not a degenerate repetition


def test_greedy_eos_matches_transformers(hf_llama, rng):
  import torch  # pylint: disable=g-import-not-at-top

  model = hf_models.to_entropo(hf_llama)
  tokens, mask = _prompts(rng, batch=3)
  width, n = tokens.shape[1], 12
  free = sample(model, tokens, mask, key=jax.random.key(0),
                max_new_tokens=n, temperature=0.0)
  gen = np.asarray(free.tokens[0, width:]).tolist()
  stop = next(k for k in range(2, n) if gen[k] not in gen[:k])
  eos = gen[stop]  # row 0 stops at its (stop + 1)-th token
  result = sample(model, tokens, mask, key=jax.random.key(0),
                  max_new_tokens=n, temperature=0.0, eos_id=eos)
  for i in range(len(tokens)):
    prompt = tokens[i][mask[i]]
    with torch.no_grad():
      out = hf_llama.generate(
          torch.tensor(prompt[None]),
          attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
          do_sample=False, max_new_tokens=n, eos_token_id=eos,
          pad_token_id=eos)
    expected = out.numpy()[0, len(prompt):]
    if eos in expected.tolist():
      expected = expected[:expected.tolist().index(eos) + 1]
    np.testing.assert_array_equal(_completion(result, i, width), expected,
                                  err_msg=f"row {i}")
  # Row 0 stopped at the EOS: the rest is padding, masked, zero.
  length = stop + 1
  comp = np.asarray(result.completion_mask[0, width:])
  np.testing.assert_array_equal(comp, np.arange(n) < length)
  assert int(result.lengths[0]) == length
  assert (np.asarray(result.tokens[0, width + length:]) == eos).all()
  for field in (result.logps, result.entropy):
    assert (np.asarray(field[0, width + length:]) == 0).all()
    assert (np.asarray(field[0, width:width + length]) != 0).all()


def test_eos_stops_rows_when_sampling(model, rng):
  tokens, mask = _prompts(rng)
  width, n = tokens.shape[1], 10
  free = sample(model, tokens, mask, key=jax.random.key(3), max_new_tokens=n)
  row0 = np.asarray(free.tokens[0, width:]).tolist()
  eos = [row0[2], int(free.tokens[1, width + 5])]
  result = sample(model, tokens, mask, key=jax.random.key(3),
                  max_new_tokens=n, eos_id=eos)
  comp = np.asarray(result.completion_mask)
  toks = np.asarray(result.tokens)
  for i in range(len(tokens)):
    c = comp[i, width:]
    length = int(c.sum())
    assert int(result.lengths[i]) == length
    np.testing.assert_array_equal(c, np.arange(n) < length)  # a prefix
    gen = toks[i, width:width + length]
    ends = np.isin(gen, eos)
    # Stopped exactly at the first EOS, or ran to max_new_tokens.
    assert not ends[:-1].any()
    assert ends[-1] or length == n
    assert (toks[i, width + length:] == eos[0]).all()
    assert (np.asarray(result.logps[i])[~comp[i]] == 0).all()
    assert (np.asarray(result.processed_logps[i])[~comp[i]] == 0).all()
  # Row 0 makes the same draws until it stops at its first EOS.
  first = min(k for k in range(n) if row0[k] in eos)
  assert int(result.lengths[0]) == first + 1
  np.testing.assert_array_equal(toks[0, :width + first + 1],
                                free.tokens[0, :width + first + 1])


@pytest.mark.parametrize("steps_per_check", [4, 7, 64])
def test_steps_per_check_changes_no_output(model, rng, steps_per_check):
  # Blocks that divide the steps, that overshoot them (7 does not divide
  # 12 - 1), and one longer than the whole run; rows stop at EOS at
  # different steps, so the last blocks run past some rows' ends.
  tokens, mask = _prompts(rng)
  kw = dict(key=jax.random.key(3), max_new_tokens=12, eos_id=[3, 11, 40])
  every = sample(model, tokens, mask, steps_per_check=1, **kw)
  assert len(set(np.asarray(every.lengths).tolist())) > 1
  blocked = sample(model, tokens, mask, steps_per_check=steps_per_check,
                   **kw)
  for name, a, b in zip(every._fields, every, blocked):
    assert a.shape == b.shape, name
    np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("steps, most, block", [
    (255, 16, 16), (100, 16, 15), (11, 4, 4), (11, 16, 11), (0, 16, 1),
    (5, 1, 1)])
def test_block_length_overshoots_less_than_a_step_per_block(steps, most,
                                                            block):
  got = sampler_lib._block_length(steps, most)
  assert got == block and got <= most
  blocks = -(-steps // got)
  assert blocks * got - steps < max(blocks, 1)


def test_prompt_layout(model, rng):
  tokens, mask = _prompts(rng)
  width, n = tokens.shape[1], 10
  result = sample(model, tokens, mask, key=jax.random.key(0),
                  max_new_tokens=n)
  pm = np.asarray(result.prompt_mask)
  slots = np.arange(width + n)
  for i in range(len(tokens)):
    # Prompts end at slot P - 1 (left padding), tokens in their order.
    first = width - mask[i].sum()
    np.testing.assert_array_equal(pm[i], (slots >= first) & (slots < width))
    np.testing.assert_array_equal(np.asarray(result.tokens[i])[pm[i]],
                                  tokens[i][mask[i]])
  assert not (pm & np.asarray(result.completion_mask)).any()
  # Left-padded, right-padded or any padding: the same result.
  order = np.argsort(mask, axis=1, kind="stable")
  left = sample(model, np.take_along_axis(tokens, order, 1),
                np.take_along_axis(mask, order, 1).astype(np.int32),
                key=jax.random.key(0), max_new_tokens=n)
  for a, b in zip(result, left):
    np.testing.assert_array_equal(a, b)


def test_deterministic_per_key(model, rng):
  tokens, mask = _prompts(rng)
  run = lambda key: sample(model, tokens, mask, key=key, max_new_tokens=10,
                           top_k=20, top_p=0.95)
  a, b = run(jax.random.key(7)), run(jax.random.key(7))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  c = run(jax.random.key(8))
  assert not np.array_equal(a.tokens, c.tokens)
  # A raw uint32 key is the same key.
  d = run(jax.random.PRNGKey(7))
  np.testing.assert_array_equal(a.tokens, d.tokens)


@pytest.mark.multidevice
def test_batch_sharded_prompts_stay_sharded(model, rng):
  # As the trainer passes them: on a mesh, the batch split over devices.
  tokens, mask = _prompts(rng)
  mesh = sharding.make_mesh(data=2, devices=jax.devices()[:2])
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))  # noqa
  run = lambda t, m: sample(model, t, m, key=jax.random.key(3),
                            max_new_tokens=10)
  placed, plain = run(put(tokens), put(mask)), run(tokens, mask)
  assert placed.tokens.sharding.is_equivalent_to(
      sharding.batch_sharding(mesh), 2)
  np.testing.assert_array_equal(placed.tokens, plain.tokens)
  np.testing.assert_allclose(placed.logps, plain.logps, rtol=1e-6,
                             atol=1e-6)


def test_steps_draw_fresh_noise(rng):
  # A zero final norm makes every step's logits 0: uniform and independent of
  # the context, so only the key decides. Reusing one key across steps would
  # repeat each row's first token forever.
  model = hf_models.entropo_model("llama", std=STD)
  model.norm.scale[...] = jnp.zeros_like(model.norm.scale[...])
  tokens, mask = _prompts(rng)
  result = sample(model, tokens, mask, key=jax.random.key(0),
                  max_new_tokens=10)
  toks = np.asarray(result.tokens[:, tokens.shape[1]:])
  assert np.mean(toks[:, 1:] == toks[:, :-1]) < 0.1  # 1/97 expected
  assert len(np.unique(toks)) > 30
  assert (np.asarray(result.processed_logps)[result.completion_mask]
          == pytest.approx(-np.log(VOCAB), abs=1e-5))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_float32_logps_equal_trainer(family, rng):
  model = hf_models.entropo_model(family, std=STD)
  tokens, mask = _prompts(rng)
  result = sample(model, tokens, mask, key=jax.random.key(1),
                  max_new_tokens=10)
  comp = np.asarray(result.completion_mask)
  assert comp.sum() == 6 * 10
  trainer = np.asarray(_trainer_logps(model, result))
  logps = np.asarray(result.logps)
  np.testing.assert_allclose(logps[comp], trainer[comp], atol=1e-5, rtol=0)
  # T = 1, no truncation: the sampled distribution is the policy.
  np.testing.assert_allclose(result.processed_logps, result.logps, atol=1e-6)
  # The entropy is the trainer's full-vocabulary entropy, too.
  z = _ref_logits(model, result)
  p = np.exp(ref.log_softmax(z))
  ent = -np.sum(p * ref.log_softmax(z), axis=-1)
  np.testing.assert_allclose(np.asarray(result.entropy)[comp], ent[comp],
                             atol=1e-5)


def test_cache_equals_recompute(model, rng):
  tokens, mask = _prompts(rng)
  kw = dict(key=jax.random.key(2), max_new_tokens=10, temperature=0.8,
            top_k=30, top_p=0.9)
  cached = sample(model, tokens, mask, **kw)
  full = sample(model, tokens, mask, use_cache=False, **kw)
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_array_equal(cached.completion_mask, full.completion_mask)
  for a, b in [(cached.logps, full.logps),
               (cached.processed_logps, full.processed_logps)]:
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 5, None), (0.7, 12, None), (1.0, None, 0.6), (1.3, None, 0.9),
     (0.8, 10, 0.7), (1.0, VOCAB, 1.0)],
)
def test_truncated_logps(model, rng, temperature, top_k, top_p):
  tokens, mask = _prompts(rng)
  result = sample(model, tokens, mask, key=jax.random.key(4),
                  max_new_tokens=10, temperature=temperature, top_k=top_k,
                  top_p=top_p)
  z = _ref_logits(model, result)
  comp = np.asarray(result.completion_mask)
  toks = np.asarray(result.tokens)
  logps = np.asarray(result.logps)
  processed = np.asarray(result.processed_logps)
  trainer = np.asarray(_trainer_logps(model, result))
  support = []
  for b, t in zip(*np.nonzero(comp)):
    keep, logq = ref.support(z[b, t], temperature=temperature, top_k=top_k,
                              top_p=top_p)
    assert keep[toks[b, t]], (b, t)  # the sampled token is in the support
    np.testing.assert_allclose(processed[b, t], logq[toks[b, t]], atol=2e-5)
    # The untruncated temperature-1 log-prob is the trainer's.
    np.testing.assert_allclose(logps[b, t], trainer[b, t], atol=1e-5)
    np.testing.assert_allclose(
        logps[b, t], ref.log_softmax(z[b, t])[toks[b, t]], atol=2e-5)
    support.append(keep.sum())
  if top_k is not None and top_k < VOCAB:
    assert max(support) <= top_k
  if top_p is not None and top_p < 1:
    assert min(support) < VOCAB
  if temperature == 1.0 and top_p in (None, 1.0) and top_k in (None, VOCAB):
    np.testing.assert_allclose(processed, logps, atol=1e-6)
  elif temperature == 1.0:
    # log q = log pi - log S with S <= 1, the kept policy mass.
    assert (processed[comp] >= logps[comp] - 1e-6).all()


def test_greedy_processed_logps_are_zero(model, rng):
  tokens, mask = _prompts(rng)
  result = sample(model, tokens, mask, key=jax.random.key(0),
                  max_new_tokens=10, temperature=0.0, top_k=3, top_p=0.5)
  assert (np.asarray(result.processed_logps) == 0).all()
  z = _ref_logits(model, result)
  comp = np.asarray(result.completion_mask)
  np.testing.assert_array_equal(np.asarray(result.tokens)[comp],
                                z.argmax(-1)[comp])


def _one_token_counts(model, rng, num, **kwargs):
  prompt = rng.integers(0, VOCAB, (1, 5))
  tokens = np.repeat(prompt, num, axis=0)
  result = sample(model, tokens, np.ones_like(tokens, bool),
                  key=jax.random.key(11), max_new_tokens=1, **kwargs)
  z = np.asarray(model.logits(prompt), np.float64)[0, -1]
  drawn = np.asarray(result.tokens[:, -1])
  return z, np.bincount(drawn, minlength=VOCAB), result


def _chi2_pvalue(counts, probs):
  """Pearson chi-square p-value; bins with expected < 5 pooled."""
  expected = probs * counts.sum()
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  stat = np.sum((obs - exp) ** 2 / exp)
  return scipy.stats.chi2.sf(stat, len(obs) - 1)


@pytest.mark.parametrize(
    "kwargs", [{}, {"temperature": 2.0}, {"top_k": 6, "temperature": 0.7},
               {"top_p": 0.8}])
def test_sampling_frequencies_match_probabilities(model, rng, kwargs):
  num = 20000
  z, counts, result = _one_token_counts(model, rng, num, **kwargs)
  keep, logq = ref.support(
      z, temperature=kwargs.get("temperature", 1.0),
      top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"))
  probs = np.exp(logq)
  assert counts[~keep].sum() == 0
  assert _chi2_pvalue(counts, probs) > 1e-3
  # A sampler that ignored the logits would fail the same test.
  uniform = keep / keep.sum()
  assert _chi2_pvalue(counts, uniform) < 1e-6
  np.testing.assert_allclose(result.processed_logps[:, -1],
                             logq[np.asarray(result.tokens[:, -1])],
                             atol=2e-5)


def test_bf16_mismatch_is_measured(rng, capsys):
  fp32 = hf_models.entropo_model("qwen3", std=STD)
  bf16 = hf_models.entropo_model("qwen3", std=STD, precision="bf16")
  tokens, mask = _prompts(rng, batch=8)
  result = sample(bf16, tokens, mask, key=jax.random.key(5),
                  max_new_tokens=16)
  trainer = _trainer_logps(fp32, result)
  metrics = entropo.precision_mismatch(result.logps, trainer,
                                       result.completion_mask)
  metrics = {k: float(v) for k, v in metrics.items()}
  with capsys.disabled():
    print("\nbf16 sampler vs float32 trainer:",
          {k: round(v, 5) for k, v in metrics.items()})
  assert all(np.isfinite(v) for v in metrics.values())
  assert metrics["mismatch/max_abs_diff"] > 1e-3  # bf16 rounding is visible
  assert metrics["mismatch/abs_diff_mean"] > 0
  # bf16 log-probs are bf16-rounded (8 significant bits).
  lp = np.asarray(result.logps)
  np.testing.assert_array_equal(
      lp, np.asarray(jnp.asarray(lp).astype(jnp.bfloat16).astype(jnp.float32)))


def test_max_new_tokens_may_fill_the_context(model, rng):
  context = model.config.max_position_embeddings
  tokens = rng.integers(0, VOCAB, (2, 10))
  mask = np.ones_like(tokens, bool)
  mask[1, :4] = False
  result = sample(model, tokens, mask, key=jax.random.key(0),
                  max_new_tokens=context - 10, temperature=0.0)
  assert result.tokens.shape == (2, context)


def _bad_cases():
  tokens = np.zeros((2, 4), np.int32)
  mask = np.ones((2, 4), bool)
  empty = mask.copy()
  empty[1] = False
  long_tokens = np.zeros((1, 65), np.int32)
  oov = tokens.copy()
  oov[0, 2] = VOCAB
  padded_oov = oov.copy()
  padded_mask = mask.copy()
  padded_mask[0, 2] = False  # out-of-vocabulary padding is fine
  return [
      (dict(prompt_mask=empty), r"Empty prompt.*row\(s\) 1"),
      (dict(prompt_tokens=tokens[:, :0], prompt_mask=mask[:, :0]),
       r"empty.*\(2, 0\)"),
      (dict(prompt_tokens=long_tokens, prompt_mask=long_tokens == 0),
       r"65 tokens.*context of 64"),
      (dict(max_new_tokens=61), r"max_new_tokens=61.*overflow.*4 \+ 61 > 64"),
      (dict(max_new_tokens=0), r"max_new_tokens must be a positive int; got 0"),
      (dict(max_new_tokens=2.0), r"max_new_tokens.*got 2.0"),
      (dict(eos_id=VOCAB), rf"eos_id {VOCAB} is outside.*\[0, {VOCAB}\)"),
      (dict(eos_id=-1), r"eos_id -1 is outside"),
      (dict(eos_id=[1, 200]), r"eos_id 200 is outside"),
      (dict(eos_id="2"), r"eos_id must be.*'2'"),
      (dict(top_p=0.0), r"top_p must be None or in \(0, 1\]; got 0.0"),
      (dict(top_p=1.5), r"top_p.*got 1.5"),
      (dict(top_p=float("nan")), r"top_p.*got nan"),
      (dict(top_k=0), r"top_k must be None or an int >= 1; got 0"),
      (dict(temperature=-0.5), r"temperature.*got -0.5"),
      (dict(temperature=float("inf")), r"temperature.*got inf"),
      (dict(prompt_tokens=oov), rf"prompt_tokens\[0, 2\] = {VOCAB} is outside"),
      (dict(prompt_mask=mask[:, :3]), r"prompt_mask must have the shape"),
      (dict(prompt_tokens=tokens[0], prompt_mask=mask[0]), r"\[B, P\]"),
      (dict(key=3), r"key must be a JAX PRNG key"),
      (dict(steps_per_check=0), r"steps_per_check must be a positive int"),
      (dict(steps_per_check=2.0), r"steps_per_check.*got 2.0"),
  ], (padded_oov, padded_mask)


@pytest.mark.parametrize("index", range(len(_bad_cases()[0])))
def test_bad_inputs_fail_before_compiling(model, monkeypatch, index):
  case, pattern = _bad_cases()[0][index]
  def must_not_compile(*args, **kwargs):
    raise AssertionError("compiled despite bad input")
  monkeypatch.setattr(sampler_lib, "_generate_jit", must_not_compile)
  kwargs = dict(prompt_tokens=np.zeros((2, 4), np.int32),
                prompt_mask=np.ones((2, 4), bool), key=jax.random.key(0),
                max_new_tokens=3)
  kwargs.update(case)
  with pytest.raises(ValueError, match=pattern):
    sample(model, kwargs.pop("prompt_tokens"), kwargs.pop("prompt_mask"),
           **kwargs)


def test_bad_dtypes_raise_type_error(model):
  with pytest.raises(TypeError, match="integer dtype"):
    sample(model, np.zeros((1, 3), np.float32), np.ones((1, 3), bool),
           key=jax.random.key(0), max_new_tokens=2)
  with pytest.raises(TypeError, match="prompt_mask must be bool"):
    sample(model, np.zeros((1, 3), np.int32), np.full((1, 3), 0.5),
           key=jax.random.key(0), max_new_tokens=2)


def test_padding_may_hold_any_id(model):
  (_, (tokens, mask)) = _bad_cases()
  result = sample(model, tokens, mask, key=jax.random.key(0),
                  max_new_tokens=2)
  assert int(result.lengths.min()) == 2


def test_traced_inputs_are_refused(model):
  def f(tokens):
    return sample(model, tokens, jnp.ones(tokens.shape, bool),
                  key=jax.random.key(0), max_new_tokens=2).tokens
  with pytest.raises(ValueError, match=re.escape("outside jax.jit")):
    jax.jit(f)(jnp.zeros((1, 3), jnp.int32))
