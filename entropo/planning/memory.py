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
  attention (`entropo.models.attention`) keeps one float32 log-sum-exp per
  head and query instead (cuDNN's kernel too, but jax passes it the mask as
  a `[B, 1, T, T]` bias in the compute dtype, saved per layer), and its
  backward holds one key chunk of scores, probabilities and their
  gradients at a time (`[B, H, T, attention_chunk_size]`). `remat="block"` saves only each
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

import numpy as np

from entropo import precision as precision_lib
from entropo import sharding
from entropo.models import attention as attention_lib
from entropo.models import transformer as transformer_lib
from entropo.models.config import ModelConfig
from entropo.planning.params import LORA_TARGETS
from entropo.planning.params import LORA_WEIGHTS
from entropo.planning.params import MeshShape
from entropo.planning.params import ParamShape
from entropo.planning.params import local_elements
from entropo.planning.params import lora_shapes
from entropo.planning.params import param_shapes
from entropo.planning.params import rules_key
from entropo.planning.params import split_params

# What each attention implementation costs: "reference" materialises the
# scores; the others are memory-linear in the sequence length.
ATTENTION_OPTIONS = ("reference", "blockwise", "cudnn", "pallas")
# The TPU kernel keeps its softmax max and sum 128 lanes wide (float32).
_PALLAS_LANES = 128

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
  elif attention == "cudnn":  # read from jax's source (the kernel compiles
    # on GPUs only): jax hands cuDNN the boolean mask as a `[B, 1, T, S]`
    # additive bias in the compute dtype (`combine_bias_and_mask`), which
    # the backward takes again, so each query saves a row of S of them
    # beside the float32 softmax statistics per head and the output. The
    # bias is shared by the heads: tensor parallelism does not split it.
    scores = 4 * heads + c * q + c * keys
    score_work = c * keys
  elif attention == "pallas":  # read from the kernel's source, not from a
    # compile (it compiles on TPUs only): max and sum per head, lane-wide;
    # keys and values repeated to every query head; 128-key blocks
    scores = 8 * heads * _PALLAS_LANES + 2 * c * q
    score_work = heads * min(keys, _PALLAS_LANES) * (4 * 4 + 2 * c)
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
  _, layer_gathered = split_params(cfg, gathered, rules)
  head_gathered = local_elements(
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


def _weight_cast_bytes(cfg, precision, mesh, rules, *, layer, remat) -> float:
  """Weights cast to the compute dtype, kept as residuals (one block's with
  remat), and the output projection cast to the head dtype."""
  d, v = cfg.hidden_size, cfg.vocab_size
  c = _itemsize(precision.compute_dtype)
  h_bytes = _itemsize(precision.head_dtype)
  weight_casts = 0.0
  if precision.compute_dtype != precision.param_dtype:
    weight_casts = (layer if remat else cfg.num_layers * layer) * c
  if precision.head_dtype != precision.param_dtype:
    weight_casts += local_elements(
        ParamShape("head", (d, v), ("embed", "vocab")), mesh, rules) * h_bytes
  return weight_casts


def _sampling_bytes(cfg, precision, mesh, *, rows, seq_len, prompt_len,
                    n_params, attention, attention_chunk_size, gathers):
  """`(kv_cache, sample_weights, sample_working)` bytes per device.

  The rollout batch's `rows` per device, `seq_len` cache slots and
  `prompt_len` prompt tokens (the prefill).
  """
  s_bytes = _itemsize(precision.sampler_dtype)
  v, n_layers = cfg.vocab_size, cfg.num_layers
  kv_split = mesh.tensor if cfg.num_kv_heads % mesh.tensor == 0 else 1
  kv_cache = (2 * n_layers * rows * seq_len * cfg.num_kv_heads
              * cfg.head_dim * s_bytes / kv_split + rows * seq_len)
  cast = precision.sampler_dtype != precision.param_dtype
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


def _check_options(remat, lora_rank, lora_targets, lora_base_dtype) -> None:
  if remat not in transformer_lib.REMAT_OPTIONS:
    raise ValueError(f"remat must be one of {transformer_lib.REMAT_OPTIONS};"
                     f" got {remat!r}.")
  if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or (
      lora_rank < 0):
    raise ValueError(f"lora_rank must be an int >= 0; got {lora_rank!r}.")
  unknown = [t for t in lora_targets if t not in LORA_WEIGHTS]
  if unknown or not lora_targets:
    raise ValueError(f"lora_targets must name some of {LORA_TARGETS}; got "
                     f"{tuple(lora_targets)}.")
  if lora_base_dtype not in ("param", "compute") or (
      lora_base_dtype == "compute" and not lora_rank):
    raise ValueError(f"lora_base_dtype must be 'param', or 'compute' with "
                     f"lora_rank > 0; got {lora_base_dtype!r}.")


def _lora_bytes(cfg, mesh, rules, lora_rank, lora_targets, *, tokens, c,
                frozen_layer_grads):
  """`(adapter bytes, extra activations, update working change)` per device.

  Adapters are float32 parameters, gradients and AdamW moments; each
  target saves its `[tokens, rank]` intermediate. With fsdp > 1 one layer
  of adapter gradients is live before its reduce-scatter, not the
  weights' (`frozen_layer_grads`).
  """
  adapters = lora_shapes(cfg, lora_rank, lora_targets)
  trained = 4.0 * sum(local_elements(p, mesh, rules) * p.count
                      for p in adapters)
  activations = tokens * cfg.num_layers * lora_rank * c * len(lora_targets)
  working = 0.0
  if mesh.fsdp > 1:
    working = trained / cfg.num_layers * mesh.fsdp - frozen_layer_grads
  return trained, activations, working


def _projection_elements(cfg, mesh, rules) -> float:
  """Elements per device of the seven projection weights of all layers."""
  names = {name for name, _ in LORA_WEIGHTS.values()}
  return sum(local_elements(p, mesh, rules) * p.count
             for p in param_shapes(cfg)
             if p.name.removeprefix("layers/*/") in names)


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


def _trainer_bytes(cfg, mesh, *, c, h_bytes, rollout_tokens, update_tokens,
                   seq_len, remat, attention, attention_chunk_size,
                   chunk_size, fused_head, gathers):
  """`(prepare_working, activations, update_working)` of the trainer: its
  forward over the whole rollout (`rollout_tokens` per device, one layer
  live at a time) and the update on `update_tokens` per device (without
  FSDP's gathered gradients and LoRA, which the caller adds)."""
  head_saved, head_work = _head_token_bytes(cfg, c, h_bytes, chunk_size,
                                            fused_head)
  # Token ids of the embedding lookup; the final norm as in a block.
  extra = 4 + (8 + 2 * c) * cfg.hidden_size + 8
  saved, work, dots = block_token_bytes(cfg, mesh, c, seq_len, attention,
                                        attention_chunk_size)
  prepare_working = (rollout_tokens * (saved + extra + head_work + head_saved)
                     + gathers)
  activations, update_working = _update_bytes(
      cfg, remat, update_tokens, (saved, work, dots), extra=extra,
      head=(head_saved, head_work), c=c)
  update_working += gathers
  return prepare_working, activations, update_working


def memory_estimate(cfg: ModelConfig, precision, mesh: MeshShape, *,
                    batch: int, seq_len: int, prompt_len: int | None = None,
                    minibatches: int = 1, remat: str = "none",
                    attention: str = "blockwise",
                    attention_chunk_size: int =
                    attention_lib.DEFAULT_CHUNK_SIZE,
                    fused_head: bool = True,
                    donate: bool = False, reference: bool = False,
                    chunk_size: int = 2048, lora_rank: int = 0,
                    lora_targets=LORA_TARGETS, lora_base_dtype="param",
                    rules=sharding.DEFAULT_RULES) -> MemoryEstimate:
  """Estimated bytes per device of one RL iteration (module docstring).

  Args:
    cfg, precision, mesh: the model, a preset name or `Precision`, the mesh.
    batch: sequences per rollout (`prompts_per_batch x group_size`), split
      over `data x fsdp`, which must divide it; `minibatches` optimizer
      steps each see `batch / minibatches` of them.
    seq_len: prompt plus completion tokens; `prompt_len` (the sampler's
      prefill) defaults to half of it.
    remat, attention, attention_chunk_size: the `model` config fields
      ("none"/"block"/"block_save_dots"; "reference" materialises the
      scores; "blockwise" and "pallas" are memory-linear; "cudnn" saves a
      `[B, 1, T, S]` mask bias in the compute dtype per layer: one
      score-sized array per layer rather than four per head, but still
      quadratic in the length).
    fused_head: the chunked head; False models `[B, T, V]` float32 logits.
      `chunk_size` is its vocabulary chunk.
    donate: the update donates its parameter and optimizer buffers.
    reference: a KL term keeps the starting parameters.
    lora_rank, lora_targets: LoRA adapters (0: full fine-tuning). The base
      stays resident without gradients, moments or new copies; the float32
      adapters get all three; the KL reference is the base (no copy); each
      adapter saves its `[T, r]` activation.
    lora_base_dtype: "param" or "compute": the base's projections stored
      in the compute dtype (`model.lora_base_dtype`); the per-layer weight
      casts are still counted (an upper bound).
    rules: logical-axis rules.

  Returns:
    A `MemoryEstimate` in bytes per device.
  """
  precision = precision_lib.get_precision(precision)
  shards = mesh.batch_shards
  prompt_len = _check_shape(batch, minibatches, shards, seq_len, prompt_len)
  _check_options(remat, lora_rank, lora_targets, lora_base_dtype)
  p_bytes = _itemsize(precision.param_dtype)
  c = _itemsize(precision.compute_dtype)
  h_bytes = _itemsize(precision.head_dtype)
  rules = rules_key(rules)
  outside, layer = split_params(cfg, mesh, rules)
  n_params = outside + cfg.num_layers * layer
  gathers, layer_gathered = _gather_bytes(cfg, mesh, rules, c, h_bytes)
  rows = batch // shards
  kv_cache, sample_weights, sample_working = _sampling_bytes(
      cfg, precision, mesh, rows=rows, seq_len=seq_len, prompt_len=prompt_len,
      n_params=n_params, attention=attention,
      attention_chunk_size=attention_chunk_size, gathers=gathers)
  tokens = (batch // minibatches // shards) * seq_len  # of an update
  prepare_working, activations, update_working = _trainer_bytes(
      cfg, mesh, c=c, h_bytes=h_bytes, rollout_tokens=rows * seq_len,
      update_tokens=tokens, seq_len=seq_len, remat=remat,
      attention=attention, attention_chunk_size=attention_chunk_size,
      chunk_size=chunk_size, fused_head=fused_head, gathers=gathers)
  if mesh.fsdp > 1:
    update_working += layer_gathered * p_bytes  # before reduce-scatter
  weight_casts = _weight_cast_bytes(cfg, precision, mesh, rules, layer=layer,
                                    remat=remat != "none")
  params = trained = n_params * p_bytes
  if lora_rank:
    trained, extra_act, work_change = _lora_bytes(
        cfg, mesh, rules, lora_rank, lora_targets, tokens=tokens, c=c,
        frozen_layer_grads=layer_gathered * p_bytes)
    activations += extra_act
    update_working += work_change
    params += trained
    if lora_base_dtype == "compute":
      params -= _projection_elements(cfg, mesh, rules) * (p_bytes - c)
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
