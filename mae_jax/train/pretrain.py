"""Pretraining: one jitted step for every recipe (the recipe picks the corruption and the model path)
and the loop around it: resume, logging with ETA, image summaries, checkpoints, preemption.

Reliability, all tested (tests/test_resume.py, test_preemption.py, test_nonfinite.py):
* exact resume: the checkpoint holds the TrainState (params, optimizer state, step, RNG key, non-finite
  counters) and the iterator's next batch; masks and corruptions are drawn from (seed, step), so a
  run killed anywhere and restarted repeats the uninterrupted run's losses bit for bit;
* SIGTERM: a checkpoint at the next step boundary, then exit 0 (`train/preemption.py`); one during
  the set-up stops the run before its first step, without a checkpoint; a save killed half-way is
  never restored; an exception still completes the checkpoint being written;
* non-finite loss or gradient: the update is skipped, counted, and `train.max_bad_steps` in a row stop
  the run naming the last good checkpoint (none is written inside a bad streak);
* `metrics.jsonl` in the workdir: every logged step as one JSON line (process 0).
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import distributed, models, recipes, recon_quality, validate, visualize
from mae_jax.data import pipeline, sources
from mae_jax.train import core, cost_estimate, preemption, writers

log = logging.getLogger("mae_jax")


# ------------------------------------------------------------------------------------------ step


def normalize(x01, mean, std):
  return (x01 - mean) / std


def make_loss_fn(config, graphdef, mean: float, std: float):
  """loss(params, rest, images_uint8, key, zoom=None) -> (loss, aux). Pixels only ever change on
  device. zoom: the batch's (N, 2) model pixels per stored pixel (σ in stored pixels); None: 1."""

  def loss_fn(params, rest, images, key, zoom=None):
    model = nnx.merge(graphdef, params, rest)
    x01 = images.astype(jnp.float32) / 255.0
    k_corrupt, k_mask = jax.random.split(key)
    x01, inputs01, kwargs = recipes.augment_and_corrupt(config, k_corrupt, x01, zoom)
    loss, _, mask = model(normalize(inputs01, mean, std), target=normalize(x01, mean, std),
                          key=k_mask, return_pred=False, **kwargs)
    return loss, {"mask_fraction": mask.mean()}

  return loss_fn


def grad_accum_steps(tcfg, num_devices: int, platform: str) -> int:
  """`train.grad_accum`, or for 0 (automatic) the fewest micro-batches that keep each device's
  micro-batch within `train.cpu_micro_batch` on CPU (1 on accelerators)."""
  if tcfg.grad_accum:
    return int(tcfg.grad_accum)
  per_device = tcfg.batch_size // num_devices
  if platform != "cpu" or per_device <= tcfg.cpu_micro_batch:
    return 1
  return next(a for a in range(-(-per_device // tcfg.cpu_micro_batch), per_device + 1)
              if per_device % a == 0)


def make_train_step(config, graphdef, tx, schedule, mean: float, std: float):
  loss_fn = make_loss_fn(config, graphdef, mean, std)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  accum = grad_accum_steps(config.train, jax.device_count(), jax.default_backend())

  def train_step(state: core.TrainState, rest, batch):
    key = core.step_key(state)
    images = batch["image"]
    zoom = batch.get("zoom")
    if zoom is None:  # callers without the pipeline's zoom: the images are the stored pixels
      zoom = jnp.ones((images.shape[0], 2), jnp.float32)
    if accum == 1:
      (loss, aux), grads = grad_fn(state.params, rest, images, key, zoom)
    else:
      # Micro-batch i takes rows i, i+accum, ...: every micro-batch stays spread over all devices.
      split = lambda a: a.reshape((a.shape[0] // accum, accum) + a.shape[1:]).swapaxes(0, 1)  # noqa: E731

      def body(carry, xs):
        i, imgs, zm = xs
        (l, a), g = grad_fn(state.params, rest, imgs, jax.random.fold_in(key, i), zm)
        return jax.tree.map(jnp.add, carry, (l, a, g)), None

      zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), {"mask_fraction": jnp.zeros(())}, state.params))
      (loss, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), split(images), split(zoom)))
      loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
    new_state, grad_norm, ok = core.apply_if_finite(state, grads, loss, tx)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "finite": ok.astype(jnp.float32), "skipped_total": new_state.skipped,
               "bad_streak": new_state.bad_steps, **aux}
    return new_state, metrics

  return train_step


# ------------------------------------------------------------------------------------------ loop


