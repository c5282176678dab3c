"""The launch scripts: syntax, argument checks and their dry-run commands.

Nothing here needs gcloud, SLURM or an accelerator: ENTROPO_DRY_RUN=1 makes
the scripts print what they would run, `scontrol` is a fake on PATH, and
the one real run executes a fake Python that reports what it was given.
"""

import os
import pathlib
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ("_common.sh", "run_host.sh", "tpu_pod.sh", "gpu_multinode.sh",
           "slurm.sbatch", "slurm_task.sh")
ARGS = ("--config=experiments/configs/countdown.py:dapo+repo_r",
        "--workdir=/shared/runs/a b", "--config.mesh.fsdp=8")


def _run(script, *args, env=None, path=None):
  """Runs a launch script with only `env` (and a minimal PATH) set."""
  base = {"PATH": os.pathsep.join(filter(None, [
      str(path) if path else None, "/usr/local/bin", "/usr/bin", "/bin"])),
      "HOME": os.environ.get("HOME", "/tmp")}
  return subprocess.run(["bash", str(LAUNCH / script), *args],
                        env={**base, **(env or {})}, capture_output=True,
                        text=True, timeout=30, check=False)


def _exports(stdout):
  """`{NAME: value}` of the `export NAME=value` lines of a dry run."""
  out = {}
  for line in stdout.splitlines():
    if line.startswith("export "):
      name, value = line[len("export "):].split("=", 1)
      out[name] = shlex.split(value)[0] if value else ""
  return out


