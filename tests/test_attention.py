"""The attention implementations against the reference and each other.

`blockwise` (online softmax over key chunks, custom VJP) must equal the
materialised `reference` to float32 rounding, values and gradients, under
causal and left/right padding masks, fully masked (padding) queries, GQA, a
KV cache, chunk sizes that do not divide the length, jit, the bf16 presets,
rematerialisation and 8-device sharding. Both are checked against a float64
loop-style reference.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import entropo
from entropo import sharding
from entropo.models import attention as attention_lib
from entropo.models import ModelConfig
from entropo.models import sample
from entropo.models import sampler as sampler_lib
from entropo.models import Transformer
from tests.reference import attention as ref_attention

FP32 = entropo.get_precision("fp32")
CONFIG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     qk_norm=True, family="qwen3")


def _inputs(rng, *, b=3, t=9, s=9, kv=2, g=3, hd=8, dtype=jnp.float32):
  q = rng.normal(size=(b, t, kv, g, hd))
  k, v = rng.normal(size=(2, b, kv, s, hd))  # head-major, as the cache
  valid = np.ones((b, s), bool)
  valid[0, :4] = False  # left padding: queries 0-3 of row 0 see no key
  valid[1, 6:] = False  # right padding
  valid[2, 2] = valid[2, 5] = False  # holes
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
          jnp.asarray(valid))


def _attend(implementation, chunk_size=4, precision=FP32):
  def f(q, k, v, valid, slots):
    return attention_lib.attend(q, k, v, valid, slots, precision=precision,
                                implementation=implementation,
                                chunk_size=chunk_size)
  return f


@pytest.mark.parametrize("chunk_size", [1, 4, 9, 64])
@pytest.mark.parametrize("cache_index", [None, 5])
def test_values_match_float64_reference(rng, chunk_size, cache_index):
  if cache_index is None:  # training: queries are slots 0..T-1
    q, k, v, valid = _inputs(rng)
    slots = jnp.arange(9)
  else:  # prefill/decode against a cache of 9 slots: queries at 5, 6
    q, k, v, valid = _inputs(rng, t=2)
    slots = cache_index + jnp.arange(2)
  want = ref_attention.attention(q, k, v, valid, slots)
  for impl in ("reference", "blockwise"):
    got = jax.jit(_attend(impl, chunk_size))(q, k, v, valid, slots)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=impl)


@pytest.mark.parametrize("host_checks", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 9, 64])
@pytest.mark.parametrize("slot", [4, 5, 8])
def test_decode_matches_float64_reference(rng, monkeypatch, host_checks,
                                          chunk_size, slot):
  # One query against a 9-slot cache: the filled-chunk loop (CPU, TPU) and
  # the every-chunk loop of known length (GPU) give the same attention.
  monkeypatch.setattr(attention_lib, "_loop_checks_on_host",
                      lambda backend=None: host_checks)
  q, k, v, valid = _inputs(rng, t=1)
  slots = jnp.asarray([slot])
  want = ref_attention.attention(q, k, v, valid, slots)
  got = jax.jit(_attend("blockwise", chunk_size))(q, k, v, valid, slots)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_loop_checks_on_host_only_on_gpu():
  assert attention_lib._loop_checks_on_host("gpu")
  assert attention_lib._loop_checks_on_host("cuda")
  assert not attention_lib._loop_checks_on_host("cpu")
  assert not attention_lib._loop_checks_on_host("tpu")


@pytest.mark.parametrize("chunk_size", [1, 4, 9])
def test_gradients_match_reference(rng, chunk_size):
  q, k, v, valid = _inputs(rng)
  slots = jnp.arange(9)
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def grads(impl):
    f = _attend(impl, chunk_size)
    loss = lambda q, k, v: jnp.sum(f(q, k, v, valid, slots) * cot)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  want, got = grads("reference"), grads("blockwise")
  for name, w, g in zip("qkv", want, got):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6, err_msg=name)
  # Padding queries (row 0, queries 0-3) send no gradient to q.
  np.testing.assert_array_equal(got[0][0, :4], 0.0)


def test_fully_masked_rows_are_finite_with_zero_gradient(rng):
  q, k, v, _ = _inputs(rng)
  valid = jnp.zeros((3, 9), bool)
  slots = jnp.arange(9)
  f = _attend("blockwise")
  out = f(q, k, v, valid, slots)
  # As the reference: the mean of all values, the same for every query.
  np.testing.assert_allclose(out, _attend("reference")(q, k, v, valid, slots),
                             rtol=1e-6, atol=1e-6)
  dq, dk = jax.grad(lambda q, k: jnp.sum(f(q, k, v, valid, slots)),
                    argnums=(0, 1))(q, k)
  np.testing.assert_array_equal(dq, 0.0)
  np.testing.assert_array_equal(dk, 0.0)


def _model(attention, *, precision="fp32", remat="none", config=CONFIG,
           scan_layers=False):
  return Transformer(config.replace(attention=attention),
                     precision=precision, rngs=nnx.Rngs(0), remat=remat,
                     scan_layers=scan_layers)


def _batch(rng, b=4, t=12):
  tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (b, t)))
  mask = np.ones((b, t), bool)
  mask[1, :5] = False  # left padded
  mask[2, 7:] = False  # right padded
  return tokens, jnp.asarray(mask)


def _loss(model, tokens, mask):
  hidden = model(tokens, attention_mask=mask)
  logps, entropy = entropo.fused_logprobs_entropy(
      hidden[:, :-1], model.lm_head_matrix(), tokens[:, 1:], chunk_size=32,
      precision=model.precision)
  valid = mask[:, 1:]
  return jnp.sum(jnp.where(valid, logps + 0.1 * entropy, 0.0))


def _grads(model, tokens, mask):
  loss_and_grad = nnx.jit(nnx.value_and_grad(_loss))
  loss, grads = loss_and_grad(model, tokens, mask)
  return loss, jax.tree.leaves(nnx.to_pure_dict(grads))


@pytest.mark.parametrize("precision, tol", [("fp32", 2e-5),
                                            ("bf16", 0.1),
                                            ("bf16_fp32_head", 0.1)])
def test_model_gradients_blockwise_equal_reference(rng, precision, tol):
  # bf16: the two paths round differently (unnormalised vs normalised
  # probabilities to bf16), so they agree to bf16 precision only; the point
  # there is that the jitted backward compiles and runs on XLA:CPU.
  tokens, mask = _batch(rng)
  want_loss, want = _grads(_model("reference", precision=precision), tokens,
                           mask)
  config = CONFIG.replace(attention_chunk_size=5)
  loss, got = _grads(_model("blockwise", precision=precision, config=config),
                     tokens, mask)
  np.testing.assert_allclose(loss, want_loss, rtol=tol)
  for g, w in zip(got, want):
    assert np.all(np.isfinite(g))
    scale = np.abs(w).max() + 1e-6
    np.testing.assert_allclose(g / scale, w / scale, atol=tol)


@pytest.mark.parametrize("remat", ["block", "block_save_dots"])
def test_remat_gradients_equal_no_remat(rng, remat):
  tokens, mask = _batch(rng)
  want_loss, want = _grads(_model("blockwise"), tokens, mask)
  loss, got = _grads(_model("blockwise", remat=remat), tokens, mask)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remat, attention", [
    ("none", "reference"), ("block", "blockwise"),
    ("block_save_dots", "blockwise")])
def test_scanned_layers_equal_the_unrolled_loop(rng, remat, attention):
  tokens, mask = _batch(rng)
  unrolled = _model(attention)
  want_loss, want = _grads(unrolled, tokens, mask)
  scanned = _model(attention, remat=remat, scan_layers=True)
  loss, got = _grads(scanned, tokens, mask)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  assert len(got) == len(want)  # a gradient for every block's weights
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      scanned(tokens, attention_mask=mask),
      unrolled(tokens, attention_mask=mask), rtol=1e-5, atol=1e-6)
  # The loop is a scan in the program, whatever the depth.
  jaxpr = jax.make_jaxpr(lambda t: scanned(t, attention_mask=mask))(tokens)
  assert any(e.primitive.name == "scan" and e.params["length"] ==
             CONFIG.num_layers for e in jaxpr.jaxpr.eqns)


def test_scanned_layers_in_bf16_under_jit(rng):
  tokens, mask = _batch(rng)
  want_loss, want = _grads(_model("blockwise", precision="bf16_fp32_head"),
                           tokens, mask)
  loss, got = _grads(_model("blockwise", precision="bf16_fp32_head",
                            remat="block", scan_layers=True), tokens, mask)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-3)
  for g, w in zip(got, want):
    assert np.all(np.isfinite(g))


def test_cache_prefill_and_decode_match_reference(rng):
  tokens, mask = _batch(rng, t=10)
  outs = {}
  for impl in ("reference", "blockwise"):
    model = _model(impl, config=CONFIG.replace(attention_chunk_size=3))
    cache = model.init_cache(4, 16)
    hidden, cache = model(tokens[:, :8], attention_mask=mask[:, :8],
                          cache=cache, cache_index=0)
    positions = jnp.sum(mask[:, :8], axis=1, keepdims=True)
    step, cache = model(tokens[:, 8:9], attention_mask=mask[:, 8:9],
                        positions=positions, cache=cache, cache_index=8)
    outs[impl] = (hidden, step, cache["k"][1])
  for got, want in zip(outs["blockwise"], outs["reference"]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sampler_tokens_unchanged(rng):
  tokens, mask = _batch(rng, t=6)
  results = [sample(_model(impl), tokens, mask, key=jax.random.key(3),
                    max_new_tokens=8) for impl in ("reference", "blockwise")]
  np.testing.assert_array_equal(results[0].tokens, results[1].tokens)
  np.testing.assert_allclose(results[0].logps, results[1].logps, atol=1e-5)


def _while_trip_counts(hlo_text):
  """The known trip count of each `while` in compiled HLO (None: unknown)."""
  counts = []
  for line in hlo_text.splitlines():
    if " while(" in line:
      found = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
      counts.append(int(found.group(1)) if found else None)
  return counts


@pytest.mark.parametrize("host_checks", [False, True])
def test_decode_loops_of_unknown_length(rng, monkeypatch, host_checks):
  # XLA:GPU syncs with the host at every trip of a loop of unknown length.
  # The sampler's steps run in blocks of known length (3 here), inside one
  # loop over blocks; where loops sync with the host the decode attention
  # adds no loop of unknown length either (elsewhere each layer reads only
  # the filled chunks of its 15-slot cache, chunks of 4, in one).
  monkeypatch.setattr(attention_lib, "_loop_checks_on_host",
                      lambda backend=None: host_checks)
  model = _model("blockwise", config=CONFIG.replace(attention_chunk_size=4))
  tokens, mask = _batch(rng, t=6)
  fn, args, kwargs = sampler_lib._prepare(
      model, tokens, mask, key=jax.random.key(0), max_new_tokens=9,
      temperature=1.0, top_k=None, top_p=None, eos_id=0, use_cache=True,
      steps_per_check=3)
  jax.clear_caches()  # trace again under the patched backend rule
  try:
    text = fn.lower(*args, **kwargs).compile().as_text()
  finally:
    jax.clear_caches()
  counts = _while_trip_counts(text)
  assert 3 in counts  # 8 steps after the first token: blocks of 3
  unknown = counts.count(None)
  assert unknown == (1 if host_checks else 1 + CONFIG.num_layers), counts


def test_sharded_blockwise_equals_single_device(rng):
  tokens, mask = _batch(rng, b=8)
  model = _model("blockwise")
  want_loss, want = _grads(model, tokens, mask)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = sharding.shard_model(_model("blockwise", remat="block"), mesh)
  batch = sharding.batch_sharding(mesh)
  loss, got = _grads(sharded, jax.device_put(tokens, batch),
                     jax.device_put(mask, batch))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def _pallas_interpret(f, *args):
  """Runs `f` with TPU Pallas kernels interpreted on the CPU."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  with pltpu.force_tpu_interpret_mode():
    return jax.jit(f)(*args)


