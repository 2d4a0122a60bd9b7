"""Host-side input pipeline on grain: infinite training stream and single-pass evaluation stream.

Any random-access source works: ``len(source)`` and ``source[i]`` returning a dict with
``image`` (H, W, C) uint8 (C = 1 for ultrasound, 3 accepted), and optionally ``organ``, ``label``
and ``index`` ints and ``mask`` (H, W, 1) uint8 (segmentation classes). Records may differ in size;
every output is resized to ``image_size``.

Training stream (``train_iterator``):
  * The run is one infinite sequence of *draws* ``g = 0, 1, 2, ...``; global batch ``b`` is draws
    ``[b·B, (b+1)·B)``. Process ``p`` of ``P`` yields rows ``[p·B/P, (p+1)·B/P)`` of every global
    batch, so the P local batches concatenated in process order are the 1-process global batch.
  * Draw ``g`` → dataset index by the sampler: ``'shuffle'`` walks a fresh permutation per epoch
    (seeded by ``(seed, epoch)``), ``'balanced'`` is USFM's organ-balanced sampler (see
    :mod:`mae_jax.data.sampling`). Augmentation for draw ``g`` uses
    ``np.random.default_rng([seed, g, 1])``. Everything is a pure function of ``(seed, g)``: the
    stream does not depend on thread count, prefetching or where it was resumed.
  * Augmentation: random resized crop with torchvision ``RandomResizedCrop`` semantics (area
    fraction ~ U(scale), log aspect ratio ~ U(log ratio), 10 attempts, then the centre crop with
    the aspect ratio clamped into ``ratio``), crop first and then resize the crop with PIL
    **bicubic** (MAE's ``interpolation=3``; ``interpolation='bilinear'`` is available), then a
    horizontal flip with probability 1/2. Masks, when present, get the same crop and flip, resized
    nearest-neighbour.
  * ``rand_augment`` (e.g. ``'rand-m9-mstd0.5-inc1'``): timm's RandAugment after the flip, as
    DeblurringMIM's fine-tuning transform (:mod:`mae_jax.data.randaugment`), from
    ``np.random.default_rng([seed, g, 2])``: the crops and flips stay those of a run without it.
  * ``zoom``: float32 (2,) per example, model pixels per stored pixel along (H, W) of its crop,
    ``(S / h_box, S / w_box)``. The device uses it to blur with σ in the stored image's pixels
    (``corrupt.sigma_units='native'``): per axis, because the box need not be square (the crop's
    aspect ratio is drawn from ``ratio``) and the Gaussian is separable, so σ·zoom per axis is the
    stored-pixel blur seen through the resize; one scalar would be off by up to √(4/3) on one axis.
  * The iterator is a grain ``DatasetIterator``: ``get_state()`` / ``set_state()`` restore the
    position exactly. ``start_batch`` starts at a given global batch instead, which also works when
    the number of processes changed between runs.

Evaluation stream (``eval_iterator``): every example exactly once, resized (no crop, no flip) to
``image_size`` (``zoom`` = ``(S / H, S / W)`` of the stored image), or with ``crop_pct`` > 0 its
shorter side resized to ``int(S / crop_pct)`` and the centre S × S kept (DeblurringMIM's evaluation
transform, :func:`mae_jax.data.transforms.resize_center_crop`; ``zoom`` of the resize); global batches of ``batch_size`` split over processes like the training stream;
the last global batch is padded and a ``valid`` bool marks real rows.

Batches are dicts of numpy arrays: ``image`` uint8 (B_local, S, S, in_chans); ``organ``, ``label``,
``index`` int32 (-1 where the source has no such field); ``zoom`` float32 (B_local, 2); ``mask`` uint8 (B_local, S, S, 1) when
the source has masks; ``valid`` bool in evaluation batches.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from mae_jax.data import randaugment, transforms
from mae_jax.data.sampling import BalancedIndexSampler, EpochShuffleSampler

__all__ = [
    "random_resized_crop_params",
    "max_zoom",
    "train_iterator",
    "eval_iterator",
    "num_eval_batches",
    "dataset_stats",
    "source_organ_ids",
]

_log = logging.getLogger(__name__)

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (w/h), as MAE uses it
_AUG_STREAM = 1
_RAND_AUGMENT_STREAM = 2
_INT_FIELDS = ("organ", "label", "index")


# --------------------------------------------------------------------------------------------
# Augmentation primitives
# --------------------------------------------------------------------------------------------


def random_resized_crop_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """Crop box ``(top, left, h, w)`` with torchvision ``RandomResizedCrop.get_params`` semantics."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def max_zoom(native_min_side: int, image_size: int, scale_min: float,
             ratio: Sequence[float] = CROP_RATIO) -> float:
  """An upper bound on ``zoom`` (model pixels per stored pixel, either axis) for stored images whose
  smaller side is at least ``native_min_side``, with crop area fraction >= ``scale_min``.

  ``random_resized_crop_params`` makes ``h = round(√(A·s/r))``, ``w = round(√(A·s·r))`` with
  A = H·W >= side², s >= scale_min and r in ratio, or falls back to a centre crop whose sides are
  larger; so every box side is at least ``round(side·√(scale_min·min(1/r_max, r_min)))``. An
  evaluation image (no crop) has zoom S / side, which is smaller. The bound sizes the static
  Gaussian kernel on device.
  """
  f = math.sqrt(float(scale_min) * min(1.0 / float(ratio[1]), float(ratio[0])))
  smallest = max(1, int(round(int(native_min_side) * min(f, 1.0))))
  return float(image_size) / smallest


