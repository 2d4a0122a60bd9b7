"""The set-up and bookkeeping that fine-tuning / linear probing (`finetune.py`) and segmentation
(`segment.py`) share: the workdir and the pretrained encoder, the optimiser with layer-wise lr
decay, the training iterator, the loop's hooks (`run_loop`), prediction over a split, the checkpoints
of the latest state and of the best parameters with the validation bookkeeping a resumed run needs,
the shared config checks and the provenance written next to the results.

What differs between the jobs (model, loss, metrics, what is written) stays in the job's module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

import jax
import numpy as np

from mae_jax import evaluate, validate
from mae_jax.data import pipeline, transforms
from mae_jax.models import vit
from mae_jax.train import checkpoint, core, loop, lr_decay, obs, optim, sharding

log = logging.getLogger("mae_jax")


# ------------------------------------------------------------------------------------- data


class Positional:
  """A view of `rows` of a split whose records carry `index` = their position in the full split,
  so per-image tables (σ*, t*) index directly by it. Picklable, random access."""

  def __init__(self, source, rows=None):
    self.source = source
    self.rows = np.arange(len(source)) if rows is None else np.asarray(rows, np.int64)

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    pos = int(self.rows[int(i)])
    rec = dict(self.source[pos])
    rec["index"] = pos
    return rec


def train_iterator(config, source, *, image_size: int, in_chans: int, start: int, with_mask: bool):
  """The job's training batches from batch number `start` on (a pure function of the seeds)."""
  return pipeline.train_iterator(
      source, global_batch=config.train.batch_size, image_size=image_size,
      seed=config.data.seed + config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), scale=(config.data.crop_scale_min, 1.0),
      hflip=config.data.hflip, in_chans=in_chans, start_batch=start, with_mask=with_mask,
      **transforms.train_options(config))


def next_train_batch(it, plan, unused, mesh) -> dict:
  """The next global training batch with the plan's per-image σ / t, without the fields in `unused`
  (the crops' `zoom` goes into σ here, for σ in stored pixels)."""
  local = dict(next(it))
  local.update(plan.lookup("train", local["index"], local.pop("zoom", None)))
  for k in unused:
    local.pop(k, None)
  return sharding.global_batch(local, mesh)


def predict(eval_fn, args, source, split: str, plan, *, config, image_size: int, in_chans: int, mesh,
            with_mask: bool, unused, host_fn=None) -> dict:
  """`eval_fn(*args, batch)` over every record of `source`: the outputs concatenated, padding rows
  dropped, in the order of the records' `index`.

  With `host_fn`, each batch's real rows, as host numpy, go through `host_fn(rows) -> dict` (which
  keeps `index`) and only its outputs are kept, so a split's raw outputs (segmentation logits)
  never accumulate; its arrays may be object arrays (one entry per image) when sizes differ."""
  bs = int(config.train.eval_batch_size or config.train.batch_size)
  it = pipeline.eval_iterator(source, batch_size=bs, image_size=image_size, in_chans=in_chans,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              with_mask=with_mask, **transforms.eval_options(config))
  outs, pending = [], None
  for local in it:
    local = dict(local)
    local.update(plan.lookup(split, local["index"], local.pop("zoom", None)))
    for k in unused:
      local.pop(k, None)
    out = eval_fn(*args, sharding.global_batch(local, mesh))
    if host_fn is None:
      outs.append(out)
      continue
    # The previous batch's host work runs while the device computes this one.
    if pending is not None:
      outs.append(_host_rows(pending, host_fn))
    pending = out
  if host_fn is None:
    outs = sharding.host_gather(outs)
  elif pending is not None:
    outs.append(_host_rows(pending, host_fn))
  cat = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  valid = cat.pop("valid").astype(bool)
  res = {k: v[valid] for k, v in cat.items()}
  order = np.argsort(res["index"], kind="stable")
  return {k: v[order] for k, v in res.items()}


def _host_rows(out, host_fn) -> dict:
  out = sharding.host_gather(out)
  valid = out.pop("valid").astype(bool)
  rows = host_fn({k: v[valid] for k, v in out.items()})
  rows["valid"] = np.ones(int(valid.sum()), bool)
  return rows


# ------------------------------------------------------------------------------------ set-up


@dataclasses.dataclass
class Pretrained:
  """What a downstream job takes from `config.init_from`: its config (the whole truth about the
  encoder and the recipe), the pretraining model, the checkpoint step and the normalisation."""
  config: Any
  model: Any
  step: int
  mean: float
  std: float
  init_from: str  # absolute


