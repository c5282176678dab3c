"""Environments whose actions run code, and stepping many at once.

`CodeEnvironment` is an `Environment` whose actions may run Python in a
`Sandbox` (one per episode, started at the first run, closed with the
episode). Actions are single lines, friendly to a character-level model
(the tasks' stop string is "\\n"):

    run: 17*23+4         runs the code; the observation is its output
    answer: 395          the task's answer (the subclass decides)
    done                 the agent says it has finished (the subclass decides)

A fenced block (```python ... ```) is also run, for models that write
them. A run's observation is its stdout, stderr and exception's last line
(`ok` when there is none; `state lost: ...` on the first run after a
restart), cut to `observation_chars`, ending in "\\n". A
run whose status is in `end_on` (by default a time-out or a dead worker,
after which the episode's state is gone) ends the episode as `FAILED`;
`Turn.info["status"]` names what happened. Every step returns within the
sandbox's wall limit plus the time to start or kill a worker.

`EnvPool` steps many episodes concurrently on a thread pool sized to the
machine; a hung episode holds back only itself, up to its wall limit.
"""

import concurrent.futures
import dataclasses
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from entropo.tasks import environment
from entropo.tasks import local_sandbox as local_sandbox_lib
from entropo.tasks import sandbox as sandbox_lib
from entropo.tasks.settings import SettingError

RUN, ANSWER, DONE, OTHER = "run", "answer", "done", "other"
_FENCE = re.compile(r"```(?:python|py)?\n(.*?)```", re.DOTALL)
_LAST_LINE_CHARS = 200


def parse_action(action: str) -> tuple[str, str]:
  """(kind, payload) of an action: `run`, `answer`, `done` or `other`."""
  text = action.strip()
  fence = _FENCE.search(action)
  if text.startswith("run:"):
    return RUN, text[len("run:"):].strip()
  if fence:
    return RUN, fence.group(1)
  if text.startswith("answer:"):
    return ANSWER, text[len("answer:"):].strip()
  if text == "done":
    return DONE, ""
  return OTHER, text


def observation(execution: sandbox_lib.Execution, chars: int) -> str:
  """A run's output as the agent sees it: short, one trailing newline."""
  parts = [execution.stdout.rstrip("\n"), execution.stderr.rstrip("\n")]
  if execution.exception:
    parts.append(execution.exception.strip().splitlines()[-1]
                 [:_LAST_LINE_CHARS])
  text = "\n".join(p for p in parts if p)
  if execution.status == sandbox_lib.TIMEOUT:
    text = "timeout"
  elif execution.status == sandbox_lib.KILLED:
    text = "killed"
  text = text or "ok"
  if execution.restarted:  # only when end_on lets an episode go on
    text = "state lost: " + text
  return cut(text, chars)


def cut(text: str, chars: int) -> str:
  """`text` in at most `chars` characters (`...` marks a cut), then "\n"."""
  if len(text) > chars:
    text = text[:max(chars - 3, 0)] + "..."
  return text + "\n"


def check_limits(task) -> None:
  """A sandboxed task's `wall_seconds` (> 0) and `observation_chars` (room
  for one character and the `...` of a cut), refused naming the setting
  before any sandbox starts."""
  if not task.wall_seconds > 0:  # NaN too
    raise SettingError("wall_seconds", f"wall_seconds must be > 0; got "
                       f"{task.wall_seconds}.")
  if task.observation_chars < 4:
    raise SettingError("observation_chars", f"observation_chars must be "
                       f">= 4 (a cut observation ends in '...'); got "
                       f"{task.observation_chars}.")


def local_sandbox(limits: sandbox_lib.Limits) -> Callable[[],
                                                          sandbox_lib.Sandbox]:
  """A factory of `LocalSandbox` with `limits` (the default sandbox)."""
  return lambda: local_sandbox_lib.LocalSandbox(limits)