def data_stats(config, workdir: str, source) -> tuple[float, float]:
  """Dataset mean/std (config values win), saved in the workdir so transfer jobs reuse them."""
  path = os.path.join(workdir, "data_stats.json")
  if config.data.mean is not None and config.data.std is not None:
    mean, std = float(config.data.mean), float(config.data.std)
  elif os.path.exists(path):
    with open(path) as f:
      s = json.load(f)
    mean, std = s["mean"], s["std"]
  else:
    mean, std = pipeline.dataset_stats(source)
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump({"mean": mean, "std": std}, f)
  return mean, std


def total_steps(config, num_train: int) -> tuple[int, int]:
  t = config.train
  steps_per_epoch = max(1, num_train // t.batch_size)
  total = t.total_steps or core.steps_from_epochs(t.epochs, num_train, t.batch_size)
  warmup = int(round(t.warmup_epochs * steps_per_epoch))
  return total, min(warmup, total)


def train(config, workdir: str) -> dict:
  """Pretrains `config` in `workdir`, resuming from its latest checkpoint. Returns the last metrics
  (`preempted`: stopped by SIGTERM before the last step)."""
  # The handler stays installed while the last checkpoint is written, so a second signal cannot kill
  # the process half-way through the save.
  return preemption.guarded(_train, config, workdir)


def _train(config, workdir: str, preempt: preemption.Preemption) -> dict:
  validate.validate_pretrain(config, num_devices=jax.device_count(), process_count=jax.process_count())
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    core.save_config(config, workdir)
  mesh = core.make_mesh(config.mesh.fsdp)

  with distributed.main_process_first("open_source"):  # a shared data_dir is built once
    source = sources.open_source(config.data, "train")
  mean, std = data_stats(config, workdir, source)
  num_train = len(source)
  steps, warmup = total_steps(config, num_train)
  peak_lr = config.train.base_lr * config.train.batch_size / 256
  schedule = core.warmup_cosine(peak_lr, warmup, steps, config.train.min_lr)
  tx = core.adamw(schedule, b1=config.train.b1, b2=config.train.b2,
                  weight_decay=config.train.weight_decay, grad_clip=config.train.grad_clip)

  model = models.build_pretrain_model(config.model, seed=config.seed)
  graphdef, params, rest = core.split_model(model)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  state = core.init_state(params, tx, config.seed)
  shardings = core.state_shardings(mesh, state, config.mesh.get("fsdp_min_size", core.FSDP_MIN_SIZE))
  rest_sharding = jax.tree.map(lambda _: core.replicated(mesh), rest)
  rest = jax.device_put(rest, rest_sharding)

  mngr = core.checkpoint_manager(workdir, keep=config.train.keep_checkpoints)
  restored = core.restore_checkpoint(mngr, core.abstract_like(state, shardings))
  if restored is not None:
    state, start, data_state = restored.state, restored.step, restored.data
    log.info("resumed from the checkpoint at step %d in %s", start, mngr.directory)
  else:
    state = jax.device_put(state, shardings)
    start, data_state = 0, {}
  # The iterator is a pure function of (seed, draw index): its whole state is the next batch number.
  next_batch = int((data_state or {}).get("next_batch", start))

  step_fn = jax.jit(make_train_step(config, graphdef, tx, schedule, mean, std),
                    in_shardings=(shardings, rest_sharding, core.batch_sharding(mesh)),
                    out_shardings=(shardings, core.replicated(mesh)), donate_argnums=(0,))

  it = pipeline.train_iterator(
      source, global_batch=config.train.batch_size, image_size=config.model.image_size,
      seed=config.data.seed + config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), scale=(config.data.crop_scale_min, 1.0),
      hflip=config.data.hflip, sampler=config.data.sampler, in_chans=config.model.in_chans,
      start_batch=next_batch)
  # Every process computes the preview (the params are global arrays); only process 0 writes it.
  preview = _preview_batch(config, mean, std) if config.train.image_every > 0 else None

  monitor = writers.Monitor(workdir, config.train, steps, start, is_main)
  if is_main and start == 0:
    monitor.write_scalars(0, {"params_millions": n_params / 1e6})
  log.info("recipe=%s model=%s (%.2fM params, %s compute) devices=%d processes=%d steps=%d "
           "(warm-up %d) global batch=%d (%d micro-batches) peak lr=%.3g, images %dpx", config.recipe,
           config.model.variant, n_params / 1e6, jnp.dtype(models.compute_dtype(config.model.dtype)).name, jax.device_count(), jax.process_count(), steps, warmup,
           config.train.batch_size, grad_accum_steps(config.train, jax.device_count(), jax.default_backend()),
           peak_lr, config.model.image_size)
  if start == 0:
    writers.log_parameters(params, f"{config.model.variant} {config.recipe} parameters")
  accum = grad_accum_steps(config.train, jax.device_count(), jax.default_backend())
  flops = cost_estimate.step_flops(n_params, config.train.batch_size, model.spec.num_patches)
  if start < steps and jax.process_count() == 1 and cost_estimate.wanted(jax.default_backend(), flops):
    for line in cost_estimate.micro_batch_lines(
        make_loss_fn(config, graphdef, mean, std), state.params, rest, batch_size=config.train.batch_size,
        micro_batches=accum, image_size=config.model.image_size, in_chans=config.model.in_chans,
        steps_left=steps - start, platform=jax.default_backend(), log_every=config.train.log_every,
        checkpoint_every=config.train.checkpoint_every):
      log.info(line)

  metrics_log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), start) if is_main else None
  history, last, pending = [], {}, None
  step = start
  try:
    while step < steps:
      if step == start:
        if preempt.before_first_step(step):
          break
        monitor.before_first_step()
      batch = core.global_batch(next(it), mesh)
      # Wait for the step in flight (and check its loss) before dispatching the next: a SIGTERM that
      # came during it then stops the run right there, instead of after one more queued step.
      if pending is not None:
        _check_finite(config, *pending, mngr)
        pending = None
      if step > start and preempt.stop_before(step, functools.partial(_save, mngr, step, state, final=True,
                                                                      preempted=True)):
        break
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = step_fn(state, rest, {"image": batch["image"], "zoom": batch["zoom"]})
      step += 1
      pending = (step, metrics)
      m = monitor.after_step(step, metrics)
      if m is not None:
        last = m
        if monitor.scheduled(step):
          history.append((step, m["loss"]))
          if metrics_log is not None:
            metrics_log.write(step, m)
      if preview is not None and (step % config.train.image_every == 0 or step == steps):
        with monitor.timed("images"):
          monitor.write_images(step, {"reconstruction": _preview_image(config, graphdef, state, rest,
                                                                       preview, mean, std)})
      preempt.poll(step)
      final = step == steps or preempt.requested
      if final or step % config.train.checkpoint_every == 0:
        _save(mngr, step, state, final=final, preempted=preempt.requested)
      if preempt.requested:
        preemption.log_saved(step)
        break
    if pending is not None:
      _check_finite(config, *pending, mngr)
  finally:
    # An exception must not lose the checkpoint being written in the background.
    mngr.wait_until_finished()
    mngr.close()
    monitor.flush()
    if metrics_log is not None:
      metrics_log.close()
  monitor.close()
  quality = {}
  if step >= steps and config.train.get("recon_eval_images", 0) and jax.process_count() == 1:
    quality = _held_out_quality(config, nnx.merge(graphdef, state.params, rest), mean, std)
  with open(os.path.join(workdir, "train_done.json") if step >= steps else os.devnull, "w") as f:
    json.dump({"step": step, "loss": last.get("loss"), **quality}, f)
  return {"step": step, "history": history, "preempted": preempt.requested, **last, **quality}


