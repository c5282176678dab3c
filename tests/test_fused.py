"""Tests for entropo/fused.py: fused_logprobs_entropy.

The fused head must return, and differentiate, exactly what the materialised
`token_logprobs(h @ W, t)` / `token_entropy(h @ W)` return, for every chunk
size, without ever holding `[N, V]` logits.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entropo
from tests.reference import logprobs as ref

D, V = 8, 13
# Chunk sizes: 1; 4 and 5 do not divide 13 (a narrower last chunk of 1 and
# 3 columns); 13 = V; 20 > V; the default.
CHUNKS = [1, 4, 5, V, 20, None]


def _inputs(rng, lead, *, d=D, vocab=V, dtype=np.float32, scale=1.0):
  hidden = (rng.standard_normal(lead + (d,)) * scale).astype(dtype)
  lm_head = (rng.standard_normal((d, vocab)) / math.sqrt(d) * 2).astype(dtype)
  targets = rng.integers(0, vocab, lead)
  return hidden, lm_head, targets


def _fused(hidden, lm_head, targets, chunk=None, precision=None):
  kwargs = {} if chunk is None else {"chunk_size": chunk}
  return entropo.fused_logprobs_entropy(hidden, lm_head, targets,
                                        precision=precision, **kwargs)


def _materialised(hidden, lm_head, targets, precision=None):
  precision = entropo.get_precision(precision)
  logits = precision.head_product(jnp.asarray(hidden), jnp.asarray(lm_head))
  return (entropo.token_logprobs(logits, targets, precision=precision),
          entropo.token_entropy(logits, precision=precision))


def _loss(fn, g_lp, g_h):
  """A scalar mixing both outputs with random cotangents."""
  def loss(hidden, lm_head, targets):
    lp, h = fn(hidden, lm_head, targets)
    return jnp.sum(g_lp * lp) + jnp.sum(g_h * h)
  return loss


def _grads(fn, hidden, lm_head, targets, g_lp, g_h):
  """Under `jit`, as the trainer takes them (XLA then rewrites the dots)."""
  return jax.jit(jax.grad(_loss(fn, g_lp, g_h), argnums=(0, 1)))(
      jnp.asarray(hidden), jnp.asarray(lm_head), jnp.asarray(targets))


def _assert_f32_close(actual, expected, scale=1.0):
  """Float32 vs float64 (or vs float32): ~1e-5 of the magnitudes."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  bound = 1e-5 * (np.abs(expected) + scale)
  err = np.abs(actual - expected)
  assert np.all(err <= bound), (err.max(), np.argmax(err - bound))


# Values against the float64 reference and the materialised path.


# Each chunk size with one leading shape, alternating [N] and [B, T].
LEADS = [(11,), (2, 3)]
CHUNK_LEADS = [(c, LEADS[i % 2]) for i, c in enumerate(CHUNKS)]


@pytest.mark.parametrize("chunk,lead", CHUNK_LEADS)
def test_matches_reference_and_materialised(rng, chunk, lead):
  hidden, lm_head, targets = _inputs(rng, lead)
  lp, h = _fused(hidden, lm_head, targets, chunk)
  assert lp.shape == h.shape == lead
  assert lp.dtype == h.dtype == jnp.float32
  logits64 = ref.head_logits(hidden, lm_head)
  _assert_f32_close(lp, ref.token_logprobs(logits64, targets))
  _assert_f32_close(h, ref.token_entropy(logits64))
  mat_lp, mat_h = _materialised(hidden, lm_head, targets)
  _assert_f32_close(lp, mat_lp)
  _assert_f32_close(h, mat_h)


def test_hand_computed_case():
  # One hidden unit: logits = [0, log 3] for the first row, [log 3, 0] for
  # the second (softmax [1/4, 3/4] and [3/4, 1/4]), split into chunks of 1.
  hidden = jnp.array([[1.0], [-1.0]], jnp.float32)
  lm_head = jnp.array([[0.0, math.log(3.0)]], jnp.float32)
  targets = jnp.array([1, 1])
  lp, h = entropo.fused_logprobs_entropy(hidden, lm_head, targets,
                                         chunk_size=1)
  # Row 2 logits are [0, -log 3]: softmax [3/4, 1/4].
  np.testing.assert_allclose(np.asarray(lp), [math.log(0.75), math.log(0.25)],
                             rtol=1e-6)
  h_hand = math.log(4.0) - 0.75 * math.log(3.0)  # 0.5623351...
  np.testing.assert_allclose(np.asarray(h), [h_hand, h_hand], rtol=1e-6)


