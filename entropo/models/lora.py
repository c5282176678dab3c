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
(`policy.einsum`), on operands cast to the compute dtype, like the base
projection they are added to.

`lora_disabled(model)` switches every adapter off for the calls traced
inside it (the base model: the KL reference of a LoRA run, without a
second copy of the weights). `merge_lora(model)` folds the adapters into the
base weights; `save_lora` / `load_lora` write and read PEFT adapter folders
(`adapter_config.json` and `adapter_model.safetensors`), which
`peft.PeftModel.from_pretrained(hf_model, path)` loads onto the
`transformers` model of the same checkpoint.
"""

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import string

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
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
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_LOADABLE = tuple(np.dtype(d) for d in (np.float32, np.float64, np.float16,
                                        ml_dtypes.bfloat16))
# PEFT's prefix of a causal LM's decoder layers.
_PEFT_PREFIX = "base_model.model.model.layers."
# adapter_config.json options entropo does not implement: each must be at
# the value meaning "off" (or absent).
_UNSUPPORTED_OFF = {
    "use_rslora": (False, None),
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layer_replication": (None, []),
    "exclude_modules": (None, [], ""),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}, []),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "alora_invocation_tokens": (None, []),
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
               in_axes, out_axes, policy, rngs: nnx.Rngs):
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
    self.policy = policy

  def __call__(self, x):
    """The adapter's output for `x: [..., *in_shape]` (compute dtype)."""
    policy = self.policy
    cast = policy.cast_compute
    ins, outs = _letters(self.num_in, self.num_out)
    low = policy.einsum(f"...{ins},{ins}z->...z", x, cast(self.a[...]))
    delta = policy.einsum(f"...z,z{outs}->...{outs}", low, cast(self.b[...]))
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
          policy=module.policy, rngs=rngs)
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


def _peft_names(i: int, name: str) -> tuple[str, str]:
  prefix = f"{_PEFT_PREFIX}{i}.{_WHERE[name][1]}.{name}."
  return prefix + "lora_A.weight", prefix + "lora_B.weight"


def peft_tensors(model) -> dict[str, np.ndarray]:
  """The adapters as PEFT names them: `lora_A` `[r, in]`, `lora_B`
  `[out, r]`, float32 NumPy arrays."""
  _require_lora(model, "peft_tensors")
  tensors = {}
  for i, name, adapter in _adapters(model):
    a = np.asarray(jax.device_get(adapter.a[...]), np.float32)
    b = np.asarray(jax.device_get(adapter.b[...]), np.float32)
    a_name, b_name = _peft_names(i, name)
    tensors[a_name] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
    tensors[b_name] = np.ascontiguousarray(b.reshape(b.shape[0], -1).T)
  return tensors


def save_lora(model, path, *, base_model_name_or_path: str | None = None
              ) -> None:
  """Writes the adapters as a PEFT LoRA folder.

  `path/adapter_config.json` (`peft_type` LORA, `task_type` CAUSAL_LM, `r`,
  `lora_alpha`, `target_modules`, `base_model_name_or_path`) and
  `path/adapter_model.safetensors` (float32 `lora_A` / `lora_B` weights
  named `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
  and so on). `peft.PeftModel.from_pretrained(hf_model, path)` loads it
  onto the `transformers` model of the base checkpoint.

  Args:
    model: a `Transformer` with adapters.
    path: the folder (created if needed).
    base_model_name_or_path: recorded in the config (PEFT uses it when the
      base model is not given); None writes null.
  """
  config = _require_lora(model, "save_lora")
  tensors = peft_tensors(model)
  directory = pathlib.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  adapter_config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": config.rank,
      "lora_alpha": config.alpha,
      "target_modules": list(config.targets),
      "lora_dropout": 0.0,
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "rank_pattern": {},
      "alpha_pattern": {},
  }
  with open(directory / ADAPTER_CONFIG_NAME, "w") as f:
    json.dump(adapter_config, f, indent=2)
  write_safetensors(tensors, directory / ADAPTER_WEIGHTS_NAME)


