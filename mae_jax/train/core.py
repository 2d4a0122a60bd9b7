"""What every training job shares: the mesh and shardings, the optimizer and its schedule, the
train state and checkpoints (progress and metrics: `writers.py`).

Shardings are decided here and nowhere else: the batch is split over every device along
('data', 'fsdp'); parameters and optimizer state are replicated, or split over 'fsdp' when
`config.mesh.fsdp > 1` (for ViT-L/H), and the same step function runs either way.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import sys
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mae_jax import distributed
from mae_jax.train import workdir_lock

log = logging.getLogger("mae_jax")

BATCH_AXES = ("data", "fsdp")


# ----------------------------------------------------------------------------------------- mesh


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must divide the number of devices ({len(devices)})")
  grid = np.asarray(devices).reshape(len(devices) // fsdp, fsdp)
  return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


FSDP_MIN_SIZE = 2**14  # default `mesh.fsdp_min_size`: ViT-L/H biases and norms stay replicated


def param_sharding(mesh: Mesh, x, min_size: int = FSDP_MIN_SIZE) -> NamedSharding:
  """FSDP: split the largest axis divisible by the fsdp size; arrays with fewer than `min_size`
  elements (gathering them would cost more than the memory they save) or no divisible axis stay
  replicated."""
  n = mesh.shape["fsdp"]
  shape = getattr(x, "shape", ())
  if n == 1 or not shape or int(np.prod(shape)) < min_size:
    return replicated(mesh)
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % n == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def state_shardings(mesh: Mesh, tree, min_size: int = FSDP_MIN_SIZE):
  return jax.tree.map(lambda x: param_sharding(mesh, x, min_size), tree)


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Assembles the global batch from this process's slice (every process holds only its rows)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


# ------------------------------------------------------------------------------------ optimizer


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0):
  """Linear warm-up from 0, then half-cosine to `min_lr`, evaluated per step (as MAE's
  `adjust_learning_rate`, which it calls per iteration with a fractional epoch)."""

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * step / max(warmup_steps, 1)
    frac = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    cos = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(frac, 0.0, 1.0)))
    return jnp.where(step < warmup_steps, warm, cos)

  return schedule


def timm_cosine(peak_lr: float, warmup_lr: float, warmup_steps: int, total_steps: int,
                min_lr: float = 0.0):
  """timm's CosineLRScheduler as USFM's trainers run it (usdsgen/utils/lr_scheduler.py:
  t_in_epochs=False, warmup_prefix=False, cycle_limit=1): lr(t) = warmup_lr + t·(peak − warmup_lr) /
  warmup_steps during the warm-up, else min_lr + (peak − min_lr)·(1 + cos(π·t / total_steps)) / 2
  — a cosine over all steps, warm-up included — and min_lr from total_steps on. `step_update(t)` runs
  after update t, so update g uses lr(max(g − 1, 0))."""

  def schedule(step):
    t = jnp.maximum(jnp.asarray(step, jnp.float32) - 1.0, 0.0)
    warm = warmup_lr + t * (peak_lr - warmup_lr) / max(warmup_steps, 1)
    cos = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * t / max(total_steps, 1)))
    return jnp.where(t < warmup_steps, warm, jnp.where(t < total_steps, cos, min_lr))

  return schedule


def decay_mask(params):
  """Weight decay on matrices only: biases and norm scales (1-D) are exempt, as in MAE."""
  return jax.tree.map(lambda x: x.ndim > 1, params)


def adamw(schedule, *, b1: float, b2: float, weight_decay: float, grad_clip: float = 0.0,
          mask=decay_mask):
  tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)
  if grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  return tx


# ---------------------------------------------------------------------------------- train state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw key data (uint32), so checkpoints need no typed-key support
  bad_steps: jax.Array  # consecutive non-finite steps
  skipped: jax.Array  # total non-finite steps skipped


def split_model(model):
  """(graphdef, trainable params, everything else) — the frozen position tables go to the rest."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def init_state(params, tx, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)),
                    bad_steps=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))


def step_key(state: TrainState, salt: int = 0):
  """A key that depends only on the seed and the step: a given step always draws the same masks."""
  key = jax.random.wrap_key_data(state.rng)
  return jax.random.fold_in(jax.random.fold_in(key, state.step), salt)


def apply_if_finite(state: TrainState, grads, loss, tx, *, branch: bool | None = None):
  """One optimizer update, skipped (params and moments unchanged) when the loss or gradient is not
  finite: a single bad batch must not poison a week-long run.

  `branch` picks how the skip is expressed. On CPU a `lax.cond` around the update is ~3x faster
  than selecting every leaf with `where(ok, new, old)`: the selects read the old moments after the
  donated buffers are overwritten, so XLA:CPU inserts a copy of every moment (the optimizer went
  from ~105 to ~38 ms per step for 25 M parameters, benchmarks/step.py). On GPU a conditional reads
  its predicate back to the host, a sync per step, so accelerators keep the selects (they cost a
  few extra passes over memory there). None = by backend."""
  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if branch is None:
    branch = jax.default_backend() == "cpu"

  def update(params, opt_state, grads):
    updates, new_opt = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt

  if branch:
    params, opt_state = jax.lax.cond(
        ok, lambda p, o: update(p, o, grads), lambda p, o: (p, o), state.params, state.opt_state)
  else:
    safe_grads = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
    new_params, new_opt = update(state.params, state.opt_state, safe_grads)
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    params, opt_state = pick(new_params, state.params), pick(new_opt, state.opt_state)
  new_state = TrainState(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      rng=state.rng,
      bad_steps=jnp.where(ok, 0, state.bad_steps + 1),
      skipped=state.skipped + (~ok).astype(jnp.int32),
  )
  return new_state, grad_norm, ok


