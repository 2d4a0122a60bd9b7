"""TFDS builder ``us_phantom``: the simulated ultrasound phantom stored as array_record.

TensorFlow is not needed to build or read it: images are PNG-encoded with OpenCV here (TFDS's own
``Image`` encoder calls ``tf.image.encode_png``, but it accepts already-encoded bytes) and the
ArrayRecord data source decodes them with OpenCV.

    builder = build("/data/tfds", num_train=2000)          # builds once, then reuses
    source = data_source("/data/tfds", "train", num_train=2000)
    record = source[0]  # {'image': (S,S,1) uint8, 'organ', 'label', 'mask': (S,S,1) uint8, 'index'}

Records are stored in index order (shuffling disabled), so ``source[i]['index'] == start + i``
with train = [0, n_train), validation = [n_train, n_train + n_val), test after that.

Building uses a process pool (spawn start method, safe when JAX is already imported). Scripts
that call ``build`` at import time must guard their entry point with
``if __name__ == "__main__":``, as for any spawn-based multiprocessing.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import multiprocessing
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from mae_jax.data import phantom

# Bump when the simulation or the stored features change: data built by another version is then
# rebuilt instead of silently reused.
VERSION = tfds.core.Version("1.0.0")
SPLITS = ("train", "validation", "test")
# Below this many examples a split is simulated in-process: spawning workers costs ~1 s each.
_MIN_EXAMPLES_FOR_POOL = 100


@dataclasses.dataclass(eq=False)
class UsPhantomConfig(tfds.core.BuilderConfig):
  num_train: int = 2000
  num_validation: int = 200
  num_test: int = 200
  image_size: int = 256
  seed: int = 0
  task: str = "pretrain"  # "enhance": paired low / high-quality acquisitions (phantom_pairs)

  def split_ranges(self) -> dict[str, tuple[int, int]]:
    """Disjoint example-index ranges [start, stop) of the splits."""
    sizes = (self.num_train, self.num_validation, self.num_test)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return {name: (int(starts[k]), int(starts[k + 1])) for k, name in enumerate(SPLITS)}


TASKS = ("pretrain", "enhance")


def make_config(
  *, num_train=2000, num_validation=200, num_test=200, image_size=256, seed=0, task="pretrain"
) -> UsPhantomConfig:
  """A config whose name encodes every field, so different sizes never share a directory."""
  for field, value in (
    ("num_train", num_train),
    ("num_validation", num_validation),
    ("num_test", num_test),
  ):
    if int(value) < 0:
      raise ValueError(f"{field} must be >= 0, got {value}")
  if int(image_size) < 16:
    raise ValueError(f"image_size must be >= 16, got {image_size}")
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  name = f"s{image_size}_tr{num_train}_va{num_validation}_te{num_test}_seed{seed}"
  if task != "pretrain":  # the existing configs keep their names (and so their built data)
    name += f"_{task}"
  return UsPhantomConfig(
    name=name,
    version=VERSION,
    description=f"{image_size}px simulated B-mode images, seed {seed}",
    num_train=int(num_train),
    num_validation=int(num_validation),
    num_test=int(num_test),
    image_size=int(image_size),
    seed=int(seed),
    task=task,
  )


def _png(array: np.ndarray) -> bytes:
  # Pillow (a runtime dependency; OpenCV is only a test reference). Level 1 = zlib's fastest:
  # the build is dominated by the simulation, and PNG is lossless at every level.
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def _encoded_example(job: tuple) -> tuple[int, dict[str, Any]]:
  """Worker: simulate one example and encode its images (runs in a child process)."""
  seed, index, size = job[:3]
  if len(job) > 3 and job[3] == "enhance":
    from mae_jax.data import phantom_pairs
    ex = phantom_pairs.simulate_pair(seed, index, size)
    return index, {"low": _png(ex["low"]), "high": _png(ex["high"]), "organ": ex["organ"],
                   "label": ex["label"], "mask": _png(ex["mask"]), "index": index}
  ex = phantom.simulate(seed, index, size)
  return index, {
    "image": _png(ex["image"]),
    "organ": ex["organ"],
    "label": ex["label"],
    "mask": _png(ex["mask"]),
    "index": index,
  }


def _default_workers() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


class UsPhantom(tfds.core.GeneratorBasedBuilder):
  """Simulated B-mode ultrasound with organ and class labels and lesion masks."""

  VERSION = VERSION
  BUILDER_CONFIGS = [make_config()]
  RELEASE_NOTES = {"1.0.0": "Physics-based B-mode phantom (see docs/phantom.md)."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10's default imports the `importlib_resources` backport, which it declares as
    # a dependency only on Python < 3.9, so it fails on 3.12 for builders inside a package.
    return epath.Path(__file__)

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and
  # prepared" for every builder: nothing is downloaded here, so say what happens, in the log.
  def _log_download_bytes(self) -> None:
    c = self.builder_config
    logging.getLogger("mae_jax").info(
        "simulating the built-in dataset once (%d train, %d validation, %d test images, %d px) into %s",
        c.num_train, c.num_validation, c.num_test, c.image_size, self.data_dir)

  def _log_download_done(self) -> None:
    logging.getLogger("mae_jax").info("built-in dataset ready in %s", self.data_dir)

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    self._num_workers = _default_workers() if num_workers is None else max(1, int(num_workers))
    self._pool = None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    if self.builder_config.task == "enhance":
      return self._enhance_info(size)
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "Simulated B-mode ultrasound: anatomy templates of five organs, fully developed "
        "speckle from complex Gaussian scatterers, pulse-echo PSF, attenuation with TGC, "
        "log compression, linear and convex probes, benign / malignant lesions with masks."
      ),
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(size, size, 1), encoding_format="png"),
          "organ": tfds.features.ClassLabel(names=list(phantom.ORGANS)),
          "label": tfds.features.ClassLabel(names=list(phantom.CLASSES)),
          "mask": tfds.features.Image(shape=(size, size, 1), encoding_format="png"),
          "index": tfds.features.Scalar(dtype=np.int64),
        }
      ),
      supervised_keys=("image", "label"),
      # Keep records in index order: record i of a split is example start + i.
      disable_shuffling=True,
    )

  def _enhance_info(self, size: int) -> tfds.core.DatasetInfo:
    image = lambda: tfds.features.Image(shape=(size, size, 1), encoding_format="png")
    return tfds.core.DatasetInfo(
      builder=self,
      description="Paired low / high-quality acquisitions of one simulated scene (phantom_pairs).",
      features=tfds.features.FeaturesDict(
        {
          "low": image(),
          "high": image(),
          "organ": tfds.features.ClassLabel(names=list(phantom.ORGANS)),
          "label": tfds.features.ClassLabel(names=list(phantom.CLASSES)),
          "mask": image(),
          "index": tfds.features.Scalar(dtype=np.int64),
        }
      ),
      disable_shuffling=True,
    )

  def _download_and_prepare(self, dl_manager, download_config=None):
    # One pool serves all splits; spawn avoids forking a process that runs JAX threads.
    largest = max(stop - start for start, stop in self.builder_config.split_ranges().values())
    if self._num_workers > 1 and largest >= _MIN_EXAMPLES_FOR_POOL:
      with multiprocessing.get_context("spawn").Pool(self._num_workers) as pool:
        self._pool = pool
        try:
          return super()._download_and_prepare(dl_manager, download_config)
        finally:
          self._pool = None
    return super()._download_and_prepare(dl_manager, download_config)

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    # TFDS cannot write an empty split, so a size of 0 leaves the split out.
    return {
      name: self._generate_examples(start, stop)
      for name, (start, stop) in cfg.split_ranges().items()
      if stop > start
    }

  def _generate_examples(self, start: int, stop: int) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self.builder_config
    jobs = [(cfg.seed, index, cfg.image_size) + ((cfg.task,) if cfg.task != "pretrain" else ())
            for index in range(start, stop)]
    if self._pool is not None and len(jobs) >= _MIN_EXAMPLES_FOR_POOL:
      results = self._pool.imap(_encoded_example, jobs, chunksize=8)  # ordered
    else:
      results = map(_encoded_example, jobs)
    yield from results


def builder(data_dir: str, *, num_workers: int | None = None, **config) -> UsPhantom:
  """The builder for this config (not built yet if it was never built).

  ``config``: the keyword arguments of ``make_config`` (sizes, image size, seed), which holds
  their defaults and checks them."""
  cfg = make_config(**config)
  # TFDS refuses a new config object that shares its name with a predefined one.
  cfg = UsPhantom.builder_configs.get(cfg.name, cfg)
  return UsPhantom(
    config=cfg,
    data_dir=os.fspath(data_dir),
    file_format="array_record",
    num_workers=num_workers,
  )


def build(data_dir: str, *, num_workers: int | None = None, **config) -> UsPhantom:
  """Build the dataset under ``data_dir`` if it is not there yet; return the builder.

  ``config``: as for ``builder``."""
  b = builder(data_dir, num_workers=num_workers, **config)
  b.download_and_prepare(
    file_format="array_record",
    download_config=tfds.download.DownloadConfig(try_download_gcs=False),
  )
  return b


class PhantomSource:
  """Random-access source (grain's ``RandomAccessDataSource`` protocol) over one split.

  Each record is a dict of numpy arrays: image (S,S,1) uint8, organ (), label (), mask
  (S,S,1) uint8 with values 0/1, index () int64. ``organ_ids`` and ``labels`` give every
  record's organ and class without decoding images (the organ-balanced sampler needs them).
  Picklable: the ArrayRecord reader is reopened lazily in each process."""

  def __init__(self, data_dir: str, split: str, *, num_workers: int | None = None, **config):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    self.data_dir, self.split = os.fspath(data_dir), split
    self.kwargs = dict(config, num_workers=num_workers)
    cfg = make_config(**config)
    self._seed = cfg.seed
    self.start, stop = cfg.split_ranges()[split]
    self._len = stop - self.start
    if self._len == 0:
      raise ValueError(f"split {split!r} is empty: num_{split} is 0")
    b = builder(self.data_dir, **self.kwargs)
    if not b.is_prepared():
      build(self.data_dir, **self.kwargs)
    self._source = None

  def _open(self):
    if self._source is None:  # no building here: worker processes only read
      self._source = builder(self.data_dir, **self.kwargs).as_data_source(split=self.split)
    return self._source

  def __len__(self) -> int:
    return self._len

  @functools.cached_property
  def _metas(self) -> np.ndarray:
    return np.array(
      [phantom.example_meta(self._seed, self.start + i) for i in range(self._len)], np.int64
    ).reshape(-1, 2)

  @property
  def organ_ids(self) -> np.ndarray:
    return self._metas[:, 0]

  @property
  def labels(self) -> np.ndarray:
    return self._metas[:, 1]

  @staticmethod
  def _to_numpy(record: dict) -> dict[str, np.ndarray]:
    if "low" in record:  # task="enhance"
      return {k: np.asarray(record[k], np.uint8 if k in ("low", "high", "mask") else np.int64)
              for k in ("low", "high", "organ", "label", "mask", "index")}
    return {
      "image": np.asarray(record["image"], np.uint8),
      "organ": np.asarray(record["organ"], np.int64),
      "label": np.asarray(record["label"], np.int64),
      "mask": np.asarray(record["mask"], np.uint8),
      "index": np.asarray(record["index"], np.int64),
    }

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i = int(i)
    if i < 0:
      i += self._len
    if not 0 <= i < self._len:
      raise IndexError(f"record {i} out of range for split {self.split!r} of length {self._len}")
    return self._to_numpy(self._open()[i])

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    return [self[i] for i in indices]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __repr__(self) -> str:
    return f"PhantomSource({self.data_dir!r}, {self.split!r}, n={self._len}, {self.kwargs})"


def data_source(
  data_dir: str, split: str, *, num_workers: int | None = None, **config
) -> PhantomSource:
  """Random-access source over ``split`` of the dataset (built first if missing).

  ``config``: as for ``builder``."""
  return PhantomSource(data_dir, split, num_workers=num_workers, **config)