def _command(stdout):
  """The last line of a dry run, split as the shell would."""
  return shlex.split(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
  result = subprocess.run(["bash", "-n", str(LAUNCH / script)],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS[1:])
def test_scripts_are_strict_and_executable(script):
  text = (LAUNCH / script).read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "set -euo pipefail" in text
  assert os.access(LAUNCH / script, os.X_OK)


@pytest.mark.parametrize("script, env, missing", [
    ("run_host.sh", {}, ["--workdir"]),
    ("run_host.sh", {"ENTROPO_NUM_PROCESSES": "2"},
     ["ENTROPO_COORDINATOR_ADDRESS is not set",
      "ENTROPO_PROCESS_ID is not set"]),
    ("tpu_pod.sh", {}, ["TPU_NAME is not set", "ZONE is not set"]),
    ("tpu_pod.sh", {"TPU_NAME": "t"}, ["ZONE is not set"]),
    ("gpu_multinode.sh", {"ENTROPO_PROCESS_ID": "0"},
     ["ENTROPO_COORDINATOR_ADDRESS is not set",
      "ENTROPO_NUM_PROCESSES is not set"]),
    ("slurm.sbatch", {}, ["SLURM_JOB_ID is not set",
                          "SLURM_JOB_NODELIST is not set"]),
    ("slurm_task.sh", {"SLURM_NTASKS": "2"},
     ["ENTROPO_COORDINATOR_ADDRESS is not set", "SLURM_PROCID is not set",
      "SLURM_LOCALID is not set"]),
])
def test_missing_settings_are_named_and_explained(script, env, missing):
  args = ARGS if script != "run_host.sh" or "--workdir" not in missing else ()
  result = _run(script, *args, env={"ENTROPO_PLATFORM": "cpu", **env})
  assert result.returncode == 2
  assert result.stdout == ""
  for text in missing:
    assert text in result.stderr
  assert "e.g. " in result.stderr and "launch/README.md" in result.stderr


@pytest.mark.parametrize("env, message", [
    ({"ENTROPO_COORDINATOR_ADDRESS": "node0", "ENTROPO_NUM_PROCESSES": "2",
      "ENTROPO_PROCESS_ID": "0"}, "is not host:port"),
    ({"ENTROPO_COORDINATOR_ADDRESS": "node0:1", "ENTROPO_NUM_PROCESSES": "2",
      "ENTROPO_PROCESS_ID": "2"}, "ENTROPO_PROCESS_ID=2 is not below"),
    ({"ENTROPO_COORDINATOR_ADDRESS": "node0:1", "ENTROPO_NUM_PROCESSES": "x",
      "ENTROPO_PROCESS_ID": "0"}, "ENTROPO_NUM_PROCESSES=x is not an integer"),
    ({"ENTROPO_DISTRIBUTED": "yes"},
     "ENTROPO_DISTRIBUTED=yes is not supported"),
    ({"ENTROPO_DISTRIBUTED": "auto", "ENTROPO_NUM_PROCESSES": "2"},
     "choose one"),
    ({"ENTROPO_LOCAL_DEVICE_IDS": "0;1"}, "not a comma-separated list"),
    ({"ENTROPO_PLATFORM": "rocm"}, "ENTROPO_PLATFORM=rocm is not supported"),
])
def test_malformed_settings_are_rejected(env, message):
  result = _run("run_host.sh", *ARGS, env={"ENTROPO_PLATFORM": "cpu", **env})
  assert result.returncode == 2 and message in result.stderr


def test_run_host_dry_run_on_gpu_sets_the_contract_and_xla_flags():
  env = {"ENTROPO_DRY_RUN": "1", "ENTROPO_PLATFORM": "gpu",
         "ENTROPO_COORDINATOR_ADDRESS": "node-0:12345",
         "ENTROPO_NUM_PROCESSES": "2", "ENTROPO_PROCESS_ID": "1",
         "ENTROPO_LOCAL_DEVICE_IDS": "0,1", "XLA_FLAGS": "--xla_dump_to=/d"}
  result = _run("run_host.sh", *ARGS, env=env)
  assert result.returncode == 0, result.stderr
  exports = _exports(result.stdout)
  for name in ("ENTROPO_COORDINATOR_ADDRESS", "ENTROPO_NUM_PROCESSES",
               "ENTROPO_PROCESS_ID", "ENTROPO_LOCAL_DEVICE_IDS"):
    assert exports[name] == env[name]
  # The user's XLA flags come last, so they win over the defaults.
  assert exports["XLA_FLAGS"] == (
      "--xla_gpu_enable_latency_hiding_scheduler=true --xla_dump_to=/d")
  assert exports["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
  assert exports["JAX_PLATFORMS"] == "cuda"
  assert f"cd {ROOT}" in result.stdout
  assert _command(result.stdout) == ["python3", "-m", "experiments.main",
                                     *ARGS]


def test_run_host_dry_run_on_tpu_leaves_libtpu_and_xla_alone():
  result = _run("run_host.sh", *ARGS, env={
      "ENTROPO_DRY_RUN": "1", "ENTROPO_PLATFORM": "tpu",
      "ENTROPO_DISTRIBUTED": "auto"})
  assert result.returncode == 0, result.stderr
  exports = _exports(result.stdout)
  assert exports == {"ENTROPO_DISTRIBUTED": "auto", "JAX_PLATFORMS": "tpu"}
  gpu_off = _run("run_host.sh", *ARGS, env={
      "ENTROPO_DRY_RUN": "1", "ENTROPO_PLATFORM": "gpu",
      "ENTROPO_XLA_DEFAULTS": "0", "JAX_PLATFORMS": "cuda,cpu"})
  assert _exports(gpu_off.stdout) == {"JAX_PLATFORMS": "cuda,cpu"}


def test_run_host_runs_the_main_module_from_the_repository(tmp_path):
  fake = tmp_path / "python"
  fake.write_text('#!/usr/bin/env bash\necho "cwd=$PWD"\n'
                  'echo "id=$ENTROPO_PROCESS_ID"\nprintf "arg=%s\\n" "$@"\n')
  fake.chmod(0o755)
  result = _run("run_host.sh", *ARGS, env={
      "ENTROPO_PYTHON": str(fake), "ENTROPO_PLATFORM": "cpu",
      "ENTROPO_COORDINATOR_ADDRESS": "localhost:1234",
      "ENTROPO_NUM_PROCESSES": "2", "ENTROPO_PROCESS_ID": "0"})
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      f"cwd={ROOT}", "id=0", "arg=-m", "arg=experiments.main",
      *(f"arg={a}" for a in ARGS)]
  assert "process 0/2" in result.stderr


def test_gpu_multinode_passes_the_explicit_contract():
  env = {"ENTROPO_DRY_RUN": "1", "ENTROPO_COORDINATOR_ADDRESS": "10.0.0.2:9",
         "ENTROPO_NUM_PROCESSES": "4", "ENTROPO_PROCESS_ID": "3"}
  result = _run("gpu_multinode.sh", *ARGS, env=env)
  assert result.returncode == 0, result.stderr
  exports = _exports(result.stdout)
  for name in ("ENTROPO_COORDINATOR_ADDRESS", "ENTROPO_NUM_PROCESSES",
               "ENTROPO_PROCESS_ID"):
    assert exports[name] == env[name]
  assert exports["JAX_PLATFORMS"] == "cuda"
  assert _command(result.stdout)[3:] == list(ARGS)
  auto = _run("gpu_multinode.sh", *ARGS, env={**env,
                                              "ENTROPO_DISTRIBUTED": "auto"})
  assert auto.returncode == 2 and "ENTROPO_DISTRIBUTED" in auto.stderr


def test_tpu_pod_runs_run_host_on_every_worker_with_auto_detection():
  result = _run("tpu_pod.sh", *ARGS, env={
      "ENTROPO_DRY_RUN": "1", "TPU_NAME": "my-v5p-16", "ZONE": "us-east5-a"})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1  # no copy unless asked
  command = shlex.split(lines[0])
  assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh",
                         "my-v5p-16"]
  assert "--zone=us-east5-a" in command and "--worker=all" in command
  remote = [c for c in command if c.startswith("--command=")]
  assert len(remote) == 1
  steps = remote[0][len("--command="):].split(" && ")
  assert steps[0] == "cd entropo"
  assert shlex.split(steps[1]) == [
      "env", "ENTROPO_DISTRIBUTED=auto", "ENTROPO_PLATFORM=tpu", "bash",
      "launch/run_host.sh", *ARGS]


