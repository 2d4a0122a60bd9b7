"""Segmentation fine-tuning from a pretraining workdir: UperNet on the ViT (USFM §4.1.2, SPEC §5).

`run(config, workdir)` for `config.job == 'segment'`:

  1. Loads `config.init_from` (any recipe, MAE or SimMIM path): encoder, recipe, normalisation.
  2. Transfer corruption exactly as classification fine-tuning (`finetune.TransferPlan`): Deblurring
     MAE's pretraining blur on every split; D²MAE's per-image σ* (OBS, cached in `workdir/obs/`)
     and token BLU(t*), or the fixed / none settings; nothing for MAE / denoising MAE / USFM.
  3. Model: `upernet.Segmenter` (blocks 3/5/7/11 → 1/4…1/32 necks → PPM + FPN → per-pixel logits,
     bilinear to the input size), drop path `model.drop_path`.
  4. Loss: pixel cross-entropy + soft Dice of the foreground classes (smoothed by
     `train.dice_smooth`; over the whole batch's pixels with `train.dice_batch`, else per image),
     weighted `train.ce_weight`, `train.dice_weight`.
  5. Optimiser: AdamW (0.9, 0.999), wd 0.05 except 1-D params / pos_embed / CLS / BLU, layer-wise lr
     decay on the encoder with the *pretrained* depth (`lr_decay.layerwise_adamw`; the necks and the
     head are at the full rate, as mmseg's `LayerDecayOptimizerConstructor`); lr = `train.lr`
     (absolute, not scaled by the batch, as mmseg), linear warm-up then half-cosine to `min_lr`.
  6. After every epoch: mean per-image Dice on the validation split; the best parameters are kept
     in memory, and in `workdir/best/checkpoints` every `train.checkpoint_every` epochs (with the
     latest state in `workdir/checkpoints`) and at the end.
  7. The best model on the test split: per-image Dice, IoU, HD95 (pixels), pixel accuracy and
     sensitivity (`evaluate.segmentation_metrics`, its empty-mask conventions), their means with
     percentile-bootstrap 95% CIs over test images, written as `results.json` / `results.md`;
     the per-image table `metrics_test.csv`; predicted masks `predictions_test.npz`; contour
     overlays `overlays_test.png`.

Metrics are computed at the model's resolution (`model.image_size`, by default the pretraining size;
the masks are resized nearest-neighbour), so HD95 is in pixels of that grid.

Label efficiency: `config.label_fraction` < 1 trains on a stratified subset of the training split
(`evaluate.stratified_subset`, seed = `config.seed`): strata are the class labels when the source
has them (the built-in dataset: normal / benign / malignant, so lesion-free images are a stratum of
their own; folder datasets: the first-level folder), else 'has foreground' vs 'empty mask'.

Resumable like fine-tuning: a rerun in the same workdir continues from the latest checkpoint (every
`train.checkpoint_every` epochs; the epochs since then are trained again, on the same batches).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import evaluate
from mae_jax.data import pipeline, sources
from mae_jax.models import upernet
from mae_jax.train import core, finetune, lr_decay, obs, writers

log = logging.getLogger("mae_jax")

METRICS = ("dice", "iou", "hd95", "pixel_accuracy", "sensitivity")


# ------------------------------------------------------------------------------------- data


def class_names(config, source) -> list[str]:
  """Segmentation classes, background first: the built-in dataset's lesion masks are binary; a
  folder dataset's masks map their sorted raw values to 0..K-1 (`metadata['mask_values']`)."""
  meta = getattr(source, "metadata", None)
  if config.data.name == "us_phantom":
    names = ["background", "lesion"]
  elif isinstance(meta, dict) and meta.get("mask_values"):
    names = ["background" if i == 0 else f"value {v}" for i, v in enumerate(meta["mask_values"])]
  else:
    raise ValueError(f"config.data.folder={config.data.folder!r}: the built dataset has no mask classes "
                     "(was it built with task='segment'?)")
  k = int(config.model.get("num_classes") or 0)
  if k:
    if k < len(names):
      raise ValueError(f"config.model.num_classes={k} but the masks hold {len(names)} classes")
    names += [f"class{j}" for j in range(len(names), k)]
  if len(names) < 2:
    raise ValueError(f"the masks of {config.data.name!r} hold a single value: nothing to segment")
  return names


