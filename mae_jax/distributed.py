"""Multi-process start-up on JAX's own distributed runtime (no home-made launcher or collective).

`maybe_initialize()` runs first thing in `mae_jax.main.run`, before any JAX computation:

* MAE_JAX_COORDINATOR (host:port), MAE_JAX_NUM_PROCESSES, MAE_JAX_PROCESS_ID set: an explicit
  cluster (launch/local.sh sets them to test the multi-process path on one machine).
* MAE_JAX_DISTRIBUTED=1: `jax.distributed.initialize()` with no arguments, which detects SLURM,
  Cloud TPU VMs, GKE TPU (xpk), Open MPI and mpi4py itself (launch/tpu_pod.sh sets it: a TPU VM
  is recognised from its metadata server, which only JAX queries). MAE_JAX_DISTRIBUTED=0 turns
  every detection off.
* Otherwise, the same call when the environment is unambiguously multi-process: a SLURM job step
  with several tasks (srun), a GKE TPU slice with several hosts, a JobSet/multislice pod.

A single-process run never calls `jax.distributed.initialize`: one machine needs no coordinator.
See docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import logging
import os

import jax

log = logging.getLogger("mae_jax")
_initialized = False

ENV_COORDINATOR = "MAE_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MAE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MAE_JAX_PROCESS_ID"
ENV_DISTRIBUTED = "MAE_JAX_DISTRIBUTED"


def _int_env(name: str) -> int:
  value = os.environ.get(name, "")
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def _cluster_detected(env=None) -> bool:
  env = os.environ if env is None else env
  # Inside `srun`: SLURM_STEP_NUM_TASKS is the step's task count. The batch script itself also
  # sees SLURM_NTASKS > 1, but it is one process: initializing there would wait forever.
  if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
    if int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1:
      return True
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return True
  if env.get("JOBSET_NAME") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  return False


def _explicit() -> dict | None:
  env = os.environ
  if not env.get(ENV_COORDINATOR):
    return None
  missing = [k for k in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if k not in env]
  if missing:
    raise ValueError(f"{ENV_COORDINATOR} is set but {', '.join(missing)} is not: set all three "
                     f"(launch/local.sh does)")
  n, pid = _int_env(ENV_NUM_PROCESSES), _int_env(ENV_PROCESS_ID)
  if n < 1 or not 0 <= pid < n:
    raise ValueError(f"{ENV_PROCESS_ID}={pid} must lie in [0, {ENV_NUM_PROCESSES}={n})")
  return {"coordinator_address": env[ENV_COORDINATOR], "num_processes": n, "process_id": pid}


def maybe_initialize() -> bool:
  """Joins the multi-process run this process belongs to, if any. Returns whether it did."""
  global _initialized
  if _initialized:
    return True
  flag = os.environ.get(ENV_DISTRIBUTED, "").strip().lower()
  if flag not in ("", "0", "1", "false", "true", "no", "yes", "auto"):
    raise ValueError(f"environment variable {ENV_DISTRIBUTED}={flag!r}: expected 0, 1 or auto")
  kwargs = _explicit()
  if kwargs is not None:
    if kwargs["num_processes"] == 1:
      return False
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
      # Cross-process collectives on CPU: gloo over TCP is JAX's default today; pin it unless the
      # user chose (e.g. mpi) so a change of default cannot silently break local multi-process runs.
      if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
  elif flag in ("0", "false", "no"):
    return False
  elif flag in ("1", "true", "yes") or _cluster_detected():
    jax.distributed.initialize()
  else:
    return False
  _initialized = True
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (no-op in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _host_leaders() -> list[bool]:
  """For every process: is it the lowest-numbered process on its host?"""
  import socket
  import zlib

  import numpy as np
  from jax.experimental import multihost_utils
  mine = np.asarray([zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF], np.int32)
  hosts = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1).tolist()
  return [hosts.index(h) == i for i, h in enumerate(hosts)]


@contextlib.contextmanager
def main_process_first(name: str):
  """One-off work on storage (building a dataset under data_dir) without races: process 0 runs
  the body first; then the first process of every other host (a node-local directory is built
  once per host); then all the others, which find it done. No-op in a single-process run."""
  if jax.process_count() == 1:
    yield
    return
  me = jax.process_index()
  leader = _host_leaders()[me]  # a collective: every process takes part
  phase = 0 if me == 0 else (1 if leader else 2)
  for p in range(phase):
    barrier(f"{name}/{p}")
  try:
    yield
  finally:
    for p in range(phase, 3):
      barrier(f"{name}/{p}")


def preemption_sync_point(step: int) -> bool:
  """Multi-process runs: True on every process at the same step once any of them got SIGTERM.

  JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM itself and
  agrees on the first step every process can still reach; each process must call this once per
  step with the same step numbers. A process-local signal flag would make the processes stop at
  different steps and deadlock in the collective checkpoint save. Single-process runs: False (the
  caller's own SIGTERM handler decides).
  """
  if jax.process_count() == 1:
    return False
  from jax.experimental import multihost_utils
  try:
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service=False)
    return False
