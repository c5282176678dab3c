"""Environment calls of a batch of episodes, on a bounded pool.

`call_all(calls, timeout, workers)` runs many environment calls (`reset`,
`step`, `final_reward`, `close` of the episodes of a batch) with at most
`workers` of them at once, each with its own time limit from the moment it
starts: a slow or hung call holds back the others by no more than its own
limit, and a large batch (an evaluation) does not start all its sandboxes at
once on a small machine.
"""

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


def default_workers() -> int:
  """Environment calls run at once by default: 4 per CPU, at least 8 (the
  calls mostly wait on sandbox processes)."""
  return max(8, 4 * (os.cpu_count() or 1))


def call_all(calls: Sequence[Callable[[], Any]], timeout: float,
             workers: int | None = None) -> list[tuple[str, Any]]:
  """Runs `calls` on a bounded pool, each for at most `timeout` seconds.

  At most `workers` calls (None or 0: `default_workers()`) hold a place in the
  pool at once, each in its own daemon thread; the others wait, started in
  order as places free up. A call's limit runs from the moment it starts,
  not from the batch's submission, so a batch larger than the pool costs
  its later calls no time. A call still running `timeout` seconds after it
  started is abandoned and its place goes to the next call at once: a hung
  call holds a place for its own limit only. Its thread may keep running
  (an in-process call cannot be killed; the sandboxed environments bound
  their runs and kill their process on `close`), so while abandoned calls
  linger more than `workers` threads may be alive, but at most `workers`
  calls that have not been abandoned ever run at once. Returns within about
  `ceil(len(calls) / workers) * timeout` seconds whatever the calls do.

  Returns:
    `("ok", value)`, `("error", exception)` or `("timeout", None)` per call,
    in the order of `calls`.
  """
  workers = workers or default_workers()
  if workers < 1:
    raise ValueError(f"workers must be >= 1; got {workers}")
  return _Pool(calls, timeout, workers).run()


class _Pool:
  """`call_all`'s bookkeeping: the calls holding a place and their
  deadlines, guarded by one condition the finishing calls notify."""

  def __init__(self, calls, timeout: float, workers: int):
    self.calls, self.timeout, self.workers = list(calls), timeout, workers
    self.results: list[tuple[str, Any] | None] = [None] * len(self.calls)
    self.running: dict[int, float] = {}  # index -> deadline
    self.cond = threading.Condition()

  def _call(self, i: int) -> None:
    try:
      out = ("ok", self.calls[i]())
    except BaseException as e:  # pylint: disable=broad-except
      out = ("error", e)
    with self.cond:
      if self.running.pop(i, None) is not None:  # not abandoned
        self.results[i] = out
        self.cond.notify()

  def run(self) -> list[tuple[str, Any]]:
    n, started = len(self.calls), 0
    with self.cond:
      while started < n or self.running:
        now = time.monotonic()
        for i in [i for i, d in self.running.items() if d <= now]:
          del self.running[i]  # abandoned: its place is free
          self.results[i] = ("timeout", None)
        while started < n and len(self.running) < self.workers:
          self.running[started] = time.monotonic() + self.timeout
          threading.Thread(target=self._call, args=(started,),
                           daemon=True).start()
          started += 1
        if self.running:
          self.cond.wait(max(0.0, min(self.running.values())
                             - time.monotonic()))
    return list(self.results)
