"""A Flax NNX decoder-only transformer for the Llama / Qwen2 / Qwen3 family.

RMSNorm, rotary embeddings (non-interleaved halves, as in the Hugging Face
implementations), grouped-query attention with optional q/k/v biases (Qwen2)
and q/k RMSNorm (Qwen3), a SwiGLU MLP, tied or untied output projection.

`model(tokens, ...)` returns final hidden states `[B, T, D]`: training feeds
them with `model.lm_head_matrix()` to `entropo.fused_logprobs_entropy`, so
`[B, T, V]` logits are never materialised. `model.logits(tokens)` exists for
small vocabularies and tests.

Every parameter carries `logical_axes` metadata over the names `vocab`,
`embed`, `heads`, `kv`, `head_dim` and `mlp`; `entropo.sharding` maps them to
mesh axes.

Dtypes come from a `Precision` policy: parameters are stored in
`param_dtype`, the body computes in `compute_dtype`, normalisation
statistics and the attention softmax run in float32, and the head is left
to the policy's `head_product`. Every contraction runs through the policy's
`einsum`/`matmul`, which name its dot algorithm (float32 means float32 on a
GPU or TPU too, not TF32 or one bfloat16 pass).

Each projection may carry a LoRA adapter (`entropo.models.lora`:
`add_lora`), added to its output under the same policy.

Attention is `entropo.models.attention.attend` with the implementation
`config.attention` names (`auto`: memory-linear `blockwise` on CPU and TPU,
cuDNN's kernel on GPUs with bf16/fp16 compute); training, prefill and decode
all call it. `remat=` rematerialises each block in the backward pass:
`none`; `block` saves only each block's input (and the rotary tables and
masks it shares with the others) and recomputes the rest;
`block_save_dots` also saves the outputs of the projections and MLP
matmuls (dots without batch dimensions), recomputing the attention core and
the elementwise work. `scan_layers=True` runs the blocks of a call without
a cache as one `jax.lax.scan` over their weights, stacked at each call:
compile time no longer grows with depth, and XLA cannot undo the remat by
scheduling every block's recomputation early, which it does to an
unrolled loop on CPU (docs/benchmarks.md). The price is a stacked copy of
the block weights (and of their gradients) per call; the decode step keeps
the unrolled loop.

The KV cache is a plain pytree owned by the caller (the sampler):
`{"k": [L][B, KV, S, hd], "v": ..., "valid": [B, S] bool}` (head-major:
see `entropo.models.attention`). A call with
`cache=` and `cache_index=i` writes the new keys and values at slots
`i .. i + T` and attends over every valid slot at or before each query's
slot. `cache_index` may also be `[B]`, a slot per row (the in-flight
sampler, `entropo.models.inflight`, whose rows are at different steps):
row `b` writes at `i[b] .. i[b] + T`.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from entropo import precision as precision_lib
from entropo.models import attention as attention_lib
from entropo.models import lora as lora_lib
from entropo.models.config import ModelConfig

REMAT_OPTIONS = ("none", "block", "block_save_dots")
_REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "block_save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs, shape, axes, *, std, dtype):
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value.astype(dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
  """`x / rms(x) * scale`, statistics in float32."""

  def __init__(self, dim: int, *, eps: float, axes, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=axes)
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return normed * self.scale[...].astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float):
  """`(cos, sin)`, each `[B, T, head_dim]` float32, for integer positions."""
  inv_freq = 1.0 / (
      theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  )  # [hd/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, hd]
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """Rotates `x: [B, T, N, hd]` by position (halves layout)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention with RoPE and an optional KV cache."""

  def __init__(self, config: ModelConfig, precision, *, rngs: nnx.Rngs):
    d, h, kv, hd = (config.hidden_size, config.num_heads, config.num_kv_heads,
                    config.head_dim)
    dt = precision.param_dtype
    std = 1.0 / math.sqrt(d)
    self.q_proj = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"),
                         std=std, dtype=dt)
    self.k_proj = _param(rngs, (d, kv, hd), ("embed", "kv", "head_dim"),
                         std=std, dtype=dt)
    self.v_proj = _param(rngs, (d, kv, hd), ("embed", "kv", "head_dim"),
                         std=std, dtype=dt)
    self.o_proj = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"),
                         std=1.0 / math.sqrt(h * hd), dtype=dt)
    if config.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((h, hd), dt),
                              logical_axes=("heads", "head_dim"))
      self.k_bias = nnx.Param(jnp.zeros((kv, hd), dt),
                              logical_axes=("kv", "head_dim"))
      self.v_bias = nnx.Param(jnp.zeros((kv, hd), dt),
                              logical_axes=("kv", "head_dim"))
    if config.qk_norm:
      self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps, axes=("head_dim",),
                            dtype=dt)
      self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps, axes=("head_dim",),
                            dtype=dt)
    self.config = config
    self.precision = precision

  def __call__(self, x, cos, sin, key_valid, query_slots, cache=None,
               cache_index=None, segment_ids=None):
    """x: `[B, T, D]`; key_valid: `[B, S]`; query_slots: `[T]` int;
    segment_ids: optional `[B, T]` int of packed rows (no cache; T == S).

    Returns `(out [B, T, D], (k, v))` where `(k, v)` are the keys/values
    attended over (`[B, KV, S, hd]`, the updated cache when given).
    """
    cfg, precision = self.config, self.precision
    cast = precision.cast_compute
    q = self._project("q_proj", "btd,dhk->bthk", x)
    k = self._project("k_proj", "btd,dhk->bthk", x)
    v = self._project("v_proj", "btd,dhk->bthk", x)
    if cfg.qkv_bias:
      q = q + cast(self.q_bias[...])
      k = k + cast(self.k_bias[...])
      v = v + cast(self.v_bias[...])
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, KV, T, hd]
    if cache is not None:
      k_all, v_all = cache
      k = _write_cache(k_all, k, cache_index)
      v = _write_cache(v_all, v, cache_index)
    b, t = x.shape[:2]
    group = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, group, cfg.head_dim)
    out = attention_lib.attend(q, k, v, key_valid, query_slots,
                               precision=precision,
                               implementation=cfg.attention,
                               chunk_size=cfg.attention_chunk_size,
                               query_segments=segment_ids,
                               key_segments=segment_ids)
    out = out.reshape(b, t, cfg.num_heads, cfg.head_dim).astype(x.dtype)
    out = self._project("o_proj", "bthk,hkd->btd", out)
    return out, (k, v)

  def _project(self, name, spec, x):
    """Projection `name` of `x` under the policy, plus its LoRA adapter."""
    precision = self.precision
    y = precision.einsum(spec, x,
                         precision.cast_compute(getattr(self, name)[...]))
    return lora_lib.adapted(self, name, x, y)


def _write_cache(cache, new, index):
  """`new: [B, KV, T, hd]` written into `cache: [B, KV, S, hd]` at slot
  `index` (a scalar), or row `b` at `index[b]` (`[B]`)."""
  new = new.astype(cache.dtype)
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=2)
  b, t = new.shape[0], new.shape[2]
  slots = index[:, None] + jnp.arange(t)  # [B, T]
  # Two advanced indices around a slice: the update is `[B, T, KV, hd]`.
  return cache.at[jnp.arange(b)[:, None], :, slots].set(
      jnp.swapaxes(new, 1, 2), mode="drop")


class MLP(nnx.Module):
  """SwiGLU: `down(silu(gate(x)) * up(x))`."""

  def __init__(self, config: ModelConfig, precision, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    dt = precision.param_dtype
    self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"),
                            std=1.0 / math.sqrt(d), dtype=dt)
    self.up_proj = _param(rngs, (d, f), ("embed", "mlp"),
                          std=1.0 / math.sqrt(d), dtype=dt)
    self.down_proj = _param(rngs, (f, d), ("mlp", "embed"),
                            std=1.0 / math.sqrt(f), dtype=dt)
    self.precision = precision

  def __call__(self, x):
    gate = self._project("gate_proj", x)
    up = self._project("up_proj", x)
    return self._project("down_proj", jax.nn.silu(gate) * up)

  def _project(self, name, x):
    """Projection `name` of `x` under the policy, plus its LoRA adapter."""
    precision = self.precision
    y = precision.matmul(x, precision.cast_compute(getattr(self, name)[...]))
    return lora_lib.adapted(self, name, x, y)


class Block(nnx.Module):
  """Pre-norm decoder block: attention and MLP with residuals."""

  def __init__(self, config: ModelConfig, precision, *, rngs: nnx.Rngs):
    dt = precision.param_dtype
    self.input_layernorm = RMSNorm(config.hidden_size,
                                   eps=config.rms_norm_eps, axes=("embed",),
                                   dtype=dt)
    self.attn = Attention(config, precision, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size,
                                            eps=config.rms_norm_eps,
                                            axes=("embed",), dtype=dt)
    self.mlp = MLP(config, precision, rngs=rngs)

  def __call__(self, x, cos, sin, key_valid, query_slots, cache=None,
               cache_index=None, segment_ids=None):
    attn, kv = self.attn(self.input_layernorm(x), cos, sin, key_valid,
                         query_slots, cache, cache_index, segment_ids)
    x = x + attn
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, kv


def default_positions(attention_mask):
  """Positions counting valid tokens: `cumsum(mask) - 1`, clipped at 0.

  Works for left- and right-padded rows alike.
  """
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1,
                     0)


def segment_positions(segment_ids):
  """`[B, T]` int32 positions that restart at 0 where each segment starts.

  For packed rows (`entropo.packing`): a segment is a run of equal ids, so
  each sequence gets the positions it has alone in a row of its own
  (`default_positions` of its tokens). Padding (id 0) counts on from its
  start like any run; it attends to nothing that matters.
  """
  t = segment_ids.shape[-1]
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool),
       segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)  # [B, T]
  first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)  # [B, T]
  return index - first


class Transformer(nnx.Module):
  """The decoder. See the module docstring."""

  def __init__(self, config: ModelConfig, *, precision="fp32",
               rngs: nnx.Rngs, remat: str = "none",
               scan_layers: bool = False):
    if remat not in REMAT_OPTIONS:
      raise ValueError(
          f"Unknown remat {remat!r}; expected one of "
          f"{', '.join(repr(r) for r in REMAT_OPTIONS)}."
      )
    precision = precision_lib.get_precision(precision)
    attention_lib.check_compute_dtype(config.attention, precision.compute_dtype)
    self.remat = remat
    self.scan_layers = bool(scan_layers)
    dt = precision.param_dtype
    self.config = config
    self.precision = precision
    self.embed_tokens = _param(rngs, (config.vocab_size, config.hidden_size),
                               ("vocab", "embed"), std=1.0, dtype=dt)
    self.layers = nnx.List(
        [Block(config, precision, rngs=rngs) for _ in range(config.num_layers)]
    )
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                        axes=("embed",), dtype=dt)
    if not config.tie_word_embeddings:
      self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size),
                            ("embed", "vocab"),
                            std=1.0 / math.sqrt(config.hidden_size),
                            dtype=dt)

  def lm_head_matrix(self) -> jax.Array:
    """The output projection `[D, V]` (the embedding transposed if tied)."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens[...].T
    return self.lm_head[...]

  def init_cache(self, batch: int, length: int, *, dtype=None) -> dict:
    """An empty KV cache for `batch` rows and `length` slots."""
    cfg = self.config
    dtype = self.precision.compute_dtype if dtype is None else dtype
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    return {
        "k": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        "v": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        "valid": jnp.zeros((batch, length), bool),
    }

  def __call__(self, tokens, *, attention_mask=None, positions=None,
               cache=None, cache_index=None, segment_ids=None):
    """Final hidden states `[B, T, D]` (compute dtype).

    Args:
      tokens: `[B, T]` int.
      attention_mask: `[B, T]` bool, valid tokens (default all).
      positions: `[B, T]` int rotary positions (default counts valid
        tokens, see `default_positions`).
      cache: optional KV cache from `init_cache`; then `cache_index` (int
        scalar, may be traced) is the slot of `tokens[:, 0]`, and the call
        returns `(hidden, new_cache)`. A `[B]` `cache_index` gives each
        row its own slot.
      segment_ids: optional `[B, T]` int of packed rows (`entropo.packing`,
        no cache): several sequences per row, ids 1, 2, ... and 0 for
        padding. Attention stays within a segment, `attention_mask`
        defaults to `segment_ids > 0` and `positions` restart per segment
        (`segment_positions`), so each sequence's hidden states are those
        it gets in a row of its own.

    Returns:
      `hidden`, or `(hidden, new_cache)` when `cache` is given.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
          f"tokens must be a [B, T] int array; got {tokens.dtype} "
          f"{tokens.shape}."
      )
    cfg, precision = self.config, self.precision
    b, t = tokens.shape
    if segment_ids is not None:
      if cache is not None:
        raise ValueError("segment_ids (packed rows) take no cache.")
      if attention_mask is None:
        attention_mask = segment_ids > 0
      if positions is None:
        positions = segment_positions(segment_ids)
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    if positions is None:
      positions = default_positions(attention_mask)
    x = precision.cast_compute(jnp.take(self.embed_tokens[...], tokens, axis=0))
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    if cache is None:
      key_valid, query_slots = attention_mask, jnp.arange(t)
    else:
      if cache_index is None:
        raise ValueError("cache_index is required with cache.")
      key_valid, query_slots = _cache_slots(cache["valid"], attention_mask,
                                            cache_index)
    if cache is None and self.scan_layers:
      x = _scan_blocks(self.layers, self.remat, x, cos, sin, key_valid,
                       query_slots, segment_ids)
      return self.norm(x)
    if cache is None:
      apply = _block_apply(self.remat)
      for layer in self.layers:
        x = apply(layer, x, cos, sin, key_valid, query_slots, segment_ids)
      return self.norm(x)
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      x, (k, v) = layer(x, cos, sin, key_valid, query_slots,
                        (cache["k"][i], cache["v"][i]), cache_index)
      new_k.append(k)
      new_v.append(v)
    hidden = self.norm(x)
    return hidden, {"k": new_k, "v": new_v, "valid": key_valid}

  def attention_implementation(self) -> str:
    """What `config.attention` resolves to here (for run metadata)."""
    return attention_lib.resolve(self.config.attention,
                                 self.precision.compute_dtype)

  def logits(self, tokens, *, attention_mask=None, positions=None,
             segment_ids=None):
    """`[B, T, V]` float32 logits through the precision policy's head."""
    hidden = self(tokens, attention_mask=attention_mask, positions=positions,
                  segment_ids=segment_ids)
    logits = self.precision.head_product(hidden, self.lm_head_matrix())
    return self.precision.round_logits(logits)


