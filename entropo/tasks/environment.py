"""Multi-turn environments: the agent setting, on text.

An *environment* is one episode's world. The policy acts (writes text or
code), the environment answers with an observation, and rewards arrive per
turn or at the end:

    env = task.environment()                 # a fresh episode
    first = env.reset(problem)               # the first observation (the prompt)
    turn = env.step(action_text)             # Turn(observation, done, reward, reason)
    ...                                      # until turn.done
    extra = env.final_reward(reason)         # e.g. the fraction of checks passed
    env.close()

Rules every environment follows (the rollout relies on them):

* `step` never raises on model output: whatever the policy writes is an
  action, and a malformed one gets an observation that says so (or ends the
  episode with a reason). An exception that escapes anyway, or a step that
  runs past the rollout's time limit, ends the episode with `ENV_ERROR` or
  `ENV_TIMEOUT`; the run goes on (entropo.training.agent_rollouts).
* An episode always ends with a named reason (`END_REASONS`): the
  environment names `SOLVED`, `FAILED` or `GAVE_UP` when it ends an episode;
  the rollout names the others (the turn budget, the context, a too-long
  observation, an error or a time-out).
* The episode's return is the sum of the per-turn rewards plus
  `final_reward(reason)`, which the rollout calls once, whatever the
  reason, so that a truncated episode is still scored (AppWorld's
  `world.evaluate()` runs its unit tests whenever the episode stops).

A single-turn `Task` is the one-turn case (`TaskEnvironment`): the prompt
is the first observation, the completion the only action, the verifier's
score the reward.

An *agent task* (`AgentTask`) is a `Task` whose problems are played as
episodes: it generates records like any task (so datasets, splits and the
data pipeline are shared), builds one `Environment` per episode, and gives
scripted transcripts (`transcripts`) for the supervised warm start.
"""

import abc
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from entropo.tasks import base

# Why an episode ended. The environment reports the first three; the rollout
# the others.
SOLVED = "solved"  # the task is done and correct
FAILED = "failed"  # the episode is over and the task is not solved
GAVE_UP = "gave_up"  # the policy stopped (EOS) without finishing
TURN_BUDGET = "turn_budget"  # max_turns actions without an end (truncated)
CONTEXT_FULL = "context_full"  # no room for the next observation (truncated)
OBSERVATION_TOO_LONG = "observation_too_long"  # over the observation limit
ENV_ERROR = "env_error"  # reset, step or final_reward raised
ENV_TIMEOUT = "env_timeout"  # a step ran past the time limit
END_REASONS = (SOLVED, FAILED, GAVE_UP, TURN_BUDGET, CONTEXT_FULL,
               OBSERVATION_TOO_LONG, ENV_ERROR, ENV_TIMEOUT)
# Ends the environment may report from `step`.
ENV_REASONS = (SOLVED, FAILED, GAVE_UP)
# Ends that cut an episode short: marked truncated in the rollout.
TRUNCATED = (TURN_BUDGET, CONTEXT_FULL, OBSERVATION_TOO_LONG)


@dataclasses.dataclass(frozen=True)
class Turn:
  """The environment's answer to one action.

  Attributes:
    observation: text appended to the context after the action (may be "";
      ignored when `done`).
    done: whether the episode ends with this action.
    reward: this turn's reward (0 for sparse environments until the end).
    reason: when `done`, one of `ENV_REASONS`.
    info: anything else, for logs (JSON-serialisable).
  """

  observation: str = ""
  done: bool = False
  reward: float = 0.0
  reason: str = ""
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.done and self.reason not in ENV_REASONS:
      raise ValueError(f"A Turn that ends the episode names its reason, one "
                       f"of {ENV_REASONS}; got {self.reason!r}.")