def _kernel_case(rng, t, kv, g, **kwargs):
  """Inputs of a kernel test with as many queries as keys (`_inputs`), the
  query slots, the queries that have an allowed key (row 0's first four
  have none: they carry no loss) and a cotangent that is zero elsewhere."""
  inputs = _inputs(rng, t=t, s=t, kv=kv, g=g, **kwargs)
  live = np.ones((3, t), bool)
  live[0, :4] = False
  cot = jnp.asarray(rng.normal(size=inputs[0].shape)
                    * live[:, :, None, None, None], jnp.float32)
  return inputs, jnp.arange(t), live, cot


@pytest.mark.parametrize("t, kv, g", [(9, 2, 3), (130, 1, 2)])
def test_pallas_kernel_matches_float64_reference(rng, t, kv, g):
  """The TPU flash-attention path in TPU interpret mode, float32 operands
  (exact dots on CPU): causal mask, left/right padding and holes as
  segment ids, GQA by repeated heads, a length padded to its block (130 ->
  256: two key blocks, so the online softmax runs across blocks); values
  and gradients. Queries with no allowed key (row 0, queries 0-3) carry no
  loss and are left out (see `_pallas_tpu`)."""
  (q, k, v, valid), slots, live, cot = _kernel_case(rng, t, kv, g)

  def pallas(q, k, v):
    return attention_lib._pallas_tpu(q, k, v, valid, precision=FP32)  # pylint: disable=protected-access

  def grads(f):
    return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * cot),
                    argnums=(0, 1, 2))

  got = _pallas_interpret(pallas, q, k, v)
  want = ref_attention.attention(q, k, v, valid, slots)
  np.testing.assert_allclose(np.asarray(got)[live], want[live], rtol=1e-5,
                             atol=2e-6)
  got = _pallas_interpret(grads(pallas), q, k, v)
  ref = jax.jit(grads(lambda q, k, v: _attend("reference")(q, k, v, valid,
                                                           slots)))(q, k, v)
  for name, a, b in zip("qkv", got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=name)