def set_up(config, workdir: str):
  """(absolute workdir, whether this is process 0, the mesh, the `Pretrained` of `config.init_from`).
  Process 0 writes `config.json` and the normalisation (`data_stats.json`) into the workdir."""
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    core.save_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh.fsdp)
  pcfg, model, step, mean, std = obs.pretrained_for_transfer(config)
  init_from = (f"scratch:{config.scratch}" if config.get("scratch")
               else os.path.abspath(os.path.expanduser(config.init_from)))
  if is_main:
    with open(os.path.join(workdir, "data_stats.json"), "w") as f:
      json.dump({"mean": mean, "std": std, "from": init_from}, f)
  return workdir, is_main, mesh, Pretrained(pcfg, model, step, mean, std, init_from)


RUN_FIELDS = ("attention", "remat", "scan_layers")


def run_options(config) -> dict:
  """The `model.attention` / `remat` / `scan_layers` a downstream config sets (unset: pretraining's),
  for the model helpers' `run=`."""
  return {k: config.model[k] for k in RUN_FIELDS if config.model.get(k) is not None}


def layerwise_adamw(config, pretrain_config, schedule, params, depth: int):
  """(AdamW with layer-wise lr decay over `depth` encoder blocks, the decay): `train.layer_decay`,
  or when unset the published value for the pretrained variant."""
  t = config.train
  decay = lr_decay.layer_decay_for(config, pretrain_config)
  tx = lr_decay.layerwise_adamw(schedule, params, depth=depth, layer_decay=decay, b1=t.b1, b2=t.b2,
                                weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                                no_decay=t.get("no_decay", "mae"))
  return tx, decay


SCHEDULES = ("warmup_cosine", "timm_cosine")


def schedule_for(train_config, peak_lr: float, steps: optim.Steps):
  """The lr schedule of `train.schedule`; the cosine spans `train.decay_epochs` epochs when set
  (DeblurringMIM's 10^7, a constant lr in practice), else the run."""
  t = train_config
  decay_epochs = t.get("decay_epochs", 0) or 0
  total = int(math.ceil(decay_epochs * steps.per_epoch)) if decay_epochs else steps.total
  kind = t.get("schedule", "warmup_cosine")
  if kind == "timm_cosine":
    return optim.timm_cosine(peak_lr, float(t.get("warmup_lr", 0.0)), steps.warmup, total, t.min_lr)
  if kind != "warmup_cosine":
    raise ValueError(f"config.train.schedule={kind!r}: expected one of {SCHEDULES}")
  return optim.warmup_cosine(peak_lr, steps.warmup, total, t.min_lr)


def validates(config, epoch: int) -> bool:
  """Whether the validation split is scored after (1-based) `epoch`: every `eval.every_epochs`
  epochs from the first, as USFM's `epoch % val_freq == 0` on 0-based epochs."""
  every = int(config.eval.get("every_epochs", 1) or 1)
  return (epoch - 1) % every == 0


def early_stop(config, epoch: int, best_epoch: int) -> bool:
  """DeblurringMIM main_finetune.py: training ends once `train.early_stop_epochs` epochs have
  passed since the best validation score (0: never)."""
  patience = int(config.train.get("early_stop_epochs", 0) or 0)
  return patience > 0 and best_epoch > 0 and epoch - best_epoch >= patience


def stops_early(config, val: Validation, epoch: int) -> bool:
  """`early_stop` after `epoch` against the best validation epoch so far, logged when it stops."""
  if not early_stop(config, epoch, val.best["epoch"]):
    return False
  log.info("early stop after epoch %d: no better validation %s since epoch %d", epoch, val.name,
           val.best["epoch"])
  return True


# ------------------------------------------------------------------------------- bookkeeping


class Validation:
  """The best validation score so far with its parameters (host copies: the next step donates the
  device buffers) and the per-epoch history: what the test split is evaluated with, what the results
  report, and what a checkpoint must carry for a resumed run to end as an uninterrupted one."""

  def __init__(self, score: str, name: str):
    self.score, self.name = score, name  # the metric that decides, and how the log calls it
    self.best = {score: -1.0, "epoch": 0, "step": 0, "metrics": None}
    self.history: list[dict] = []
    self.params = self.stats = None
    self.unsaved = False  # best parameters newer than the best checkpoint

  def record(self, epoch: int, step: int, metrics: dict, params, stats) -> bool:
    """Adds an epoch's validation metrics; True when they beat the best so far."""
    improved = metrics[self.score] > self.best[self.score]
    self.history.append({"epoch": epoch, "step": step, **metrics})
    if improved:
      self.best = {self.score: metrics[self.score], "epoch": epoch, "step": step, "metrics": metrics}
      self.params, self.stats = jax.device_get(params), jax.device_get(stats)
      self.unsaved = True
    return improved

  def best_params(self, workdir: str):
    """The best epoch's parameters (host copy), which the test split is evaluated with."""
    if self.params is None:  # resumed after the last step with no best checkpoint left
      raise RuntimeError(f"no best checkpoint in {workdir}/best: delete the workdir and run again")
    return self.params


