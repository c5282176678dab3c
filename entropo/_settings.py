"""Typed, documented settings: the fields of a registered component.

Objectives (entropo/objectives/registry.py) and controllers
(entropo/controllers/registry.py) declare their config fields as a frozen
dataclass of `setting(...)` fields: a default, one line of doc, and the
accepted values (bounds of a number, or a check). `Settings.__post_init__`
refuses a bad value with `SettingError` naming the field, and the docs'
tables print each field with `bounds_text`.
"""

import dataclasses
import importlib
import math
import pkgutil
from collections.abc import Callable, Collection
from typing import Any

from entropo import _checks


class SettingError(ValueError):
  """A bad setting; `field` names it (e.g. `kl_cov_ratio`)."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field} {message}")
    self.field = field
    self.message = message


def setting(default, doc: str, *, low=None, high=None,
            low_open: bool = False, high_open: bool = False,
            check: Callable[[Any], str | None] | None = None,
            accepted: str = ""):
  """A documented settings field with its accepted values.

  Args:
    default: the field's default (in code and in the config).
    doc: one line: what it is (shown in the config docs and the tables).
    low, high: bounds of a number (None: unbounded), open at an end with
      `low_open` / `high_open`; NaN and infinities are refused.
    check: for a value that is not one number, a function returning why
      the value is bad (a string), or None when it is good.
    accepted: with `check`, the accepted values as the docs show them.
  """
  return dataclasses.field(default=default, metadata=dict(
      doc=doc, bounds=(low, high, low_open, high_open), check=check,
      accepted=accepted))


def choice(default: str, doc: str, options: Collection[str]):
  """A setting whose value is one of `options` (with a did-you-mean)."""
  options = tuple(options)

  def check(value):
    if value in options and isinstance(value, str):
      return None
    hint = (_checks.did_you_mean(value, options) if isinstance(value, str)
            else "")
    return f"must be one of {list(options)}; got {value!r}{hint}"

  return setting(default, doc, check=check,
                 accepted=" / ".join(map(str, options)))


def flag(default: bool, doc: str):
  """A setting that is True or False (not 0/1 or a string)."""
  return setting(default, doc, accepted="True / False", check=lambda v: (
      None if isinstance(v, bool) else f"must be True or False; got {v!r}"))


def _is_concrete_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def why_bad(field: dataclasses.Field, value) -> str | None:
  """Why `value` is not accepted by `field` (None: accepted)."""
  if field.metadata.get("check") is not None:
    return field.metadata["check"](value)
  low, high, low_open, high_open = field.metadata["bounds"]
  if not _is_concrete_number(value):
    # A traced value (under jit) is not checked; a string or bool is bad.
    return None if hasattr(value, "dtype") else f"got {value!r}"
  ok = math.isfinite(value)
  if low is not None:
    ok = ok and (value > low if low_open else value >= low)
  if high is not None:
    ok = ok and (value < high if high_open else value <= high)
  if ok:
    return None
  return f"must be a number in {_interval(field)}; got {value!r}"


def _interval(field: dataclasses.Field) -> str:
  low, high, low_open, high_open = field.metadata["bounds"]
  left = "(" if low_open or low is None else "["
  right = ")" if high_open or high is None else "]"
  return (f"{left}{'-inf' if low is None else low}, "
          f"{'inf' if high is None else high}{right}")


def bounds_text(field: dataclasses.Field) -> str:
  """The accepted values of a setting, for docs (`[0, 1]`, `a / b`)."""
  if field.metadata.get("check") is not None:
    return field.metadata.get("accepted", "")
  return _interval(field)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """Base of a component's settings: checks every field's declared values
  in `__post_init__` and raises `SettingError` naming the field."""

  def __post_init__(self):
    for field in dataclasses.fields(self):
      why = why_bad(field, getattr(self, field.name))
      if why is not None:
        raise SettingError(field.name, why)


def documented(cls, owner: str) -> None:
  """Raises ValueError unless every field of `cls` is a `setting(...)`."""
  for field in dataclasses.fields(cls):
    if "doc" not in field.metadata:
      raise ValueError(f"{owner}: declare setting {field.name!r} with "
                       f"setting(...)")


def fields_text(cls) -> str:
  """The fields of a settings dataclass for a docs table: `name`=default,
  accepted values, doc; joined by "; "."""
  return "; ".join(
      f"`{f.name}`={f.default!r} {bounds_text(f)}: {f.metadata['doc']}"
      for f in dataclasses.fields(cls))


def table_cell(text: str) -> str:
  """`text` inside a markdown table cell (its pipes escaped)."""
  return text.replace("|", "\\|")


def import_modules(package: str, *, first: tuple[str, ...],
                   skip: tuple[str, ...]) -> None:
  """Imports every public module of `package` (modules that register
  themselves when imported): `first` in that order, then the others by
  name; `skip` and names starting with "_" are not imported."""
  path = importlib.import_module(package).__path__
  names = sorted(info.name for info in pkgutil.iter_modules(path)
                 if not info.name.startswith("_") and info.name not in skip)
  for name in [*first, *(n for n in names if n not in first)]:
    importlib.import_module(f"{package}.{name}")
