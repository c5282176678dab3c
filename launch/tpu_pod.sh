#!/usr/bin/env bash
# Runs entropo on every worker of a Cloud TPU VM slice (single- or multi-host).
#
#   TPU_NAME=my-v5p-16 ZONE=us-east5-a launch/tpu_pod.sh \
#       --config=experiments/configs/gsm8k_hf.py --workdir=/mnt/shared/run1 \
#       --config.mesh.fsdp=4 --config.mesh.tensor=2
#
# Required:
#   TPU_NAME  the TPU VM (`gcloud compute tpus tpu-vm list`).
#   ZONE      its zone.
#   --workdir=DIR among the arguments: one path every worker mounts (NFS,
#             Filestore, a gcsfuse mount): process 0 writes metrics and plots,
#             all workers write the Orbax checkpoint.
# Optional:
#   PROJECT               gcloud project (default: gcloud's configured one).
#   ENTROPO_COPY_REPO=1   first copy this checkout (without .git, .venv,
#                         workdir) to every worker, into ENTROPO_REMOTE_DIR.
#   ENTROPO_INSTALL=1     then `pip install -e . "jax[tpu]"` there.
#   ENTROPO_REMOTE_DIR    the checkout on the workers, relative to the home
#                         directory (default: entropo).
#   ENTROPO_FORWARD_ENV   names of local variables to pass on to the workers,
#                         e.g. "JAX_COMPILATION_CACHE_DIR LIBTPU_INIT_ARGS".
#   ENTROPO_DRY_RUN=1     print the gcloud commands instead of running them.
#
# Every worker runs launch/run_host.sh with ENTROPO_DISTRIBUTED=auto: on TPU
# VMs jax.distributed.initialize() finds the coordinator, the number of
# processes and its own id from the TPU metadata, one process per worker.
set -euo pipefail

ENTROPO_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/_common.sh
source "$ENTROPO_LAUNCH_DIR/_common.sh"
REPO="$(cd "$ENTROPO_LAUNCH_DIR/.." && pwd)"

entropo_require TPU_NAME "the name of the TPU VM slice to run on" \
  "TPU_NAME=my-v5p-16"
entropo_require ZONE "the zone of the TPU VM" "ZONE=us-east5-a"
if ! entropo_has_workdir "$@"; then
  entropo_problem "--workdir is not among the arguments" \
    "the run's directory, one path that every worker mounts" \
    "launch/tpu_pod.sh --config=experiments/configs/countdown.py --workdir=/mnt/shared/run1"
fi
remote_dir="${ENTROPO_REMOTE_DIR:-entropo}"
if [[ "$remote_dir" =~ [[:space:]] ]]; then
  entropo_problem "ENTROPO_REMOTE_DIR='$remote_dir' contains spaces" \
    "the checkout on the workers, relative to the home directory" \
    "ENTROPO_REMOTE_DIR=entropo"
fi
forward=()
for name in ${ENTROPO_FORWARD_ENV:-}; do
  if ! [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
    entropo_problem "ENTROPO_FORWARD_ENV names '$name', not a variable name" \
      "space-separated names of variables to pass on" \
      "ENTROPO_FORWARD_ENV='JAX_COMPILATION_CACHE_DIR'"
  elif [[ -n "${!name+x}" ]]; then
    forward+=("$name=${!name}")
  fi
done
entropo_fail_if_problems "launch/tpu_pod.sh"

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  where+=(--project="$PROJECT")
fi

if [[ "${ENTROPO_COPY_REPO:-0}" == 1 ]]; then
  archive="${TMPDIR:-/tmp}/entropo-$TPU_NAME.tar.gz"
  entropo_run tar -C "$REPO" --exclude=./.git --exclude=./.venv \
    --exclude=./.venv312 \
    --exclude=./workdir --exclude=./.pytest_cache -czf "$archive" .
  entropo_run "${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME:entropo.tar.gz" \
    "${where[@]}"
  entropo_run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" \
    --command="mkdir -p $remote_dir && tar -xzf entropo.tar.gz -C $remote_dir && rm entropo.tar.gz"
fi

remote="cd $remote_dir"
if [[ "${ENTROPO_INSTALL:-0}" == 1 ]]; then
  remote+=" && python3 -m pip install --quiet -e . 'jax[tpu]'"
fi
remote+=" && $(entropo_quote env "${forward[@]}" ENTROPO_DISTRIBUTED=auto \
  ENTROPO_PLATFORM=tpu bash launch/run_host.sh "$@")"
entropo_run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" \
  --command="$remote"
