"""A workdir has one identity: the `config.json` written by the run that created it.

Every later run in the workdir compares its config with that file and never rewrites it. A
difference in a field that changes the result (recipe, model, data, init_from, seed, batch size,
learning rate, ...) stops the run before it touches anything (`IdentityMismatch`, exit 2): resuming
would mix two experiments under one name, and the workdir would claim a config it was not trained
with. Only the fields in `RESUMABLE` may change on a resume: how long to train (extending
`train.total_steps` or `train.epochs`), how often to log, write images and checkpoints, how many
checkpoints to keep, the device layout (`mesh`) and where built datasets are stored
(`data.data_dir`).

A downstream job reads `init_from`, so it may neither write into it nor into a workdir its chain of
`init_from`s comes from (the pretraining `config.json` would be replaced, and every later job from
it would fail or, worse, read the wrong recipe).
"""

from __future__ import annotations

import errno
import json
import os
import shutil

from mae_jax.train import workdir_lock

CONFIG_NAME = "config.json"

# Fields a resume may change: they decide how long and how observably a run trains, not what it
# computes at a given step. A prefix ending in "." covers every field under it.
RESUMABLE = ("train.total_steps", "train.epochs", "train.log_every", "train.log_every_secs",
             "train.image_every", "train.checkpoint_every", "train.keep_checkpoints",
             "train.profile_steps", "mesh.",
             # where the built datasets are stored (the same images wherever they are built)
             "data.data_dir")

_MAX_NAMED = 4  # differing fields named in the message; the rest are counted


class IdentityMismatch(workdir_lock.RunStopped):
  """The config differs from the workdir's `config.json` in a field a resume may not change."""


class WrongInitFrom(workdir_lock.RunStopped):
  """`init_from` is the workdir itself, lies inside it, or comes from it."""


class DiskFull(workdir_lock.RunStopped):
  """The workdir's disk is (nearly) full before the run starts."""
  exit_code = 1


# Below this, a start would fail somewhere in its first writes (config.json, log.txt, TensorBoard's
# event file, whose C++ writer prints its own error lines): stop first, in one line.
MIN_FREE_BYTES = 128 << 10


def as_dict(config) -> dict:
  """The config as the JSON `config.json` holds (ml_collections' own JSON form)."""
  return json.loads(config.to_json_best_effort())


