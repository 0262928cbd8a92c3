#!/usr/bin/env bash
# Creates, provisions and drives Cloud TPU VMs for crate_jax. See --help and
# launch/README.md.
set -euo pipefail
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) ||
  { echo "tpu_vm.sh needs bash >= 4.4 (macOS: brew install bash)." >&2; exit 2; }

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND [--option=VALUE ...] [-- ARGS ...]

Drives a Cloud TPU VM, or with --queued a queued resource (needed for
multislice), through gcloud. Values in [brackets] can instead come from that
environment variable; nothing falls back to gcloud's configured defaults.

Commands:
  create  Create the TPU VM, or the queued resource. ARGS after -- go to gcloud
          (e.g. -- --network=NET --subnetwork=SUBNET).
  status  Describe it; a queued resource can be used once it is ACTIVE.
  setup   Copy this git checkout (tracked and untracked, non-ignored files),
          or clone --repo-url at --ref, to ~/crate_jax on every worker and
          install it with jax[tpu] into ~/crate_jax/.venv.
  run     Start ARGS (the command) in the background on every worker, in
          ~/crate_jax with the venv first on PATH; output to
          ~/crate_logs/RUN.log. Refuses while another run is alive.
  logs    Print the end of RUN.log from the chosen workers.
  watch   Follow RUN.log on the chosen workers until Ctrl-C.
  stop    Stop RUN (default: every run) on all workers: SIGTERM to its
          process group, SIGKILL after 60 s.
  delete  Delete the TPU VM, or the queued resource and its slices.

Every command:
  --name=NAME              [CRATE_TPU_NAME]      TPU VM or queued resource.
  --zone=ZONE              [CRATE_TPU_ZONE]      e.g. us-central2-b.
  --project=PROJECT        [CRATE_TPU_PROJECT]   Google Cloud project id.
  --queued                 [CRATE_TPU_QUEUED=1]  NAME is a queued resource.
create:
  --accelerator-type=TYPE  [CRATE_TPU_TYPE]      Per slice: v4-32, v5p-64, ...
  --runtime-version=VER    [CRATE_TPU_RUNTIME]   tpu-ubuntu2204-base (v4),
                           v2-alpha-tpuv5 (v5p), v2-alpha-tpuv5-lite (v5e),
                           v2-alpha-tpuv6e (v6e).
  --spot                   Spot capacity: cheaper, can be preempted.
  --reserved               Your reservation's capacity.
  --num-slices=N           Multislice: N slices (--queued only).
  --valid-until-duration=D Drop the queued request if not granted within D,
                           e.g. 6h (--queued only).
setup:
  --repo-url=URL --ref=REF Clone URL at REF (branch, tag or commit).
  --python=VERSION         Python for the venv, fetched by uv (default 3.11).
run, logs, watch, stop:
  --run=NAME               Run name (letters, digits, . _ -).
  --worker=W --node=N      logs, watch: worker index and, with --queued,
                           slice index, or all (default all).
  --lines=N                logs: how many lines (default 100).

Example:
  export CRATE_TPU_NAME=crate-v4 CRATE_TPU_ZONE=us-central2-b \
      CRATE_TPU_PROJECT=my-project
  launch/tpu_vm.sh run --run=b16 -- python -m crate_jax.main \
      --config=configs/imagenet.py:variant=B/16 --workdir=gs://BUCKET/b16
EOF
}

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

# --- Run on the TPU workers: sent over ssh as source with `declare -f`. ---

# Whether session $1 (a run started by remote_run) has a live process.
remote_alive() {
  ps -o stat= -s "$1" | awk '!/^ *Z/ { alive = 1 } END { exit !alive }'
}