def _zoom(image_size: int, h: int, w: int) -> np.ndarray:
  return np.array([image_size / h, image_size / w], np.float32)


def _to_pil(a: np.ndarray) -> Image.Image:
  if a.shape[-1] == 1:
    return Image.fromarray(np.ascontiguousarray(a[..., 0]), mode="L")
  if a.shape[-1] == 3:
    return Image.fromarray(np.ascontiguousarray(a), mode="RGB")
  raise ValueError(f"image must have 1 or 3 channels, got shape {a.shape}")


def _from_pil(im: Image.Image) -> np.ndarray:
  a = np.asarray(im, dtype=np.uint8)
  return a[..., None] if a.ndim == 2 else a


def _crop_resize(a: np.ndarray, box: tuple[int, int, int, int] | None, size: int, resample) -> np.ndarray:
  im = _to_pil(a)
  if box is not None:
    top, left, h, w = box
    im = im.crop((left, top, left + w, top + h))
  if im.size != (size, size):
    im = im.resize((size, size), resample)
  return _from_pil(im)


def _as_hwc(a: Any, name: str) -> np.ndarray:
  a = np.asarray(a)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3:
    raise ValueError(f"record field {name!r} must be (H, W) or (H, W, C), got shape {a.shape}")
  if a.dtype != np.uint8:
    raise ValueError(f"record field {name!r} must be uint8, got {a.dtype}")
  return a


def _match_channels(a: np.ndarray, in_chans: int) -> np.ndarray:
  c = a.shape[-1]
  if c == in_chans:
    return a
  if c == 1 and in_chans == 3:
    return np.repeat(a, 3, axis=-1)
  if c == 3 and in_chans == 1:
    return _from_pil(_to_pil(a).convert("L"))
  raise ValueError(f"cannot map a {c}-channel image to in_chans={in_chans}")


def _int_fields(rec: dict, idx: int) -> dict[str, np.int32]:
  out = {}
  for k in _INT_FIELDS:
    v = rec.get(k, idx if k == "index" else -1)
    out[k] = np.int32(v)
  return out


def _check_args(image_size: int, in_chans: int, interpolation: str, process_index: int, process_count: int):
  if int(image_size) <= 0:
    raise ValueError(f"image_size must be > 0, got {image_size}")
  if in_chans not in (1, 3):
    raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
  if interpolation not in _RESAMPLE:
    raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")


def _has_mask(source) -> bool:
  return len(source) > 0 and "mask" in source[0]


# --------------------------------------------------------------------------------------------
# Training stream
# --------------------------------------------------------------------------------------------


def source_organ_ids(source) -> np.ndarray:
  """Organ id of every record: ``source.organ_ids`` when the source provides it, else read all."""
  ids = getattr(source, "organ_ids", None)
  if ids is not None:
    return np.asarray(ids, dtype=np.int64)
  _log.info("reading the organ of all %d records for the balanced sampler", len(source))
  return np.array([int(source[i]["organ"]) for i in range(len(source))], dtype=np.int64)


