"""Parameter shapes, counts and per-device shares on a mesh.

What `Transformer` (and `add_lora`) create, as shapes with logical axes,
and how many elements of each a device holds under `entropo.sharding`'s
rules. Allocates nothing.
"""

import dataclasses
import functools
import math

from entropo import sharding
from entropo.models.config import ModelConfig


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
LORA_WEIGHTS = {
    "q_proj": ("attn/q_proj", 1), "k_proj": ("attn/k_proj", 1),
    "v_proj": ("attn/v_proj", 1), "o_proj": ("attn/o_proj", 2),
    "gate_proj": ("mlp/gate_proj", 1), "up_proj": ("mlp/up_proj", 1),
    "down_proj": ("mlp/down_proj", 1),
}
LORA_TARGETS = tuple(LORA_WEIGHTS)


def lora_shapes(cfg: ModelConfig, rank: int,
                targets=LORA_TARGETS) -> list[ParamShape]:
  """The adapters `add_lora(rank=rank, targets=targets)` adds: `A` is
  `[*in_dims, r]` and `B` `[r, *out_dims]` of each targeted weight, with
  its logical axes (the rank axis unsharded), `count = num_layers`."""
  weights = {p.name.removeprefix("layers/*/"): p for p in param_shapes(cfg)}
  out = []
  for target in targets:
    name, num_in = LORA_WEIGHTS[target]
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


def local_elements(p: ParamShape, mesh: MeshShape, rules) -> int:
  """Elements of one copy of `p` held by each device under `rules`."""
  spec = sharding.logical_to_spec(p.axes, p.shape, mesh, rules)
  return math.prod(size // (mesh.shape[axis] if axis else 1)
                   for size, axis in zip(p.shape, spec))


def params_per_device(cfg: ModelConfig, mesh: MeshShape,
                      rules=sharding.DEFAULT_RULES) -> int:
  """Parameter elements each device holds under the logical-axis rules."""
  outside, layer = split_params(cfg, mesh, rules_key(rules))
  return outside + cfg.num_layers * layer


def rules_key(rules):
  """Rules as a hashable tuple of `(logical, mesh axis)` pairs."""
  return tuple(dict(rules).items())


@functools.lru_cache(maxsize=1024)
def split_params(cfg, mesh, rules):
  """`(outside layers, one layer)` parameter elements per device.

  Cached: the tables evaluate the same model and mesh many times.
  """
  outside = layer = 0
  for p in param_shapes(cfg):
    if p.name.startswith("layers/"):
      layer += local_elements(p, mesh, rules)
    else:
      outside += local_elements(p, mesh, rules)
  return outside, layer