remote_check_idle() {
  local pidfile
  for pidfile in "$HOME"/crate_logs/*.pid; do
    if [[ -e $pidfile ]] && remote_alive "$(<"$pidfile")"; then
      echo "$(hostname): run $(basename "$pidfile" .pid) is alive; stop it" \
        "first." >&2
      return 1
    fi
  done
}

remote_setup() {  # PYTHON [REPO_URL REF]
  local repo=$HOME/crate_jax
  remote_check_idle
  rm -rf "$repo"
  mkdir -p "$repo"
  cd "$repo"
  if (($# == 3)); then
    git init -q
    git fetch -q --depth=1 "$2" "$3"
    git checkout -q FETCH_HEAD
  else
    tar -xzf "$HOME/crate_jax.tar.gz"
    rm "$HOME/crate_jax.tar.gz"
  fi
  command -v uv >/dev/null ||
    curl -LsSf https://astral.sh/uv/install.sh | env UV_NO_MODIFY_PATH=1 sh
  PATH=$HOME/.local/bin:$PATH
  uv venv -q --python "$1" .venv
  uv pip install -q --python .venv/bin/python -c constraints.txt -e . 'jax[tpu]'
  echo "$(hostname): ready."
}

remote_run() {  # RUN COMMAND...
  local logs=$HOME/crate_logs run=$1
  shift
  remote_check_idle
  if [[ ! -x $HOME/crate_jax/.venv/bin/python ]]; then
    echo "$(hostname): no ~/crate_jax/.venv; run 'setup' first." >&2
    return 1
  fi
  mkdir -p "$logs"
  cd "$HOME/crate_jax"
  PATH=$PWD/.venv/bin:$PATH setsid nohup "$@" >"$logs/$run.log" 2>&1 </dev/null &
  echo "$!" >"$logs/$run.pid"
  echo "$(hostname): started $run as process group $!; log $logs/$run.log"
}

remote_logs() {  # RUN LINES FOLLOW
  local log=$HOME/crate_logs/$1.log host
  host=$(hostname)
  if [[ ! -e $log ]]; then
    echo "$host: no $log" >&2
    return 1
  fi
  if (($3)); then tail -n "$2" -F "$log"; else tail -n "$2" "$log"; fi |
    sed -u "s/^/[$host] /"
}

remote_stop() {  # [RUN]
  local pidfile pgid
  for pidfile in "$HOME"/crate_logs/${1:-*}.pid; do
    [[ -e $pidfile ]] || continue
    pgid=$(<"$pidfile")
    if remote_alive "$pgid"; then
      kill -TERM -- "-$pgid"
      for _ in {1..60}; do
        remote_alive "$pgid" || break
        sleep 1
      done
      kill -KILL -- "-$pgid" 2>/dev/null || true
      echo "$(hostname): stopped $(basename "$pidfile" .pid)."
    fi
    rm -f "$pidfile"
  done
}

# --- Run here. ---

# Runs remote function $1 with arguments $2... on workers $worker of $node.
on_workers() {
  local script
  script="set -euo pipefail; $(declare -f remote_alive remote_check_idle "$1");$(printf ' %q' "$@")"
  if ((queued)); then
    gcloud compute tpus queued-resources ssh "$name" "${where[@]}" \
      --node="$node" --worker="$worker" --command="$script"
  else
    gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" \
      --worker="$worker" --command="$script"
  fi
}

copy_to_workers() {  # LOCAL_FILE REMOTE_FILE
  if ((queued)); then
    gcloud compute tpus queued-resources scp "$1" "$name:$2" "${where[@]}" \
      --node=all --worker=all
  else
    gcloud compute tpus tpu-vm scp "$1" "$name:$2" "${where[@]}" --worker=all
  fi
}

# Writes the checkout holding this script, as a .tar.gz, to $1.
pack_checkout() {
  local root
  root=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel) ||
    die "setup copies the git checkout holding this script; or pass --repo-url and --ref."
  (
    cd "$root"
    git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' file; do
        if [[ -e $file ]]; then printf '%s\0' "$file"; fi
      done |
      COPYFILE_DISABLE=1 tar --null -T - -czf "$1"
  )
}

main() {
  local command=${1:-}
  case $command in
    -h | --help) usage; exit 0 ;;
    create | status | setup | run | logs | watch | stop | delete) shift ;;
    '') usage >&2; exit 2 ;;
    *) die "unknown command '$command'; see --help." ;;
  esac

  # Globals, read by on_workers and copy_to_workers.
  name=${CRATE_TPU_NAME:-} zone=${CRATE_TPU_ZONE:-}
  project=${CRATE_TPU_PROJECT:-} queued=${CRATE_TPU_QUEUED:-0}
  local type=${CRATE_TPU_TYPE:-} runtime=${CRATE_TPU_RUNTIME:-}
  local spot=0 reserved=0 slices=1 valid_until='' repo_url='' ref=''
  local python=3.11 run='' lines=100 args=() used=()
  worker=all node=all
  while (($#)); do
    [[ $1 != --* || $1 == -- ]] || used+=("${1%%=*}")
    case $1 in
      -h | --help) usage; exit 0 ;;
      --name=*) name=${1#*=} ;;
      --zone=*) zone=${1#*=} ;;
      --project=*) project=${1#*=} ;;
      --queued) queued=1 ;;
      --accelerator-type=*) type=${1#*=} ;;
      --runtime-version=*) runtime=${1#*=} ;;
      --spot) spot=1 ;;
      --reserved) reserved=1 ;;
      --num-slices=*) slices=${1#*=} ;;
      --valid-until-duration=*) valid_until=${1#*=} ;;
      --repo-url=*) repo_url=${1#*=} ;;
      --ref=*) ref=${1#*=} ;;
      --python=*) python=${1#*=} ;;
      --run=*) run=${1#*=} ;;
      --worker=*) worker=${1#*=} ;;
      --node=*) node=${1#*=} ;;
      --lines=*) lines=${1#*=} ;;
      --) shift; args=("$@"); break ;;
      *) die "unknown option '$1' (options take the form --option=VALUE); see --help." ;;
    esac
    shift
  done

  local allowed='--name --zone --project --queued' option
  case $command in
    create) allowed+=' --accelerator-type --runtime-version --spot --reserved --num-slices --valid-until-duration' ;;
    setup) allowed+=' --repo-url --ref --python' ;;
    run | stop) allowed+=' --run' ;;
    logs) allowed+=' --run --worker --node --lines' ;;
    watch) allowed+=' --run --worker --node' ;;
  esac
  for option in "${used[@]}"; do
    [[ " $allowed " == *" $option "* ]] || die "$command does not take $option; see --help."
  done

  local missing=()
  [[ -n $name ]] || missing+=('--name (or CRATE_TPU_NAME)')
  [[ -n $zone ]] || missing+=('--zone (or CRATE_TPU_ZONE)')
  [[ -n $project ]] || missing+=('--project (or CRATE_TPU_PROJECT)')
  if [[ $command == create ]]; then
    [[ -n $type ]] || missing+=('--accelerator-type (or CRATE_TPU_TYPE)')
    [[ -n $runtime ]] || missing+=('--runtime-version (or CRATE_TPU_RUNTIME)')
  fi
  if [[ $command =~ ^(run|logs|watch)$ && -z $run ]]; then
    missing+=('--run')
  fi
  if ((${#missing[@]})); then
    local joined
    joined=$(IFS=';'; echo "${missing[*]}")
    die "$command needs ${joined//;/, }."
  fi

  [[ $queued =~ ^[01]$ ]] || die "CRATE_TPU_QUEUED must be 0 or 1, got '$queued'."
  [[ $slices =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$slices'."
  [[ $lines =~ ^[1-9][0-9]*$ ]] || die "--lines must be a positive integer, got '$lines'."
  [[ $worker =~ ^(all|[0-9]+)$ ]] || die "--worker must be an index or all, got '$worker'."
  [[ $node =~ ^(all|[0-9]+)$ ]] || die "--node must be an index or all, got '$node'."
  [[ -z $run || $run =~ ^[A-Za-z0-9._-]+$ ]] || die "--run may hold letters, digits and . _ -, got '$run'."
  if ((!queued)); then
    ((slices == 1)) || die "--num-slices needs --queued: multislice is only available through queued resources."
    [[ -z $valid_until ]] || die "--valid-until-duration needs --queued."
    [[ $node == all ]] || die "--node needs --queued."
  fi
  ((!(spot && reserved))) || die "--spot and --reserved exclude each other."
  [[ -z $repo_url && -z $ref || -n $repo_url && -n $ref ]] ||
    die "--repo-url and --ref go together."
  if [[ $command == run ]]; then
    ((${#args[@]})) || die "run needs the command after --, e.g. -- python -m crate_jax.main --config=..."
  elif ((${#args[@]})) && [[ $command != create ]]; then
    die "$command takes no arguments after --."
  fi

  where=(--zone="$zone" --project="$project")
  local kind='tpu-vm'
  if ((queued)); then kind='queued-resources'; fi
  case $command in
    create)
      local capacity=()
      ((!spot)) || capacity+=(--spot)
      ((!reserved)) || capacity+=(--reserved)
      if ((queued)); then
        local nodes=(--node-id="$name")
        ((slices == 1)) || nodes=(--node-count="$slices" --node-prefix="$name")
        [[ -z $valid_until ]] || capacity+=(--valid-until-duration="$valid_until")
        gcloud compute tpus queued-resources create "$name" "${where[@]}" \
          --accelerator-type="$type" --runtime-version="$runtime" \
          "${nodes[@]}" "${capacity[@]}" "${args[@]}"
      else
        gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
          --accelerator-type="$type" --version="$runtime" \
          "${capacity[@]}" "${args[@]}"
      fi
      ;;
    status) gcloud compute tpus "$kind" describe "$name" "${where[@]}" ;;
    setup)
      if [[ -n $repo_url ]]; then
        on_workers remote_setup "$python" "$repo_url" "$ref"
      else
        tarball=$(mktemp "${TMPDIR:-/tmp}/crate_jax.XXXXXX")
        trap 'rm -f "$tarball"' EXIT
        pack_checkout "$tarball"
        copy_to_workers "$tarball" crate_jax.tar.gz
        on_workers remote_setup "$python"
      fi
      ;;
    run) on_workers remote_run "$run" "${args[@]}" ;;
    logs) on_workers remote_logs "$run" "$lines" 0 ;;
    watch) on_workers remote_logs "$run" 20 1 ;;
    stop) on_workers remote_stop "$run" ;;
    delete)
      if ((queued)); then
        gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force
      else
        gcloud compute tpus tpu-vm delete "$name" "${where[@]}"
      fi
      ;;
  esac
}

main "$@"