def _cache_slots(valid, attention_mask, cache_index):
  """The cache's validity `[B, S]` with the new tokens' written at
  `cache_index` (scalar, or `[B]` per row), and the queries' slots (`[T]`,
  or `[B, T]` per row)."""
  t = attention_mask.shape[1]
  if jnp.ndim(cache_index) == 0:
    return (jax.lax.dynamic_update_slice_in_dim(valid, attention_mask,
                                                cache_index, axis=1),
            cache_index + jnp.arange(t))
  slots = cache_index[:, None] + jnp.arange(t)  # [B, T]
  rows = jnp.arange(valid.shape[0])[:, None]
  return valid.at[rows, slots].set(attention_mask, mode="drop"), slots


def _apply_block(block, x, cos, sin, key_valid, query_slots,
                 segment_ids=None):
  return block(x, cos, sin, key_valid, query_slots,
               segment_ids=segment_ids)[0]


def _scan_blocks(layers, remat, x, *inputs):
  """The blocks as one scan over their stacked weights (`scan_layers`)."""
  graphdef, _ = nnx.split(layers[0])
  stacked = jax.tree.map(lambda *ws: jnp.stack(ws),
                         *(nnx.split(layer)[1] for layer in layers))

  def body(x, state):
    return _apply_block(nnx.merge(graphdef, state), x, *inputs), None

  if remat != "none":
    body = jax.checkpoint(body, policy=_REMAT_POLICIES[remat])
  x, _ = jax.lax.scan(body, x, stacked)
  return x


