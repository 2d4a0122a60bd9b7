#!/usr/bin/env bash
# Pretraining on GKE through xpk (a JobSet per workload; one container per TPU VM host or per GPU
# node, each running one process on JAX's distributed runtime).
#
#   export CLUSTER=my-xpk-cluster [PROJECT=my-project ZONE=us-east5-a]
#   TPU_TYPE=v5p-32 launch/xpk.sh --config=configs/mae.py:l --workdir=/mnt/shared/mae_l
#   DEVICE_TYPE=h100-80gb-8 NUM_NODES=2 launch/xpk.sh --config=configs/mae.py:l --workdir=/mnt/shared/mae_l
#
# Arguments go to `python -m mae_jax.main` unchanged. xpk builds an image FROM $DOCKER_IMAGE
# (default python:3.12) with a copy of this checkout (without .venv/.git) in /app; the container
# installs requirements.txt + jax[tpu] or jax[cuda12] at the pinned version, then runs the command.
# (A prebuilt image with those installed skips that step: drop SETUP to "true" and pass its name.)
# The workdir must be storage every pod mounts at that path (xpk storage: Filestore or GCS FUSE).
#
# TPU: jax.distributed.initialize() reads the GKE TPU environment (TPU_WORKER_HOSTNAMES, ...).
# GPU: xpk exports JAX_COORDINATOR_ADDRESS/PORT, NNODES and NODE_RANK to every pod (one process per
# node, all its GPUs); they become the MAE_JAX_* variables, and launch/gpu_env.sh sets the XLA/NCCL
# flags (why: docs/scaling.md). Preemption: the pod's SIGTERM reaches python (exec), and JAX's
# preemption service makes every process save at the same step; the JobSet restarts the workload
# (xpk --max-restarts) and it resumes from that checkpoint.
set -euo pipefail

: "${CLUSTER:?set CLUSTER (the xpk/GKE cluster)}"
if (($# == 0)); then
  echo "xpk.sh: pass the arguments of python -m mae_jax.main (--config=... --workdir=...)" >&2
  exit 2
fi
for arg in "$@"; do
  # The command lands inside YAML (a double-quoted env value for GPU workloads): keep it plain.
  if [[ "$arg" == *[\"\'\\]* ]]; then
    echo "xpk.sh: argument $arg contains a quote or backslash, which the xpk YAML cannot carry" >&2
    exit 2
  fi
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jax_version="$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' "$root/requirements.txt")"
workload="${WORKLOAD:-mae-$(date +%m%d-%H%M%S)}"
args="$(printf " '%s'" "$@")"

# The build context: this checkout without the local venv, git history and caches.
stage="$(mktemp -d "${TMPDIR:-/tmp}/mae_jax_xpk.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
tar -C "$root" --exclude=./.venv --exclude=./.git --exclude='__pycache__' --exclude='*.egg-info' -cf - . |
  tar -C "$stage" -xf -

xpk_args=(workload create --cluster="$CLUSTER" --workload="$workload"
  --docker-image="${DOCKER_IMAGE:-python:3.12}" --script-dir="$stage"
  --max-restarts="${MAX_RESTARTS:-3}")
if [[ -n "${PROJECT:-}" ]]; then xpk_args+=(--project="$PROJECT"); fi
if [[ -n "${ZONE:-}" ]]; then xpk_args+=(--zone="$ZONE"); fi

if [[ -n "${DEVICE_TYPE:-}" ]]; then
  setup="${SETUP:-pip install -q -r requirements.txt 'jax[cuda12]=='$jax_version && pip install -q --no-deps -e .}"
  # Single quotes: these variables expand in the pod, not here.
  # shellcheck disable=SC2016
  join='source launch/gpu_env.sh && export MAE_JAX_COORDINATOR=$JAX_COORDINATOR_ADDRESS:$JAX_COORDINATOR_PORT MAE_JAX_NUM_PROCESSES=$NNODES MAE_JAX_PROCESS_ID=$NODE_RANK'
  command="$setup && $join && exec python -m mae_jax.main$args"
  xpk_args+=(--device-type="$DEVICE_TYPE" --num-nodes="${NUM_NODES:-1}")
else
  setup="${SETUP:-pip install -q -r requirements.txt 'jax[tpu]=='$jax_version && pip install -q --no-deps -e .}"
  command="$setup && export MAE_JAX_DISTRIBUTED=1 && exec python -m mae_jax.main$args"
  xpk_args+=(--tpu-type="${TPU_TYPE:-v5p-32}" --num-slices="${NUM_SLICES:-1}")
fi

echo "xpk.sh: workload $workload, command: $command" >&2
xpk "${xpk_args[@]}" --command="$command"