class CodeEnvironment(environment.Environment):
  """An episode whose `run:` actions execute in a sandbox.

  Subclasses override `reset` (calling `start()` first) and `act(kind,
  payload)` for the actions other than `run:`. As it is, it is a bare
  Python notebook: `reset(problem)` returns `problem.get("prompt", "")`.

  Args:
    make_sandbox: builds the episode's sandbox (default a `LocalSandbox`
      with `sandbox_lib.Limits()`); called at the first run.
    end_on: statuses that end the episode as FAILED.
    observation_chars: the longest observation (before its newline).
    setup_code: code run before the first run (and again after a restart),
      e.g. an API's wrappers; its output is not shown.
    api: answers the code's `_rpc` calls (see `Sandbox.run`).
    prestart: start the sandbox at `reset`, in the background (on a shared
      thread pool), so that its start overlaps the sampling of the first
      action; otherwise it starts at the first run.
  """

  def __init__(self, make_sandbox: Callable[[], sandbox_lib.Sandbox] | None
               = None, *, end_on: Sequence[str] = sandbox_lib.STATE_LOST,
               observation_chars: int = 80, setup_code: str = "",
               api: sandbox_lib.Api | None = None, prestart: bool = False):
    self.make_sandbox = make_sandbox or local_sandbox(sandbox_lib.Limits())
    self.end_on = tuple(end_on)
    self.observation_chars = observation_chars
    self.setup_code = setup_code
    self.api = api
    self.prestart = prestart
    self.sandbox: sandbox_lib.Sandbox | None = None
    self._pending: concurrent.futures.Future | None = None
    self.problem = None
    self.executions: list[sandbox_lib.Execution] = []
    self.seconds = 0.0  # time spent in the sandbox this episode
    self._needs_setup = True
    # Guards the hand-over of the sandbox between a step (maybe one the
    # rollout abandoned after its time limit) and close/start; `_episode`
    # counts them, so a late step cannot keep a sandbox of a closed episode.
    self._lock = threading.Lock()
    self._episode = 0

  def start(self) -> None:
    """Forgets the previous episode's sandbox (a new one starts lazily)."""
    self.close()
    self.executions = []
    self.seconds = 0.0
    self._needs_setup = True
    if self.prestart:
      with self._lock:
        self._pending = _starter().submit(self._started_sandbox)

  def _started_sandbox(self) -> sandbox_lib.Sandbox:
    box = self.make_sandbox()
    try:
      box.start()
    except BaseException:
      box.close()
      raise
    return box

  def _box(self) -> sandbox_lib.Sandbox:
    """The episode's sandbox: the one started in the background, or a new
    one. Raises `SandboxError` when the episode was closed meanwhile."""
    with self._lock:
      episode = self._episode
      pending, self._pending = self._pending, None
    box = pending.result() if pending is not None else None  # may raise
    with self._lock:
      if box is not None:
        self.sandbox = box
      if self.sandbox is None:
        self.sandbox = self.make_sandbox()
      box = self.sandbox
      if self._episode != episode:  # closed while this step waited
        self.sandbox = None
        box.close()
        raise sandbox_lib.SandboxError("the episode was closed")
    return box

  def reset(self, problem):
    self.start()
    self.problem = dict(problem)
    return str(self.problem.get("prompt", ""))

  def execute(self, code: str) -> sandbox_lib.Execution:
    """Runs `code` in the episode's sandbox (starting it when needed)."""
    start = time.monotonic()
    try:
      box = self._box()
      restarted = False
      if self._needs_setup and self.setup_code:
        setup = box.run(self.setup_code, self.api)
        if setup.status != sandbox_lib.OK:
          return setup
        restarted = setup.restarted
      self._needs_setup = False
      result = box.run(code, self.api)
      if restarted:  # the setup's run saw the restart: say it here
        result = dataclasses.replace(result, restarted=True)
      if result.status in sandbox_lib.STATE_LOST:
        self._needs_setup = True
      return result
    finally:
      self.seconds += time.monotonic() - start

  def run_turn(self, code: str) -> environment.Turn:
    """The turn of a `run:` action."""
    result = self.execute(code)
    self.executions.append(result)
    info = {"status": result.status, "seconds": round(result.seconds, 4)}
    text = observation(result, self.observation_chars)
    if result.status in self.end_on:
      return environment.Turn(text, done=True, reason=environment.FAILED,
                              info=info)
    return environment.Turn(text, info=info)

  def step(self, action: str) -> environment.Turn:
    kind, payload = parse_action(action)
    if kind == RUN:
      return self.run_turn(payload)
    return self.act(kind, payload)

  def act(self, kind: str, payload: str) -> environment.Turn:
    """The turn of an `answer:`, `done` or other action."""
    del kind, payload
    return environment.Turn(cut("bad action", self.observation_chars),
                            info={"status": "bad_action"})

  def close(self) -> None:
    """Closes the episode's sandbox; never waits for a step in flight (a
    sandbox in use closes when its run returns, within its wall limit)."""
    with self._lock:
      self._episode += 1
      pending, self._pending = self._pending, None
      box, self.sandbox = self.sandbox, None
    if pending is not None:
      pending.add_done_callback(_close_started)
    if box is not None:
      box.close()


def _close_started(future: concurrent.futures.Future) -> None:
  """Closes a sandbox whose background start finished after its episode."""
  if not future.cancelled() and future.exception() is None:
    future.result().close()


_STARTER = None
_STARTER_LOCK = threading.Lock()


def _starter() -> concurrent.futures.ThreadPoolExecutor:
  """The shared pool that starts sandboxes in the background."""
  global _STARTER
  with _STARTER_LOCK:
    if _STARTER is None:
      _STARTER = concurrent.futures.ThreadPoolExecutor(
          max(2, os.cpu_count() or 2), thread_name_prefix="entropo-start")
    return _STARTER


class EnvPool:
  """Runs environment calls of many episodes concurrently.

  A thread pool of `max_workers` (default: the machine's CPU count, at least
  2); the work itself happens in the sandboxes' processes, so threads mostly
  wait. Each call's result is its return value or the exception it raised
  (the caller decides, e.g. ENV_ERROR).
  """

  def __init__(self, max_workers: int | None = None):
    self.max_workers = max_workers or max(2, os.cpu_count() or 2)
    self._pool = concurrent.futures.ThreadPoolExecutor(
        self.max_workers, thread_name_prefix="entropo-env")

  def map(self, fn: Callable[..., Any], *iterables) -> list[Any]:
    futures = [self._pool.submit(fn, *args) for args in zip(*iterables)]
    results = []
    for future in futures:
      try:
        results.append(future.result())
      except Exception as e:  # pylint: disable=broad-except
        results.append(e)
    return results

  def reset(self, envs: Sequence[environment.Environment],
            problems: Sequence[Any]) -> list[Any]:
    return self.map(lambda env, p: env.reset(p), envs, problems)

  def step(self, envs: Sequence[environment.Environment],
           actions: Sequence[str]) -> list[Any]:
    """`env.step(action)` of every pair at once."""
    return self.map(lambda env, a: env.step(a), envs, actions)

  def close_all(self, envs: Sequence[environment.Environment]) -> None:
    self.map(lambda env: env.close(), envs)

  def shutdown(self) -> None:
    self._pool.shutdown(wait=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.shutdown()