def test_pallas_model_in_bf16(rng):
  """`attention="pallas"` in a bf16 model: training-shaped calls use the
  kernel (interpreted) and agree with blockwise to bf16 rounding; sampling
  (T != S) takes the blockwise path, so its tokens are blockwise's."""
  tokens, mask = _batch(rng)
  # Rows 1's first five queries (left padding) have no allowed key.
  live = np.ones(mask.shape, bool)
  live[1, :5] = False
  hidden = {impl: np.asarray(_pallas_interpret(
      lambda t, m, impl=impl: _model(impl, precision="bf16")(
          t, attention_mask=m).astype(jnp.float32), tokens, mask))
            for impl in ("pallas", "reference")}
  # One key block: the kernel rounds as the reference does (measured: equal;
  # blockwise differs from both by 2e-2 max, 4e-3 mean in bf16).
  diff = np.abs(hidden["pallas"] - hidden["reference"])[live]
  assert diff.max() < 1e-2 and diff.mean() < 1e-3, (diff.max(), diff.mean())
  results = [sample(_model(impl, precision="bf16"), tokens[:, :6],
                    mask[:, :6], key=jax.random.key(3), max_new_tokens=8)
             for impl in ("pallas", "blockwise")]
  np.testing.assert_array_equal(results[0].tokens, results[1].tokens)
  np.testing.assert_array_equal(results[0].logps, results[1].logps)


