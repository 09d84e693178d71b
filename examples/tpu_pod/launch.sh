#!/usr/bin/env bash
# Start the same `energon serve` on every worker of a Cloud TPU VM pod slice.
#
# Every worker runs one process of a single jax.distributed run: worker 0 hosts the
# coordinator (and, as process 0, the scheduler and the gRPC API); the others join
# it and execute the same jitted steps over the global mesh. jax detects the
# number of processes and each worker's index from the TPU metadata; this script
# wires the coordinator address (worker 0's internal IP) and forwards your flags.
#
# usage: examples/tpu_pod/launch.sh --tpu NAME --zone ZONE [options] -- <energon serve flags>
#        examples/tpu_pod/launch.sh --local N [options] -- <energon serve flags>
#
#   --tpu NAME              TPU VM name (gcloud compute tpus tpu-vm list)
#   --zone ZONE             its zone, e.g. us-east5-a
#   --local N               rehearse on this machine: run the same per-worker command N
#                           times here (coordinator 127.0.0.1), under `energon launch`
#   --local-cpu-devices M   with --local: simulate M CPU devices in each process
#   --project PROJECT       gcloud project (default: gcloud's configured one)
#   --coordinator-ip IP     skip the lookup of worker 0's internal IP (--local: 127.0.0.1)
#   --coordinator-port N    coordinator port on worker 0 (default 8476)
#   --workdir DIR           directory on the workers to run in (default: ~)
#   --venv DIR              virtual environment on the workers to activate
#   --env KEY=VALUE         extra environment for the workers (repeatable)
#   --dry-run               print the commands instead of running them
#
# example:
#   examples/tpu_pod/launch.sh --tpu my-v5p-16 --zone us-east5-a --venv ~/venv -- \
#       --model /data/llama-3-8b --tp 8 --port 50051
#   examples/tpu_pod/launch.sh --local 2 --local-cpu-devices 2 -- --tp 4 --port 50051

set -euo pipefail

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
  exit "${1:-2}"
}

die() {
  echo "launch.sh: $*" >&2
  exit 2
}

tpu=""
zone=""
project=""
coordinator_ip=""
coordinator_port=8476
workdir=""
venv=""
dry_run=0
local=0
local_cpu_devices=""
extra_env=()
serve_flags=()

while (($# > 0)); do
  case "$1" in
    --tpu) tpu="${2:?--tpu needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --coordinator-ip) coordinator_ip="${2:?--coordinator-ip needs a value}"; shift 2 ;;
    --coordinator-port) coordinator_port="${2:?--coordinator-port needs a value}"; shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --venv) venv="${2:?--venv needs a value}"; shift 2 ;;
    --env) extra_env+=("${2:?--env needs KEY=VALUE}"); shift 2 ;;
    --local) local="${2:?--local needs a number of processes}"; shift 2 ;;
    --local-cpu-devices) local_cpu_devices="${2:?--local-cpu-devices needs a number}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; serve_flags=("$@"); break ;;
    *) die "unknown option '$1' (energon serve flags go after '--'; --help lists the options)" ;;
  esac
done

[[ "$local" =~ ^[0-9]+$ ]] || die "--local=$local must be a number of processes >= 1"
if ((local > 0)); then
  [[ -z "$tpu" && -z "$zone" && -z "$project" ]] || die "--local runs on this machine: drop --tpu/--zone/--project"
  [[ -z "$coordinator_ip" ]] || die "--local puts the coordinator on 127.0.0.1: drop --coordinator-ip"
  coordinator_ip=127.0.0.1
else
  [[ -n "$tpu" ]] || die "--tpu is required (or --local N to rehearse on this machine)"
  [[ -n "$zone" ]] || die "--zone is required"
  [[ -z "$local_cpu_devices" ]] || die "--local-cpu-devices needs --local N"
fi
[[ -z "$local_cpu_devices" || "$local_cpu_devices" =~ ^[1-9][0-9]*$ ]] ||
  die "--local-cpu-devices=$local_cpu_devices must be a number >= 1"
[[ "$coordinator_port" =~ ^[0-9]+$ ]] || die "--coordinator-port=$coordinator_port must be a number"
for kv in "${extra_env[@]+"${extra_env[@]}"}"; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $kv must be KEY=VALUE"
done

gcloud_scope=(--zone "$zone")
if [[ -n "$project" ]]; then
  gcloud_scope+=(--project "$project")
fi

# Quote words for a POSIX shell: safe words as they are, others in single quotes.
# Sets the global `quoted`.
quote_words() {
  local word out="" q="'" esc="'\\''"
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//$q/$esc}' "
    fi
  done
  quoted="${out% }"
}

# A path on the workers: a leading ~/ stays unquoted so the remote shell expands it.
# shellcheck disable=SC2088  # the literal ~ is meant for the remote shell
quote_remote_path() {
  if [[ "$1" == "~/"* ]]; then
    quote_words "${1:2}"
    quoted="~/$quoted"
  else
    quote_words "$1"
  fi
}

show() {
  quote_words "$@"
  echo "+ $quoted"
}

run() {
  show "$@"
  if ((dry_run == 0)); then
    "$@"
  fi
}

# 1. The coordinator lives on worker 0: find its internal IP.
if [[ -z "$coordinator_ip" ]]; then
  lookup=(gcloud compute tpus tpu-vm describe "$tpu" "${gcloud_scope[@]}"
    --format='value(networkEndpoints[0].ipAddress)')
  if ((dry_run == 1)); then
    show "${lookup[@]}"
    coordinator_ip='WORKER0_INTERNAL_IP'
  else
    show "${lookup[@]}"
    coordinator_ip="$("${lookup[@]}")"
    [[ -n "$coordinator_ip" ]] || die "could not read worker 0's IP of TPU '$tpu'"
  fi
fi

# 2. The command every worker runs. jax.distributed fills in the process count and
#    this worker's index from the TPU metadata (ENERGON_DISTRIBUTED=auto).
remote=""
if [[ -n "$workdir" ]]; then
  quote_remote_path "$workdir"
  remote+="cd $quoted && "
fi
if [[ -n "$venv" ]]; then
  quote_remote_path "${venv%/}/bin/activate"
  remote+="source $quoted && "
fi
quote_words env "ENERGON_DISTRIBUTED=auto" "ENERGON_COORDINATOR_ADDRESS=${coordinator_ip}:${coordinator_port}" \
  "${extra_env[@]+"${extra_env[@]}"}" energon serve "${serve_flags[@]+"${serve_flags[@]}"}"
remote+="$quoted"

# 3. Start it on all workers at once; gcloud returns when every worker's process ends.
if ((local == 0)); then
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_scope[@]}" --worker=all --command "$remote"
  exit 0
fi

# --local: the same command string, run by a shell N times on this machine. `energon launch`
# plays the pod: it gives each copy its process index and count (TPU metadata does that on
# a pod), and ends every copy when one fails or when this script is interrupted.
launcher=(energon launch --num-processes "$local" --port "$coordinator_port")
if [[ -n "$local_cpu_devices" ]]; then
  launcher+=(--cpu-devices-per-process "$local_cpu_devices")
fi
if ((dry_run == 0)); then
  command -v energon >/dev/null || die "--local needs 'energon' on PATH (activate the project's environment)"
  show "${launcher[@]}" -- bash -c "$remote"
  exec "${launcher[@]}" -- bash -c "$remote"
fi
show "${launcher[@]}" -- bash -c "$remote"
