"""Config errors that name the field: `Invalid config: <field>: <why>`.

Every check here looks at a value alone (no computation), so a config is
refused before any work; the message names the field and the accepted
values.
"""

import math

from entropo import _checks


class ConfigError(ValueError):
  """A bad config field; `str(e)` is the one-line message."""


def fail(field: str, message: str):
  """Raises the ConfigError (a ValueError) of a bad config field."""
  raise ConfigError(f"Invalid config: {field}: {message}")


# A field's value among options: `entropo._checks.check_choice(field, value,
# options, fail=fail)` (one implementation for the core and the config).
did_you_mean = _checks.did_you_mean


def check_bool(field: str, value) -> None:
  """`value` is True or False (not 0/1 or a string)."""
  if not isinstance(value, bool):
    fail(field, f"must be True or False; got {value!r}")


def check_number(field: str, value, *, allow_zero: bool = False,
                 integer: bool = False) -> None:
  """`value` is a finite number (an int with `integer`) > 0 (>= 0 with
  `allow_zero`); bools are not numbers here."""
  ok = isinstance(value, int) if integer else isinstance(value, (int, float))
  if not ok or isinstance(value, bool) or not 0 <= value < math.inf or (
      value == 0 and not allow_zero):
    kind = "an int" if integer else "a number"
    sign = ">= 0" if allow_zero else "> 0"
    fail(field, f"must be {kind} {sign}; got {value!r}")


def check_range(field: str, value, low, high, *, low_open: bool = False,
                high_open: bool = False, integer: bool = False) -> None:
  """`value` is a number (an int with `integer`) in the interval from `low`
  to `high` (None: unbounded), open at an end with `low_open`/`high_open`.
  NaN and infinities are never in range."""
  kind = "an int" if integer else "a number"
  ok = isinstance(value, int) if integer else isinstance(value, (int, float))
  ok = ok and not isinstance(value, bool)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if ok and not math.isfinite(value):  # NaN and inf are never in range
    ok = False
  if not ok:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    fail(field, f"must be {kind} in {left}{lo}, {hi}{right}; got {value!r}")