def test_tpu_pod_copies_installs_and_forwards_when_asked():
  result = _run("tpu_pod.sh", *ARGS, env={
      "ENTROPO_DRY_RUN": "1", "TPU_NAME": "pod", "ZONE": "z",
      "PROJECT": "proj", "ENTROPO_COPY_REPO": "1", "ENTROPO_INSTALL": "1",
      "ENTROPO_REMOTE_DIR": "src/entropo",
      "ENTROPO_FORWARD_ENV": "JAX_COMPILATION_CACHE_DIR NOT_SET",
      "JAX_COMPILATION_CACHE_DIR": "/cache dir"})
  assert result.returncode == 0, result.stderr
  tar, scp, unpack, run = map(shlex.split, result.stdout.strip().splitlines())
  assert tar[:3] == ["tar", "-C", str(ROOT)] and "--exclude=./.git" in tar
  assert scp[4:7] == ["scp", "/tmp/entropo-pod.tar.gz", "pod:entropo.tar.gz"]
  for command in (scp, unpack, run):
    assert {"--zone=z", "--worker=all", "--project=proj"} <= set(command)
  assert "tar -xzf entropo.tar.gz -C src/entropo" in unpack[-1]
  steps = run[-1][len("--command="):].split(" && ")
  assert steps[:2] == ["cd src/entropo",
                       "python3 -m pip install --quiet -e . 'jax[tpu]'"]
  assert shlex.split(steps[2])[:4] == [
      "env", "JAX_COMPILATION_CACHE_DIR=/cache dir",
      "ENTROPO_DISTRIBUTED=auto", "ENTROPO_PLATFORM=tpu"]


def _fake_scontrol(tmp_path):
  """An `scontrol show hostnames` that expands `gpu[001-002]`."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "scontrol"
  fake.write_text(
      '#!/usr/bin/env bash\n'
      '[[ "$1 $2 $3" == "show hostnames gpu[001-002]" ]] || exit 1\n'
      'printf "gpu001\\ngpu002\\n"\n')
  fake.chmod(0o755)
  return bin_dir


def test_slurm_batch_takes_the_first_host_as_coordinator(tmp_path):
  env = {"ENTROPO_DRY_RUN": "1", "SLURM_JOB_ID": "4242",
         "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "2",
         "SLURM_SUBMIT_DIR": str(ROOT), "ENTROPO_SRUN_ARGS": "--mpi=none"}
  result = _run("slurm.sbatch", *ARGS, env=env, path=_fake_scontrol(tmp_path))
  assert result.returncode == 0, result.stderr
  # The port comes from the job id: 10000 + 4242.
  assert _exports(result.stdout) == {
      "ENTROPO_COORDINATOR_ADDRESS": "gpu001:14242"}
  assert _command(result.stdout) == [
      "srun", "--kill-on-bad-exit=1", "--mpi=none", "bash",
      str(LAUNCH / "slurm_task.sh"), *ARGS]
  port = _run("slurm.sbatch", *ARGS, env={**env,
                                          "ENTROPO_COORDINATOR_PORT": "777"},
              path=tmp_path / "bin")
  assert "gpu001:777" in port.stdout
  missing = _run("slurm.sbatch", *ARGS, env=env)  # no scontrol on PATH
  assert missing.returncode == 2 and "scontrol is not on PATH" in missing.stderr


@pytest.mark.parametrize("per_node, visible, local_ids", [
    ("1", "0,1,2,3,4,5,6,7", None),  # one task per node: all its GPUs
    ("8(x2)", "0,1,2,3,4,5,6,7", "3"),  # one per GPU, all visible
    ("8(x2)", "3", None),  # --gpus-per-task=1: SLURM hid the others
])
def test_slurm_task_maps_slurm_variables(per_node, visible, local_ids):
  result = _run("slurm_task.sh", *ARGS, env={
      "ENTROPO_DRY_RUN": "1", "ENTROPO_PLATFORM": "gpu",
      "ENTROPO_COORDINATOR_ADDRESS": "gpu001:14242", "SLURM_NTASKS": "16",
      "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
      "SLURM_TASKS_PER_NODE": per_node, "CUDA_VISIBLE_DEVICES": visible})
  assert result.returncode == 0, result.stderr
  exports = _exports(result.stdout)
  assert exports["ENTROPO_COORDINATOR_ADDRESS"] == "gpu001:14242"
  assert exports["ENTROPO_NUM_PROCESSES"] == "16"
  assert exports["ENTROPO_PROCESS_ID"] == "11"
  assert exports.get("ENTROPO_LOCAL_DEVICE_IDS") == local_ids
  assert _command(result.stdout)[3:] == list(ARGS)


def test_readme_names_every_script_and_variable():
  readme = (LAUNCH / "README.md").read_text()
  for name in SCRIPTS[1:] + (
      "ENTROPO_COORDINATOR_ADDRESS", "ENTROPO_NUM_PROCESSES",
      "ENTROPO_PROCESS_ID", "ENTROPO_LOCAL_DEVICE_IDS", "ENTROPO_DISTRIBUTED",
      "ENTROPO_DRY_RUN", "--config.mesh.data", "--config.mesh.fsdp",
      "--config.mesh.tensor"):
    assert name in readme, name
