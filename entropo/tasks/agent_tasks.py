"""Built-in multi-turn environments small enough for the tiny model on a CPU.

Both use a calculator tool: an action `calc:<expression>` (integers,
`+ - * /`, parentheses; exact arithmetic, countdown's parser) is answered
with `=<value>` (`=err` for a malformed expression or a division by zero).
Every action ends with a newline (the stop string).

`countdown_calc` (sparse reward): countdown (countdown.py) played as an
agent. The agent may try expressions with the calculator, and ends the
episode with `ans:<expression>`, scored by countdown's verifier:

    3 7 25>46:            <- the prompt (first observation)
    calc:7*3+25           <- action
    =46                   <- observation
    ans:7*3+25            <- action; the episode ends, reward 1 (solved)

`quiz` (dense reward, a fraction of checks): `num_questions` arithmetic
questions, one at a time; an action is an answer (an integer) or a
calculator call. The episode ends after the last answer; the reward is
the fraction answered correctly (checked at the end, as AppWorld's unit
tests are), and it is solved when all are right:

    12+7=                 <- the first question
    19                    <- answer
    8*3=                  <- the next question
    calc:8*3
    =24
    24                    <- the last answer: reward 2/2
"""

import dataclasses
import itertools
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, ClassVar

from entropo.tasks import countdown as countdown_lib
from entropo.tasks import environment as env_lib
from entropo.tasks.environment import Segment
from entropo.tasks.settings import SettingError

MAX_ACTION_CHARS = 200  # longer actions are malformed


def _value_text(value: Fraction | None) -> str:
  if value is None:
    return "err"
  if value.denominator == 1:
    return str(value.numerator)
  return f"{value.numerator}/{value.denominator}"


def calculate(expression: str) -> str:
  """The calculator's answer to an expression (`err` when malformed)."""
  if len(expression) > MAX_ACTION_CHARS:
    return "err"
  rpn = countdown_lib.parse(expression.strip())
  if isinstance(rpn, str):
    return "err"
  return _value_text(countdown_lib.evaluate(rpn))


def _command(action: str) -> tuple[str, str]:
  """`(verb, argument)` of an action line: `calc`, `ans` or `` (other)."""
  text = action.strip()
  for verb in ("calc", "ans"):
    if text.startswith(verb + ":"):
      return verb, text[len(verb) + 1:]
  return "", text


class CountdownCalcEnv(env_lib.Environment):
  """One countdown episode with a calculator."""

  def __init__(self, task: "CountdownCalc"):
    self.task = task
    self.problem: Mapping[str, Any] = {}

  def reset(self, problem):
    self.problem = env_lib.problem_dict(problem)
    return self.task.prompt(self.problem)

  def step(self, action):
    verb, arg = _command(action)
    if verb == "calc":
      return env_lib.Turn(observation=f"={calculate(arg)}\n")
    if verb == "ans":
      verdict = self.task.countdown.verify(self.problem, arg)
      return env_lib.Turn(done=True, reward=verdict.score,
                          reason=env_lib.SOLVED if verdict.correct
                          else env_lib.FAILED,
                          info={"verdict": verdict.reason})
    return env_lib.Turn(observation="?\n")


@dataclasses.dataclass(frozen=True)
class CountdownCalc(env_lib.AgentTask):
  """Countdown with a calculator tool (see the module docstring).

  Attributes: those of `Countdown` (numbers, range, target, operators),
  and `max_turns`, the actions per episode.
  """

  name: ClassVar[str] = "countdown_calc"
  num_count: int = 3
  min_value: int = 1
  max_value: int = 12
  max_target: int = 50
  ops: str = "+-*"
  min_used: int = 2
  max_turns: int = 4

  def __post_init__(self):
    self.countdown  # pylint: disable=pointless-statement  (validates)
    if not 1 <= self.max_turns <= 64:
      raise SettingError("max_turns", f"max_turns must be in [1, 64]; got "
                         f"{self.max_turns}.")

  @property
  def countdown(self) -> countdown_lib.Countdown:
    return countdown_lib.Countdown(
        num_count=self.num_count, min_value=self.min_value,
        max_value=self.max_value, max_target=self.max_target, ops=self.ops,
        min_used=self.min_used)

  def environment(self):
    return CountdownCalcEnv(self)

  def prompt(self, problem):
    return self.countdown.prompt(problem) + "\n"

  def generate_problem(self, rng):
    return self.countdown.generate_problem(rng)

  def transcripts(self, problem):
    """Per solution (at most 4): check it then answer; answer at once;
    try a wrong sum of two numbers first, then the solution."""
    target = int(problem["target"])
    numbers = [int(x) for x in problem["numbers"]]
    wrong = next((f"{a}+{b}" for a, b in itertools.combinations(numbers, 2)
                  if a + b != target), None)
    out = []
    for s in self.countdown.solutions(problem)[:4]:
      check = [Segment(f"calc:{s}\n", True), Segment(f"={target}\n", False)]
      answer = [Segment(f"ans:{s}\n", True)]
      out += [check + answer, answer]
      if wrong is not None and self.max_turns >= 3:
        out.append([Segment(f"calc:{wrong}\n", True),
                    Segment(f"={calculate(wrong)}\n", False)] + check + answer)
    return out