def write_safetensors(tensors, path, metadata=None) -> None:
  """`safetensors.numpy.save_file` (PyTorch's layout, `format: pt`), with
  the permissions of any new file (it writes 0600, private to its owner)."""
  safetensors.numpy.save_file(tensors, path,
                              metadata=metadata or {"format": "pt"})
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def _read_adapter_config(directory: pathlib.Path) -> LoRAConfig:
  file = directory / ADAPTER_CONFIG_NAME
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found.")
  with open(file) as f:
    config = json.load(f)
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{file}: peft_type is {config.get('peft_type')!r}; "
                     f"only 'LORA' adapters are read.")
  for key, off in _UNSUPPORTED_OFF.items():
    if key in config and config[key] not in off:
      raise ValueError(f"{file}: {key}={config[key]!r} is not implemented "
                       f"by entropo's LoRA.")
  targets = config.get("target_modules")
  if targets == "all-linear":
    targets = TARGETS
  elif isinstance(targets, str) and targets not in TARGETS:
    raise ValueError(f"{file}: target_modules={targets!r} (a pattern) is "
                     f"not supported; list names from "
                     f"{', '.join(TARGETS)}.")
  elif isinstance(targets, str):
    targets = (targets,)
  try:
    targets = parse_targets(targets or ())
  except ValueError as e:
    raise ValueError(f"{file}: target_modules: {e}") from None
  rank, alpha = config.get("r"), config.get("lora_alpha")
  if isinstance(alpha, float) and alpha.is_integer():
    alpha = float(alpha)
  try:
    _check_rank_alpha(rank, alpha)
  except ValueError as e:
    raise ValueError(f"{file}: {e}") from None
  return LoRAConfig(rank=rank, alpha=float(alpha), targets=targets)


def load_lora(model, path, *, rngs: nnx.Rngs | None = None):
  """Reads a PEFT LoRA folder into `model`'s adapters.

  A model without adapters gets them (`add_lora` with the folder's rank,
  alpha and targets); one with adapters must match them. Loading is
  strict: a missing, unexpected or mis-shaped tensor raises a ValueError
  that names it. Values are stored in float32 (exact for the float32
  folders `save_lora` writes).

  Returns:
    `model`, changed in place.
  """
  directory = pathlib.Path(path)
  file_config = _read_adapter_config(directory)
  current = lora_config(model)
  if current is None:
    add_lora(model, rank=file_config.rank, alpha=file_config.alpha,
             targets=file_config.targets, rngs=rngs)
  elif current != file_config:
    raise ValueError(f"{directory} holds adapters {file_config}; the model "
                     f"has {current}.")
  weights = directory / ADAPTER_WEIGHTS_NAME
  if not weights.is_file():
    raise FileNotFoundError(f"{weights} not found.")
  tensors = safetensors.numpy.load_file(weights)
  expected = {}
  for i, name, adapter in _adapters(model):
    a_name, b_name = _peft_names(i, name)
    expected[a_name] = (adapter.a, "a")
    expected[b_name] = (adapter.b, "b")
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  if missing or unexpected:
    raise ValueError(f"{weights} does not match the model's adapters: "
                     f"missing tensors {missing}; unexpected tensors "
                     f"{unexpected}.")
  for tensor_name, (variable, kind) in expected.items():
    array = tensors[tensor_name]
    shape = tuple(variable.get_value().shape)
    if kind == "a":
      want = (shape[-1], math.prod(shape[:-1]))
    else:
      want = (math.prod(shape[1:]), shape[0])
    if array.shape != want:
      raise ValueError(f"Tensor {tensor_name!r} has shape "
                       f"{list(array.shape)}; the model implies "
                       f"{list(want)}.")
    if array.dtype not in _LOADABLE:
      raise ValueError(f"Tensor {tensor_name!r} has dtype {array.dtype}; "
                       f"expected a floating dtype.")
    value = np.asarray(array, np.float32).T.reshape(shape)
    variable[...] = jnp.asarray(value, jnp.float32)
  return model
