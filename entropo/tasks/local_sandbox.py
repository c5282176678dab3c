"""`LocalSandbox`: a `Sandbox` (sandbox.py) as a local worker process.

One persistent worker process per episode (sandbox_worker.py is the child
side): a scrubbed environment, resource limits, a new session killed as a
whole; as root also a fresh uid and new network, PID and mount namespaces.
docs/sandbox.md says what it guarantees and what it does not. Import it
from `entropo.tasks.sandbox`, which re-exports it.
"""

import dataclasses
import json
import marshal
import os
import pathlib
import random
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from entropo.tasks.sandbox import ERROR
from entropo.tasks.sandbox import KILLED
from entropo.tasks.sandbox import MEMORY
from entropo.tasks.sandbox import OK
from entropo.tasks.sandbox import OUTPUT_LIMIT
from entropo.tasks.sandbox import TIMEOUT
from entropo.tasks.sandbox import Api
from entropo.tasks.sandbox import Execution
from entropo.tasks.sandbox import Limits
from entropo.tasks.sandbox import Sandbox
from entropo.tasks.sandbox import SandboxError

_WORKER_SOURCE = (pathlib.Path(__file__).parent /
                  "sandbox_worker.py").read_text()
_UID_BASE, _UID_SPAN = 1_500_000_000, 100_000_000
_SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")



def _world_usable(path: str) -> bool:
  """Whether any uid can execute `path` (every directory above searchable)."""
  real = pathlib.Path(os.path.realpath(path))
  try:
    if not real.stat().st_mode & stat.S_IXOTH:
      return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
  except OSError:
    return False


def worker_python(drop_uid: bool) -> str:
  """The interpreter for the worker: this one, unless another uid cannot
  run it (e.g. a pyenv under /root), then a system python3."""
  if not drop_uid or _world_usable(sys.executable):
    return sys.executable
  for candidate in _SYSTEM_PYTHONS:
    if _world_usable(candidate):
      return candidate
  raise SandboxError("No python3 that another uid can run; install one (e.g. "
                     "/usr/bin/python3) or pass python=.")


def default_hidden() -> tuple[str, ...]:
  """Paths hidden from the code by default: the home directories and the
  trainer's working directory (where runs usually keep checkpoints)."""
  paths = {"/root", "/home", os.path.expanduser("~"), os.getcwd()}
  return tuple(sorted(p for p in paths if p not in ("/", "")))