def test_auto_resolves_per_backend():
  assert attention_lib.resolve("auto", jnp.float32, "cpu") == "blockwise"
  assert attention_lib.resolve("auto", jnp.bfloat16, "tpu") == "pallas"
  assert attention_lib.resolve("auto", jnp.float32, "tpu") == "blockwise"
  assert attention_lib.resolve("auto", jnp.float32, "gpu") == "blockwise"
  assert attention_lib.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert _model("auto").attention_implementation() == "blockwise"


def test_bad_options_raise():
  with pytest.raises(ValueError, match="Unknown ModelConfig.attention 'flash'"):
    CONFIG.replace(attention="flash")
  with pytest.raises(ValueError, match="attention_chunk_size"):
    CONFIG.replace(attention_chunk_size=0)
  with pytest.raises(ValueError, match="Unknown remat 'all'"):
    _model("auto", remat="all")
  with pytest.raises(ValueError, match="needs bfloat16 or float16"):
    attention_lib.attend(*_inputs(np.random.default_rng(0)), jnp.arange(9),
                         precision=FP32, implementation="cudnn")
  with pytest.raises(ValueError, match="'pallas' needs bfloat16 or float16"):
    attention_lib.attend(*_inputs(np.random.default_rng(0)), jnp.arange(9),
                         precision=FP32, implementation="pallas")
  # Decode calls (T != S) would take blockwise, but a float32 kernel choice
  # is refused there too, and when the model is built.
  q, k, v, valid = _inputs(np.random.default_rng(0), t=1)
  with pytest.raises(ValueError, match="'cudnn' needs bfloat16 or float16"):
    attention_lib.attend(q, k, v, valid, jnp.asarray([8]), precision=FP32,
                         implementation="cudnn")
  for kernel in ("cudnn", "pallas"):
    with pytest.raises(ValueError, match=f"'{kernel}' needs bfloat16"):
      _model(kernel)
    _model(kernel, precision="bf16")  # builds