def _held_out_quality(config, model, mean: float, std: float) -> dict:
  """What the run learned, in its last lines: the masked-patch error on held-out (validation) images
  against filling each masked patch with the visible pixels' mean (`recon_quality`)."""
  x01, zoom = visualize.load_batch(config, int(config.train.recon_eval_images))
  q = recon_quality.of(visualize.reconstruct(model, config, x01, mean, std, zoom=zoom))
  log.info("%s", recon_quality.describe(q, "held-out validation images"))
  return {"recon_quality": q}


def _save(mngr, step: int, state: core.TrainState, *, final: bool, preempted: bool) -> None:
  """Periodic checkpoints are skipped inside a run of non-finite steps, so that the newest
  checkpoint, the one a restart or the NonFiniteError message points to, is a good one. The final
  and the preemption checkpoint are always written: skipped steps never change the parameters."""
  streak = int(jax.device_get(state.bad_steps))  # same value on every process: they agree to skip
  if streak and not final:
    log.warning("step %d: checkpoint skipped (%d non-finite steps in a row); the newest one is step %s",
                step, streak, mngr.latest_step())
    return
  core.save_checkpoint(mngr, step, state, {"next_batch": step}, force=preempted)


class MetricsLog:
  """`metrics.jsonl` in the workdir: one JSON object per logged step (`step`, `loss`, `lr`,
  `grad_norm`, `finite`, `skipped_total`, ..., throughput), for scripts and plots. Floats are
  written with `repr`, so float32 values read back exactly (a non-finite loss is written `NaN`,
  which Python's json reads).

  The file is only ever appended to, by the run that holds the workdir's lock. On resume, the lines
  after the restored step (written by a run killed after its last checkpoint, or past a damaged
  checkpoint that was set aside) are moved, not dropped: appended to `metrics.discarded.jsonl`
  after a marker line, then cut from the end of `metrics.jsonl` in place. So `metrics.jsonl`
  always describes the one history that produced the current state, one line per logged step."""

  def __init__(self, path: str, start_step: int):
    self.path = path
    set_aside_after(path, start_step)
    self._f = open(path, "a")

  def write(self, step: int, metrics: dict) -> None:
    try:
      self._f.write(json.dumps({"step": int(step), **metrics}) + "\n")
      self._f.flush()
    except OSError as e:
      raise core.SaveFailed(f"writing {self.path} failed at step {step}: {e.strerror or e}; "
                            "free space (or make the workdir writable) and run the same command "
                            "again to resume from the last checkpoint") from None

  def close(self) -> None:
    try:
      self._f.close()
    except OSError:  # the failed write above was already reported
      pass


