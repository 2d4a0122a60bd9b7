"""Metrics and progress of a training loop, with clu as its authors intend: `create_default_writer`
(console lines and TensorBoard events, written asynchronously), `ReportProgress` (steps/s and ETA),
`Profile` (a profiler trace of a few steps) and `parameter_overview` (the parameter table at start-up).

clu's TensorBoard writer runs on TensorFlow: it is imported here only, with every GPU hidden from it
(JAX owns the accelerators; TensorFlow only serialises summaries).

What clu lacks stays here: when a metrics line is due (every `train.log_every` steps, the last step,
and at least once a minute however slow a step is) and the timing of the first step, compile
included, measured on the finished step, not on its asynchronous dispatch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

import jax
import numpy as np

log = logging.getLogger("mae_jax")

LOG_EVERY_SECS = 60.0  # a metrics line and a progress line at least this often (train.log_every_secs)


@contextlib.contextmanager
def _quiet_stderr():
  """TensorFlow's C++ start-up lines (oneDNN, CPU instruction sets) go to file descriptor 2 whatever
  TF_CPP_MIN_LOG_LEVEL says: they are hidden while it starts (Python errors still raise)."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def tensorflow_without_gpus():
  """TensorFlow for clu's summary writer, on the CPU only: left alone it would claim the GPUs' memory
  that JAX needs. Once per process (TensorFlow's devices are fixed once it has started)."""
  if "tensorflow" in sys.modules:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  with _quiet_stderr():
    import tensorflow as tf
    try:
      tf.config.set_visible_devices([], "GPU")
      tf.constant(0)  # starts its runtime (and prints its banner) here, on the CPU
    except RuntimeError:  # already started by someone else: its devices are set
      pass


def create_writer(workdir: str, is_main: bool):
  """clu's default writer: console lines and TensorBoard events in `workdir` on process 0, console
  lines only on the others."""
  tensorflow_without_gpus()
  from clu import metric_writers
  return metric_writers.create_default_writer(workdir if is_main else None, just_logging=not is_main,
                                              asynchronous=True)


def log_parameters(params, what: str) -> None:
  """clu's parameter table (name, shape, size; total) in the log at start-up."""
  from clu import parameter_overview
  parameter_overview.log_parameter_overview(_str_keys(params), include_stats=False, msg=what,
                                            jax_logging_process=0)


def _str_keys(tree):
  # NNX lists (blocks.0, blocks.1, ...) have integer keys; clu joins the names as strings.
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


class Monitor:
  """One training loop's writer and periodic actions. Call `after_step(step, metrics)` after every
  dispatched step; it returns the metrics as floats when a metrics line is due (they are written,
  and so logged): on the `train.log_every` schedule, after the first step, and once a minute at
  least; else None."""

  def __init__(self, workdir: str, train_config, total_steps: int, start: int, is_main: bool):
    from clu import periodic_actions
    self.writer = create_writer(workdir, is_main)
    self.total, self.start = int(total_steps), int(start)
    self.every = int(train_config.log_every)
    self.every_secs = float(train_config.get("log_every_secs", LOG_EVERY_SECS))
    self.report = periodic_actions.ReportProgress(num_train_steps=self.total, writer=self.writer,
                                                  every_steps=self.every, every_secs=self.every_secs)
    self.hooks = [self.report]
    profile_steps = int(train_config.get("profile_steps", 0))
    if is_main and profile_steps > 0:  # a trace of `profile_steps` steps, for TensorBoard's profiler
      self.hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=profile_steps,
                                                 profile_duration_ms=0, first_profile=self.start + 10,
                                                 every_secs=None))
    self.t0 = time.perf_counter()
    self._last_line = None

  def before_first_step(self) -> None:
    log.info("compiling and running the first step (minutes for a large model on CPU) ...")
    self.t0 = time.perf_counter()

  def after_step(self, step: int, metrics) -> dict | None:
    first = step == self.start + 1
    if first:
      # Dispatch returns at once: the first step's time is the time until its results exist.
      jax.block_until_ready(metrics)
      log.info("first step compiled and ran in %.1fs", time.perf_counter() - self.t0)
    for hook in self.hooks:  # the first call starts ReportProgress's clock: the ETA excludes compiling
      hook(step)
    now = time.monotonic()
    due = first or self.scheduled(step) or now - self._last_line >= self.every_secs
    if not due:
      return None
    self._last_line = now
    m = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
    self.writer.write_scalars(step, m)
    return m

  def scheduled(self, step: int) -> bool:
    """Whether `step` is on the `train.log_every` schedule (or the last): the lines that are the same
    in every run of a config, unlike the first step's and the once-a-minute ones."""
    return step % self.every == 0 or step == self.total

  def write_scalars(self, step: int, scalars: dict) -> None:
    self.writer.write_scalars(step, scalars)

  def write_images(self, step: int, images: dict) -> None:
    # clu's images are (N, H, W, C); ours are single uint8 panels.
    self.writer.write_images(step, {k: np.asarray(v)[None] if np.asarray(v).ndim == 3 else
                                    np.asarray(v)[None, ..., None] for k, v in images.items()})

  def timed(self, name: str):
    """A part of the loop (validation, image summaries) reported apart in the progress line."""
    return self.report.timed(name, wait_jax_async_dispatch=False)

  def flush(self) -> None:
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