@pytest.mark.skipif(jax.default_backend() != "gpu", reason=(
    "cuDNN's kernel runs on NVIDIA GPUs only: ENTROPO_TEST_ACCELERATOR=1 "
    "on one (benchmarks/gpu.sh)"))
@pytest.mark.parametrize("t, kv, g", [(9, 2, 3), (130, 1, 2)])
def test_cudnn_kernel_matches_float64_reference(rng, t, kv, g):
  """cuDNN's fused attention on bfloat16 inputs against the float64
  reference on the same (rounded) inputs: causal mask, left/right padding
  and holes in the dense mask, GQA, values and gradients. Queries with no
  allowed key (row 0, queries 0-3) carry no loss and are left out.

  Bounds from bf16 rounding (u = 2**-8) rather than from a run (written
  without a GPU): the kernel rounds the probabilities once before the
  value product and its output once, so values are within 2 u max|v|; the
  backward rounds the output gradient, the probabilities and the score
  gradients once each before its products, so each gradient is within
  8 u of its largest entry. If this fails on a GPU, find out why before
  touching a bound.
  """
  u = 2.0**-8
  (q, k, v, valid), slots, live, cot = _kernel_case(rng, t, kv, g, hd=64,
                                                   dtype=jnp.bfloat16)

  def cudnn(q, k, v):
    return attention_lib._cudnn(q, k, v, valid, slots,  # pylint: disable=protected-access
                                precision=entropo.get_precision("bf16"))

  got = np.asarray(jax.jit(cudnn)(q, k, v).astype(jnp.float32))
  want = ref_attention.attention(q, k, v, valid, slots)
  bound = 2 * u * float(jnp.max(jnp.abs(v.astype(jnp.float32))))
  np.testing.assert_allclose(got[live], want[live], rtol=0, atol=bound)

  def grads(f, dtype):
    loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * cot)
    args = [x.astype(dtype) for x in (q, k, v)]
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)

  got = grads(cudnn, jnp.bfloat16)
  want = grads(lambda q, k, v: _attend("reference")(q, k, v, valid, slots),
               jnp.float32)  # float32 dots on the same rounded inputs
  for name, a, b in zip("qkv", got, want):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)), b, rtol=0,
                               atol=8 * u * np.abs(b).max(), err_msg=name)


def test_cudnn_serves_only_calls_whose_queries_fill_the_keys(rng,
                                                              monkeypatch):
  # A decode step or a prefill into a longer cache takes blockwise (cuDNN
  # would need the head-major cache transposed in every layer and step).
  calls = []
  monkeypatch.setattr(attention_lib, "_cudnn",
                      lambda *a, **k: calls.append(a[0].shape) or a[0])
  bf16 = entropo.get_precision("bf16")
  q, k, v, valid = _inputs(rng, t=1, dtype=jnp.bfloat16)
  got = jax.jit(_attend("cudnn", precision=bf16))(q, k, v, valid,
                                               jnp.asarray([8]))
  want = jax.jit(_attend("blockwise", precision=bf16))(q, k, v, valid,
                                                    jnp.asarray([8]))
  np.testing.assert_array_equal(got, want)
  assert not calls
  q, k, v, valid = _inputs(rng, dtype=jnp.bfloat16)
  _attend("cudnn", precision=bf16)(q, k, v, valid, jnp.arange(9))
  assert calls == [q.shape]


# -- packed rows: segments (entropo.packing)

# Row 0: three segments and a padding slot; row 1: two segments and two
# padding slots; row 2: one segment with a hole (a key that does not exist).
_SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 0],
                      [1, 1, 1, 1, 1, 2, 2, 0, 0],
                      [1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int32)


