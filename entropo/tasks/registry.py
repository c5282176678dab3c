"""The task registry: names to task classes.

To add a task, write its `Task` subclass (base.py) in a module of its own
and add it to `TASKS`; a multi-turn environment is an `AgentTask`
(environment.py), registered the same way. A task of your own needs no
registration: name it `path/to/file.py:ClassName` (or
`package.module:ClassName`) wherever a task name goes, e.g.
`--config.task.name=my_env.py:MyEnv` (docs/agents.md).
"""

import importlib
import importlib.util
import pathlib
import re
import sys

from entropo.tasks.agent_tasks import CountdownCalc
from entropo.tasks.agent_tasks import Quiz
from entropo.tasks.apps_world import AppsWorld
from entropo.tasks.base import Task
from entropo.tasks.calc_code import CalcCode
from entropo.tasks.countdown import Countdown
from entropo.tasks.countdown import CountdownAll
from entropo.tasks.gsm8k import Gsm8k
from entropo.tasks import settings as settings_lib

TASKS = {
    "countdown": Countdown,
    "countdown_all": CountdownAll,
    "gsm8k": Gsm8k,
    # Multi-turn environments (environment.AgentTask).
    "countdown_calc": CountdownCalc,
    "quiz": Quiz,
    # Multi-turn environments that run the policy's code in a sandbox.
    "calc_code": CalcCode,
    "apps_world": AppsWorld,
}


def _load(source: str):
  """The module of a `.py` file path or a dotted module name."""
  if source.endswith(".py"):
    path = pathlib.Path(source).expanduser().resolve()
    if not path.is_file():
      raise ValueError(f"Task file {source} does not exist.")
    module_name = "entropo_user_task_" + re.sub(r"\W", "_", str(path))
    if module_name not in sys.modules:
      spec = importlib.util.spec_from_file_location(module_name, path)
      module = importlib.util.module_from_spec(spec)
      sys.modules[module_name] = module
      try:
        spec.loader.exec_module(module)
      except BaseException:
        del sys.modules[module_name]
        raise
    return sys.modules[module_name]
  return importlib.import_module(source)


def task_class(name: str) -> type:
  """The class of task `name`: a key of `TASKS`, or `file.py:Class` /
  `module:Class` for a task defined outside entropo."""
  if name in TASKS:
    return TASKS[name]
  if ":" not in name:
    raise ValueError(f"Unknown task {name!r}; choose one of {sorted(TASKS)} "
                     f"or name your own as path/to/file.py:ClassName.")
  source, _, attr = name.rpartition(":")
  try:
    cls = getattr(_load(source), attr)
  except (ImportError, AttributeError, OSError, SyntaxError) as e:
    raise ValueError(f"Cannot load task {name!r}: {type(e).__name__}: "
                     f"{e}") from None
  if not (isinstance(cls, type) and issubclass(cls, Task)):
    raise ValueError(f"{name!r} is not a subclass of entropo.tasks.Task.")
  if not re.fullmatch(r"[a-z][a-z0-9_]*", getattr(cls, "name", "")):
    raise ValueError(f"Task class {name!r} needs a `name` of lower-case "
                     f"letters, digits and _ (it names its dataset); got "
                     f"{getattr(cls, 'name', None)!r}.")
  return cls


def get_task(name: str, **settings) -> Task:
  """The task called `name`, built with `settings` (its dataclass fields).

  Raises `settings.SettingError` (a ValueError) naming a setting that the
  task does not have, has another type, or its own checks refuse.
  """
  cls = task_class(name)
  try:
    return settings_lib.check(cls, settings)
  except TypeError as e:
    raise ValueError(f"Bad settings for task {name!r}: {e}") from None
