"""Config errors that name the field: `Invalid config: <field>: <why>`."""


def fail(field: str, message: str):
  """Raises the ValueError of a bad config field."""
  raise ValueError(f"Invalid config: {field}: {message}")


def check_choice(field: str, value, options) -> None:
  if value not in options:
    fail(field, f"{value!r} is not one of {list(options)}")


def check_number(field: str, value, *, allow_zero: bool = False,
                 integer: bool = False) -> None:
  """`value` is a number (an int with `integer`) > 0 (>= 0 with
  `allow_zero`); bools are not numbers here."""
  ok = isinstance(value, int) if integer else isinstance(value, (int, float))
  if not ok or isinstance(value, bool) or value < 0 or (
      value == 0 and not allow_zero):
    kind = "int" if integer else "number"
    sign = ">= 0" if allow_zero else "> 0"
    fail(field, f"must be a {kind} {sign}; got {value!r}")
