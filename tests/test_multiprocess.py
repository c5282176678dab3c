"""Multi-process training: two local processes train exactly as one does.

`test_two_processes_train_like_one` launches `python -m experiments.main`
twice on this machine, over loopback with gloo CPU collectives (processes
0 and 1, 4 virtual CPU devices each, one mesh of 8: data 2 x fsdp 2 x
tensor 2, data across the processes), for 3 iterations of DAPO + REPO-R
with dynamic sampling and 2 minibatches (tests/multiprocess_config.py).
Then this process (8 devices) runs the same config alone, from the same
warm start and data, and the two runs must agree: the same rewards,
verdicts and dynamic-sampling draws, the same losses and metrics, and the
same final parameters (restored from each run's Orbax checkpoint).

Tolerance: both runs compile the same partitioned program; only the
cross-process all-reduces differ (gloo between two processes vs XLA's
in-process CPU collectives), which may add partial sums in another order.
That moves float32 results by a few ulps: measured, the final parameters
were bit-equal and the metrics differed by at most 6e-8 (the loss by
~1e-6 relative, the batch means of advantages and ratios by ~1e-8
absolute). Floats are compared with rtol 1e-5 and atol 1e-6, well above
that noise; anything discrete (rewards, verdicts, draws, pass@k counts,
lengths) must be equal. A process that scored, sampled or resampled other
rows would change those, and the losses by far more.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from entropo import sharding
from entropo.training import Trainer
from entropo.training import distributed
from entropo.training import train
from entropo.training import validate
from entropo.training import logger as logger_lib
from tests import multiprocess_config
from tests.training_setup import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
RTOL, ATOL = 1e-5, 1e-6
# Equal in both runs whatever the summation order: decisions and counts.
EXACT = ("iteration", "reward/", "reason/", "dynamic/", "completion/",
         "eval/pass@", "eval/length")
VOLATILE = ("time/", "throughput/")


# ------------------------------------------------ the launch environment


def _env(**variables):
  return {k: str(v) for k, v in variables.items()}


@pytest.mark.parametrize("variables,expected", [
    ({}, None),
    (_env(ENTROPO_NUM_PROCESSES=1), None),
    (_env(ENTROPO_NUM_PROCESSES=1, ENTROPO_PROCESS_ID=0), None),
    (_env(ENTROPO_COORDINATOR_ADDRESS="10.0.0.1:1234",
          ENTROPO_NUM_PROCESSES=4, ENTROPO_PROCESS_ID=3),
     dict(coordinator_address="10.0.0.1:1234", num_processes=4,
          process_id=3)),
    (_env(ENTROPO_COORDINATOR_ADDRESS="host:99", ENTROPO_NUM_PROCESSES=2,
          ENTROPO_PROCESS_ID=0, ENTROPO_LOCAL_DEVICE_IDS="0,1"),
     dict(coordinator_address="host:99", num_processes=2, process_id=0,
          local_device_ids=[0, 1])),
    (_env(ENTROPO_DISTRIBUTED="auto"), {}),
    (_env(ENTROPO_DISTRIBUTED="auto", ENTROPO_LOCAL_DEVICE_IDS="2"),
     dict(local_device_ids=[2])),
    (_env(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234"), {}),
    (_env(ENTROPO_NUM_PROCESSES="", ENTROPO_DISTRIBUTED=" "), None),
])
def test_settings_from_env(variables, expected):
  assert distributed.settings_from_env(variables) == expected


@pytest.mark.parametrize("variables,match", [
    (_env(ENTROPO_NUM_PROCESSES=2), "ENTROPO_COORDINATOR_ADDRESS is not set"),
    (_env(ENTROPO_NUM_PROCESSES=2, ENTROPO_COORDINATOR_ADDRESS="h:1"),
     "ENTROPO_PROCESS_ID is not set"),
    (_env(ENTROPO_COORDINATOR_ADDRESS="h:1", ENTROPO_PROCESS_ID=0),
     "ENTROPO_NUM_PROCESSES is not set"),
    (_env(ENTROPO_PROCESS_ID=1), "ENTROPO_NUM_PROCESSES is not set"),
    (_env(ENTROPO_LOCAL_DEVICE_IDS="0,1"), "ENTROPO_LOCAL_DEVICE_IDS is set "
     "but no multi-process run is"),
    (_env(ENTROPO_NUM_PROCESSES="two"),
     "ENTROPO_NUM_PROCESSES must be an int >= 1; got 'two'"),
    (_env(ENTROPO_NUM_PROCESSES=0), "ENTROPO_NUM_PROCESSES must be an int"),
    (_env(ENTROPO_NUM_PROCESSES=2, ENTROPO_COORDINATOR_ADDRESS="h:1",
          ENTROPO_PROCESS_ID=2),
     "ENTROPO_PROCESS_ID=2 must be < ENTROPO_NUM_PROCESSES=2"),
    (_env(ENTROPO_NUM_PROCESSES=2, ENTROPO_COORDINATOR_ADDRESS="h:1",
          ENTROPO_PROCESS_ID=-1), "ENTROPO_PROCESS_ID must be an int >= 0"),
    (_env(ENTROPO_NUM_PROCESSES=2, ENTROPO_COORDINATOR_ADDRESS="localhost",
          ENTROPO_PROCESS_ID=0), "ENTROPO_COORDINATOR_ADDRESS must be "
     "host:port"),
    (_env(ENTROPO_NUM_PROCESSES=2, ENTROPO_COORDINATOR_ADDRESS="h:1",
          ENTROPO_PROCESS_ID=0, ENTROPO_LOCAL_DEVICE_IDS="0;1"),
     "ENTROPO_LOCAL_DEVICE_IDS must be comma-separated"),
    (_env(ENTROPO_DISTRIBUTED="yes"), "ENTROPO_DISTRIBUTED must be 'auto'"),
    (_env(ENTROPO_DISTRIBUTED="auto", ENTROPO_NUM_PROCESSES=2),
     "unset ENTROPO_NUM_PROCESSES or ENTROPO_DISTRIBUTED"),
])
def test_bad_launch_environment_names_the_variable(variables, match):
  with pytest.raises(ValueError, match=match):
    distributed.settings_from_env(variables)
  with pytest.raises(ValueError, match=match):  # before starting anything
    distributed.initialize_from_env(variables)


def test_single_process_environment_starts_nothing():
  assert not distributed.initialize_from_env({})
  assert jax.process_count() == 1


def test_launcher_rejects_a_bad_launch_environment(tmp_path):
  env = {**os.environ, "ENTROPO_NUM_PROCESSES": "2"}
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=tests/multiprocess_config.py", f"--workdir={tmp_path}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert proc.returncode != 0
  assert "ENTROPO_COORDINATOR_ADDRESS is not set" in proc.stderr
  assert not list(tmp_path.iterdir())


@pytest.mark.multidevice
def test_configs_that_do_not_split_over_processes(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  c = tiny_config(mesh=dict(tensor=8))
  validate(c)
  c.sampling.prompts_per_batch = 3
  with pytest.raises(ValueError, match="sampling.prompts_per_batch: 3 "
                     "prompts do not split over 2 processes"):
    validate(c)
  c = tiny_config(mesh=dict(data=4))
  with pytest.raises(ValueError, match="mesh: a run of 2 processes uses "
                     "all 8 devices"):
    validate(c)


@pytest.mark.multidevice
def test_process_row_helpers_with_one_process():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  local = np.arange(24).reshape(8, 3)
  assert sharding.process_rows(mesh, 8) == slice(0, 8)
  x = sharding.from_process_rows(mesh, local, 8)
  assert x.sharding.spec == sharding.batch_sharding(mesh).spec
  assert len(x.addressable_shards) == 8
  np.testing.assert_array_equal(sharding.local_rows(x), local)
  np.testing.assert_array_equal(sharding.to_host(x), local)


# ------------------------------------------------------ a real 2-process run


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_two_processes(workdir, log_dir) -> None:
  """Runs experiments.main as processes 0 and 1; raises with their logs."""
  port = _free_port()
  # os.environ holds the compilation cache this session uses (conftest).
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("ENTROPO_", "JAX_COORDINATOR"))}
  base.update(
      # 4 devices per process; the other flags as in this session.
      XLA_FLAGS=" ".join(
          [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
          + ["--xla_force_host_platform_device_count=4"]),
      JAX_PLATFORMS="cpu",
      PYTHONPATH=os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")]),
      ENTROPO_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      ENTROPO_NUM_PROCESSES="2")
  procs, logs = [], []
  for i in range(2):
    logs.append(open(log_dir / f"process_{i}.log", "w+"))  # noqa: SIM115
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "experiments.main",
         "--config=tests/multiprocess_config.py", f"--workdir={workdir}"],
        cwd=ROOT, env={**base, "ENTROPO_PROCESS_ID": str(i)},
        stdout=logs[-1], stderr=subprocess.STDOUT))
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for proc in procs:
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  codes = [proc.returncode for proc in procs]
  if codes != [0, 0]:
    report = []
    for i, log in enumerate(logs):
      log.seek(0)
      lines = [line for line in log.read().splitlines()
               if not line.startswith(("I", "W")) or "Error" in line]
      report.append(f"--- process {i} (exit {codes[i]}):\n"
                    + "\n".join(lines[-60:]))
    pytest.fail("The 2-process run failed (or ran past "
                f"{TIMEOUT_S} s):\n" + "\n".join(report))
  for log in logs:
    log.close()


def _stable(record):
  return {k: v for k, v in record.items() if not k.startswith(VOLATILE)}


@pytest.mark.multidevice
@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  _launch_two_processes(multi, tmp_path)
  # Only process 0 wrote the files of the run; the data set and the warm
  # start were written by process 0 while process 1 waited.
  records = logger_lib.read_jsonl(multi / "metrics.jsonl")
  assert [r["iteration"] for r in records] == [0, 1, 2]
  for name in ("baseline.json", "config.json", "warm_start/config.json"):
    assert (multi / name).is_file(), name

  c = multiprocess_config.get_config("dapo+repo_r")
  c.model.init_from = str(multi / "warm_start")
  c.data.data_dir = str(multi / "data")
  train(c, single)
  expected = logger_lib.read_jsonl(single / "metrics.jsonl")
  assert any(0 < r["dynamic/kept_fraction"] < 1 or r["dynamic/draws"] > 1
             for r in expected)  # dynamic sampling really chose groups
  assert len(records) == len(expected)
  for got, want in zip(map(_stable, records), map(_stable, expected)):
    assert got.keys() == want.keys()
    for key in want:
      if key.startswith(EXACT):
        assert got[key] == want[key], (got["iteration"], key)
      else:
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL,
                                   atol=ATOL, err_msg=key)

  # Both checkpoints restore here, into the same 8-device mesh.
  a = Trainer(c, multi)
  b = Trainer(c, single)
  assert a.meta.iteration == b.meta.iteration == 3
  assert a.meta.data_state == b.meta.data_state
  for x, y in zip(jax.tree.leaves(a.state.params),
                  jax.tree.leaves(b.state.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL,
                               atol=ATOL)
