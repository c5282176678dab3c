"""Multi-process runs: starting JAX's distributed runtime from the environment.

Launch scripts describe a run with environment variables; every process of
a run calls `initialize_from_env()` before anything else touches JAX:

* `ENTROPO_COORDINATOR_ADDRESS=host:port`, `ENTROPO_NUM_PROCESSES=N`,
  `ENTROPO_PROCESS_ID=i` (and optionally `ENTROPO_LOCAL_DEVICE_IDS=0,1,...`):
  `jax.distributed.initialize(coordinator_address=..., num_processes=N,
  process_id=i)`, e.g. N local processes over loopback;
* `ENTROPO_DISTRIBUTED=auto`, or JAX's own `JAX_COORDINATOR_ADDRESS`:
  `jax.distributed.initialize()`, which detects the cluster itself (Cloud
  TPU pods, SLURM, Open MPI, ...), with `ENTROPO_LOCAL_DEVICE_IDS` if set;
* none of these (or `ENTROPO_NUM_PROCESSES=1` alone): a single process;
  nothing to do.

With more than one process on the CPU platform the processes exchange data
with gloo collectives over TCP (set before the runtime starts). A missing or
inconsistent variable raises `ValueError` naming it, before any process
waits for the others.

`on_primary_first` is for work whose result lands on the shared filesystem
(a prepared data set, a warm start): process 0 does it while the others
wait, then the others find it done, so no two processes write the same
files.
"""

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
from jax.experimental import multihost_utils

T = TypeVar("T")

COORDINATOR = "ENTROPO_COORDINATOR_ADDRESS"
NUM_PROCESSES = "ENTROPO_NUM_PROCESSES"
PROCESS_ID = "ENTROPO_PROCESS_ID"
LOCAL_DEVICE_IDS = "ENTROPO_LOCAL_DEVICE_IDS"
DISTRIBUTED = "ENTROPO_DISTRIBUTED"
EXPLICIT = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)


def _int(environ: Mapping[str, str], name: str, low: int) -> int:
  text = environ[name].strip()
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is None or value < low:
    raise ValueError(f"{name} must be an int >= {low}; got {text!r}.")
  return value


def settings_from_env(environ: Mapping[str, str] | None = None
                      ) -> dict[str, Any] | None:
  """The `jax.distributed.initialize` arguments the environment asks for.

  Args:
    environ: the environment (default `os.environ`).

  Returns:
    None for a single process; for JAX's auto-detection `{}`; else
    `coordinator_address`, `num_processes` and `process_id`; plus
    `local_device_ids` when `ENTROPO_LOCAL_DEVICE_IDS` is set.

  Raises:
    ValueError: a malformed or missing variable, or a mix of the explicit
      and the auto-detected contract, naming the variable.
  """
  env = {k: v for k, v in (os.environ if environ is None else environ
                           ).items() if v.strip()}
  explicit = [name for name in EXPLICIT if name in env]
  ids = _device_ids(env) if LOCAL_DEVICE_IDS in env else None
  if DISTRIBUTED in env:
    if env[DISTRIBUTED].strip() != "auto":
      raise ValueError(f"{DISTRIBUTED} must be 'auto' (JAX detects the "
                       f"cluster) or unset; got {env[DISTRIBUTED]!r}.")
    if explicit:
      raise ValueError(f"{DISTRIBUTED}=auto lets JAX detect the cluster; "
                       f"unset {', '.join(explicit)} or {DISTRIBUTED}.")
    settings = {}
  elif explicit:
    settings = _explicit_settings(env, explicit)
  else:
    settings = {} if "JAX_COORDINATOR_ADDRESS" in env else None
  if ids is not None:
    if settings is None:
      raise ValueError(f"{LOCAL_DEVICE_IDS} is set but no multi-process run "
                       f"is: set {', '.join(EXPLICIT)}, or {DISTRIBUTED}"
                       f"=auto.")
    settings["local_device_ids"] = ids
  return settings


def _explicit_settings(env: Mapping[str, str], given: list[str]
                       ) -> dict[str, Any] | None:
  """The arguments of the explicit contract (None: one process)."""
  if NUM_PROCESSES not in env:
    raise ValueError(f"{NUM_PROCESSES} is not set; {', '.join(given)} "
                     f"need it: set the number of processes of the run.")
  num_processes = _int(env, NUM_PROCESSES, 1)
  if PROCESS_ID in env and _int(env, PROCESS_ID, 0) >= num_processes:
    raise ValueError(f"{PROCESS_ID}={env[PROCESS_ID].strip()} must be < "
                     f"{NUM_PROCESSES}={num_processes}.")
  if num_processes == 1 and COORDINATOR not in env:
    return None  # a single process
  for name in (COORDINATOR, PROCESS_ID):
    if name not in env:
      raise ValueError(f"{name} is not set; a run of {NUM_PROCESSES}="
                       f"{num_processes} processes needs {COORDINATOR}="
                       f"host:port and {PROCESS_ID} in [0, {num_processes}).")
  address = env[COORDINATOR].strip()
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"{COORDINATOR} must be host:port (e.g. "
                     f"10.0.0.1:1234); got {address!r}.")
  return dict(coordinator_address=address, num_processes=num_processes,
              process_id=_int(env, PROCESS_ID, 0))


def _device_ids(env: Mapping[str, str]) -> list[int]:
  text = env[LOCAL_DEVICE_IDS].strip()
  try:
    ids = [int(i) for i in text.split(",")]
  except ValueError:
    ids = []
  if not ids or min(ids) < 0:
    raise ValueError(f"{LOCAL_DEVICE_IDS} must be comma-separated device ids "
                     f">= 0 (e.g. 0,1,2,3); got {text!r}.")
  return ids


def _may_use_cpu() -> bool:
  platforms = jax.config.jax_platforms
  return not platforms or "cpu" in platforms.split(",")


def initialize_from_env(environ: Mapping[str, str] | None = None) -> bool:
  """Starts JAX's distributed runtime if the environment describes a run.

  Must run before any JAX computation. A second call, once the runtime is
  up, does nothing.

  Args:
    environ: the environment (default `os.environ`); see the module
      docstring for the variables.

  Returns:
    Whether the distributed runtime was started (now or before).

  Raises:
    ValueError: see `settings_from_env`.
  """
  settings = settings_from_env(environ)
  if settings is None:
    return False
  if jax.distributed.is_initialized():
    return True
  if _may_use_cpu() and settings.get("num_processes") != 1:
    # Cross-process collectives of the CPU backend (loopback tests, CPU
    # clusters); the accelerators' backends bring their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**settings)
  return True


def on_primary_first(name: str, fn: Callable[..., T], *args, **kwargs) -> T:
  """Runs `fn(*args, **kwargs)` on process 0, then on the other processes.

  The others wait at a barrier (`name`) until process 0 is done, then run
  `fn` themselves: for functions that reuse what is already on the shared
  filesystem (a prepared data set, a warm-start directory), so only process
  0 ever writes it. With one process, just calls `fn`.
  """
  if jax.process_count() == 1:
    return fn(*args, **kwargs)
  if jax.process_index() == 0:
    result = fn(*args, **kwargs)
    multihost_utils.sync_global_devices(f"entropo: {name}")
    return result
  multihost_utils.sync_global_devices(f"entropo: {name}")
  return fn(*args, **kwargs)