# ---------------------------------------------------------------------------------- checkpoints


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


class _QuietWriteErrors(logging.Filter):
  """orbax's background threads and asyncio log every failed write of a refused save with its
  traceback (hundreds of lines for one full disk); `SaveFailed` says it in one line instead. Only
  records about a checkpoint write refused by the disk are dropped."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    try:
      text = record.getMessage()
    except Exception:  # noqa: BLE001 - a record that cannot format is not ours to judge
      return True
    exc = record.exc_info[1] if record.exc_info else None
    refused = _write_error_text(text) or (exc is not None and _write_error(exc))
    about_checkpoint = ("checkpoint" in text.lower() or (exc is not None and "checkpoint" in str(exc).lower())
                        or _from_orbax(record))
    return not (refused and about_checkpoint)


def _from_orbax(record: logging.LogRecord) -> bool:
  """Whether orbax logged the record or raised its exception (its save threads say 'No space left'
  without naming the checkpoint)."""
  if f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
    return True
  tb = record.exc_info[2] if record.exc_info else None
  return tb is not None and any(f"{os.sep}orbax{os.sep}" in f.filename for f in traceback.extract_tb(tb))


def _quiet_save_errors() -> None:
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _QuietWriteErrors) for f in logger.filters):
      logger.addFilter(_QuietWriteErrors())


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
    try:
      return super().save(step, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised, as one sentence when it is the disk's
      failed = self._failed(e, step)
      if failed is e:
        raise
      raise failed from None

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
  _quiet_save_errors()
  try:
    return _Manager(path, options=options, item_names=("state", "stats", "data"))
  except OSError as e:
    if _write_error(e) is None:
      raise
    raise SaveFailed(f"cannot use {path}: {_write_error(e)}") from None


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, state, data_state, *, stats=None,
                    force: bool = False) -> None:
  items = {"state": ocp.args.StandardSave(state),
           "data": ocp.args.JsonSave(data_state if data_state is not None else {})}
  if stats is not None and jax.tree.leaves(stats):
    items["stats"] = ocp.args.StandardSave(stats)
  mngr.save(step, args=ocp.args.Composite(**items), force=force)


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  stats: Any
  data: dict


class _QuietAbandonedReads(logging.Filter):
  """asyncio's 'Future/Task exception was never retrieved' records for the reads of a checkpoint
  whose restore already failed (and was reported in one line): the same error once per array.
  Which of the two asyncio logs depends on whether a read was still a bare future or already a
  task when the restore gave up."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (isinstance(record.msg, str) and record.msg.startswith(
        ("Future exception was never retrieved", "Task exception was never retrieved")))


def _quiet_closed_loops() -> None:
  """A failed restore leaves tensorstore reads in flight; each one that completes later calls back
  into orbax's closed asyncio loop, and Python prints an 'Event loop is closed' traceback for
  every such callback (hundreds, seconds after the error), and asyncio logs each read's error as a
  future nobody retrieved. They are harmless: filter exactly those."""
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _QuietAbandonedReads) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_QuietAbandonedReads())
  if getattr(sys.unraisablehook, "_mae_jax", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    previous(unraisable)

  hook._mae_jax = True
  sys.unraisablehook = hook


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
  _quiet_closed_loops()
  bad = []
  while True:
    latest = mngr.latest_step() if step is None else step
    if latest is None:
      break
    try:
      r = mngr.restore(latest, args=ocp.args.Composite(**items))
      return Restored(int(latest), r["state"], r["stats"] if with_stats else {}, r["data"])
    except Exception as e:  # noqa: BLE001 - sorted below into damage and everything else
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


def host_gather(tree):
  """A (possibly multi-process) global pytree as host numpy arrays, whole on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_params(workdir: str, step: int | None = None):
  """Just the parameters of a pretraining checkpoint, as host numpy (for transfer and export)."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(path):
    raise ValueError(f"no checkpoints in {workdir!r} (looked for {path})")
  mngr = ocp.CheckpointManager(path, item_names=("state", "data"))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"no complete checkpoint in {path}")
  _quiet_closed_loops()
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  except Exception as e:  # noqa: BLE001 - someone else's workdir: report, never move aside
    raise NoGoodCheckpoint(f"checkpoint {step} in {path} cannot be read ({_short(e)}); pick another "
                           "step or restore the pretraining workdir") from None
  finally:
    mngr.close()
  state = restored["state"]
  params = state["params"] if isinstance(state, dict) else state.params
  return step, _int_keys(jax.tree.map(np.asarray, params))


def _int_keys(tree):
  """Orbax restores without a target turn the integer keys of `nnx.List` (blocks.0, ...) into
  strings; NNX needs them back as ints."""
  if isinstance(tree, dict):
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()}
  return tree


# ------------------------------------------------------------------------------------- bookkeeping


def save_config(config, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: str):
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir!r} holds no config.json: is it a mae_jax workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def steps_from_epochs(epochs: float, num_examples: int, batch_size: int) -> int:
  """An epoch is ⌊N/B⌋ steps (the official MAE's `drop_last=True` loader), for the total as for
  the warm-up; fractional epochs round to the nearest step."""
  return max(1, int(round(epochs * max(1, num_examples // batch_size))))


def load_pretrained(workdir: str, step: int | None = None):
  """(config, model, step) of a pretraining workdir: the config JSON saved there is the whole truth
  about the run (recipe, blur, σ levels, token), so transfer jobs never ask for it again."""
  from mae_jax import models  # local import: models import nothing from train
  config = load_config(workdir)
  step, params = restore_params(workdir, step)
  model = models.build_pretrain_model(config.model, seed=config.seed)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))  # errors on a missing key
  nnx.update(model, state)
  return config, model, int(step)
