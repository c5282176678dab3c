"""The sandbox process itself: its state, isolation, workers, pooling,
restarts and cleanup (the hostile battery: tests/test_sandbox_hostile.py).
Runs as root (namespaces, a fresh uid) or not (then the isolation the OS
does not give is asserted to be reported as off).
"""

import json
import os
import time

import pytest

from entropo.tasks import code_env
from entropo.tasks import local_sandbox
from tests.sandbox_helpers import Episode
from tests.sandbox_helpers import LIMITS
from tests.sandbox_helpers import SLACK
from tests.sandbox_helpers import WALL

ROOT = os.geteuid() == 0


def test_state_persists_within_an_episode_and_not_across():
  ep = Episode()
  try:
    ep.step("run: secret = 41\n")
    assert ep.step("run: secret + 1\n").observation == "42\n"
    ep.env.start()  # a new episode
    assert "NameError" in ep.step("run: secret\n").observation
  finally:
    ep.close_and_check()


def test_isolation_is_reported():
  box = local_sandbox.LocalSandbox(LIMITS)
  try:
    assert box.run("1").stdout == "1\n"
    info = box.info
    assert info["network_isolated"] == info["pid_isolated"] == ROOT
    assert (info["uid"] != os.getuid()) == ROOT
  finally:
    box.close()
  off = local_sandbox.LocalSandbox(LIMITS, isolate=False)
  try:
    assert off.run("1").status == "ok"
    assert off.info["network_isolated"] is False
  finally:
    off.close()


def test_pool_is_not_held_back_by_a_hung_episode():
  envs = [code_env.CodeEnvironment(code_env.local_sandbox(LIMITS))
          for _ in range(4)]
  actions = ["run: while True: pass\n"] + ["run: sum(range(10))\n"] * 3
  with code_env.EnvPool(4) as pool:
    pool.step(envs, ["run: 0\n"] * 4)  # start the workers
    start = time.monotonic()
    turns = pool.step(envs, actions)
    elapsed = time.monotonic() - start
    pool.close_all(envs)
  assert turns[0].info["status"] == "timeout" and turns[0].done
  assert [t.observation for t in turns[1:]] == ["45\n"] * 3
  assert all(t.info["seconds"] < WALL for t in turns[1:]), turns
  assert elapsed < WALL + SLACK


def test_prestart_and_episode_reuse():
  env = code_env.CodeEnvironment(code_env.local_sandbox(LIMITS),
                                 prestart=True)
  try:
    assert env.reset({"prompt": "p\n"}) == "p\n"
    assert env.step("run: 2+2\n").observation == "4\n"
    first = env.sandbox
    env.reset({"prompt": "q\n"})  # the old sandbox is closed
    assert first._proc is None  # pylint: disable=protected-access
    assert env.step("run: 'x' in dir()\n").observation == "False\n"
  finally:
    env.close()
  env = code_env.CodeEnvironment(code_env.local_sandbox(LIMITS),
                                 prestart=True)
  env.reset({})
  env.close()  # closed before its first run: the started worker is killed
  assert env.sandbox is None


def test_benchmark_runs(tmp_path):
  from benchmarks import sandbox as bench  # pylint: disable=g-import-not-at-top
  out = tmp_path / "bench.json"
  result = bench.main(["--repeats", "2", "--episodes", "4", "--isolate", "on",
                       "--out", str(out)])
  assert json.loads(out.read_text()) == result
  assert result["episodes"]["pooled_episodes_per_s"] > 0


@pytest.mark.skipif(not ROOT, reason="a fresh uid needs root")
def test_fresh_uid_without_namespaces_kills_escaped_processes():
  box = local_sandbox.LocalSandbox(LIMITS, namespaces=False)
  try:
    out = box.run("import os, time\nfor _ in range(3):\n  if os.fork() == 0:"
                  "\n    os.setsid(); time.sleep(600)\nprint('forked')")
    assert out.stdout == "forked\n"
    uid = box.info["uid"]
    assert box.info["network_isolated"] is False and uid != os.getuid()
    assert len(local_sandbox.uid_processes(uid)) >= 5  # init, worker, 3 more
  finally:
    box.close()
  assert local_sandbox.uid_processes(uid) == []


def test_restart_is_said_when_the_episode_goes_on():
  env = code_env.CodeEnvironment(code_env.local_sandbox(LIMITS), end_on=())
  try:
    env.reset({})
    env.step("run: x = 1\n")
    turn = env.step("run: import os; os._exit(3)\n")
    assert not turn.done and turn.info["status"] == "killed"
    assert env.step("run: 1+1\n").observation == "state lost: 2\n"
    assert env.step("run: 2+2\n").observation == "4\n"
  finally:
    env.close()


def test_no_descriptor_of_the_host_tree_and_cleanup_without_parent(tmp_path):
  box = local_sandbox.LocalSandbox(LIMITS)
  try:
    out = box.run("import os\nfor f in os.listdir('/proc/self/fd'):\n"
                  "  try: print(os.readlink('/proc/self/fd/' + f))\n"
                  "  except OSError: pass")
    assert out.status == "ok" and "pipe:" in out.stdout, out
    workdir = box._workdir  # pylint: disable=protected-access
    assert "/tmp" not in out.stdout.replace(workdir, ""), out
    # The trainer dies without closing: the keeper sees its pipe close,
    # kills the namespace and removes the directory itself.
    os.close(box._wfd)  # pylint: disable=protected-access
    box._wfd = None  # pylint: disable=protected-access
    box._proc.wait(timeout=5)  # pylint: disable=protected-access
    assert not os.path.exists(workdir)
  finally:
    box.close()
