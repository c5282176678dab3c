"""The task registry: names to task classes.

To add a task, write its `Task` subclass (base.py) in a module of its own
and add it to `TASKS`; a multi-turn environment is an `AgentTask`
(environment.py), registered the same way.
"""

from entropo.tasks.agent_tasks import CountdownCalc
from entropo.tasks.agent_tasks import Quiz
from entropo.tasks.apps_world import AppsWorld
from entropo.tasks.base import Task
from entropo.tasks.calc_code import CalcCode
from entropo.tasks.countdown import Countdown
from entropo.tasks.countdown import CountdownAll
from entropo.tasks.gsm8k import Gsm8k

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


def get_task(name: str, **settings) -> Task:
  """The task called `name`, built with `settings` (its dataclass fields)."""
  if name not in TASKS:
    raise ValueError(f"Unknown task {name!r}; choose one of {sorted(TASKS)}.")
  try:
    return TASKS[name](**settings)
  except TypeError as e:
    raise ValueError(f"Bad settings for task {name!r}: {e}") from None
