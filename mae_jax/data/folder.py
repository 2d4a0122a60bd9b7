"""Real images from a folder tree → a random-access dataset with the us_phantom record layout.

``build_folder_dataset(root, out_dir, task=...)`` converts a tree of PNG/JPEG/BMP/TIFF/GIF files
into ``out_dir``::

    train.array_record, validation.array_record, test.array_record   one record per image
    metadata.json        names, counts per split, train mean/std, mask value mapping, build options,
                         ``source_digest`` of the source fingerprint
    files.json           per split, in record order: [source path relative to root, organ, label]
    source_files.json    the source fingerprint the build was made from (see below)
    build_report.json    every skipped file with its reason, every converted file with what was done

and ``folder_source(out_dir, split)`` reads a split back with random access (``len``, ``[i]``).

Records are dicts of numpy values like ``us_phantom.data_source``: ``image`` (H, W, 1) uint8,
``organ`` int, ``label`` int, ``index`` int, and for ``task='segment'``
``mask`` (H, W, 1) uint8 of class ids. Fields that a task does not define are -1 (``label`` for
pretraining, ``organ`` for classification and segmentation). As in us_phantom, ``index`` is unique
across splits: train is [0, n_train), validation follows, then test; ``src[i]["index"]`` is the
split's offset + i. On disk each record is an ``np.savez``
archive (no pickle) whose image and mask are PNG-encoded (lossless), in ArrayRecord files
(``group_size:1`` for fast random access). TensorFlow is not needed to write or read them.

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

import hashlib
import io
import json
import logging
import os
import pathlib
import re
import shutil
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "build_folder_dataset", "folder_source", "FolderSource", "IMAGE_EXTENSIONS", "SPLITS",
    "source_fingerprint", "fingerprint_digest", "describe_change",
]

log = logging.getLogger("mae_jax")

FORMAT = "mae_jax.folder/v1"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "val": "validation", "valid": "validation",
    "test": "test", "testing": "test",
}
_IMAGE_DIRS = ("images", "image")
_MASK_DIRS = ("masks", "mask")
_MASK_STEM = re.compile(r"^(?P<base>.+)_mask(?:_\d+)?$", re.IGNORECASE)
_NO_GROUP = "unspecified"
_MAX_MASK_CLASSES = 64
_BUILD_KEYS = ("root", "task", "image_size", "split_seed", "split_ratio", "min_size", "binarize_masks")


class _Skip(Exception):
  """A file that cannot be used; the message is the reason written to the report."""


# --------------------------------------------------------------------------------------------
# Reading one file
# --------------------------------------------------------------------------------------------


def _open_first_frame(path: pathlib.Path) -> tuple[Image.Image, list[str]]:
  notes: list[str] = []
  try:
    size = path.stat().st_size
  except OSError as e:
    raise _Skip(f"cannot stat: {e}") from None
  if size == 0:
    raise _Skip("empty file (0 bytes)")
  try:
    im = Image.open(path)
  except UnidentifiedImageError:
    raise _Skip("not a readable image (PIL cannot identify the format)") from None
  except Image.DecompressionBombError as e:
    raise _Skip(f"too large to decode (decompression-bomb guard): {e}") from None
  except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
    raise _Skip(f"cannot open: {type(e).__name__}: {e}") from None
  # PIL only refuses images over twice its limit; between one and two times it warns and decodes
  # (a 12000x12000 header costs 144 MB per decode, and pass 2 decodes again): refuse those too.
  w, h = im.size
  if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
    im.close()
    raise _Skip(f"too large to decode (decompression-bomb guard): {w}x{h} = {w * h} pixels, over "
                f"PIL's limit of {Image.MAX_IMAGE_PIXELS} (Image.MAX_IMAGE_PIXELS)")
  try:
    frames = int(getattr(im, "n_frames", 1))
    if frames > 1:
      im.seek(0)
      notes.append(f"multi-frame ({frames} frames): first frame used")
    im.load()
  except Exception as e:  # noqa: BLE001
    im.close()
    raise _Skip(f"truncated or corrupt image: {type(e).__name__}: {e}") from None
  return im, notes


def _image_to_gray8(im: Image.Image) -> tuple[np.ndarray, list[str]]:
  mode = im.mode
  if mode == "L":
    return np.asarray(im, dtype=np.uint8), []
  if mode.startswith("I;16") or mode in ("I", "F"):
    a = np.asarray(im).astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    kind = {"I": "32-bit integer", "F": "floating-point"}.get(mode, "16-bit")
    if hi > lo:
      out = np.round((a - lo) / (hi - lo) * 255.0).astype(np.uint8)
    else:
      out = np.zeros(a.shape, np.uint8)
    return out, [f"{kind} ({mode}): min-max scaled from [{lo:g}, {hi:g}] to [0, 255]"]
  if mode == "1":
    return np.asarray(im.convert("L"), dtype=np.uint8), ["1-bit: mapped to {0, 255}"]
  if mode in ("LA", "La"):
    return np.asarray(im.getchannel(0), dtype=np.uint8), [f"{mode}: alpha channel dropped"]
  if mode in ("P", "PA"):
    has_alpha = mode == "PA" or "transparency" in im.info
    rgb = im.convert("RGBA").convert("RGB") if has_alpha else im.convert("RGB")
    note = "palette with transparency: alpha dropped, luminance" if has_alpha else "palette: luminance"
    return np.asarray(rgb.convert("L"), dtype=np.uint8), [note + " (ITU-R 601)"]
  if mode in ("RGBA", "RGBa"):
    return (np.asarray(im.convert("RGB").convert("L"), dtype=np.uint8),
            [f"{mode}: alpha channel dropped, luminance (ITU-R 601)"])
  try:
    rgb = im if mode == "RGB" else im.convert("RGB")
    return np.asarray(rgb.convert("L"), dtype=np.uint8), [f"{mode}: luminance (ITU-R 601)"]
  except Exception as e:  # noqa: BLE001
    raise _Skip(f"unsupported image mode {mode}: {e}") from None


def _mask_to_values(im: Image.Image) -> tuple[np.ndarray, list[str]]:
  mode = im.mode
  if mode in ("L", "P") or mode.startswith("I"):
    a = np.asarray(im)
    return a.astype(np.int64), []
  if mode == "1":
    return np.asarray(im.convert("L")).astype(np.int64), []
  if mode in ("LA", "La", "PA"):
    return np.asarray(im.getchannel(0)).astype(np.int64), [f"mask {mode}: alpha dropped"]
  if mode == "F":
    a = np.asarray(im)
    if not np.all(np.mod(a, 1) == 0):
      raise _Skip("floating-point mask with non-integer values")
    return a.astype(np.int64), []
  rgb = im.convert("RGB") if mode != "RGB" else im
  return np.asarray(rgb.convert("L")).astype(np.int64), [f"mask {mode}: luminance of each colour used as its value"]


def _read_image(path: pathlib.Path, min_size: int) -> tuple[np.ndarray, list[str]]:
  im, notes = _open_first_frame(path)
  with im:
    w, h = im.size
    if min(w, h) < min_size:
      raise _Skip(f"too small ({w}x{h}; min_size={min_size})")
    a, conv = _image_to_gray8(im)
  return a, notes + conv


def _read_mask(paths: list[pathlib.Path], shape: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
  merged = None
  notes: list[str] = []
  for p in paths:
    try:
      im, n = _open_first_frame(p)
    except _Skip as e:
      raise _Skip(f"mask {p.name}: {e}") from None
    with im:
      if (im.size[1], im.size[0]) != shape:
        raise _Skip(f"mask {p.name} is {im.size[0]}x{im.size[1]}, image is {shape[1]}x{shape[0]}")
      a, c = _mask_to_values(im)
    notes += [f"mask {p.name}: {x}" for x in n] + c
    merged = a if merged is None else np.maximum(merged, a)
  if len(paths) > 1:
    notes.append(f"{len(paths)} masks merged by pixel-wise maximum")
  return merged, notes


# --------------------------------------------------------------------------------------------
# Discovering items
# --------------------------------------------------------------------------------------------


@dataclass
class _Item:
  path: pathlib.Path
  rel: str
  group: str | None  # organ (pretrain) or class (classify / segment)
  split: str | None  # from split folders, else None
  masks: list[pathlib.Path] = field(default_factory=list)
  notes: list[str] = field(default_factory=list)
  mask_values: np.ndarray | None = None


def _rel(p: pathlib.Path, root: pathlib.Path) -> str:
  return p.relative_to(root).as_posix()


def _list_files(top: pathlib.Path) -> list[pathlib.Path]:
  out = []
  for dirpath, dirnames, filenames in os.walk(top):
    dirnames.sort()
    for f in sorted(filenames):
      out.append(pathlib.Path(dirpath) / f)
  return out


def _is_image_name(p: pathlib.Path) -> bool:
  return p.suffix.lower() in IMAGE_EXTENSIONS


def _screen(files, root, skipped) -> list[pathlib.Path]:
  """Drop hidden files and non-image extensions (recorded as skipped)."""
  keep = []
  for p in files:
    rel = _rel(p, root)
    if any(part.startswith(".") for part in pathlib.PurePosixPath(rel).parts):
      skipped.append({"path": rel, "reason": "hidden file"})
    elif not _is_image_name(p):
      skipped.append({"path": rel, "reason": f"not an image file extension ({p.suffix or 'none'})"})
    else:
      keep.append(p)
  return keep


def source_fingerprint(root) -> dict[str, list[int]]:
  """Relative path → [size, mtime_ns] of every file the conversion may read, [] per folder.

  The rules for what is left out (hidden entries, non-image extensions) are those of
  ``_screen``, so only a change that can alter a record changes the fingerprint. Folders
  behind symbolic links are not entered, as in the conversion's own walk."""
  root = pathlib.Path(root)
  out: dict[str, list[int]] = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    d = pathlib.Path(dirpath)
    rel_dir = _rel(d, root)
    if rel_dir != ".":
      out[rel_dir + "/"] = []
    for f in sorted(filenames):
      p = d / f
      if f.startswith(".") or not _is_image_name(p):
        continue
      try:
        st = p.stat()
        out[_rel(p, root)] = [st.st_size, st.st_mtime_ns]
      except OSError:  # a dangling link: the conversion skips it, but it is still a change
        out[_rel(p, root)] = [-1, -1]
  return out