def _segment_case(rng, dtype=jnp.float32, **kwargs):
  q, k, v, _ = _inputs(rng, dtype=dtype, **kwargs)
  seg = jnp.asarray(_SEGMENTS)
  valid = np.asarray(_SEGMENTS > 0)
  valid[2, 4] = False
  return q, k, v, jnp.asarray(valid), seg


def _attend_segments(implementation, chunk_size=4, precision=FP32):
  def f(q, k, v, valid, seg):
    return attention_lib.attend(q, k, v, valid, jnp.arange(q.shape[1]),
                                precision=precision,
                                implementation=implementation,
                                chunk_size=chunk_size, query_segments=seg,
                                key_segments=seg)
  return f


@pytest.mark.parametrize("chunk_size", [1, 4, 9])
def test_segments_match_float64_reference(rng, chunk_size):
  q, k, v, valid, seg = _segment_case(rng)
  want = ref_attention.attention(q, k, v, valid, np.arange(9), (seg, seg))
  for impl in ("reference", "blockwise"):
    got = jax.jit(_attend_segments(impl, chunk_size))(q, k, v, valid, seg)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                               err_msg=impl)


def test_segment_gradients_blockwise_equal_reference(rng):
  q, k, v, valid, seg = _segment_case(rng)
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def grads(impl):
    f = _attend_segments(impl, chunk_size=4)
    loss = lambda q, k, v: jnp.sum(f(q, k, v, valid, seg) * cot)  # noqa
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  for name, a, b in zip("qkv", grads("blockwise"), grads("reference")):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_one_segment_per_row_is_the_unsegmented_attention(rng):
  q, k, v, valid = _inputs(rng)
  ones = jnp.ones(valid.shape, jnp.int32)
  for impl in ("reference", "blockwise"):
    got = jax.jit(_attend_segments(impl))(q, k, v, valid, ones)
    want = jax.jit(_attend(impl))(q, k, v, valid, jnp.arange(9))
    np.testing.assert_array_equal(got, want, err_msg=impl)


def test_segments_go_together():
  q, k, v, valid = _inputs(np.random.default_rng(0))
  seg = jnp.ones(valid.shape, jnp.int32)
  with pytest.raises(ValueError, match="go together"):
    attention_lib.attend(q, k, v, valid, jnp.arange(9), precision=FP32,
                         implementation="blockwise", query_segments=seg)
  with pytest.raises(ValueError, match=r"query_segments must be \[B, T\]"):
    attention_lib.attend(q, k, v, valid, jnp.arange(9), precision=FP32,
                         implementation="blockwise", query_segments=seg[:, 1:],
                         key_segments=seg)


def test_pallas_segments_match_float64_reference(rng):
  """The TPU kernel's path with packed rows, in TPU interpret mode (float32
  operands: exact dots on CPU): the segments go into its segment ids.
  Queries with no allowed key are padding (segment 0) and left out."""
  q, k, v, valid, seg = _segment_case(rng)
  live = np.asarray(valid)
  cot = jnp.asarray(rng.normal(size=q.shape) * live[:, :, None, None, None],
                    jnp.float32)

  def pallas(q, k, v):
    return attention_lib._pallas_tpu(q, k, v, valid, precision=FP32,  # pylint: disable=protected-access
                                     segments=(seg, seg))

  got = _pallas_interpret(pallas, q, k, v)
  want = ref_attention.attention(q, k, v, valid, np.arange(9), (seg, seg))
  np.testing.assert_allclose(np.asarray(got)[live], want[live], rtol=1e-5,
                             atol=2e-6)
  grads = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * cot),  # noqa
                             argnums=(0, 1, 2))
  got = _pallas_interpret(grads(pallas), q, k, v)
  ref = jax.jit(grads(lambda q, k, v: _attend_segments("reference")(
      q, k, v, valid, seg)))(q, k, v)
  for name, a, b in zip("qkv", got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=name)


