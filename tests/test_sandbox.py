"""The sandbox under hostile code, the code environments and their tasks.

Every hostile program runs through a `CodeEnvironment` (the path a rollout
takes) with tight limits; for each the test checks the named status and
end, the time taken, that the episode's processes and directory are gone
afterwards, and that a fake run directory (workdir, checkpoints) is
untouched. Runs as root (namespaces, a fresh uid) or not (then the
isolation the OS does not give is asserted to be reported as off).
"""

import dataclasses
import json
import os
import pathlib
import shutil
import socket
import tempfile
import time

import numpy as np
import pytest

from entropo import tasks
from entropo.tasks import apps_world
from entropo.tasks import code_env
from entropo.tasks import environment as env_lib
from entropo.tasks import local_sandbox
from entropo.tasks import sandbox as sandbox_lib

WALL = 1.0
SLACK = 3.0  # starting and killing a worker on a busy 2-core machine
LIMITS = sandbox_lib.Limits(wall_seconds=WALL, cpu_seconds=3,
                            memory_bytes=256 * 2**20, processes=12,
                            file_bytes=2**20, output_chars=500,
                            tmp_bytes=8 * 2**20)
ROLLOUT_WALL = 3.0
SECRET = "entropo-test-secret-4f1d"
ROOT = os.geteuid() == 0


def _snapshot(directory: pathlib.Path) -> dict[str, tuple]:
  return {str(p.relative_to(directory)):
          (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
          for p in sorted(directory.rglob("*"))}


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
  """A fake training run: workdir, checkpoint, a secret file and env var."""
  monkeypatch.setenv("ENTROPO_SECRET", SECRET)
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "ckpt" / "params.msgpack").write_bytes(b"weights" * 100)
  (tmp_path / "secret.txt").write_text(SECRET)
  (tmp_path / "secret.txt").chmod(0o644)
  before = _snapshot(tmp_path)
  yield tmp_path
  assert _snapshot(tmp_path) == before


class Episode:
  """A CodeEnvironment with the test limits, and what it left behind."""

  def __init__(self, limits: sandbox_lib.Limits = LIMITS):
    self.wall = limits.wall_seconds
    self.env = code_env.CodeEnvironment(code_env.local_sandbox(limits))
    self.env.start()

  def step(self, action: str):
    start = time.monotonic()
    turn = self.env.step(action)
    elapsed = time.monotonic() - start
    assert elapsed < self.wall + SLACK, (action, elapsed)
    return turn

  def close_and_check(self):
    box = self.env.sandbox
    if box is None:
      return
    workdir, info = box._workdir, box.info  # pylint: disable=protected-access
    proc = box._proc  # pylint: disable=protected-access
    self.env.close()
    assert workdir is None or not os.path.exists(workdir)
    if proc is not None:
      assert proc.poll() is not None
    if info.get("uid") not in (None, os.getuid()):
      assert local_sandbox.uid_processes(info["uid"]) == []


@pytest.fixture
def episode(request):
  # A program that must reach a limit other than the wall clock by work
  # gets a wall it cannot hit first on a loaded machine: memory_creep
  # touched 256 MiB page by page in over 1 s under a full CI run.
  wall = getattr(request, "param", WALL)
  ep = Episode(dataclasses.replace(LIMITS, wall_seconds=wall))
  yield ep
  ep.close_and_check()


def _fenced(code: str) -> str:
  return f"```python\n{code}\n```\n"


# (name, code, statuses allowed, whether the episode must have ended)
HOSTILE = [
    ("infinite_loop", "while True: pass", {"timeout"}, True),
    ("sleep_past_wall", "import time; time.sleep(60)", {"timeout"}, True),
    ("fork_bomb", "import os\nwhile True: os.fork()",
     {"error", "timeout"}, False),
    ("memory_bomb", "x = bytearray(50 * 2**30)", {"memory"}, False),
    ("memory_creep", "x = []\nwhile True: x.append(' ' * 2**20)",
     {"memory"}, False),
    ("huge_output", "while True: print('x' * 10**5)", {"output_limit"}, False),
    ("deep_recursion", "def f(n): return f(n + 1)\nf(0)", {"error"}, False),
    ("c_stack_overflow",
     "import sys; sys.setrecursionlimit(10**8)\n"
     "def f(n): return f(n + 1)\nf(0)", {"killed", "error", "memory",
                                         "timeout"}, None),
    ("ctypes_crash", "import ctypes; ctypes.string_at(0)", {"killed"}, True),
    ("forged_protocol",  # garbage on the pipes to the parent
     "import os, struct\nbody = b'[' * 900000\n"
     "for fd in sorted(map(int, os.listdir('/proc/self/fd')))[3:]:\n"
     "  try: os.write(fd, struct.pack('>I', len(body)) + body)\n"
     "  except OSError: pass", {"killed"}, True),
    ("kill_everyone", "import os, signal\nos.kill(-1, signal.SIGKILL)",
     {"ok", "error", "killed"}, None),
]


