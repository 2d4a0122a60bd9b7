"""The training loop of every job (pretraining, fine-tuning and probing, segmentation, enhancement).

A job hands `run` its pieces as a `Job`: how to fetch the batch of a step, the jitted step, when a
checkpoint is due and how to write one, and an evaluation hook run after every step (validation,
image summaries). Everything else is one policy, written here once:

* SIGTERM (`preemption.py`): the step in flight finishes, a checkpoint of it is written, the loop
  ends and the job returns `preempted` (exit 0, a rerun resumes). A signal during the set-up stops
  the job before its first step, without a checkpoint.
* Non-finite steps (`core.apply_if_finite` skips them): a warning per step; `train.max_bad_steps` in
  a row, or a non-finite final step, stop the run with `RunFailed` (exit 1). No periodic checkpoint
  is written inside a bad streak, so the newest checkpoint is the last good state, and a failed run
  writes no final checkpoint and no completion record: a rerun is never "already complete".
* Divergence: a finite loss above `LOSS_BLOWUP` times the run's first loss stops the run the same
  way (docs/reliability.md).
* Progress and metrics: `writers.Monitor` (lines, ETA, TensorBoard) and `metrics.jsonl` (`MetricsLog`),
  one record, flushed at once, per step that gets a metrics line: the `train.log_every` schedule,
  the first step, and once a minute at least.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable

import jax

from mae_jax.train import checkpoint, preemption, workdir_lock

log = logging.getLogger("mae_jax")

# A finite loss above this multiple of the run's first loss stops the run: far past any loss spike of
# a healthy run (MAE, cross-entropy, Dice and CycleGAN losses start near their largest values), and
# what a learning rate orders of magnitude too high produces within a few steps.
LOSS_BLOWUP = 100.0


class RunFailed(workdir_lock.RunStopped):
  """Training diverged (non-finite steps, or a loss far above its start): the run is not done. `main`
  prints the message as one line and exits 1."""
  exit_code = 1


@dataclasses.dataclass
class Job:
  """What one job supplies to `run`. `carry` is the job's device state (a train state, or a tuple of
  it and non-trained state), passed through the step unchanged in structure."""
  total: int  # the step the run ends at
  start: int  # the step it resumes from
  carry: Any
  batch: Callable[[int], Any]  # step -> its global batch (host work, overlaps the step in flight)
  step: Callable[[Any, Any], tuple[Any, dict]]  # (carry, batch) -> (carry, metrics on device)
  checkpoint_due: Callable[[int], bool]  # periodic checkpoints (the last step always saves)
  save: Callable[[int, Any, dict, bool], None]  # (step, carry, loop's checkpoint data, force)
  latest_checkpoint: Callable[[], tuple[int | None, str]]  # (newest step or None, where)
  close: Callable[[], None]  # waits for checkpoints in flight; runs whatever happens
  # (step, carry) after each step; a true return ends the run there (early stopping), checkpointed.
  evaluate: Callable[[int, Any], bool | None] | None = None
  lr_field: str = "train.base_lr"  # the field the failure messages point at
  first_loss: float | None = None  # restored from the checkpoint's data (`loop_data`)


@dataclasses.dataclass
class Outcome:
  step: int  # the last step trained
  preempted: bool
  carry: Any
  last: dict  # the last metrics line, as floats
  history: list  # (step, metrics) on the `train.log_every` schedule
  first: tuple | None  # (step, metrics) of this process's first step, when one ran


def loop_data(restored: dict | None) -> float | None:
  """The first loss saved with a checkpoint by `run` (None in a fresh run)."""
  value = (restored or {}).get("first_loss")
  return None if value is None else float(value)


def run(job: Job, train_config, preempt: preemption.Preemption, monitor, workdir: str,
        is_main: bool) -> Outcome:
  """Trains `job` from `job.start` to `job.total` (see the module docstring for the policy)."""
  guard = _Guard(job, int(train_config.max_bad_steps))
  metrics_log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), job.start) if is_main else None
  carry, step, pending = job.carry, job.start, None
  history, last, first = [], {}, None
  try:
    while step < job.total:
      if step == job.start:
        if preempt.before_first_step(step):
          break
        monitor.before_first_step()
      batch = job.batch(step)
      # Wait for the step in flight (and check it) before dispatching the next: a SIGTERM that came
      # during it then stops the run right there, instead of after one more queued step.
      if pending is not None:
        guard.check(step, pending)
        pending = None
      if step > job.start and preempt.requested:
        guard.save(step, carry, preempted=True)
        preemption.log_saved(step)
        break
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        carry, metrics = job.step(carry, batch)
      step += 1
      pending = metrics
      m = monitor.after_step(step, metrics)
      if m is not None:
        last = m
        if first is None and step == job.start + 1:
          first = (step, m)
        if monitor.scheduled(step):
          history.append((step, m))
        # Every line the console shows is on disk too: the first step's and the once-a-minute ones
        # matter most in a run whose step takes minutes (`history` keeps only the schedule's, which
        # are the same in every run of a config).
        if metrics_log is not None:
          metrics_log.write(step, m)
      final = step == job.total
      if final or job.checkpoint_due(step):
        guard.check(step, pending)  # a failed final step raises here: no evaluation, no save
        pending = None
      stop = bool(job.evaluate(step, carry)) if job.evaluate is not None else False
      preempt.poll(step)
      if final or stop or job.checkpoint_due(step) or preempt.requested:
        if pending is not None:
          guard.check(step, pending)
          pending = None
        guard.save(step, carry, preempted=preempt.requested)
      if preempt.requested:
        preemption.log_saved(step)
        break
      if stop:
        break
    if pending is not None:
      guard.check(step, pending)
  finally:
    # An exception must not lose the checkpoint being written in the background.
    job.close()
    monitor.flush()
    if metrics_log is not None:
      metrics_log.close()
  return Outcome(step, preempt.requested, carry, last, history, first)


class _Guard:
  """The non-finite and divergence checks, and the checkpoints they allow."""

  def __init__(self, job: Job, max_bad_steps: int):
    self.job, self.max_bad = job, max_bad_steps
    self.first_loss = job.first_loss
    self.streak = 0

  def _where(self) -> str:
    latest, where = self.job.latest_checkpoint()
    return (f"The last good checkpoint is step {latest} in {where}" if latest is not None
            else "No checkpoint was saved before it")

  def check(self, step: int, metrics) -> None:
    """Reads `step`'s loss and non-finite streak (waiting for the step) and stops a failed run."""
    streak, loss = jax.device_get((metrics["bad_streak"], metrics["loss"]))
    self.streak, loss = int(streak), float(loss)
    if self.streak:
      log.warning("step %d: loss or gradient not finite; update skipped (%d in a row)", step, self.streak)
    advice = f"lower {self.job.lr_field}, set train.grad_clip, check the data, or try model.dtype='float32'"
    if self.streak >= self.max_bad:
      raise RunFailed(
          f"{self.streak} consecutive non-finite steps (train.max_bad_steps={self.max_bad}) at step "
          f"{step}: stopping. {self._where()}; {advice}.")
    if self.streak and step == self.job.total:
      raise RunFailed(
          f"the final step {step} was not finite ({self.streak} in a row): the run did not finish. "
          f"{self._where()}; {advice}.")
    if not math.isfinite(loss):
      return
    if self.first_loss is None:
      self.first_loss = loss if loss > 0 else None
    elif loss > LOSS_BLOWUP * self.first_loss:
      raise RunFailed(
          f"loss {loss:.4g} at step {step} is more than {LOSS_BLOWUP:g}x the run's first loss "
          f"({self.first_loss:.4g}): diverging, stopping. {self._where()}; {advice}.")

  def save(self, step: int, carry, *, preempted: bool) -> None:
    """Periodic checkpoints are skipped inside a run of non-finite steps, so the newest checkpoint
    (the one a restart or `RunFailed` points to) is a good one. A preemption's is always written:
    skipped steps never change the parameters."""
    if self.streak and not preempted:
      log.warning("step %d: checkpoint skipped (%d non-finite steps in a row); the newest one is "
                  "step %s", step, self.streak, self.job.latest_checkpoint()[0])
      return
    self.job.save(step, carry, {"first_loss": self.first_loss}, preempted)


