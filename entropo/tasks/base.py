"""The task interface: problems, prompts, verifiers and rewards.

A task turns a *problem* (a JSON-serialisable dict) into a prompt string and
scores a completion string with a verifier. Every verifier returns a
`Reward` and never raises: whatever a policy writes (empty text, unicode,
huge numbers, division by zero, nesting a thousand deep) is scored, and a
failure carries the reason, so that a researcher can see *why* rewards are
zero.

Records, the unit the data pipeline stores and reads, are flat dicts:

    {"id": int, "prompt": str, "problem": str (JSON), "solution": str}

`solution` is one reference completion (empty when a task has none).
"""

import abc
import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

# Reasons a verifier gives. `OK` is the only one with a positive reward.
OK = "ok"
PARSE_ERROR = "parse_error"  # the completion is not in the answer format
WRONG_VALUE = "wrong_value"  # well-formed, follows the rules, wrong answer
RULE_BROKEN = "rule_broken"  # e.g. a number used twice, a forbidden operator
INVALID_VALUE = "invalid_value"  # e.g. division by zero
REASONS = (OK, PARSE_ERROR, WRONG_VALUE, RULE_BROKEN, INVALID_VALUE)


@dataclasses.dataclass(frozen=True)
class Reward:
  """A verifier's verdict: `score` in [0, 1] and why.

  Attributes:
    score: the reward, 1.0 for a correct completion.
    reason: one of `REASONS`.
    detail: a human-readable explanation of a failure ("" when correct).
  """

  score: float
  reason: str
  detail: str = ""

  def __post_init__(self):
    if not 0.0 <= self.score <= 1.0:
      raise ValueError(f"Reward.score must be in [0, 1]; got {self.score}.")
    if self.reason not in REASONS:
      raise ValueError(f"Unknown reason {self.reason!r}; use one of "
                       f"{REASONS}.")

  @property
  def correct(self) -> bool:
    return self.reason == OK


def fail(reason: str, detail: str) -> Reward:
  return Reward(0.0, reason, detail)


CORRECT = Reward(1.0, OK)


class Task(abc.ABC):
  """A verifiable-reward task.

  Subclasses implement `prompt` and `_verify`; tasks generated in code also
  implement `generate_problem` and `solutions` (for the supervised warm
  start). `verify` wraps `_verify` so that even a verifier bug yields a
  zero reward with the exception named, never a crashed training run.
  """

  name: str = "task"
  # True for tasks that read their problems from local files (they take a
  # `path` and have `file_records`); False for tasks generated in code.
  file_backed: bool = False

  @abc.abstractmethod
  def prompt(self, problem: Mapping[str, Any]) -> str:
    """The prompt text of a problem."""

  @abc.abstractmethod
  def _verify(self, problem: Mapping[str, Any], completion: str) -> Reward:
    """Scores `completion`; may assume `completion` is a str."""

  def verify(self, problem: Mapping[str, Any] | str, completion: Any
             ) -> Reward:
    """Scores `completion` for `problem` (a dict or its JSON). Never raises."""
    if not isinstance(completion, str):
      return fail(PARSE_ERROR,
                  f"completion is a {type(completion).__name__}, not a str")
    try:
      if isinstance(problem, str):
        problem = json.loads(problem)
      return self._verify(problem, completion)
    except Exception as e:  # pylint: disable=broad-except
      # A verifier bug must not kill a run; the reason makes it visible.
      return fail(INVALID_VALUE, f"verifier error {type(e).__name__}: {e}")

  def generate_problem(self, rng: np.random.Generator) -> dict[str, Any]:
    """One random problem (tasks generated in code)."""
    raise NotImplementedError(f"Task {self.name!r} reads its problems from "
                              f"files; it does not generate them.")

  def solutions(self, problem: Mapping[str, Any]) -> list[str]:
    """Correct completions of `problem`, canonical (preferred) first."""
    raise NotImplementedError(
        f"Task {self.name!r} has no solution generator for warm starts.")

  def longest_prompt(self) -> str | None:
    """The longest prompt the task can generate, if known (None: unknown);
    the trainer checks that it fits in `data.max_prompt_len` before any
    work."""
    return None

  def longest_solution(self) -> int | None:
    """An upper bound on a solution's length in characters, if known (the
    warm start trains on whole solutions, so they must fit)."""
    return None

  @property
  def config(self) -> dict[str, Any]:
    """The task's settings (recorded in dataset descriptions)."""
    return {}

  def records(self, seed: int, num: int, *, start: int = 0
              ) -> Iterator[dict[str, Any]]:
    """`num` generated records; record i depends only on (seed, start + i).

    Each problem draws from its own generator seeded by `(seed, index)`, so
    splits are deterministic and any slice can be regenerated alone.
    """
    for index in range(start, start + num):
      rng = np.random.default_rng([seed, index])
      problem = self.generate_problem(rng)
      solutions = self.solutions(problem)
      yield {"id": index, "prompt": self.prompt(problem),
             "problem": json.dumps(problem, sort_keys=True),
             "solution": solutions[0] if solutions else ""}

  def warm_start_completion(self, problem: Mapping[str, Any],
                            rng: np.random.Generator, spread: float) -> str:
    """A correct completion for supervised warm starts.

    With probability `1 - spread` the canonical solution, otherwise one
    drawn uniformly from all of `solutions(problem)`. `spread=0` teaches one
    form per problem (a near-deterministic policy); `spread=1` spreads the
    probability over every valid form (a high-entropy policy); values in
    between calibrate the starting entropy of RL.
    """
    if not 0.0 <= spread <= 1.0:
      raise ValueError(f"spread must be in [0, 1]; got {spread}.")
    solutions = self.warm_start_options(problem)
    if not solutions:
      raise ValueError(f"Problem {problem} of task {self.name!r} has no "
                       f"solution.")
    if rng.random() >= spread:
      return solutions[0]
    return solutions[int(rng.integers(len(solutions)))]

  def warm_start_options(self, problem: Mapping[str, Any]) -> list:
    """What `warm_start_completion` draws from, canonical first: the
    solutions (an agent task's transcripts)."""
    return self.solutions(problem)


def warm_start_examples(task: Task, *, seed: int, num_problems: int,
                        samples_per_problem: int = 4, spread: float = 0.5,
                        start: int = 0) -> list[tuple[str, str]]:
  """(prompt, completion) pairs of correct solutions for supervised training.

  Problems are `task.records(seed, num_problems, start=start)`; each gets
  `samples_per_problem` completions from `Task.warm_start_completion` with
  the given `spread` (see there). Deterministic in `seed`. Use a seed (or
  `start`) that the RL and evaluation splits do not use.
  """
  rng = np.random.default_rng([seed, start, 1])
  pairs = []
  for record in task.records(seed, num_problems, start=start):
    problem = json.loads(record["problem"])
    for _ in range(samples_per_problem):
      pairs.append((record["prompt"],
                    task.warm_start_completion(problem, rng, spread)))
  return pairs
