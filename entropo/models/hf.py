"""Hugging Face checkpoints: load and export local model directories.

A directory holds `config.json` and the weights, either one
`model.safetensors` or shards listed by `model.safetensors.index.json`, in
float32, bfloat16 or float16, in PyTorch's layout (`nn.Linear` weights are
`[out, in]`). `from_pretrained` reads it into a `Transformer`;
`save_pretrained` writes a model back in the same format, so that
`transformers` (and vLLM, and `from_pretrained`) read it.

One table (`_table`) names every parameter on both sides and its layout; both
directions use it. Loading is strict: a tensor that is missing, unexpected,
mis-shaped or not floating point raises a ValueError that names it, and a
parameter of the model that the table does not cover is an error too, so no
parameter is ever left at an initial value. Non-persistent buffers that old
checkpoints carry (`rotary_emb.inv_freq`) are skipped, and so is an
`lm_head.weight` equal to the embedding in a tied model.

Weights are read with `safetensors`' NumPy backend (bfloat16 as
`ml_dtypes.bfloat16`, which JAX depends on); torch is never imported.
"""

import dataclasses
import json
import math
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
from flax import nnx

from entropo import precision as precision_lib
from entropo.models import lora as lora_lib
from entropo.models import lora_peft
from entropo.models.config import ModelConfig
from entropo.models.transformer import Transformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Checkpoint dtypes by their `config.json` / torch name.
_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
# Buffers that some checkpoints store but that are recomputed, not learned.
_LOADABLE = (*_DTYPES.values(), np.dtype(np.float64))
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

Path = tuple[Any, ...]  # a parameter's path in the NNX graph


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How a parameter of shape `shape` is stored in the checkpoint.

  `kind` is `copy` (same shape), `flat` (flattened: attention biases
  `[H, hd] <-> [H * hd]`) or `linear` (a torch `nn.Linear` weight
  `[out, in]`: our first `num_in` dims are `in`, the rest `out`).
  """

  kind: str
  num_in: int = 1

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.kind == "copy":
      return tuple(shape)
    if self.kind == "flat":
      return (math.prod(shape),)
    return (math.prod(shape[self.num_in:]), math.prod(shape[:self.num_in]))

  def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if self.kind == "linear":
      x = x.T
    return x.reshape(shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.kind == "copy":
      return x
    if self.kind == "flat":
      return x.reshape(-1)
    inner = math.prod(x.shape[:self.num_in])
    return np.ascontiguousarray(x.reshape(inner, -1).T)


_COPY, _FLAT = _Layout("copy"), _Layout("flat")
_LINEAR, _LINEAR_2 = _Layout("linear", 1), _Layout("linear", 2)


def _table(config: ModelConfig) -> dict[str, tuple[Path, _Layout]]:
  """Hugging Face tensor name -> (path in the `Transformer`, layout)."""
  table = {
      "model.embed_tokens.weight": (("embed_tokens",), _COPY),
      "model.norm.weight": (("norm", "scale"), _COPY),
  }
  if not config.tie_word_embeddings:
    table["lm_head.weight"] = (("lm_head",), _LINEAR)
  for i in range(config.num_layers):
    hf, ours = f"model.layers.{i}.", ("layers", i)
    block = {
        "input_layernorm.weight": (("input_layernorm", "scale"), _COPY),
        "post_attention_layernorm.weight": (
            ("post_attention_layernorm", "scale"), _COPY),
        "self_attn.q_proj.weight": (("attn", "q_proj"), _LINEAR),
        "self_attn.k_proj.weight": (("attn", "k_proj"), _LINEAR),
        "self_attn.v_proj.weight": (("attn", "v_proj"), _LINEAR),
        "self_attn.o_proj.weight": (("attn", "o_proj"), _LINEAR_2),
        "mlp.gate_proj.weight": (("mlp", "gate_proj"), _LINEAR),
        "mlp.up_proj.weight": (("mlp", "up_proj"), _LINEAR),
        "mlp.down_proj.weight": (("mlp", "down_proj"), _LINEAR),
    }
    if config.qkv_bias:
      for p in "qkv":
        block[f"self_attn.{p}_proj.bias"] = (("attn", f"{p}_bias"), _FLAT)
    if config.qk_norm:
      for p in "qk":
        block[f"self_attn.{p}_norm.weight"] = (("attn", f"{p}_norm", "scale"),
                                               _COPY)
    for name, (path, layout) in block.items():
      table[hf + name] = (ours + path, layout)
  return table


def _checked_table(config: ModelConfig, flat_state) -> dict:
  """The table, after checking it covers exactly the model's variables."""
  table = _table(config)
  paths = {path for path, _ in flat_state}
  mapped = {path for path, _ in table.values()}
  if paths != mapped:
    # A bug in entropo (the model and the table disagree), not in the file.
    raise RuntimeError(
        "entropo's Hugging Face name table and the Transformer disagree: "
        f"unmapped model variables {sorted(map(str, paths - mapped))}, "
        f"mapped paths missing from the model "
        f"{sorted(map(str, mapped - paths))}."
    )
  return table


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found.")
  with open(path) as f:
    return json.load(f)


