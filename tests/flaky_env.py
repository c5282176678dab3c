"""A multi-turn environment that misbehaves on purpose (test_agents_training).

Row by row, by the problem's `mode`: its step raises, hangs past the
rollout's time limit, floods the context, or answers normally.
"""

import dataclasses
import time
from typing import ClassVar

from entropo.tasks import environment as env

MODES = ("raise", "hang", "flood", "plain")


class FlakyEnv(env.Environment):

  def reset(self, problem):
    self.mode = problem["mode"]  # pylint: disable=attribute-defined-outside-init
    return f"{problem['n']}:"

  def step(self, action):
    if self.mode == "raise":
      raise RuntimeError("the environment broke")
    if self.mode == "hang":
      time.sleep(5)
    if self.mode == "flood":
      return env.Turn(observation="x" * 100_000)
    return env.Turn(observation="ok\n")


@dataclasses.dataclass(frozen=True)
class Flaky(env.AgentTask):
  name: ClassVar[str] = "flaky"
  max_turns: int = 2

  def environment(self):
    return FlakyEnv()

  def prompt(self, problem):
    return f"{problem['n']}:"

  def generate_problem(self, rng):
    return {"n": int(rng.integers(10**6)),
            "mode": MODES[int(rng.integers(len(MODES)))]}

  def transcripts(self, problem):
    return [[env.Segment("ok\n", True)]]
