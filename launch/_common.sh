# Shared helpers of the entropo launch scripts; sourced, never run.
#
# Every script checks what it needs before doing anything, prints every
# missing or malformed variable at once (what it means, an example), and
# exits with status 2. ENTROPO_DRY_RUN=1 prints the commands instead of
# running them.

_ENTROPO_PROBLEMS=()

# entropo_problem NAME MEANING EXAMPLE: records a missing or bad setting.
entropo_problem() {
  _ENTROPO_PROBLEMS+=("$1: $2"$'\n'"    e.g. $3")
}

# entropo_require NAME MEANING EXAMPLE: NAME must be set and non-empty.
entropo_require() {
  if [[ -z "${!1:-}" ]]; then
    entropo_problem "$1 is not set" "$2" "$3"
  fi
}

# entropo_check_int NAME MIN EXAMPLE: a set NAME must be an integer >= MIN.
entropo_check_int() {
  local value="${!1:-}"
  if [[ -n "$value" ]] && ! [[ "$value" =~ ^[0-9]+$ && "$value" -ge "$2" ]]; then
    entropo_problem "$1=$value is not an integer >= $2" \
      "see the variable's description in launch/README.md" "$3"
  fi
}

# entropo_fail_if_problems SCRIPT: reports the recorded problems, exits 2.
entropo_fail_if_problems() {
  if ((${#_ENTROPO_PROBLEMS[@]})); then
    {
      echo "$1: cannot start:"
      local problem
      for problem in "${_ENTROPO_PROBLEMS[@]}"; do
        echo "  - $problem"
      done
      echo "See launch/README.md."
    } >&2
    exit 2
  fi
}

# entropo_check_distributed: the ENTROPO_* multi-process contract that
# experiments/main.py implements (see launch/README.md).
entropo_check_distributed() {
  local explicit=0 name
  for name in ENTROPO_COORDINATOR_ADDRESS ENTROPO_NUM_PROCESSES \
      ENTROPO_PROCESS_ID; do
    [[ -n "${!name:-}" ]] && explicit=1
  done
  if [[ -n "${ENTROPO_DISTRIBUTED:-}" && "${ENTROPO_DISTRIBUTED}" != auto ]]; then
    entropo_problem "ENTROPO_DISTRIBUTED=${ENTROPO_DISTRIBUTED} is not supported" \
      "the only value is 'auto' (jax.distributed.initialize() detects a TPU pod or cluster itself)" \
      "ENTROPO_DISTRIBUTED=auto"
  fi
  if [[ "${ENTROPO_DISTRIBUTED:-}" == auto && $explicit == 1 ]]; then
    entropo_problem "ENTROPO_DISTRIBUTED=auto is set together with ENTROPO_COORDINATOR_ADDRESS / ENTROPO_NUM_PROCESSES / ENTROPO_PROCESS_ID" \
      "choose one: auto-detection, or the three explicit variables" \
      "unset ENTROPO_DISTRIBUTED"
  fi
  if ((explicit)); then
    entropo_require ENTROPO_COORDINATOR_ADDRESS \
      "host:port of process 0, which every process can reach" \
      "ENTROPO_COORDINATOR_ADDRESS=10.0.0.2:12345"
    entropo_require ENTROPO_NUM_PROCESSES \
      "the number of processes in the job (usually one per host)" \
      "ENTROPO_NUM_PROCESSES=2"
    entropo_require ENTROPO_PROCESS_ID \
      "this process's index, 0 .. ENTROPO_NUM_PROCESSES - 1" \
      "ENTROPO_PROCESS_ID=0"
  fi
  entropo_check_int ENTROPO_NUM_PROCESSES 1 "ENTROPO_NUM_PROCESSES=2"
  entropo_check_int ENTROPO_PROCESS_ID 0 "ENTROPO_PROCESS_ID=0"
  local address="${ENTROPO_COORDINATOR_ADDRESS:-}"
  if [[ -n "$address" ]] && ! [[ "$address" =~ ^[^[:space:]]+:[0-9]+$ ]]; then
    entropo_problem "ENTROPO_COORDINATOR_ADDRESS=$address is not host:port" \
      "host:port of process 0" "ENTROPO_COORDINATOR_ADDRESS=node-0:12345"
  fi
  local n="${ENTROPO_NUM_PROCESSES:-}" i="${ENTROPO_PROCESS_ID:-}"
  if [[ "$n" =~ ^[0-9]+$ && "$i" =~ ^[0-9]+$ ]] && ((i >= n)); then
    entropo_problem "ENTROPO_PROCESS_ID=$i is not below ENTROPO_NUM_PROCESSES=$n" \
      "process ids run from 0 to ENTROPO_NUM_PROCESSES - 1" \
      "ENTROPO_PROCESS_ID=$((n - 1))"
  fi
  local ids="${ENTROPO_LOCAL_DEVICE_IDS:-}"
  if [[ -n "$ids" ]] && ! [[ "$ids" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    entropo_problem "ENTROPO_LOCAL_DEVICE_IDS=$ids is not a comma-separated list of device ids" \
      "the local accelerators this process drives (one process per GPU)" \
      "ENTROPO_LOCAL_DEVICE_IDS=0,1"
  fi
}

# entropo_has_workdir ARGS...: whether --workdir is among the arguments.
entropo_has_workdir() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      --workdir=?* | --workdir) return 0 ;;
    esac
  done
  return 1
}

# entropo_quote ARGS...: the arguments as one shell-quoted command line.
entropo_quote() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(printf '%q' "$arg")"
  done
  printf '%s' "$out"
}

entropo_dry_run() {
  [[ "${ENTROPO_DRY_RUN:-0}" == 1 ]]
}

# entropo_run ARGS...: runs the command, or prints it under ENTROPO_DRY_RUN=1.
entropo_run() {
  if entropo_dry_run; then
    entropo_quote "$@"
    echo
  else
    "$@"
  fi
}
