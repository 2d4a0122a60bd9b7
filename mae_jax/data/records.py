"""The record files every built dataset is stored in (the built-in phantom and converted folders).

One ``<split>.array_record`` file per split, one record per example, ``group_size:1`` for fast
random access. A record is an uncompressed ``.npz`` archive (no pickle): every array of two or more
dimensions, an (H, W) or (H, W, 1) uint8 image or mask, is stored PNG-encoded (lossless) as
``<key>_png``; every other field is an int64 scalar. Read back, images are (H, W, 1) uint8 and
scalars are Python ints.

A dataset directory is written under a hidden name and renamed into place when complete
(``replace_dir``), so a build killed half-way never leaves a directory that looks complete; two
processes building one dataset serialize on ``build_lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pathlib
import shutil
import threading
import zipfile

import numpy as np
from PIL import Image

# np.savez stamps the current time into every archive member, so two builds of one dataset would
# differ in bytes; a fixed stamp makes the files a function of the records alone.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _png(a: np.ndarray, compress_level: int) -> np.ndarray:
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(a, np.uint8)).save(buf, format="PNG", compress_level=compress_level)
  return np.frombuffer(buf.getvalue(), np.uint8)


def _unpng(b: np.ndarray) -> np.ndarray:
  with Image.open(io.BytesIO(b.tobytes())) as im:
    return np.asarray(im, dtype=np.uint8)[..., None]


def serialize_record(rec: dict, compress_level: int = 3) -> bytes:
  """One record's bytes. ``compress_level``: zlib's, 0-9; PNG is lossless at every level."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
    for key, value in rec.items():
      value = np.asarray(value)
      if value.ndim >= 2:
        name, value = f"{key}_png", _png(value.reshape(value.shape[:2]), compress_level)
      else:
        name, value = key, np.int64(value)
      with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME), "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)
  return buf.getvalue()


def deserialize_record(data: bytes) -> dict:
  rec = {}
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    for name in z.files:
      if name.endswith("_png"):
        rec[name[:-4]] = _unpng(z[name])
      else:
        rec[name] = int(z[name])
  return rec


@contextlib.contextmanager
def writer(path):
  """``with writer(path) as w: w.write(serialize_record(rec))``: one split's file."""
  from array_record.python.array_record_module import ArrayRecordWriter

  w = ArrayRecordWriter(os.fspath(path), "group_size:1")
  try:
    yield w
  finally:
    w.close()


class RecordFile:
  """Random access to the records of one file: ``len(f)``, ``f[i]`` → record dict.

  Picklable (grain workers): the reader is opened lazily, once per process."""

  def __init__(self, path):
    self.path = os.fspath(path)
    self._source = None
    self._lock = threading.Lock()

  def _reader(self):
    if self._source is None:
      with self._lock:
        if self._source is None:
          from array_record.python.array_record_data_source import ArrayRecordDataSource

          self._source = ArrayRecordDataSource([self.path])
    return self._source

  def __len__(self) -> int:
    return len(self._reader())

  def __getitem__(self, i: int) -> dict:
    return deserialize_record(self._reader()[int(i)])

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])


def replace_dir(new: pathlib.Path, out: pathlib.Path) -> None:
  """Move the finished build ``new`` to ``out``: a rename, so ``out`` is never half written."""
  if out.exists():
    # A directory cannot be renamed over a non-empty one: move the old one aside first.
    stale = out.parent / f".{out.name}.stale"
    if stale.exists():
      shutil.rmtree(stale)
    out.rename(stale)
    new.rename(out)
    shutil.rmtree(stale)
  else:
    new.rename(out)


@contextlib.contextmanager
def build_lock(root, name: str):
  """Two processes (test workers, the hosts of a pod sharing a disk) must not build one dataset at once."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f".{name}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
