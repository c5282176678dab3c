"""LoRA adapters in PEFT's folder format: `save_lora`, `load_lora`.

A folder holds `adapter_config.json` (rank, alpha, target modules) and
`adapter_model.safetensors`, whose float32 tensors are the transposes of
entropo's flattened adapters (lora.py): `lora_A.weight = A.reshape(in,
r).T` (`[r, in]`) and `lora_B.weight = B.reshape(r, out).T` (`[out, r]`).
`peft.PeftModel.from_pretrained(hf_model, path)` loads what `save_lora`
writes onto the `transformers` model of the same checkpoint. Import these
from here or from `entropo.models`, which re-exports them.
"""

import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import nnx

from entropo.models import lora as lora_lib

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


def _peft_names(i: int, name: str) -> tuple[str, str]:
  prefix = f"{_PEFT_PREFIX}{i}.{lora_lib._WHERE[name][1]}.{name}."
  return prefix + "lora_A.weight", prefix + "lora_B.weight"


def peft_tensors(model) -> dict[str, np.ndarray]:
  """The adapters as PEFT names them: `lora_A` `[r, in]`, `lora_B`
  `[out, r]`, float32 NumPy arrays."""
  lora_lib._require_lora(model, "peft_tensors")
  tensors = {}
  for i, name, adapter in lora_lib._adapters(model):
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
  config = lora_lib._require_lora(model, "save_lora")
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


def _read_adapter_config(directory: pathlib.Path) -> lora_lib.LoRAConfig:
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
    targets = lora_lib.TARGETS
  elif isinstance(targets, str) and targets not in lora_lib.TARGETS:
    raise ValueError(f"{file}: target_modules={targets!r} (a pattern) is "
                     f"not supported; list names from "
                     f"{', '.join(lora_lib.TARGETS)}.")
  elif isinstance(targets, str):
    targets = (targets,)
  try:
    targets = lora_lib.parse_targets(targets or ())
  except ValueError as e:
    raise ValueError(f"{file}: target_modules: {e}") from None
  rank, alpha = config.get("r"), config.get("lora_alpha")
  if isinstance(alpha, float) and alpha.is_integer():
    alpha = float(alpha)
  try:
    lora_lib._check_rank_alpha(rank, alpha)
  except ValueError as e:
    raise ValueError(f"{file}: {e}") from None
  return lora_lib.LoRAConfig(rank=rank, alpha=float(alpha), targets=targets)


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
  current = lora_lib.lora_config(model)
  if current is None:
    lora_lib.add_lora(model, rank=file_config.rank,
                      alpha=file_config.alpha, targets=file_config.targets,
                      rngs=rngs)
  elif current != file_config:
    raise ValueError(f"{directory} holds adapters {file_config}; the model "
                     f"has {current}.")
  weights = directory / ADAPTER_WEIGHTS_NAME
  if not weights.is_file():
    raise FileNotFoundError(f"{weights} not found.")
  tensors = safetensors.numpy.load_file(weights)
  expected = {}
  for i, name, adapter in lora_lib._adapters(model):
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