def strata(source) -> tuple[np.ndarray, str]:
  """Labels for the stratified label-efficiency subset, and what they are."""
  labels = getattr(source, "labels", None)
  if labels is None:
    labels = np.array([int(source[i].get("label", -1)) for i in range(len(source))], np.int64)
  labels = np.asarray(labels, np.int64)
  if labels.size and labels.min() >= 0 and np.unique(labels).size > 1:
    return labels, "class label"
  fg = np.array([int(np.any(np.asarray(source[i]["mask"]) > 0)) for i in range(len(source))], np.int64)
  return fg, "lesion present"


# ------------------------------------------------------------------------------------- loss


def dice_loss(logits, labels, num_classes: int, smooth: float = 1.0, batch: bool = False):
  """1 − soft Dice of the foreground classes, averaged. logits (N, H, W, K); labels (N, H, W).

  Per image (`batch=False`): with `smooth` > 0 an empty truth predicted empty scores ≈ 1, as
  `evaluate.dice` does. `batch=True` pools the pixels of the whole batch into one Dice per class
  (nnU-Net's batch Dice), which does not push every lesion-free image's prediction to zero."""
  p = jax.nn.softmax(logits, axis=-1)
  g = jax.nn.one_hot(labels, num_classes, dtype=p.dtype)
  axes = (0, 1, 2) if batch else (1, 2)
  inter = jnp.sum(p * g, axis=axes)
  den = jnp.sum(p, axis=axes) + jnp.sum(g, axis=axes)
  d = (2.0 * inter + smooth) / (den + smooth)
  return 1.0 - jnp.mean(d[..., 1:])


def cross_entropy(logits, labels):
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


# ------------------------------------------------------------------------------------ steps


def make_steps(config, graphdef, tx, schedule, plan, num_classes: int, mean, std):
  t = config.train
  dropout = config.model.drop_path > 0 or config.model.dropout > 0

  def forward(params, rest, batch, key=None):
    model = nnx.merge(graphdef, params, rest)
    x01 = plan.apply(batch["image"].astype(jnp.float32) / 255.0, batch["sigma"])
    blur_t = batch["blur_t"] if plan.use_t else None
    return model((x01 - mean) / std, blur_t=blur_t, key=key)

  def loss_fn(params, rest, batch, key):
    logits = forward(params, rest, batch, key if dropout else None)
    y = batch["mask"][..., 0].astype(jnp.int32)
    ce = cross_entropy(logits, y)
    dl = dice_loss(logits, y, num_classes, float(t.dice_smooth), bool(t.dice_batch))
    loss = float(t.ce_weight) * ce + float(t.dice_weight) * dl
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return loss, {"ce": ce, "dice_loss": dl, "pixel_acc": acc}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: core.TrainState, rest, batch):
    (loss, aux), grads = grad_fn(state.params, rest, batch, core.step_key(state))
    new_state, grad_norm, ok = core.apply_if_finite(state, grads, loss, tx)
    metrics = {"loss": loss, **aux, "grad_norm": grad_norm, "lr": schedule(state.step),
               "finite": ok.astype(jnp.float32), "skipped_total": new_state.skipped,
               "bad_streak": new_state.bad_steps}
    return new_state, metrics

  def eval_step(params, rest, batch):
    logits = forward(params, rest, batch)
    return {"pred": jnp.argmax(logits, -1).astype(jnp.uint8), "mask": batch["mask"][..., 0],
            "image": batch["image"], "valid": batch["valid"], "index": batch["index"]}

  return train_step, eval_step