class Environment(abc.ABC):
  """One episode of a multi-turn environment (see the module docstring)."""

  @abc.abstractmethod
  def reset(self, problem: Mapping[str, Any]) -> str:
    """Starts the episode of `problem`; returns the first observation.

    Deterministic in `problem`: it must equal the task's `prompt(problem)`,
    which the data pipeline has already tokenized.
    """

  @abc.abstractmethod
  def step(self, action: str) -> Turn:
    """Answers one action (the policy's text, stop string included)."""

  def final_reward(self, reason: str) -> float:
    """A reward added once when the episode ends (for any `reason`)."""
    del reason
    return 0.0

  def close(self) -> None:
    """Releases what the episode holds (processes, files)."""


class TaskEnvironment(Environment):
  """A single-turn `Task` as a one-turn environment."""

  def __init__(self, task: base.Task):
    self.task = task
    self.problem = None

  def reset(self, problem):
    self.problem = problem
    return self.task.prompt(problem)

  def step(self, action):
    reward = self.task.verify(self.problem, action)
    return Turn(done=True, reward=reward.score,
                reason=SOLVED if reward.correct else FAILED,
                info={"verdict": reward.reason})


@dataclasses.dataclass(frozen=True)
class Segment:
  """A piece of a transcript: the policy's text or the environment's."""

  text: str
  by_model: bool


class AgentTask(base.Task):
  """A task played over turns: records like a `Task`, one `Environment`
  per episode.

  Subclasses implement `environment()`, `generate_problem`, `prompt` and
  `transcripts` (scripted episodes for the warm start). `stop` strings end
  an action (the rollout cuts the action after the first one it finds);
  EOS always ends the episode (`GAVE_UP` unless the environment says
  otherwise). `max_turns` bounds the actions per episode;
  `max_concurrent_episodes` the episodes an evaluation plays at once.
  """

  stop: Sequence[str] = ("\n",)
  max_turns: int = 4
  # Episodes an evaluation plays at once, at most (None: as the single-turn
  # sampler, 512 rows). Environments that start processes set fewer.
  max_concurrent_episodes: int | None = None

  @abc.abstractmethod
  def environment(self) -> Environment:
    """A fresh episode."""

  @abc.abstractmethod
  def transcripts(self, problem: Mapping[str, Any]) -> list[list[Segment]]:
    """Correct episodes of `problem` after its prompt, canonical first.

    Each is a list of segments alternating the policy's actions (each
    ending in a stop string, the last one may instead end the episode) and
    the environment's observations, exactly as a rollout would produce them.
    """

  @property
  def config(self) -> dict[str, Any]:
    """The task's settings (its dataclass fields): they name its dataset."""
    fields = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
    return {"task": self.name, **fields}

  def _verify(self, problem, completion):
    """Replays a whole transcript's actions (`completion` = the policy's
    text of all turns joined, as `transcript_actions` splits it)."""
    env = self.environment()
    try:
      env.reset(problem)
      total, reason = 0.0, TURN_BUDGET
      for action in self.split_actions(completion)[:self.max_turns]:
        turn = env.step(action)
        total += turn.reward
        if turn.done:
          reason = turn.reason
          break
      total += env.final_reward(reason)
    finally:
      env.close()
    score = min(max(total, 0.0), 1.0)
    if reason == SOLVED:
      return base.Reward(score, base.OK)
    return base.fail(base.WRONG_VALUE, f"episode ended: {reason}")

  def split_actions(self, text: str) -> list[str]:
    """`text` cut after each stop string: the actions of a transcript."""
    actions, start = [], 0
    while start < len(text):
      ends = [text.find(s, start) for s in self.stop]
      ends = [e + len(s) for e, s in zip(ends, self.stop) if e >= 0]
      end = min(ends) if ends else len(text)
      actions.append(text[start:end])
      start = end
    return actions

  def solutions(self, problem):
    """The policy's text of each transcript (its actions joined)."""
    return ["".join(s.text for s in t if s.by_model)
            for t in self.transcripts(problem)]

  def warm_start_options(self, problem):
    """The transcripts: `warm_start_completion` draws one for the warm start
    (`warm_start_examples` pairs it with the prompt)."""
    return self.transcripts(problem)


def problem_dict(problem: Mapping[str, Any] | str) -> dict[str, Any]:
  """A record's `problem` (JSON text) as a dict."""
  return json.loads(problem) if isinstance(problem, str) else dict(problem)