# Programs that must reach a limit by work before the wall clock stops them.
WALL_FOR = {"memory_creep": 10.0}


@pytest.mark.parametrize("name,code,statuses,ends,episode",
                         [(*h, WALL_FOR.get(h[0], WALL)) for h in HOSTILE],
                         ids=[h[0] for h in HOSTILE], indirect=["episode"])
def test_hostile_program(episode, run_dir, name, code, statuses, ends):
  del run_dir  # checked untouched at teardown
  turn = episode.step(_fenced(code))
  assert turn.info["status"] in statuses, (name, turn)
  if ends is not None:
    assert turn.done == ends, (name, turn)
  if turn.done:
    assert turn.reason == "failed"
  else:  # the episode goes on, with a working sandbox
    assert episode.step("run: 6*7\n").observation == "42\n"


def test_host_files_and_env_are_out_of_reach(episode, run_dir):
  code = f"""
import os, shutil
out = [repr(dict(os.environ))]
for path in [{str(run_dir)!r} + "/secret.txt", "/proc/{os.getpid()}/environ",
             "/proc/1/environ", "/proc/self/environ"]:
  try:
    out.append(open(path).read())
  except OSError as e:
    out.append(type(e).__name__)
for act in [lambda: shutil.rmtree({str(run_dir)!r}),
            lambda: os.remove({str(run_dir)!r} + "/ckpt/params.msgpack"),
            lambda: open({str(run_dir)!r} + "/ckpt/evil", "w"),
            lambda: open({os.getcwd()!r} + "/evil", "w"),
            lambda: open("/tmp/entropo-evil", "w").write("x")]:
  try:
    act()
  except OSError as e:
    out.append(type(e).__name__)
print(out)
"""
  turn = episode.step(_fenced(code))
  assert turn.info["status"] == "ok", turn
  output = episode.env.executions[-1].stdout
  assert SECRET not in output
  assert "ENTROPO_SECRET" not in output
  assert not os.path.exists("/tmp/entropo-evil")
  assert not os.path.exists(os.path.join(os.getcwd(), "evil"))


def test_parent_survives_kill_attempts(episode):
  code = (f"import os, signal\nfor pid in (os.getppid(), {os.getpid()}, "
          f"{os.getppid()}, 1):\n  try: os.kill(pid, signal.SIGKILL)\n"
          f"  except OSError: pass\nprint('alive')")
  turn = episode.step(_fenced(code))
  assert turn.observation == "alive\n", turn
  assert episode.step("run: 1+1\n").observation == "2\n"


def test_socket_to_localhost_listener(episode):
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(1)
  listener.settimeout(0.2)
  port = listener.getsockname()[1]
  try:
    turn = episode.step(f"run: import socket; socket.create_connection("
                        f"('127.0.0.1', {port}), timeout=0.5); print('open')\n")
    info = episode.env.sandbox.info
    if not info["network_isolated"]:
      pytest.skip("network isolation is off here (and says so)")
    assert turn.info["status"] == "error" and "open" not in turn.observation
    with pytest.raises(OSError):
      listener.accept()
  finally:
    listener.close()


def test_background_processes_die_after_each_run(episode):
  code = ("import os, time\nfor _ in range(5):\n  if os.fork() == 0:\n"
          "    os.setsid(); time.sleep(600)\nprint('forked')")
  turn = episode.step(_fenced(code))
  assert turn.observation == "forked\n"
  info = episode.env.sandbox.info
  if not info["pid_isolated"]:
    pytest.skip("no PID namespace here: stray processes die only at close")
  deadline = time.monotonic() + 2  # orphans are reaped by the init
  left = local_sandbox.uid_processes(info["uid"])
  while len(left) > 2 and time.monotonic() < deadline:
    time.sleep(0.05)
    left = local_sandbox.uid_processes(info["uid"])
  assert len(left) == 2  # the init and the worker


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


@pytest.mark.parametrize("name", ["calc_code", "apps_world"])
def test_task_transcripts_replay(name):
  task = tasks.get_task(name)
  for record in task.records(seed=1, num=3):
    problem = json.loads(record["problem"])
    for transcript in task.transcripts(problem):
      env = task.environment()
      try:
        assert env.reset(problem) == record["prompt"]
        turn = None
        for segment in transcript:
          if segment.by_model:
            turn = env.step(segment.text)
          else:
            assert turn.observation == segment.text
        assert turn.done and turn.reason == "solved"
        assert turn.reward + env.final_reward(turn.reason) == 1.0
      finally:
        env.close()
    assert task.verify(problem, record["solution"]).correct


