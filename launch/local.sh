#!/usr/bin/env bash
# N processes of `python -m mae_jax.main` on this machine, joined by JAX's distributed runtime over
# loopback: the multi-host code path (per-process batch slices, cross-process collectives,
# collective checkpoints, preemption agreement) without a cluster. See launch/README.md.
#
#   launch/local.sh [--processes=N] [--cpu-devices=K | --gpus-per-process=G] [--log-dir=DIR] \
#       --config=configs/NAME.py[:ARGS] --workdir=DIR [--config.a.b=value ...]
#
#   --processes=N         processes to start (default 2)
#   --cpu-devices=K       run on CPU with K devices per process (JAX_PLATFORMS=cpu, gloo collectives)
#   --gpus-per-process=G  process i sees GPUs [i*G, (i+1)*G); GPU flags from launch/gpu_env.sh
#   --log-dir=DIR         where processes 1..N-1 write process_I.log (default: a new temp dir);
#                         process 0 prints to this terminal
#
# Every other argument goes to `python -m mae_jax.main` unchanged. SIGTERM/SIGINT to this script
# reach every process (a preemption drill: they agree on a step, save and exit 0). If a process
# fails, the others are killed (they would wait for it forever) and its exit status is returned.
# PYTHON selects the interpreter (default: python).
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "local.sh: needs bash >= 5.1 (wait -n -p), this is $BASH_VERSION" >&2
  exit 2
fi

processes=2
cpu_devices=0
gpus_per_process=0
log_dir=""
args=()
while (($#)); do
  case "$1" in
    --processes=*) processes="${1#*=}" ;;
    --cpu-devices=*) cpu_devices="${1#*=}" ;;
    --gpus-per-process=*) gpus_per_process="${1#*=}" ;;
    --log-dir=*) log_dir="${1#*=}" ;;
    -h | --help) usage; exit 0 ;;
    *) args+=("$1") ;;
  esac
  shift
done

for pair in "processes=$processes" "cpu-devices=$cpu_devices" "gpus-per-process=$gpus_per_process"; do
  if ! [[ "${pair#*=}" =~ ^[0-9]+$ ]]; then
    echo "local.sh: --$pair: expected a non-negative integer" >&2
    exit 2
  fi
done
if ((processes < 1)); then
  echo "local.sh: --processes=$processes: expected at least 1" >&2
  exit 2
fi
if ((cpu_devices > 0 && gpus_per_process > 0)); then
  echo "local.sh: --cpu-devices and --gpus-per-process exclude each other" >&2
  exit 2
fi

python="${PYTHON:-python}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ((cpu_devices > 0)); then
  export JAX_PLATFORMS=cpu
  export JAX_CPU_COLLECTIVES_IMPLEMENTATION="${JAX_CPU_COLLECTIVES_IMPLEMENTATION:-gloo}"
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$cpu_devices"
elif ((gpus_per_process > 0)); then
  # shellcheck source=launch/gpu_env.sh
  source "$here/gpu_env.sh"
fi

# A port the kernel just handed out is free; the coordinator (process 0) binds it a moment later.
port="${MAE_JAX_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
if [[ -z "$log_dir" ]]; then
  log_dir="$(mktemp -d "${TMPDIR:-/tmp}/mae_jax_local.XXXXXX")"
fi
mkdir -p "$log_dir"
echo "local.sh: $processes processes, coordinator 127.0.0.1:$port, logs of processes 1..$((processes - 1)) in $log_dir" >&2

declare -A index_of=()  # pid -> process index
pids=()
stop() {
  local sig="$1" p
  for p in "${pids[@]}"; do
    kill "-$sig" "$p" 2>/dev/null || true
  done
}
trap 'echo "local.sh: SIGTERM: forwarding to all processes" >&2; stop TERM' TERM
trap 'echo "local.sh: SIGINT: forwarding SIGTERM to all processes" >&2; stop TERM' INT

for ((i = 0; i < processes; i++)); do
  env_i=(MAE_JAX_COORDINATOR="127.0.0.1:$port" MAE_JAX_NUM_PROCESSES="$processes" MAE_JAX_PROCESS_ID="$i")
  if ((gpus_per_process > 0)); then
    env_i+=(CUDA_VISIBLE_DEVICES="$(seq -s, $((i * gpus_per_process)) $((i * gpus_per_process + gpus_per_process - 1)))")
  fi
  if ((i == 0)); then
    env "${env_i[@]}" "$python" -m mae_jax.main "${args[@]}" &
  else
    env "${env_i[@]}" "$python" -m mae_jax.main "${args[@]}" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
  index_of[$!]=$i
done

status=0
left=$processes
while ((left > 0)); do
  finished=""
  if wait -n -p finished; then rc=0; else rc=$?; fi
  if [[ -z "${finished:-}" ]]; then
    continue  # a forwarded signal interrupted the wait; the processes are still running
  fi
  left=$((left - 1))
  i="${index_of[$finished]}"
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "local.sh: process $i exited with status $rc; killing the others" >&2
    if ((i > 0)); then
      tail -n 30 "$log_dir/process_$i.log" >&2 || true
    fi
    stop KILL
  fi
done
exit "$status"
