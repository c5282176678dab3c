"""The child side of `LocalSandbox`: a stdlib-only script, never imported.

`LocalSandbox` runs this file's text as `python -I -S -c <text> <config>`
with an empty environment, in a new session. Three processes:

* the *keeper* (the process the parent started, still root when the
  parent is): sets the resource limits, enters new mount, network, PID and
  IPC namespaces where it may, mounts private size-limited tmpfs on /tmp,
  /var/tmp, /dev/shm and the working directory, hides the configured paths
  under empty read-only tmpfs, then forks the init and watches: when the
  parent's end of the pipe closes (the parent exited or closed the
  sandbox) it kills the init, which takes the whole PID namespace with it.
* the *init* (PID 1 of the new namespace): mounts its own /proc, drops to
  the sandbox's uid, sets no-new-privileges, forks the worker and reaps
  until the worker exits. Processes of the namespace cannot signal it, and
  when it exits the kernel kills every process left in the namespace.
* the *worker*: runs each `run` request's code in one persistent namespace
  dict (a notebook: state persists across runs of one episode), with
  stdout/stderr going to unlinked files capped by RLIMIT_FSIZE, and answers
  over length-prefixed JSON on two pipes. Code may call `_rpc(name, *args,
  **kwargs)`, which the parent answers (the apps of `apps_world` live in
  the parent, out of the code's reach). After each run it kills every other
  process of the namespace (background processes do not outlive a run).

Messages (4-byte big-endian length, then the body: JSON from the worker,
which the parent must parse safely; `marshal` version 4 from the parent,
which is trusted, so that the worker need not import `json`):
  parent -> worker: {"op": "run", "code"}, {"op": "reply", "value"|"error"}
  worker -> parent: {"op": "ready", ...isolation facts},
                    {"op": "call", "name", "args", "kwargs"},
                    {"op": "done", "stdout", "stderr", "exception", "status",
                     "truncated"}
"""

import _ast  # the C module: `ast` would cost ~15 ms of start per episode
import ctypes
import errno
import io
import marshal
import os
import resource
import select
import signal
import struct
import sys
import time

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
CLONE_NEWIPC = 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REC, MS_PRIVATE = 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
LIBC = ctypes.CDLL(None, use_errno=True)


_ESCAPES = {i: f"\\u{i:04x}" for i in range(32)}
_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\"})


def dumps(value, depth=0):
  """JSON text of `value` (None, bool, int, finite float, str, list, tuple,
  dict with str keys). Written out because importing `json` (and with it
  `re`) would cost ~25 ms of start per episode; the parent parses it with
  `json`."""
  if depth > 100:
    raise ValueError("nested too deep")
  if value is None or value is True or value is False:
    return {None: "null", True: "true", False: "false"}[value]
  if isinstance(value, int):
    return str(int(value))
  if isinstance(value, float):
    if value != value or value in (float("inf"), float("-inf")):
      raise ValueError("not a finite number")
    return repr(float(value))
  if isinstance(value, str):
    return '"' + value.translate(_ESCAPES) + '"'
  if isinstance(value, (list, tuple)):
    return "[" + ",".join(dumps(v, depth + 1) for v in value) + "]"
  if isinstance(value, dict):
    if not all(isinstance(k, str) for k in value):
      raise TypeError("dict keys must be str")
    return "{" + ",".join(dumps(k) + ":" + dumps(v, depth + 1)
                          for k, v in value.items()) + "}"
  raise TypeError(f"cannot send a {type(value).__name__}")


def send(fd, message):
  """A message to the parent: length, then JSON (UTF-8)."""
  data = dumps(message).encode("utf-8", "replace")  # lone surrogates: "?"
  data = struct.pack(">I", len(data)) + data
  while data:
    data = data[os.write(fd, data):]


def recv_exact(fd, n):
  chunks = b""
  while len(chunks) < n:
    chunk = os.read(fd, n - len(chunks))
    if not chunk:
      return None
    chunks += chunk
  return chunks


def recv(fd):
  header = recv_exact(fd, 4)
  if header is None:
    return None
  body = recv_exact(fd, struct.unpack(">I", header)[0])
  # From the parent, which is trusted: marshal (no `json` import here).
  return None if body is None else marshal.loads(body)


def mount(source, target, fstype, flags, data):
  if LIBC.mount(source.encode(), target.encode(),
                fstype.encode() if fstype else None, flags,
                data.encode() if data else None) != 0:
    raise OSError(ctypes.get_errno(), f"mount {fstype or source} on {target}")


def set_limits(limits):
  for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_FSIZE", limits["file"]),
                      ("RLIMIT_NOFILE", limits["open_files"]),
                      ("RLIMIT_AS", limits["memory"]),
                      ("RLIMIT_CPU", limits["cpu"])):
    hard = value + 1 if name == "RLIMIT_CPU" else value
    resource.setrlimit(getattr(resource, name), (value, hard))


