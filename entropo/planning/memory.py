"""The memory model: parameter counts and per-device bytes of an RL iteration.

It reads a `ModelConfig`, a precision preset and the sharding rules of
`entropo.sharding`, and allocates nothing.

What an RL iteration holds on each device, in the order it runs:

* resident: parameters (`param_dtype`), AdamW's two moments (optax keeps
  them in the parameters' dtype, float32 in every preset) and, with a KL
  term, the reference parameters. With LoRA (`lora_rank`) the moments,
  gradients and updated copies are the float32 adapters' alone, and the
  KL reference is the base model (adapters off), no copy. Sharded by the
  logical-axis rules, so a dimension the mesh axis does not divide is
  replicated, as in training.
* sample: the sampler's KV cache (`2 x layers x B x S x KV x head_dim` in
  `sampler_dtype`), a copy of the weights cast to `sampler_dtype` (XLA
  hoists the cast out of the decode loop), the prefill of one layer (its
  scores are `[B, H, P, S]`) and the last position's `[B, V]` logits.
* prepare: the trainer's forward over the whole rollout batch (old
  log-probs and entropy), one layer live at a time, no gradients.
* update: forward and backward on one minibatch. Without remat every
  layer's activations are saved: the residuals JAX keeps for a block.
  With `attention="reference"` they include four `[B, H, T, T]` arrays
  (the mask, float32 scores, their exp, the probabilities); the blockwise
  attention (`entropo.models.attention`, and cuDNN's kernel) keeps one
  float32 log-sum-exp per head and query instead, and its backward holds
  one key chunk of scores, probabilities and their gradients at a time
  (`[B, H, T, attention_chunk_size]`). `remat="block"` saves only each
  block's input and recomputes one block at a time in the backward;
  `"block_save_dots"` also saves the block's matmul outputs. The fused
  head (`fused_logprobs_entropy`) keeps `O(tokens x chunk)` temporaries
  instead of `[B, T, V]` logits.
  Gradients (`param_dtype`) build up while activations are freed, so the
  step peaks either when the backward pass starts (all activations) or
  when it ends (all gradients, plus the optimizer's outputs: without
  buffer donation, which `Learner.update` does not use, new parameters and
  moments are allocated beside the old ones).

Activations follow the batch split over `data x fsdp`; head- and MLP-sized
ones are also split over `tensor` (when it divides H, KV or F), model-width
ones are not (no sequence parallelism). With `fsdp > 1`, two layers of
all-gathered weights (prefetch) and one layer of unsharded gradients are
live at a time.

These are estimates, not measurements: XLA's temporaries beyond the ones
named above, fusion decisions, rematerialisation by the compiler, memory
fragmentation, the runtime's own reservations and the host side are not
modelled. `Hardware.budget` keeps a margin for them.
"""

import dataclasses
import functools
import math

import numpy as np

from entropo import precision as precision_lib
from entropo import sharding
from entropo.models import attention as attention_lib
from entropo.models import transformer as transformer_lib
from entropo.models.config import ModelConfig

# What each attention implementation costs: "reference" materialises the
# scores; the others are memory-linear in the sequence length.
ATTENTION_OPTIONS = ("reference", "blockwise", "cudnn")

@dataclasses.dataclass(frozen=True)
class ParamShape:
  """A parameter of `entropo.models.Transformer`, `count` times (per layer)."""

  name: str
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  count: int = 1


