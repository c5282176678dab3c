"""Attention implementations: one call for training, prefill and decode.

Every implementation computes, for queries `q: [B, T, KV, G, hd]` (G query
heads share each of the KV key/value heads) and keys and values
`k, v: [B, KV, S, hd]`,

    out[b, t] = softmax_s(q[b, t] . k[b, :, s] / sqrt(hd), allowed[b, t, s]) v

where key `s` is allowed for query `t` when `key_valid[b, s]` and
`s <= query_slots[t]` (the causal mask: `query_slots` is the cache slot of
each query, `arange(T)` without a cache). `query_slots` may also be
`[B, T]`, a slot per row and query (`s <= query_slots[b, t]`): the cache
of the in-flight sampler, whose rows are at different slots. For packed
rows (several sequences in one row, `entropo.packing`) a key is allowed
only when the query and the key are in the same segment:
`query_segments[b, t] == key_segments[b, s]` (optional `[B, T]` and
`[B, S]` ints, both or neither; None is one segment per row). Scores and
the softmax are float32; every contraction goes through the model's
`Precision` policy.

Keys and values are head-major, the layout of the KV cache: the products
with the keys and values batch over `(B, KV)`, which XLA wants outermost, so
a decode step reads each layer's cache where it lies. (With the cache
stored `[B, S, KV, hd]`, XLA:CPU copied both caches of every layer into
that order at every step: two extra passes over the whole cache.)

A row whose every key is masked (a padding query) gives, as the reference
always has, the mean of the values over all S keys: the masked scores are
the most negative float32, not -inf, so their softmax is uniform and
finite. No gradient reaches `q` or `k` through masked scores.

Implementations (`ModelConfig.attention`):

* `reference`: the scores `[B, KV, G, T, S]` materialised, softmax, values.
  Memory quadratic in the length; kept for tests.
* `blockwise`: keys in chunks of `chunk_size` with a running maximum and
  sum (online softmax, as `entropo.fused` does over the vocabulary), and a
  custom VJP that saves only the output and the softmax maximum and sum per
  query and recomputes each chunk's probabilities in the backward
  (flash-attention style). Neither pass holds more than `[B, KV, G, T, chunk]`, so memory is
  linear in the length. Runs everywhere.
* `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA
  GPUs only, bfloat16 / float16 compute only (see `_cudnn`), for calls
  whose queries fill the keys (T == S: training, a whole prefill); a
  decode step or a prefill into a longer cache takes `blockwise`, which
  reads the head-major cache in place where cuDNN's `[B, S, N, hd]`
  layout would need a transposed copy of it in every layer and step.
* `pallas`: the flash-attention Pallas kernel jax ships for TPUs
  (`jax.experimental.pallas.ops.tpu.flash_attention`), bfloat16 / float16
  compute only (see `_pallas_tpu`). It fits training and any call whose
  queries fill the whole cache (T == S); other calls (decode, a prefill
  into a longer cache) take `blockwise`.
* `auto`: `cudnn` on a GPU and `pallas` on a TPU when the compute dtype is
  bfloat16 or float16, else `blockwise`.
"""

import functools
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "reference", "blockwise", "cudnn", "pallas")
DEFAULT_CHUNK_SIZE = 512