def predict(eval_fn, params, rest, source, split, plan, *, config, image_size, in_chans, mesh):
  """Predicted and true label maps (n, S, S) uint8, images (n, S, S, C) uint8 and positions, for
  every record of `source` in order. (`finetune.predict` drops the masks, hence this twin.)"""
  bs = int(config.train.eval_batch_size or config.train.batch_size)
  it = pipeline.eval_iterator(source, batch_size=bs, image_size=image_size, in_chans=in_chans,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              with_mask=True)
  outs = []
  for local in it:
    local = dict(local)
    local.update(plan.lookup(split, local["index"]))
    local.pop("organ", None)
    local.pop("label", None)
    outs.append(eval_fn(params, rest, core.global_batch(local, mesh)))
  outs = core.host_gather(outs)
  cat = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  valid = cat.pop("valid").astype(bool)
  res = {k: v[valid] for k, v in cat.items()}
  order = np.argsort(res["index"], kind="stable")
  return {k: v[order] for k, v in res.items()}


# ---------------------------------------------------------------------------------- metrics


def per_image_dice(pred, true, num_classes: int) -> np.ndarray:
  """(N,) Dice per image, averaged over the foreground classes (`evaluate.dice` conventions):
  the validation score, without the cost of HD95."""
  out = np.empty(len(pred))
  for i in range(len(pred)):
    out[i] = np.mean([evaluate.dice(pred[i] == c, true[i] == c) for c in range(1, num_classes)])
  return out


def per_image_metrics(pred, true, num_classes: int) -> dict[str, np.ndarray]:
  """{metric: (N,)} for METRICS, plus `{m}_per_class` (N, K-1), from `evaluate.segmentation_metrics`."""
  m = evaluate.segmentation_metrics(pred, true, num_classes)
  out = {k: np.asarray(m[k], np.float64) for k in METRICS}
  for k in ("dice", "iou", "hd95", "sensitivity"):
    out[f"{k}_per_class"] = np.asarray(m[f"{k}_per_class"], np.float64)
  return out


def aggregate(per_image: dict, *, n_boot: int, alpha: float, seed: int) -> dict[str, tuple]:
  """{metric: (mean over images, lo, hi)}: NaN-skipping means (sensitivity is NaN on an image with
  no foreground) with percentile-bootstrap CIs over test images (`evaluate.bootstrap_ci`)."""
  cols = [np.asarray(per_image[k], np.float64) for k in METRICS]

  def means(*arrays):
    return {k: float(evaluate.nanmean(a)) for k, a in zip(METRICS, arrays)}

  return evaluate.bootstrap_ci(means, *cols, n_boot=n_boot, alpha=alpha, seed=seed)


def baseline_dice(true, num_classes: int) -> dict[str, float]:
  """Mean per-image Dice of label-blind predictors on these masks: all background, and all class c
  for each foreground class c."""
  true = np.asarray(true)
  out = {"all_background": float(np.mean(per_image_dice(np.zeros_like(true), true, num_classes)))}
  for c in range(1, num_classes):
    out[f"all_class_{c}"] = float(np.mean(per_image_dice(np.full_like(true, c), true, num_classes)))
  return out


def write_per_image(path: str, index, per_image: dict) -> None:
  with open(path, "w") as f:
    f.write("position," + ",".join(METRICS) + "\n")
    for j, i in enumerate(np.asarray(index)):
      f.write(f"{int(i)}," + ",".join(f"{per_image[k][j]:.6g}" for k in METRICS) + "\n")