def param_shapes(cfg: ModelConfig) -> list[ParamShape]:
  """Every parameter's shape and logical axes, as the Transformer builds it.

  Per-layer parameters appear once with `count = num_layers`.
  """
  d, f, h, kv, hd, n = (cfg.hidden_size, cfg.intermediate_size,
                        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.num_layers)
  out = [ParamShape("embed_tokens", (cfg.vocab_size, d), ("vocab", "embed")),
         ParamShape("norm/scale", (d,), ("embed",))]
  if not cfg.tie_word_embeddings:
    out.append(ParamShape("lm_head", (d, cfg.vocab_size), ("embed", "vocab")))
  layer = [
      ("input_layernorm/scale", (d,), ("embed",)),
      ("post_attention_layernorm/scale", (d,), ("embed",)),
      ("attn/q_proj", (d, h, hd), ("embed", "heads", "head_dim")),
      ("attn/k_proj", (d, kv, hd), ("embed", "kv", "head_dim")),
      ("attn/v_proj", (d, kv, hd), ("embed", "kv", "head_dim")),
      ("attn/o_proj", (h, hd, d), ("heads", "head_dim", "embed")),
      ("mlp/gate_proj", (d, f), ("embed", "mlp")),
      ("mlp/up_proj", (d, f), ("embed", "mlp")),
      ("mlp/down_proj", (f, d), ("mlp", "embed")),
  ]
  if cfg.qkv_bias:
    layer += [("attn/q_bias", (h, hd), ("heads", "head_dim")),
              ("attn/k_bias", (kv, hd), ("kv", "head_dim")),
              ("attn/v_bias", (kv, hd), ("kv", "head_dim"))]
  if cfg.qk_norm:
    layer += [("attn/q_norm/scale", (hd,), ("head_dim",)),
              ("attn/k_norm/scale", (hd,), ("head_dim",))]
  out += [ParamShape(f"layers/*/{name}", shape, axes, n)
          for name, shape, axes in layer]
  return out


# What `entropo.models.add_lora` adapts: (the weight in `param_shapes`, its
# number of leading input dims).
_LORA_WEIGHTS = {
    "q_proj": ("attn/q_proj", 1), "k_proj": ("attn/k_proj", 1),
    "v_proj": ("attn/v_proj", 1), "o_proj": ("attn/o_proj", 2),
    "gate_proj": ("mlp/gate_proj", 1), "up_proj": ("mlp/up_proj", 1),
    "down_proj": ("mlp/down_proj", 1),
}
LORA_TARGETS = tuple(_LORA_WEIGHTS)


def lora_shapes(cfg: ModelConfig, rank: int,
                targets=LORA_TARGETS) -> list[ParamShape]:
  """The adapters `add_lora(rank=rank, targets=targets)` adds: `A` is
  `[*in_dims, r]` and `B` `[r, *out_dims]` of each targeted weight, with
  its logical axes (the rank axis unsharded), `count = num_layers`."""
  weights = {p.name.removeprefix("layers/*/"): p for p in param_shapes(cfg)}
  out = []
  for target in targets:
    name, num_in = _LORA_WEIGHTS[target]
    w = weights[name]
    out.append(ParamShape(f"layers/*/{name}/lora/a",
                          (*w.shape[:num_in], rank),
                          (*w.axes[:num_in], None), w.count))
    out.append(ParamShape(f"layers/*/{name}/lora/b",
                          (rank, *w.shape[num_in:]),
                          (None, *w.axes[num_in:]), w.count))
  return out