_NEG = float(jnp.finfo(jnp.float32).min)
# The operand dtypes the fused kernels (cuDNN, Pallas) run.
_KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve(implementation: str, compute_dtype, backend: str | None = None
            ) -> str:
  """The implementation `auto` stands for on `backend` (default: JAX's)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"Unknown attention implementation {implementation!r}; expected one "
        f"of {', '.join(repr(i) for i in IMPLEMENTATIONS)}."
    )
  if implementation != "auto":
    return implementation
  backend = backend or jax.default_backend()
  low = jnp.dtype(compute_dtype) in _KERNEL_DTYPES
  if backend in ("gpu", "cuda") and low:
    return "cudnn"
  if backend == "tpu" and low:
    return "pallas"
  return "blockwise"


def check_compute_dtype(implementation: str, compute_dtype) -> None:
  """Raises if `implementation` is a fused kernel (`cudnn`, `pallas`) and
  cannot run `compute_dtype`. `attend` checks every call (decode calls,
  which take blockwise, too) and a model checks when it is built; the
  kernel functions themselves do not."""
  dt = jnp.dtype(compute_dtype)
  if implementation in ("cudnn", "pallas") and dt not in _KERNEL_DTYPES:
    raise ValueError(
        f"attention={implementation!r} needs bfloat16 or float16 compute; "
        f"got {dt}. Use 'blockwise' for float32 policies."
    )


def attend(q, k, v, key_valid, query_slots, *, precision, implementation,
           chunk_size=DEFAULT_CHUNK_SIZE, query_segments=None,
           key_segments=None):
  """Masked grouped-query attention (see the module docstring).

  Args:
    q: `[B, T, KV, G, hd]` queries (compute dtype).
    k: `[B, KV, S, hd]` keys; v: `[B, KV, S, hd]` values.
    key_valid: `[B, S]` bool, keys that exist (not padding, filled slots).
    query_slots: `[T]` int, the slot of each query (causal mask), or
      `[B, T]`, per row.
    precision: the model's `Precision`.
    implementation: one of `IMPLEMENTATIONS`.
    chunk_size: keys per chunk (`blockwise`).
    query_segments: optional `[B, T]` int, the segment of each query;
      key_segments: optional `[B, S]` int, the segment of each key. A query
      attends only to keys of its own segment (packed rows).

  Returns:
    `[B, T, KV, G, hd]` in q's dtype.
  """
  implementation = resolve(implementation, q.dtype)
  check_compute_dtype(implementation, q.dtype)  # decode calls too
  segments = _check_segments(query_segments, key_segments, q, k)
  if implementation == "reference":
    return reference(q, k, v, key_valid, query_slots, precision=precision,
                     segments=segments)
  fills_cache = q.shape[1] == k.shape[2]  # training, a whole prefill
  if implementation == "cudnn" and fills_cache:
    return _cudnn(q, k, v, key_valid, query_slots, precision=precision,
                  segments=segments)
  if implementation == "pallas" and fills_cache:
    return _pallas_tpu(q, k, v, key_valid, precision=precision,
                       segments=segments)
  return blockwise(q, k, v, key_valid, query_slots, precision=precision,
                   chunk_size=chunk_size, segments=segments)


def _check_segments(query_segments, key_segments, q, k):
  """`(query_segments, key_segments)` as int32, or None for no segments."""
  if query_segments is None and key_segments is None:
    return None
  if query_segments is None or key_segments is None:
    raise ValueError("query_segments and key_segments go together; got one.")
  b, t, s = q.shape[0], q.shape[1], k.shape[2]
  if query_segments.shape != (b, t) or key_segments.shape != (b, s):
    raise ValueError(
        f"query_segments must be [B, T] = {(b, t)} and key_segments "
        f"[B, S] = {(b, s)}; got {query_segments.shape} and "
        f"{key_segments.shape}.")
  return query_segments.astype(jnp.int32), key_segments.astype(jnp.int32)


def _same_segment(segments, key_segments_c):
  """`[B, T, C]` bool: the key is in the query's segment (all True
  without segments). `key_segments_c` is the chunk's `[B, C]`."""
  if segments is None:
    return True
  return segments[0][:, :, None] == key_segments_c[:, None, :]


def _allowed(key_valid, key_slots, query_slots):
  """`[B, T, C]` bool: key `s` exists and is at or before the query."""
  causal = key_slots <= query_slots[..., None]  # [T, C] or [B, T, C]
  if causal.ndim == 2:
    causal = causal[None]
  return causal & key_valid[:, None, :]


