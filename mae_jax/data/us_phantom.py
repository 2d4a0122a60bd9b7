"""The built-in dataset ``us_phantom``: the simulated ultrasound phantom, stored as record files.

    b = build("/data/mae_jax", num_train=2000)             # builds once, then reuses
    source = data_source("/data/mae_jax", "train", num_train=2000)
    record = source[0]  # {'image': (S,S,1) uint8, 'organ', 'label', 'mask': (S,S,1) uint8, 'index'}

A config lives in ``<data_dir>/us_phantom/<config name>/<VERSION>/``: one ``<split>.array_record``
per non-empty split in the format of ``records.py`` (the folder datasets' format), and
``metadata.json``, written last. Records are stored in index order, so
``source[i]['index'] == start + i`` with train = [0, n_train), validation = [n_train, n_train +
n_val), test after that.

Building uses a process pool (spawn start method, safe when JAX is already imported). Scripts
that call ``build`` at import time must guard their entry point with
``if __name__ == "__main__":``, as for any spawn-based multiprocessing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import multiprocessing
import os
import pathlib
import shutil

import numpy as np

from mae_jax.data import phantom, records

log = logging.getLogger("mae_jax")

# Bump when the simulation or the stored records change: data built by another version is then
# built again in its own directory instead of silently reused. (1.0.0 was the TFDS layout; 2.0.0
# the raw display, brighter and with finer speckle than real scanners: docs/phantom.md.)
VERSION = "3.0.0"
FORMAT = "mae_jax.us_phantom/v2"
SPLITS = ("train", "validation", "test")
TASKS = ("pretrain", "enhance")
# The display every stored image gets (phantom.simulate's options): measured against real B-mode
# frames at a matched pixel size, it brings grey levels and speckle size within 1.6x of them, where the
# raw display was 4-7x brighter with 2.5x finer speckle (docs/phantom.md, "Phantom vs real frames").
DISPLAY = {"display_gain_db": 20.0, "display_smoothing": 2.0}
# Below this many examples a split is simulated in-process: spawning workers costs ~1 s each.
_MIN_EXAMPLES_FOR_POOL = 100


@dataclasses.dataclass(frozen=True)
class UsPhantomConfig:
  num_train: int = 2000
  num_validation: int = 200
  num_test: int = 200
  image_size: int = 256
  seed: int = 0
  task: str = "pretrain"  # "enhance": paired low / high-quality acquisitions (phantom_pairs)

  @property
  def name(self) -> str:
    """Encodes every field, so different sizes never share a directory."""
    name = (f"s{self.image_size}_tr{self.num_train}_va{self.num_validation}_te{self.num_test}"
            f"_seed{self.seed}")
    return name if self.task == "pretrain" else f"{name}_{self.task}"

  def split_ranges(self) -> dict[str, tuple[int, int]]:
    """Disjoint example-index ranges [start, stop) of the splits."""
    sizes = (self.num_train, self.num_validation, self.num_test)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return {name: (int(starts[k]), int(starts[k + 1])) for k, name in enumerate(SPLITS)}


def make_config(
  *, num_train=2000, num_validation=200, num_test=200, image_size=256, seed=0, task="pretrain"
) -> UsPhantomConfig:
  """The config of these sizes, checked."""
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
  return UsPhantomConfig(num_train=int(num_train), num_validation=int(num_validation),
                         num_test=int(num_test), image_size=int(image_size), seed=int(seed), task=task)


def _encoded_example(job: tuple) -> bytes:
  """Worker: simulate one example and serialize it (runs in a child process)."""
  seed, index, size, task = job
  if task == "enhance":
    from mae_jax.data import phantom_pairs
    ex = phantom_pairs.simulate_pair(seed, index, size)
    rec = {"low": ex["low"], "high": ex["high"], "organ": ex["organ"], "label": ex["label"],
           "mask": ex["mask"], "index": index}
  else:
    ex = phantom.simulate(seed, index, size, **DISPLAY)
    rec = {"image": ex["image"], "organ": ex["organ"], "label": ex["label"], "mask": ex["mask"],
           "index": index}
  # zlib's fastest level: the build is dominated by the simulation, and PNG is lossless at every level.
  return records.serialize_record(rec, compress_level=1)


def _default_workers() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _metadata(cfg: UsPhantomConfig) -> dict:
  ranges = cfg.split_ranges()
  images = ["low", "high", "mask"] if cfg.task == "enhance" else ["image", "mask"]
  return {
    "format": FORMAT,
    "version": VERSION,
    "config": dataclasses.asdict(cfg),
    "display": DISPLAY if cfg.task == "pretrain" else None,
    "counts": {s: stop - start for s, (start, stop) in ranges.items()},
    "first_index": {s: start for s, (start, _) in ranges.items()},
    "organs": list(phantom.ORGANS),
    "classes": list(phantom.CLASSES),
    "images": images,  # (S, S, 1) uint8; 'mask' holds 0/1
    "scalars": ["organ", "label", "index"],
    "description": ("Paired low / high-quality acquisitions of one simulated scene (phantom_pairs)."
                    if cfg.task == "enhance" else
                    "Simulated B-mode ultrasound: anatomy templates of five organs, fully developed "
                    "speckle from complex Gaussian scatterers, pulse-echo PSF, attenuation with TGC, "
                    "log compression, linear and convex probes, benign / malignant lesions with masks."),
  }


class UsPhantom:
  """One config of the dataset under ``data_dir``: where it lives, whether it is built, building it."""

  name = "us_phantom"

  def __init__(self, data_dir, config: UsPhantomConfig, *, num_workers: int | None = None):
    self.config = config
    self.root = pathlib.Path(os.fspath(data_dir)).expanduser().absolute()
    self.data_path = self.root / self.name / config.name / VERSION
    self.data_dir = str(self.data_path)
    self._num_workers = _default_workers() if num_workers is None else max(1, int(num_workers))

  @functools.cached_property
  def metadata(self) -> dict:
    return json.loads((self.data_path / "metadata.json").read_text())

  def is_prepared(self) -> bool:
    """A complete build of this config (metadata.json is written last)."""
    try:
      meta = json.loads((self.data_path / "metadata.json").read_text())
    except (OSError, ValueError):
      return False
    return meta.get("format") == FORMAT and meta.get("config") == dataclasses.asdict(self.config)

  def prepare(self) -> None:
    """Simulate and write the dataset unless it is built; safe when several processes call it."""
    if self.is_prepared():
      return
    with records.build_lock(self.data_path.parent, self.data_path.name):
      if not self.is_prepared():  # another process may have built it while this one waited
        self._write()

  def _write(self) -> None:
    c = self.config
    log.info("simulating the built-in dataset once (%d train, %d validation, %d test images, %d px) into %s",
             c.num_train, c.num_validation, c.num_test, c.image_size, self.data_path)
    work = self.data_path.parent / f".{self.data_path.name}.partial"
    if work.exists():  # the leftover of a killed build
      shutil.rmtree(work)
    work.mkdir(parents=True)
    ranges = {s: r for s, r in c.split_ranges().items() if r[1] > r[0]}
    largest = max((stop - start for start, stop in ranges.values()), default=0)
    use_pool = self._num_workers > 1 and largest >= _MIN_EXAMPLES_FOR_POOL
    # One pool serves all splits; spawn avoids forking a process that runs JAX threads.
    with (multiprocessing.get_context("spawn").Pool(self._num_workers) if use_pool
          else contextlib.nullcontext()) as pool:
      for split, (start, stop) in ranges.items():
        jobs = [(c.seed, index, c.image_size, c.task) for index in range(start, stop)]
        if use_pool and len(jobs) >= _MIN_EXAMPLES_FOR_POOL:
          results = pool.imap(_encoded_example, jobs, chunksize=8)  # ordered
        else:
          results = map(_encoded_example, jobs)
        with records.writer(work / f"{split}.array_record") as w:
          for data in results:
            w.write(data)
    (work / "metadata.json").write_text(json.dumps(_metadata(c), indent=1))
    records.replace_dir(work, self.data_path)
    log.info("built-in dataset ready in %s", self.data_path)


def builder(data_dir, *, num_workers: int | None = None, **config) -> UsPhantom:
  """The dataset of this config under ``data_dir`` (not built yet if it was never built).

  ``config``: the keyword arguments of ``make_config`` (sizes, image size, seed, task), which holds
  their defaults and checks them."""
  return UsPhantom(data_dir, make_config(**config), num_workers=num_workers)


def build(data_dir, *, num_workers: int | None = None, **config) -> UsPhantom:
  """Build the dataset under ``data_dir`` if it is not there yet; return it.

  ``config``: as for ``builder``."""
  b = builder(data_dir, num_workers=num_workers, **config)
  b.prepare()
  return b


class PhantomSource:
  """Random-access source (grain's ``RandomAccessDataSource`` protocol) over one split.

  Each record is a dict of numpy arrays: image (S,S,1) uint8, organ (), label (), mask
  (S,S,1) uint8 with values 0/1, index () int64 (``task='enhance'``: low and high instead of
  image). ``organ_ids`` and ``labels`` give every record's organ and class without decoding
  images (the organ-balanced sampler needs them); ``metadata`` is the build's metadata.json.
  Picklable: the record reader is reopened lazily in each process."""

  def __init__(self, data_dir, split: str, *, num_workers: int | None = None, **config):
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
    b = build(self.data_dir, **self.kwargs)
    self.metadata = b.metadata
    self._records = records.RecordFile(b.data_path / f"{split}.array_record")

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

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i = int(i)
    if i < 0:
      i += self._len
    if not 0 <= i < self._len:
      raise IndexError(f"record {i} out of range for split {self.split!r} of length {self._len}")
    # Scalars as 0-d int64 arrays, as the pipeline batches them.
    return {k: v if isinstance(v, np.ndarray) else np.asarray(v, np.int64)
            for k, v in self._records[i].items()}

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f"PhantomSource({self.data_dir!r}, {self.split!r}, n={self._len}, {self.kwargs})"


def data_source(data_dir, split: str, *, num_workers: int | None = None, **config) -> PhantomSource:
  """Random-access source over ``split`` of the dataset (built first if missing).

  ``config``: as for ``builder``."""
  return PhantomSource(data_dir, split, num_workers=num_workers, **config)
