# shellcheck shell=bash
# GPU collective and overlap settings for multi-GPU runs. Sourced by launch/slurm.sbatch,
# launch/xpk.sh (GPU) and launch/local.sh --gpus-per-process; never applied by the Python code, so a
# run without the launch scripts gets XLA's defaults. Why each one: docs/scaling.md, "GPU flags".
# XLA aborts on a flag it does not know; tests/test_distributed.py checks these against the pinned
# jaxlib. Values already in the environment win (XLA reads the last occurrence of a flag, so the
# user's XLA_FLAGS go after ours).

_mae_jax_gpu_flags=(
  # Schedule collectives asynchronously, overlapped with independent compute (the gradient
  # all-reduce of layer k with the backward pass of layer k-1; FSDP's all-gathers ahead of use).
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Fuse the many small per-parameter collectives of a ViT into fewer large ones (128 MiB):
  # NCCL reaches bandwidth only on large messages, and each launch has a fixed latency.
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  # Inside loops (train.grad_accum > 1 runs its micro-batches in a scan): start the next
  # iteration's collectives during this iteration's compute.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_enable_while_loop_double_buffering=true
)
export XLA_FLAGS="${_mae_jax_gpu_flags[*]}${XLA_FLAGS:+ $XLA_FLAGS}"
unset _mae_jax_gpu_flags

# One hardware work queue per GPU: kernels and NCCL run in the order the latency-hiding
# scheduler chose instead of being reordered by the driver.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# XLA preallocates 75% of GPU memory by default; ViT-L/H activations want more, NCCL needs the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
# Print NCCL's warnings (a fallback from InfiniBand to sockets shows up here), not its chatter.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Site-specific, set them in the job if needed (see docs/scaling.md): NCCL_SOCKET_IFNAME,
# NCCL_IB_HCA, NCCL_IB_GID_INDEX.