def isolate(cfg, facts):
  """New namespaces and private mounts (root only); records what worked."""
  if LIBC.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC):
    facts["isolation_error"] = os.strerror(ctypes.get_errno())
    return
  facts.update(network_isolated=True, pid_isolated=True, mounts_private=True)
  mount("none", "/", None, MS_REC | MS_PRIVATE, None)
  tmp = f"size={cfg['tmp_bytes']},mode=1777"
  for path in ("/tmp", "/var/tmp", "/dev/shm"):
    if os.path.isdir(path):
      mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, tmp)
  for path in cfg["hide"]:
    if os.path.isdir(path):
      mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV,
            "size=4096,mode=755")
  workdir = cfg["workdir"]
  os.makedirs(workdir, exist_ok=True)
  owner = "" if cfg["uid"] is None else f",uid={cfg['uid']},gid={cfg['uid']}"
  mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
        f"size={cfg['tmp_bytes']},mode=700{owner}")


def keeper(cfg):
  """The first process: limits, namespaces, then watch the init."""
  facts = {"op": "ready", "network_isolated": False, "pid_isolated": False,
           "mounts_private": False, "no_new_privs": False,
           "uid": os.getuid()}
  rfd, wfd = cfg["rfd"], cfg["wfd"]
  # The working directory's parent as the host sees it, for `cleanup`. The
  # init closes it first thing: a descriptor of the host's file tree would
  # let the code walk past the private mounts.
  parent = os.open(os.path.dirname(cfg["workdir"]), os.O_RDONLY)
  cfg["host_fd"] = parent
  try:
    set_limits(cfg["limits"])
    if cfg["isolate"] and os.geteuid() == 0:
      isolate(cfg, facts)
    if cfg["uid"] is not None:
      facts["uid"] = cfg["uid"]
    # Orphans of the sandbox (without a PID namespace) become the keeper's
    # children, not PID 1's, so that it reaps them.
    LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1)
  except BaseException as e:  # pylint: disable=broad-except
    send(wfd, {"op": "failed", "error": f"{type(e).__name__}: {e}"})
    os._exit(70)
  init_pid = os.fork()
  if init_pid == 0:
    init(cfg, facts)
  send(wfd, {"op": "init", "pid": init_pid})  # the parent waits on it
  os.close(wfd)
  sweep = None if facts["pid_isolated"] else cfg["uid"]
  code = watch(rfd, init_pid, sweep)
  cleanup(parent, os.path.basename(cfg["workdir"]))
  os._exit(code)


def cleanup(parent, name):
  """Removes the working directory (the parent does too, unless it was
  killed): through a descriptor opened before the mount namespace, so the
  host's directory, not the private tmpfs."""
  try:
    os.rmdir(name, dir_fd=parent)  # empty: the files were in the tmpfs
  except FileNotFoundError:
    pass  # the parent removed it
  except OSError:
    try:  # no namespaces: the files are there
      import shutil  # pylint: disable=g-import-not-at-top (rarely needed)
      shutil.rmtree(name, dir_fd=parent)
    except BaseException:  # pylint: disable=broad-except
      pass


def watch(rfd, init_pid, sweep_uid):
  """Kills the init when the parent's end closes; once the init has exited,
  kills what is left of `sweep_uid` (no PID namespace), reaps every child
  and returns the init's exit code."""
  poller = select.poll()
  poller.register(rfd, 0)  # POLLHUP only: the parent closed its end
  try:  # readable when the init exits (Linux 5.3+)
    poller.register(os.pidfd_open(init_pid), select.POLLIN)
    wait_ms = 1000
  except (AttributeError, OSError):
    wait_ms = 20
  code = None
  while True:
    try:
      pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return code or 0
    if pid == init_pid:
      code = os.waitstatus_to_exitcode(status) % 256
    if pid:
      continue
    if code is not None:
      if sweep_uid is None:
        return code  # the trainer's uid: escaped processes are not ours
      kill_uid(sweep_uid)
      time.sleep(0.01)
    elif any(fd == rfd for fd, _ in poller.poll(wait_ms)):
      os.kill(init_pid, signal.SIGKILL)


def kill_uid(uid):
  """Stops, then kills, every process of `uid` (read from /proc)."""
  pids = []
  for name in os.listdir("/proc"):
    try:
      with open(f"/proc/{name}/status", "rb") as f:
        for line in f:
          if line.startswith(b"Uid:"):
            if int(line.split()[1]) == uid:
              pids.append(int(name))
            break
    except (OSError, ValueError):
      continue
  for sig in (signal.SIGSTOP, signal.SIGKILL):
    for pid in pids:
      try:
        os.kill(pid, sig)
      except OSError:
        pass


