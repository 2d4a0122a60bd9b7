"""Multi-process start-up on JAX's own distributed runtime (no home-made launcher or collective).

`jax.distributed.initialize()` auto-detects SLURM, Cloud TPU and Kubernetes (GKE/xpk) clusters.
Elsewhere, set MAE_JAX_COORDINATOR (host:port), MAE_JAX_NUM_PROCESSES and MAE_JAX_PROCESS_ID
(launch/local.sh does this for testing on one machine).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("mae_jax")
_initialized = False


def _cluster_detected() -> bool:
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  if env.get("TPU_WORKER_HOSTNAMES") and "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return True
  if env.get("JOBSET_NAME") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  return False


def maybe_initialize() -> None:
  global _initialized
  if _initialized:
    return
  env = os.environ
  if env.get("MAE_JAX_COORDINATOR"):
    jax.distributed.initialize(coordinator_address=env["MAE_JAX_COORDINATOR"],
                               num_processes=int(env["MAE_JAX_NUM_PROCESSES"]),
                               process_id=int(env["MAE_JAX_PROCESS_ID"]))
  elif _cluster_detected():
    jax.distributed.initialize()
  else:
    return
  _initialized = True
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
