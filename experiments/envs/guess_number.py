"""Guess a number: a multi-turn environment in one file (docs/agents.md).

The policy guesses a secret number in a window of `width` numbers; the
environment answers `up` or `down` until the guess is right. Train it with

    python -m experiments.main \\
        --config=experiments/configs/agents.py:experiments/envs/guess_number.py:GuessNumber \\
        --workdir=/tmp/entropo/guess
"""

import dataclasses
from typing import ClassVar

from entropo.tasks import environment as env


class GuessEnv(env.Environment):
  """One episode: a secret number, answered `up` / `down`."""

  def __init__(self, task):
    self.task, self.secret = task, 0

  def reset(self, problem):
    self.secret = problem["secret"]
    return self.task.prompt(problem)

  def step(self, action):
    text = action.strip()
    if not text.isdigit() or len(text) > 6:  # never raise on model output
      return env.Turn(observation="?\n")
    if int(text) == self.secret:
      return env.Turn(done=True, reward=1.0, reason=env.SOLVED)
    return env.Turn(observation="up\n" if int(text) < self.secret else "down\n")


@dataclasses.dataclass(frozen=True)
class GuessNumber(env.AgentTask):
  """Guess a number in [low, low + width) in at most `max_turns` guesses."""

  name: ClassVar[str] = "guess_number"  # names its dataset
  width: int = 8
  max_low: int = 50
  max_turns: int = 4

  def environment(self):
    return GuessEnv(self)

  def prompt(self, problem):
    return f"{problem['low']}-{problem['low'] + self.width - 1}?\n"

  def generate_problem(self, rng):
    low = int(rng.integers(1, self.max_low + 1))
    return {"low": low, "secret": low + int(rng.integers(self.width))}

  def transcripts(self, problem):
    """Binary search: the scripted episode the warm start imitates."""
    low, high, segments = problem["low"], problem["low"] + self.width - 1, []
    while True:
      guess = (low + high) // 2
      segments.append(env.Segment(f"{guess}\n", by_model=True))
      if guess == problem["secret"]:
        return [segments]
      if guess < problem["secret"]:
        low = guess + 1
        segments.append(env.Segment("up\n", by_model=False))
      else:
        high = guess - 1
        segments.append(env.Segment("down\n", by_model=False))
