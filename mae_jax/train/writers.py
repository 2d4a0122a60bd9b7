"""Metrics and progress of a training loop: console lines, TensorBoard events, steps/s and ETA, a
profiler trace of a few steps, and the parameter table at start-up.

TensorBoard events are written with the `tensorboard` package's own record writer and summary
protos (the event protocol torch.utils.tensorboard writes too): no TensorFlow. clu is used where it needs none:
`clu.parameter_overview` for the parameter table. Profiling is `jax.profiler`.

When a metrics line is due: every `train.log_every` steps, the last step, and at least once a minute
however slow a step is. The first step's time (compile included) is measured on the finished step,
not on its asynchronous dispatch.

Console and log file: metrics lines and progress lines go to the console; the parameter table and
the scalars a job writes itself (`write_scalars`: validation and test results, which the job
reports in its own line) go to the `mae_jax.log_file` logger, which `mae_jax.main` sends to
`log.txt` only.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import socket
import time

import jax
import numpy as np

log = logging.getLogger("mae_jax")
# Lines for the workdir's log.txt only (mae_jax.main keeps them off the console).
log_file = logging.getLogger("mae_jax.log_file")

LOG_EVERY_SECS = 60.0  # a metrics line and a progress line at least this often (train.log_every_secs)
_FILE_COUNTER = itertools.count()
PROFILE_AFTER = 10  # steps after the start before a trace begins: compiling and warm-up are done


class SummaryWriter:
  """Scalars and images as TensorBoard events in `logdir` (None: no events), and, with `echo`, each
  scalar set as one line on that logger.

  The event file is written through tensorboard's `RecordWriter` on a plain file: its
  `EventFileWriter` would open the file through TensorFlow's file system whenever TensorFlow is
  installed (it starts TensorFlow, seconds and hundreds of MB). A few events per logged step are
  written in the calling thread, buffered, and reach the disk at `flush`, `close` or every
  `FLUSH_SECS`."""

  FLUSH_SECS = 30.0

  def __init__(self, logdir: str | None):
    self._records, self._flushed = None, time.monotonic()
    if logdir is not None:
      from tensorboard.compat.proto import event_pb2
      from tensorboard.summary.writer.record_writer import RecordWriter
      os.makedirs(logdir, exist_ok=True)
      # TensorBoard's file name; the counter keeps two writers of one process in one second apart.
      name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
              f"{next(_FILE_COUNTER)}")
      self._records = RecordWriter(open(os.path.join(logdir, name), "wb"))
      self._records.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
                          .SerializeToString())
      self.flush()

  def _add(self, step: int, values: list) -> None:
    if self._records is None:
      return
    from tensorboard.compat.proto import event_pb2, summary_pb2
    self._records.write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                        summary=summary_pb2.Summary(value=values)).SerializeToString())
    if time.monotonic() - self._flushed >= self.FLUSH_SECS:
      self.flush()

  def write_scalars(self, step: int, scalars: dict, echo: logging.Logger | None = None) -> None:
    from tensorboard.plugins.scalar import summary_v2
    values = [v for k, x in scalars.items() for v in summary_v2.scalar_pb(k, float(x)).value]
    self._add(step, values)
    if echo is not None:
      echo.info("[%d] %s", step, ", ".join(f"{k}={float(x):.6g}" for k, x in sorted(scalars.items())))

  def write_images(self, step: int, images: dict) -> None:
    """`images`: name -> (H, W) or (H, W, C) panel, uint8 or float in [0, 1] (as TensorBoard's image
    summary takes them; clipped), stored as PNG."""
    from PIL import Image
    from tensorboard.compat.proto import summary_pb2
    values = []
    for tag, image in images.items():
      a = np.asarray(image)
      if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
      if np.issubdtype(a.dtype, np.floating):
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
      elif a.dtype != np.uint8:
        raise ValueError(f"image {tag!r}: expected uint8 or float pixels, got {a.dtype}")
      png = io.BytesIO()
      Image.fromarray(a).save(png, format="PNG")
      values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
        height=a.shape[0], width=a.shape[1], colorspace=1 if a.ndim == 2 else a.shape[-1],
        encoded_image_string=png.getvalue())))
    self._add(step, values)

  def flush(self) -> None:
    self._flushed = time.monotonic()
    if self._records is not None:
      self._records.flush()

  def close(self) -> None:
    if self._records is not None:
      self._records.close()
      self._records = None


def create_writer(workdir: str, is_main: bool) -> SummaryWriter:
  """TensorBoard events in `workdir` on process 0; none on the others (their console lines stay)."""
  return SummaryWriter(workdir if is_main else None)


def parameter_counts(params) -> dict[str, int]:
  """Parameters per top-level module (leaves at the top level count under their own names)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  out: dict[str, int] = {}
  for path, leaf in leaves:
    top = path[0]
    name = str(getattr(top, "key", getattr(top, "name", getattr(top, "idx", top))))
    out[name] = out.get(name, 0) + int(np.prod(np.shape(leaf)))
  return out


def log_parameters(params, what: str) -> None:
  """One console line (total, per top-level module); clu's table (name, shape, size) in log.txt."""
  from clu import parameter_overview
  counts = parameter_counts(params)
  log.info("%s: %s (%s); the table is in log.txt", what, f"{sum(counts.values()):,}",
           ", ".join(f"{k} {v:,}" for k, v in counts.items()))
  log_file.info("%s\n%s", what, parameter_overview.get_parameter_overview(_str_keys(params),
                                                                          include_stats=False))


