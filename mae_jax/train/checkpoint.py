"""Checkpoints of every job: a thin layer over orbax's `CheckpointManager` that (1) stops a run with
one sentence when the disk refuses a save (`SaveFailed`), (2) sets a damaged checkpoint aside to
`bad-<step>` with one warning and falls back to the previous one, and (3) reads just the parameters of
another workdir (`restore_params`).

Nothing here patches process-wide state. A checkpoint is read once, array by array, before orbax
restores it (`_read_every_array`): damage is found while no orbax read is in flight, so a failed
restore never leaves reads that complete later on a closed event loop. What orbax's save threads log
about a refused write goes through absl, which `main` keeps off the console (docs/reliability.md,
"Library output").
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mae_jax import distributed
from mae_jax.train import checksums, workdir_lock

log = logging.getLogger("mae_jax")


class SaveFailed(workdir_lock.RunStopped):
  """A checkpoint (or a run record) could not be written: disk full, read-only, not permitted. The
  previous checkpoints are untouched (orbax writes into a temporary directory and renames it only
  once complete, and deletes old checkpoints only after that)."""
  exit_code = 1


class NoGoodCheckpoint(workdir_lock.RunStopped):
  """Every checkpoint of the workdir is unreadable."""


# Errors of the file system that no retry inside the run can fix.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_WRITE_MESSAGES = {"no space left": "No space left on device", "disk quota": "Disk quota exceeded",
                   "read-only file system": "Read-only file system",
                   "permission denied": "Permission denied", "file too large": "File too large"}


def _write_error(e: BaseException) -> str | None:
  """The reason when `e` (or an exception it wraps: orbax re-raises tensorstore's) is a write
  refused by the file system, else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
      return e.strerror or str(e)
    reason = _write_error_text(str(e))
    if reason:
      return reason
    e = e.__cause__ or e.__context__
  return None


def _write_error_text(text: str) -> str | None:
  text = text.lower()
  return next((reason for m, reason in _WRITE_MESSAGES.items() if m in text), None)


class _Manager(ocp.CheckpointManager):
  """orbax's manager whose saves fail with one sentence (`SaveFailed`) when the disk refuses them.
  An async save's error surfaces at the next save or at `wait_until_finished`."""

  _saving = None  # the step of the save in flight

  def _failed(self, e: BaseException, step=None):
    step = self._saving if step is None else step
    reason = _write_error(e)
    if reason is None or isinstance(e, SaveFailed):
      return e
    try:
      good = max((s for s in self.all_steps() if s != step), default=None)
    except Exception:  # noqa: BLE001 - listing a broken directory: say nothing about it
      good = None
    kept = (f"the newest intact checkpoint is step {good}" if good is not None
            else "no earlier checkpoint exists")
    what = f"the checkpoint at step {step}" if step is not None else "a checkpoint"
    return SaveFailed(f"saving {what} in {self.directory} failed: {reason}; {kept}. Free space (or "
                      "make the workdir writable) and run the same command again to resume from it")

  def save(self, step, *args, **kwargs):
    try:
      super().wait_until_finished()  # the previous save's error belongs to the previous step
    except Exception as e:  # noqa: BLE001
      failed = self._failed(e)
      if failed is e:
        raise
      raise failed from None
    self._saving = step
    self._check_space(step, kwargs.get("args"))
    try:
      return super().save(step, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised, as one sentence when it is the disk's
      failed = self._failed(e, step)
      if failed is e:
        raise
      raise failed from None

  def _check_space(self, step, args) -> None:
    """Refuses a save the disk cannot hold before orbax starts writing. A save orbax starts and
    the disk refuses half-way abandons its other writes in flight: each then completes on orbax's
    closed event loop, and Python prints an 'Event loop is closed' traceback for it (dozens for
    one full disk) where the run should end in one line. The raw array bytes are an upper bound
    (orbax writes them compressed, and deletes old steps only after the new one commits), plus
    1 MiB for its metadata files."""
    if args is None:
      return
    need = 2**20 + sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves([getattr(a, "item", None) for _, a in args.items()])
               if hasattr(x, "dtype"))
    try:
      free = shutil.disk_usage(self.directory).free
    except OSError:
      return  # orbax reports a directory it cannot use
    if free < need:
      raise self._failed(OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (the checkpoint "
                                               f"needs {_mib(need)}, {_mib(free)} free)"), step)

  def wait_until_finished(self):
    try:
      return super().wait_until_finished()
    except Exception as e:  # noqa: BLE001
      failed = self._failed(e)
      if failed is e:
        raise
      raise failed from None


def checkpoint_manager(workdir: str, *, keep: int, async_save: bool = True,
                       subdir: str = "checkpoints") -> ocp.CheckpointManager:
  """Checkpoints of every job in `workdir/subdir`: the train state, optional non-trained state
  (`stats`, e.g. a linear probe's BatchNorm statistics) and a small JSON (`data`: the next batch,
  the best validation score, ...)."""
  # cleanup_tmp_directories: a save killed half-way (SIGKILL, node loss) leaves a temporary step
  # directory; it is never restored, and is deleted when the run restarts.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                         enable_async_checkpointing=async_save)
  path = os.path.join(os.path.abspath(workdir), subdir)
  try:
    return _Manager(path, options=options, item_names=("state", "stats", "data"))
  except OSError as e:
    if _write_error(e) is None:
      raise
    raise SaveFailed(f"cannot use {path}: {_write_error(e)}") from None


def _mib(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, state, data_state, *, stats=None,
                    force: bool = False) -> None:
  arrays = {"state": state, **({"stats": stats} if stats is not None and jax.tree.leaves(stats) else {})}
  data = checksums.with_record(arrays, data_state if data_state is not None else {})
  items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
  items["data"] = ocp.args.JsonSave(data)
  mngr.save(step, args=ocp.args.Composite(**items), force=force)


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  stats: Any
  data: dict


def _short(e: BaseException, limit: int = 240) -> str:
  """The first line of an error, cut to `limit` characters (tensorstore's run to kilobytes)."""
  text = " ".join(str(e).split()) or type(e).__name__
  text = f"{type(e).__name__}: {text}"
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(tree) -> dict:
  def name(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return {tuple(name(k) for k in path): tuple(getattr(x, "shape", ()))
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _matches_metadata(directory, abstract_state) -> bool:
  """Whether the state saved at `directory` (its metadata readable) has the tree and shapes of
  `abstract_state`: if not, a restore error is the config's fault (changed model), not damage.
  Raises when the metadata itself cannot be read."""
  from etils import epath
  md = ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / "state")
  return _names(getattr(md, "tree", md)) == _names(abstract_state)


# Reads in flight at once while checking a checkpoint: bounds the host memory the check holds.
_READ_WINDOW = 8


def _read_every_array(step_dir: str) -> None:
  """Reads and decodes every array saved under `step_dir` with tensorstore, waiting for each read,
  and raises the first error once none is in flight. orbax's own restore stops at its first failed
  read and abandons the rest, whose completions then land on its closed event loop (an 'Event loop
  is closed' traceback each, printed by Python itself); after this check it reads only data that
  decodes. A bit flip that still decodes is left to the checksums."""
  import tensorstore as ts
  for item in ("state", "stats"):
    base = os.path.join(step_dir, item)
    if not os.path.exists(os.path.join(base, "manifest.ocdbt")):
      continue  # not saved (stats), or not an OCDBT checkpoint: orbax reports what is missing
    kvstore = {"driver": "ocdbt", "base": f"file://{os.path.abspath(base)}/"}
    keys = ts.KvStore.open(kvstore).result().list().result()
    arrays = sorted((k.decode()[: -len(suffix)], driver) for k in keys
                    for suffix, driver in (("/.zarray", "zarr"), ("/zarr.json", "zarr3"))
                    if k.decode(errors="replace").endswith(suffix))
    errors = []
    for i in range(0, len(arrays), _READ_WINDOW):
      reads = []
      for name, driver in arrays[i: i + _READ_WINDOW]:
        try:
          reads.append(ts.open({"driver": driver, "kvstore": {**kvstore, "path": name}}, open=True,
                               read=True).result().read())
        except Exception as e:  # noqa: BLE001 - collected; raised once nothing is in flight
          errors.append(e)
      for r in reads:
        try:
          r.result()
        except Exception as e:  # noqa: BLE001
          errors.append(e)
      if errors:
        raise errors[0]


def set_aside(directory: str, step: int) -> str:
  """Renames the step directory to `bad-<step>` (`bad-<step>.2`, ... if taken): never restored,
  never deleted by orbax, there to inspect."""
  src = os.path.join(directory, str(step))
  dest = os.path.join(directory, f"bad-{step}")
  n = 1
  while os.path.exists(dest):
    n += 1
    dest = os.path.join(directory, f"bad-{step}.{n}")
  os.rename(src, dest)
  return dest


def restore_checkpoint(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None, *,
                       abstract_stats=None) -> Restored | None:
  """The latest readable checkpoint (orbax never lists a half-written one), or None without any.

  A checkpoint that cannot be read (a data file corrupt, truncated or deleted: bit rot, a half
  copied directory) is moved aside to `bad-<step>` with one log line, and the next older one is
  tried; when none is left, `NoGoodCheckpoint`. A state whose saved tree or shapes differ from
  `abstract_state` (the config changed) is an error, never moved aside. With `step`, that
  checkpoint or its error."""
  items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
  with_stats = abstract_stats is not None and jax.tree.leaves(abstract_stats)
  if with_stats:
    items["stats"] = ocp.args.StandardRestore(abstract_stats)
  directory = str(mngr.directory)
  bad = []
  while True:
    latest = mngr.latest_step() if step is None else step
    if latest is None:
      break
    try:
      _read_every_array(os.path.join(directory, str(latest)))
    except Exception as e:  # noqa: BLE001 - data that does not decode is damage, whatever the config
      if step is not None:
        raise
      why = _short(e)
    else:
      try:
        r = mngr.restore(latest, args=ocp.args.Composite(**items))
        data, sums = checksums.split(r["data"])
        checksums.verify(sums, {"state": r["state"], **({"stats": r["stats"]} if with_stats else {})}, data)
        return Restored(int(latest), r["state"], r["stats"] if with_stats else {}, data)
      except Exception as e:  # noqa: BLE001 - sorted below into damage and everything else
        # Every array decoded, so orbax's metadata reads fail nowhere half-way (on damaged data
        # they would leave reads in flight, each an 'Event loop is closed' traceback later).
        try:
          damaged = _matches_metadata(os.path.join(directory, str(latest)), abstract_state)
        except Exception:  # noqa: BLE001 - unreadable metadata is damage too
          damaged = True
        if not damaged or step is not None:
          raise
        why = _short(e)
    distributed.barrier(f"restore_failed_{latest}")
    dest = os.path.join(directory, f"bad-{latest}")
    if jax.process_index() == 0:
      dest = set_aside(directory, latest)
    distributed.barrier(f"set_aside_{latest}")
    log.warning("checkpoint %d in %s is unreadable (%s): moved aside to %s; trying the one before it",
                latest, directory, why, os.path.basename(dest))
    bad.append(latest)
    mngr.reload()
  if bad:
    raise NoGoodCheckpoint(f"no readable checkpoint in {directory}: step(s) {', '.join(map(str, bad))} "
                           f"were unreadable and are now in {directory}/bad-<step>; delete them (and "
                           f"metrics.jsonl) to start from scratch, or restore a copy")
  return None


def restore_params(workdir: str, step: int | None = None):
  """Just the parameters of a pretraining checkpoint, as host numpy (for transfer and export)."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(path):
    raise ValueError(f"no checkpoints in {workdir!r} (looked for {path})")
  mngr = ocp.CheckpointManager(path, item_names=("state", "data"))
  steps = sorted(mngr.all_steps()) if step is None else [step]
  if not steps:
    mngr.close()
    raise ValueError(f"no complete checkpoint in {path}")
  try:
    # Someone else's workdir: a damaged checkpoint is reported and skipped, never moved aside.
    for i, step in enumerate(reversed(steps)):
      try:
        _read_every_array(os.path.join(path, str(step)))
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                              data=ocp.args.JsonRestore()))
        data, sums = checksums.split(restored["data"])
        checksums.verify(sums, {"state": {"params": _params(restored["state"])}}, data,
                         only="state/params/")
        break
      except Exception as e:  # noqa: BLE001
        if i + 1 == len(steps):
          raise NoGoodCheckpoint(f"checkpoint {step} in {path} cannot be read ({_short(e)}); pick "
                                 "another step or restore the pretraining workdir") from None
        log.warning("checkpoint %d in %s is unreadable (%s): using the one before it", step, path, _short(e))
  finally:
    mngr.close()
  return step, _int_keys(jax.tree.map(np.asarray, _params(restored["state"])))


def _params(state):
  return state["params"] if isinstance(state, dict) else state.params


def _int_keys(tree):
  """Orbax restores without a target turn the integer keys of `nnx.List` (blocks.0, ...) into
  strings; NNX needs them back as ints."""
  if isinstance(tree, dict):
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()}
  return tree

