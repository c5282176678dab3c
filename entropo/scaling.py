"""Parameter counts and per-device memory estimates for sharded RL runs.

A planning tool beside the library's layers: it reads a `ModelConfig`, a
precision preset and the sharding rules of `entropo.sharding`, allocates
nothing, and is imported by no other module. `python -m entropo.scaling`
prints the tables of docs/scaling.md.

What an RL iteration holds on each device, in the order it runs:

* resident: parameters (`param_dtype`), AdamW's two moments (optax keeps
  them in the parameters' dtype, float32 in every preset) and, with a KL
  term, the reference parameters. Sharded by the logical-axis rules, so a
  dimension the mesh axis does not divide is replicated, as in training.
* sample: the sampler's KV cache (`2 x layers x B x S x KV x head_dim` in
  `sampler_dtype`), a copy of the weights cast to `sampler_dtype` (XLA
  hoists the cast out of the decode loop), the prefill of one layer (its
  scores are `[B, H, P, S]`) and the last position's `[B, V]` logits.
* prepare: the trainer's forward over the whole rollout batch (old
  log-probs and entropy), one layer live at a time, no gradients.
* update: forward and backward on one minibatch. Without remat every
  layer's activations are saved: the residuals JAX keeps for a block,
  among them four `[B, H, T, T]` arrays, since entropo's attention
  materialises its scores (the mask, float32 scores, their exp, the
  probabilities). With per-layer remat only each layer's input is saved
  and one layer is recomputed; a fused (flash-style) attention kernel
  would keep one log-sum-exp per head instead of the scores. Neither
  exists in entropo yet; `remat=` and `fused_attention=` say what they
  would save. The fused head (`fused_logprobs_entropy`) keeps
  `O(tokens x chunk)` temporaries instead of `[B, T, V]` logits.
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

import argparse
import dataclasses
import functools
import math

import numpy as np

from entropo import precision as precision_lib
from entropo import sharding
from entropo.models.config import ModelConfig

GIB = 2**30

# Published Hugging Face config.json values (Qwen/Qwen3-*): hidden size,
# intermediate size, layers, attention heads, KV heads, tied embeddings.
# All have head_dim 128, vocab 151936, rope_theta 1e6, rms_norm_eps 1e-6,
# 40960 positions and q/k RMSNorm.
QWEN3 = {
    "Qwen3-0.6B": (1024, 3072, 28, 16, 8, True),
    "Qwen3-1.7B": (2048, 6144, 28, 16, 8, True),
    "Qwen3-4B": (2560, 9728, 36, 32, 8, True),
    "Qwen3-8B": (4096, 12288, 36, 32, 8, False),
    "Qwen3-14B": (5120, 17408, 40, 40, 8, False),
    "Qwen3-32B": (5120, 25600, 64, 64, 8, False),
}


def qwen3_config(name: str) -> ModelConfig:
  """The `ModelConfig` of a published Qwen3 dense model, e.g. `Qwen3-8B`."""
  if name not in QWEN3:
    raise ValueError(f"Unknown Qwen3 model {name!r}; choose one of "
                     f"{list(QWEN3)}.")
  d, f, layers, heads, kv, tied = QWEN3[name]
  return ModelConfig(
      vocab_size=151936, hidden_size=d, intermediate_size=f,
      num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=128,
      rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960,
      tie_word_embeddings=tied, qk_norm=True, family="qwen3")


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
                      fused_attention: bool = False) -> tuple[float, float]:
  """`(saved, working)` bytes per token, per device, of one decoder block.

  `saved` is what autodiff keeps for the backward pass: the residuals JAX
  records for `entropo.models.transformer.Block` (tests/test_scaling.py
  checks the count against `jax.ad_checkpoint.print_saved_residuals`).
  `working` is what one block's backward adds while it runs: cotangents
  of its activations and of its float32 scores. Model-width arrays are
  replicated over `tensor`; heads, KV heads and the MLP width are split
  when it divides them (as the weights are). `keys` is the number of
  attended positions, `c` the compute dtype's size.
  """
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
  attention = c * (kv + q + kv + q) + 16 * cfg.head_dim + qk_norm
  mlp = 6 * c * f  # gate, up, three inside silu, silu(gate) * up
  if fused_attention:  # a flash-style kernel keeps a log-sum-exp per head
    scores, score_work = 4 * heads, 0
  else:  # mask, masked scores, exp (f32), probabilities (f32 or cast)
    scores = heads * keys * (1 + 4 + 4 + c) + 8 * heads
    score_work = heads * keys * 4
  linear = norms + attention + mlp
  return linear + scores, linear + score_work


def memory_estimate(cfg: ModelConfig, precision, mesh: MeshShape, *,
                    batch: int, seq_len: int, prompt_len: int | None = None,
                    minibatches: int = 1, remat: bool = False,
                    fused_attention: bool = False, fused_head: bool = True,
                    donate: bool = False, reference: bool = False,
                    chunk_size: int = 2048,
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
    remat: per-layer rematerialisation in the update (not in entropo yet).
    fused_attention: a flash-style attention kernel that never holds the
      `[B, H, T, S]` scores (not in entropo yet).
    fused_head: the chunked head entropo uses; False models `[B, T, V]`
      float32 logits and log-softmax.
    donate: the update donates its parameter and optimizer buffers.
    reference: a KL term keeps the starting parameters (`algo.kl_coef > 0`).
    chunk_size: vocabulary chunk of the fused head.
    rules: logical-axis rules.

  Returns:
    A `MemoryEstimate` in bytes per device.
  """
  policy = precision_lib.get_precision(precision)
  shards = mesh.batch_shards
  if batch < 0 or batch % (minibatches * shards):
    raise ValueError(
        f"batch={batch} does not split into minibatches={minibatches} "
        f"over data x fsdp = {shards} devices.")
  prompt_len = seq_len // 2 if prompt_len is None else prompt_len
  if not 0 < prompt_len <= seq_len:
    raise ValueError(f"prompt_len must be in (0, seq_len={seq_len}]; got "
                     f"{prompt_len}.")
  p_bytes, c = _itemsize(policy.param_dtype), _itemsize(policy.compute_dtype)
  s_bytes = _itemsize(policy.sampler_dtype)
  h_bytes = _itemsize(policy.head_dtype)
  d, v, n_layers = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
  rules = _rules_key(rules)
  outside, layer = _split_params(cfg, mesh, rules)
  n_params = outside + n_layers * layer
  # With fsdp > 1, a layer's weights are all-gathered before use (two
  # layers live: the one in use and the next, prefetched), and so is the
  # output projection for the head.
  gathered = dataclasses.replace(mesh, fsdp=1, data=1)
  _, layer_gathered = _split_params(cfg, gathered, rules)
  head_gathered = _local_elements(
      ParamShape("head", (d, v), ("embed", "vocab")), gathered, rules)
  gathers = 0.0
  if mesh.fsdp > 1:
    gathers = 2 * layer_gathered * c + head_gathered * h_bytes

  # Sampling: the rollout batch, S = seq_len cache slots, P prompt tokens.
  rows = batch // shards
  kv_split = mesh.tensor if cfg.num_kv_heads % mesh.tensor == 0 else 1
  kv_cache = (2 * n_layers * rows * seq_len * cfg.num_kv_heads
              * cfg.head_dim * s_bytes / kv_split + rows * seq_len)
  cast = policy.sampler_dtype != policy.param_dtype
  sample_weights = n_params * s_bytes if cast else 0.0
  prefill = rows * prompt_len * block_token_bytes(
      cfg, mesh, s_bytes, seq_len, fused_attention)[0]
  last_logits = 4 * rows * v * 4  # logits, softmax, truncation, entropy
  sample_working = prefill + last_logits + gathers

  # The head's temporaries per token. Fused: a chunk of float32 logits and
  # two products of it, the float32 hidden-state gradient, the hidden state
  # cast to the head dtype; it saves three float32 statistics and the
  # target. Unfused: [T, V] float32 logits and log-softmax saved, their
  # gradient.
  chunk = min(chunk_size, v)
  head_cast = d * h_bytes if h_bytes != c else 0
  if fused_head:
    head_saved, head_work = 16.0, chunk * 4 * 3 + d * 4 + head_cast
  else:
    head_saved, head_work = v * 8.0, v * 4.0 + head_cast
  # Token ids of the embedding lookup; the final norm as in a block.
  extra = 4 + (8 + 2 * c) * d + 8
  saved, work = block_token_bytes(cfg, mesh, c, seq_len, fused_attention)

  # The trainer's forward over the whole rollout: one layer live at a time.
  tokens = rows * seq_len
  prepare_working = (tokens * (saved + extra + head_work + head_saved)
                     + gathers)

  # The update on one minibatch. Remat keeps each block's input and
  # recomputes one block at a time during the backward pass.
  tokens = (batch // minibatches // shards) * seq_len
  saved_per_layer = d * c if remat else saved
  activations = tokens * (n_layers * saved_per_layer + extra + head_saved)
  layer_work = saved + work if remat else work
  update_working = tokens * (layer_work + head_work) + gathers
  if mesh.fsdp > 1:
    update_working += layer_gathered * p_bytes  # before reduce-scatter
  # Weights cast to the compute dtype are residuals too (one block's with
  # remat), and the output projection cast to the head dtype.
  weight_casts = 0.0
  if policy.compute_dtype != policy.param_dtype:
    weight_casts = (layer if remat else n_layers * layer) * c
  if policy.head_dtype != policy.param_dtype:
    weight_casts += _local_elements(
        ParamShape("head", (d, v), ("embed", "vocab")), mesh, rules) * h_bytes
  params = n_params * p_bytes
  optimizer = 2 * params
  return MemoryEstimate(
      params=params, optimizer=optimizer,
      reference=params if reference else 0.0,
      kv_cache=kv_cache, sample_weights=sample_weights,
      sample_working=sample_working, prepare_working=prepare_working,
      activations=activations, weight_casts=weight_casts,
      update_working=update_working, gradients=params,
      update_outputs=0.0 if donate else params + optimizer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hardware:
  """An accelerator kind: memory per chip and what the estimate may use.

  Attributes:
    name: for tables.
    hbm_gib: memory per chip.
    memory_fraction: what the runtime gives XLA (launch/run_host.sh sets
      `XLA_PYTHON_CLIENT_MEM_FRACTION=0.9` on GPUs; TPUs give XLA all of it).
    margin: share of that kept free for what the estimate ignores.
    max_tensor: largest tensor axis (within one NVLink domain on GPUs).
  """

  name: str
  hbm_gib: float
  memory_fraction: float = 1.0
  margin: float = 0.15
  max_tensor: int = 8

  @property
  def budget(self) -> float:
    """Bytes per chip an estimate may fill."""
    return self.hbm_gib * GIB * self.memory_fraction * (1 - self.margin)


HARDWARE = {
    "v5e": Hardware(name="TPU v5e", hbm_gib=16),
    "v5p": Hardware(name="TPU v5p", hbm_gib=95),
    "h100": Hardware(name="H100 80GB", hbm_gib=80, memory_fraction=0.9),
}


def _affine_peaks(cfg, precision, mesh, *, seq_len, phase, **options):
  """`[(fixed, per_sequence)]` bytes per device of each peak of `phase`.

  Every term is affine in the sequences per device, so two estimates (0
  and 1 sequence per device) give each peak exactly.
  """
  options = dict(options, minibatches=1)
  zero, one = (memory_estimate(cfg, precision, mesh, seq_len=seq_len,
                               batch=rows * mesh.batch_shards,
                               **options).phase_peaks(phase)
               for rows in (0, 1))
  return [(a, b - a) for a, b in zip(zero, one)]


def max_sequences(cfg, precision, mesh, *, budget: float, seq_len: int,
                  phase: str, **options) -> int:
  """Most sequences per device that fit `budget` bytes in `phase`.

  `phase="update"` counts the sequences of one minibatch; `"rollout"`
  counts rollout sequences (sampling, then the trainer's forward over
  them). Returns 0 when not even one fits. `options` go to
  `memory_estimate`.
  """
  fits = []
  for fixed, per_row in _affine_peaks(cfg, precision, mesh, seq_len=seq_len,
                                      phase=phase, **options):
    if fixed + per_row > budget:
      return 0
    fits.append(math.inf if per_row <= 0 else (budget - fixed) // per_row)
  return int(min(fits))


def _candidate_meshes(cfg, chips, hardware):
  for tensor in (1, 2, 4, 8):
    if (tensor > hardware.max_tensor or chips % tensor
        or cfg.num_kv_heads % tensor):
      continue
    fsdp = 1
    while fsdp <= chips // tensor:
      if (chips // tensor) % fsdp == 0:
        yield MeshShape(data=chips // tensor // fsdp, fsdp=fsdp,
                        tensor=tensor)
      fsdp *= 2


def recommend_mesh(cfg, precision, hardware: Hardware, chips: int, *,
                   seq_len: int, **options) -> tuple[MeshShape | None, int]:
  """The mesh with the largest update capacity, and that capacity.

  Capacity is the number of `seq_len`-token sequences one update step
  holds across all devices (`max_sequences` times `data x fsdp`). Meshes
  within 10 % of the best are ranked by communication: smaller `tensor`
  first (collectives on activations in every layer), then smaller `fsdp`
  (weight all-gathers), so `data` takes what is left. Tensor sizes
  divide the KV heads and stay within `hardware.max_tensor`. Returns
  `(None, 0)` when no mesh fits one sequence per device.
  """
  scored = []
  for mesh in _candidate_meshes(cfg, chips, hardware):
    per_device = max_sequences(cfg, precision, mesh, budget=hardware.budget,
                               seq_len=seq_len, phase="update", **options)
    scored.append((mesh.tensor, mesh.fsdp, per_device * mesh.batch_shards,
                   mesh))
  best = max(capacity for _, _, capacity, _ in scored)
  if best == 0:
    return None, 0
  *_, capacity, mesh = min(x for x in scored if x[2] >= 0.9 * best)
  return mesh, capacity


# The setups of docs/scaling.md: model, hardware, chips, slice name.
SETUPS = (
    ("Qwen3-0.6B", "v5e", 8, "v5litepod-8"),
    ("Qwen3-0.6B", "v5p", 4, "v5p-8"),
    ("Qwen3-0.6B", "h100", 1, "1 GPU"),
    ("Qwen3-0.6B", "h100", 8, "1 node"),
    ("Qwen3-8B", "v5e", 32, "v5litepod-32"),
    ("Qwen3-8B", "v5e", 64, "v5litepod-64"),
    ("Qwen3-8B", "v5p", 8, "v5p-16"),
    ("Qwen3-8B", "h100", 8, "1 node"),
    ("Qwen3-8B", "h100", 16, "2 nodes"),
    ("Qwen3-32B", "v5e", 256, "v5litepod-256"),
    ("Qwen3-32B", "v5p", 32, "v5p-64"),
    ("Qwen3-32B", "v5p", 64, "v5p-128"),
    ("Qwen3-32B", "h100", 32, "4 nodes"),
)
PRECISIONS = ("fp32", "bf16_fp32_head")
RECOMMENDED_PRECISION = "bf16_fp32_head"


def _gib(x: float) -> str:
  return f"{x / GIB:.1f}" if x < 100 * GIB else f"{x / GIB:.0f}"


def _table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def _layout(mesh):
  return f"{mesh.data}/{mesh.fsdp}/{mesh.tensor}"


def _parameter_table():
  rows = []
  for name in QWEN3:
    cfg = qwen3_config(name)
    total = param_count(cfg)
    rows.append((name, f"{total / 1e9:.3f} B",
                 f"{param_count(cfg, embeddings=False) / 1e9:.3f} B",
                 "yes" if cfg.tie_word_embeddings else "no",
                 _gib(total * 4), _gib(total * 16), _gib(total * 28)))
  return _table(("model", "parameters", "non-embedding", "tied",
                 "f32 weights GiB", "+ AdamW + grads (16 B/param)",
                 "+ undonated update outputs (28 B/param)"), rows)


def _setup_tables(seq_len):
  """The as-is table and the recommended flags, one row per setup."""
  rows, flags = [], []
  prec = RECOMMENDED_PRECISION
  for model, hw_name, chips, slice_name in SETUPS:
    cfg, hw = qwen3_config(model), HARDWARE[hw_name]
    where = (model, f"{hw.name} {slice_name} ({chips})")
    mesh, capacity = recommend_mesh(cfg, prec, hw, chips, seq_len=seq_len)
    if mesh is None:
      rows.append(where + ("does not fit",) + ("-",) * 4)
      mesh, _ = recommend_mesh(cfg, prec, hw, chips, seq_len=seq_len,
                               remat=True)
      flags.append(where + (f"`{mesh.flags()} --config.precision={prec}` "
                            f"once remat exists", "-", "-"))
      continue
    est = memory_estimate(cfg, prec, mesh, batch=0, seq_len=seq_len)
    kw = dict(budget=hw.budget, seq_len=seq_len)
    per_seq = [_affine_peaks(cfg, p, mesh, seq_len=seq_len,
                             phase="update")[0][1] for p in PRECISIONS]
    update = [max_sequences(cfg, p, mesh, phase="update", **kw)
              for p in PRECISIONS]
    rollout = [max_sequences(cfg, p, mesh, phase="rollout", **kw)
               for p in PRECISIONS]
    rows.append(where + (
        _layout(mesh), f"{_gib(est.resident)} / {_gib(est.backward_end)}",
        " / ".join(map(_gib, per_seq)), " / ".join(map(str, update)),
        " / ".join(map(str, rollout))))
    flags.append(where + (f"`{mesh.flags()} --config.precision={prec}`",
                          rollout[1] * mesh.batch_shards, capacity))
  both = " (`fp32` / `bf16_fp32_head`)"
  return (_table(("model", "hardware (chips)", "data/fsdp/tensor",
                  "resident / optimizer-step GiB per chip",
                  "update GiB per sequence per chip" + both,
                  "update seqs per chip" + both,
                  "rollout seqs per chip" + both), rows),
          _table(("model", "hardware (chips)", "flags",
                  "rollout sequences at most (P x G)",
                  "sequences per minibatch at most"), flags))


def _future_table(seq_len):
  rows = []
  for name, variant in (("remat", dict(remat=True)),
                        ("remat + fused attention",
                         dict(remat=True, fused_attention=True))):
    for model, hw_name, chips, slice_name in SETUPS:
      hw = HARDWARE[hw_name]
      mesh, capacity = recommend_mesh(qwen3_config(model),
                                      RECOMMENDED_PRECISION, hw, chips,
                                      seq_len=seq_len, **variant)
      rows.append((model, f"{hw.name} {slice_name} ({chips})", name,
                   "does not fit" if mesh is None else _layout(mesh),
                   capacity))
  return _table(("model", "hardware (chips)", "variant", "data/fsdp/tensor",
                 "update seqs per step"), rows)


def _length_table(model="Qwen3-8B", hw_name="h100", mesh=MeshShape(fsdp=8)):
  cfg, hw, prec = qwen3_config(model), HARDWARE[hw_name], RECOMMENDED_PRECISION
  rows = []
  for length in (1024, 2048, 4096, 8192, 16384):
    slope = lambda **o: _affine_peaks(cfg, prec, mesh, seq_len=length,
                                      phase="update", **o)[0][1]
    kv = memory_estimate(cfg, prec, mesh, batch=mesh.batch_shards,
                         seq_len=length).kv_cache
    rows.append((length, _gib(slope()), _gib(slope(remat=True)),
                 _gib(slope(remat=True, fused_attention=True)),
                 _gib(slope(fused_head=False) - slope()), _gib(kv),
                 max_sequences(cfg, prec, mesh, budget=hw.budget,
                               seq_len=length, phase="update")))
  title = (f"{model}, {hw.name} x {mesh.size}, `{prec}`, data/fsdp/tensor = "
           f"{_layout(mesh)}, GiB per sequence per chip")
  return title, _table(("tokens", "update", "update, remat",
                        "update, remat + fused attention",
                        "extra without the fused head", "KV cache",
                        "update seqs per chip"), rows)


def markdown_tables(*, seq_len: int = 2048) -> str:
  """The tables of docs/scaling.md, computed by this module."""
  as_is, flags = _setup_tables(seq_len)
  title, lengths = _length_table()
  return "\n".join([
      "#### Parameters\n", _parameter_table(),
      f"\n#### entropo as it is: no remat, materialised attention, "
      f"{seq_len}-token sequences (half prompt)\n", as_is,
      f"\n#### Recommended flags ({seq_len}-token sequences)\n", flags,
      f"\n#### With per-layer remat, and remat plus a fused attention "
      f"kernel (`{RECOMMENDED_PRECISION}`, {seq_len}-token sequences)\n",
      _future_table(seq_len),
      f"\n#### Sequence length: {title}\n", lengths])


def main(argv=None):
  parser = argparse.ArgumentParser(
      description="Prints the memory tables of docs/scaling.md.")
  parser.add_argument("--seq_len", type=int, default=2048,
                      help="tokens per sequence (prompt + completion)")
  args = parser.parse_args(argv)
  print(markdown_tables(seq_len=args.seq_len))


if __name__ == "__main__":
  main()