def test_narrow_last_chunk_counts_every_column_once(rng):
  # V = 10, chunk 4: two full chunks (a scan) and a last chunk of width 2
  # (columns 8 and 9, a separate step). Give the columns around the chunk
  # borders the largest logits and use them (and the last column) as
  # targets: a dropped or doubled column in the sum, the entropy terms, the
  # target logit or the lm_head gradient shows up at O(1).
  d, vocab, n = 4, 10, 6
  hidden = np.abs(rng.standard_normal((n, d))).astype(np.float32) + 0.5
  lm_head = (rng.standard_normal((d, vocab)) * 0.3).astype(np.float32)
  lm_head[:, 7:9] += 1.5
  targets = np.array([7, 8, 7, 8, 9, 0])
  lp, h = entropo.fused_logprobs_entropy(hidden, lm_head, targets,
                                         chunk_size=4)
  logits64 = ref.head_logits(hidden, lm_head)
  _assert_f32_close(lp, ref.token_logprobs(logits64, targets))
  _assert_f32_close(h, ref.token_entropy(logits64))
  g_lp = rng.standard_normal(n).astype(np.float32)
  g_h = rng.standard_normal(n).astype(np.float32)
  dh, dw = _grads(lambda a, b, t: entropo.fused_logprobs_entropy(
      a, b, t, chunk_size=4), hidden, lm_head, targets, g_lp, g_h)
  ref_dh, ref_dw = ref.fused_vjp(hidden, lm_head, targets, g_lp, g_h)
  _assert_f32_close(dh, ref_dh)
  _assert_f32_close(dw, ref_dw)
  # The border and tail columns carry real gradient (so the check bites).
  assert np.abs(ref_dw[:, 7:10]).min() > 1e-2


def test_chunk_size_does_not_change_the_result_beyond_rounding(rng):
  hidden, lm_head, targets = _inputs(rng, (5, 4), vocab=37)
  outs = [_fused(hidden, lm_head, targets, c) for c in (1, 6, 36, 99)]
  for lp, h in outs[1:]:
    _assert_f32_close(lp, outs[0][0])
    _assert_f32_close(h, outs[0][1])


def test_jit_equals_no_jit(rng):
  hidden, lm_head, targets = _inputs(rng, (2, 5))
  for precision in (None, "bf16"):
    eager = _fused(hidden, lm_head, targets, 4, precision)
    jitted = jax.jit(lambda a, b, t, p=precision: _fused(a, b, t, 4, p))(
        hidden, lm_head, targets)
    for x, y in zip(eager, jitted):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6,
                                 atol=1e-6)
  g = np.ones((2, 5), np.float32)
  fn = lambda a, b, t: _fused(a, b, t, 4)  # noqa: E731
  eager = _grads(fn, hidden, lm_head, targets, g, g)
  jitted = jax.jit(jax.grad(_loss(fn, g, g), argnums=(0, 1)))(
      hidden, lm_head, targets)
  for x, y in zip(eager, jitted):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6,
                               atol=1e-6)


# Gradients.


@pytest.mark.parametrize("chunk,lead", [(1, (7,)), (5, (2, 3)), (V, (7,)),
                                        (20, (2, 3))])
def test_gradients_match_materialised_and_reference(rng, chunk, lead):
  hidden, lm_head, targets = _inputs(rng, lead)
  g_lp = rng.standard_normal(lead).astype(np.float32)
  g_h = rng.standard_normal(lead).astype(np.float32)
  fused = lambda a, b, t: _fused(a, b, t, chunk)  # noqa: E731
  dh, dw = _grads(fused, hidden, lm_head, targets, g_lp, g_h)
  assert dh.shape == hidden.shape and dw.shape == lm_head.shape
  assert dh.dtype == dw.dtype == jnp.float32
  mat_dh, mat_dw = _grads(_materialised, hidden, lm_head, targets, g_lp, g_h)
  _assert_f32_close(dh, mat_dh)
  _assert_f32_close(dw, mat_dw)
  ref_dh, ref_dw = ref.fused_vjp(hidden, lm_head, targets, g_lp, g_h)
  _assert_f32_close(dh, ref_dh)
  _assert_f32_close(dw, ref_dw)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("chunk,lead", [(1, (7,)), (5, (2, 3)), (V, (7,))])
