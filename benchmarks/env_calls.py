"""Environment calls of a large batch: all at once vs the bounded pool.

Builds `--episodes` `apps_world` environments (each starts a sandbox
process in the background at `reset`), resets them and runs their first
step (the scripted first action) through

* `old`: every call in its own thread at once, one deadline of
  `--timeout` seconds from the moment all were started (the rollout's
  `call_all` before the pool);
* `pool`: `entropo.training.env_calls.call_all`, at most `--workers`
  calls at once (0: the default), each call's limit from its own start.

Prints, per mode, the wall time of reset and first step, and how many first
steps were ok, timed out (an episode that would end `env_timeout`) or
raised. Usage:

    python benchmarks/env_calls.py --episodes 512 --modes pool,old
"""

import argparse
import threading
import time

import numpy as np

from entropo.tasks import apps_world
from entropo.training import env_calls


def all_at_once(calls, timeout, workers=None):
  """The rollout's `call_all` before the pool: one thread per call, all
  started at once, one shared deadline."""
  del workers
  results = [None] * len(calls)

  def run(i, fn):
    try:
      results[i] = ("ok", fn())
    except BaseException as e:  # pylint: disable=broad-except
      results[i] = ("error", e)

  threads = [threading.Thread(target=run, args=(i, fn), daemon=True)
             for i, fn in enumerate(calls)]
  for t in threads:
    t.start()
  deadline = time.monotonic() + timeout
  for t in threads:
    t.join(max(0.0, deadline - time.monotonic()))
  return [r if r is not None else ("timeout", None) for r in list(results)]


def first_steps(call_all, episodes: int, timeout: float, workers: int
                ) -> dict:
  """Resets `episodes` apps_world episodes and runs their first step."""
  task = apps_world.AppsWorld(num_people=3, max_amount=20, max_turns=3,
                              observation_chars=16)
  rng = np.random.default_rng(0)
  problems = [task.generate_problem(rng) for _ in range(episodes)]
  actions = [task.transcripts(p)[0][0].text for p in problems]
  envs = [task.environment() for _ in range(episodes)]
  t0 = time.perf_counter()
  call_all([lambda e=e, p=p: e.reset(p) for e, p in zip(envs, problems)],
           timeout, workers)
  out = call_all([lambda e=e, a=a: e.step(a) for e, a in zip(envs, actions)],
                 timeout, workers)
  seconds = time.perf_counter() - t0
  env_calls.call_all([lambda e=e: e.close() for e in envs], timeout)
  status = [s for s, _ in out]
  return {"seconds": round(seconds, 1),
          **{s: status.count(s) for s in ("ok", "timeout", "error")}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--episodes", type=int, default=512)
  parser.add_argument("--timeout", type=float, default=10.0)
  parser.add_argument("--workers", type=int, default=0)
  parser.add_argument("--modes", default="pool,old")
  args = parser.parse_args()
  modes = {"pool": env_calls.call_all, "old": all_at_once}
  for mode in args.modes.split(","):
    result = first_steps(modes[mode], args.episodes, args.timeout,
                         args.workers or None)
    print(f"{mode}: {args.episodes} episodes, reset and first step "
          f"{result['seconds']} s: ok {result['ok']}, timeout "
          f"{result['timeout']}, error {result['error']}", flush=True)
    time.sleep(2)  # let the closed sandboxes go


if __name__ == "__main__":
  main()