def _weight_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> the safetensors file holding it."""
  single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
  if single.is_file():
    with safetensors.safe_open(single, framework="np") as f:
      return {name: single for name in f.keys()}
  if index.is_file():
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index} has no 'weight_map' dictionary.")
    files = {}
    for name, file in weight_map.items():
      files[name] = directory / file
      if not files[name].is_file():
        raise FileNotFoundError(
            f"{files[name]} (holding {name!r}, listed in {index}) not found."
        )
    return files
  raise FileNotFoundError(
      f"No weights in {directory}: expected {WEIGHTS_NAME} or {INDEX_NAME} "
      f"(only safetensors checkpoints are supported)."
  )


def _read_tensors(files: dict[str, pathlib.Path], names) -> dict:
  """Reads `names`, opening each file once. Returns name -> np.ndarray."""
  by_file: dict[pathlib.Path, list[str]] = {}
  for name in names:
    by_file.setdefault(files[name], []).append(name)
  out = {}
  for file, file_names in by_file.items():
    with safetensors.safe_open(file, framework="np") as f:
      present = set(f.keys())
      for name in file_names:
        if name not in present:
          raise ValueError(
              f"Tensor {name!r} is listed in the index but missing from "
              f"{file}."
          )
        out[name] = f.get_tensor(name)
  return out


def _tied_head_is_redundant(files) -> bool:
  """Whether a tied checkpoint's `lm_head.weight` equals the embedding."""
  tensors = _read_tensors(files, ["lm_head.weight",
                                  "model.embed_tokens.weight"])
  head, embed = tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]
  return head.shape == embed.shape and np.array_equal(head, embed)


def _check_names(files, table, config: ModelConfig, directory) -> None:
  """Raises a ValueError naming every missing and unexpected tensor."""
  names = {n for n in files if not _IGNORED.search(n)}
  if (config.tie_word_embeddings and "lm_head.weight" in names
      and "model.embed_tokens.weight" in names
      and _tied_head_is_redundant(files)):
    names.discard("lm_head.weight")
  missing = sorted(set(table) - names)
  unexpected = sorted(names - set(table))
  if not missing and not unexpected:
    return
  parts = []
  if missing:
    parts.append(f"missing tensors {missing}")
  if unexpected:
    parts.append(f"unexpected tensors {unexpected}")
    if config.tie_word_embeddings and "lm_head.weight" in unexpected:
      parts.append("(lm_head.weight differs from the embedding but "
                   "config.json says tie_word_embeddings=true)")
  raise ValueError(
      f"Checkpoint {directory} does not match its {config.family} config: "
      f"{'; '.join(parts)}."
  )


