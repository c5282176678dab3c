"""A task's settings: the fields of its dataclass, checked before any work.

A task class is its own schema: each dataclass field (or, for a task that is
not a dataclass, each keyword of `__init__`) is a setting, its annotation
the accepted type and its `__post_init__` the accepted values. `check`
refuses an unknown name (with the closest one), a value of the wrong type
and a value the task's own checks refuse, raising `SettingError` that names
the setting; it builds the task, which is cheap (no problem is generated).
"""

import dataclasses
import inspect
import math
import os
import types
import typing
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

from entropo import _checks


class SettingError(ValueError):
  """A bad task setting; `field` names it (None: the settings as a whole),
  `message` says why; `str(e)` starts with the field unless `message`
  names it."""

  def __init__(self, field: str | None, message: str):
    named = field is None or field in message
    super().__init__(message if named else f"{field}: {message}")
    self.field = field
    self.message = message


def fields(cls: type) -> dict[str, Any]:
  """The settings of task class `cls`: name -> annotation (`Any` when it
  has none). None when `cls` takes any keyword (`**kwargs`)."""
  try:
    hints = typing.get_type_hints(cls)
  except Exception:  # pylint: disable=broad-except
    hints = {}  # an annotation that does not resolve is not checked
  if dataclasses.is_dataclass(cls):
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)
            if f.init}
  params = list(inspect.signature(cls.__init__).parameters.values())[1:]
  if any(p.kind == p.VAR_KEYWORD for p in params):
    return None
  try:
    init_hints = typing.get_type_hints(cls.__init__)
  except Exception:  # pylint: disable=broad-except
    init_hints = {}
  return {p.name: init_hints.get(p.name, Any) for p in params
          if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def defaults(cls: type) -> dict[str, Any]:
  """Each setting of dataclass task `cls` with a default, at its default."""
  out = {}
  for f in dataclasses.fields(cls):
    if f.init and f.default is not dataclasses.MISSING:
      out[f.name] = f.default
    elif f.init and f.default_factory is not dataclasses.MISSING:
      out[f.name] = f.default_factory()
  return out


def _describe(annotation) -> str:
  if annotation is type(None):
    return "None"
  if isinstance(annotation, type):
    return {bool: "True or False", int: "an int", float: "a number",
            str: "a string"}.get(annotation, annotation.__name__)
  return str(annotation).replace("typing.", "")


def type_error(value, annotation) -> str | None:
  """Why `value` is not of type `annotation`, or None (also for an
  annotation this does not understand: those are the task's to check)."""
  origin = typing.get_origin(annotation)
  args = typing.get_args(annotation)
  if annotation is Any or isinstance(annotation, (str, typing.TypeVar)):
    return None
  if origin in (typing.Union, types.UnionType):
    errors = [type_error(value, a) for a in args]
    if all(errors):
      return (f"must be {' or '.join(_describe(a) for a in args)}; got "
              f"{value!r}")
    return None
  if origin is typing.Literal:
    return None if value in args else (f"must be one of {list(args)}; got "
                                       f"{value!r}")
  if origin in (tuple, list, Sequence):
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
      return f"must be a tuple; got {value!r}"
    item = args[0] if args and (len(args) == 1 or args[-1] is Ellipsis) else Any
    for element in value:
      if type_error(element, item) is not None:
        return (f"must be a tuple, each item {_describe(item)}; got "
                f"{value!r}")
    return None
  if annotation is bool:
    ok = isinstance(value, bool)
  elif annotation is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif annotation is float:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))
    if not ok and isinstance(value, (int, float)):
      return f"must be a finite number; got {value!r}"
  elif annotation is os.PathLike:
    ok = isinstance(value, os.PathLike)
  elif isinstance(annotation, type):
    ok = isinstance(value, annotation)
  else:
    return None
  return None if ok else f"must be {_describe(annotation)}; got {value!r}"


def check(cls: type, settings: Mapping[str, Any], *, task_name: str = "",
          extra: Mapping[str, Any] | None = None):
  """The task `cls(**settings)`, after checking every setting.

  Args:
    cls: a task class (a dataclass, or a class whose `__init__` takes the
      settings as keywords).
    settings: setting name -> value.
    task_name: the task's name in messages (default: `cls.name`).
    extra: keywords the caller sets, not the settings (a file-backed
      task's `path`): passed to `cls`, and refused as settings.

  Raises:
    SettingError: naming the setting (`.field`): an unknown name (with the
      closest known one), a value of the wrong type, or one the task's own
      checks refuse (`field` None when they do not say which).
  """
  name = task_name or getattr(cls, "name", cls.__name__)
  known = fields(cls)
  if known is not None:
    known = {k: v for k, v in known.items() if k not in (extra or {})}
    for key in settings:
      if key not in known:
        hint = _checks.did_you_mean(key, known)
        raise SettingError(key, f"no such setting of the {name} task{hint}; "
                           f"its settings are {sorted(known)}")
    for key, value in settings.items():
      why = type_error(value, known[key])
      if why is not None:
        raise SettingError(key, why)
  return cls(**settings, **(extra or {}))