# ------------------------------------------------------------------------------------ metrics.jsonl


class MetricsLog:
  """`metrics.jsonl` in the workdir: one JSON object per logged step (`step`, `loss`, `lr`,
  `grad_norm`, `finite`, `skipped_total`, ..., throughput), for scripts and plots. Floats are
  written with `repr`, so float32 values read back exactly (a non-finite loss is written `NaN`,
  which Python's json reads).

  The file is only ever appended to, by the run that holds the workdir's lock. On resume, the lines
  after the restored step (written by a run killed after its last checkpoint, or past a damaged
  checkpoint that was set aside) are moved, not dropped: appended to `metrics.discarded.jsonl`
  after a marker line, then cut from the end of `metrics.jsonl` in place. So `metrics.jsonl`
  always describes the one history that produced the current state, one line per logged step."""

  def __init__(self, path: str, start_step: int):
    self.path = path
    set_aside_after(path, start_step)
    self._f = open(path, "a")

  def write(self, step: int, metrics: dict) -> None:
    try:
      self._f.write(json.dumps({"step": int(step), **metrics}) + "\n")
      self._f.flush()
    except OSError as e:
      raise checkpoint.SaveFailed(f"writing {self.path} failed at step {step}: {e.strerror or e}; "
                                  "free space (or make the workdir writable) and run the same "
                                  "command again to resume from the last checkpoint") from None

  def close(self) -> None:
    try:
      self._f.close()
    except OSError:  # the failed write above was already reported
      pass


def set_aside_after(path: str, step: int) -> int:
  """Moves the lines of `path` from the first one past `step` (or cut short) to the end of
  `<name>.discarded.jsonl`, marked with the step resumed from; returns how many lines moved."""
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    data = f.read()
  cut, offset = None, 0
  for line in data.splitlines(keepends=True):
    try:
      beyond = int(json.loads(line).get("step", 0)) > step
    except (ValueError, AttributeError):  # a line cut short by a kill
      beyond = True
    if beyond or not line.endswith(b"\n"):
      cut = offset
      break
    offset += len(line)
  if cut is None:
    return 0
  tail = data[cut:]
  moved = tail.count(b"\n") + (not tail.endswith(b"\n"))
  aside = path[:-len(".jsonl")] + ".discarded.jsonl" if path.endswith(".jsonl") else path + ".discarded"
  with open(aside, "ab") as f:
    f.write((json.dumps({"discarded": moved, "resumed_from_step": int(step), "from": os.path.basename(path)})
             + "\n").encode())
    f.write(tail if tail.endswith(b"\n") else tail + b"\n")
    f.flush()
    os.fsync(f.fileno())  # safely aside before it is cut from the record
  os.truncate(path, cut)
  log.info("%s: %d line(s) after step %d moved to %s", os.path.basename(path), moved, step,
           os.path.basename(aside))
  return moved


def read_metrics(workdir: str) -> list[dict]:
  """The records of `metrics.jsonl` in `workdir`, in step order."""
  out = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:  # the last line of a killed run may be cut short
        pass
  return out
