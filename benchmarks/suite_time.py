"""Where the test suite's time goes: a pytest plugin and its summary.

Per test, the plugin records wall time, the worker's CPU time (user + sys,
all threads), its children's CPU time (the subprocesses a test starts) and
jax's own compile-pipeline durations (jax.monitoring: tracing, lowering to
MLIR, XLA backend compile, compilation-cache hits); each xdist worker
writes its rows to `$SUITE_TIME_DIR/rows_<worker>.json`; each row also
holds the XLA compile seconds and count of every program the test
compiled, by name (`jit(_update)`), and when the test and its worker
began. Then the summary adds them up by kind and by test file, and by
program (which compiles cost most, how often), and shows each worker's
start, time in tests and idle end:

    rm -rf .pytest_cache/jax   # a cold compilation cache, as on a fresh clone
    SUITE_TIME_DIR=/tmp/suite PYTHONPATH=benchmarks \\
        python -m pytest -n 2 -p suite_time tests
    python benchmarks/suite_time.py /tmp/suite

The jax durations are wall time inside the worker, so on a loaded machine
they grow with the load while the CPU columns do not.
"""

import collections
import json
import os
import pathlib
import sys
import time

import pytest

_EVENTS = {
    "compile": "/jax/core/compile/backend_compile_duration",
    "lower": "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "trace": "/jax/core/compile/jaxpr_trace_duration",
    "cache_saved": "/jax/compilation_cache/compile_time_saved_sec",
}
_durations = collections.Counter()
_programs = collections.defaultdict(lambda: [0, 0.0])  # name: [n, seconds]
# One list of rows per running session: a session run inside a test (the
# plugin's own test, pytester) records its tests apart from the outer one.
_sessions = []
_listening = []
_STARTED = time.time()  # the plugin is imported as pytest starts


def _listen(event, duration, **kwargs):
  _durations[event] += duration
  if event == _EVENTS["compile"]:
    program = _programs[str(kwargs.get("fun_name", "?"))]
    program[0] += 1
    program[1] += duration


def pytest_configure(config):
  """Listens to jax's compile events, once per process (a nested session
  must not count each event twice)."""
  del config  # unused
  if not _listening:
    import jax.monitoring  # pylint: disable=g-import-not-at-top
    jax.monitoring.register_event_duration_secs_listener(_listen)
    _listening.append(True)


def pytest_sessionstart(session):
  del session  # unused
  _sessions.append([])


def _cpu(t):
  return t.user + t.system, t.children_user + t.children_system


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """Times the whole protocol of a test (setup, call, teardown)."""
  del nextitem  # unused
  _durations.clear()
  _programs.clear()
  began, start, (cpu0, child0) = (time.time(), time.perf_counter(),
                                  _cpu(os.times()))
  yield
  cpu1, child1 = _cpu(os.times())
  row = {"id": item.nodeid, "wall": time.perf_counter() - start,
         "cpu": cpu1 - cpu0, "child": child1 - child0,
         "began": began, "process_began": _STARTED}
  row.update({k: _durations.get(e, 0.0) for k, e in _EVENTS.items()})
  row["programs"] = dict(_programs)
  _sessions[-1].append(row)


def pytest_sessionfinish(session):
  del session  # unused
  out = pathlib.Path(os.environ.get("SUITE_TIME_DIR", "suite_time"))
  out.mkdir(parents=True, exist_ok=True)
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  (out / f"rows_{worker}.json").write_text(json.dumps(_sessions.pop()))


def summary(folder) -> str:
  """Markdown tables: totals and the 25 costliest test files, the costliest
  programs, and each worker's start, time in tests and idle end."""
  workers = {f.stem[len("rows_"):]: json.loads(f.read_text())
             for f in sorted(pathlib.Path(folder).glob("rows_*.json"))}
  rows = [r for worker_rows in workers.values() for r in worker_rows]
  cols = ("wall", "cpu", "child", "compile", "lower", "trace", "cache_saved")
  files = collections.defaultdict(collections.Counter)
  for r in rows:
    name = r["id"].split("::")[0]
    files[name]["tests"] += 1
    files[name].update({c: r[c] for c in cols})
  total = collections.Counter()
  for c in files.values():
    total.update(c)
  lines = ["| file | tests | " + " | ".join(f"{c} s" for c in cols) + " |",
           "|---" * (len(cols) + 2) + "|"]
  order = sorted(files, key=lambda f: -(files[f]["cpu"] + files[f]["child"]))
  for name, c in [("all", total)] + [(f, files[f]) for f in order[:25]]:
    lines.append(f"| {name} | {c['tests']} | "
                 + " | ".join(f"{c[k]:.0f}" for k in cols) + " |")
  timeline = _timeline(workers)
  return "\n".join(lines + ["", _programs_table(rows)]
                   + (["", timeline] if timeline else []))


def _timeline(workers) -> str:
  """Per worker (`{name: rows}`): seconds from its start to its first test
  (imports and collection), in tests, and idle at the end while another
  worker ran on."""
  spans = {}
  for name, worker_rows in workers.items():
    rows = [r for r in worker_rows if "began" in r]
    if rows:
      spans[name] = (rows[0]["process_began"],
                           min(r["began"] for r in rows),
                           sum(r["wall"] for r in rows),
                           max(r["began"] + r["wall"] for r in rows))
  if not spans:
    return ""
  end = max(s[3] for s in spans.values())
  lines = ["| worker | start to first test s | in tests s | idle at the end s |",
           "|---|---|---|---|"]
  for name, (began, first, busy, last) in spans.items():
    lines.append(f"| {name} | {first - began:.0f} | {busy:.0f} | "
                 f"{end - last:.0f} |")
  return "\n".join(lines)


def _programs_table(rows, top: int = 15) -> str:
  """The `top` programs by XLA compile seconds: compiles, seconds, tests."""
  seconds, count, tests = (collections.Counter(), collections.Counter(),
                           collections.Counter())
  for r in rows:
    for name, (n, secs) in r.get("programs", {}).items():
      seconds[name] += secs
      count[name] += n
      tests[name] += 1
  lines = ["| program | compiles | compile s | tests |", "|---|---|---|---|"]
  for name, secs in seconds.most_common(top):
    lines.append(f"| {name} | {count[name]} | {secs:.0f} | {tests[name]} |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(summary(sys.argv[1] if len(sys.argv) > 1 else "suite_time"))
