"""Metric writers: TensorBoard event files and console lines.

clu's metric writers import TensorFlow; this project does not need TensorFlow anywhere, so events are
written with TensorBoard's own TF-free event writer (the one torch's SummaryWriter also uses).
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

log = logging.getLogger("mae_jax")


def _png(image: np.ndarray) -> tuple[bytes, int, int]:
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue(), arr.shape[0], arr.shape[1]


class TensorBoardWriter:
  """Scalars and images as TensorBoard events, in `logdir`."""

  def __init__(self, logdir: str):
    self._writer = EventFileWriter(logdir, flush_secs=30)

  def _add(self, step: int, values: list[summary_pb2.Summary.Value]):
    event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
    self._writer.add_event(event)

  def write_scalars(self, step: int, scalars: dict):
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()])

  def write_images(self, step: int, images: dict):
    values = []
    for tag, img in images.items():
      png, h, w = _png(img)
      c = 1 if np.asarray(img).ndim == 2 or np.asarray(img).shape[-1] == 1 else 3
      values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
          height=h, width=w, colorspace=c, encoded_image_string=png)))
    self._add(step, values)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class NullWriter:
  """What non-zero processes get: only process 0 writes logs and figures."""

  def write_scalars(self, step, scalars):
    pass

  def write_images(self, step, images):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
