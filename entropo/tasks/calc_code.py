"""calc_code: arithmetic the agent may compute with code before answering.

The tool-integrated reasoning setting at the scale of the tiny model: a
problem is an integer expression too large to do in one's head; the agent
may run Python (`run: ...`, one line, executed in a sandbox) and answers
with `answer: <number>`. An episode, prompt first (each line one segment):

    17*23+4=?                 prompt
    run: 17*23+4              the policy
    395                       the environment (the run's output)
    answer: 395               the policy: reward 1, SOLVED

With `words=True` the prompt is a one-line word problem in GSM8K's spirit
("ann has 17 bags of 23 nuts and 4 more. how many?"). A wrong answer ends
the episode as FAILED with reward 0; answering without running code is
allowed (and is right when the arithmetic is).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from entropo.tasks import code_env
from entropo.tasks import countdown
from entropo.tasks import environment as env_lib
from entropo.tasks import sandbox as sandbox_lib
from entropo.tasks.settings import SettingError

# Expression forms; letters are replaced by the numbers.
FORMS = ("a*b+c", "a*b-c", "(a+b)*c", "a*b*c")
_WORDS = {
    "a*b+c": "ann has {a} bags of {b} nuts and {c} more. how many?",
    "a*b-c": "ann has {a} bags of {b} nuts and eats {c}. how many left?",
    "(a+b)*c": "{a} red and {b} blue boxes hold {c} each. how many?",
    "a*b*c": "{a} rows of {b} boxes of {c} pens. how many pens?",
}


def _value(expr: str) -> int:
  rpn = countdown.parse(expr)
  if isinstance(rpn, str):
    raise ValueError(f"bad expression {expr!r}: {rpn}")
  return int(countdown.evaluate(rpn))


class CalcEnvironment(code_env.CodeEnvironment):
  """One calc_code episode."""

  def __init__(self, task: "CalcCode"):
    limits = sandbox_lib.Limits(wall_seconds=task.wall_seconds)
    super().__init__(code_env.local_sandbox(limits),
                     observation_chars=task.observation_chars, prestart=True)
    self.task = task
    self.problem = None

  def reset(self, problem):
    self.start()
    self.problem = env_lib.problem_dict(problem)
    return self.task.prompt(self.problem)

  def act(self, kind, payload):
    if kind != code_env.ANSWER:
      return super().act(kind, payload)
    right = payload == str(self.problem["value"])
    return env_lib.Turn(
        done=True, reward=1.0 if right else 0.0,
        reason=env_lib.SOLVED if right else env_lib.FAILED,
        info={"status": "answer"})


@dataclasses.dataclass(frozen=True)
class CalcCode(env_lib.AgentTask):
  """Integer arithmetic with a Python tool.

  Attributes:
    min_value, max_value: range of the numbers a, b, c (inclusive).
    forms: expression forms to draw from (a subset of `FORMS`).
    words: state problems as one-line word problems.
    max_turns: actions per episode.
    wall_seconds: the sandbox's wall limit per run.
    observation_chars: the longest observation.
  """

  name: ClassVar[str] = "calc_code"
  # Each episode starts a sandbox: 512 at once ran a third of their first
  # steps past a 10 s limit on 2 cores (docs/sandbox.md).
  max_concurrent_episodes: ClassVar[int] = 64
  stop: ClassVar[tuple[str, ...]] = ("\n",)
  min_value: int = 2
  max_value: int = 99
  forms: tuple[str, ...] = FORMS
  words: bool = False
  max_turns: int = 3
  wall_seconds: float = 2.0
  observation_chars: int = 12

  def __post_init__(self):
    if not 0 <= self.min_value <= self.max_value:
      raise SettingError(
          "min_value" if self.min_value < 0 else "max_value",
          f"Need 0 <= min_value <= max_value; got {self.min_value}, "
          f"{self.max_value}.")
    object.__setattr__(self, "forms", tuple(self.forms))
    if not self.forms or set(self.forms) - set(FORMS):
      raise SettingError("forms", f"forms must be a non-empty subset of "
                         f"{FORMS}; got {self.forms}.")
    if self.max_turns < 1:
      raise SettingError("max_turns", f"max_turns must be >= 1; got "
                         f"{self.max_turns}.")
    code_env.check_limits(self)

  def environment(self) -> CalcEnvironment:
    return CalcEnvironment(self)

  def generate_problem(self, rng: np.random.Generator) -> dict[str, Any]:
    form = self.forms[int(rng.integers(len(self.forms)))]
    numbers = {k: int(rng.integers(self.min_value, self.max_value + 1))
               for k in "abc"}
    expr = form
    for k, v in numbers.items():
      expr = expr.replace(k, str(v))
    return {"form": form, **numbers, "expr": expr, "value": _value(expr)}

  def prompt(self, problem: Mapping[str, Any]) -> str:
    if self.words:
      return _WORDS[problem["form"]].format(**problem) + "\n"
    return f"{problem['expr']}=?\n"

  def transcripts(self, problem: Mapping[str, Any]
                  ) -> list[list[env_lib.Segment]]:
    """Run the expression then answer (canonical), with `print`, or answer
    at once."""
    expr, value = problem["expr"], str(problem["value"])
    seg = env_lib.Segment
    answer = seg(f"answer: {value}\n", True)
    return [[seg(f"run: {expr}\n", True), seg(f"{value}\n", False), answer],
            [seg(f"run: print({expr})\n", True), seg(f"{value}\n", False),
             answer],
            [answer]]
