"""Real images from a folder tree → a random-access dataset with the us_phantom record layout.

``build_folder_dataset(root, out_dir, task=...)`` converts a tree of PNG/JPEG/BMP/TIFF/GIF and
DICOM files (``dicom.py``: frames, B-mode regions) into ``out_dir``::

    train.array_record, validation.array_record, test.array_record   one record per image (view)
    metadata.json        names, counts (images, groups) per split, train mean/std, mask value
                         mapping, build options, ``source_digest`` of the source fingerprint
    files.json           per split, in record order: [source path relative to root, organ, label,
                         frame, region (-1: whole frame), hashed group, (axial, lateral) mm or null]
    source_files.json    the source fingerprint the build was made from (see below)
    build_report.json    every skipped file (and unlistable folder) with its reason, every converted
                         file with what was done, the hashed groups of each split

and ``folder_source(out_dir, split)`` reads a split back with random access (``len``, ``[i]``).

Records are dicts of numpy values like ``us_phantom.data_source``: ``image`` (H, W, 1) uint8,
``organ`` int, ``label`` int, ``index`` int, and for ``task='segment'``
``mask`` (H, W, 1) uint8 of class ids. Fields that a task does not define are -1 (``label`` for
pretraining, ``organ`` for classification and segmentation). As in us_phantom, ``index`` is unique
across splits: train is [0, n_train), validation follows, then test; ``src[i]["index"]`` is the
split's offset + i. On disk the records are those of ``records.py`` (an ``.npz`` archive,
no pickle, image and mask PNG-encoded, in one ArrayRecord file per split), as the built-in phantom's.

Patient-level splits: every image belongs to a group (``groups.py``: ``groups.csv``, the DICOM
study or patient, a patient sub-folder, else the file itself) and splits deal out whole groups.

Layouts
  * ``pretrain``: first-level folders name the organ (files in deeper folders belong to their
    first-level folder). Images lying directly in the root get the organ ``"unspecified"``.
  * ``classify``: first-level folders name the class; loose images in the root are skipped.
  * ``segment``: image/mask pairs, either BUSI-style ``name.png`` + ``name_mask.png`` in the same
    folder (several ``name_mask_1.png``, ... are merged by pixel-wise maximum, i.e. union for binary
    masks), or parallel ``images/`` and ``masks/`` folders (``image``/``mask`` also accepted) whose
    files match by relative path and stem (the mask may carry a ``_mask`` suffix). A first-level
    folder (outside ``images``/``masks``) names the class of the pair, stored in ``label``.
  * Split folders ``train/`` (``training``), ``validation/`` (``val``, ``valid``), ``test/``
    (``testing``) directly under the root are used when present; a missing validation folder is
    carved out of train (stratified, ratio ``split_ratio[1] : split_ratio[0]``) and a missing test
    split stays empty (both noted in the report). Without split folders the images are split
    stratified by organ/class with ``split_ratio`` (default 3:1:1) and ``split_seed``; per group
    the counts follow the largest-remainder rule, so e.g. 5 images give 3/1/1.
  * In ``pretrain``/``classify``, files named ``*_mask.*`` or inside a ``masks``/``mask`` folder are
    skipped as segmentation masks.

Conversions (each listed per file in the report)
  * Everything becomes 8-bit grayscale. RGB and other colour modes: ITU-R 601-2 luminance as PIL's
    ``convert('L')`` (L = 0.299 R + 0.587 G + 0.114 B). RGBA/LA/palette with transparency: the alpha
    channel is dropped (not composited), then luminance.
  * 16-bit (PIL ``I;16*``), 32-bit integer (``I``) and float (``F``) images: min-max scaled from the
    file's own [min, max] to [0, 255] and rounded; a constant image becomes 0.
  * Multi-frame TIFF/GIF: the first frame only. EXIF orientation tags are not applied (pixels are
    used as stored, so an image and its mask can never disagree).
  * ``metadata["mean"]``/``["std"]``: over all pixels of all train images (as stored), in [0, 1].
  * ``image_size``: when given, images are resized to ``image_size × image_size`` (bicubic; masks
    nearest), ignoring aspect ratio as the evaluation pipeline does; else stored at native size.
  * Masks keep their raw values (no scaling; RGB masks are reduced to luminance, palette masks keep
    their palette indices). The sorted unique values over all usable masks map to class ids
    0..K-1 (``metadata["mask_values"][k]`` is the raw value of class k, so {0, 255} → {0, 1}).
    ``binarize_masks=True`` maps every non-zero value to 1 instead.

Skipped (with the reason in the report): zero-byte files, files PIL cannot identify (e.g. text
named .png), truncated or otherwise undecodable files, files that cannot be read (permissions,
symbolic-link loops), images larger than PIL's ``Image.MAX_IMAGE_PIXELS`` (about 89 M pixels: a
decompression-bomb guard; the header alone is read), images with a side below ``min_size``
(default 32), hidden files, files with a non-image extension, images without a mask and masks
without an image (segment), masks whose size differs from their image. Folders behind symbolic
links are not entered (no loop can form). File names need not be UTF-8: they are kept as Python
reads them and logged with ``\\xNN`` escapes. The build logs one summary line (images per split,
files skipped and converted) and one warning per entry of the report's ``warnings``: a
first-level folder with no usable image (it is not a class or organ), a class absent from a
split (e.g. a class with a single image is in train only).

A missing or empty root, or no usable image left, raises ``ValueError`` naming the path.

Freshness and atomicity
  * ``source_fingerprint(root)``: relative path → [size, mtime_ns] of every file the conversion
    may read (image extensions, not hidden) and → [] for every non-hidden folder (an empty
    ``val/`` or ``masks/`` folder changes the split or the pairing). One ``stat`` per file, no
    bytes read. Hidden files and other extensions are left out: they never change a record, and
    a Finder-written ``.DS_Store`` must not trigger a rebuild (the report's list of skipped
    files may then be out of date).
  * A dataset in ``out_dir`` is reused only when its options and its ``source_digest`` match the
    folder as it is now; otherwise it is rebuilt (``overwrite`` forces that).
  * A build writes into ``.<out_dir name>.partial`` next to ``out_dir`` and renames it into place
    when complete, so a build killed half-way never leaves an ``out_dir`` that looks complete.
    Two builds of the same ``out_dir`` at once are the caller's to prevent
    (``sources.open_source`` holds a file lock); a rebuild replaces ``out_dir`` under any
    process still reading it, which is why ``open_source`` gives every source state its own
    ``out_dir`` instead.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from mae_jax.data import dicom, groups
from mae_jax.data.folder_read import _printable, _read_image, _read_mask, _Skip, read_gray
from mae_jax.data.records import RecordFile, deserialize_record, replace_dir, serialize_record, writer
from mae_jax.data.folder_scan import (_IMAGE_DIRS, _MASK_DIRS, _NO_GROUP, _SPLIT_ALIASES, FORMAT,
                                      IMAGE_EXTENSIONS, SPLITS, _discover_labelled, _discover_segment,
                                      _Item, _list_files, _rel, check_layout, describe_change,
                                      enhance_layout, fingerprint_digest, source_fingerprint)

__all__ = [
    "build_folder_dataset", "folder_source", "FolderSource", "IMAGE_EXTENSIONS", "SPLITS",
    "source_fingerprint", "fingerprint_digest", "describe_change", "check_layout", "enhance_layout",
    "read_gray", "serialize_record", "deserialize_record", "split_summary",
]

log = logging.getLogger("mae_jax")

_MAX_MASK_CLASSES = 64
_BUILD_KEYS = ("root", "task", "image_size", "split_seed", "split_ratio", "min_size", "binarize_masks",
               "dicom_frames", "group_by")
split_summary = groups.split_summary


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def _check_options(task, image_size, split_ratio, min_size):
  if task not in ("pretrain", "classify", "segment"):
    raise ValueError(f"task must be 'pretrain', 'classify' or 'segment', got {task!r}")
  if image_size is not None and int(image_size) < 1:
    raise ValueError(f"image_size must be None or a positive int, got {image_size}")
  r = list(split_ratio)
  if len(r) != 3 or min(r) < 0 or r[0] <= 0:
    raise ValueError(f"split_ratio must be 3 non-negative numbers with train > 0, got {split_ratio}")
  if int(min_size) < 1:
    raise ValueError(f"min_size must be >= 1, got {min_size}")


def _write_json(path: pathlib.Path, obj) -> None:
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  tmp.replace(path)


def build_folder_dataset(
    root,
    out_dir,
    *,
    task: str = "pretrain",
    image_size: int | None = None,
    split_seed: int = 0,
    split_ratio=(3, 1, 1),
    min_size: int = 32,
    binarize_masks: bool = False,
    dicom_frames: str = "all",
    group_by: str = "study",
    num_workers: int | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
  """Convert the image tree at ``root`` into a dataset in ``out_dir``; returns ``out_dir``.

  An existing dataset in ``out_dir`` built with the same options from the folder as it is now
  (same ``source_fingerprint``) is reused unless ``overwrite``. See the module docstring for
  layouts, conversions, skip rules and how a build stays atomic.
  """
  _check_options(task, image_size, split_ratio, min_size)
  stride = dicom.parse_frames(dicom_frames)
  if group_by not in dicom.GROUP_TAGS:
    raise ValueError(f"data.group_by={group_by!r}: expected 'study' (StudyInstanceUID) or 'patient' (PatientID)")
  root = pathlib.Path(root).expanduser().resolve()
  out = pathlib.Path(out_dir).expanduser().resolve()
  if not root.is_dir():
    raise ValueError(_printable(f"dataset folder {root} does not exist or is not a directory"))
  options = {
      "root": str(root), "task": task, "image_size": None if image_size is None else int(image_size),
      "split_seed": int(split_seed), "split_ratio": [float(x) for x in split_ratio],
      "min_size": int(min_size), "binarize_masks": bool(binarize_masks),
      "dicom_frames": str(dicom_frames).strip().lower(), "group_by": group_by,
  }
  fingerprint = source_fingerprint(root)
  digest = fingerprint_digest(fingerprint)
  meta_path = out / "metadata.json"
  if meta_path.exists() and not overwrite:
    try:
      old = json.loads(meta_path.read_text())
    except (OSError, ValueError):
      old = {}
    if old.get("format") == FORMAT and all(old.get(k) == options[k] for k in _BUILD_KEYS):
      if old.get("source_digest") == digest:
        return out
      log.warning("dataset folder %s changed since %s was built from it (%s): building it again",
                  _printable(str(root)), out, describe_change(out, fingerprint))
  if out == root or root in out.parents:
    raise ValueError(_printable(f"out_dir {out} must not be inside the dataset folder {root}"))

  unreadable: list[OSError] = []
  all_files = _list_files(root, unreadable)
  if not all_files and not unreadable:
    raise ValueError(_printable(f"dataset folder {root} is empty"))
  csv_groups = groups.read_groups_csv(root)

  skipped: list[dict] = []
  warnings: list[str] = []
  for e in unreadable:
    where = pathlib.Path(e.filename) if e.filename else root
    skipped.append({"path": (_rel(where, root) if where != root else ".") + "/",
                    "reason": f"cannot list folder: {type(e).__name__}: {e.strerror or e}"})

  # Split folders, if any.
  split_dirs: dict[str, pathlib.Path] = {}
  for c in sorted(root.iterdir()):
    if c.is_dir() and c.name.lower() in _SPLIT_ALIASES:
      s = _SPLIT_ALIASES[c.name.lower()]
      if s in split_dirs:
        raise ValueError(_printable(f"dataset folder {root}: both {split_dirs[s].name}/ and {c.name}/ "
                                    f"name split {s!r}"))
      split_dirs[s] = c
  if split_dirs and "train" not in split_dirs:
    raise ValueError(_printable(f"dataset folder {root} has split folders {sorted(split_dirs)} but no train/"))
  subs = [(d, s) for s, d in split_dirs.items()] if split_dirs else [(root, None)]
  if split_dirs:
    inside = tuple(split_dirs.values())
    for p in all_files:
      if not any(d in p.parents for d in inside):
        skipped.append({"path": _rel(p, root), "reason": "outside the split folders"})

  items: list[_Item] = []
  for sub, split in subs:
    if task == "segment":
      items += _discover_segment(sub, root, split, skipped)
    else:
      items += _discover_labelled(sub, root, split, task, skipped)

  # Pass 1: decode every candidate once to find unusable files and the mask value set.
  workers = num_workers or min(4, os.cpu_count() or 1)

  def check(it: _Item) -> str | None:
    try:
      if it.dicom:
        if task == "segment":
          raise _Skip("DICOM images are not read for segmentation (export image and mask as PNG)")
        try:
          views, it.notes, uid = dicom.read_dicom(it.path, frames=stride, min_size=min_size, group_by=group_by)
        except dicom.DicomError as e:
          raise _Skip(str(e)) from None
        it.views = [(v.frame, v.region, v.spacing_mm) for v in views]
        it.uid = uid
        return None
      img, notes = _read_image(it.path, min_size)
      if it.masks:
        m, mnotes = _read_mask(it.masks, img.shape)
        it.mask_values = np.unique(m)
        notes += mnotes
      it.notes = notes
      return None
    except _Skip as e:
      return str(e)

  for it in items:
    it.dicom = dicom.is_dicom_name(it.path) or not it.path.suffix
  with ThreadPoolExecutor(workers) as pool:
    reasons = list(pool.map(check, items))
  usable = []
  converted = []
  for it, reason in zip(items, reasons):
    if reason is not None:
      skipped.append({"path": it.rel, "reason": reason})
      continue
    if it.notes:
      converted.append({"path": it.rel, "conversion": "; ".join(it.notes)})
    key = groups.lookup_csv(csv_groups, it.rel) or (it.uid if it.dicom else None) or it.key
    it.key = key if key is not None else groups.file_group(it.rel)
    if not it.dicom:
      usable.append(it)
      continue
    for frame, region, spacing in it.views:  # one item per view, in file order
      usable.append(_Item(it.path, it.rel, it.group, it.split, key=it.key, frame=frame, region=region,
                          spacing=spacing, dicom=True))
  skipped.sort(key=lambda d: d["path"])
  report = {"root": str(root), "task": task, "skipped": skipped, "converted": converted, "warnings": warnings}
  work = out.parent / f".{out.name}.partial"  # renamed to `out` once complete

  def fail(msg: str):
    # Next to a complete (stale) dataset the report goes into the partial folder, so that the
    # dataset and its report never disagree.
    where = work if meta_path.exists() else out
    where.mkdir(parents=True, exist_ok=True)
    _write_json(where / "build_report.json", report)
    raise ValueError(_printable(f"{msg} (see {where / 'build_report.json'})"))

  if not usable:
    fail(f"dataset folder {root}: no usable image left ({len(skipped)} files skipped)")

  names = sorted({it.group for it in usable if it.group is not None})
  if task != "segment":
    # A first-level folder that yields no image is not a class / organ at all: say so, since a
    # class the user expects would otherwise vanish from the labels without a word.
    kind = "a class" if task == "classify" else "an organ"
    for sub, _ in subs:
      for c in sorted(sub.iterdir()):
        if (c.is_dir() and not c.is_symlink() and not c.name.startswith(".") and c.name not in names
            and c.name.lower() not in _MASK_DIRS and (sub != root or c.name.lower() not in _SPLIT_ALIASES)):
          warnings.append(f"folder {_printable(_rel(c, root))}/ holds no usable image: it is not {kind}")

  # Split.
  ratio = [float(x) for x in split_ratio]
  if split_dirs:
    per_split = {s: sorted([it for it in usable if it.split == s], key=lambda it: it.rel) for s in SPLITS}
    if "validation" not in split_dirs and ratio[1] > 0:
      tr, va = groups.stratified_groups(per_split["train"], ratio[:2], split_seed, names)
      per_split["train"], per_split["validation"] = tr, va
      warnings.append("no validation folder: validation carved from train "
                      f"(stratified, {ratio[0]:g}:{ratio[1]:g}, seed {split_seed})")
    if "test" not in split_dirs:
      warnings.append("no test folder: test split is empty")
    split_source = "folders"
  else:
    per_split = dict(zip(SPLITS, groups.stratified_groups(usable, ratio, split_seed, names)))
    split_source = "stratified"
  if not per_split["train"]:
    fail(f"dataset folder {root}: no usable training image")
  if task != "pretrain":
    for g in names:
      # A stratified split is meant to fill every split of non-zero ratio; split folders only
      # those that exist.
      wanted = [s for s, r in zip(SPLITS, ratio) if (per_split[s] if split_dirs else r > 0)]
      missing = [s for s in wanted if not any(it.group == g for it in per_split[s])]
      if missing:
        n = sum(it.group == g for it in usable)
        k = len({it.key for it in usable if it.group == g})
        in_groups = f" in {k} group(s)" if k < n else ""
        warnings.append(f"class {_printable(g)} has {n} usable image(s){in_groups}: none in {', '.join(missing)}")
  split_warnings = list(warnings)
  if split_dirs:  # split folders are the user's: a group in two of them is reported, not moved
    where: dict[str, set] = {}
    for s in SPLITS:
      for it in per_split[s]:
        where.setdefault(it.key, set()).add(s)
    shared = sum(len(v) > 1 for v in where.values())
    if shared:
      warnings.append(f"{shared} group(s) (patient/study) have images in more than one split folder")

  # Mask value mapping.
  mask_values = None
  if task == "segment":
    allv = np.unique(np.concatenate([it.mask_values for it in usable]))
    if binarize_masks:
      mask_values = [0, "nonzero"]
    else:
      if len(allv) > _MAX_MASK_CLASSES:
        fail(f"dataset folder {root}: masks hold {len(allv)} distinct values (more than "
             f"{_MAX_MASK_CLASSES}); lossy (JPEG) masks? pass binarize_masks=True")
      mask_values = [int(v) for v in allv]

  def organ_label(it: _Item) -> tuple[int, int]:
    gid = names.index(it.group) if it.group is not None else -1
    return (gid, -1) if task == "pretrain" else (-1, gid)

  def load(it: _Item, index: int) -> dict:
    try:
      if it.dicom:
        try:
          views = dicom.read_dicom(it.path, frames=stride, min_size=min_size, group_by=group_by,
                                   only={(it.frame, it.region)})[0]
        except dicom.DicomError as e:
          raise _Skip(str(e)) from None
        if len(views) != 1:
          raise _Skip(f"frame {it.frame} region {it.region} is gone")
        img, raw = views[0].image, None
      else:
        img, _ = _read_image(it.path, min_size)
        raw = _read_mask(it.masks, img.shape)[0] if it.masks else None
    except _Skip as e:
      raise ValueError(f"{_printable(str(it.path))} changed while the dataset was being built: {e}") from None
    rec = {"index": index}
    rec["organ"], rec["label"] = organ_label(it)
    m = None
    if raw is not None:
      if binarize_masks:
        m = (raw != 0).astype(np.uint8)
      else:
        m = np.searchsorted(np.asarray(mask_values), raw).astype(np.uint8)
    if image_size is not None and img.shape != (image_size, image_size):
      img = np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.BICUBIC))
      if m is not None:
        m = np.asarray(Image.fromarray(m).resize((image_size, image_size), Image.NEAREST))
    rec["image"] = img[..., None]
    if m is not None:
      rec["mask"] = m[..., None]
    return rec

  # Pass 2: write, into `work` (a leftover of a killed build is discarded first).
  if work.exists():
    shutil.rmtree(work)
  work.mkdir(parents=True)
  sums = np.zeros(3, np.float64)  # sum, sum of squares, count over train pixels in [0, 1]
  files: dict[str, list] = {}
  offset = 0
  for split in SPLITS:
    split_items = per_split[split]
    path = work / f"{split}.array_record"
    with writer(path) as w, ThreadPoolExecutor(workers) as pool:
      for rec in pool.map(load, split_items, range(offset, offset + len(split_items))):
        if split == "train":
          a = rec["image"].astype(np.float64) / 255.0
          sums += (a.sum(), np.square(a).sum(), a.size)
        w.write(serialize_record(rec))
    files[split] = [[it.rel, *organ_label(it), it.frame, it.region, groups.hash_group(it.key),
                     None if it.spacing is None else [round(x, 6) for x in it.spacing]] for it in split_items]
    offset += len(split_items)

  mean = sums[0] / sums[2]
  std = float(np.sqrt(max(sums[1] / sums[2] - mean**2, 0.0)))
  counts = {s: len(per_split[s]) for s in SPLITS}
  per_group = {
      s: dict(sorted(Counter(it.group or _NO_GROUP for it in per_split[s]).items())) for s in SPLITS
  }
  meta = {
      "format": FORMAT,
      **options,
      "organs": names if task == "pretrain" else [],
      "classes": names if task != "pretrain" else [],
      "channels": 1,
      "counts": counts,
      "counts_per_group": per_group,
      "groups_per_split": {s: len({it.key for it in per_split[s]}) for s in SPLITS},
      "split_warnings": split_warnings,
      "num_dicom_views": sum(it.dicom for it in usable),
      "split_source": split_source,
      "mean": float(mean),
      "std": std,
      "num_skipped": len(skipped),
      "num_converted": len(converted),
      "source_digest": digest,
      "source_entries": len(fingerprint),
  }
  if task == "segment":
    meta["mask_values"] = mask_values
    meta["num_mask_classes"] = len(mask_values)
  report["counts"] = counts
  report["groups"] = {s: sorted({groups.hash_group(it.key) for it in per_split[s]}) for s in SPLITS}
  _write_json(work / "files.json", files)
  _write_json(work / "source_files.json", fingerprint)
  _write_json(work / "build_report.json", report)
  _write_json(work / "metadata.json", meta)
  replace_dir(work, out)
  ngroups = meta["groups_per_split"]
  log.info("dataset folder %s: %d images (train/validation/test %d/%d/%d) from %d/%d/%d groups, %d "
           "files skipped%s, %d converted; reasons per file in %s", _printable(str(root)),
           sum(counts.values()), counts["train"], counts["validation"], counts["test"], ngroups["train"],
           ngroups["validation"], ngroups["test"], len(skipped),
           f" ({len(unreadable)} unreadable folder(s))" if unreadable else "", len(converted),
           _printable(str(out / "build_report.json")))
  for w in warnings:
    log.warning("dataset folder %s: %s", _printable(str(root)), w)
  return out


# --------------------------------------------------------------------------------------------
# Read
# --------------------------------------------------------------------------------------------


class FolderSource:
  """Random-access view of one split: ``len(src)``, ``src[i]`` → record dict.

  Also ``metadata`` (the build's metadata.json), ``organ_ids`` and ``labels`` (int arrays in
  record order, read from files.json without decoding images), ``paths`` (source files
  relative to the build root), ``frames`` and ``regions`` (a DICOM view's frame and ultrasound
  region, -1 for the whole frame), ``groups`` (hashed group ids) and ``spacings`` ((axial,
  lateral) mm per pixel, None where unknown).
  """

  def __init__(self, out_dir, split: str):
    out = pathlib.Path(out_dir)
    meta_path = out / "metadata.json"
    if not meta_path.is_file():
      raise ValueError(f"{out} is not a built folder dataset (no metadata.json)")
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    self.metadata = json.loads(meta_path.read_text())
    self.out_dir = out  # for groups.split_summary(src.out_dir)
    rows = json.loads((out / "files.json").read_text())[split]
    self.split = split
    self.paths = [r[0] for r in rows]
    self.organ_ids = np.array([r[1] for r in rows], np.int64)
    self.labels = np.array([r[2] for r in rows], np.int64)
    self.frames = np.array([r[3] if len(r) > 3 else 0 for r in rows], np.int64)
    self.regions = np.array([r[4] if len(r) > 4 else -1 for r in rows], np.int64)
    self.groups = [r[5] if len(r) > 5 else groups.hash_group(groups.file_group(r[0])) for r in rows]
    self.spacings = [tuple(r[6]) if len(r) > 6 and r[6] else None for r in rows]
    self._file = str(out / f"{split}.array_record")
    self._records = RecordFile(self._file)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i) -> dict:
    i = int(i)
    n = len(self)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"index {i} out of range for {self.split} split of {n} records")
    return self._records[i]

  def __repr__(self) -> str:
    return f"FolderSource({self._file!r}, n={len(self)})"


def folder_source(out_dir, split: str) -> FolderSource:
  """Random-access source over a split (``'train'``, ``'validation'``/``'val'``, ``'test'``)."""
  return FolderSource(out_dir, split)