def run_loop(config, preempt, monitor, workdir: str, is_main: bool, *, steps, start: int, carry, batch,
             step, ckpts: Checkpoints, val: Validation, split, evaluate, lr_field: str,
             checkpoint_every_epochs: int = 1) -> loop.Outcome:
  """`loop.run` for a downstream job: its checkpoints are `ckpts` (`split(carry)` gives the train
  state and the non-trained state they hold), saved at the end of every `checkpoint_every_epochs`-th
  epoch. `evaluate` returning True stops early; a rerun after an early stop trains no further."""
  every = max(1, int(checkpoint_every_epochs))

  def save(s, carry, data, force):
    del force  # downstream checkpoints are always forced (one per epoch or fewer)
    state, stats = split(carry)
    ckpts.save(s, state, stats, val, data)

  total = steps.total
  if start and steps.epoch_ends(start) and early_stop(config, steps.epoch(start), val.best["epoch"]):
    total = start  # the run stopped early before this rerun: nothing more to train
  job = loop.Job(total=total, start=start, carry=carry, batch=batch, step=step,
                 checkpoint_due=lambda s: steps.epoch_ends(s) and steps.epoch(s) % every == 0, save=save,
                 latest_checkpoint=lambda: (ckpts.latest.latest_step(), str(ckpts.latest.directory)),
                 close=ckpts.close, evaluate=evaluate, lr_field=lr_field, first_loss=ckpts.first_loss)
  return loop.run(job, config.train, preempt, monitor, workdir, is_main)


class Checkpoints:
  """`workdir/checkpoints`: the latest train state (and non-trained `stats`), the data position and
  the validation bookkeeping; `workdir/best/checkpoints`: the best parameters and their `stats`."""

  def __init__(self, workdir: str, keep: int):
    self.latest = checkpoint.checkpoint_manager(workdir, keep=keep, async_save=False)
    self.best = checkpoint.checkpoint_manager(workdir, keep=1, async_save=False, subdir="best/checkpoints")
    self._saved_step = None
    self.first_loss = None  # the loop's, from the latest checkpoint

  def restore(self, val: Validation, state, shardings, stats, stats_shardings):
    """(step, state, stats) from the latest checkpoint, with `val` as it was then; without one, the
    initial state and stats placed on the mesh, at step 0."""
    abstract_stats = sharding.abstract_like(stats, stats_shardings)
    r = checkpoint.restore_checkpoint(self.latest, sharding.abstract_like(state, shardings),
                                abstract_stats=abstract_stats)
    if r is None:
      return 0, jax.device_put(state, shardings), jax.device_put(stats, stats_shardings)
    val.best.update({k: r.data[k] for k in val.best if k in r.data})
    self.first_loss = loop.loop_data(r.data)
    val.history = list(r.data.get("history") or [])
    b = checkpoint.restore_checkpoint(
        self.best, sharding.abstract_like({"params": state.params}, {"params": shardings.params}),
        abstract_stats=abstract_stats)
    if b is not None:
      val.params, val.stats = jax.device_get(b.state["params"]), jax.device_get(b.stats)
    log.info("resumed at step %d (best validation %s so far %.4f, epoch %d)", r.step, val.name,
             val.best[val.score], val.best["epoch"])
    self._saved_step = int(r.step)
    return int(r.step), r.state, r.stats

  def save(self, step: int, state, stats, val: Validation, loop_data: dict | None = None) -> None:
    """The best parameters first when they are newer than their checkpoint, then the latest state:
    a resumed run always finds the best checkpoint its state refers to. Once per step (an epoch's
    checkpoint and a preemption's at the same step are one)."""
    if step == self._saved_step:
      return
    if val.unsaved:
      checkpoint.save_checkpoint(self.best, val.best["step"], {"params": val.params}, val.best,
                           stats=val.stats, force=True)
      val.unsaved = False
    checkpoint.save_checkpoint(self.latest, step, state, {"next_batch": step, **val.best, "history": val.history},
                         stats=stats, force=True)
    self._saved_step = step

  def close(self) -> None:
    for mngr in (self.latest, self.best):
      mngr.wait_until_finished()
    for mngr in (self.latest, self.best):
      mngr.close()


