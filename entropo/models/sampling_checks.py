"""Validation of the sampler's arguments, on concrete values, before tracing.

Shared by `sample` (sampler.py), `sample_in_flight` (inflight.py) and the
multi-turn context (multiturn.py).
"""

import jax
import jax.numpy as jnp
import numpy as np

from entropo import sharding as sharding_lib


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(
      value, (bool, np.bool_))


def _is_real(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not (
      isinstance(value, (bool, np.bool_)))


def _concrete(name, x) -> np.ndarray:
  """The values to validate: all of `x`, or this process's rows of it."""
  if isinstance(x, jax.core.Tracer):
    raise ValueError(
        f"{name} must be a concrete array: sample() validates its inputs "
        "and compiles itself, so call it outside jax.jit/vmap."
    )
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return sharding_lib.local_rows(x)
  return np.asarray(x)


def _device_input(x, checked: np.ndarray, dtype) -> jax.Array:
  """`x` for the compiled call; an array placed on a mesh stays there."""
  if isinstance(x, jax.Array) and (not x.is_fully_addressable or isinstance(
      x.sharding, jax.sharding.NamedSharding)):
    return x if x.dtype == dtype else x.astype(dtype)
  return jnp.asarray(checked, dtype)


def _rows(indices) -> str:
  indices = [int(i) for i in indices]
  shown = ", ".join(str(i) for i in indices[:8])
  return shown + (", ..." if len(indices) > 8 else "")


def _check_key(key):
  if isinstance(key, jax.core.Tracer):
    return key
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key must be a single PRNG key; got shape "
                       f"{key.shape}.")
    return key
  arr = np.asarray(key) if dtype is not None else None
  if arr is None or arr.dtype != np.uint32 or arr.shape != (2,):
    raise ValueError(
        "key must be a JAX PRNG key (jax.random.key(seed) or "
        f"jax.random.PRNGKey(seed)); got {key!r}."
    )
  return jax.random.wrap_key_data(jnp.asarray(arr))


def _check_prompts(prompt_tokens, prompt_mask, vocab: int, context: int):
  """`(tokens, bool mask, longest prompt)` as NumPy; raises naming the
  problem."""
  tokens = _concrete("prompt_tokens", prompt_tokens)
  mask = _concrete("prompt_mask", prompt_mask)
  if tokens.ndim != 2:
    raise ValueError(f"prompt_tokens must be a [B, P] array; got shape "
                     f"{tokens.shape}.")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise TypeError(f"prompt_tokens must have an integer dtype (token ids); "
                    f"got {tokens.dtype}.")
  if mask.shape != tokens.shape:
    raise ValueError(f"prompt_mask must have the shape of prompt_tokens "
                     f"{tokens.shape}; got {mask.shape}.")
  if mask.dtype != np.bool_:
    if not np.issubdtype(mask.dtype, np.integer) or not np.isin(
        mask, (0, 1)).all():
      raise TypeError(f"prompt_mask must be bool (or 0/1 integers); got "
                      f"dtype {mask.dtype}.")
    mask = mask.astype(bool)
  batch, width = tokens.shape
  if batch == 0 or width == 0:
    raise ValueError(f"The prompt is empty: prompt_tokens has shape "
                     f"{tokens.shape}.")
  lengths = mask.sum(axis=1)
  if (lengths == 0).any():
    raise ValueError(
        f"Empty prompt: prompt_mask has no valid token in row(s) "
        f"{_rows(np.flatnonzero(lengths == 0))}; every prompt needs at "
        "least one token."
    )
  bad = mask & ((tokens < 0) | (tokens >= vocab))
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise ValueError(
        f"prompt_tokens[{row}, {col}] = {tokens[row, col]} is outside the "
        f"vocabulary [0, {vocab})."
    )
  longest = int(lengths.max())
  if longest > context:
    raise ValueError(
        f"A prompt of {longest} tokens (row {int(lengths.argmax())}) is "
        f"longer than the model's context of {context} tokens."
    )
  return tokens, mask, longest
