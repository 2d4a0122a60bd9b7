"""SIGTERM (SLURM preemption, TPU maintenance, Kubernetes eviction) stops a training job at the next
step boundary, with a checkpoint, and the process exits 0: the scheduler's requeue then resumes it.

Every job runs inside `Preemption()` from its first statement (`guarded`), before the dataset is
built or anything compiles. A signal during that set-up is only recorded (the default action would kill the process
half-way through writing a dataset or a cache); the job then stops before its first step, writes no
checkpoint since nothing was trained, and says so in the log.
"""

from __future__ import annotations

import logging
import signal

import jax

from mae_jax import distributed
from mae_jax.train import workdir_lock

log = logging.getLogger("mae_jax")


class Preemption:
  """A context that turns SIGTERM into a request to stop at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if jax.process_count() > 1:
      # JAX's preemption service owns SIGTERM there (a Python handler would replace it): all
      # processes must stop at the same step, or the collective save deadlocks. See poll().
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside a notebook worker): no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    log.warning("SIGTERM received: stopping at the next step boundary (with a checkpoint if a step "
                "ran), then exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def poll(self, step: int) -> bool:
    """Called once per step on every process (`loop.run`); multi-process runs agree on the step to
    stop at."""
    if not self.requested and distributed.preemption_sync_point(step):
      log.warning("preemption notice on some process: all stop after step %d", step)
      self.requested = True
    return self.requested

  def before_first_step(self, step: int) -> bool:
    """Called once, before the first step (and so before the step compiles): True, with the reason
    in the log, when a signal came during the set-up and the job must stop without training."""
    if not self.poll(step):
      return False
    kept = f"the latest stays the one at step {step}" if step else "the next run starts from scratch"
    log.warning("preempted before the first step: no step ran, so no checkpoint was written (%s); "
                "exiting cleanly", kept)
    return True


def log_saved(step: int) -> None:
  log.warning("preempted: checkpoint at step %d saved; exiting cleanly", step)


def guarded(job, config, workdir: str):
  """`job(config, workdir, preempt)` with the handler installed for all of it, so before the job
  builds a dataset or compiles anything, and with the workdir locked to this run
  (`workdir_lock.hold`: a second run on it stops at once)."""
  with Preemption() as preempt, workdir_lock.hold(workdir):
    return job(config, workdir, preempt)
