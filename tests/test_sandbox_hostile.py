"""The sandbox under hostile code.

Every hostile program runs through a `CodeEnvironment` (the path a rollout
takes) with tight limits; for each the test checks the named status and
end, the time taken, that the episode's processes and directory are gone
afterwards, and that a fake run directory (workdir, checkpoints) is
untouched. Runs as root (namespaces, a fresh uid) or not (then the
isolation the OS does not give is asserted to be reported as off). The
whole battery runs again inside a real multi-turn rollout.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import socket
import tempfile
import time

import pytest

from entropo import tasks
from entropo.tasks import code_env
from entropo.tasks import environment as env_lib
from entropo.tasks import local_sandbox
from tests.sandbox_helpers import Episode
from tests.sandbox_helpers import LIMITS
from tests.sandbox_helpers import SLACK
from tests.sandbox_helpers import WALL

ROLLOUT_WALL = 3.0
SECRET = "entropo-test-secret-4f1d"


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