# ------------------------------------------------------------------------------------ checks


def fail(field: str, value, why: str):
  raise ValueError(f"config.{field}={value!r}: {why}")


def validate_steps(t, num_devices: int) -> None:
  """Batch sizes that split over the devices, and a length (`config.train` = t)."""
  for name in ("batch_size", "eval_batch_size"):
    v = t[name] or t.batch_size
    if v <= 0 or v % num_devices:
      fail(f"train.{name}", t[name], f"must be a positive multiple of the device count ({num_devices})")
  validate.validate_length(t)


def validate_common(config, num_devices: int, lr_field: str) -> None:
  """The rules every downstream config obeys; `lr_field` is the job's peak-lr field under `train`."""
  if not config.get("init_from") and not config.get("scratch"):
    fail("init_from", config.get("init_from"), "set it to a pretraining workdir (or scratch=NAME: no "
         "pretraining)")
  if not 0.0 < config.label_fraction <= 1.0:
    fail("label_fraction", config.label_fraction, "must lie in (0, 1]")
  if not 0.0 <= config.model.drop_path < 1.0:
    fail("model.drop_path", config.model.drop_path, "must lie in [0, 1)")
  t = config.train
  validate_steps(t, num_devices)
  if t[lr_field] <= 0:
    fail(f"train.{lr_field}", t[lr_field], "must be > 0")
  validate.validate_progress(t)
  if t.layer_decay is not None and not 0.0 < t.layer_decay <= 1.0:
    fail("train.layer_decay", t.layer_decay, "must lie in (0, 1]")
  if config.data.name not in ("us_phantom", "folder"):
    fail("data.name", config.data.name, "expected 'us_phantom' or 'folder'")
  if t.get("schedule", "warmup_cosine") not in SCHEDULES:
    fail("train.schedule", t.schedule, f"expected one of {SCHEDULES}")
  if t.get("no_decay", "mae") not in lr_decay.NO_DECAY_MODES:
    fail("train.no_decay", t.no_decay, f"expected one of {lr_decay.NO_DECAY_MODES}")
  if int(config.eval.get("every_epochs", 1) or 1) < 1:
    fail("eval.every_epochs", config.eval.every_epochs, "must be >= 1")
  run = run_options(config)
  if run.get("attention", "xla") not in vit.ATTENTION:
    fail("model.attention", run["attention"], f"expected one of {vit.ATTENTION}")
  vit.remat_policy(run.get("remat", "none"))  # its error names model.remat


# ----------------------------------------------------------------------------------- results


def result_row(config, job: str, pre: Pretrained, plan, ci: dict, metrics) -> dict:
  """The results table's row: method (recipe and OBS setting), job, label fraction, seed, CIs."""
  method = pre.config.recipe + (f" (obs={plan.settings['mode']})" if plan.settings else "")
  if config.get("scratch"):
    method = f"no pretraining ({pre.config.model.get('backbone', 'vit')})"
  return {"method": method, "job": job, "label_fraction": f"{config.label_fraction:g}",
          "seed": str(config.seed), **{m: ci[m] for m in metrics}}


def ci_table(ci: dict, metrics) -> dict:
  """{metric: {value, lo, hi}} for results.json."""
  return {m: {"value": ci[m][0], "lo": ci[m][1], "hi": ci[m][2]} for m in metrics}


def provenance(pre: Pretrained, plan, decay) -> dict:
  """Where the results come from, for results.json."""
  return {"init_from": pre.init_from, "pretrain_recipe": pre.config.recipe,
          "checkpoint_step": int(pre.step), "transfer": plan.describe(), "obs": plan.settings or None,
          "layer_decay": decay}


def ci_note(config) -> str:
  return (f"percentile bootstrap over test images, {int(config.eval.n_boot)} resamples, "
          f"{1 - float(config.eval.alpha):.0%}")


def write_results(workdir: str, results: dict, metrics: list, source) -> None:
  """`results.json` / `results.md` (`evaluate.write_results`); for a folder dataset, results.md
  also gives the images and groups of each split and the classes a split lacks, next to the
  metrics: a class absent from the test split has no score, and the table must say so."""
  _, md = evaluate.write_results(workdir, "results", results, metrics=metrics)
  if hasattr(source, "out_dir"):
    from mae_jax.data import groups
    lines = ["", "## Data splits", "", *groups.split_summary_lines(source.out_dir)]
    with open(md, "a", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