class _TrainExample:
  """Draw number → augmented example. A plain class (not a closure) so it pickles for mp_prefetch."""

  def __init__(self, source, sampler, *, seed, image_size, scale, ratio, hflip, in_chans,
               resample, with_mask, global_batch, local_batch, process_index, rand_augment=None):
    self.source, self.sampler, self.seed = source, sampler, int(seed)
    self.image_size, self.scale, self.ratio, self.hflip = int(image_size), scale, ratio, hflip
    self.in_chans, self.resample, self.with_mask = in_chans, resample, with_mask
    self.global_batch, self.local_batch, self.process_index = global_batch, local_batch, process_index
    self.rand_augment = rand_augment

  def global_draw(self, i: int) -> int:
    b, r = divmod(int(i), self.local_batch)
    return b * self.global_batch + self.process_index * self.local_batch + r

  def sampler_draw(self, g: int) -> int:
    """The sampler's draw for global draw `g`. An epoch of the shuffling sampler is ⌊N/B⌋ whole
    batches (`optim.steps_per_epoch`; the rest of its permutation is dropped, as a `drop_last`
    loader does), so every epoch starts a fresh permutation at a batch boundary."""
    if not isinstance(self.sampler, EpochShuffleSampler) or self.sampler.n < self.global_batch:
      return g
    n = self.sampler.n
    b, j = divmod(g, self.global_batch)
    epoch, k = divmod(b, n // self.global_batch)
    return epoch * n + k * self.global_batch + j

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    g = self.global_draw(i)
    idx = self.sampler[self.sampler_draw(g)]
    rec = self.source[idx]
    rng = np.random.default_rng([self.seed, g, _AUG_STREAM])
    img = _as_hwc(rec["image"], "image")
    box = random_resized_crop_params(rng, img.shape[0], img.shape[1], self.scale, self.ratio)
    flip = self.hflip and rng.random() < 0.5
    out_img = _match_channels(_crop_resize(img, box, self.image_size, self.resample), self.in_chans)
    if flip:
      out_img = out_img[:, ::-1]
    if self.rand_augment is not None:
      ra_rng = np.random.default_rng([self.seed, g, _RAND_AUGMENT_STREAM])
      out_img = randaugment.augment(out_img, ra_rng, self.rand_augment, resample=self.resample)
    out = {"image": out_img, "zoom": _zoom(self.image_size, box[2], box[3])}
    if self.with_mask:
      m = _as_hwc(rec["mask"], "mask")
      if m.shape[:2] != img.shape[:2]:
        raise ValueError(f"record {idx}: mask shape {m.shape} does not match image {img.shape}")
      m = _crop_resize(m, box, self.image_size, Image.NEAREST)
      out["mask"] = m[:, ::-1] if flip else m
    out = {k: np.ascontiguousarray(v) for k, v in out.items()}
    out.update(_int_fields(rec, idx))
    return out


class _BatchOf:
  """Batch number → the stacked examples of that local batch (for worker processes)."""

  def __init__(self, make, local_batch: int):
    self.make, self.local_batch = make, local_batch

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    rows = [self.make(b * self.local_batch + r) for r in range(self.local_batch)]
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def train_iterator(
    source,
    *,
    global_batch: int,
    image_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = CROP_RATIO,
    hflip: bool = True,
    sampler: str = "shuffle",
    organ_ids: Sequence[int] | np.ndarray | None = None,
    in_chans: int = 1,
    interpolation: str = "bicubic",
    num_threads: int = 2,
    prefetch_buffer_size: int | None = None,
    start_batch: int = 0,
    with_mask: bool | None = None,
    worker_count: int = 0,
    rand_augment: str = "",
) -> grain.DatasetIterator:
  """Infinite, deterministic, resumable training iterator yielding this process's local batches.

  Args:
    source: random-access source (``len``, ``__getitem__``) of record dicts.
    global_batch: batch size summed over all processes; must be divisible by ``process_count``.
    image_size: output side S.
    seed: non-negative int; fixes the sample order and every augmentation.
    process_index, process_count: this process and the number of processes.
    scale, ratio: random resized crop ranges (area fraction, aspect ratio w/h).
    hflip: random horizontal flip with probability 1/2.
    sampler: ``'shuffle'`` (alias ``'uniform'``, the USFM-woS ablation: a new permutation each
      epoch) or ``'balanced'`` (organ-balanced, USFM Eq. 1).
    organ_ids: organ of every record for ``'balanced'``; default ``source.organ_ids`` or read
      from the records.
    in_chans: 1, or 3 to repeat a grayscale channel.
    interpolation: ``'bicubic'`` (default, as MAE) or ``'bilinear'``.
    num_threads: grain reader threads (PIL releases the GIL while resizing).
    prefetch_buffer_size: examples read ahead; default 2 local batches (at least 8).
    start_batch: first global batch to yield (resume by step number, any process count).
    with_mask: crop/flip/resize the records' ``mask`` too; default: when the source has masks.
    worker_count: if > 0, whole local batches are built in this many grain worker processes
      (``mp_prefetch``; the source must pickle); 0 uses threads only. Same batches either way,
      but the iterator state format differs between the two.
    rand_augment: timm RandAugment string (``config.train.randaugment``); ``''`` = off.

  Returns:
    A grain ``DatasetIterator`` with ``get_state`` / ``set_state``.
  """
  _check_args(image_size, in_chans, interpolation, process_index, process_count)
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(
        f"global_batch ({global_batch}) must be a positive multiple of process_count ({process_count})"
    )
  if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
    raise ValueError(f"bad crop ranges scale={scale} ratio={ratio}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  n = len(source)
  if n == 0:
    raise ValueError("train_iterator: the source is empty")
  ra_spec = randaugment.parse(rand_augment)
  with_mask = _has_mask(source) if with_mask is None else with_mask
  if ra_spec is not None and with_mask:
    raise ValueError(f"config.{randaugment.FIELD}={rand_augment!r}: RandAugment is for classification; "
                     "masks would not follow its geometric ops")
  if sampler in ("shuffle", "uniform"):
    index_sampler = EpochShuffleSampler(n, seed)
  elif sampler == "balanced":
    ids = source_organ_ids(source) if organ_ids is None else np.asarray(organ_ids)
    if len(ids) != n:
      raise ValueError(f"organ_ids has {len(ids)} entries for a source of {n} records")
    index_sampler = BalancedIndexSampler(ids, seed, mode="balanced")
  else:
    raise ValueError(f"sampler must be 'shuffle' (alias 'uniform') or 'balanced', got {sampler!r}")

  local_batch = global_batch // process_count
  make = _TrainExample(
      source, index_sampler, seed=seed, image_size=image_size, scale=tuple(scale),
      ratio=tuple(ratio), hflip=hflip, in_chans=in_chans, resample=_RESAMPLE[interpolation],
      with_mask=with_mask, global_batch=global_batch, local_batch=local_batch,
      process_index=process_index, rand_augment=ra_spec,
  )
  if worker_count > 0:
    # Batch before the process split so that each worker builds whole batches: the output
    # does not depend on the number of workers.
    ds = grain.MapDataset.range(int(start_batch), sys.maxsize // local_batch)
    batch_read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)
    ds = ds.map(_BatchOf(make, local_batch)).to_iter_dataset(batch_read)
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; programs not started by absl.app never parse them.
      flags.FLAGS.mark_as_parsed()
    return iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count)))
  if prefetch_buffer_size is None:
    prefetch_buffer_size = max(2 * local_batch, 8)
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
  ds = grain.MapDataset.range(int(start_batch) * local_batch, sys.maxsize).map(make)
  return iter(ds.to_iter_dataset(read).batch(local_batch, drop_remainder=True))


