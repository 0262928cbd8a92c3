#!/usr/bin/env bash
# Runs an N-process JAX job on this machine. See --help.
set -euo pipefail
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) ||
  { echo "local_multiprocess.sh needs bash >= 4.4 (macOS: brew install bash)." >&2; exit 2; }

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh --num-processes=N (--gpus-per-process=K | --cpu)
           [--port=PORT] [--log-dir=DIR] -- COMMAND ...

Starts N copies of COMMAND on this machine, appending
  --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I
to copy I, and waits for all of them. If one fails, the others are killed and
its exit status is returned. SIGTERM and SIGINT are forwarded to every copy,
and the script waits for them to finish (a trainer saves before it stops).

  --num-processes=N     Number of processes.
  --gpus-per-process=K  Process I sees GPUs I*K ... I*K+K-1 (CUDA_VISIBLE_DEVICES).
  --cpu                 JAX_PLATFORMS=cpu; XLA_FLAGS=--xla_force_host_platform_device_count=D
                        gives each process D CPU devices.
  --port=PORT           Coordinator port (default: a free one).
  --log-dir=DIR         Output of process I goes to DIR/process_I.log
                        (default: a new directory under ${TMPDIR:-/tmp}).

Example (2 processes x 4 CPU devices):
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
  launch/local_multiprocess.sh --num-processes=2 --cpu -- \
      python -m crate_jax.main --config=configs/imagenet.py:variant=B/16 --workdir=/tmp/b16
EOF
}

# Passes a signal on to the processes; the wait loop below then waits for them.
forward() {
  echo "local_multiprocess.sh: received SIG$1; forwarding it and waiting for the processes." >&2
  kill -s "$1" "${pids[@]}" 2>/dev/null || true
}

die() {
  echo "local_multiprocess.sh: $*" >&2
  exit 2
}

main() {
  local num_processes='' gpus_per_process='' cpu=0 port='' log_dir='' command=()
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --num-processes=*) num_processes=${1#*=} ;;
      --gpus-per-process=*) gpus_per_process=${1#*=} ;;
      --cpu) cpu=1 ;;
      --port=*) port=${1#*=} ;;
      --log-dir=*) log_dir=${1#*=} ;;
      --) shift; command=("$@"); break ;;
      *) die "unknown option '$1' (options take the form --option=VALUE); see --help." ;;
    esac
    shift
  done
  [[ $num_processes =~ ^[1-9][0-9]*$ ]] ||
    die "--num-processes must be a positive integer, got '$num_processes'."
  [[ -n $gpus_per_process && $cpu == 0 || -z $gpus_per_process && $cpu == 1 ]] ||
    die "pass exactly one of --gpus-per-process=K and --cpu."
  [[ -z $gpus_per_process || $gpus_per_process =~ ^[1-9][0-9]*$ ]] ||
    die "--gpus-per-process must be a positive integer, got '$gpus_per_process'."
  ((${#command[@]})) || die "pass the command after --, e.g. -- python -m crate_jax.main --config=..."
  if [[ -z $port ]]; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
  if [[ ! $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
    die "--port must be in 1..65535, got '$port'."
  fi
  if [[ -z $log_dir ]]; then
    log_dir=$(mktemp -d "${TMPDIR:-/tmp}/crate_local.XXXXXX")
  fi
  mkdir -p "$log_dir"
  ((!cpu)) || export JAX_PLATFORMS=cpu

  pids=()
  local i
  trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
  trap 'forward TERM' TERM
  trap 'forward INT' INT
  for ((i = 0; i < num_processes; i++)); do
    (
      if [[ -n $gpus_per_process ]]; then
        CUDA_VISIBLE_DEVICES=$(seq -s, $((i * gpus_per_process)) $(((i + 1) * gpus_per_process - 1)))
        export CUDA_VISIBLE_DEVICES
      fi
      exec "${command[@]}" --coordinator_address="127.0.0.1:$port" \
        --num_processes="$num_processes" --process_id="$i"
    ) >"$log_dir/process_$i.log" 2>&1 &
    pids[i]=$!
  done
  echo "Started $num_processes processes; follow them with" \
    "tail -f $log_dir/process_*.log"

  local status
  while ((${#pids[@]})); do
    sleep 1
    for i in "${!pids[@]}"; do
      if kill -0 "${pids[i]}" 2>/dev/null; then continue; fi
      status=0
      wait "${pids[i]}" || status=$?
      unset 'pids[i]'
      if ((status)); then
        echo "Process $i failed with status $status; stopping the others." \
          "Its log ends with:" >&2
        tail -n 20 "$log_dir/process_$i.log" >&2
        exit "$status"
      fi
    done
  done
  echo "All $num_processes processes finished."
}

main "$@"