def _str_keys(tree):
  # NNX lists (blocks.0, blocks.1, ...) have integer keys; clu joins the names as strings.
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


class Progress:
  """Steps/s and ETA since the first reported step (compiling excluded), and the share of the time
  spent in named parts of the loop (`timed`), reported as one line and two scalars."""

  def __init__(self, total: int):
    self.total = int(total)
    self._step = self._t = None
    self._t0 = None
    self._parts: dict[str, float] = {}

  def start(self, step: int) -> None:
    self._step, self._t = step, time.monotonic()
    self._t0 = self._t

  @property
  def started(self) -> bool:
    return self._step is not None

  @contextlib.contextmanager
  def timed(self, name: str):
    t = time.monotonic()
    try:
      yield
    finally:
      self._parts[name] = self._parts.get(name, 0.0) + time.monotonic() - t

  def report(self, step: int) -> tuple[str, dict] | None:
    now = time.monotonic()
    dt = now - self._t
    if step <= self._step or dt <= 0:
      return None
    rate = (step - self._step) / dt
    eta = (self.total - step) / rate
    parts = "".join(f" ({format_eta(s)} : {100 * s / dt:.1f}% {k})" for k, s in self._parts.items())
    line = (f"progress: {rate:.1f} steps/s, {100 * step / self.total:.1f}% ({step}/{self.total}), "
            f"ETA: {format_eta(eta)}{parts}")
    self._step, self._t, self._parts = step, now, {}
    return line, {"steps_per_sec": rate, "uptime": now - self._t0}


class Monitor:
  """One training loop's writer and periodic actions. Call `after_step(step, metrics)` after every
  dispatched step; it returns the metrics as floats when a metrics line is due (they are written,
  and so logged): on the `train.log_every` schedule, after the first step, and once a minute at
  least; else None."""

  def __init__(self, workdir: str, train_config, total_steps: int, start: int, is_main: bool):
    self.writer = create_writer(workdir, is_main)
    self.workdir, self.is_main = workdir, is_main
    self.total, self.start = int(total_steps), int(start)
    self.every = int(train_config.log_every)
    self.every_secs = float(train_config.get("log_every_secs", LOG_EVERY_SECS))
    self.progress = Progress(self.total)
    self.profile_steps = int(train_config.get("profile_steps", 0)) if is_main else 0
    self._profile_stop = None
    self.t0 = time.perf_counter()
    self._last_line = time.monotonic()
    self._last_progress = time.monotonic()

  def before_first_step(self) -> None:
    log.info("compiling and running the first step (minutes for a large model on CPU) ...")
    self.t0 = time.perf_counter()

  def after_step(self, step: int, metrics) -> dict | None:
    first = step == self.start + 1
    if first:
      # Dispatch returns at once: the first step's time is the time until its results exist.
      jax.block_until_ready(metrics)
      log.info("first step compiled and ran in %.1fs", time.perf_counter() - self.t0)
    self._profile(step, metrics)
    now = time.monotonic()
    if not self.progress.started:  # the clock starts after the first step: the ETA excludes compiling
      self.progress.start(step)
    elif self.scheduled(step) or now - self._last_progress >= self.every_secs:
      jax.block_until_ready(metrics)  # steps/s counts finished steps, not dispatched ones
      if (report := self.progress.report(step)) is not None:
        line, scalars = report
        log.info("%s", line)
        self.writer.write_scalars(step, scalars)
        self._last_progress = now
    due = first or self.scheduled(step) or now - self._last_line >= self.every_secs
    if not due:
      return None
    self._last_line = now
    m = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
    self.writer.write_scalars(step, m, echo=log)
    return m

  def _profile(self, step: int, metrics) -> None:
    # A trace of `profile_steps` finished steps, for TensorBoard's profiler (plugins/profile/).
    if self.profile_steps <= 0:
      return
    if step == self.start + PROFILE_AFTER and self._profile_stop is None:
      jax.block_until_ready(metrics)
      jax.profiler.start_trace(self.workdir)
      self._profile_stop = step + self.profile_steps
    elif self._profile_stop is not None and step >= self._profile_stop:
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()
      log.info("profile of steps %d-%d in %s (TensorBoard's Profile tab)",
               self._profile_stop - self.profile_steps + 1, step, self.workdir)
      self._profile_stop, self.profile_steps = None, 0

  def scheduled(self, step: int) -> bool:
    """Whether `step` is on the `train.log_every` schedule (or the last): the lines that are the same
    in every run of a config, unlike the first step's and the once-a-minute ones."""
    return step % self.every == 0 or step == self.total

  def write_scalars(self, step: int, scalars: dict) -> None:
    """TensorBoard and log.txt: the job reports these (validation, test) in its own console line."""
    self.writer.write_scalars(step, scalars, echo=log_file)

  def write_images(self, step: int, images: dict) -> None:
    self.writer.write_images(step, images)

  def timed(self, name: str):
    """A part of the loop (validation, image summaries) reported apart in the progress line."""
    return self.progress.timed(name)

  def flush(self) -> None:
    self.writer.flush()

  def close(self) -> None:
    if self._profile_stop is not None:  # the run ended inside the traced steps
      jax.profiler.stop_trace()
      self._profile_stop = None
    self.writer.close()


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