def test_apps_world_checks_and_api():
  task = tasks.get_task("apps_world", kinds=("pay",))
  problem = task.generate_problem(np.random.default_rng(3))
  env = task.environment()
  try:
    env.reset(problem)
    name = problem["name"]
    bad = env.step(f'run: _rpc("pay", "{name}", -5)\n')
    assert bad.observation == "ValueError: bad amount\n"
    env.step(f'run: pay("{name}", 1)\n')  # the wrong amount
    end = env.step("done\n")
    assert end.done and end.reason == "failed"
    # bob 18 -> 21, me 28 -> 25, payments [bob, 3], bob's debt 1 -> 0 are
    # to do; paying 1 did only the debt: 1 / 4.
    assert problem["name"] == "bob" and problem["amount"] == 3
    assert problem["state"]["owe"]["bob"] == 1
    assert env.final_reward(end.reason) == 0.25
  finally:
    env.close()
  world = apps_world.World(problem["state"])
  with pytest.raises(ValueError):
    world("balance", [], {})


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


# -- the hostile battery inside a real multi-turn rollout


class _Forced(code_env.CodeEnvironment):
  """Whatever the policy writes, runs the problem's program, then probes
  that the sandbox still works (`6*7`) and ends the episode."""

  def reset(self, problem):
    self.start()
    self.problem = dict(problem)
    return "go:"

  def step(self, action):
    del action  # the policy's text: random here
    if not self.executions:
      return self.run_turn(self.problem["code"])
    probe = self.execute("6*7")
    solved = probe.stdout == "42\n"
    return env_lib.Turn(
        done=True, reward=1.0 if solved else 0.0,
        reason="solved" if solved else "failed")


class _ForcedTask(env_lib.AgentTask):
  name = "forced_code"

  def environment(self):
    # A longer wall limit than the battery's: every program runs at once
    # here, on a machine that may be busy.
    limits = dataclasses.replace(LIMITS, wall_seconds=ROLLOUT_WALL)
    return _Forced(code_env.local_sandbox(limits), observation_chars=12)

  def prompt(self, problem):
    return "go:"

  def transcripts(self, problem):
    return []


def test_hostile_programs_in_a_rollout(run_dir, monkeypatch, request):
  """Hostile programs through `training.episodes.play` with a tiny model."""
  del run_dir  # checked untouched at teardown
  boxes = tempfile.mkdtemp(prefix="entropo-test-boxes-")  # their workdirs
  monkeypatch.setattr(tempfile, "tempdir", boxes)
  request.addfinalizer(lambda: shutil.rmtree(boxes, ignore_errors=True))
  episodes_lib = pytest.importorskip("entropo.training.episodes")
  import jax  # pylint: disable=g-import-not-at-top
  import psutil  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from entropo.models import ModelConfig  # pylint: disable=g-import-not-at-top
  from entropo.models import Transformer  # pylint: disable=g-import-not-at-top
  from entropo.tasks import pipeline  # pylint: disable=g-import-not-at-top
  programs = {name: code for name, code, _, _ in HOSTILE}
  programs["plain"] = "x = 1"
  tok = tasks.char_tokenizer()
  cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=16,
                    intermediate_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=1, max_position_embeddings=64,
                    family="qwen3", qk_norm=True, tie_word_embeddings=True)
  model = Transformer(cfg, precision="fp32", rngs=nnx.Rngs(0))
  problems = [json.dumps({"code": c}) for c in programs.values()]
  batch = pipeline.prompt_batch(
      [{"id": i, "prompt": "go:", "problem": p}
       for i, p in enumerate(problems)], tok, max_prompt_len=4)
  limits = episodes_lib.EpisodeLimits(max_turns=3, max_action_tokens=4,
                                      max_observation_tokens=16, context=64,
                                      step_timeout=ROLLOUT_WALL + 4)
  ep = episodes_lib.play(model, _ForcedTask(), tok, batch["prompt_tokens"],
                         batch["prompt_mask"], problems,
                         key=jax.random.key(0), limits=limits,
                         stop_ids=episodes_lib.stop_token_ids(tok, ["\n"]))
  reasons = dict(zip(programs, ep.reasons))
  for name, _, statuses, ends in HOSTILE:
    if ends:
      assert reasons[name] == "failed", (name, reasons[name])
    elif ends is False:  # the sandbox survived and answered the probe
      assert reasons[name] in ("solved", "gave_up"), (name, reasons[name])
  assert reasons["plain"] in ("solved", "gave_up")
  assert set(ep.reasons) <= set(env_lib.END_REASONS)
  # All episodes ran concurrently: the slow ones cost about one wall limit.
  assert ep.env_seconds < 3 * (ROLLOUT_WALL + SLACK), ep.env_seconds
  assert not psutil.Process().children(recursive=True)
  os.rmdir(boxes)  # empty: every episode's directory was removed


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


