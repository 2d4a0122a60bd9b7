"""One entry point from `config.data` to a random-access source of records.

`us_phantom` (the built-in simulated dataset, built on first use) or `folder` (a directory of real
images, converted into the same record format next to the other built datasets).

A folder is converted once per state of its files: the conversion lives in
`<data root>/folders/<name>-<task>-<tag>/<digest>/`, where the digest is that of
`folder.source_fingerprint` (relative paths, sizes and mtimes of the images and folders it can
read). Adding, removing or replacing an image gives a new digest, hence a fresh conversion in a
new directory; a run still reading the old one keeps reading the old one whole, never a mix.
Old conversions are left in place (a run elsewhere may still read them); the log names them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

log = logging.getLogger("mae_jax")


def data_root(dcfg) -> str:
  """`data.data_dir`, else $MAE_JAX_DATA, else ~/.cache/mae_jax/datasets: every built dataset is
  derived data (simulated or converted), rebuilt if deleted."""
  root = dcfg.data_dir or os.environ.get("MAE_JAX_DATA") or os.path.join(
      os.path.expanduser("~"), ".cache", "mae_jax", "datasets")
  return os.path.abspath(os.path.expanduser(root))


def open_source(dcfg, split: str, *, task: str = "pretrain"):
  """The `split` ('train' | 'validation' | 'test') of the dataset named by `dcfg.name`."""
  if dcfg.name == "us_phantom":
    from mae_jax.data import us_phantom
    kwargs = dict(num_train=dcfg.num_train, num_validation=dcfg.num_validation,
                  num_test=dcfg.num_test, image_size=dcfg.native_size, seed=dcfg.seed)
    if task == "enhance":  # paired low / high-quality acquisitions (data/phantom_pairs.py)
      kwargs["task"] = task
    return us_phantom.data_source(data_root(dcfg), split, **kwargs)  # builds it first if missing
  if dcfg.name == "folder":
    return _folder_source(dcfg, split, task)
  raise ValueError(f"data.name={dcfg.name!r}: expected 'us_phantom' or 'folder'")


def _folder_source(dcfg, split: str, task: str):
  from mae_jax.data import folder, records

  if not dcfg.folder:
    raise ValueError("data.folder is empty: with data.name='folder' it must name a directory of images")
  src = os.path.abspath(os.path.expanduser(dcfg.folder))
  if not os.path.isdir(src):
    raise ValueError(f"data.folder={dcfg.folder!r}: {src} is not a directory")
  root = data_root(dcfg)
  frames, group_by = getattr(dcfg, "dicom_frames", "all"), getattr(dcfg, "group_by", "study")
  folder.check_layout(src, task)
  # The DICOM options change the records: a conversion of their defaults keeps its old name.
  extra = "" if (frames, group_by) == ("all", "study") else f"|{frames}|{group_by}"
  tag = hashlib.sha1(f"{src}|{task}|{dcfg.seed}{extra}".encode()).hexdigest()[:10]
  base = os.path.join(root, "folders", f"{os.path.basename(src.rstrip('/'))}-{task}-{tag}")
  with records.build_lock(root, os.path.basename(base)):
    fingerprint = folder.source_fingerprint(src)
    digest = folder.fingerprint_digest(fingerprint)
    out = os.path.join(base, digest[:16])
    if not _built_from(out, digest):
      _discard_partial_builds(base)
      previous = _newest_build(base)
      if previous is None:
        log.info("converting data.folder=%s (%d files and folders) into %s", src, len(fingerprint), out)
      else:
        log.warning(
            "data.folder=%s changed since its conversion in %s: %s; converting it again into %s "
            "(the old conversion is kept for runs that may still read it: delete it to free space)",
            folder._printable(src), previous, folder.describe_change(previous, fingerprint), out)
      folder.build_folder_dataset(src, out, task=task, split_seed=dcfg.seed, dicom_frames=frames,
                                  group_by=group_by)
  return folder.folder_source(out, split)


def _built_from(out: str, digest: str) -> bool:
  """A complete conversion (metadata.json is written last) of the folder state `digest`."""
  try:
    with open(os.path.join(out, "metadata.json")) as f:
      return json.load(f).get("source_digest") == digest
  except (OSError, ValueError):
    return False


def _newest_build(base: str) -> str | None:
  """The most recent complete conversion under `base`, to tell the user what changed since."""
  candidates = [base]  # conversions made before fingerprints sat directly in `base`
  if os.path.isdir(base):
    candidates += [os.path.join(base, d) for d in os.listdir(base) if not d.startswith(".")]
  stamps = {}
  for d in candidates:
    try:
      stamps[d] = os.stat(os.path.join(d, "metadata.json")).st_mtime_ns
    except OSError:
      continue
  return max(stamps, key=stamps.get) if stamps else None


def _discard_partial_builds(base: str) -> None:
  """Leftovers of killed builds (any folder state); safe under the lock every builder holds."""
  if os.path.isdir(base):
    for d in os.listdir(base):
      if d.startswith(".") and d.endswith((".partial", ".stale")):
        shutil.rmtree(os.path.join(base, d), ignore_errors=True)
