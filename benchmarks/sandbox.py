"""Environment execution: sandbox start cost, per-step overhead, episodes/s.

Measured on `LocalSandbox` (entropo.tasks.sandbox), as root with its
namespaces and fresh uid and (`--isolate both`) without them:

* start: wall time from `LocalSandbox()` to the first `run("pass")`
  returning (process start, namespaces, mounts, the worker's `ready`),
  minus one warm round trip; then `close()` (kill, wait, remove the
  directory) timed separately;
* round trip: a warm `run("pass")` (the per-step overhead of running code:
  pipes, JSON, the output files, the after-run process sweep);
* episodes/s: whole `calc_code` episodes (reset, `run: <expr>`, `answer:`,
  close: one sandbox start per episode), one at a time and on an `EnvPool`
  of `--workers` threads (default: the CPU count);
* bare interpreter: `python -I -S -c pass` of the worker's interpreter, the
  floor of the start cost;
* apps step: one `apps_world` step that makes an API call (a round trip
  to the parent and back inside the run).

Medians over `--repeats`. Usage:

    python benchmarks/sandbox.py --repeats 30 --episodes 64 --out /tmp/s.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from entropo import tasks
from entropo.tasks import code_env
from entropo.tasks import local_sandbox


def _median_ms(values):
  return round(1000 * statistics.median(values), 2)


def sandbox_costs(isolate: bool, repeats: int) -> dict:
  """Start, close and warm round-trip times of one configuration."""
  starts, closes, trips = [], [], []
  info = {}
  for _ in range(repeats):
    t0 = time.perf_counter()
    box = local_sandbox.LocalSandbox(isolate=isolate)
    box.run("pass")
    t1 = time.perf_counter()
    warm = []
    for _ in range(10):
      t = time.perf_counter()
      box.run("pass")
      warm.append(time.perf_counter() - t)
    info = box.info
    t2 = time.perf_counter()
    box.close()
    closes.append(time.perf_counter() - t2)
    trips.extend(warm)
    starts.append(t1 - t0 - statistics.median(warm))
  return {"isolate": isolate,
          "network_isolated": info.get("network_isolated"),
          "start_ms": _median_ms(starts), "close_ms": _median_ms(closes),
          "round_trip_ms": _median_ms(trips)}


def _episode(task, record):
  env = task.environment()
  try:
    env.reset(json.loads(record["problem"]))
    for action in task.split_actions(record["solution"]):
      turn = env.step(action)
      if turn.done:
        return turn.reason
    return "turn_budget"
  finally:
    env.close()


def episodes_per_second(num: int, workers: int) -> dict:
  """calc_code episodes (canonical transcripts), serial and pooled."""
  task = tasks.get_task("calc_code")
  records = list(task.records(seed=0, num=num))
  t0 = time.perf_counter()
  serial = [_episode(task, r) for r in records]
  t1 = time.perf_counter()
  with code_env.EnvPool(workers) as pool:
    pooled = pool.map(lambda r: _episode(task, r), records)
  t2 = time.perf_counter()
  assert serial == pooled == ["solved"] * num, (serial, pooled)
  return {"episodes": num, "workers": workers,
          "serial_episodes_per_s": round(num / (t1 - t0), 1),
          "pooled_episodes_per_s": round(num / (t2 - t1), 1)}


def apps_step_ms(repeats: int) -> float:
  """One apps_world step with an API call (`bal()`), warm."""
  task = tasks.get_task("apps_world")
  env = task.environment()
  try:
    env.reset(task.generate_problem(__import__("numpy").random
                                    .default_rng(0)))
    env.step("run: bal()\n")
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      env.step("run: bal()\n")
      times.append(time.perf_counter() - t)
  finally:
    env.close()
  return _median_ms(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--episodes", type=int, default=64)
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
  parser.add_argument("--isolate", choices=["on", "both"], default="both")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  configs = [True] if args.isolate == "on" else [True, False]
  bare = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    subprocess.run([local_sandbox.worker_python(os.geteuid() == 0), "-I", "-S",
                    "-c", "pass"], check=True)
    bare.append(time.perf_counter() - t)
  result = {
      "bare_interpreter_ms": _median_ms(bare),
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                 f"{platform.python_implementation()} "
                 f"{platform.python_version()}, root={os.geteuid() == 0}",
      "sandboxes": [sandbox_costs(c, args.repeats) for c in configs],
      "episodes": episodes_per_second(args.episodes, args.workers),
      "apps_step_ms": apps_step_ms(args.repeats),
  }
  print("| isolation | network isolated | start ms | close ms | "
        "round trip ms |")
  print("|---|---|---|---|---|")
  for row in result["sandboxes"]:
    print(f"| {'on' if row['isolate'] else 'off'} | "
          f"{row['network_isolated']} | {row['start_ms']} | "
          f"{row['close_ms']} | {row['round_trip_ms']} |")
  print(f"\n(a bare `python -I -S -c pass` of the worker's interpreter: "
        f"{result['bare_interpreter_ms']} ms)")
  ep = result["episodes"]
  print(f"\ncalc_code episodes/s: {ep['serial_episodes_per_s']} serial, "
        f"{ep['pooled_episodes_per_s']} on {ep['workers']} threads "
        f"({ep['episodes']} episodes); apps_world step with an API call: "
        f"{result['apps_step_ms']} ms")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  sys.exit(main() and 0)
