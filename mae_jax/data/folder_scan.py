"""Finding the files of a folder dataset: screening, layouts (organ/class folders, segmentation
pairs), the source fingerprint that detects a changed folder, and the enhancement layout.

The rules are listed in ``folder``'s docstring.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from dataclasses import dataclass, field

import numpy as np

from mae_jax.data import dicom
from mae_jax.data.folder_read import _printable, _read_image, _Skip
from mae_jax.data.groups import GROUPS_CSV, largest_remainder

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
  key: str | None = None  # patient/study group id (groups.py); never written as such
  frame: int = 0  # DICOM: the frame and the ultrasound region (-1: the whole frame) of this view
  region: int = -1
  spacing: tuple[float, float] | None = None  # DICOM region: (axial, lateral) pixel size in mm
  dicom: bool = False
  views: list = field(default_factory=list)  # DICOM, pass 1: (frame, region, spacing) of each view
  uid: str | None = None  # DICOM, pass 1: the group tag's value


def _rel(p: pathlib.Path, root: pathlib.Path) -> str:
  return p.relative_to(root).as_posix()


def _list_files(top: pathlib.Path, unreadable: list | None = None) -> list[pathlib.Path]:
  """Every file below ``top`` in sorted order; folders that cannot be listed go to ``unreadable``."""
  out = []
  for dirpath, dirnames, filenames in os.walk(top, onerror=None if unreadable is None else unreadable.append):
    dirnames.sort()
    for f in sorted(filenames):
      out.append(pathlib.Path(dirpath) / f)
  return out


def _is_image_name(p: pathlib.Path) -> bool:
  """An image or DICOM file by its name; a name without an extension may be DICOM (its magic
  decides in ``_screen``)."""
  return p.suffix.lower() in IMAGE_EXTENSIONS + dicom.DICOM_EXTENSIONS or not p.suffix


def _screen(files, root, skipped) -> list[pathlib.Path]:
  """Drop hidden files and non-image extensions (recorded as skipped)."""
  keep = []
  for p in files:
    rel = _rel(p, root)
    if rel == GROUPS_CSV:
      continue
    if any(part.startswith(".") for part in pathlib.PurePosixPath(rel).parts):
      skipped.append({"path": rel, "reason": "hidden file"})
    elif not _is_image_name(p):
      skipped.append({"path": rel, "reason": f"not an image file extension ({p.suffix})"})
    elif not p.suffix and not dicom.has_dicom_magic(p):
      skipped.append({"path": rel, "reason": "no file extension and no DICOM magic ('DICM' at byte 128)"})
    else:
      keep.append(p)
  return keep


def source_fingerprint(root) -> dict[str, list[int]]:
  """Relative path → [size, mtime_ns] of every file the conversion may read, [] per folder.

  The rules for what is left out (hidden entries, non-image extensions) are those of
  ``_screen``, so only a change that can alter a record changes the fingerprint. Folders
  behind symbolic links are not entered, as in the conversion's own walk. Files without an
  extension are all listed (they may be DICOM; telling needs a read), and so is ``groups.csv``."""
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
      if f.startswith(".") or not (_is_image_name(p) or (d == root and f == GROUPS_CSV)):
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
  examples = [f"{what} {_printable(k)}" for what, ks in (("added", added), ("removed", removed), ("modified", modified))
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
    # class/patient/file: the patient sub-folder is the file's group (groups.py).
    key = parts[1] if len(parts) >= 3 and parts[1].lower() not in _IMAGE_DIRS else None
    items.append(_Item(p, rel, group, split, key=key))
  return items


def check_layout(root, task: str = "pretrain") -> None:
  """The folder mistakes a job can see before it creates anything (a listing, no file read):
  ``root`` missing or not a directory, no file in it, and for ``classify`` images that are not
  inside a class folder (a flat folder) or a class folder without any image file. Raises
  ValueError with the reason. ``build_folder_dataset`` finds the rest (unreadable files, ...)."""
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise ValueError(f"dataset folder {_printable(str(root))} does not exist or is not a directory")
  bases = [c for c in sorted(root.iterdir()) if c.is_dir() and c.name.lower() in _SPLIT_ALIASES] or [root]
  files = [p for b in bases for p in _list_files(b) if not p.name.startswith(".") and _is_image_name(p)]
  if not files:
    raise ValueError(f"dataset folder {_printable(str(root))} holds no image or DICOM file")
  if task != "classify":
    return
  for b in bases:
    classes = [c for c in sorted(b.iterdir()) if c.is_dir() and not c.name.startswith(".")
               and c.name.lower() not in _MASK_DIRS]
    loose = [p for p in b.iterdir() if p.is_file() and not p.name.startswith(".") and _is_image_name(p)]
    where = _printable(str(b))
    if not classes:
      raise ValueError(f"dataset folder {where}: its {len(loose)} image(s) are not inside a class folder "
                       "(classification needs one sub-folder per class, e.g. benign/ and malignant/)")
    for c in classes:
      if not any(not p.name.startswith(".") and _is_image_name(p) for p in _list_files(c)):
        raise ValueError(f"dataset folder {where}: class folder {_printable(c.name)}/ holds no image "
                         "file (remove it or add its images)")


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
      if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
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
    counts = largest_remainder(len(keys), split_ratio)
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