class LocalSandbox(Sandbox):
  """A worker process per episode, isolated as far as the OS allows.

  Args:
    limits: the `Limits`.
    isolate: as root, run as a fresh uid in new network, PID and mount
      namespaces (recorded in `info`). False runs with the trainer's uid
      and no namespaces (for debugging only).
    namespaces: with `isolate`, whether to use namespaces (False: the fresh
      uid alone, as where the kernel refuses them; processes are then
      found and killed by uid at close).
    hide: paths covered by an empty tmpfs in the sandbox's mount namespace
      (default `default_hidden()`); paths that contain the interpreter or
      the working directory are skipped.
    python: the interpreter (default `worker_python`).
    max_message_bytes: the largest message accepted from the worker; a
      larger one is a broken protocol (the worker is killed).
  """

  def __init__(self, limits: Limits = Limits(), *, isolate: bool = True,
               namespaces: bool = True,
               hide: tuple[str, ...] | None = None, python: str | None = None,
               max_message_bytes: int = 2**20):
    self.limits = limits
    self.drop_uid = isolate and os.geteuid() == 0
    self.isolate = isolate
    self.namespaces = namespaces
    self.python = python or worker_python(self.drop_uid)
    self.hide = default_hidden() if hide is None else tuple(hide)
    self.max_message_bytes = max_message_bytes
    self._proc = None
    self._workdir = None
    self._rfd = self._wfd = self._init_fd = None
    self._info: dict[str, Any] = {"network_isolated": False}
    self._died = False
    self._closed = False
    self._busy = threading.Lock()  # one run (or start) at a time

  @property
  def info(self):
    return dict(self._info)

  def start(self) -> None:
    with self._busy:
      try:
        if self._closed:
          raise SandboxError("start on a closed sandbox")
        if self._proc is None:
          self._start()
      finally:
        if self._closed:  # closed from another thread meanwhile
          self._kill()

  def _start(self) -> None:
    """A fresh worker, workdir and uid; reads its `ready` message."""
    self._workdir = tempfile.mkdtemp(prefix="entropo-sandbox-")
    uid = (_UID_BASE + random.SystemRandom().randrange(_UID_SPAN)
           if self.drop_uid else None)
    if uid is not None:
      os.chown(self._workdir, uid, uid)
    keep = (self._workdir, os.path.realpath(self.python))
    hide = [p for p in self.hide if os.path.isdir(p) and not any(
        k == p or k.startswith(p.rstrip("/") + "/") for k in keep)]
    to_child_r, self._wfd = os.pipe()
    self._rfd, from_child_w = os.pipe()
    lim = self.limits
    cfg = {"rfd": to_child_r, "wfd": from_child_w, "uid": uid,
           "isolate": self.isolate and self.namespaces,
           "workdir": self._workdir, "hide": hide,
           "tmp_bytes": lim.tmp_bytes, "output_bytes": 4 * lim.output_chars,
           "limits": {"file": lim.file_bytes, "open_files": lim.open_files,
                      "memory": lim.memory_bytes, "cpu": lim.cpu_seconds,
                      "processes": lim.processes}}
    try:
      self._proc = subprocess.Popen(
          [self.python, "-I", "-S", "-c", _WORKER_SOURCE,
           marshal.dumps(cfg, 4).hex()],
          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
          stderr=subprocess.DEVNULL, env={}, cwd=self._workdir,
          pass_fds=(to_child_r, from_child_w), start_new_session=True)
    except OSError as e:
      self._kill()
      raise SandboxError(f"Could not start {self.python}: {e}") from e
    finally:
      os.close(to_child_r)
      os.close(from_child_w)
    deadline = time.monotonic() + lim.start_seconds
    ready, seen_init = None, False
    while not (seen_init and ready) and not isinstance(ready, str):
      message = self._recv(deadline)  # "init" (keeper) and "ready" (worker)
      if isinstance(message, dict) and message.get("op") == "init":
        self._watch_init(message.get("pid"))
        seen_init = True
      else:
        ready = message
        if not isinstance(ready, dict) or ready.get("op") != "ready":
          break
    if not isinstance(ready, dict) or ready.get("op") != "ready":
      detail = ready.get("error") if isinstance(ready, dict) else ready
      self._kill()
      raise SandboxError(f"The sandbox worker did not start: {detail}")
    ready.pop("op")
    self._info = {**ready, "python": self.python, "limits":
                  dataclasses.asdict(lim)}

  def _watch_init(self, pid: Any) -> None:
    """Opens a pidfd on the namespace's init: when it has exited, so has
    every process of its PID namespace."""
    try:
      self._init_fd = os.pidfd_open(int(pid))
    except (AttributeError, OSError, TypeError, ValueError):
      self._init_fd = None

  def _recv(self, deadline: float) -> Any:
    """The next message; "timeout", "eof" or "protocol" when none comes."""
    header = self._read(4, deadline)
    if isinstance(header, str):
      return header
    size = struct.unpack(">I", header)[0]
    if size > self.max_message_bytes:
      return "protocol"
    body = self._read(size, deadline)
    if isinstance(body, str):
      return body
    try:
      message = json.loads(body)
    except Exception:  # pylint: disable=broad-except
      return "protocol"  # invalid, or nested past the recursion limit
    return message if isinstance(message, dict) else "protocol"

  def _read(self, n: int, deadline: float) -> bytes | str:
    data = b""
    poller = select.poll()
    poller.register(self._rfd, select.POLLIN)
    while len(data) < n:
      left = deadline - time.monotonic()
      if left <= 0 or not poller.poll(left * 1000):
        return "timeout"
      chunk = os.read(self._rfd, n - len(data))
      if not chunk:
        return "eof"
      data += chunk
    return data

  def _send(self, message: dict) -> bool:
    data = marshal.dumps(message, 4)  # to the worker (see sandbox_worker)
    data = struct.pack(">I", len(data)) + data
    try:
      while data:
        data = data[os.write(self._wfd, data):]
    except OSError:  # the worker is gone (EPIPE)
      return False
    return True

  def run(self, code: str, api: Api | None = None) -> Execution:
    with self._busy:
      try:
        return self._run(code, api)
      finally:
        if self._closed:  # closed from another thread meanwhile
          self._kill()

  def _run(self, code: str, api: Api | None) -> Execution:
    if self._closed:
      raise SandboxError("run on a closed sandbox")
    restarted = self._died
    if self._proc is None:
      self._start()
    self._died = False
    start = time.monotonic()
    deadline = start + self.limits.wall_seconds
    if not self._send({"op": "run", "code": str(code)}):
      return self._dead(start, restarted, "eof")
    while True:
      message = self._recv(deadline)
      if isinstance(message, str):
        return self._dead(start, restarted, message)
      if message.get("op") == "call":
        if not self._send(self._answer(api, message)):
          return self._dead(start, restarted, "eof")
        continue
      if message.get("op") != "done":
        return self._dead(start, restarted, "protocol")
      return self._done(message, start, restarted)

  def _answer(self, api: Api | None, message: dict) -> dict:
    """The parent's answer to a `_rpc` call."""
    if api is None:
      return {"op": "reply", "error": "no API in this environment"}
    try:
      value = api(str(message.get("name")), list(message.get("args") or []),
                  dict(message.get("kwargs") or {}))
      json.dumps(value)
      return {"op": "reply", "value": value}
    except Exception as e:  # pylint: disable=broad-except
      return {"op": "reply", "error": str(e), "type": type(e).__name__}

  def _done(self, message: dict, start: float, restarted: bool) -> Execution:
    cap = self.limits.output_chars
    texts = [str(message.get(k, "")) for k in ("stdout", "stderr",
                                               "exception")]
    truncated = bool(message.get("truncated")) or any(
        len(t) > cap for t in texts)
    status = message.get("status")
    if status not in (OK, ERROR, MEMORY, OUTPUT_LIMIT):
      status = ERROR
    return Execution(*(t[:cap] for t in texts), status=status,
                     seconds=time.monotonic() - start, truncated=truncated,
                     restarted=restarted)

  def _dead(self, start: float, restarted: bool, why: str) -> Execution:
    """Kills the worker after a time-out, an exit or a broken protocol."""
    code = self._kill(wait=why != "timeout")
    if why == "timeout":
      status, text = TIMEOUT, (f"TimeoutError: wall limit "
                               f"{self.limits.wall_seconds:g} s")
    elif code is not None and -code == signal.SIGXCPU or code == 128 + int(
        signal.SIGXCPU):
      status, text = TIMEOUT, f"CPU limit {self.limits.cpu_seconds} s"
    else:
      status, text = KILLED, f"the worker died ({_describe_exit(code, why)})"
    self._died = True
    return Execution(exception=text + "; state lost", status=status,
                     seconds=time.monotonic() - start, restarted=restarted)

  def _kill(self, wait: bool = False) -> int | None:
    """Ends the worker, its namespace and its process group; returns the
    keeper's exit code when it exited by itself (waiting up to 1 s for it
    when `wait`).

    The init is killed first (through its pidfd) so that the keeper reaps
    it: an init killed together with its keeper would be left a zombie
    where the host's PID 1 does not reap orphans (as in many containers).
    """
    proc, self._proc = self._proc, None
    code = None
    if proc is not None and wait:
      try:
        code = proc.wait(timeout=1.0)
      except subprocess.TimeoutExpired:
        pass
    if self._init_fd is not None:
      try:
        signal.pidfd_send_signal(self._init_fd, signal.SIGKILL)
      except OSError:
        pass
      poller = select.poll()  # the init and its whole namespace are gone
      poller.register(self._init_fd, select.POLLIN)
      poller.poll(2000)
    if proc is not None:
      try:
        proc.wait(timeout=2.0 if self._init_fd is not None else 0.0)
      except subprocess.TimeoutExpired:
        pass
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except OSError:
        pass
      proc.wait()
    for fd in (self._rfd, self._wfd, self._init_fd):
      if fd is not None:
        os.close(fd)
    self._rfd = self._wfd = self._init_fd = None
    if self._workdir is not None:
      shutil.rmtree(self._workdir, ignore_errors=True)
      self._workdir = None
    return code

  def close(self) -> None:
    """Kills and cleans up now; during a `run` or `start` in another thread
    (one a rollout abandoned), that thread does it when its call returns,
    which the wall (or start) limit bounds."""
    if self._closed:
      return
    self._closed = True
    if self._busy.acquire(blocking=False):
      try:
        self._kill()
      finally:
        self._busy.release()

  def __del__(self):
    if not getattr(self, "_closed", True):
      self.close()


def uid_processes(uid: int) -> list[int]:
  """Pids of the processes whose real uid is `uid` (read from /proc)."""
  pids = []
  for entry in os.scandir("/proc"):
    if not entry.name.isdigit():
      continue
    try:
      with open(os.path.join(entry.path, "status"), "rb") as f:
        status = f.read()
    except OSError:
      continue
    for line in status.split(b"\n"):
      if line.startswith(b"Uid:"):
        if int(line.split()[1]) == uid:
          pids.append(int(entry.name))
        break
  return pids


def _describe_exit(code: int | None, why: str) -> str:
  if why == "protocol":
    return "broken protocol"
  if code is None:
    return "no exit status"
  sig = -code if code < 0 else code - 128 if code > 128 else 0
  if sig:
    try:
      return f"signal {signal.Signals(sig).name}"
    except ValueError:
      return f"signal {sig}"
  return f"exit code {code}"
