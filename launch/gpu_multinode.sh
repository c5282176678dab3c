#!/usr/bin/env bash
# Runs one entropo process on this GPU node of a multi-node job.
#
# Start it on every node (by hand, pdsh, a job system), with the same
# arguments and coordinator, and each node's own process id:
#
#   # on node-0 (whose address every node can reach):
#   ENTROPO_COORDINATOR_ADDRESS=node-0:12345 ENTROPO_NUM_PROCESSES=2 \
#   ENTROPO_PROCESS_ID=0 launch/gpu_multinode.sh \
#       --config=experiments/configs/gsm8k_hf.py --workdir=/shared/run1 \
#       --config.mesh.data=2 --config.mesh.fsdp=8
#   # on node-1: the same with ENTROPO_PROCESS_ID=1
#
# Required:
#   ENTROPO_COORDINATOR_ADDRESS  host:port of process 0 (a free port there).
#   ENTROPO_NUM_PROCESSES        processes in the job: one per node, or one
#                                per GPU with ENTROPO_LOCAL_DEVICE_IDS.
#   ENTROPO_PROCESS_ID           this process: 0 .. ENTROPO_NUM_PROCESSES - 1.
#   --workdir=DIR                a path every node mounts.
# Optional:
#   ENTROPO_LOCAL_DEVICE_IDS     GPUs this process drives, e.g. 3 (one
#                                process per GPU); default: all visible.
#   ENTROPO_PLATFORM             default gpu (cpu tries the same path with
#                                CPU processes on one machine).
#   ENTROPO_DRY_RUN=1            print what would run.
set -euo pipefail

ENTROPO_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/_common.sh
source "$ENTROPO_LAUNCH_DIR/_common.sh"

entropo_require ENTROPO_COORDINATOR_ADDRESS \
  "host:port of process 0, which every node can reach" \
  "ENTROPO_COORDINATOR_ADDRESS=node-0:12345"
entropo_require ENTROPO_NUM_PROCESSES \
  "the number of processes in the job (one per node)" \
  "ENTROPO_NUM_PROCESSES=2"
entropo_require ENTROPO_PROCESS_ID \
  "this node's process index, 0 .. ENTROPO_NUM_PROCESSES - 1" \
  "ENTROPO_PROCESS_ID=0"
if [[ -n "${ENTROPO_DISTRIBUTED:-}" ]]; then
  entropo_problem "ENTROPO_DISTRIBUTED=${ENTROPO_DISTRIBUTED} is set" \
    "this launcher passes the coordinator explicitly; auto-detection is for TPU pods" \
    "unset ENTROPO_DISTRIBUTED"
fi
entropo_fail_if_problems "launch/gpu_multinode.sh"

export ENTROPO_COORDINATOR_ADDRESS ENTROPO_NUM_PROCESSES ENTROPO_PROCESS_ID
export ENTROPO_PLATFORM="${ENTROPO_PLATFORM:-gpu}"
exec bash "$ENTROPO_LAUNCH_DIR/run_host.sh" "$@"