def from_pretrained(path, *, precision="fp32", attention="auto",
                    attention_chunk_size=None, remat="none",
                    scan_layers=False) -> Transformer:
  """Loads a local Hugging Face model directory into a `Transformer`.

  Args:
    path: a directory with `config.json` and `model.safetensors` (or
      `model.safetensors.index.json` and its shards). Llama, Qwen2 and Qwen3
      (`model_type`), float32, bfloat16 or float16 weights.
    precision: a `Precision` or preset name; weights are stored in its
      `param_dtype` whatever the checkpoint's dtype.
    attention: `ModelConfig.attention` (not in `config.json`).
    attention_chunk_size: `ModelConfig.attention_chunk_size`; None: its
      default.
    remat: the `Transformer`'s rematerialisation (`REMAT_OPTIONS`).
    scan_layers: the `Transformer`'s blocks as one scan.

  Returns:
    The model, every parameter read from the checkpoint.

  Raises:
    FileNotFoundError: no config or weights.
    ValueError: an unsupported config (see `ModelConfig.from_hf`), or a
      tensor missing, unexpected, mis-shaped or not floating point (the
      message names it).
  """
  directory = pathlib.Path(path)
  config = ModelConfig.from_hf(_read_json(directory / CONFIG_NAME)).replace(
      attention=attention)
  if attention_chunk_size is not None:
    config = config.replace(attention_chunk_size=attention_chunk_size)
  precision = precision_lib.get_precision(precision)
  abstract = nnx.eval_shape(
      lambda: Transformer(config, precision=precision, rngs=nnx.Rngs(0),
                          remat=remat, scan_layers=scan_layers))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  table = _checked_table(config, flat)

  files = _weight_files(directory)
  _check_names(files, table, config, directory)
  tensors = _read_tensors(files, table)
  by_path = {path: (name, layout) for name, (path, layout) in table.items()}
  leaves = []
  for var_path, variable in flat:
    name, layout = by_path[var_path]
    shape = tuple(variable.get_value().shape)
    array = tensors.pop(name)
    if array.shape != layout.hf_shape(shape):
      raise ValueError(
          f"Tensor {name!r} has shape {list(array.shape)}; the config "
          f"implies {list(layout.hf_shape(shape))}."
      )
    if array.dtype not in _LOADABLE:
      raise ValueError(
          f"Tensor {name!r} has dtype {array.dtype}; expected a floating "
          f"dtype."
      )
    value = precision.cast_params(jnp.asarray(layout.to_ours(array, shape)))
    leaves.append((var_path, variable.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def hf_config(config: ModelConfig, *, dtype: str = "float32") -> dict:
  """The `config.json` dictionary `transformers` reads back as `config`."""
  hf = {
      "architectures": [_ARCHITECTURES[config.family]],
      "model_type": config.family,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      # transformers >= 5 reads `rope_parameters`, older versions
      # `rope_theta`; both are written and agree.
      "rope_theta": config.rope_theta,
      "rope_parameters": {"rope_type": "default",
                          "rope_theta": config.rope_theta},
      "tie_word_embeddings": config.tie_word_embeddings,
      "mlp_bias": False,
      "dtype": dtype,
      "torch_dtype": dtype,
  }
  if config.family in ("llama", "qwen3"):
    hf["attention_bias"] = False  # Qwen2 always has q/k/v biases.
  if config.family in ("qwen2", "qwen3"):
    hf["use_sliding_window"] = False
  return hf


def _dtype_name(dtype) -> str:
  try:
    dtype = np.dtype(dtype)
  except TypeError:
    raise ValueError(f"Cannot export dtype {dtype!r}; expected one of "
                     f"{', '.join(repr(d) for d in _DTYPES)}.") from None
  for name, known in _DTYPES.items():
    if dtype == known:
      return name
  raise ValueError(
      f"Cannot export dtype {dtype}; expected one of "
      f"{', '.join(repr(d) for d in _DTYPES)}."
  )


def save_pretrained(model: Transformer, path, *, dtype=None,
                    max_shard_bytes: int | None = None,
                    extra_config: dict | None = None) -> None:
  """Writes `model` as a Hugging Face model directory.

  Writes `config.json` and either `model.safetensors` or, when the weights
  exceed `max_shard_bytes`, shards `model-0000i-of-0000n.safetensors` and
  `model.safetensors.index.json`. Weight files of an earlier export in
  `path` are removed first (as `transformers` does), so a directory never
  mixes two exports. A tied model writes no `lm_head.weight`.

  Args:
    model: the `Transformer`.
    path: the directory (created if needed).
    dtype: `float32`, `bfloat16` or `float16` (names or dtypes); None keeps
      the parameters' dtype.
    max_shard_bytes: the largest shard; None writes one file. A tensor
      larger than this gets a shard of its own.
    extra_config: keys merged into `config.json` (e.g. `eos_token_id`,
      `bos_token_id` from the original checkpoint's config).

  Raises:
    ValueError: the model has LoRA adapters (merge or save them first), or
      mixed or unexportable dtypes.
  """
  if lora_lib.has_lora(model):
    raise ValueError(
        "The model has LoRA adapters: merge_lora(model) first to export "
        "the merged weights, or save_lora(model, path) to write the "
        "adapters as a PEFT folder.")
  config = model.config
  _, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  table = _checked_table(config, flat)
  values = {p: v.get_value() for p, v in flat}
  if dtype is not None:
    dtype = _DTYPES[_dtype_name(_DTYPES.get(dtype, dtype))]
  _check_shard_bytes(max_shard_bytes)
  tensors = {}
  for name, (var_path, layout) in table.items():
    value = values[var_path]
    if dtype is not None:
      value = value.astype(dtype)
    tensors[name] = layout.to_hf(np.asarray(jax.device_get(value)))
  names = {_dtype_name(t.dtype) for t in tensors.values()}
  if len(names) != 1:
    raise ValueError(f"Parameters have mixed dtypes {sorted(names)}; pass "
                     f"dtype= to export one.")
  dtype_name = names.pop()

  directory = pathlib.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  for old in directory.iterdir():
    if old.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD.match(old.name):
      old.unlink()
  hf = hf_config(config, dtype=dtype_name)
  hf.update(extra_config or {})
  with open(directory / CONFIG_NAME, "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)

  # The layout is PyTorch's; transformers reads `format` to know it.
  metadata = {"format": "pt"}
  shards = _shard(tensors, max_shard_bytes)
  if len(shards) == 1:
    lora_peft.write_safetensors(shards[0], directory / WEIGHTS_NAME,
                               metadata)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    lora_peft.write_safetensors(shard, directory / file, metadata)
    weight_map.update({name: file for name in shard})
  index = {
      "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
      "weight_map": dict(sorted(weight_map.items())),
  }
  with open(directory / INDEX_NAME, "w") as f:
    json.dump(index, f, indent=2)


def _check_shard_bytes(max_bytes) -> None:
  if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(
      max_bytes, int) or max_bytes < 1):
    raise ValueError(f"max_shard_bytes must be a positive int or None; got "
                     f"{max_bytes!r}.")


def _shard(tensors: dict, max_bytes: int | None) -> list[dict]:
  """Greedy split, in order, into dicts of at most `max_bytes` each."""
  if max_bytes is None:
    return [tensors]
  shards, current, size = [], {}, 0
  for name, tensor in tensors.items():
    if current and size + tensor.nbytes > max_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensor
    size += tensor.nbytes
  shards.append(current)
  return shards