@pytest.mark.parametrize("name", ["calc_code", "apps_world"])
def test_config_limits_fit_the_transcripts(name):
  # pylint: disable-next=g-import-not-at-top
  from experiments.configs import code_agents
  c = code_agents.get_config(name)
  task = tasks.get_task(c.task.name, **c.task.settings)
  for record in task.records(seed=0, num=40):
    problem = json.loads(record["problem"])
    assert len(record["prompt"]) <= c.data.max_prompt_len
    for transcript in task.transcripts(problem):
      for segment in transcript:
        limit = (c.agent.max_action_tokens if segment.by_model
                 else c.agent.max_observation_tokens)
        assert len(segment.text) <= limit, segment
      assert len(transcript) <= 2 * c.agent.max_turns
  # Any observation fits (an error message too), with its newline.
  assert c.agent.max_observation_tokens >= task.observation_chars + 1
  # The rollout's slots: the prompt, then max_turns actions of
  # max_action_tokens with observation chunks (padded to the bucket).
  # pylint: disable-next=g-import-not-at-top
  from entropo.training.episodes import EpisodeLimits
  bucket = EpisodeLimits().observation_bucket
  chunk = -(-c.agent.max_observation_tokens // bucket) * bucket
  turns = c.agent.max_turns
  assert (c.data.max_prompt_len + turns * c.agent.max_action_tokens
          + (turns - 1) * chunk) <= c.agent.max_context


@pytest.mark.parametrize("name", ["calc_code", "apps_world"])
def test_every_observation_fits_observation_chars(name):
  task = tasks.get_task(name)
  problem = next(task.records(seed=0, num=1))["problem"]
  env = task.environment()
  try:
    env.reset(json.loads(problem))
    for action in ["hello\n", "run: 1/0\n", "run: print('x' * 500)\n",
                   "run: undefined_name\n", "answer: 3\n"]:
      turn = env.step(action)
      assert len(turn.observation) <= task.observation_chars + 1, turn
      if turn.done:
        break
  finally:
    env.close()


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


def _payback_problem():
  """A hand-made `payback` problem: me owes ann 4 and bob 2."""
  return {"kind": "payback", "name": "ann",
          "state": {"balance": {"ann": 5, "bob": 3, "cy": 0, "me": 40},
                    "owe": {"ann": 4, "bob": 2},
                    "phone": {"bob": "5551111", "cy": "5552222"}}}


@pytest.mark.parametrize("payments, finished, want", [
    # Checks: ann has 9, bob has 3, cy has 0, me has 36, payments as
    # asked, debts as expected, other contacts unchanged. To do at the
    # start (failing): ann, me, payments, debts (4); holding: bob, cy,
    # contacts (3).
    ([], True, 0.0),  # untouched (the old reward: (3 + 1) / 8 = 0.5)
    ([], False, 0.0),
    ([["ann", 4]], True, 1.0),
    ([["ann", 4]], False, 0.5),  # right state, no `done`: halved
    # me has 36 (1 done); bob has 7 (1 broken): 1 / (4 + 1).
    ([["bob", 4]], True, 0.2),
    ([["bob", 4]], False, 0.1),
    # ann has 9 and debts as expected (2 done); me has 35 and cy has 1
    # (cy broken): 2 / (4 + 1).
    ([["ann", 4], ["cy", 1]], True, 0.4),
])
def test_apps_world_reward_pays_progress(payments, finished, want):
  problem = _payback_problem()
  env = apps_world.AppsEnvironment(tasks.get_task("apps_world"))
  env.problem = problem
  env.world = apps_world.World(problem["state"])  # no sandbox: the API only
  for name, amount in payments:
    env.world("pay", [name, amount], {})
  reason = "failed" if finished else "turn_budget"
  assert env.final_reward(reason) == pytest.approx(want, abs=1e-12)
  assert apps_world.progress(problem, env.world.state) == pytest.approx(
      want * 2 / (1 + finished), abs=1e-12)
  env.close()


def test_apps_world_reward_needs_done():
  task = tasks.get_task("apps_world", kinds=("pay",))
  problem = task.generate_problem(np.random.default_rng(5))
  env = task.environment()
  try:
    env.reset(problem)
    env.step(f'run: pay("{problem["name"]}",{problem["amount"]})\n')
    assert env.final_reward("turn_budget") == 0.5  # right state, no `done`
    assert env.final_reward("solved") == 1.0
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