def init(cfg, facts):
  """PID 1 of the namespace: /proc, drop privileges, fork and reap."""
  os.close(cfg["host_fd"])
  try:
    if facts["pid_isolated"]:
      mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    if cfg["uid"] is not None:
      os.setgroups([])
      os.setgid(cfg["uid"])
      os.setuid(cfg["uid"])
    # After setuid, which clears it.
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # No execve may gain privileges again (setuid-root binaries, file caps).
    if LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
      facts["no_new_privs"] = True
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["limits"]["processes"],) * 2)
    os.chdir(cfg["workdir"])
  except BaseException as e:  # pylint: disable=broad-except
    send(cfg["wfd"], {"op": "failed", "error": f"{type(e).__name__}: {e}"})
    os._exit(70)
  worker_pid = os.fork()
  if worker_pid == 0:
    worker(cfg, facts)
  os.close(cfg["rfd"])
  os.close(cfg["wfd"])
  while True:
    try:
      pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
      os._exit(0)
    if pid == worker_pid:
      code = os.waitstatus_to_exitcode(status)
      os._exit(128 - code if code < 0 else code)


class Rpc:
  """`_rpc(name, *args, **kwargs)`: a call the parent answers."""

  def __init__(self, rfd, wfd):
    self.rfd, self.wfd = rfd, wfd

  def __call__(self, name, *args, **kwargs):
    send(self.wfd, {"op": "call", "name": str(name), "args": list(args),
                    "kwargs": kwargs})
    reply = recv(self.rfd)
    if reply is None:
      os._exit(0)
    if "error" in reply:
      kind = {"ValueError": ValueError, "KeyError": KeyError,
              "TypeError": TypeError}.get(reply.get("type"), RuntimeError)
      raise kind(reply["error"])
    return reply.get("value")


def output_file(fd):
  """Points `fd` at a fresh unlinked file (capped by RLIMIT_FSIZE)."""
  try:
    new = os.open(".", os.O_TMPFILE | os.O_RDWR, 0o600)
  except OSError:  # a file system without O_TMPFILE
    name = f".out{fd}-{os.getpid()}"
    new = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.unlink(name)
  os.dup2(new, fd)
  os.close(new)


def worker(cfg, facts):
  """Answers run requests until the parent closes the pipe."""
  rfd, wfd = cfg["rfd"], cfg["wfd"]
  me = os.getpid()
  LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not death
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.close(null)
  namespace = {"__name__": "__main__", "_rpc": Rpc(rfd, wfd)}
  cap = cfg["output_bytes"]
  send(wfd, facts)
  while True:
    request = recv(rfd)
    if request is None or request.get("op") != "run":
      os._exit(0)
    reply = run(request["code"], namespace, me, cap)
    if facts["pid_isolated"]:
      reap_all()
    send(wfd, reply)


def reap_all():
  """Kills every other process of the namespace (but init) and reaps this
  process's children."""
  for _ in range(2):
    try:
      os.kill(-1, signal.SIGKILL)
    except OSError:
      break
  while True:
    try:
      os.waitpid(-1, 0)
    except ChildProcessError:
      return
    except OSError:
      return


def run(code, namespace, me, cap):
  """Runs `code`; a notebook cell: a final expression's repr is printed."""
  try:
    output_file(1)
    output_file(2)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False),
                                  encoding="utf-8", errors="replace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False),
                                  encoding="utf-8", errors="replace")
  except OSError as e:
    return {"op": "done", "stdout": "", "stderr": "", "truncated": False,
            "exception": f"sandbox setup failed: {e}", "status": "error"}
  status, exception = "ok", ""
  try:
    tree = compile(code, "<run>", "exec", _ast.PyCF_ONLY_AST)
    last = None
    if tree.body and isinstance(tree.body[-1], _ast.Expr):
      last = _ast.Expression(tree.body.pop().value)
    exec(compile(tree, "<run>", "exec"), namespace)  # pylint: disable=exec-used
    if last is not None:
      last = compile(last, "<run>", "eval")
      value = eval(last, namespace)  # pylint: disable=eval-used
      if value is not None:
        print(repr(value))
  except BaseException as e:  # pylint: disable=broad-except
    if os.getpid() != me:
      os._exit(0)
    status, exception = describe(e)
  finally:
    if os.getpid() != me:  # a forked child never answers
      os._exit(0)
  return finish(status, exception, cap)


def describe(e):
  if isinstance(e, MemoryError):
    return "memory", "MemoryError"
  if isinstance(e, OSError) and e.errno == errno.EFBIG:
    return "output_limit", "OSError: file size limit"
  try:
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
  except BaseException:  # pylint: disable=broad-except
    text = type(e).__name__
  return "error", text


def finish(status, exception, cap):
  """Flushes and reads back the run's output, at most `cap` bytes each."""
  texts, truncated = [], False
  for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
    try:
      stream.flush()
    except MemoryError:
      status = "memory" if status == "ok" else status
    except OSError:
      status = "output_limit" if status == "ok" else status
    try:
      size = os.fstat(fd).st_size
      data = os.pread(fd, cap, 0)
    except OSError:
      size, data = 0, b""
    truncated = truncated or size > cap
    texts.append(data.decode("utf-8", "replace"))
  if truncated and status == "ok":
    status = "output_limit"
  return {"op": "done", "stdout": texts[0], "stderr": texts[1],
          "exception": exception[:cap], "status": status,
          "truncated": truncated}


if __name__ == "__main__":
  keeper(marshal.loads(bytes.fromhex(sys.argv[1])))