class QuizEnv(env_lib.Environment):
  """One quiz episode: questions in turn, checked at the end."""

  def __init__(self, task: "Quiz"):
    self.task = task
    self.questions: list[str] = []
    self.answers: list[str] = []

  def reset(self, problem):
    self.questions = list(env_lib.problem_dict(problem)["questions"])
    self.answers = []
    return self.task.prompt({"questions": self.questions})

  def step(self, action):
    verb, arg = _command(action)
    if verb == "calc":
      return env_lib.Turn(observation=f"={calculate(arg)}\n")
    self.answers.append(arg.strip()[:MAX_ACTION_CHARS])
    if len(self.answers) < len(self.questions):
      return env_lib.Turn(observation=f"{self.questions[len(self.answers)]}=")
    solved = self.correct() == len(self.questions)
    return env_lib.Turn(done=True, reason=env_lib.SOLVED if solved
                        else env_lib.FAILED)

  def correct(self) -> int:
    return sum(a == calculate(q) for q, a in zip(self.questions,
                                                 self.answers))

  def final_reward(self, reason):
    del reason
    return self.correct() / max(len(self.questions), 1)


@dataclasses.dataclass(frozen=True)
class Quiz(env_lib.AgentTask):
  """Arithmetic questions in turn, a dense reward (see the module docstring).

  Attributes:
    num_questions: questions per episode.
    max_value: operands are integers in [1, max_value].
    ops: the operators questions use, a subset of "+-*".
    max_turns: actions per episode (answers and calculator calls).
  """

  name: ClassVar[str] = "quiz"
  num_questions: int = 3
  max_value: int = 20
  ops: str = "+-*"
  max_turns: int = 6

  def __post_init__(self):
    if not 1 <= self.num_questions <= 16:
      raise SettingError("num_questions", f"num_questions must be in "
                         f"[1, 16]; got {self.num_questions}.")
    if not 1 <= self.max_value < 10**6:
      raise SettingError("max_value", f"max_value must be in [1, 10**6); "
                         f"got {self.max_value}.")
    if not self.ops or set(self.ops) - set("+-*"):
      raise SettingError("ops", f"ops must be characters of '+-*'; got "
                         f"{self.ops!r}.")
    if self.max_turns < self.num_questions:
      raise SettingError("max_turns", f"max_turns={self.max_turns} leaves "
                         f"no turn for some of the {self.num_questions} "
                         f"questions.")

  def environment(self):
    return QuizEnv(self)

  def prompt(self, problem):
    return f"{problem['questions'][0]}="

  def generate_problem(self, rng):
    questions = []
    for _ in range(self.num_questions):
      a, b = (int(x) for x in rng.integers(1, self.max_value + 1, size=2))
      questions.append(f"{a}{self.ops[int(rng.integers(len(self.ops)))]}{b}")
    return {"questions": questions}

  def transcripts(self, problem):
    """Answer every question at once; or use the calculator on the first,
    the last, or every question (as the turn budget allows)."""
    questions = problem["questions"]
    out = []
    for calc_on in ((), (0,), (len(questions) - 1,),
                    tuple(range(len(questions)))):
      if len(questions) + len(set(calc_on)) > self.max_turns:
        continue
      segments = []
      for i, q in enumerate(questions):
        value = calculate(q)
        if i in calc_on:
          segments += [Segment(f"calc:{q}\n", True),
                       Segment(f"={value}\n", False)]
        segments.append(Segment(f"{value}\n", True))
        if i + 1 < len(questions):
          segments.append(Segment(f"{questions[i + 1]}=", False))
      if segments not in out:
        out.append(segments)
    return out

