#!/usr/bin/env bash
# One SLURM task of an entropo job: maps SLURM's task variables to the
# ENTROPO_* multi-process variables and runs launch/run_host.sh.
#
# launch/slurm.sbatch starts it on every task with srun; run by hand only
# inside `srun` with ENTROPO_COORDINATOR_ADDRESS set.
#
#   SLURM_NTASKS   -> ENTROPO_NUM_PROCESSES
#   SLURM_PROCID   -> ENTROPO_PROCESS_ID
#   SLURM_LOCALID  -> ENTROPO_LOCAL_DEVICE_IDS, when several tasks share a
#                     node and each still sees all its GPUs (with
#                     --gpus-per-task=1 SLURM already hides the others, and
#                     the task's one visible GPU is used). An
#                     ENTROPO_LOCAL_DEVICE_IDS you set is kept.
set -euo pipefail

ENTROPO_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/_common.sh
source "$ENTROPO_LAUNCH_DIR/_common.sh"

entropo_require ENTROPO_COORDINATOR_ADDRESS \
  "host:port of task 0, set by launch/slurm.sbatch" \
  "ENTROPO_COORDINATOR_ADDRESS=gpu001:12345"
entropo_require SLURM_NTASKS "set by srun: the number of tasks in the step" \
  "srun bash launch/slurm_task.sh --workdir=..."
entropo_require SLURM_PROCID "set by srun: this task's rank" \
  "srun bash launch/slurm_task.sh --workdir=..."
entropo_require SLURM_LOCALID "set by srun: this task's rank on its node" \
  "srun bash launch/slurm_task.sh --workdir=..."
entropo_fail_if_problems "launch/slurm_task.sh"

export ENTROPO_NUM_PROCESSES="$SLURM_NTASKS"
export ENTROPO_PROCESS_ID="$SLURM_PROCID"
export ENTROPO_COORDINATOR_ADDRESS

# Tasks on this node: SLURM_NTASKS_PER_NODE, else the first count of
# SLURM_TASKS_PER_NODE ("8(x2)" -> 8).
per_node="${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}"
per_node="${per_node%%[(,]*}"
visible="${CUDA_VISIBLE_DEVICES:-}"
if [[ -z "${ENTROPO_LOCAL_DEVICE_IDS:-}" && "$per_node" =~ ^[0-9]+$ ]] \
    && ((per_node > 1)) && [[ "$visible" == *,* || -z "$visible" ]]; then
  export ENTROPO_LOCAL_DEVICE_IDS="$SLURM_LOCALID"
fi

exec bash "$ENTROPO_LAUNCH_DIR/run_host.sh" "$@"
