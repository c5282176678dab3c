#!/usr/bin/env bash
# Runs entropo's main job on this host: one process, all local accelerators.
#
#   launch/run_host.sh --config=experiments/configs/countdown.py \
#       --workdir=/tmp/entropo/run [--config.mesh.fsdp=8 ...]
#
# The arguments go to `python -m experiments.main` unchanged. The other
# launchers (tpu_pod.sh, gpu_multinode.sh, slurm.sbatch) end here on every
# host, with the ENTROPO_* multi-process variables set:
#
#   ENTROPO_COORDINATOR_ADDRESS=host:port, ENTROPO_NUM_PROCESSES=N,
#   ENTROPO_PROCESS_ID=i [, ENTROPO_LOCAL_DEVICE_IDS=0,1,...]
#       -> jax.distributed.initialize(...) with these values;
#   ENTROPO_DISTRIBUTED=auto
#       -> jax.distributed.initialize() detects the cluster (TPU pods).
#   none of them: a single process.
#
# Other settings:
#   ENTROPO_PLATFORM  tpu | gpu | cpu (default: detected from /dev/accel*,
#                     /dev/vfio, /dev/nvidia0 or nvidia-smi). It sets
#                     JAX_PLATFORMS (unless set) so that a missing
#                     accelerator fails loudly instead of falling back to CPU,
#                     and the platform's XLA flags below.
#   ENTROPO_XLA_DEFAULTS=0  leave XLA_FLAGS and the GPU memory fraction alone.
#   ENTROPO_PYTHON    the interpreter (default: python3).
#   ENTROPO_DRY_RUN=1 print the environment and command instead of running.
#
# Platform settings (yours win: XLA_FLAGS you set come after ours, and a
# memory fraction you set is kept):
#   gpu: --xla_gpu_enable_latency_hiding_scheduler=true, so XLA overlaps the
#        fsdp all-gathers and reduce-scatters with compute;
#        XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 (JAX's default preallocates 75 %;
#        docs/scaling.md budgets 90 %, leaving the rest to NCCL and cuBLAS).
#   tpu: nothing. libtpu already schedules collectives with its latency-
#        hiding scheduler, and its tuning flags (LIBTPU_INIT_ARGS) are
#        version- and model-specific; set them yourself after measuring.
#   cpu: nothing (multi-process CPU runs use gloo, set up in Python).
set -euo pipefail

ENTROPO_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/_common.sh
source "$ENTROPO_LAUNCH_DIR/_common.sh"
REPO="$(cd "$ENTROPO_LAUNCH_DIR/.." && pwd)"

detect_platform() {
  if compgen -G "/dev/accel*" >/dev/null || compgen -G "/dev/vfio/[0-9]*" >/dev/null; then
    echo tpu
  elif [[ -e /dev/nvidia0 ]] || command -v nvidia-smi >/dev/null 2>&1; then
    echo gpu
  else
    echo cpu
  fi
}

platform="${ENTROPO_PLATFORM:-$(detect_platform)}"
case "$platform" in
  tpu | gpu | cpu) ;;
  *) entropo_problem "ENTROPO_PLATFORM=$platform is not supported" \
       "the accelerator kind of this host: tpu, gpu (NVIDIA) or cpu" \
       "ENTROPO_PLATFORM=gpu" ;;
esac
if ! entropo_has_workdir "$@"; then
  case " $* " in
    *" --help"* | *" --helpfull"* | *" --helpshort"*) ;;
    *) entropo_problem "--workdir is not among the arguments" \
         "the run's directory (metrics, checkpoints); on several hosts, one path on a filesystem they all mount" \
         "launch/run_host.sh --config=experiments/configs/countdown.py --workdir=/shared/entropo/run1" ;;
  esac
fi
entropo_check_distributed
entropo_fail_if_problems "launch/run_host.sh"

if [[ -z "${JAX_PLATFORMS:-}" ]]; then
  case "$platform" in
    tpu) export JAX_PLATFORMS=tpu ;;
    gpu) export JAX_PLATFORMS=cuda ;;
    cpu) export JAX_PLATFORMS=cpu ;;
  esac
fi
if [[ "${ENTROPO_XLA_DEFAULTS:-1}" != 0 && "$platform" == gpu ]]; then
  export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
fi

python="${ENTROPO_PYTHON:-python3}"
command=("$python" -m experiments.main "$@")
process="single process"
if [[ -n "${ENTROPO_NUM_PROCESSES:-}" ]]; then
  process="process ${ENTROPO_PROCESS_ID}/${ENTROPO_NUM_PROCESSES} (coordinator ${ENTROPO_COORDINATOR_ADDRESS})"
elif [[ "${ENTROPO_DISTRIBUTED:-}" == auto ]]; then
  process="process auto-detected"
fi

if entropo_dry_run; then
  echo "# launch/run_host.sh on ${HOSTNAME:-$(uname -n)}: $platform, $process"
  echo "cd $(printf '%q' "$REPO")"
  for name in ENTROPO_COORDINATOR_ADDRESS ENTROPO_NUM_PROCESSES \
      ENTROPO_PROCESS_ID ENTROPO_LOCAL_DEVICE_IDS ENTROPO_DISTRIBUTED \
      JAX_PLATFORMS XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION \
      LIBTPU_INIT_ARGS; do
    if [[ -n "${!name:-}" ]]; then
      echo "export $name=$(printf '%q' "${!name}")"
    fi
  done
  entropo_quote "${command[@]}"
  echo
  exit 0
fi

echo "[entropo] ${HOSTNAME:-$(uname -n)}: $platform, $process: $(entropo_quote "${command[@]}")" >&2
cd "$REPO"
exec "${command[@]}"