def _scores(q, k, precision):
  """`[B, KV, G, T, C]` float32 scaled scores."""
  scores = precision.einsum("btkgh,bksh->bkgts", q, k.astype(q.dtype),
                         preferred_element_type=jnp.float32)
  return scores / math.sqrt(q.shape[-1])


def reference(q, k, v, key_valid, query_slots, *, precision, segments=None):
  """The materialised softmax: `[B, KV, G, T, S]` float32 scores.

  `segments`: None or `(query_segments [B, T], key_segments [B, S])`.
  """
  scores = _scores(q, k, precision)
  allowed = _allowed(key_valid, jnp.arange(k.shape[2]), query_slots)
  if segments is not None:
    allowed = allowed & _same_segment(segments, segments[1])
  scores = jnp.where(allowed[:, None, None], scores, _NEG)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = precision.einsum("bkgts,bksh->btkgh", probs, v.astype(probs.dtype))
  return out.astype(q.dtype)


def blockwise(q, k, v, key_valid, query_slots, *, precision,
              chunk_size=DEFAULT_CHUNK_SIZE, segments=None):
  """Online-softmax attention over key chunks (see the module docstring).

  `segments`: None or `(query_segments [B, T], key_segments [B, S])`.
  """
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
  chunk = min(chunk_size, k.shape[2])
  return _blockwise(q, k.astype(q.dtype), v.astype(q.dtype), key_valid,
                    query_slots, chunk, precision, segments)


