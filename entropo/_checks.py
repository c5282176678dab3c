"""Input validation shared by the core: clear errors before any tracing work.

Every check raises `ValueError` (bad value or shape) or `TypeError` (bad
dtype) with a message that names the argument, what it got and what is
accepted. Checks only look at static information (shapes, dtypes, Python
options), so they are free under `jax.jit`.
"""

import difflib
from collections.abc import Callable, Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def did_you_mean(name: str, known) -> str:
  """` (did you mean 'x'?)` for the closest of `known`, or ""."""
  close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(name: str, value, choices: Collection,
                 fail: Callable[[str, str], None] | None = None):
  """Returns `value` if it is one of `choices`, else raises.

  A bool matches only a bool choice (`1` is not `True` here). The core's
  error is `ValueError("Unknown <name> <value>; expected one of ...")`;
  with `fail` (the config's `validation.fail`), `fail(name, why)` raises
  instead, with the closest choice for a misspelt string.
  """
  same = [c for c in choices
          if c == value and isinstance(c, bool) == isinstance(value, bool)]
  if same:
    return value
  if fail is None:
    raise ValueError(
        f"Unknown {name} {value!r}; expected one of "
        f"{', '.join(repr(c) for c in choices)}."
    )
  hint = (did_you_mean(value, choices) if isinstance(value, str)
          and all(isinstance(c, str) for c in choices) else "")
  fail(name, f"{value!r} is not one of {list(choices)}{hint}")


def check_rank(name: str, x, ranks: int | Sequence[int]) -> None:
  """Raises ValueError unless `x.ndim` is in `ranks`."""
  ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
  ndim = np.ndim(x)
  if ndim not in ranks:
    expected = " or ".join(str(r) for r in ranks)
    raise ValueError(
        f"{name} must have rank {expected}; got rank {ndim} with shape "
        f"{np.shape(x)}."
    )


def check_float(name: str, x) -> None:
  """Raises TypeError unless `x` has a floating dtype."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{name} must have a floating dtype (float32, bfloat16, float16, "
        f"float64); got {dtype}."
    )


def check_int(name: str, x) -> None:
  """Raises TypeError unless `x` has an integer dtype."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(
        f"{name} must have an integer dtype (token ids); got {dtype}."
    )


def check_nonempty(name: str, x) -> None:
  """Raises ValueError if `[B, T]` `x` has no row or no position: a loss or
  statistic over nothing is undefined (shapes are static, so also under
  jit)."""
  if 0 in x.shape:
    raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): there is "
                     "no token to compute over; need B >= 1 and T >= 1.")


def check_same_shape(**arrays) -> None:
  """Raises ValueError unless all given arrays share one shape."""
  shapes = {name: np.shape(x) for name, x in arrays.items() if x is not None}
  if len(set(shapes.values())) > 1:
    desc = ", ".join(f"{n}={s}" for n, s in shapes.items())
    raise ValueError(f"Shapes must match; got {desc}.")


def check_mask(mask, shape) -> None:
  """Raises ValueError/TypeError unless `mask` is a bool array of `shape`."""
  if jnp.result_type(mask) != jnp.bool_:
    raise TypeError(
        f"mask must be a bool array of valid tokens; got dtype "
        f"{jnp.result_type(mask)}."
    )
  if np.shape(mask) != tuple(shape):
    raise ValueError(
        f"mask must have shape {tuple(shape)}; got {np.shape(mask)}."
    )


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
  """Raises ValueError for a concrete number that is negative (or zero)."""
  if isinstance(value, (int, float)):
    if value < 0 or (value == 0 and not allow_zero):
      bound = ">= 0" if allow_zero else "> 0"
      raise ValueError(f"{name} must be {bound}; got {value}.")


def check_token_ids(name: str, ids, vocab: int) -> None:
  """Raises ValueError if concrete `ids` hold a value outside `[0, vocab)`.

  The one check here that reads values: only for arrays this process holds
  (NumPy, or a fully addressable, non-traced jax.Array); under `jax.jit`
  the callers document what an out-of-range id gives instead.
  """
  if isinstance(ids, jax.core.Tracer):
    return
  if isinstance(ids, jax.Array) and not ids.is_fully_addressable:
    return
  ids = np.asarray(ids)
  bad = (ids < 0) | (ids >= vocab)
  if bad.any():
    where = np.argwhere(bad)
    raise ValueError(
        f"{name} must be token ids in [0, {vocab}); got "
        f"{ids[bad][:4].tolist()} at positions {where[:4].tolist()}"
        f"{' and more' if len(where) > 4 else ''}."
    )