def fingerprint_digest(fingerprint: dict[str, list[int]]) -> str:
  return hashlib.sha1(json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def describe_change(old_dir, fingerprint: dict[str, list[int]]) -> str:
  """'N added, M removed, K modified' between the build in ``old_dir`` and ``fingerprint``."""
  try:
    old = json.loads((pathlib.Path(old_dir) / "source_files.json").read_text())
  except (OSError, ValueError):
    return "the earlier build stored no file list to compare with"
  added = [k for k in fingerprint if k not in old]
  removed = [k for k in old if k not in fingerprint]
  modified = [k for k in fingerprint if k in old and old[k] != fingerprint[k]]
  text = f"{len(added)} added, {len(removed)} removed, {len(modified)} modified"
  examples = [f"{what} {k}" for what, ks in (("added", added), ("removed", removed), ("modified", modified))
              for k in ks[:2]]
  return text + (f" (e.g. {', '.join(examples[:4])})" if examples else "")


def _discover_labelled(sub: pathlib.Path, root, split, task, skipped) -> list[_Item]:
  items = []
  for p in _screen(_list_files(sub), root, skipped):
    rel = _rel(p, root)
    parts = p.relative_to(sub).parts
    if _MASK_STEM.match(p.stem) or any(x.lower() in _MASK_DIRS for x in parts[:-1]):
      skipped.append({"path": rel, "reason": "segmentation mask (not used by task " + task + ")"})
      continue
    if len(parts) == 1:
      if task == "classify":
        skipped.append({"path": rel, "reason": "not inside a class folder"})
        continue
      group = _NO_GROUP
    else:
      group = parts[0]
    items.append(_Item(p, rel, group, split))
  return items


def _child_dir(d: pathlib.Path, names) -> pathlib.Path | None:
  for c in sorted(d.iterdir()):
    if c.is_dir() and c.name.lower() in names:
      return c
  return None


def _discover_segment(sub: pathlib.Path, root, split, skipped) -> list[_Item]:
  items: list[_Item] = []
  handled: set[pathlib.Path] = set()

  def group_of(p: pathlib.Path) -> str | None:
    parts = [x for x in p.relative_to(sub).parts[:-1] if x.lower() not in _IMAGE_DIRS + _MASK_DIRS]
    return parts[0] if parts else None

  # Parallel images/ + masks/ folders, at any depth.
  for dirpath, dirnames, _ in os.walk(sub):
    d = pathlib.Path(dirpath)
    if any(x.startswith(".") for x in d.relative_to(sub).parts):
      continue
    img_dir, mask_dir = _child_dir(d, _IMAGE_DIRS), _child_dir(d, _MASK_DIRS)
    if img_dir is None or mask_dir is None:
      continue
    masks_by_key: dict[tuple[str, str], list[pathlib.Path]] = {}
    for m in _screen(_list_files(mask_dir), root, skipped):
      handled.add(m)
      stem = m.stem
      mm = _MASK_STEM.match(stem)
      key = (m.parent.relative_to(mask_dir).as_posix(), (mm.group("base") if mm else stem).lower())
      masks_by_key.setdefault(key, []).append(m)
    for p in _screen(_list_files(img_dir), root, skipped):
      handled.add(p)
      key = (p.parent.relative_to(img_dir).as_posix(), p.stem.lower())
      ms = masks_by_key.pop(key, None)
      if not ms:
        skipped.append({"path": _rel(p, root), "reason": "no mask found"})
        continue
      rel_in = p.relative_to(img_dir).parts
      group = group_of(p) if d != sub else (rel_in[0] if len(rel_in) > 1 else None)
      items.append(_Item(p, _rel(p, root), group, split, masks=sorted(ms)))
    for ms in masks_by_key.values():
      for m in ms:
        skipped.append({"path": _rel(m, root), "reason": "mask without a matching image"})
    handled.update(_list_files(d / img_dir.name))
    handled.update(_list_files(d / mask_dir.name))

  # BUSI-style name.png + name_mask.png in the same folder.
  rest = [p for p in _list_files(sub) if p not in handled]
  rest = _screen(rest, root, skipped)
  by_dir: dict[pathlib.Path, list[pathlib.Path]] = {}
  for p in rest:
    by_dir.setdefault(p.parent, []).append(p)
  for d in sorted(by_dir):
    files = by_dir[d]
    masks: dict[str, list[pathlib.Path]] = {}
    images = []
    for p in files:
      m = _MASK_STEM.match(p.stem)
      if m:
        masks.setdefault(m.group("base").lower(), []).append(p)
      else:
        images.append(p)
    for p in images:
      ms = masks.pop(p.stem.lower(), None)
      if not ms:
        skipped.append({"path": _rel(p, root), "reason": "no mask found"})
        continue
      items.append(_Item(p, _rel(p, root), group_of(p), split, masks=sorted(ms)))
    for ms in masks.values():
      for m in ms:
        skipped.append({"path": _rel(m, root), "reason": "mask without a matching image"})
  return items


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def _largest_remainder(n: int, ratio) -> list[int]:
  r = np.asarray(ratio, np.float64)
  exact = n * r / r.sum()
  counts = np.floor(exact).astype(int)
  frac = exact - counts
  # Ties go to the earlier split (train first).
  for k in sorted(range(len(r)), key=lambda i: (-frac[i], i))[: n - counts.sum()]:
    counts[k] += 1
  return counts.tolist()


def _stratified(items: list[_Item], ratio, seed: int, names: list[str]) -> list[list[_Item]]:
  out: list[list[_Item]] = [[] for _ in ratio]
  groups: dict[str | None, list[_Item]] = {}
  for it in items:
    groups.setdefault(it.group, []).append(it)
  for g in sorted(groups, key=lambda x: (x is None, x or "")):
    members = sorted(groups[g], key=lambda it: it.rel)
    gid = names.index(g) + 1 if g in names else 0
    perm = np.random.default_rng([seed, gid]).permutation(len(members))
    start = 0
    for s, c in enumerate(_largest_remainder(len(members), ratio)):
      out[s] += [members[i] for i in perm[start : start + c]]
      start += c
  return [sorted(s, key=lambda it: it.rel) for s in out]


# --------------------------------------------------------------------------------------------
# Serialization
# --------------------------------------------------------------------------------------------


def _png(a: np.ndarray) -> np.ndarray:
  buf = io.BytesIO()
  Image.fromarray(a, mode="L").save(buf, format="PNG", compress_level=3)
  return np.frombuffer(buf.getvalue(), np.uint8)


def _unpng(b: np.ndarray) -> np.ndarray:
  with Image.open(io.BytesIO(b.tobytes())) as im:
    return np.asarray(im, dtype=np.uint8)[..., None]


def serialize_record(rec: dict) -> bytes:
  arrays = {
      "image_png": _png(rec["image"][..., 0]),
      "organ": np.int64(rec["organ"]),
      "label": np.int64(rec["label"]),
      "index": np.int64(rec["index"]),
  }
  if "mask" in rec:
    arrays["mask_png"] = _png(rec["mask"][..., 0])
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def deserialize_record(data: bytes) -> dict:
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    rec = {
        "image": _unpng(z["image_png"]),
        "organ": int(z["organ"]),
        "label": int(z["label"]),
        "index": int(z["index"]),
    }
    if "mask_png" in z.files:
      rec["mask"] = _unpng(z["mask_png"])
  return rec


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
    num_workers: int | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
  """Convert the image tree at ``root`` into a dataset in ``out_dir``; returns ``out_dir``.

  An existing dataset in ``out_dir`` built with the same options from the folder as it is now
  (same ``source_fingerprint``) is reused unless ``overwrite``. See the module docstring for
  layouts, conversions, skip rules and how a build stays atomic.
  """
  from array_record.python.array_record_module import ArrayRecordWriter

  _check_options(task, image_size, split_ratio, min_size)
  root = pathlib.Path(root).expanduser().resolve()
  out = pathlib.Path(out_dir).expanduser().resolve()
  if not root.is_dir():
    raise ValueError(f"dataset folder {root} does not exist or is not a directory")
  options = {
      "root": str(root), "task": task, "image_size": None if image_size is None else int(image_size),
      "split_seed": int(split_seed), "split_ratio": [float(x) for x in split_ratio],
      "min_size": int(min_size), "binarize_masks": bool(binarize_masks),
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
                  root, out, describe_change(out, fingerprint))
  if out == root or root in out.parents:
    raise ValueError(f"out_dir {out} must not be inside the dataset folder {root}")

  all_files = _list_files(root)
  if not all_files:
    raise ValueError(f"dataset folder {root} is empty")

  skipped: list[dict] = []
  warnings: list[str] = []

  # Split folders, if any.
  split_dirs: dict[str, pathlib.Path] = {}
  for c in sorted(root.iterdir()):
    if c.is_dir() and c.name.lower() in _SPLIT_ALIASES:
      s = _SPLIT_ALIASES[c.name.lower()]
      if s in split_dirs:
        raise ValueError(f"dataset folder {root}: both {split_dirs[s].name}/ and {c.name}/ name split {s!r}")
      split_dirs[s] = c
  if split_dirs and "train" not in split_dirs:
    raise ValueError(f"dataset folder {root} has split folders {sorted(split_dirs)} but no train/")
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
      img, notes = _read_image(it.path, min_size)
      if it.masks:
        m, mnotes = _read_mask(it.masks, img.shape)
        it.mask_values = np.unique(m)
        notes += mnotes
      it.notes = notes
      return None
    except _Skip as e:
      return str(e)

  with ThreadPoolExecutor(workers) as pool:
    reasons = list(pool.map(check, items))
  usable = []
  for it, reason in zip(items, reasons):
    if reason is None:
      usable.append(it)
    else:
      skipped.append({"path": it.rel, "reason": reason})
  converted = [{"path": it.rel, "conversion": "; ".join(it.notes)} for it in usable if it.notes]
  skipped.sort(key=lambda d: d["path"])
  report = {"root": str(root), "task": task, "skipped": skipped, "converted": converted, "warnings": warnings}
  work = out.parent / f".{out.name}.partial"  # renamed to `out` once complete

  def fail(msg: str):
    # Next to a complete (stale) dataset the report goes into the partial folder, so that the
    # dataset and its report never disagree.
    where = work if meta_path.exists() else out
    where.mkdir(parents=True, exist_ok=True)
    _write_json(where / "build_report.json", report)
    raise ValueError(f"{msg} (see {where / 'build_report.json'})")

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
      tr, va = _stratified(per_split["train"], ratio[:2], split_seed, names)
      per_split["train"], per_split["validation"] = tr, va
      warnings.append("no validation folder: validation carved from train "
                      f"(stratified, {ratio[0]:g}:{ratio[1]:g}, seed {split_seed})")
    if "test" not in split_dirs:
      warnings.append("no test folder: test split is empty")
    split_source = "folders"
  else:
    per_split = dict(zip(SPLITS, _stratified(usable, ratio, split_seed, names)))
    split_source = "stratified"
  if not per_split["train"]:
    fail(f"dataset folder {root}: no usable training image")
  if task != "pretrain":
    for g in names:
      missing = [s for s in SPLITS if per_split[s] and not any(it.group == g for it in per_split[s])]
      if missing:
        n = sum(it.group == g for it in usable)
        warnings.append(f"class {_printable(g)} has {n} usable image(s): none in {', '.join(missing)}")

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
      img, _ = _read_image(it.path, min_size)
      raw = _read_mask(it.masks, img.shape)[0] if it.masks else None
    except _Skip as e:
      raise ValueError(f"{it.path} changed while the dataset was being built: {e}") from None
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
    writer = ArrayRecordWriter(str(path), "group_size:1")
    try:
      with ThreadPoolExecutor(workers) as pool:
        for rec in pool.map(load, split_items, range(offset, offset + len(split_items))):
          if split == "train":
            a = rec["image"].astype(np.float64) / 255.0
            sums += (a.sum(), np.square(a).sum(), a.size)
          writer.write(serialize_record(rec))
    finally:
      writer.close()
    files[split] = [[it.rel, *organ_label(it)] for it in split_items]
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
  _write_json(work / "files.json", files)
  _write_json(work / "source_files.json", fingerprint)
  _write_json(work / "build_report.json", report)
  _write_json(work / "metadata.json", meta)
  _replace_dir(work, out)
  log.info("dataset folder %s: %d images (train/validation/test %d/%d/%d), %d files skipped, %d "
           "converted; reasons per file in %s", _printable(str(root)), sum(counts.values()),
           counts["train"], counts["validation"], counts["test"], len(skipped), len(converted),
           out / "build_report.json")
  for w in warnings:
    log.warning("dataset folder %s: %s", _printable(str(root)), w)
  return out


def _printable(name: str) -> str:
  """A file name as text any log stream can print: bytes that are not UTF-8 (Python keeps them as
  surrogates) become \\xNN escapes instead of breaking the log handler."""
  return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _replace_dir(new: pathlib.Path, out: pathlib.Path) -> None:
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


# --------------------------------------------------------------------------------------------
# Read
# --------------------------------------------------------------------------------------------


class FolderSource:
  """Random-access view of one split: ``len(src)``, ``src[i]`` → record dict.

  Also ``metadata`` (the build's metadata.json), ``organ_ids`` and ``labels`` (int arrays in
  record order, read from files.json without decoding images) and ``paths`` (source files
  relative to the build root).
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
    rows = json.loads((out / "files.json").read_text())[split]
    self.split = split
    self.paths = [r[0] for r in rows]
    self.organ_ids = np.array([r[1] for r in rows], np.int64)
    self.labels = np.array([r[2] for r in rows], np.int64)
    self._file = str(out / f"{split}.array_record")
    self._source = None
    self._lock = threading.Lock()

  def _reader(self):
    if self._source is None:
      with self._lock:
        if self._source is None:
          from array_record.python.array_record_data_source import ArrayRecordDataSource

          self._source = ArrayRecordDataSource([self._file])
    return self._source

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i) -> dict:
    i = int(i)
    n = len(self)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"index {i} out of range for {self.split} split of {n} records")
    return deserialize_record(self._reader()[i])

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_source", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._source = None
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"FolderSource({self._file!r}, n={len(self)})"


def folder_source(out_dir, split: str) -> FolderSource:
  """Random-access source over a split (``'train'``, ``'validation'``/``'val'``, ``'test'``)."""
  return FolderSource(out_dir, split)


# --------------------------------------------------------------------------------------------
# Image enhancement: `low/` and `high/` folders (additive; used by train/enhance.py)
# --------------------------------------------------------------------------------------------

ENHANCE_DIRS = ("low", "high")


def enhance_layout(root, *, split_seed: int = 0, split_ratio=(0.7, 0.15, 0.15),
                   min_size: int = 16) -> dict[str, dict]:
  """The image-enhancement splits of a folder with `low/` and `high/` sub-folders (optionally under
  `train/`, `validation/`, `test/` split folders), as {split: {'low': [path], 'high': [path],
  'pairs': [(low path, high path)], 'skipped': [(path, reason)]}}.

  Files pair by their path relative to `low/` / `high/` with the extension ignored (`a/x.png` ↔
  `a/x.jpg`). Pairs are what the metrics need; an unpaired file (USEnhance2023 style) only trains:
  without split folders, the pairs are split by `split_ratio` (USFM §4.2: 70/15/15 when a dataset
  comes without a split) with `split_seed`, and every unpaired file goes to train. With split
  folders, a validation / test split keeps its pairs only. Unreadable files are skipped with the
  reason (`_read_image`'s rules)."""
  root = pathlib.Path(root)
  split_dirs = {}
  for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
    name = _SPLIT_ALIASES.get(d.name.lower())
    if name is not None:
      split_dirs[name] = d

  def side(top: pathlib.Path, skipped) -> dict[str, pathlib.Path]:
    out = {}
    if not top.is_dir():
      return out
    for p in _list_files(top):
      if p.name.startswith(".") or not _is_image_name(p):
        continue
      try:
        _read_image(p, min_size)
      except _Skip as e:
        skipped.append((str(p), str(e)))
        continue
      out[p.relative_to(top).with_suffix("").as_posix()] = p
    return out

  def scan(base: pathlib.Path):
    skipped: list = []
    low, high = side(base / "low", skipped), side(base / "high", skipped)
    return low, high, skipped

  out = {s: {"low": [], "high": [], "pairs": [], "skipped": []} for s in SPLITS}
  if split_dirs:
    for s, d in split_dirs.items():
      low, high, skipped = scan(d)
      keys = sorted(set(low) & set(high))
      out[s]["pairs"] = [(low[k], high[k]) for k in keys]
      out[s]["skipped"] = skipped
      if s == "train":
        out[s]["low"], out[s]["high"] = [low[k] for k in sorted(low)], [high[k] for k in sorted(high)]
      else:
        out[s]["low"], out[s]["high"] = [low[k] for k in keys], [high[k] for k in keys]
  else:
    low, high, skipped = scan(root)
    if not low or not high:
      raise ValueError(f"{root}: expected non-empty 'low/' and 'high/' folders of images")
    keys = sorted(set(low) & set(high))
    order = np.random.default_rng(split_seed).permutation(len(keys))
    counts = _largest_remainder(len(keys), split_ratio)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for k, s in enumerate(SPLITS):
      chosen = [keys[i] for i in sorted(order[starts[k]:starts[k + 1]])]
      out[s]["pairs"] = [(low[c], high[c]) for c in chosen]
      out[s]["low"], out[s]["high"] = [low[c] for c in chosen], [high[c] for c in chosen]
    paired = set(keys)
    out["train"]["low"] += [low[k] for k in sorted(low) if k not in paired]
    out["train"]["high"] += [high[k] for k in sorted(high) if k not in paired]
    out["train"]["skipped"] = skipped
  return out


def read_gray(path, min_size: int = 16) -> np.ndarray:
  """(H, W) uint8 of one image file, converted as the folder datasets convert (`_read_image`)."""
  a, _ = _read_image(pathlib.Path(path), min_size)
  return np.asarray(a).astype(np.uint8)
