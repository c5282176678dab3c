"""Low-rank adapters (LoRA) on the decoder's projections, in PEFT's format.

`add_lora(model, rank=r, alpha=a, targets=...)` gives each named projection
`W` of every block an adapter, so that the projection computes

    y = x W + (a / r) * (x A) B,

with `A` random and `B` zero (a fresh adapter changes nothing). `A` and `B`
are `nnx.LoRAParam` variables (float32 whatever the policy), so
`nnx.state(model, nnx.LoRAParam)` is exactly the trainable set and every
other parameter can stay frozen.

The projections keep entropo's layouts: `q_proj`, `k_proj`, `v_proj` are
`[D, H, hd]`, `o_proj` is `[H, hd, D]`, the MLP's are `[in, out]`. An
adapter of a weight whose first `n` dims are its inputs has
`A: [*in_dims, r]` and `B: [r, *out_dims]`; flattened, these are the
Hugging Face `nn.Linear`'s adapter with `in = prod(in_dims)` and
`out = prod(out_dims)`, and PEFT's tensors are their transposes:
`lora_A.weight = A.reshape(in, r).T` (`[r, in]`) and
`lora_B.weight = B.reshape(r, out).T` (`[out, r]`). The scaling is
`alpha / rank`, as in PEFT (without rsLoRA).

`A` is drawn uniformly from `[-1/sqrt(in), 1/sqrt(in)]`: the bound of
PEFT's default, a Kaiming-uniform init with `a = sqrt(5)` over the
`in` inputs (gain `sqrt(2 / (1 + 5))` times `sqrt(3 / in)`).

Both adapter products run through the model's precision policy
(`precision.einsum`), on operands cast to the compute dtype, like the base
projection they are added to.

`lora_disabled(model)` switches every adapter off for the calls traced
inside it (the base model: the KL reference of a LoRA run, without a
second copy of the weights). `merge_lora(model)` folds the adapters into the
base weights; `save_lora` / `load_lora` (lora_peft.py)
write and read PEFT adapter folders (`adapter_config.json` and
`adapter_model.safetensors`), which
`peft.PeftModel.from_pretrained(hf_model, path)` loads onto the
`transformers` model of the same checkpoint.
"""

import contextlib
import dataclasses
import math
import string

import jax
import jax.numpy as jnp
from flax import nnx

from entropo import precision as precision_lib

# Hugging Face names of the projections an adapter can target, in order;
# each maps to (its block submodule in entropo, in Hugging Face, the number
# of leading input dims of entropo's weight).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj")
_WHERE = {
    "q_proj": ("attn", "self_attn", 1),
    "k_proj": ("attn", "self_attn", 1),
    "v_proj": ("attn", "self_attn", 1),
    "o_proj": ("attn", "self_attn", 2),
    "gate_proj": ("mlp", "mlp", 1),
    "up_proj": ("mlp", "mlp", 1),
    "down_proj": ("mlp", "mlp", 1),
}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """What `add_lora` added: the rank, alpha and targeted projections."""

  rank: int
  alpha: float
  targets: tuple[str, ...]

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank


def parse_targets(targets) -> tuple[str, ...]:
  """`targets` (a comma-separated string or a sequence of names) checked.

  Returns the names in `TARGETS` order. Raises ValueError for an empty
  list, an unknown name or a repeated one.
  """
  if isinstance(targets, str):
    names = [t.strip() for t in targets.split(",") if t.strip()]
  else:
    try:
      names = list(targets)
    except TypeError:
      raise ValueError(f"LoRA targets must be a comma-separated string or a "
                       f"sequence of names; got {targets!r}.") from None
  if not names:
    raise ValueError(f"LoRA targets are empty; name some of "
                     f"{', '.join(TARGETS)}.")
  for name in names:
    if name not in TARGETS:
      raise ValueError(f"Unknown LoRA target {name!r}; expected names from "
                       f"{', '.join(TARGETS)}.")
  if len(set(names)) != len(names):
    raise ValueError(f"LoRA targets repeat a name: {names}.")
  return tuple(t for t in TARGETS if t in names)


def _check_rank_alpha(rank, alpha) -> None:
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"LoRA rank must be a positive int; got {rank!r}.")
  if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
      or not alpha > 0 or not math.isfinite(alpha)):
    raise ValueError(f"LoRA alpha must be a positive number; got "
                     f"{alpha!r}.")


class LoRA(nnx.Module):
  """One adapter: `x -> scaling * (x A) B` under the policy."""

  def __init__(self, in_shape, out_shape, *, rank: int, alpha: float,
               in_axes, out_axes, precision, rngs: nnx.Rngs):
    fan_in = math.prod(in_shape)
    bound = 1.0 / math.sqrt(fan_in)
    self.a = nnx.LoRAParam(
        jax.random.uniform(rngs.params(), (*in_shape, rank), jnp.float32,
                           -bound, bound),
        logical_axes=(*in_axes, None))
    self.b = nnx.LoRAParam(jnp.zeros((rank, *out_shape), jnp.float32),
                           logical_axes=(None, *out_axes))
    self.rank = rank
    self.num_in, self.num_out = len(in_shape), len(out_shape)
    self.scaling = float(alpha) / rank
    self.enabled = True
    self.precision = precision

  def __call__(self, x):
    """The adapter's output for `x: [..., *in_shape]` (compute dtype)."""
    precision = self.precision
    cast = precision.cast_compute
    ins, outs = _letters(self.num_in, self.num_out)
    low = precision.einsum(f"...{ins},{ins}z->...z", x, cast(self.a[...]))
    delta = precision.einsum(f"...z,z{outs}->...{outs}", low, cast(self.b[...]))
    return delta * jnp.asarray(self.scaling, delta.dtype)