def test_frozen_head_skips_the_head_gradient(rng, chunk, lead, precision):
  """`head_grad=False` (LoRA): the same hidden-state gradient, a zero head
  cotangent, and no `[D, V]` product in the backward pass."""
  hidden, lm_head, targets = _inputs(rng, lead)
  g_lp = rng.standard_normal(lead).astype(np.float32)
  g_h = rng.standard_normal(lead).astype(np.float32)
  frozen = lambda a, b, t: entropo.fused_logprobs_entropy(  # noqa: E731
      a, b, t, chunk_size=chunk, precision=precision, head_grad=False)
  full = lambda a, b, t: _fused(a, b, t, chunk, precision)  # noqa: E731
  dh, dw = _grads(frozen, hidden, lm_head, targets, g_lp, g_h)
  full_dh, _ = _grads(full, hidden, lm_head, targets, g_lp, g_h)
  np.testing.assert_array_equal(np.asarray(dh), np.asarray(full_dh))
  assert dw.shape == lm_head.shape and not np.asarray(dw).any()
  if precision == "fp32":
    ref_dh, _ = ref.fused_vjp(hidden, lm_head, targets, g_lp, g_h)
    _assert_f32_close(dh, ref_dh)
  # The backward builds one product per chunk instead of two.
  count = lambda fn: sum(  # noqa: E731
      str(e).count("dot_general") for e in jax.make_jaxpr(
          jax.grad(_loss(fn, g_lp, g_h), argnums=0))(
              hidden, lm_head, targets).eqns)
  assert count(frozen) < count(full)
  with pytest.raises(ValueError, match="head_grad"):
    entropo.fused_logprobs_entropy(hidden, lm_head, targets, head_grad=1)


def test_gradient_of_each_output_separately(rng):
  # A zero cotangent on one output must silence its term of the gradient.
  hidden, lm_head, targets = _inputs(rng, (6,))
  zeros = np.zeros(6, np.float32)
  g = rng.standard_normal(6).astype(np.float32)
  fused = lambda a, b, t: _fused(a, b, t, 5)  # noqa: E731
  for g_lp, g_h in ((g, zeros), (zeros, g)):
    dh, dw = _grads(fused, hidden, lm_head, targets, g_lp, g_h)
    ref_dh, ref_dw = ref.fused_vjp(hidden, lm_head, targets, g_lp, g_h)
    _assert_f32_close(dh, ref_dh)
    _assert_f32_close(dw, ref_dw)


# Precision presets and low-precision inputs.