def _split(x, chunk, fill, axis):
  """Axis `axis` (length S) in `n` chunks, moved to the front: `[n, ...]`,
  the last chunk padded with `fill`."""
  s = x.shape[axis]
  n = -(-s // chunk)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n * chunk - s)
  x = jnp.pad(x, pad, constant_values=fill)
  x = x.reshape(*x.shape[:axis], n, chunk, *x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _chunks(k, v, key_valid, chunk, segments=None):
  """Keys and values `[n, B, KV, C, hd]`, validity `[n, B, C]`, slots and
  existence `[n, C]`, key segments `[n, B, C]` (None without segments)."""
  s = k.shape[2]
  slots = jnp.arange(-(-s // chunk) * chunk).reshape(-1, chunk)  # [n, C]
  key_segments = None if segments is None else _split(segments[1], chunk,
                                                      -1, 1)
  return (_split(k, chunk, 0, 2), _split(v, chunk, 0, 2),
          _split(key_valid, chunk, False, 1), slots, slots < s, key_segments)


def _scan(body, init, xs):
  """`lax.scan`, or one direct call when there is a single chunk.

  Decoding against a cache no longer than a chunk (the common case) then
  runs no loop at all: on CPU a one-trip loop per layer per step costs
  dispatch time.
  """
  if jax.tree.leaves(xs)[0].shape[0] > 1:
    return jax.lax.scan(body, init, xs)
  carry, ys = body(init, jax.tree.map(lambda x: x[0], xs))
  return carry, jax.tree.map(lambda y: y[None], ys)


def _masked_scores(q, k_c, valid_c, slots_c, exists_c, query_slots, precision,
                   segments=None, key_segments_c=None):
  """A chunk's scores, masked as the reference masks them.

  Masked keys score the most negative float32, as in `reference` (so a
  row with no allowed key averages uniformly over the real keys); the
  padding that completes the last chunk scores -inf and weighs nothing.
  Returns the scores `[B, KV, G, T, C]` and `allowed` `[B, 1, 1, T, C]`.
  """
  scores = _scores(q, k_c, precision)
  allowed = _allowed(valid_c, slots_c, query_slots)
  if segments is not None:
    allowed = allowed & _same_segment(segments, key_segments_c)
  allowed = allowed[:, None, None]
  scores = jnp.where(allowed, scores, _NEG)
  return jnp.where(exists_c, scores, -jnp.inf), allowed


def _loop_checks_on_host(backend: str | None = None) -> bool:
  """Whether a loop of data-dependent length syncs with the host per trip.

  XLA:GPU copies a `while_loop`'s condition to the host and waits for the
  device at every trip unless it can infer the trip count (`WhileThunk`);
  on CPU the loop runs on the host anyway and on TPU on the device. Where
  it syncs, the decode step scores every chunk in a loop of known length
  instead of only the filled ones: one such sync per chunk, layer and
  token would cost more than reading the unfilled part of the cache.
  """
  return (backend or jax.default_backend()) in ("gpu", "cuda", "rocm")


def _decode_loop(body, init, k, v, key_valid, query_slots, chunk):
  """One query against a cache: only the chunks up to the query's slot.

  Later slots are never allowed (causal), so they are skipped rather than
  scored and masked: a decode step early in a long cache reads a fraction
  of it. Chunks are sliced from the cache where it lies (no padded,
  transposed copy of it per layer and step); the last one starts at
  `S - chunk` and drops the slots the previous chunk covered. (A query
  with no allowed key, which the sampler never makes, then averages over
  the keys read, not all of them.)
  """
  s = k.shape[2]
  last = jnp.max(query_slots[..., -1])  # the latest row's, per-row slots
  used = jnp.minimum(last // chunk + 1, -(-s // chunk))

  def step(i, carry):
    start = jnp.minimum(i * chunk, s - chunk)
    cut = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, chunk, axis)
    slots = start + jnp.arange(chunk)
    return body(carry, (cut(k, 2), cut(v, 2), cut(key_valid, 1), slots,
                        slots >= i * chunk, None))[0]

  return jax.lax.fori_loop(0, used, step, init)


def _forward(q, k, v, key_valid, query_slots, chunk, precision, segments):
  b, t, kv, g, hd = q.shape
  stat = jnp.full((b, kv, g, t), -jnp.inf, jnp.float32)

  def body(carry, xs):
    m, l, acc = carry  # [B, KV, G, T] twice, [B, KV, G, T, hd] float32
    k_c, v_c, valid_c, slots_c, exists_c, seg_c = xs
    s, _ = _masked_scores(q, k_c, valid_c, slots_c, exists_c, query_slots,
                          precision, segments, seg_c)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    alpha = jnp.exp(m - m_new)  # 0 on the first chunk (m = -inf)
    p = jnp.exp(s - m_new[..., None])  # [B, KV, G, T, C]
    l = l * alpha + jnp.sum(p, axis=-1)
    pv = precision.einsum("bkgts,bksh->bkgth", p.astype(v_c.dtype), v_c,
                       preferred_element_type=jnp.float32)
    return (m_new, l, acc * alpha[..., None] + pv), None

  init = (stat, jnp.zeros_like(stat),
          jnp.zeros((b, kv, g, t, hd), jnp.float32))
  if (t == 1 and chunk < k.shape[2] and segments is None
      and not _loop_checks_on_host()):
    m, l, acc = _decode_loop(body, init, k, v, key_valid, query_slots, chunk)
  else:
    (m, l, acc), _ = _scan(body, init,
                           _chunks(k, v, key_valid, chunk, segments))
  out = jnp.moveaxis(acc / l[..., None], 3, 1).astype(q.dtype)
  # The row statistics stay apart: in a row with no allowed key m is the
  # most negative float32, and m + log(l) would round back to m.
  return out, (m, l)  # [B, T, KV, G, hd], [B, KV, G, T] twice


# `segments` (None or two int arrays) comes last, so that the positions
# of the other arguments stay as they were.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blockwise(q, k, v, key_valid, query_slots, chunk, precision, segments):
  return _forward(q, k, v, key_valid, query_slots, chunk, precision,
                  segments)[0]


def _blockwise_fwd(q, k, v, key_valid, query_slots, chunk, precision, segments):
  out, stats = _forward(q, k, v, key_valid, query_slots, chunk, precision,
                        segments)
  return out, (q, k, v, key_valid, query_slots, segments, out, stats)


def _blockwise_bwd(chunk, precision, residuals, d_out):
  q, k, v, key_valid, query_slots, segments, out, (m, l) = residuals
  s_len, dt = k.shape[2], q.dtype
  scale = 1.0 / math.sqrt(q.shape[-1])
  # delta = rowsum(dO * O) = sum_s p_s dp_s, the softmax Jacobian's term.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32),
                  axis=-1)  # [B, T, KV, G]: elementwise, not a dot
  delta = jnp.moveaxis(delta, 1, 3)  # [B, KV, G, T]
  d_out = d_out.astype(dt)
  # Transposed operands laid out once, outside the loop, behind a barrier:
  # XLA:CPU cannot run a bfloat16 x bfloat16 -> float32 dot whose operand
  # it has folded a transpose into (see entropo/fused.py).
  q_t, d_out_t = jax.lax.optimization_barrier(
      (jnp.moveaxis(q, 1, 3), jnp.moveaxis(d_out, 1, 3)))  # [B, KV, G, T, hd]

  def body(dq, xs):
    k_c, v_c, valid_c, slots_c, exists_c, seg_c = xs
    s, allowed = _masked_scores(q, k_c, valid_c, slots_c, exists_c,
                                query_slots, precision, segments, seg_c)
    p = jnp.exp(s - m[..., None]) / l[..., None]  # [B, KV, G, T, C]
    dp = precision.einsum("btkgh,bksh->bkgts", d_out, v_c,
                       preferred_element_type=jnp.float32)
    ds = jnp.where(allowed, p * (dp - delta[..., None]), 0.0) * scale
    p_t, ds_t = jax.lax.optimization_barrier(
        (jnp.swapaxes(p, 3, 4).astype(dt), jnp.swapaxes(ds, 3, 4).astype(dt)))
    dv_c = precision.einsum("bkgst,bkgth->bksh", p_t, d_out_t,
                         preferred_element_type=jnp.float32)
    dk_c = precision.einsum("bkgst,bkgth->bksh", ds_t, q_t,
                         preferred_element_type=jnp.float32)
    # dq accumulates head-major, the dot's natural output; transposed once
    # after the loop.
    dq = dq + precision.einsum("bkgts,bksh->bkgth", ds.astype(dt), k_c,
                            preferred_element_type=jnp.float32)
    return dq, (dk_c, dv_c)

  xs = _chunks(k, v, key_valid, chunk, segments)
  dq, (dk, dv) = _scan(body, jnp.zeros(q_t.shape, jnp.float32), xs)
  dq = jnp.moveaxis(dq, 3, 1)  # [B, T, KV, G, hd]
  def unsplit(x):  # [n, B, KV, C, hd] -> [B, KV, S, hd]
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(*x.shape[:2], -1, x.shape[-1])[:, :, :s_len]

  dq, dk, dv = jax.lax.optimization_barrier((dq, unsplit(dk), unsplit(dv)))
  no_segments = None if segments is None else (None, None)
  return (dq.astype(dt), dk.astype(k.dtype), dv.astype(v.dtype), None, None,
          no_segments)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _cudnn(q, k, v, key_valid, query_slots, *, precision, segments=None):
  """`jax.nn.dot_product_attention` with cuDNN's fused kernel (GPU only).

  The API takes no `precision`: cuDNN's flash-attention kernel multiplies
  bfloat16 (float16) operands exactly and accumulates both products in
  float32, with the softmax in float32, which is the policy's algorithm for
  such operands (`BF16_BF16_F32`, `F16_F16_F32`). It does not run float32
  operands, so a float32 policy never takes this path (`auto` picks
  `blockwise`; `attend` refuses `cudnn` with float32). The mask is passed as a
  `[B, 1, T, S]` bool array, which jax turns into an additive bias in the
  compute dtype that each layer saves for the backward (quadratic in the
  length, though one array per layer rather than float32 scores per head;
  `entropo.planning` counts it). Keys and values are transposed to the
  API's `[B, S, N, hd]`. Segments (packed rows) are one more term of the
  bool mask. Its test against the float64 reference
  (`tests/test_attention.py::test_cudnn_kernel_matches_float64_reference`)
  runs on GPUs only (`benchmarks/gpu.sh`); no GPU has run it yet.
  """
  dt = jnp.dtype(q.dtype)
  del precision  # the kernel's algorithm is fixed; see the docstring
  b, t, kv, g, hd = q.shape
  mask = _allowed(key_valid, jnp.arange(k.shape[2]), query_slots)
  if segments is not None:
    mask = mask & _same_segment(segments, segments[1])
  mask = mask[:, None]
  keys_first = lambda x: jnp.swapaxes(x.astype(dt), 1, 2)  # the API's BTNH  # noqa
  out = jax.nn.dot_product_attention(
      q.reshape(b, t, kv * g, hd), keys_first(k), keys_first(v), mask=mask,
      implementation="cudnn")
  return out.reshape(b, t, kv, g, hd)


PALLAS_BLOCK = 128  # the kernel's default block; lengths are padded to it


def _pallas_tpu(q, k, v, key_valid, *, precision, segments=None):
  """jax's Pallas flash-attention kernel for TPUs, for T == S.

  With as many queries as keys, the query slots are `arange(T)` and the
  kernel's causal mask is ours; padding becomes segment ids (queries in
  segment 1, keys in 1 if valid, else 0), and the length is padded to a
  multiple of `PALLAS_BLOCK` with keys in segment 0. Packed rows
  (`segments`) shift their segment ids up by one, so that 0 stays the
  padding: queries `query_segments + 1`, valid keys `key_segments + 1`.
  Grouped-query heads
  repeat each key/value head G times (memory stays linear in the length);
  the repeat's transpose sums the key and value gradients over the group.

  Like cuDNN's kernel it takes no precision: it multiplies bfloat16
  (float16) operands with float32 accumulation and a float32 softmax, the
  policy's algorithm for such operands, so `attend` refuses float32 for
  it (tests call it directly with float32 in TPU interpret mode, where
  float32 dots are exact). One difference from the reference: a query with
  no allowed key at all (left padding before the first token) gets the
  mean of the values of its causal blocks rather than of all S keys; such
  rows carry no loss. Tested on CPU in TPU interpret mode
  (`jax.experimental.pallas.tpu.force_tpu_interpret_mode`), not on a TPU.
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
  dt = jnp.dtype(q.dtype)
  del precision  # the kernel's algorithm is fixed; see the docstring
  b, t, kv, g, hd = q.shape
  pad = -t % PALLAS_BLOCK
  pad_keys = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))  # noqa
  heads = lambda x: pad_keys(x.reshape(b, t, kv * g, hd).transpose(0, 2, 1, 3))  # noqa
  kv_heads = lambda x: pad_keys(jnp.repeat(x.astype(dt), g, axis=1))  # noqa
  pad_ids = lambda x, fill: jnp.pad(x, ((0, 0), (0, pad)),  # noqa
                                    constant_values=fill)
  if segments is None:
    q_seg = jnp.ones((b, t + pad), jnp.int32)
    kv_seg = pad_ids(key_valid.astype(jnp.int32), 0)
  else:
    q_seg = pad_ids(segments[0] + 1, 1)
    kv_seg = pad_ids(jnp.where(key_valid, segments[1] + 1, 0), 0)
  segments = fa.SegmentIds(q=q_seg, kv=kv_seg)
  out = fa.flash_attention(heads(q), kv_heads(k), kv_heads(v),
                           segment_ids=segments, causal=True,
                           sm_scale=1.0 / math.sqrt(hd))
  return out[:, :, :t].transpose(0, 2, 1, 3).reshape(b, t, kv, g, hd)