def _letters(num_in: int, num_out: int) -> tuple[str, str]:
  """Einsum letters of the input and output dims (`z` is the rank)."""
  letters = string.ascii_lowercase
  return letters[:num_in], letters[num_in:num_in + num_out]


def adapted(module: nnx.Module, name: str, x, y):
  """`y` (projection `name` of `module` applied to `x`) plus its adapter.

  The identity when `module` has no enabled adapter on `name`.
  """
  adapters = getattr(module, "lora", None)
  if adapters is None or name not in adapters:
    return y
  adapter = adapters[name]
  if not adapter.enabled:
    return y
  return y + adapter(x).astype(y.dtype)


def _blocks(model):
  return list(model.layers)


def lora_config(model) -> LoRAConfig | None:
  """The model's `LoRAConfig`, or None without adapters."""
  return getattr(model, "lora_config", None)


def has_lora(model) -> bool:
  return lora_config(model) is not None


def add_lora(model, *, rank: int, alpha: float, targets,
             rngs: nnx.Rngs | None = None):
  """Adds LoRA adapters to the projections `targets` of every block.

  Args:
    model: an `entropo.models.Transformer` without adapters.
    rank: r, a positive int.
    alpha: the scaling numerator; the adapter's output is scaled by
      `alpha / rank` (PEFT's `lora_alpha`).
    targets: Hugging Face projection names (a sequence or a comma-separated
      string), from `TARGETS`.
    rngs: draws the `A` matrices (default `nnx.Rngs(0)`).

  Returns:
    `model`, changed in place: each targeted projection of each block
    computes `x W + (alpha / rank) (x A) B` with `A` random and `B` zero.

  Raises:
    ValueError: a bad rank, alpha or target, or a model that already has
      adapters.
  """
  _check_rank_alpha(rank, alpha)
  targets = parse_targets(targets)
  if has_lora(model):
    raise ValueError(f"The model already has LoRA adapters "
                     f"({lora_config(model)}); merge_lora it first.")
  rngs = nnx.Rngs(0) if rngs is None else rngs
  for block in _blocks(model):
    adapters = {}
    for name in targets:
      attr, _, num_in = _WHERE[name]
      module = getattr(block, attr)
      weight = getattr(module, name)
      shape = tuple(weight.get_value().shape)
      axes = weight.get_metadata().get("logical_axes") or (None,) * len(
          shape)
      adapters.setdefault(attr, {})[name] = LoRA(
          shape[:num_in], shape[num_in:], rank=rank, alpha=alpha,
          in_axes=tuple(axes[:num_in]), out_axes=tuple(axes[num_in:]),
          precision=module.precision, rngs=rngs)
    for attr, named in adapters.items():
      getattr(block, attr).lora = nnx.Dict(named)
  model.lora_config = LoRAConfig(rank=rank, alpha=float(alpha),
                                 targets=targets)
  return model


def cast_base(model, dtype):
  """Stores the seven projection weights of every block in `dtype`.

  Embeddings, the head and the norms keep their dtype. Every use of a
  projection weight casts it to the policy's compute dtype first, so with
  `dtype` the compute dtype (bfloat16 under the bf16 presets) the model
  computes exactly what it computed before, while its projections take
  half the memory of float32. Meant for frozen weights, a LoRA base: an
  optimizer would lose small updates to a bfloat16 master weight. Returns
  `model`, changed in place.
  """
  for block in _blocks(model):
    for name, (attr, _, _) in _WHERE.items():
      weight = getattr(getattr(block, attr), name)
      weight.set_value(weight.get_value().astype(dtype))
  return model


def _require_lora(model, what: str) -> LoRAConfig:
  config = lora_config(model)
  if config is None:
    raise ValueError(f"{what}: the model has no LoRA adapters (add_lora or "
                     f"load_lora first).")
  return config


def _adapters(model):
  """Yields `(layer index, target name, LoRA module)` in a fixed order."""
  config = lora_config(model)
  for i, block in enumerate(_blocks(model)):
    for name in config.targets:
      yield i, name, getattr(block, _WHERE[name][0]).lora[name]


@contextlib.contextmanager
def lora_disabled(model):
  """Within the block, calls of `model` compute without its adapters.

  The switch is read when a call is traced, so a jitted function calls
  the base model if it calls `model` inside this context; a model without
  adapters is unchanged.
  """
  modules = [m for _, m in nnx.iter_modules(model) if isinstance(m, LoRA)]
  before = [m.enabled for m in modules]
  for m in modules:
    m.enabled = False
  try:
    yield model
  finally:
    for m, enabled in zip(modules, before):
      m.enabled = enabled


def merge_lora(model):
  """Folds every adapter into its base weight and removes the adapters.

  `W <- W + (alpha / rank) A B` (the product in float32 with float32
  dots, the sum in float32, the result in the weight's dtype). Returns
  `model`, changed in place, without adapters: `save_pretrained` then
  exports the merged checkpoint.
  """
  config = _require_lora(model, "merge_lora")
  exact = precision_lib.get_precision("fp32")
  for block in _blocks(model):
    for name in config.targets:
      attr = _WHERE[name][0]
      module = getattr(block, attr)
      adapter = module.lora[name]
      weight = getattr(module, name)
      a = adapter.a[...].astype(jnp.float32)
      b = adapter.b[...].astype(jnp.float32)
      ins, outs = _letters(adapter.num_in, adapter.num_out)
      delta = exact.einsum(f"{ins}z,z{outs}->{ins}{outs}", a, b)
      merged = weight[...].astype(jnp.float32) + adapter.scaling * delta
      weight[...] = merged.astype(weight.get_value().dtype)
  for block in _blocks(model):
    for attr in {_WHERE[name][0] for name in config.targets}:
      delattr(getattr(block, attr), "lora")
  del model.lora_config
  return model