def _flat(tree, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def resumable(field: str) -> bool:
  return any(field == r or (r.endswith(".") and field.startswith(r)) for r in RESUMABLE)


def differences(saved: dict, current: dict) -> list[str]:
  """The fields (dotted) whose values differ between two config dicts, resumable ones excluded; a
  field present in only one of them differs."""
  a, b = _flat(saved), _flat(current)
  return sorted(k for k in set(a) | set(b) if not resumable(k) and (k not in a or k not in b or a[k] != b[k]))


def read(workdir: str) -> dict | None:
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _show(value, limit: int = 120) -> str:
  text = json.dumps(value)
  return text if len(text) <= limit else f"{text[:limit // 2 - 2]}...{text[-(limit // 2 - 1):]}"


def resumable_fields() -> str:
  return ", ".join(f"{r}*" if r.endswith(".") else r for r in RESUMABLE)


def check_identity(config, workdir: str) -> None:
  """`IdentityMismatch` when `workdir` already holds a config.json that differs from `config` in
  a field a resume may not change; nothing when the workdir is new or the configs agree."""
  try:
    saved = read(workdir)
  except ValueError as e:  # cut short or edited by hand: the workdir's identity is unknown
    raise IdentityMismatch(f"{os.path.join(workdir, CONFIG_NAME)} cannot be read ({e}): restore it, "
                           "or use a new --workdir") from None
  if saved is None:
    return
  current = as_dict(config)
  diff = differences(saved, current)
  if not diff:
    return
  a, b = _flat(saved), _flat(current)
  named = [f"{k} ({_show(a.get(k, '<absent>'))} there, {_show(b.get(k, '<absent>'))} now)"
           for k in diff[:_MAX_NAMED]]
  more = f" and {len(diff) - _MAX_NAMED} more" if len(diff) > _MAX_NAMED else ""
  raise IdentityMismatch(
      f"{workdir} holds a run of another config: it differs in {', '.join(named)}{more}.\n"
      f"  Use a new --workdir for this config, or rerun with the workdir's own config "
      f"({os.path.join(workdir, CONFIG_NAME)}); a resume may change only {resumable_fields()}")


def _real(path: str) -> str:
  return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def lineage(init_from: str, limit: int = 32) -> list[str]:
  """`init_from` and the workdirs its own `init_from`s name, nearest first (real paths)."""
  out, path = [], init_from
  while path and len(out) < limit:
    path = _real(path)
    if path in out:
      break
    out.append(path)
    try:
      saved = read(path)
    except (OSError, ValueError):
      break
    path = saved.get("init_from") or "" if isinstance(saved, dict) else ""
  return out


def check_init_from(config, workdir: str) -> None:
  """`WrongInitFrom` when the job would write into the workdir it reads (`init_from`), a folder
  holding it, or a workdir `init_from` was itself trained from."""
  src = config.get("init_from") or ""
  if not src:
    return
  here = _real(workdir)
  for i, path in enumerate(lineage(src)):
    inside = path.startswith(here + os.sep)
    if path == here or inside:
      what = ("is this job's own --workdir" if path == here and i == 0 else
              "lies inside this job's --workdir" if i == 0 else
              f"comes from {path}, which {'is' if path == here else 'lies inside'} this job's --workdir")
      raise WrongInitFrom(f"config.init_from={src!r} {what}: writing here would replace the "
                          "pretraining workdir's config.json; choose another --workdir")


class NotADirectory(workdir_lock.RunStopped):
  """`--workdir` names something that exists and is not a directory."""


def check(config, workdir: str) -> None:
  """The checks before the run takes the workdir: a directory (or nothing yet), not the job's own
  `init_from`, and the same identity."""
  path = os.path.abspath(os.path.expanduser(workdir))
  while not os.path.lexists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)  # the part that exists must be a directory, to create the rest in
  if not os.path.isdir(path):
    raise NotADirectory(f"--workdir={workdir}: {path} is a file, not a directory; choose another --workdir")
  check_init_from(config, workdir)
  check_identity(config, workdir)


def claim(config, workdir: str) -> None:
  """Writes `config.json` when the workdir has none yet; otherwise checks that `config` may run
  there. Never rewrites it."""
  check(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_NAME)
  if os.path.exists(path):
    return
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)  # never a half-written identity
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# Errors of the file system that no retry inside the run can fix.
_REFUSED = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
            errno.EROFS: "Read-only file system", errno.EFBIG: "File too large"}


def refused_write(e: BaseException | None) -> str | None:
  """The reason when `e`, or an error it was raised from, is a write the file system refused
  (TensorFlow's and tensorstore's errors carry it only in their text)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _REFUSED:
      return _REFUSED[e.errno]
    text = str(e).lower()
    reason = next((r for r in _REFUSED.values() if r.lower() in text), None)
    if reason is not None:
      return reason
    e = e.__cause__ or e.__context__
  return None


def check_free_space(workdir: str, need: int = MIN_FREE_BYTES) -> None:
  """`DiskFull` when the disk that holds (or will hold) `workdir` has less than `need` bytes free."""
  path = os.path.abspath(os.path.expanduser(workdir))
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  free = shutil.disk_usage(path).free
  if free < need:
    raise DiskFull(f"only {free // 1024} KiB free on the disk of {os.path.abspath(workdir)} (a run needs "
                   f"{need // 1024} KiB to start, its checkpoints more). Free space and run the same "
                   "command again")
