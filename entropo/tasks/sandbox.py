"""Running untrusted Python: the `Sandbox` interface and its results.

A policy that writes code will, in time, write an infinite loop, a fork
bomb, a 50 GB allocation, `os.remove` of the wrong path, a read of the
trainer's environment or a socket to somewhere. A `Sandbox` runs such code
for one episode and returns an `Execution` (stdout, stderr, the exception,
a `status`, seconds); whatever the code does, `run` returns within its wall
limit (plus the time to kill the processes) and never raises on the code's
behalf.

    with local_sandbox.LocalSandbox(Limits(wall_seconds=2)) as box:
      box.run("x = 6 * 7")
      box.run("x + 1").stdout        # "43\\n": state persists, as in a notebook
      box.info["network_isolated"]   # True as root where namespaces work

`LocalSandbox` (local_sandbox.py) is a persistent worker
process per episode (see sandbox_worker.py for the child side): a scrubbed
environment, resource limits (CPU, address space, processes, file size, open
files, no core dumps), a new session killed as a whole; as root also a fresh
uid (so the process limit applies and the trainer's processes and private
files are out of reach), new network, PID and mount namespaces (no network,
its own /proc, private size-limited /tmp, /var/tmp, /dev/shm and working
directory, configured paths hidden). It is not a VM: docs/sandbox.md says
what it guarantees, what it does not, and how to put a container runtime or
a remote service behind the same interface.

After a run that times out or kills the worker, the next `run` starts a
fresh, empty worker (`Execution.restarted`); `CodeEnvironment` ends the
episode instead by default.
"""

import abc
import dataclasses
from collections.abc import Callable
from typing import Any


OK = "ok"  # ran to the end
ERROR = "error"  # raised an exception (in Execution.exception)
TIMEOUT = "timeout"  # ran past the wall or CPU limit; the worker was killed
MEMORY = "memory"  # MemoryError (the address-space limit)
OUTPUT_LIMIT = "output_limit"  # output over the cap (truncated) or file limit
KILLED = "killed"  # the worker died (a signal, a crash, a broken protocol)
STATUSES = (OK, ERROR, TIMEOUT, MEMORY, OUTPUT_LIMIT, KILLED)
# Statuses after which the worker's state is gone.
STATE_LOST = (TIMEOUT, KILLED)

@dataclasses.dataclass(frozen=True)
class Limits:
  """What one sandbox may use.

  Attributes:
    wall_seconds: wall-clock time of one `run` (enforced by the parent).
    cpu_seconds: CPU time of each process of the episode (RLIMIT_CPU; the
      worker's budget for the whole episode).
    memory_bytes: address space of each process (RLIMIT_AS).
    processes: processes and threads of the sandbox's uid (RLIMIT_NPROC;
      applies only where the sandbox runs as its own uid, i.e. as root).
    file_bytes: the largest file it may write (RLIMIT_FSIZE), output files
      included.
    output_chars: stdout, stderr and the exception are each cut to this.
    tmp_bytes: size of each private tmpfs (/tmp, the working directory).
    open_files: file descriptors (RLIMIT_NOFILE).
    start_seconds: time allowed for the worker to start.
  """

  wall_seconds: float = 5.0
  cpu_seconds: int = 20
  memory_bytes: int = 512 * 2**20
  processes: int = 16
  file_bytes: int = 4 * 2**20
  output_chars: int = 2000
  tmp_bytes: int = 32 * 2**20
  open_files: int = 64
  start_seconds: float = 10.0

  def __post_init__(self):
    if self.wall_seconds <= 0 or self.start_seconds <= 0:
      raise ValueError("wall_seconds and start_seconds must be > 0.")
    if self.cpu_seconds < 1 or self.processes < 3 or self.open_files < 16:
      raise ValueError("Need cpu_seconds >= 1, processes >= 3 (keeper, init, "
                       "worker) and open_files >= 16.")
    if self.memory_bytes < 64 * 2**20:
      raise ValueError("memory_bytes below 64 MiB cannot start Python.")
    if self.output_chars < 1 or self.file_bytes < self.output_chars:
      raise ValueError("Need 1 <= output_chars <= file_bytes.")


@dataclasses.dataclass(frozen=True)
class Execution:
  """The result of one `Sandbox.run`.

  Attributes:
    stdout, stderr: the run's output, each cut to `Limits.output_chars`.
    exception: the exception's last line(s), "" when none.
    status: one of `STATUSES`.
    seconds: wall time of the run, as the parent measured it.
    truncated: some output was cut.
    restarted: this run started a fresh worker after the last one died (the
      episode's earlier state is gone).
  """

  stdout: str = ""
  stderr: str = ""
  exception: str = ""
  status: str = OK
  seconds: float = 0.0
  truncated: bool = False
  restarted: bool = False


# An `api` answers the code's `_rpc(name, *args, **kwargs)` calls (JSON in,
# JSON out); what it raises is raised in the code as RuntimeError(str).
Api = Callable[[str, list, dict], Any]


class SandboxError(RuntimeError):
  """The sandbox itself failed (e.g. the worker could not start)."""


class Sandbox(abc.ABC):
  """Runs one episode's code; state persists across `run` calls."""

  @abc.abstractmethod
  def run(self, code: str, api: Api | None = None) -> Execution:
    """Runs `code`; returns within the wall limit whatever the code does."""

  @abc.abstractmethod
  def close(self) -> None:
    """Kills everything the episode started and removes its files."""

  def start(self) -> None:
    """Starts ahead of the first `run` (optional; `run` starts as needed)."""

  @property
  def info(self) -> dict[str, Any]:
    """Facts for the run metadata (e.g. `network_isolated`)."""
    return {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
