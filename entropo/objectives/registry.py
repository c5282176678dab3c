"""Where objectives register: a name, a terms function and typed settings.

An objective is one module of `entropo/objectives/` that declares itself:

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class MySettings(registry.Settings):
      my_eps: float = registry.setting(0.2, "the clip width", low=0)

    @registry.register("mine", settings=MySettings)
    def my_terms(x: TokenInputs, s: MySettings) -> PolicyTerms: ...

Everything else reads the registry: `policy_loss` (`OBJECTIVE_TERMS`,
`settings=`), the `algo` config section (one field per setting, named as
the dataclass field, so setting names are unique over all objectives), its
validation (the declared bounds, named `algo.<field>`), and the table of
objectives (`table()`, printed by `python -m entropo.objectives`). Every
module of the package is imported by `load_all()`, so a new module needs no
edit anywhere else.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

# The typed, documented settings fields, shared with the controllers'
# registry (entropo/_settings.py).
from entropo._settings import SettingError
from entropo._settings import Settings
from entropo._settings import fields_text
from entropo._settings import import_modules
from entropo._settings import setting
from entropo._settings import table_cell

# Modules of the package that hold no objective.
_INFRASTRUCTURE = ("loss", "ratio", "registry")
# The first objectives' modules, imported in this order so that `OBJECTIVES`
# keeps its historical order; any other module follows, by name.
_FIRST = ("reinforce", "ppo", "gspo", "covariance")


@dataclasses.dataclass(frozen=True)
class Objective:
  """A registered objective.

  `terms(x, settings[, key=])` gives the `PolicyTerms`; `settings` is its
  `Settings` subclass; `needs_key` whether it takes a PRNG key;
  `uses_band` whether `policy_loss`'s ratio band (`clip_low`, `clip_high`,
  `band`, `dual_clip`) shapes its update; `summary` its one-line formula.
  """

  name: str
  terms: Callable
  settings: type
  needs_key: bool
  uses_band: bool
  summary: str
  module: str


OBJECTIVE_TERMS: dict[str, Objective] = {}


def register(name: str, *, settings: type = Settings,
             needs_key: bool = False, uses_band: bool = True,
             summary: str = ""):
  """Decorator registering a terms function under `name`.

  Raises ValueError if `name` is taken or a setting's name is already
  another objective's (they share the `algo` config section).
  """
  if not (isinstance(settings, type) and issubclass(settings, Settings)):
    raise TypeError(f"objective {name!r}: settings must subclass "
                    f"registry.Settings; got {settings!r}")

  def decorate(fn):
    if name in OBJECTIVE_TERMS:
      raise ValueError(f"objective {name!r} is registered twice "
                       f"({OBJECTIVE_TERMS[name].module}, {fn.__module__})")
    taken = setting_fields()
    for field in dataclasses.fields(settings):
      owner = taken.get(field.name)
      if owner is not None and owner.settings is not settings:
        raise ValueError(f"objective {name!r}: setting {field.name!r} is "
                         f"already objective {owner.name!r}'s")
      if "doc" not in field.metadata:
        raise ValueError(f"objective {name!r}: declare setting "
                         f"{field.name!r} with registry.setting(...)")
    doc = (fn.__doc__ or "").strip().splitlines()
    OBJECTIVE_TERMS[name] = Objective(
        name=name, terms=fn, settings=settings, needs_key=needs_key,
        uses_band=uses_band, summary=summary or (doc[0] if doc else ""),
        module=fn.__module__)
    return fn

  return decorate


def load_all() -> None:
  """Imports every objective module of the package (they register)."""
  import_modules("entropo.objectives", first=_FIRST, skip=_INFRASTRUCTURE)


def setting_fields() -> dict[str, Objective]:
  """`{setting name: objective}` over every registered objective."""
  return {field.name: objective for objective in OBJECTIVE_TERMS.values()
          for field in dataclasses.fields(objective.settings)}


def config_defaults() -> dict[str, Any]:
  """`{setting name: default}` of every registered objective: the
  objectives' part of the `algo` config section."""
  out = {}
  for objective in OBJECTIVE_TERMS.values():
    for field in dataclasses.fields(objective.settings):
      out.setdefault(field.name, field.default)
  return out


def settings_of(name: str, values: Mapping[str, Any]) -> Settings:
  """Objective `name`'s settings from `values` (missing fields: defaults;
  fields of other objectives are ignored). Raises SettingError."""
  cls = OBJECTIVE_TERMS[name].settings
  own = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in values.items() if k in own})


def table() -> str:
  """The markdown table of registered objectives and their settings."""
  rows = ["| objective | per-token term | settings (default, accepted) |",
          "|---|---|---|"]
  for objective in OBJECTIVE_TERMS.values():
    settings = table_cell(fields_text(objective.settings))
    key = " (needs `key`)" if objective.needs_key else ""
    rows.append(f"| `{objective.name}` | {table_cell(objective.summary)}"
                f"{key} | {settings or '-'} |")
  return "\n".join(rows)
