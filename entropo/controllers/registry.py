"""Where controllers register: a config section, a hyperparameter, a build.

A controller is one module of `entropo/controllers/` that declares itself:

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class MySection(registry.Section):
      # Its docstring: what it does (the table's summary).
      on: bool = registry.flag(False, "adapt clip_high my way")
      rate: float = registry.setting(0.1, "the step", low=0, low_open=True)

    @registry.register("my_control", moves="clip_high", section=MySection,
                       enabled=lambda s, algo: s.on)
    def build(s: MySection, start: float) -> MyController:
      if start > 1:  # a relation between fields: name the field
        raise registry.SettingError(registry.START, "must be <= 1")
      return MyController(init=start, rate=s.rate)

Everything else reads the registry: the `algo` config section (one nested
section `algo.<name>` per controller, its fields, defaults and docs those of
the dataclass), its validation (the declared values of every section,
switched on or not, named `algo.<name>.<field>`; then each enabled
controller's build, whose `SettingError` names `algo.<name>.<field>`, or
with `START` the field holding the hyperparameter's starting value),
`Algorithm.from_config` (`{hyperparameter: controller}` of the enabled
ones), and the table of controllers (`table()`, printed by `python -m
entropo.controllers`). A built controller has `init() -> state`,
`update(state, entropy, *, target) -> state` and `value(state)` (see
zeta.py). Every module of the package is imported by `load_all()`, so a
new module needs no edit anywhere else.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from entropo._settings import SettingError
from entropo._settings import Settings as Section
from entropo._settings import choice
from entropo._settings import documented
from entropo._settings import fields_text
from entropo._settings import flag
from entropo._settings import import_modules
from entropo._settings import setting
from entropo._settings import table_cell

__all__ = ["SettingError", "Section", "choice", "flag", "setting",
           "register", "CONTROLLERS", "HYPERPARAMETERS", "START"]

# The hyperparameters a controller may move, each with the `algo` config
# field that holds its value when no controller moves it (where one starts).
HYPERPARAMETERS = {"zeta": "zeta.init", "clip_high": "clip_high",
                   "entropy_coef": "entropy_coef"}
# `SettingError(START, ...)` from a build names the starting value's field.
START = "<start>"
# Modules of the package that hold no controller.
_INFRASTRUCTURE = ("registry", "laws")
# The first controllers' modules, imported in this order (the config's and
# the table's order); any other module follows, by name.
_FIRST = ("zeta", "clip_high", "entropy_coef")


@dataclasses.dataclass(frozen=True)
class Controller:
  """A registered controller.

  `name` is its config section (`algo.<name>`), `moves` the hyperparameter
  of `HYPERPARAMETERS` it moves, `section` its `Section` subclass,
  `enabled(section, algo)` whether the run switches it on (`algo` is the
  whole `algo` config section), `build(section, start)` the controller
  starting at `start`, `switch` how it is switched on (for the docs),
  `moved` `{old flat algo field: field of the section}`, or `{old: (field,
  convert)}` where `convert(old value)` gives the section's fields.
  """

  name: str
  moves: str
  section: type
  enabled: Callable[[Any, Any], bool]
  build: Callable[[Any, float], Any]
  switch: str
  moved: Mapping[str, Any]
  summary: str
  module: str


CONTROLLERS: dict[str, Controller] = {}


def register(name: str, *, moves: str, section: type,
             enabled: Callable[[Any, Any], bool], switch: str = "",
             moved: Mapping[str, Any] | None = None):
  """Decorator registering `build(section, start)` under `name`."""
  if moves not in HYPERPARAMETERS:
    raise ValueError(f"controller {name!r} moves {moves!r}; controllers "
                     f"move one of {sorted(HYPERPARAMETERS)}")
  if not (isinstance(section, type) and issubclass(section, Section)):
    raise TypeError(f"controller {name!r}: section must subclass "
                    f"registry.Section; got {section!r}")
  documented(section, f"controller {name!r}")

  def decorate(build):
    if name in CONTROLLERS:
      raise ValueError(f"controller {name!r} is registered twice "
                       f"({CONTROLLERS[name].module}, {build.__module__})")
    doc = (section.__doc__ or "").strip().splitlines()
    CONTROLLERS[name] = Controller(
        name=name, moves=moves, section=section, enabled=enabled,
        build=build, switch=switch, moved=dict(moved or {}),
        summary=doc[0] if doc else "", module=build.__module__)
    return build

  return decorate


def unregister(name: str) -> None:
  """Removes controller `name` (tests that register their own)."""
  CONTROLLERS.pop(name, None)


def load_all() -> None:
  """Imports every controller module of the package (they register)."""
  import_modules("entropo.controllers", first=_FIRST, skip=_INFRASTRUCTURE)


def config_defaults() -> dict[str, dict[str, Any]]:
  """`{section name: {field: default}}`: the controllers' part of `algo`."""
  return {c.name: {f.name: f.default for f in dataclasses.fields(c.section)}
          for c in CONTROLLERS.values()}


def moved_fields() -> dict[str, str]:
  """`{old flat algo field: its place now}`, e.g. `zeta_max: zeta.max`."""
  return {old: f"{c.name}.{new if isinstance(new, str) else new[0]}"
          for c in CONTROLLERS.values() for old, new in c.moved.items()}


def upgrade(algo: dict) -> dict:
  """An `algo` section (a dict) saved before the controllers' sections,
  its old flat fields moved into them with the same values."""
  algo = dict(algo)
  for c in CONTROLLERS.values():
    for old, new in c.moved.items():
      if old in algo:
        value = algo.pop(old)
        fields = ({new: value} if isinstance(new, str)
                  else new[1](value))
        algo[c.name] = {**algo.get(c.name, {}), **fields}
  return algo


def table() -> str:
  """The markdown table of registered controllers and their sections."""
  rows = ["| section | moves | switched on | fields (default, accepted) |",
          "|---|---|---|---|"]
  for c in CONTROLLERS.values():
    rows.append(f"| `algo.{c.name}` | `{c.moves}` | {table_cell(c.switch)} | "
                f"{table_cell(fields_text(c.section))} |")
  return "\n".join(rows)