def set_aside_after(path: str, step: int) -> int:
  """Moves the lines of `path` from the first one past `step` (or cut short) to the end of
  `<name>.discarded.jsonl`, marked with the step resumed from; returns how many lines moved."""
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    data = f.read()
  cut, offset = None, 0
  for line in data.splitlines(keepends=True):
    try:
      beyond = int(json.loads(line).get("step", 0)) > step
    except (ValueError, AttributeError):  # a line cut short by a kill
      beyond = True
    if beyond or not line.endswith(b"\n"):
      cut = offset
      break
    offset += len(line)
  if cut is None:
    return 0
  tail = data[cut:]
  moved = tail.count(b"\n") + (not tail.endswith(b"\n"))
  aside = path[:-len(".jsonl")] + ".discarded.jsonl" if path.endswith(".jsonl") else path + ".discarded"
  with open(aside, "ab") as f:
    f.write((json.dumps({"discarded": moved, "resumed_from_step": int(step), "from": os.path.basename(path)})
             + "\n").encode())
    f.write(tail if tail.endswith(b"\n") else tail + b"\n")
    f.flush()
    os.fsync(f.fileno())  # safely aside before it is cut from the record
  os.truncate(path, cut)
  log.info("%s: %d line(s) after step %d moved to %s", os.path.basename(path), moved, step,
           os.path.basename(aside))
  return moved


def read_metrics(workdir: str) -> list[dict]:
  """The records of `metrics.jsonl` in `workdir`, in step order."""
  out = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:  # the last line of a killed run may be cut short
        pass
  return out


class NonFiniteError(RuntimeError):
  pass


def _check_finite(config, step, metrics, mngr):
  streak = int(metrics["bad_streak"])
  if streak:
    log.warning("step %d: loss or gradient not finite; update skipped (%d in a row)", step, streak)
  if streak >= config.train.max_bad_steps:
    latest = mngr.latest_step()
    where = (f"The last good checkpoint is step {latest} in {mngr.directory}" if latest is not None
             else "No checkpoint was saved before it")
    raise NonFiniteError(
        f"{streak} consecutive non-finite steps (train.max_bad_steps={config.train.max_bad_steps}) at step "
        f"{step}: stopping. {where}; lower train.base_lr, set train.grad_clip, check the data, or try "
        f"model.dtype='float32'.")


def _preview_batch(config, mean, std, n: int = 4):
  src = sources.open_source(config.data, "validation")
  batch = next(iter(pipeline.eval_iterator(src, batch_size=n, image_size=config.model.image_size,
                                            in_chans=config.model.in_chans)))
  return np.asarray(batch["image"][:n]), np.asarray(batch["zoom"][:n])


@functools.lru_cache(maxsize=None)
def _preview_fn(config_json: str, graphdef, mean, std):
  import ml_collections
  config = ml_collections.ConfigDict(json.loads(config_json))

  @jax.jit
  def fn(params, rest, images, zoom):
    model = nnx.merge(graphdef, params, rest)
    x01 = images.astype(jnp.float32) / 255.0
    key = jax.random.key(1234)  # fixed: the same masks at every summary, so frames compare
    x01, inputs01, kwargs = recipes.augment_and_corrupt(config, key, x01, zoom)
    return visualize.reconstruction_columns(model, x01, inputs01, mean, std,
                                            key=jax.random.fold_in(key, 1), **kwargs)

  return fn


def _preview_image(config, graphdef, state, rest, images, mean, std):
  fn = _preview_fn(config.to_json(), graphdef, mean, std)
  cols = jax.device_get(fn(state.params, rest, *(jnp.asarray(a) for a in images)))
  return visualize.panel([np.asarray(c) for c in cols])