def param_count(cfg: ModelConfig, *, embeddings: bool = True) -> int:
  """Number of parameters of the model.

  `embeddings=False` leaves out the embedding and the untied output
  projection: the "non-embedding" count that model cards give.
  """
  return sum(math.prod(p.shape) * p.count for p in param_shapes(cfg)
             if embeddings or p.name not in ("embed_tokens", "lm_head"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshShape:
  """Sizes of the `(data, fsdp, tensor)` mesh (`--config.mesh.*`)."""

  data: int = 1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    for name in sharding.MESH_AXES:
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"MeshShape.{name} must be a positive int; got "
                         f"{value!r}.")

  @property
  def shape(self) -> dict[str, int]:
    """Axis sizes by name, as `jax.sharding.Mesh.shape` gives them."""
    return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

  @property
  def size(self) -> int:
    return self.data * self.fsdp * self.tensor

  @property
  def batch_shards(self) -> int:
    """How many ways the batch is split (`data x fsdp`)."""
    return self.data * self.fsdp

  def flags(self) -> str:
    return (f"--config.mesh.data={self.data} --config.mesh.fsdp={self.fsdp} "
            f"--config.mesh.tensor={self.tensor}")


def _local_elements(p: ParamShape, mesh: MeshShape, rules) -> int:
  """Elements of one copy of `p` held by each device under `rules`."""
  spec = sharding.logical_to_spec(p.axes, p.shape, mesh, rules)
  return math.prod(size // (mesh.shape[axis] if axis else 1)
                   for size, axis in zip(p.shape, spec))


def params_per_device(cfg: ModelConfig, mesh: MeshShape,
                      rules=sharding.DEFAULT_RULES) -> int:
  """Parameter elements each device holds under the logical-axis rules."""
  outside, layer = _split_params(cfg, mesh, _rules_key(rules))
  return outside + cfg.num_layers * layer


def _rules_key(rules):
  """Rules as a hashable tuple of `(logical, mesh axis)` pairs."""
  return tuple(dict(rules).items())


@functools.lru_cache(maxsize=1024)
def _split_params(cfg, mesh, rules):
  """`(outside layers, one layer)` parameter elements per device.

  Cached: the tables evaluate the same model and mesh many times.
  """
  outside = layer = 0
  for p in param_shapes(cfg):
    if p.name.startswith("layers/"):
      layer += _local_elements(p, mesh, rules)
    else:
      outside += _local_elements(p, mesh, rules)
  return outside, layer


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
  """Bytes per device, by what holds them (see the module docstring).

  Resident: `params`, `optimizer`, `reference`. Phase-specific: `kv_cache`,
  `sample_weights`, `sample_working` (sampling); `prepare_working` (the
  trainer's forward over the rollout); `activations`, `weight_casts`,
  `update_working`, `gradients`, `update_outputs` (the update).
  """

  params: float
  optimizer: float
  reference: float
  kv_cache: float
  sample_weights: float
  sample_working: float
  prepare_working: float
  activations: float
  weight_casts: float
  update_working: float
  gradients: float
  update_outputs: float

  @property
  def resident(self) -> float:
    return self.params + self.optimizer + self.reference

  @property
  def sample_peak(self) -> float:
    return (self.resident + self.kv_cache + self.sample_weights
            + self.sample_working)

  @property
  def prepare_peak(self) -> float:
    return self.resident + self.prepare_working

  @property
  def backward_start(self) -> float:
    """The update when its backward pass starts: every saved activation."""
    return (self.resident + self.activations + self.weight_casts
            + self.update_working)

  @property
  def backward_end(self) -> float:
    """The update when the gradients are complete and the optimizer runs."""
    return self.resident + self.gradients + self.update_outputs

  @property
  def update_peak(self) -> float:
    return max(self.backward_start, self.backward_end)

  def phase_peaks(self, phase: str) -> tuple[float, ...]:
    """The peaks that must fit for `phase` (`update` or `rollout`)."""
    if phase == "update":
      return (self.backward_start, self.backward_end)
    if phase == "rollout":
      return (self.sample_peak, self.prepare_peak)
    raise ValueError(f"phase must be 'update' or 'rollout'; got {phase!r}.")

  @property
  def peak(self) -> float:
    return max(self.sample_peak, self.prepare_peak, self.update_peak)


def _itemsize(dtype) -> int:
  return np.dtype(dtype).itemsize


def block_token_bytes(cfg: ModelConfig, mesh: MeshShape, c: int, keys: int,
                      attention: str = "blockwise",
                      attention_chunk_size: int =
                      attention_lib.DEFAULT_CHUNK_SIZE
                      ) -> tuple[float, float, float]:
  """`(saved, working, dots)` bytes per token, per device, of one block.

  `saved` is what autodiff keeps for the backward pass: the residuals JAX
  records for `entropo.models.transformer.Block` (tests/test_scaling.py
  checks the count against `jax.ad_checkpoint.print_saved_residuals`).
  `working` is what one block's backward adds while it runs: cotangents
  of its activations and the attention's score-sized arrays (all keys for
  the reference attention, one key chunk for the blockwise one). `dots`
  is what `remat="block_save_dots"` saves: the block's input and the
  outputs of its projections (dots without batch dimensions; attention's
  own contractions are recomputed). Model-width arrays are replicated over `tensor`; heads,
  KV heads and the MLP width are split when it divides them (as the
  weights are). `keys` is the number of attended positions, `c` the
  compute dtype's size.
  """
  if attention not in ATTENTION_OPTIONS:
    raise ValueError(f"attention must be one of {ATTENTION_OPTIONS}; got "
                     f"{attention!r}.")
  t = mesh.tensor
  split = lambda n: n / t if n % t == 0 else n
  heads, kv_heads = split(cfg.num_heads), split(cfg.num_kv_heads)
  q, kv = heads * cfg.head_dim, kv_heads * cfg.head_dim
  f, d = split(cfg.intermediate_size), cfg.hidden_size
  # RMSNorm: float32 input and square, statistics, normalised output and
  # the scaled output a matmul consumes.
  norms = 2 * ((8 + 2 * c) * d + 8)
  qk_norm = 0
  if cfg.qk_norm:  # float32 input and square, statistics, normalised output
    qk_norm = (8 + c) * (q + kv) + 8 * (heads + kv_heads)
  # v, rotated q and k, the attention output; float32 cos and sin
  # broadcast for q and for k.
  attn = c * (kv + q + kv + q) + 16 * cfg.head_dim + qk_norm
  mlp = 6 * c * f  # gate, up, three inside silu, silu(gate) * up
  # The input, q/k/v, o_proj's output, gate and up (down's output is
  # recomputed from gate and up).
  dots = c * (d + q + 2 * kv + d + 2 * f)
  if attention == "reference":  # mask, scores, exp (f32), probabilities
    scores = heads * keys * (1 + 4 + 4 + c) + 8 * heads
    score_work = heads * keys * 4
  else:  # the custom VJP's residuals: the running max and sum (float32)
    # per head, the key mask and its own copy of the output; in the
    # backward, a chunk of scores, exp and their gradients (float32) and
    # two casts
    scores = 8 * heads + 1 + c * q
    score_work = heads * min(keys, attention_chunk_size) * (4 * 4 + 2 * c)
  linear = norms + attn + mlp
  return linear + scores, linear + score_work, dots
def _gather_bytes(cfg, mesh, rules, c, h_bytes) -> tuple[float, int]:
  """`(bytes of all-gathered weights, elements of one gathered layer)`.

  With fsdp > 1, a layer's weights are all-gathered before use (two layers
  live: the one in use and the next, prefetched), and so is the output
  projection for the head.
  """
  d, v = cfg.hidden_size, cfg.vocab_size
  gathered = dataclasses.replace(mesh, fsdp=1, data=1)
  _, layer_gathered = _split_params(cfg, gathered, rules)
  head_gathered = _local_elements(
      ParamShape("head", (d, v), ("embed", "vocab")), gathered, rules)
  gathers = 0.0
  if mesh.fsdp > 1:
    gathers = 2 * layer_gathered * c + head_gathered * h_bytes
  return gathers, layer_gathered


def _head_token_bytes(cfg, c, h_bytes, chunk_size, fused_head):
  """`(saved, working)` bytes per token of the head.

  Fused: a chunk of float32 logits and two products of it, the float32
  hidden-state gradient, the hidden state cast to the head dtype; it saves
  three float32 statistics and the target. Unfused: [T, V] float32 logits
  and log-softmax saved, their gradient.
  """
  d, v = cfg.hidden_size, cfg.vocab_size
  chunk = min(chunk_size, v)
  head_cast = d * h_bytes if h_bytes != c else 0
  if fused_head:
    return 16.0, chunk * 4 * 3 + d * 4 + head_cast
  return v * 8.0, v * 4.0 + head_cast


def _weight_cast_bytes(cfg, policy, mesh, rules, *, layer, remat) -> float:
  """Weights cast to the compute dtype, kept as residuals (one block's with
  remat), and the output projection cast to the head dtype."""
  d, v = cfg.hidden_size, cfg.vocab_size
  c, h_bytes = _itemsize(policy.compute_dtype), _itemsize(policy.head_dtype)
  weight_casts = 0.0
  if policy.compute_dtype != policy.param_dtype:
    weight_casts = (layer if remat else cfg.num_layers * layer) * c
  if policy.head_dtype != policy.param_dtype:
    weight_casts += _local_elements(
        ParamShape("head", (d, v), ("embed", "vocab")), mesh, rules) * h_bytes
  return weight_casts


def _sampling_bytes(cfg, policy, mesh, *, rows, seq_len, prompt_len,
                    n_params, attention, attention_chunk_size, gathers):
  """`(kv_cache, sample_weights, sample_working)` bytes per device.

  The rollout batch's `rows` per device, `seq_len` cache slots and
  `prompt_len` prompt tokens (the prefill).
  """
  s_bytes = _itemsize(policy.sampler_dtype)
  v, n_layers = cfg.vocab_size, cfg.num_layers
  kv_split = mesh.tensor if cfg.num_kv_heads % mesh.tensor == 0 else 1
  kv_cache = (2 * n_layers * rows * seq_len * cfg.num_kv_heads
              * cfg.head_dim * s_bytes / kv_split + rows * seq_len)
  cast = policy.sampler_dtype != policy.param_dtype
  sample_weights = n_params * s_bytes if cast else 0.0
  prefill = rows * prompt_len * block_token_bytes(
      cfg, mesh, s_bytes, seq_len, attention, attention_chunk_size)[0]
  last_logits = 4 * rows * v * 4  # logits, softmax, truncation, entropy
  return kv_cache, sample_weights, prefill + last_logits + gathers


def _check_shape(batch, minibatches, shards, seq_len, prompt_len) -> int:
  """The prompt length (default half of `seq_len`), once the batch and
  lengths are checked."""
  if batch < 0 or batch % (minibatches * shards):
    raise ValueError(
        f"batch={batch} does not split into minibatches={minibatches} "
        f"over data x fsdp = {shards} devices.")
  prompt_len = seq_len // 2 if prompt_len is None else prompt_len
  if not 0 < prompt_len <= seq_len:
    raise ValueError(f"prompt_len must be in (0, seq_len={seq_len}]; got "
                     f"{prompt_len}.")
  return prompt_len


def _check_lora(lora_rank, lora_targets) -> None:
  if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or (
      lora_rank < 0):
    raise ValueError(f"lora_rank must be an int >= 0; got {lora_rank!r}.")
  unknown = [t for t in lora_targets if t not in _LORA_WEIGHTS]
  if unknown or not lora_targets:
    raise ValueError(f"lora_targets must name some of {LORA_TARGETS}; got "
                     f"{tuple(lora_targets)}.")


def _lora_bytes(cfg, mesh, rules, lora_rank, lora_targets, *, tokens, c,
                frozen_layer_grads):
  """`(adapter bytes, extra activations, update working change)` per device.

  Adapters are float32 parameters, gradients and AdamW moments; each
  target saves its `[tokens, rank]` intermediate. With fsdp > 1 one layer
  of adapter gradients is live before its reduce-scatter, not the
  weights' (`frozen_layer_grads`).
  """
  adapters = lora_shapes(cfg, lora_rank, lora_targets)
  trained = 4.0 * sum(_local_elements(p, mesh, rules) * p.count
                      for p in adapters)
  activations = tokens * cfg.num_layers * lora_rank * c * len(lora_targets)
  working = 0.0
  if mesh.fsdp > 1:
    working = trained / cfg.num_layers * mesh.fsdp - frozen_layer_grads
  return trained, activations, working


def _update_bytes(cfg, remat, tokens, block, *, extra, head, c):
  """`(activations, working)` of the update on `tokens` tokens per device.

  Remat keeps each block's input (and with block_save_dots its matmul
  outputs) and recomputes one block at a time during the backward pass.
  `block` is `block_token_bytes`' triple, `head` `(saved, working)`.
  """
  saved, work, dots = block
  saved_per_layer = {"none": saved, "block": cfg.hidden_size * c,
                     "block_save_dots": dots}[remat]
  if remat != "none":  # float32 cos and sin tables, once for all blocks
    extra += 8 * cfg.head_dim
  activations = tokens * (cfg.num_layers * saved_per_layer + extra + head[0])
  layer_work = work if remat == "none" else saved + work
  return activations, tokens * (layer_work + head[1])


def memory_estimate(cfg: ModelConfig, precision, mesh: MeshShape, *,
                    batch: int, seq_len: int, prompt_len: int | None = None,
                    minibatches: int = 1, remat: str = "none",
                    attention: str = "blockwise",
                    attention_chunk_size: int =
                    attention_lib.DEFAULT_CHUNK_SIZE,
                    fused_head: bool = True,
                    donate: bool = False, reference: bool = False,
                    chunk_size: int = 2048, lora_rank: int = 0,
                    lora_targets=LORA_TARGETS,
                    rules=sharding.DEFAULT_RULES) -> MemoryEstimate:
  """Estimated bytes per device of one RL iteration (module docstring).

  Args:
    cfg: the model.
    precision: a preset name or `Precision`.
    mesh: the mesh sizes.
    batch: sequences per rollout (`prompts_per_batch x group_size`); split
      over `data x fsdp`, which must divide it.
    seq_len: tokens per sequence, prompt plus completion (the KV cache
      length and the trained length).
    prompt_len: prompt tokens (the sampler's prefill); default half of
      `seq_len`.
    minibatches: optimizer steps per rollout (`algo.minibatches`); each
      update sees `batch / minibatches` sequences.
    remat: the model's rematerialisation (`--config.model.remat`: "none",
      "block" or "block_save_dots").
    attention: "reference" (materialised `[B, H, T, S]` scores),
      "blockwise" or "cudnn" (memory-linear); `--config.model.attention`
      ("auto" is blockwise, or cuDNN on a GPU in bf16/fp16).
    attention_chunk_size: keys per chunk of the blockwise attention.
    fused_head: the chunked head entropo uses; False models `[B, T, V]`
      float32 logits and log-softmax.
    donate: the update donates its parameter and optimizer buffers.
    reference: a KL term keeps the starting parameters (`algo.kl_coef > 0`).
    chunk_size: vocabulary chunk of the fused head.
    lora_rank: LoRA adapters of this rank on `lora_targets` (0: full
      fine-tuning). The base parameters stay resident in `param_dtype` but
      get no gradients, optimizer state or new copies; the float32
      adapters get all three; the KL reference is the base model (no
      copy, whatever `reference` says); each adapter saves its `[T, r]`
      low-rank activation for the backward pass.
    lora_targets: the projections adapted (`entropo.models.lora.TARGETS`).
    rules: logical-axis rules.

  Returns:
    A `MemoryEstimate` in bytes per device.
  """
  policy = precision_lib.get_precision(precision)
  if remat not in transformer_lib.REMAT_OPTIONS:
    raise ValueError(f"remat must be one of {transformer_lib.REMAT_OPTIONS};"
                     f" got {remat!r}.")
  _check_lora(lora_rank, lora_targets)
  shards = mesh.batch_shards
  prompt_len = _check_shape(batch, minibatches, shards, seq_len, prompt_len)
  p_bytes, c = _itemsize(policy.param_dtype), _itemsize(policy.compute_dtype)
  h_bytes = _itemsize(policy.head_dtype)
  rules = _rules_key(rules)
  outside, layer = _split_params(cfg, mesh, rules)
  n_params = outside + cfg.num_layers * layer
  gathers, layer_gathered = _gather_bytes(cfg, mesh, rules, c, h_bytes)

  rows = batch // shards
  kv_cache, sample_weights, sample_working = _sampling_bytes(
      cfg, policy, mesh, rows=rows, seq_len=seq_len, prompt_len=prompt_len,
      n_params=n_params, attention=attention,
      attention_chunk_size=attention_chunk_size, gathers=gathers)

  head_saved, head_work = _head_token_bytes(cfg, c, h_bytes, chunk_size,
                                            fused_head)
  # Token ids of the embedding lookup; the final norm as in a block.
  extra = 4 + (8 + 2 * c) * cfg.hidden_size + 8
  saved, work, dots = block_token_bytes(cfg, mesh, c, seq_len, attention,
                                        attention_chunk_size)

  # The trainer's forward over the whole rollout: one layer live at a time.
  tokens = rows * seq_len
  prepare_working = (tokens * (saved + extra + head_work + head_saved)
                     + gathers)

  tokens = (batch // minibatches // shards) * seq_len
  activations, update_working = _update_bytes(
      cfg, remat, tokens, (saved, work, dots), extra=extra,
      head=(head_saved, head_work), c=c)
  update_working += gathers
  if mesh.fsdp > 1:
    update_working += layer_gathered * p_bytes  # before reduce-scatter
  weight_casts = _weight_cast_bytes(cfg, policy, mesh, rules, layer=layer,
                                    remat=remat != "none")
  params = n_params * p_bytes
  trained = params
  if lora_rank:
    trained, extra_act, work_change = _lora_bytes(
        cfg, mesh, rules, lora_rank, lora_targets, tokens=tokens, c=c,
        frozen_layer_grads=layer_gathered * p_bytes)
    activations += extra_act
    update_working += work_change
    params += trained
    reference = False
  optimizer = 2 * trained
  return MemoryEstimate(
      params=params, optimizer=optimizer,
      reference=params if reference else 0.0,
      kv_cache=kv_cache, sample_weights=sample_weights,
      sample_working=sample_working, prepare_working=prepare_working,
      activations=activations, weight_casts=weight_casts,
      update_working=update_working, gradients=trained,
      update_outputs=0.0 if donate else trained + optimizer)