# --------------------------------------------------------------------------------------------
# Evaluation stream
# --------------------------------------------------------------------------------------------


def num_eval_batches(n: int, batch_size: int) -> int:
  """Number of (global) evaluation batches covering ``n`` examples."""
  return -(-int(n) // int(batch_size))


class _EvalExample:
  def __init__(self, source, *, image_size, in_chans, resample, with_mask, global_batch,
               local_batch, process_index, template, crop_pct=0.0):
    self.source, self.n = source, len(source)
    self.image_size, self.in_chans, self.resample = int(image_size), in_chans, resample
    self.with_mask = with_mask
    self.global_batch, self.local_batch, self.process_index = global_batch, local_batch, process_index
    self.template = template
    self.crop_pct = float(crop_pct)

  def _resize(self, a: np.ndarray, resample) -> tuple[np.ndarray, np.ndarray]:
    if self.crop_pct <= 0:
      return _crop_resize(a, None, self.image_size, resample), _zoom(self.image_size, *a.shape[:2])
    im, (h, w) = transforms.resize_center_crop(_to_pil(a), self.image_size, self.crop_pct, resample)
    return _from_pil(im), np.array([h / a.shape[0], w / a.shape[1]], np.float32)

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    b, r = divmod(int(i), self.local_batch)
    g = b * self.global_batch + self.process_index * self.local_batch + r
    if g >= self.n:
      return {k: v.copy() for k, v in self.template.items()}
    rec = self.source[g]
    image, zoom = self._resize(_as_hwc(rec["image"], "image"), self.resample)
    out = {"image": _match_channels(image, self.in_chans), "zoom": zoom}
    if self.with_mask:
      out["mask"] = self._resize(_as_hwc(rec["mask"], "mask"), Image.NEAREST)[0]
    out.update(_int_fields(rec, g))
    out["valid"] = np.bool_(True)
    return out


def eval_iterator(
    source,
    *,
    batch_size: int,
    image_size: int,
    process_index: int = 0,
    process_count: int = 1,
    in_chans: int = 1,
    interpolation: str = "bicubic",
    num_threads: int = 2,
    with_mask: bool | None = None,
    crop_pct: float = 0.0,
) -> grain.DatasetIterator:
  """Deterministic single pass over ``source`` in this process's slice of each global batch.

  ``batch_size`` is global (a multiple of ``process_count``). Every process yields
  ``num_eval_batches(len(source), batch_size)`` batches; padded rows are zero images with
  ``label`` 0, ``organ`` 0, ``index`` -1 and ``valid`` False, so jitted metrics can run on them
  and mask them out. ``crop_pct`` > 0: shorter side to ``int(image_size / crop_pct)``, centre crop
  (``config.data.eval_crop_pct``); 0 resizes the whole image.
  """
  _check_args(image_size, in_chans, interpolation, process_index, process_count)
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
        f"batch_size ({batch_size}) must be a positive multiple of process_count ({process_count})"
    )
  if not 0.0 <= crop_pct <= 1.0:
    raise ValueError(f"config.data.eval_crop_pct={crop_pct!r}: must be 0 or lie in (0, 1]")
  n = len(source)
  if n == 0:
    raise ValueError("eval_iterator: the source is empty")
  local_batch = batch_size // process_count
  with_mask = _has_mask(source) if with_mask is None else with_mask
  template = {
      "image": np.zeros((image_size, image_size, in_chans), np.uint8),
      "zoom": np.ones((2,), np.float32),
      "organ": np.int32(0),
      "label": np.int32(0),
      "index": np.int32(-1),
      "valid": np.bool_(False),
  }
  if with_mask:
    template["mask"] = np.zeros((image_size, image_size, 1), np.uint8)
  make = _EvalExample(
      source, image_size=image_size, in_chans=in_chans, resample=_RESAMPLE[interpolation],
      with_mask=with_mask, global_batch=batch_size, local_batch=local_batch,
      process_index=process_index, template=template, crop_pct=crop_pct,
  )
  total = num_eval_batches(n, batch_size) * local_batch
  ds = grain.MapDataset.range(total).map(make)
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * local_batch, 8))
  return iter(ds.to_iter_dataset(read).batch(local_batch, drop_remainder=True))


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def dataset_stats(source, n: int = 256) -> tuple[float, float]:
  """(mean, std) of pixel intensities in [0, 1], pooled over all pixels of up to ``n`` records.

  The records are ``n`` evenly spaced indices (all of them when the source is smaller), so the
  result is deterministic. Images are used at their stored resolution.
  """
  size = len(source)
  if size == 0:
    raise ValueError("dataset_stats: the source is empty")
  idx = np.unique(np.linspace(0, size - 1, min(int(n), size)).round().astype(np.int64))
  total = total_sq = count = 0.0
  for i in idx:
    a = np.asarray(source[int(i)]["image"], dtype=np.float64) / 255.0
    total += a.sum()
    total_sq += np.square(a).sum()
    count += a.size
  mean = total / count
  var = max(total_sq / count - mean * mean, 0.0)
  return float(mean), float(math.sqrt(var))