def test_cudnn_gets_the_segment_mask(rng, monkeypatch):
  """cuDNN's path (no GPU here): the bool mask it hands to
  `jax.nn.dot_product_attention` is the reference's allowed set, segments
  included; an XLA stand-in for the kernel then gives the float64 values."""
  seen, xla = [], jax.nn.dot_product_attention

  def xla_kernel(q, k, v, *, mask, implementation):
    assert implementation == "cudnn"
    seen.append(np.asarray(mask))
    return xla(q, k, v, mask=mask)

  monkeypatch.setattr(jax.nn, "dot_product_attention", xla_kernel)
  q, k, v, valid, seg = _segment_case(rng)
  got = attention_lib._cudnn(q, k, v, valid, jnp.arange(9), precision=FP32,  # pylint: disable=protected-access
                             segments=(seg, seg))
  segs = np.asarray(seg)
  want_mask = (np.tril(np.ones((9, 9), bool))[None]
               & np.asarray(valid)[:, None, :]
               & (segs[:, :, None] == segs[:, None, :]))
  np.testing.assert_array_equal(seen[0], want_mask[:, None])
  want = ref_attention.attention(q, k, v, valid, np.arange(9), (seg, seg))
  live = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(got)[live], want[live], rtol=1e-5,
                             atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason=(
    "cuDNN's kernel runs on NVIDIA GPUs only: ENTROPO_TEST_ACCELERATOR=1 "
    "on one (benchmarks/gpu.sh)"))
def test_cudnn_kernel_with_segments_matches_float64_reference(rng):
  """cuDNN's kernel on packed rows (bf16), with the bounds of
  `test_cudnn_kernel_matches_float64_reference` (written without a GPU;
  no GPU has run it yet). Padding queries (segment 0) are left out."""
  u = 2.0**-8
  q, k, v, valid, seg = _segment_case(rng, dtype=jnp.bfloat16, hd=64)
  live = np.asarray(valid)
  got = jax.jit(lambda q, k, v: attention_lib._cudnn(  # pylint: disable=protected-access
      q, k, v, valid, jnp.arange(9), precision=entropo.get_precision("bf16"),
      segments=(seg, seg)))(q, k, v)
  want = ref_attention.attention(q, k, v, valid, np.arange(9), (seg, seg))
  bound = 2 * u * float(jnp.max(jnp.abs(v.astype(jnp.float32))))
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32))[live],
                             want[live], rtol=0, atol=bound)


@pytest.mark.parametrize("attention, scan", [("reference", False),
                                             ("blockwise", False),
                                             ("blockwise", True)])
def test_packed_rows_equal_rows_of_their_own(rng, attention, scan):
  """A model's hidden states for sequences packed into rows (segments,
  positions restarting per segment) equal those of each sequence alone in
  a left-padded row of its own."""
  model = _model(attention)
  model.scan_layers = scan
  lengths = [5, 3, 4, 2]
  seqs = [rng.integers(0, CONFIG.vocab_size, n) for n in lengths]
  packed = np.zeros((2, 8), np.int32)
  seg = np.zeros((2, 8), np.int32)
  packed[0, :5], packed[0, 5:8] = seqs[0], seqs[1]
  seg[0, :5], seg[0, 5:8] = 1, 2
  packed[1, :4], packed[1, 4:6] = seqs[2], seqs[3]
  seg[1, :4], seg[1, 4:6] = 1, 2
  got = jax.jit(lambda t, s: model(t, segment_ids=s))(packed, seg)
  alone = np.zeros((4, 6), np.int32)
  mask = np.zeros((4, 6), bool)
  for i, s in enumerate(seqs):
    alone[i, 6 - len(s):], mask[i, 6 - len(s):] = s, True
  want = jax.jit(lambda t, m: model(t, attention_mask=m))(alone, mask)
  spans = [(0, 0, 5), (0, 5, 8), (1, 0, 4), (1, 4, 6)]
  for i, (row, a, b) in enumerate(spans):
    np.testing.assert_allclose(got[row, a:b], want[i, 6 - (b - a):],
                               rtol=1e-5, atol=1e-5, err_msg=str(i))


def test_segment_positions_restart_per_segment():
  from entropo.models import transformer  # pylint: disable=g-import-not-at-top
  got = transformer.segment_positions(jnp.asarray(_SEGMENTS))
  want = [[0, 1, 2, 0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 4, 0, 1, 0, 1],
          list(range(9))]
  np.testing.assert_array_equal(got, want)


def test_segment_ids_take_no_cache():
  model = _model("blockwise")
  tokens = jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ValueError, match="take no cache"):
    model(tokens, segment_ids=jnp.ones((2, 3), jnp.int32),
          cache=model.init_cache(2, 8), cache_index=0)
