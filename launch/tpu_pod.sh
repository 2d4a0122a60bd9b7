#!/usr/bin/env bash
# Pretraining on a Cloud TPU pod slice (several TPU VM hosts, one process per host), on JAX's
# distributed runtime: every host runs the same command; jax.distributed.initialize() finds the
# other hosts through the TPU metadata.
#
#   export TPU_NAME=mae-v4-32 ZONE=us-central2-b [PROJECT=my-project]
#   launch/tpu_pod.sh setup      # once per TPU VM: this checkout, a venv, requirements, jax[tpu]
#   launch/tpu_pod.sh run --config=configs/mae.py:l --workdir=/mnt/shared/mae_l
#   launch/tpu_pod.sh stop       # SIGTERM on every host: all agree on a step, save, exit
#
# `run` takes the arguments of `python -m mae_jax.main` and runs in the foreground (wrap it in
# tmux/nohup on the machine you launch from for a long run); re-running it resumes from the latest
# checkpoint. The workdir must be one directory seen by every host (Filestore/NFS, or a bucket
# mounted with gcsfuse at the same path on each host): orbax writes checkpoints from all hosts.
# `setup` copies this checkout (without .venv/.git) to ~/$REMOTE_DIR on every host and builds the
# environment there with uv (TPU VM images ship an older Python than the 3.12 this project needs).
# No XLA flags are set: on TPU, XLA already overlaps collectives with compute by default.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in
  setup | run | stop) ;;
  -h | --help | help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac

: "${TPU_NAME:?set TPU_NAME (the TPU VM name)}"
: "${ZONE:?set ZONE (the TPU zone)}"
remote_dir="${REMOTE_DIR:-mae_jax}"
common=(--zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  common+=(--project="$PROJECT")
fi

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${common[@]}" --command="$1"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  setup)
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    jax_version="$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' "$root/requirements.txt")"
    if [[ -z "$jax_version" ]]; then
      echo "tpu_pod.sh: no 'jax==VERSION' line in $root/requirements.txt" >&2
      exit 2
    fi
    tarball="$(mktemp "${TMPDIR:-/tmp}/mae_jax_src.XXXXXX")"
    trap 'rm -f "$tarball"' EXIT
    tar -C "$root" --exclude=./.venv --exclude=./.git --exclude='__pycache__' \
      --exclude='*.egg-info' -czf "$tarball" .
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:mae_jax_src.tar.gz" "${common[@]}"
    # Runs on every host. jax[tpu] at the version requirements.txt pins: it adds libtpu.
    ssh_all "set -euo pipefail
      mkdir -p ~/$remote_dir && tar -xzf ~/mae_jax_src.tar.gz -C ~/$remote_dir && rm ~/mae_jax_src.tar.gz
      command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
      export PATH=\$HOME/.local/bin:\$PATH
      cd ~/$remote_dir
      uv venv --python 3.12 --allow-existing .venv
      uv pip install --python .venv/bin/python -r requirements.txt 'jax[tpu]==$jax_version'
      uv pip install --python .venv/bin/python --no-deps -e .
      .venv/bin/python -c 'import jax, mae_jax; print(\"jax\", jax.__version__, \"ready\")'"
    ;;
  run)
    if (($# == 0)); then
      echo "tpu_pod.sh run: pass the arguments of python -m mae_jax.main (--config=... --workdir=...)" >&2
      exit 2
    fi
    args="$(printf ' %q' "$@")"
    ssh_all "cd ~/$remote_dir && source .venv/bin/activate && MAE_JAX_DISTRIBUTED=1 exec python -m mae_jax.main$args"
    ;;
  stop)
    ssh_all "pkill -TERM -f '[m]ae_jax.main' || true"
    ;;
  *) ;;  # checked above
esac