def pick_overlays(true, n: int) -> np.ndarray:
  """Up to n test images, evenly spaced: three quarters with foreground in the truth, the rest
  without (so a figure shows both the hits and the false alarms)."""
  fg = np.flatnonzero(np.asarray(true).reshape(len(true), -1).max(1) > 0)
  bg = np.setdiff1d(np.arange(len(true)), fg)
  n_fg = min(len(fg), max(n - min(len(bg), n // 4), 0))
  n_bg = min(len(bg), n - n_fg)
  take = lambda idx, k: idx[np.linspace(0, len(idx) - 1, k).round().astype(int)] if k else idx[:0]  # noqa: E731
  return np.sort(np.concatenate([take(fg, n_fg), take(bg, n_bg)])).astype(np.int64)


def overlay_figure(path: str, images, true, pred, dice_values, names: list[str], positions) -> str:
  """Image in grey with the ground-truth contour (yellow) and the predicted contour (green), as
  USFM's Fig. 8; one line style per foreground class."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D

  n = len(images)
  cols = min(n, 4)
  rows = max(1, math.ceil(n / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
  styles = ["solid", "dashed", "dotted", "dashdot"]
  for ax in axes.ravel():
    ax.axis("off")
  for j in range(n):
    ax = axes.ravel()[j]
    ax.imshow(images[j][..., 0] if images[j].shape[-1] == 1 else images[j], cmap="gray", vmin=0,
              vmax=255, interpolation="nearest")
    for c in range(1, len(names)):
      ls = styles[(c - 1) % len(styles)]
      for m, colour in ((true[j], "yellow"), (pred[j], "lime")):
        if np.any(m == c):
          ax.contour((m == c).astype(float), levels=[0.5], colors=colour, linewidths=1.2,
                     linestyles=ls)
    ax.set_title(f"#{int(positions[j])}  Dice {dice_values[j]:.2f}", fontsize=8)
  handles = [Line2D([], [], color="yellow", label="ground truth"),
             Line2D([], [], color="lime", label="prediction")]
  fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------------- checks


def parse_ints(value, field: str) -> tuple[int, ...]:
  if value in (None, "", ()):
    return ()
  if isinstance(value, str):
    try:
      return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
      raise ValueError(f"config.{field}={value!r}: expected comma-separated integers") from None
  return tuple(int(v) for v in value)


def validate_config(config, num_devices: int) -> None:
  def fail(field, value, why):
    raise ValueError(f"config.{field}={value!r}: {why}")

  if config.get("job") != "segment":
    fail("job", config.get("job"), "expected 'segment'")
  if not config.get("init_from"):
    fail("init_from", config.get("init_from"), "set it to a pretraining workdir")
  if not 0.0 < config.label_fraction <= 1.0:
    fail("label_fraction", config.label_fraction, "must lie in (0, 1]")
  m = config.model
  if m.channels <= 0:
    fail("model.channels", m.channels, "must be > 0")
  if m.norm_groups <= 0:
    fail("model.norm_groups", m.norm_groups, "must be > 0")
  if not 0.0 <= m.drop_path < 1.0:
    fail("model.drop_path", m.drop_path, "must lie in [0, 1)")
  if not 0.0 <= m.dropout < 1.0:
    fail("model.dropout", m.dropout, "must lie in [0, 1)")
  scales = parse_ints(m.pool_scales, "model.pool_scales")
  if not scales or min(scales) < 1:
    fail("model.pool_scales", m.pool_scales, "expected positive integers, e.g. '1,2,3,6'")
  t = config.train
  for name in ("batch_size", "eval_batch_size"):
    v = t[name] or t.batch_size
    if v <= 0 or v % num_devices:
      fail(f"train.{name}", t[name], f"must be a positive multiple of the device count ({num_devices})")
  if t.total_steps < 0 or (t.total_steps == 0 and t.epochs <= 0):
    fail("train.epochs", t.epochs, "set train.epochs > 0 or train.total_steps > 0")
  if t.lr <= 0:
    fail("train.lr", t.lr, "must be > 0")
  if t.layer_decay is not None and not 0.0 < t.layer_decay <= 1.0:
    fail("train.layer_decay", t.layer_decay, "must lie in (0, 1]")
  if t.ce_weight < 0 or t.dice_weight < 0 or t.ce_weight + t.dice_weight <= 0:
    fail("train.ce_weight", (t.ce_weight, t.dice_weight), "loss weights must be >= 0, not both 0")
  if config.data.name not in ("us_phantom", "folder"):
    fail("data.name", config.data.name, "expected 'us_phantom' or 'folder'")


# -------------------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict:
  """Fine-tunes UperNet on `config.init_from` in `workdir`; returns the test results."""
  validate_config(config, jax.device_count())
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    core.save_config(config, workdir)
  mesh = core.make_mesh(config.mesh.fsdp)

  pcfg, pmodel, ckpt_step, mean, std = obs.pretrained_for_transfer(config)
  init_from = os.path.abspath(os.path.expanduser(config.init_from))
  if is_main:
    with open(os.path.join(workdir, "data_stats.json"), "w") as f:
      json.dump({"mean": mean, "std": std, "from": init_from}, f)
  image_size = int(config.model.get("image_size") or pcfg.model.image_size)
  in_chans = pcfg.model.in_chans
  if image_size != pcfg.model.image_size:
    log.info("segmenting at %dpx (pretraining %dpx): position table resized bicubically", image_size,
             pcfg.model.image_size)

  full = {s: sources.open_source(config.data, s, task="segment") for s in obs.SPLITS}
  for s, src in full.items():
    if len(src) == 0:
      raise ValueError(f"config.data: the {s} split is empty")
    if "mask" not in src[0]:
      raise ValueError(f"config.data: the {s} split of {config.data.name!r} has no masks")
  names = class_names(config, full["train"])
  num_classes = len(names)
  rows, stratum = None, None
  if config.label_fraction < 1.0:
    labels, stratum = strata(full["train"])
    rows = evaluate.stratified_subset(labels, config.label_fraction, config.seed)
  train_src = finetune.Positional(full["train"], rows)
  n_train = len(train_src)
  log.info("segmentation classes %s; train %d%s, validation %d, test %d", names, n_train,
           f" ({config.label_fraction:.0%} of {len(full['train'])}, stratified by {stratum}, seed "
           f"{config.seed})" if rows is not None else "", len(full["validation"]), len(full["test"]))

  settings, tables = None, None
  if pcfg.recipe == "d2mae":
    settings = obs.resolve_settings(config, pcfg)
    tables = finetune.d2mae_tables(pcfg, settings, full, model=pmodel, workdir=workdir,
                                   init_from=init_from, ckpt_step=ckpt_step, config=config, mean=mean,
                                   std=std)
  plan = finetune.TransferPlan(pcfg, settings, tables)
  log.info("transfer corruption: %s", plan.describe())

  m = config.model
  model = upernet.from_pretrained(
      pmodel, num_classes, channels=int(m.channels), blocks=parse_ints(m.blocks, "model.blocks") or None,
      pool_scales=parse_ints(m.pool_scales, "model.pool_scales"), norm_groups=int(m.norm_groups),
      drop_path=float(m.drop_path), dropout=float(m.dropout), image_size=image_size, seed=config.seed)
  del pmodel
  graphdef, params, rest = core.split_model(model)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  n_head = sum(int(np.prod(x.shape)) for k in ("necks", "head") for x in jax.tree.leaves(params[k]))

  t = config.train
  steps_per_epoch = max(1, n_train // t.batch_size)
  total = t.total_steps or int(math.ceil(t.epochs * steps_per_epoch))
  warmup = min(int(round(t.warmup_epochs * steps_per_epoch)), total)
  schedule = core.warmup_cosine(float(t.lr), warmup, total, t.min_lr)
  decay = lr_decay.layer_decay_for(config, pcfg)
  # The pretrained depth, not the truncated one: block i keeps MAE's / mmseg's multiplier.
  tx = lr_decay.layerwise_adamw(schedule, params, depth=model.full_depth, layer_decay=decay,
                                b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, grad_clip=t.grad_clip)

  state = core.init_state(params, tx, config.seed)
  shardings = core.state_shardings(mesh, state)
  rest_sh = jax.tree.map(lambda _: core.replicated(mesh), rest)
  rest = jax.device_put(rest, rest_sh)

  mngr = core.checkpoint_manager(workdir, keep=int(t.keep_checkpoints), async_save=False)
  best_mngr = core.checkpoint_manager(workdir, keep=1, async_save=False, subdir="best/checkpoints")
  restored = core.restore_checkpoint(mngr, core.abstract_like(state, shardings))
  best = {"dice": -1.0, "epoch": 0, "step": 0, "metrics": None}
  best_params = None
  if restored is not None:
    start, state, data = restored.step, restored.state, restored.data
    best.update({k: data[k] for k in best if k in data})
    b = core.restore_checkpoint(best_mngr,
                                core.abstract_like({"params": params}, {"params": shardings.params}))
    if b is not None:
      best_params = jax.device_get(b.state["params"])
    log.info("resumed at step %d (best validation Dice so far %.4f, epoch %d)", start, best["dice"],
             best["epoch"])
  else:
    start = 0
    state = jax.device_put(state, shardings)
  start = int(start)

  train_step, eval_step = make_steps(config, graphdef, tx, schedule, plan, num_classes, mean, std)
  bsh = core.batch_sharding(mesh)
  step_fn = jax.jit(train_step, in_shardings=(shardings, rest_sh, bsh),
                    out_shardings=(shardings, core.replicated(mesh)), donate_argnums=(0,))
  eval_fn = jax.jit(eval_step, in_shardings=(shardings.params, rest_sh, bsh),
                    out_shardings=core.replicated(mesh))

  it = pipeline.train_iterator(
      train_src, global_batch=t.batch_size, image_size=image_size, seed=config.data.seed + config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      scale=(config.data.crop_scale_min, 1.0), hflip=config.data.hflip, in_chans=in_chans,
      start_batch=start, with_mask=True)
  writer = writers.TensorBoardWriter(workdir) if is_main else writers.NullWriter()
  log.info("segment from %s (recipe=%s %s, checkpoint step %d): UperNet on blocks %s, %d channels; "
           "%.2fM params (%.2fM necks + head), %d classes, steps=%d (%d/epoch, warm-up %d), batch=%d, "
           "lr=%.3g, layer decay %g, %dpx", init_from, pcfg.recipe, pcfg.model.variant, ckpt_step,
           model.blocks, m.channels, n_params / 1e6, n_head / 1e6, num_classes, total,
           steps_per_epoch, warmup, t.batch_size, t.lr, decay, image_size)

  val_src = finetune.Positional(full["validation"])
  test_src = finetune.Positional(full["test"])
  pred = functools.partial(predict, eval_fn, plan=plan, config=config, image_size=image_size,
                           in_chans=in_chans, mesh=mesh)
  tp = core.Throughput(total, t.batch_size, start)
  t0 = time.perf_counter()
  step = start
  history = []
  best_unsaved = False
  try:
    while step < total:
      local = dict(next(it))
      local.update(plan.lookup("train", local["index"]))
      for k in ("organ", "label"):
        local.pop(k, None)
      state, metrics = step_fn(state, rest, core.global_batch(local, mesh))
      step += 1
      if step == start + 1:
        log.info("first step compiled and ran in %.1fs", time.perf_counter() - t0)
        tp.mark(step)
      if step % t.log_every == 0 or step == total:
        mm = {k: float(v) for k, v in jax.device_get(metrics).items()}
        mm.update(tp.mark(step))
        writer.write_scalars(step, mm)
        log.info("step %d/%d loss %.4f (ce %.4f, dice %.4f) pixel acc %.3f lr %.3g%s%s", step, total,
                 mm["loss"], mm["ce"], mm["dice_loss"], mm["pixel_acc"], mm["lr"],
                 f" {mm['images_per_sec']:.1f} img/s ETA {writers.format_eta(mm['eta_seconds'])}"
                 if "images_per_sec" in mm else "",
                 f" skipped {int(mm['skipped_total'])}" if mm["skipped_total"] else "")
        if int(mm["bad_streak"]) >= t.max_bad_steps:
          raise RuntimeError(f"{int(mm['bad_streak'])} consecutive non-finite steps at step {step} "
                             f"(train.max_bad_steps={t.max_bad_steps}): lower train.lr")
      if step % steps_per_epoch == 0 or step == total:
        epoch = int(math.ceil(step / steps_per_epoch))
        p = pred(state.params, rest, val_src, "validation")
        vd = float(np.mean(per_image_dice(p["pred"], p["mask"], num_classes)))
        writer.write_scalars(step, {"val_dice": vd})
        improved = vd > best["dice"]
        history.append({"epoch": epoch, "step": step, "dice": vd})
        log.info("epoch %d (step %d): validation Dice %.4f%s", epoch, step, vd,
                 " (best)" if improved else "")
        if improved:
          best = {"dice": vd, "epoch": epoch, "step": step, "metrics": {"dice": vd}}
          best_params = jax.device_get(state.params)
          best_unsaved = True
        if epoch % max(1, int(t.checkpoint_every)) == 0 or step == total:
          # The best parameters go to disk before the state that records their score, so a resumed
          # run always finds the best checkpoint its state refers to.
          if best_unsaved:
            core.save_checkpoint(best_mngr, best["step"], {"params": best_params}, best, force=True)
            best_unsaved = False
          core.save_checkpoint(mngr, step, state, {"next_batch": step, **best}, force=True)
  finally:
    mngr.wait_until_finished()
    best_mngr.wait_until_finished()
    mngr.close()
    best_mngr.close()
    writer.flush()

  if best_params is None:
    raise RuntimeError(f"no best checkpoint in {workdir}/best: delete the workdir and run again")
  p = pred(jax.device_put(best_params, shardings.params), rest, test_src, "test")
  per = per_image_metrics(p["pred"], p["mask"], num_classes)
  ci = aggregate(per, n_boot=int(config.eval.n_boot), alpha=float(config.eval.alpha), seed=config.seed)
  baselines = baseline_dice(p["mask"], num_classes)
  writer.write_scalars(step, {f"test_{k}": v[0] for k, v in ci.items()})
  writer.close()
  has_fg = p["mask"].reshape(len(p["mask"]), -1).max(1) > 0
  method = f"{pcfg.recipe}" + (f" (obs={settings['mode']})" if settings else "")
  row = {"method": method, "job": "segment", "label_fraction": f"{config.label_fraction:g}",
         "seed": str(config.seed), **{k: ci[k] for k in METRICS}}
  results = {
      "rows": [row],
      "test": {k: {"value": ci[k][0], "lo": ci[k][1], "hi": ci[k][2]} for k in METRICS},
      "test_per_class": {k: dict(zip(names[1:], evaluate.nanmean(per[f"{k}_per_class"], axis=0)))
                         for k in ("dice", "iou", "hd95", "sensitivity")},
      "test_n": int(len(p["mask"])),
      "test_n_with_foreground": int(has_fg.sum()),
      "test_dice_foreground_images": float(np.mean(per["dice"][has_fg])) if has_fg.any() else None,
      "baselines_dice": baselines,
      "validation_best": best,
      "validation_history": history,
      "classes": names,
      "feature_blocks": list(model.blocks),
      "init_from": init_from, "pretrain_recipe": pcfg.recipe, "checkpoint_step": int(ckpt_step),
      "transfer": plan.describe(), "obs": settings, "layer_decay": decay,
      "label_strata": stratum, "image_size": image_size,
      "conventions": "per image, mean over foreground classes; both masks empty: Dice = IoU = 1, "
                     "HD95 = 0; one empty: Dice = IoU = 0, HD95 = image diagonal; sensitivity NaN "
                     "(skipped) on images without foreground; HD95 in pixels at image_size",
      "ci": f"percentile bootstrap over test images, {int(config.eval.n_boot)} resamples, "
            f"{1 - float(config.eval.alpha):.0%}",
  }
  if is_main:
    evaluate.write_results(workdir, "results", results, metrics=list(METRICS))
    write_per_image(os.path.join(workdir, "metrics_test.csv"), p["index"], per)
    np.savez_compressed(os.path.join(workdir, "predictions_test.npz"), pred=p["pred"], mask=p["mask"],
                        index=p["index"], classes=np.array(names))
    n_fig = int(config.eval.overlay_images)
    if n_fig > 0:
      sel = pick_overlays(p["mask"], n_fig)
      try:
        overlay_figure(os.path.join(workdir, "overlays_test.png"), p["image"][sel], p["mask"][sel],
                       p["pred"][sel], per["dice"][sel], names, p["index"][sel])
      except ImportError:
        log.warning("matplotlib is not installed: no overlay figure")
  log.info("test (best epoch %d, validation Dice %.4f): %s; all-background Dice %.4f", best["epoch"],
           best["dice"], ", ".join(f"{k} {ci[k][0]:.4f} [{ci[k][1]:.4f}, {ci[k][2]:.4f}]" for k in METRICS),
           baselines["all_background"])
  return {"test": {k: ci[k][0] for k in METRICS}, "test_ci": ci, "per_image": per,
          "baselines_dice": baselines, "best": best, "history": history, "step": step,
          "num_classes": num_classes, "classes": names}