@pytest.mark.parametrize("precision", ["fp32", "bf16_fp32_head",
                                       "bf16_fp32_logits"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_float32_logit_presets_equal_materialised(rng, precision, dtype):
  hidden, lm_head, targets = _inputs(rng, (3, 4), dtype=np.float32)
  hidden = jnp.asarray(hidden, dtype)
  lm_head = jnp.asarray(lm_head, dtype)
  lp, h = _fused(hidden, lm_head, targets, 5, precision)
  assert lp.dtype == h.dtype == jnp.float32
  mat_lp, mat_h = _materialised(hidden, lm_head, targets, precision)
  _assert_f32_close(lp, mat_lp)
  _assert_f32_close(h, mat_h)


@pytest.mark.parametrize("precision,dtype_name,ulp", [
    ("bf16", "bfloat16", 2.0**-7), ("fp16", "float16", 2.0**-10)])
def test_low_precision_presets_equal_materialised(rng, precision, dtype_name,
                                                  ulp):
  hidden, lm_head, targets = _inputs(rng, (4, 6), vocab=29)
  lp, h = _fused(hidden, lm_head, targets, 8, precision)
  mat_lp, mat_h = _materialised(hidden, lm_head, targets, precision)
  lp, h, mat_lp, mat_h = (np.asarray(x) for x in (lp, h, mat_lp, mat_h))
  # Both round their float32 results to the low dtype; the float32 sums are
  # accumulated in a different order (online vs two-pass), which can land
  # on either side of a rounding boundary: at most one ulp apart, and
  # mostly identical.
  for x, y in ((lp, mat_lp), (h, mat_h)):
    np.testing.assert_array_equal(x, ref.round_to(x, dtype_name))
    assert np.all(np.abs(x - y) <= ulp * np.abs(y))
    assert np.mean(x == y) > 0.9
  # And the preset really changes the numbers relative to float32.
  lp32, _ = _fused(hidden, lm_head, targets, 8, "fp32")
  assert np.abs(lp - np.asarray(lp32)).max() > 1e-3


def test_fp32_head_preset_is_float32_and_bf16_is_not(rng):
  hidden, lm_head, targets = _inputs(rng, (4, 6), vocab=29)
  lp32, h32 = _fused(hidden, lm_head, targets, 8, "fp32")
  lp_fix, h_fix = _fused(hidden, lm_head, targets, 8, "bf16_fp32_head")
  # The paper's fix computes the head exactly as float32 does.
  np.testing.assert_array_equal(np.asarray(lp_fix), np.asarray(lp32))
  np.testing.assert_array_equal(np.asarray(h_fix), np.asarray(h32))
  # bf16 operands with a float32 product: the operands' bf16 rounding moves
  # logits by about 2^-9 |h| |w| per term, far less than bf16 logits do.
  lp_mixed, _ = _fused(hidden, lm_head, targets, 8, "bf16_fp32_logits")
  lp_bf16, _ = _fused(hidden, lm_head, targets, 8, "bf16")
  err_mixed = np.abs(np.asarray(lp_mixed) - np.asarray(lp32)).max()
  err_bf16 = np.abs(np.asarray(lp_bf16) - np.asarray(lp32)).max()
  assert 1e-5 < err_mixed < err_bf16


# chunk >= V: the whole vocabulary is one chunk, outside any loop, where
# XLA:CPU once folded a transpose into a bf16 dot it then could not run;
# `tied`: the head is a transposed `[V, D]` embedding, as in tied models,
# whose gradient transpose XLA folded the same way.
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [5, V, 20])
@pytest.mark.parametrize("precision", ["bf16_fp32_logits", "bf16"])
def test_bf16_gradients_equal_materialised(rng, precision, chunk, tied):
  hidden, lm_head, targets = _inputs(rng, (3, 4), dtype=np.float32)
  hidden = jnp.asarray(hidden, jnp.bfloat16)
  # Tied: float32 master weights, cast to bf16 inside, as in the trainer.
  head_dtype = jnp.float32 if tied else jnp.bfloat16
  lm_head = jnp.asarray(jnp.asarray(lm_head, jnp.bfloat16), head_dtype)
  g_lp = rng.standard_normal((3, 4)).astype(np.float32)
  g_h = rng.standard_normal((3, 4)).astype(np.float32)
  fused = lambda a, b, t: _fused(a, b, t, chunk, precision)  # noqa: E731
  mat = lambda a, b, t: _materialised(a, b, t, precision)  # noqa: E731
  if tied:
    embed_grads = _grads(lambda a, e, t: fused(a, e.T, t), hidden,
                         lm_head.T, targets, g_lp, g_h)
    dh, dw = embed_grads[0], embed_grads[1].T
  else:
    dh, dw = _grads(fused, hidden, lm_head, targets, g_lp, g_h)
  mat_dh, mat_dw = _grads(mat, hidden, lm_head, targets, g_lp, g_h)
  assert dh.dtype == jnp.bfloat16 and dw.dtype == head_dtype
  # Bound: the logit gradient dz and the products dz W^T, h^T dz are each
  # rounded to bf16 somewhere along either path (2^-9 relative per term);
  # bf16 logits (the `bf16` preset) also move p by 2^-8 relative. So the
  # two gradients agree to a few bf16 ulps of the magnitudes summed,
  # sum_v |dz_v| |W_kv| and sum_n |h_nk| |dz_nv|.
  h64 = np.asarray(hidden, np.float64).reshape(-1, D)
  w64 = np.asarray(lm_head, np.float64)
  dz = ref.logits_vjp(h64 @ w64, targets.reshape(-1), g_lp.reshape(-1),
                      g_h.reshape(-1))  # [N, V]
  mag_dh = (np.abs(dz) @ np.abs(w64).T).reshape(hidden.shape)
  mag_dw = np.abs(h64).T @ np.abs(dz)
  rel = 2.0**-7 if precision == "bf16" else 2.0**-8
  for x, y, mag in ((dh, mat_dh, mag_dh), (dw, mat_dw, mag_dw)):
    err = np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
    assert np.all(err <= 2 * rel * mag + 1e-6), (err / mag).max()
  # Against the float64 gradient of the bf16-valued inputs, for the float32
  # product: the same bound (no bf16 logits there).
  if precision == "bf16_fp32_logits":
    ref_dh, ref_dw = ref.fused_vjp(np.asarray(hidden, np.float64), w64,
                                   targets, g_lp, g_h)
    for x, y, mag in ((dh, ref_dh, mag_dh), (dw, ref_dw, mag_dw)):
      err = np.abs(np.asarray(x, np.float64) - y)
      assert np.all(err <= 2 * rel * mag + 1e-6), (err / mag).max()


# Stability.


def test_stable_with_huge_hidden_norms(rng):
  # |logits| ~ 1e4: the online log-sum-exp must stay finite and exact to
  # the float32 rounding of the logits themselves.
  hidden, lm_head, targets = _inputs(rng, (2, 5), scale=3e3)
  # So that the entropy is not trivially 0: make columns 0 and 1 near
  # copies (logit gap O(1) at |z| ~ 1e4) and point the first row of hidden
  # states along column 0, so that those two share the top of the softmax.
  lm_head[:, 1] = lm_head[:, 0] + (rng.standard_normal(D) * 1e-4).astype(
      np.float32)
  direction = lm_head[:, 0] / np.linalg.norm(lm_head[:, 0])
  hidden[0] = (direction * 3e3 + rng.standard_normal((5, D))).astype(
      np.float32)
  targets[0] = 1
  g_lp = rng.standard_normal((2, 5)).astype(np.float32)
  g_h = rng.standard_normal((2, 5)).astype(np.float32)
  logits64 = ref.head_logits(hidden, lm_head)  # [2, 5, V]
  assert np.abs(logits64).max() > 5e3
  assert ref.token_entropy(logits64)[0].min() > 0.05
  lp, h = _fused(hidden, lm_head, targets, 5)
  lp, h = np.asarray(lp), np.asarray(h)
  assert np.all(np.isfinite(lp)) and np.all(np.isfinite(h))
  assert np.all(h >= 0) and np.all(h <= math.log(V) + 1e-6)
  # The float32 product's error per logit is at most D * 2^-24 *
  # sum_k |h_k w_kv| (standard dot-product bound); log-probs move by at most
  # twice the largest logit error, the entropy by 2 H times it.
  delta = D * 2.0**-24 * (np.abs(hidden).astype(np.float64)
                          @ np.abs(lm_head).astype(np.float64)).max(-1)
  ref_lp = ref.token_logprobs(logits64, targets)
  ref_h = ref.token_entropy(logits64)
  lp_bound = 2 * delta + 1e-5 * np.abs(ref_lp)
  h_bound = 2 * ref_h * delta + 1e-6
  assert np.all(np.abs(lp - ref_lp) <= lp_bound)
  assert np.all(np.abs(h - ref_h) <= h_bound)
  # The materialised path is held to the same bound; the two paths are
  # compared with each other below, on a single chunk.
  mat_lp, mat_h = (np.asarray(x) for x in _materialised(hidden, lm_head,
                                                         targets))
  assert np.all(np.abs(mat_lp - ref_lp) <= lp_bound)
  assert np.all(np.abs(mat_h - ref_h) <= h_bound)
  dh, dw = _grads(lambda a, b, t: _fused(a, b, t, 5), hidden, lm_head,
                  targets, g_lp, g_h)
  mat_dh, mat_dw = _grads(_materialised, hidden, lm_head, targets, g_lp, g_h)
  assert np.all(np.isfinite(np.asarray(dh)))
  assert np.all(np.isfinite(np.asarray(dw)))
  # Gradients: with the whole vocabulary in one chunk both paths compute the
  # same float32 logits (with several chunks, XLA:CPU may pick another
  # kernel for a chunk's product inside the scan than for the whole product;
  # they differ by an ulp of a logit, 1e-3 at |z| ~ 1e4, on some CPUs). Both
  # recover p from centred log-probs (z - m) - log s, so they agree to float32
  # rounding of the magnitudes summed in the products (a lse = m + log s held
  # to float32 would cost 5e-4 relative here: half an ulp of 1e4).
  one_chunk = lambda a, b, t: _fused(a, b, t, V)  # noqa: E731
  lp1, h1 = one_chunk(hidden, lm_head, targets)
  _assert_f32_close(lp1, mat_lp, scale=np.abs(ref_lp) + 1)
  _assert_f32_close(h1, mat_h)
  dh, dw = _grads(one_chunk, hidden, lm_head, targets, g_lp, g_h)
  h2 = np.asarray(hidden, np.float64).reshape(-1, D)
  w64 = np.asarray(lm_head, np.float64)
  dz = ref.logits_vjp(logits64.reshape(-1, V), targets.reshape(-1),
                      g_lp.reshape(-1), g_h.reshape(-1))
  mag_dh = (np.abs(dz) @ np.abs(w64).T).reshape(hidden.shape)
  mag_dw = np.abs(h2).T @ np.abs(dz)
  for x, y, mag in ((dh, mat_dh, mag_dh), (dw, mat_dw, mag_dw)):
    err = np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
    assert np.all(err <= 1e-5 * mag + 1e-6), (err / (mag + 1e-30)).max()


def test_bf16_inputs_with_huge_norms_are_finite(rng):
  hidden, lm_head, targets = _inputs(rng, (6,), scale=3e3)
  for precision in ("bf16", "bf16_fp32_logits"):
    fn = lambda a, b, t, p=precision: _fused(a, b, t, 4, p)  # noqa: E731
    args = (jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(lm_head,
                                                           jnp.bfloat16))
    lp, h = fn(*args, targets)
    dh, dw = _grads(fn, *args, targets, np.ones(6), np.ones(6))
    for x in (lp, h, dh, dw):
      assert np.all(np.isfinite(np.asarray(x, np.float32)))


# Memory: the [N, V] logits are never held.


def _temp_bytes(fn, *shapes):
  compiled = jax.jit(fn).lower(*shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()


def test_never_materialises_the_logits():
  n, d, vocab, chunk = 2048, 16, 8192, 256
  full = n * vocab * 4  # 64 MiB of float32 logits
  per_chunk = n * chunk * 4  # 2 MiB
  args = (jax.ShapeDtypeStruct((n, d), jnp.float32),
          jax.ShapeDtypeStruct((d, vocab), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32))

  def fused(h, w, t):
    lp, ent = entropo.fused_logprobs_entropy(h, w, t, chunk_size=chunk)
    return jnp.sum(lp) + jnp.sum(ent)

  def materialised(h, w, t):
    lp, ent = _materialised(h, w, t)
    return jnp.sum(lp) + jnp.sum(ent)

  grad = lambda f: jax.value_and_grad(f, argnums=(0, 1))  # noqa: E731
  for fn in (fused, grad(fused)):
    temp, hlo = _temp_bytes(fn, *args)
    # A few [N, C] chunk buffers plus the [D, V] lm_head gradient
    # accumulator; nothing of size N * V.
    assert temp <= 8 * per_chunk + 2 * d * vocab * 4, temp
    assert temp < full / 8, temp
    assert f"[{n},{vocab}]" not in hlo
  # The measurement can see [N, V]: the materialised path holds it.
  for fn in (materialised, grad(materialised)):
    temp, hlo = _temp_bytes(fn, *args)
    assert temp >= full, temp
    assert f"[{n},{vocab}]" in hlo


# Bad input.


def _ok(rng):
  return _inputs(rng, (2, 3))


def test_wrong_ranks_raise(rng):
  hidden, lm_head, targets = _ok(rng)
  with pytest.raises(ValueError, match=r"hidden must have rank 2 or 3; got "
                     r"rank 1 with shape \(8,\)"):
    entropo.fused_logprobs_entropy(hidden[0, 0], lm_head, targets[0, 0])
  with pytest.raises(ValueError, match=r"hidden.*rank 4"):
    entropo.fused_logprobs_entropy(hidden[None], lm_head, targets[None])
  with pytest.raises(ValueError, match=r"lm_head must have rank 2; got rank 3"):
    entropo.fused_logprobs_entropy(hidden, lm_head[None], targets)
  with pytest.raises(ValueError, match=r"lm_head must have rank 2; got rank 1"):
    entropo.fused_logprobs_entropy(hidden, lm_head[:, 0], targets)


def test_integer_inputs_raise(rng):
  hidden, lm_head, targets = _ok(rng)
  with pytest.raises(TypeError, match=r"hidden must have a floating dtype.*"
                     r"got int32"):
    entropo.fused_logprobs_entropy(hidden.astype(np.int32), lm_head, targets)
  with pytest.raises(TypeError, match=r"lm_head must have a floating dtype.*"
                     r"got int8"):
    entropo.fused_logprobs_entropy(hidden, lm_head.astype(np.int8), targets)


def test_float_targets_raise(rng):
  hidden, lm_head, targets = _ok(rng)
  with pytest.raises(TypeError, match=r"targets must have an integer dtype.*"
                     r"got float32"):
    entropo.fused_logprobs_entropy(hidden, lm_head,
                                   targets.astype(np.float32))


def test_targets_shape_mismatch_raises(rng):
  hidden, lm_head, targets = _ok(rng)
  with pytest.raises(ValueError, match=r"targets must have shape "
                     r"hidden.shape\[:-1\] = \(2, 3\); got \(6,\)"):
    entropo.fused_logprobs_entropy(hidden, lm_head, targets.reshape(-1))


def test_width_mismatch_raises(rng):
  hidden, lm_head, targets = _ok(rng)
  with pytest.raises(ValueError, match=r"hidden width 8 does not match "
                     r"lm_head rows 13"):
    entropo.fused_logprobs_entropy(hidden, lm_head.T, targets)


@pytest.mark.parametrize("chunk,shown", [(0, "0"), (-4, "-4"), (2.5, "2.5"),
                                         ("4", "'4'"), (None, "None"),
                                         (True, "True")])
def test_bad_chunk_size_raises(rng, chunk, shown):
  hidden, lm_head, targets = _ok(rng)
  with pytest.raises((ValueError, TypeError),
                     match=rf"chunk_size must be a positive int; got {shown}"):
    entropo.fused_logprobs_entropy(hidden, lm_head, targets, chunk_size=chunk)


def test_unknown_precision_raises(rng):
  hidden, lm_head, targets = _ok(rng)
  with pytest.raises(ValueError, match=r"'fp8'.*'bf16_fp32_head'"):
    entropo.fused_logprobs_entropy(hidden, lm_head, targets, precision="fp8")


def test_empty_vocabulary_raises(rng):
  hidden = jnp.zeros((3, D), jnp.float32)
  with pytest.raises(ValueError, match="vocabulary must be non-empty"):
    entropo.fused_logprobs_entropy(hidden, jnp.zeros((D, 0)),
                                   jnp.zeros((3,), jnp.int32))


def test_out_of_range_targets_raise_eagerly_and_give_nan_under_jit(rng):
  hidden, lm_head, targets = _inputs(rng, (6,))
  for bad in (-1, V):
    targets = targets.copy()
    targets[2] = bad
    with pytest.raises(ValueError, match=rf"\[0, {V}\).*{bad}.*\[\[2\]\]"):
      _fused(hidden, lm_head, targets, 4)
    lp, h = jax.jit(lambda a, b, t: _fused(a, b, t, 4))(hidden, lm_head,
                                                         targets)
    ok_lp, ok_h = _fused(hidden, lm_head, np.where(targets == bad, 0,
                                                   targets), 4)
    assert np.isnan(np.asarray(lp)[2])
    np.testing.assert_array_equal(np.delete(np.asarray(lp), 2),
                                  np.delete(np.asarray(ok_lp), 2))
    np.testing.assert_array_equal(np.asarray(h), np.asarray(ok_h))


def test_logits_near_the_float32_limit_are_not_nan():
  # Logits of +-2e38 are finite float32, but their difference from the
  # maximum (4e38) overflows to -inf: its exp is 0, and its term in the
  # entropy and in the gradient must be 0, not 0 * inf = NaN.
  hidden = np.asarray([[1e19, 1e19], [1.0, 0.0]], np.float32)
  lm_head = np.asarray([[1e19, -1e19, 0.0], [1e19, -1e19, 0.0]], np.float32)
  targets = np.asarray([0, 1], np.int32)
  logits64 = hidden.astype(np.float64) @ lm_head.astype(np.float64)
  assert np.abs(logits64).max() == pytest.approx(2e38)
  lp, h = entropo.fused_logprobs_entropy(hidden, lm_head, targets,
                                         chunk_size=2)
  np.testing.assert_allclose(lp, ref.token_logprobs(logits64, targets),
                             rtol=1e-6)
  np.testing.assert_allclose(h, ref.token_entropy(logits64), atol=1e-6)
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(
      entropo.fused_logprobs_entropy(x, w, targets, chunk_size=2)[0][:1])
      + jnp.sum(entropo.fused_logprobs_entropy(x, w, targets,
                                               chunk_size=2)[1]),
      argnums=(0, 1)))(hidden, lm_head)
  for g in grad:
    assert not np.any(np.isnan(np.asarray(g)))