def _block_apply(remat: str):
  """`(block, x, ...) -> x`, rematerialised as `remat` says."""
  if remat == "none":
    return _apply_block
  return nnx.remat(_apply_block, policy=_REMAT_POLICIES[remat])


def with_precision(model: Transformer, precision) -> Transformer:
  """The same model (the same parameter arrays) under another precision.

  Every module's `precision` is replaced by the given one, on a new module graph
  over the same variables' values, so `model` itself is unchanged and no
  weight is copied. This is the sampler of a run whose sampling precision
  differs from the trainer's (`sampling.precision`): bf16 sampling of an
  fp32-trained policy, as vLLM or SGLang beside an fp32 trainer. Returns
  `model` itself when the policies are equal. The parameters' storage
  dtype must agree (every preset keeps float32 master weights).
  """
  precision = precision_lib.get_precision(precision)
  if precision == model.precision:
    return model
  if jnp.dtype(precision.param_dtype) != jnp.dtype(model.precision.param_dtype):
    raise ValueError(
        f"with_precision keeps the weights as they are: the precision "
        f"{precision.name!r} stores parameters in {precision.param_dtype}, the "
        f"model's {model.precision.name!r} in {model.precision.param_dtype}.")
  attention_lib.check_compute_dtype(model.config.attention,
                                    precision.compute_dtype)
  graphdef, state = nnx.split(model)
  clone = nnx.merge(graphdef, state)
  for _, module in nnx.iter_modules(clone):
    # (A flax module such as `nnx.Linear` has a `precision` too, a
    # `jax.lax.Precision`: left alone.)
    if isinstance(getattr(module, "precision", None),
                  precision_lib.Precision):
      module.precision = precision
  return clone
