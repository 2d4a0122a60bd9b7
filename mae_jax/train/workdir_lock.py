"""One run owns a workdir: an exclusive `fcntl.flock` on `<workdir>/.lock` for as long as the job runs.

The lock file holds the owner (host, pid, start time) as JSON. `flock` is released by the kernel
when the owning process dies however it dies (SIGKILL, OOM, node loss on a local disk), so a lock
nobody holds but whose file still names an owner is stale: the next run takes it over and says so
in the log. A clean exit empties the file. The file itself is never deleted: deleting it would let
two runs lock two different files of the same name.

A second run on a live workdir stops before touching anything with `WorkdirBusy` (exit 2, one line
naming the owner). On multi-process runs process 0 takes the lock and every process learns the
outcome from it, so they all stop together (the others must not flock the same file: they would
block each other).

Every job takes it with one line, `with workdir_lock.hold(workdir):` (`preemption.guarded` does it
for the training jobs). The lock is re-entrant within a process: a job that holds it may call
another that takes it again.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket

log = logging.getLogger("mae_jax")

LOCK_NAME = ".lock"

_held: dict[str, list] = {}  # real path of the workdir -> [open lock file, depth]


class RunStopped(RuntimeError):
  """A fault the user must act on, explained in one sentence: `mae_jax.main` prints the message as
  one line, without a traceback, and exits with `exit_code`."""
  exit_code = 2


class WorkdirBusy(RunStopped):
  """Another live run holds the workdir."""


class WorkdirNotWritable(RunStopped):
  """The workdir (or its disk) cannot take the lock file: read-only, full, or not permitted."""


def owner_text(info: dict) -> str:
  return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, "
          f"started {info.get('started', '?')}")


def _read_owner(f) -> dict:
  f.seek(0)
  text = f.read()
  if not text.strip():
    return {}
  try:
    return json.loads(text)
  except ValueError:  # cut short by a kill while it was written
    return {"pid": "?", "host": "?", "started": "?"}


def _acquire(workdir: str):
  """This process's lock on `workdir` (the open file), or WorkdirBusy / WorkdirNotWritable."""
  path = os.path.join(workdir, LOCK_NAME)
  try:
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    f = open(path, "a+")
  except OSError as e:
    raise WorkdirNotWritable(f"cannot create the lock file {path}: {e.strerror or e} "
                             "(is the workdir read-only, full or someone else's?)") from None
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    owner = _read_owner(f)
    f.close()
    if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      raise WorkdirBusy(f"workdir {workdir} is in use by another run ({owner_text(owner)}): wait for "
                        f"it to finish, stop it, or pick another --workdir") from None
    raise WorkdirNotWritable(f"cannot lock {path}: {e.strerror or e}") from None
  stale = _read_owner(f)
  if stale:
    log.warning("workdir %s: taking over the lock of a run that is gone (%s)", workdir, owner_text(stale))
  me = {"host": socket.gethostname(), "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  try:
    f.seek(0)
    f.truncate()
    f.write(json.dumps(me) + "\n")
    f.flush()
  except OSError as e:
    f.close()
    raise WorkdirNotWritable(f"cannot write the lock file {path}: {e.strerror or e} "
                             "(is the workdir read-only or its disk full?)") from None
  return f, created


def _release(f, workdir: str, created: bool) -> None:
  # A run that created the workdir and left nothing in it but the lock (rejected during set-up,
  # e.g. a bad config) leaves no workdir behind. The file goes while still locked, so a run that
  # opened it meanwhile fails its flock instead of owning a deleted file.
  if created and os.listdir(workdir) == [LOCK_NAME]:
    try:
      os.unlink(os.path.join(workdir, LOCK_NAME))
      os.rmdir(workdir)
    except OSError:
      pass
  try:
    f.seek(0)
    f.truncate()  # a clean exit: the next run finds no owner to report as stale
  except OSError:
    pass  # a full or read-only disk: the next run then reports this run as stale, harmlessly
  fcntl.flock(f, fcntl.LOCK_UN)
  f.close()


def _agree(error: RunStopped | None, workdir: str) -> None:
  """Multi-process: every process raises when process 0 could not take the lock."""
  import jax
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  import numpy as np
  from jax.experimental import multihost_utils
  code = 0 if error is None else (1 if isinstance(error, WorkdirBusy) else 2)
  code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
  if error is not None:
    raise error
  if code:
    cls = WorkdirBusy if code == 1 else WorkdirNotWritable
    raise cls(f"process 0 could not take the lock of workdir {workdir} (its log says why)")


@contextlib.contextmanager
def hold(workdir: str):
  """The exclusive ownership of `workdir` for the body of the `with` (re-entrant in a process)."""
  import jax
  workdir = os.path.abspath(os.path.expanduser(workdir))
  key = os.path.realpath(workdir)
  if key in _held:
    _held[key][1] += 1
    try:
      yield
    finally:
      _held[key][1] -= 1
    return
  f, created, error = None, False, None
  if jax.process_index() == 0:
    try:
      f, created = _acquire(workdir)
    except RunStopped as e:
      error = e
  _agree(error, workdir)
  # Every process records the hold (the others with no file), so that a nested hold is re-entrant
  # on all of them alike: a nested `_agree` on some processes only would wait forever.
  _held[key] = [f, 1]
  try:
    yield
  finally:
    del _held[key]
    if f is not None:
      _release(f, workdir, created)
