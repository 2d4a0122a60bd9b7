"""Patient-level splits of folder datasets: groups, the stratified group split, and the summary
of a built dataset's splits that results tables print.

A *group* is the unit that never straddles two splits: all frames of a cine and all images of a
study or patient. Where a folder dataset takes a file's group from (first match):
  1. ``groups.csv`` in the dataset root: a header ``path,group`` and one row per file or folder
     (path relative to the root, ``/``-separated; a folder row covers everything below it);
  2. DICOM: the ``StudyInstanceUID`` (``data.group_by='study'``, the default) or ``PatientID``
     (``data.group_by='patient'``) of the file;
  3. a patient sub-folder inside the class (or organ) folder: ``benign/patient07/a.png`` and
     ``malignant/patient07/b.png`` are one group, ``patient07``;
  4. otherwise the file alone (an image directly in its class folder is its own group).

Only a one-way hash of a group id is ever written (``hash_group``), never the id itself.

The split (``stratified_groups``): each group belongs to the class (organ) most of its images
have; per class the groups are shuffled with ``default_rng([seed, class id + 1])`` and dealt to
train/validation/test by the largest-remainder rule on the *number of groups* (5 groups → 3/1/1),
except that a split of non-zero ratio left empty takes a group from the fullest one when there are
at least as many groups as splits (3 groups → 1/1/1, not 2/1/0). With one image per group and at
least 4 images per class this is exactly the per-image split folder datasets made before groups. Label
fractions (``evaluate.stratified_subset``) draw inside the training split, so they cannot move a
group across splits.
"""

from __future__ import annotations

import csv
import hashlib
import json
import pathlib
from collections import Counter

import numpy as np

__all__ = ["GROUPS_CSV", "largest_remainder", "hash_group", "read_groups_csv", "stratified_groups",
           "split_summary", "split_summary_lines"]

GROUPS_CSV = "groups.csv"
_FILE_KEY = "\0file:"  # prefix of a file's own group: cannot collide with a real id


def largest_remainder(n: int, ratio) -> list[int]:
  """``n`` items dealt in proportion to ``ratio``: floors first, then the largest remainders."""
  r = np.asarray(ratio, np.float64)
  exact = n * r / r.sum()
  counts = np.floor(exact).astype(int)
  frac = exact - counts
  # Ties go to the earlier split (train first).
  for k in sorted(range(len(r)), key=lambda i: (-frac[i], i))[: n - counts.sum()]:
    counts[k] += 1
  return counts.tolist()


def file_group(rel: str) -> str:
  return _FILE_KEY + rel


def hash_group(key: str) -> str:
  """A one-way, stable name of a group id (sha-256, 16 hex digits)."""
  data = ("mae_jax.group/v1\0" + key).encode("utf-8", "surrogateescape")
  return hashlib.sha256(data).hexdigest()[:16]


def read_groups_csv(root: pathlib.Path) -> dict[str, str]:
  """``groups.csv`` of ``root`` as {relative path: group id}; {} without one.

  Raises ValueError naming the file and line for a malformed table."""
  path = pathlib.Path(root) / GROUPS_CSV
  if not path.is_file():
    return {}
  out: dict[str, str] = {}
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.reader(f))
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: cannot read: {e}") from None
  if not rows or [c.strip().lower() for c in rows[0][:2]] != ["path", "group"]:
    raise ValueError(f"{path}: the first line must be the header 'path,group'")
  for n, row in enumerate(rows[1:], start=2):
    if not row or not "".join(row).strip():
      continue
    if len(row) < 2 or not row[0].strip() or not row[1].strip():
      raise ValueError(f"{path} line {n}: expected 'relative/path,group', got {','.join(row)!r}")
    out[row[0].strip().strip("/")] = row[1].strip()
  return out


def lookup_csv(table: dict[str, str], rel: str) -> str | None:
  """The group ``groups.csv`` gives ``rel``: its own row, else the row of its nearest folder."""
  if rel in table:
    return table[rel]
  parts = rel.split("/")
  for k in range(len(parts) - 1, 0, -1):
    g = table.get("/".join(parts[:k]))
    if g is not None:
      return g
  return None


def _fill_every_split(counts: list[int], ratio) -> list[int]:
  """Where there are enough groups, no split of non-zero ratio stays empty: each empty one takes a
  group from the fullest split (3 groups at 3:1:1 give 1/1/1, not 2/1/0)."""
  counts = list(counts)
  want = [k for k, r in enumerate(ratio) if r > 0]
  if sum(counts) >= len(want):
    for k in want:
      if counts[k] == 0:
        counts[int(np.argmax(counts))] -= 1
        counts[k] += 1
  return counts


def stratified_groups(items, ratio, seed: int, names: list[str]) -> list[list]:
  """``items`` (objects with ``.rel``, ``.group`` = class/organ name or None, ``.key`` = group id)
  dealt into ``len(ratio)`` splits, whole groups at a time (see the module docstring)."""
  by_key: dict[str, list] = {}
  for it in items:
    by_key.setdefault(it.key, []).append(it)
  strata: dict[str | None, list[list]] = {}
  for members in by_key.values():
    members.sort(key=lambda it: it.rel)
    votes = Counter(it.group for it in members)
    top = max(votes.values())
    cls = min((g for g, c in votes.items() if c == top), key=lambda x: (x is None, x or ""))
    strata.setdefault(cls, []).append(members)
  out: list[list] = [[] for _ in ratio]
  for g in sorted(strata, key=lambda x: (x is None, x or "")):
    groups = sorted(strata[g], key=lambda m: m[0].rel)
    gid = names.index(g) + 1 if g in names else 0
    perm = np.random.default_rng([seed, gid]).permutation(len(groups))
    start = 0
    for s, c in enumerate(_fill_every_split(largest_remainder(len(groups), ratio), ratio)):
      for i in perm[start : start + c]:
        out[s] += groups[i]
      start += c
  return [sorted(s, key=lambda it: it.rel) for s in out]


def split_summary(out_dir) -> dict:
  """Per split of a built folder dataset: images, groups, and the classes it lacks, as
  ``{"splits": {split: {"images": n, "groups": k, "missing_classes": [...]}}, "notes": [...]}``.

  ``notes`` are the build's warnings about splits (a class missing from a split, a class whose
  groups cannot fill every split). Built datasets from before groups existed report ``groups``
  equal to ``images``."""
  meta = json.loads((pathlib.Path(out_dir) / "metadata.json").read_text())
  counts = meta.get("counts", {})
  groups = meta.get("groups_per_split", counts)
  classes = meta.get("classes") or []
  per_class = meta.get("counts_per_group", {})
  splits = {}
  for s, n in counts.items():
    missing = [c for c in classes if n and not per_class.get(s, {}).get(c)]
    splits[s] = {"images": int(n), "groups": int(groups.get(s, n)), "missing_classes": missing}
  return {"splits": splits, "notes": list(meta.get("split_warnings", []))}


def split_summary_lines(out_dir) -> list[str]:
  """``split_summary`` as markdown for results.md: a table and one line per note."""
  summ = split_summary(out_dir)
  lines = ["| split | images | groups (patients/studies) | classes missing |", "|---|---|---|---|"]
  for s, v in summ["splits"].items():
    lines.append(f"| {s} | {v['images']} | {v['groups']} | {', '.join(v['missing_classes']) or '-'} |")
  lines += [f"- note: {n}" for n in summ["notes"]]
  return lines
