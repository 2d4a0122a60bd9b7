"""Pretraining: one jitted step for every recipe (the recipe picks the corruption and the model path)
and the job's pieces for `loop.run` (batches, checkpoints, image summaries).

Exact resume (tests/test_resume.py): the checkpoint holds the TrainState (params, optimizer state,
step, RNG key, non-finite counters) and the iterator's next batch; masks and corruptions are drawn
from (seed, step), so a run killed anywhere and restarted repeats the uninterrupted run's losses bit
for bit. Preemption, non-finite steps, divergence and `metrics.jsonl`: `loop.py`.
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

from mae_jax import distributed, models, recipes, recon_quality, reconstruct, validate
from mae_jax.data import pipeline, sources
from mae_jax.train import checkpoint, core, cost_estimate, loop, optim, preemption, sharding, writers

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
  """(total, warm-up) steps: `optim.Steps` (an epoch is ⌊N/B⌋ steps)."""
  steps = optim.Steps.of(config.train, num_train)
  return steps.total, steps.warmup


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
  mesh = sharding.make_mesh(config.mesh.fsdp)

  with distributed.main_process_first("open_source"):  # a shared data_dir is built once
    source = sources.open_source(config.data, "train")
  mean, std = data_stats(config, workdir, source)
  num_train = len(source)
  steps, warmup = total_steps(config, num_train)
  peak_lr = config.train.base_lr * config.train.batch_size / 256
  schedule = optim.warmup_cosine(peak_lr, warmup, steps, config.train.min_lr)
  tx = optim.adamw(schedule, b1=config.train.b1, b2=config.train.b2,
                   weight_decay=config.train.weight_decay, grad_clip=config.train.grad_clip)

  model = models.build_pretrain_model(config.model, seed=config.seed)
  graphdef, params, rest = core.split_model(model)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  state = core.init_state(params, tx, config.seed)
  shardings = sharding.state_shardings(mesh, state, config.mesh.get("fsdp_min_size", sharding.FSDP_MIN_SIZE))
  rest_sharding = sharding.replicated(mesh, rest)
  rest = jax.device_put(rest, rest_sharding)

  mngr = checkpoint.checkpoint_manager(workdir, keep=config.train.keep_checkpoints)
  restored = checkpoint.restore_checkpoint(mngr, sharding.abstract_like(state, shardings))
  if restored is not None:
    state, start, data_state = restored.state, restored.step, restored.data
    log.info("resumed from the checkpoint at step %d in %s", start, mngr.directory)
  else:
    state = jax.device_put(state, shardings)
    start, data_state = 0, {}
  # The iterator is a pure function of (seed, draw index): its whole state is the next batch number.
  next_batch = int((data_state or {}).get("next_batch", start))

  step_fn = jax.jit(make_train_step(config, graphdef, tx, schedule, mean, std),
                    in_shardings=(shardings, rest_sharding, sharding.batch_sharding(mesh)),
                    out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))

  it = pipeline.train_iterator(
      source, global_batch=config.train.batch_size, image_size=config.model.image_size,
      seed=config.data.seed + config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), scale=(config.data.crop_scale_min, 1.0),
      hflip=config.data.hflip, sampler=config.data.sampler, in_chans=config.model.in_chans,
      start_batch=next_batch)
  # Every process computes the preview (the params are global arrays); only process 0 writes it.
  preview = _validation_batch(config, 4) if config.train.image_every > 0 else None

  monitor = writers.Monitor(workdir, config.train, steps, start, is_main)
  accum = grad_accum_steps(config.train, jax.device_count(), jax.default_backend())
  if is_main and start == 0:
    monitor.write_scalars(0, {"params_millions": n_params / 1e6})
  log.info("recipe=%s model=%s (%.2fM params, %s compute) devices=%d processes=%d steps=%d "
           "(warm-up %d) global batch=%d (%d micro-batches) peak lr=%.3g, images %dpx", config.recipe,
           config.model.variant, n_params / 1e6, jnp.dtype(models.compute_dtype(config.model.dtype)).name,
           jax.device_count(), jax.process_count(), steps, warmup, config.train.batch_size, accum, peak_lr,
           config.model.image_size)
  if start == 0:
    writers.log_parameters(params, f"{config.model.variant} {config.recipe} parameters")
  flops = cost_estimate.step_flops(n_params, config.train.batch_size, model.spec.num_patches)
  if start < steps and jax.process_count() == 1 and cost_estimate.wanted(jax.default_backend(), flops):
    for line in cost_estimate.micro_batch_lines(
        make_loss_fn(config, graphdef, mean, std), state.params, rest, batch_size=config.train.batch_size,
        micro_batches=accum, image_size=config.model.image_size, in_chans=config.model.in_chans,
        steps_left=steps - start, platform=jax.default_backend(), log_every=config.train.log_every,
        checkpoint_every=config.train.checkpoint_every):
      log.info(line)

  def batch(step):
    b = sharding.global_batch(next(it), mesh)
    return {"image": b["image"], "zoom": b["zoom"]}

  def evaluate(step, state):
    if preview is not None and (step % config.train.image_every == 0 or step == steps):
      with monitor.timed("images"):
        monitor.write_images(step, {"reconstruction": _preview_image(config, graphdef, state, rest,
                                                                     preview, mean, std)})

  def save(step, state, data, force):
    checkpoint.save_checkpoint(mngr, step, state, {"next_batch": step, **data}, force=force)

  def close():
    mngr.wait_until_finished()
    mngr.close()

  job = loop.Job(
      total=steps, start=start, carry=state, batch=batch,
      step=lambda state, b: step_fn(state, rest, b),
      checkpoint_due=lambda step: step % config.train.checkpoint_every == 0,
      save=save, latest_checkpoint=lambda: (mngr.latest_step(), str(mngr.directory)), close=close,
      evaluate=evaluate, lr_field="train.base_lr", first_loss=loop.loop_data(data_state))
  out = loop.run(job, config.train, preempt, monitor, workdir, is_main)
  monitor.close()
  last = out.last
  quality = {}
  if out.step >= steps and config.train.get("recon_eval_images", 0) and jax.process_count() == 1:
    quality = _held_out_quality(config, nnx.merge(graphdef, out.carry.params, rest), mean, std)
  if out.step >= steps and is_main:
    with open(os.path.join(workdir, "train_done.json"), "w") as f:
      json.dump({"step": out.step, "loss": last.get("loss"), **quality}, f)
  history = [(s, m["loss"]) for s, m in out.history]
  return {"step": out.step, "history": history, "preempted": out.preempted, **last, **quality}


def _held_out_quality(config, model, mean: float, std: float) -> dict:
  """What the run learned, in its last lines: the masked-patch error on held-out (validation) images
  against filling each masked patch with the visible pixels' mean (`recon_quality`)."""
  images, zoom = _validation_batch(config, int(config.train.recon_eval_images))
  rec = reconstruct.reconstruct(model, config, images.astype(np.float32) / 255.0, mean, std, zoom=zoom)
  q = recon_quality.of(rec)
  log.info("%s", recon_quality.describe(q, "held-out validation images"))
  return {"recon_quality": q}


def _validation_batch(config, n: int):
  """The first `n` validation images (uint8) and their zoom, as `visualize.load_batch` reads them."""
  src = sources.open_source(config.data, "validation")
  n = min(n, len(src))
  batch = next(iter(pipeline.eval_iterator(src, batch_size=n, image_size=config.model.image_size,
                                            in_chans=config.model.in_chans, with_mask=False)))
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
    return reconstruct.reconstruction_columns(model, x01, inputs01, mean, std,
                                            key=jax.random.fold_in(key, 1), **kwargs)

  return fn


def _preview_image(config, graphdef, state, rest, images, mean, std):
  fn = _preview_fn(config.to_json(), graphdef, mean, std)
  cols = jax.device_get(fn(state.params, rest, *(jnp.asarray(a) for a in images)))
  return reconstruct.panel([np.asarray(c) for c in cols])
