"""Segmentation fine-tuning from a pretraining workdir: UperNet on the ViT (USFM §4.1.2, docs/methods.md#downstream).

`run(config, workdir)` for `config.job == 'segment'`:

  1. Loads `config.init_from` (any recipe, MAE or SimMIM path): encoder, recipe, normalisation.
  2. Transfer corruption exactly as classification fine-tuning (`transfer.TransferPlan`): Deblurring
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
  6. After every epoch: mean per-image Dice on the validation split (at the images' stored size,
     see below); the best parameters are kept in memory, and in `workdir/best/checkpoints` every
     `train.checkpoint_every` epochs (with the latest state in `workdir/checkpoints`) and at the end.
  7. The best model on the test split: per-image Dice, IoU, HD95 (pixels), pixel accuracy and
     sensitivity (`evaluate.segmentation_metrics`, its empty-mask conventions), their means with
     percentile-bootstrap 95% CIs over test images, written as `results.json` / `results.md`;
     the per-image table `metrics_test.csv`; predicted masks `predictions_test.npz`; contour
     overlays `overlays_test.png`.

Validation and test metrics are computed at each image's stored resolution, as mmsegmentation and
USFM's downstream code score: the model predicts logits at `model.image_size`, they are resized
bilinearly (torch `F.interpolate(mode='bilinear', align_corners=False)`, `resize_logits`) to the
stored mask's height × width, argmax-ed, and scored against the stored, never resized, mask; HD95 is
in pixels of that image. A nearest-neighbour copy of the mask on the model grid would change small
lesions and put HD95 on the wrong grid. Images of one split may differ in size (folder datasets): the
resize runs per image on the host (`native_predictions`, `downstream.predict`'s `host_fn`). Training
still resizes image and mask (mask nearest-neighbour) to the model size.

Label efficiency: `config.label_fraction` < 1 trains on a stratified subset of the training split
(`evaluate.stratified_subset`, seed = `config.seed`): strata are the class labels when the source
has them (the built-in dataset: normal / benign / malignant, so lesion-free images are a stratum of
their own; folder datasets: the first-level folder), else 'has foreground' vs 'empty mask'.

Resumable like fine-tuning (`downstream.Checkpoints`): a rerun in the same workdir continues from the
latest checkpoint (every `train.checkpoint_every` epochs; the epochs since then are trained again, on
the same batches). SIGTERM checkpoints the state, the best parameters and the validation history at
the next step boundary and exits 0 (`preemption.Preemption`); the rerun then ends with the
uninterrupted run's results.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mae_jax import evaluate
from mae_jax.corrupt import augment
from mae_jax.data import sources
from mae_jax.models import upernet
from mae_jax.train import core, downstream, obs, optim, preemption, sharding, transfer, writers

log = logging.getLogger("mae_jax")

METRICS = ("dice", "iou", "hd95", "pixel_accuracy", "sensitivity")
# Record fields the segmentation steps never read (`label` is the image's class).
UNUSED = ("organ", "label")


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
  (nnU-Net's batch Dice), which does not push every lesion-free image's prediction to zero.
  optax's Tversky form at α = β = ½ is (I + s) / (½(P + T) + s): its `smooth` is half of ours in
  (2I + s) / (P + T + s)."""
  g = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
  per = optax.losses.dice_loss(logits, g, smooth=smooth / 2, ignore_background=True,
                               axis=(0, 1, 2) if batch else (1, 2))
  return jnp.mean(per)


def cross_entropy(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


# ------------------------------------------------------------------------------------ steps


def make_steps(config, graphdef, tx, schedule, plan, num_classes: int, mean, std):
  t = config.train
  dropout = config.model.drop_path > 0 or config.model.dropout > 0

  def forward(params, rest, batch, key=None):
    model = nnx.merge(graphdef, params, rest)
    x01 = plan.apply(batch["image"].astype(jnp.float32) / 255.0, batch["sigma"])
    blur_t = batch["blur_t"] if plan.use_t else None
    return model((x01 - mean) / std, blur_t=blur_t, key=key)

  aux_weight = float(t.get("aux_weight", 0.0)) if config.model.get("aux_channels", 0) else 0.0

  def loss_fn(params, rest, batch, key):
    y = batch["mask"][..., 0].astype(jnp.int32)
    aux = {}
    if aux_weight:
      model = nnx.merge(graphdef, params, rest)
      x01 = plan.apply(batch["image"].astype(jnp.float32) / 255.0, batch["sigma"])
      logits, aux_logits = model((x01 - mean) / std, blur_t=batch["blur_t"] if plan.use_t else None,
                                 key=key if dropout else None, with_aux=True)
      aux = {"aux_ce": cross_entropy(aux_logits, y)}  # USFM / mmseg: the auxiliary head's own CE
    else:
      logits = forward(params, rest, batch, key if dropout else None)
    ce = cross_entropy(logits, y)
    dl = dice_loss(logits, y, num_classes, float(t.dice_smooth), bool(t.dice_batch))
    loss = float(t.ce_weight) * ce + float(t.dice_weight) * dl
    if aux_weight:
      loss = loss + aux_weight * aux["aux_ce"]
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return loss, {"ce": ce, "dice_loss": dl, "pixel_acc": acc, **aux}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  vflip, rot90 = bool(config.data.get("vflip", False)), bool(config.data.get("rot90", False))

  def train_step(state: core.TrainState, rest, batch):
    if vflip or rot90:  # USFM's RandomRotate90 + VerticalFlip, on device
      batch = augment.flip_rot90_batch(core.step_key(state, salt=11), batch, vflip=vflip, rot90=rot90)
    (loss, aux), grads = grad_fn(state.params, rest, batch, core.step_key(state))
    new_state, grad_norm, ok = core.apply_if_finite(state, grads, loss, tx)
    metrics = {"loss": loss, **aux, "grad_norm": grad_norm, "lr": schedule(state.step),
               "finite": ok.astype(jnp.float32), "skipped_total": new_state.skipped,
               "bad_streak": new_state.bad_steps}
    return new_state, metrics

  def eval_step(params, rest, batch):
    # Logits, not labels: they are resized to each image's own size before the argmax.
    return {"logits": forward(params, rest, batch), "valid": batch["valid"], "index": batch["index"]}

  return train_step, eval_step


# ------------------------------------------------------------------------- native resolution


def _taps(n_in: int, n_out: int):
  """For each output row: the two source rows and the second one's weight, by torch's
  `area_pixel_compute_source_index` (align_corners=False): half-pixel centres, positions before the
  first centre clamped to it, and no antialiasing when shrinking (jax.image.resize's default
  antialias=True would average over the footprint instead). Positions are rounded as torch's float32
  kernel rounds them (a float32 scale, then one fused multiply-add): exact float64 positions move the
  weights by up to ~2e-5 at 224 px, and the outputs by ~1e-4."""
  f = np.float32
  scale = np.float64(f(n_in / n_out))
  src = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(f), f(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0, i1, np.clip(src - i0.astype(f), f(0.0), f(1.0))


def _resize_plane(y, rows, cols) -> np.ndarray:
  (i0, i1, a), (j0, j1, b) = rows, cols
  y = y[i0] * (1.0 - a)[:, None] + y[i1] * a[:, None]
  return y[:, j0] * (1.0 - b) + y[:, j1] * b


def resize_logits(logits, size: tuple[int, int]) -> np.ndarray:
  """(h, w, K) → (H, W, K) float32, bilinear: torch `F.interpolate(mode='bilinear',
  align_corners=False)` = `jax.image.resize(..., 'linear', antialias=False)`, on the host. Two taps
  per axis, so it costs O(H·W·K) whatever the scale."""
  x = np.asarray(logits, np.float32)
  if x.shape[:2] == tuple(size):
    return x
  taps = _taps(x.shape[0], int(size[0])), _taps(x.shape[1], int(size[1]))
  return np.stack([_resize_plane(x[..., k], *taps) for k in range(x.shape[-1])], axis=-1)


def native_labels(logits, size: tuple[int, int]) -> np.ndarray:
  """(H, W) uint8 argmax of the logits resized to `size` (resizing labels instead would move
  boundaries by up to half a model pixel and could not draw finer shapes than the model grid).
  One class plane at a time with a running maximum (first maximum wins, as np.argmax): np.argmax
  over a last axis of 2 costs ~10× the resize itself."""
  x = np.asarray(logits, np.float32)
  same = x.shape[:2] == tuple(size)
  taps = None if same else (_taps(x.shape[0], int(size[0])), _taps(x.shape[1], int(size[1])))
  best = labels = None
  for k in range(x.shape[-1]):
    y = x[..., k] if same else _resize_plane(x[..., k], *taps)
    if best is None:
      best, labels = np.array(y, np.float32), np.zeros(y.shape, np.uint8)
    else:
      np.copyto(labels, np.uint8(k), where=y > best)
      np.maximum(best, y, out=best)
  return labels


def stored(source, position: int, field: str) -> np.ndarray:
  """A record's image or mask as stored: (H, W) for a single channel, else (H, W, C)."""
  a = np.asarray(source[int(position)][field])
  return a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a


def native_predictions(rows: dict, source) -> dict:
  """`downstream.predict`'s host step for a batch: each image's logits resized to its stored mask's
  height × width and argmax-ed, with that mask. Object arrays of (H, W) uint8 maps, since the images
  of a split may differ in size. `source` is the full split (`index` = position in it)."""
  n = len(rows["index"])
  pred, mask = np.empty(n, object), np.empty(n, object)
  for j, pos in enumerate(rows["index"]):
    mask[j] = stored(source, pos, "mask").astype(np.uint8)
    pred[j] = native_labels(rows["logits"][j], mask[j].shape[:2])
  return {"pred": pred, "mask": mask, "index": rows["index"]}


# ---------------------------------------------------------------------------------- metrics


def _maps(masks, name: str) -> list[np.ndarray]:
  """(H, W) label maps of any sizes: an (N, H, W) array, or a sequence / object array of maps."""
  maps = [np.asarray(m) for m in masks]
  for m in maps:
    if m.ndim != 2:
      raise ValueError(f"{name}: expected (H, W) label maps, got one of shape {m.shape}")
  return maps


def _pairs(pred, true) -> tuple[list, list]:
  pred, true = _maps(pred, "pred"), _maps(true, "true")
  if len(pred) != len(true):
    raise ValueError(f"{len(pred)} predicted and {len(true)} true label maps")
  return pred, true


def per_image_dice(pred, true, num_classes: int) -> np.ndarray:
  """(N,) Dice per image, averaged over the foreground classes (`evaluate.dice` conventions):
  the validation score, without the cost of HD95. Each pair at its own size."""
  pred, true = _pairs(pred, true)
  out = np.empty(len(pred))
  for i in range(len(pred)):
    out[i] = np.mean([evaluate.dice(pred[i] == c, true[i] == c) for c in range(1, num_classes)])
  return out


def per_image_metrics(pred, true, num_classes: int) -> dict[str, np.ndarray]:
  """{metric: (N,)} for METRICS, plus `{m}_per_class` (N, K-1), from `evaluate.segmentation_metrics`
  on each pair at its own size (so HD95 is in that image's pixels and its empty-mask value is that
  image's diagonal)."""
  pred, true = _pairs(pred, true)
  per = [evaluate.segmentation_metrics(p[None], t[None], num_classes) for p, t in zip(pred, true)]
  out = {k: np.array([m[k][0] for m in per], np.float64) for k in METRICS}
  for k in ("dice", "iou", "hd95", "sensitivity"):
    out[f"{k}_per_class"] = np.array([m[f"{k}_per_class"][0] for m in per], np.float64)
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
  true = _maps(true, "true")
  out = {"all_background": float(np.mean(per_image_dice([np.zeros_like(t) for t in true], true,
                                                        num_classes)))}
  for c in range(1, num_classes):
    out[f"all_class_{c}"] = float(np.mean(per_image_dice([np.full_like(t, c) for t in true], true,
                                                         num_classes)))
  return out


def write_per_image(path: str, index, per_image: dict, sizes) -> None:
  """One row per image: its position, the height × width it was scored at, the metrics."""
  with open(path, "w") as f:
    f.write("position,height,width," + ",".join(METRICS) + "\n")
    for j, i in enumerate(np.asarray(index)):
      h, w = sizes[j]
      f.write(f"{int(i)},{int(h)},{int(w)}," + ",".join(f"{per_image[k][j]:.6g}" for k in METRICS) + "\n")


def save_predictions(path: str, pred, mask, index, names: list[str]) -> None:
  """`predictions_test.npz` without pickled objects: `pred` / `mask` (N, H, W) uint8 when every test
  image has the same size, else one `pred_<position>` / `mask_<position>` pair per image; always
  `index` (positions), `shape` (N, 2) and `classes`."""
  shapes = np.array([m.shape[:2] for m in mask], np.int64).reshape(-1, 2)
  arrays = {"index": np.asarray(index), "shape": shapes, "classes": np.array(names)}
  if len({tuple(s) for s in shapes}) <= 1:
    arrays.update(pred=np.stack(list(pred)).astype(np.uint8), mask=np.stack(list(mask)).astype(np.uint8))
  else:
    for i, p, m in zip(np.asarray(index), pred, mask):
      arrays[f"pred_{int(i)}"], arrays[f"mask_{int(i)}"] = p, m
  np.savez_compressed(path, **arrays)


def pick_overlays(true, n: int) -> np.ndarray:
  """Up to n test images, evenly spaced: three quarters with foreground in the truth, the rest
  without (so a figure shows both the hits and the false alarms)."""
  fg = np.flatnonzero([np.any(np.asarray(t) > 0) for t in true])
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
    img = np.asarray(images[j])
    ax.imshow(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img, cmap="gray", vmin=0,
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
  if config.get("job") != "segment":
    downstream.fail("job", config.get("job"), "expected 'segment'")
  downstream.validate_common(config, num_devices, lr_field="lr")
  m = config.model
  if m.channels <= 0:
    downstream.fail("model.channels", m.channels, "must be > 0")
  if m.norm_groups <= 0:
    downstream.fail("model.norm_groups", m.norm_groups, "must be > 0")
  if not 0.0 <= m.dropout < 1.0:
    downstream.fail("model.dropout", m.dropout, "must lie in [0, 1)")
  scales = parse_ints(m.pool_scales, "model.pool_scales")
  if not scales or min(scales) < 1:
    downstream.fail("model.pool_scales", m.pool_scales, "expected positive integers, e.g. '1,2,3,6'")
  t = config.train
  if t.get("aux_weight", 0.0) < 0 or config.model.get("aux_channels", 0) < 0:
    downstream.fail("train.aux_weight", (t.get("aux_weight"), config.model.get("aux_channels")),
                    "the auxiliary head's weight and channels must be >= 0")
  if t.ce_weight < 0 or t.dice_weight < 0 or t.ce_weight + t.dice_weight <= 0:
    downstream.fail("train.ce_weight", (t.ce_weight, t.dice_weight), "loss weights must be >= 0, not both 0")


# -------------------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict:
  """Fine-tunes UperNet on `config.init_from` in `workdir`; returns the test results, or
  {'preempted': True, 'step': ...} when SIGTERM stopped it (a rerun continues)."""
  return preemption.guarded(_run, config, workdir)


def _run(config, workdir: str, preempt: preemption.Preemption) -> dict:
  validate_config(config, jax.device_count())
  workdir, is_main, mesh, pre = downstream.set_up(config, workdir)
  pcfg = pre.config
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
  train_src = downstream.Positional(full["train"], rows)
  n_train = len(train_src)
  log.info("segmentation classes %s; train %d%s, validation %d, test %d", names, n_train,
           f" ({config.label_fraction:.0%} of {len(full['train'])}, stratified by {stratum}, seed "
           f"{config.seed})" if rows is not None else "", len(full["validation"]), len(full["test"]))
  plan = transfer.plan_for(config, pre, full, workdir)

  m = config.model
  model = upernet.from_pretrained(
      pre.model, num_classes, channels=int(m.channels), blocks=parse_ints(m.blocks, "model.blocks") or None,
      pool_scales=parse_ints(m.pool_scales, "model.pool_scales"), norm_groups=int(m.norm_groups),
      drop_path=float(m.drop_path), dropout=float(m.dropout), image_size=image_size,
      aux_channels=int(m.get("aux_channels", 0)), seed=config.seed, run=downstream.run_options(config))
  pre.model = None  # the segmenter holds copies of its weights: free the pretraining model's
  graphdef, params, rest = core.split_model(model)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_head = sum(x.size for k in ("necks", "head") for x in jax.tree.leaves(params[k]))

  t = config.train
  steps = optim.Steps.of(t, n_train)
  schedule = downstream.schedule_for(t, float(t.lr), steps)
  # The pretrained depth, not the truncated one: block i keeps MAE's / mmseg's multiplier.
  tx, decay = downstream.layerwise_adamw(config, pcfg, schedule, params, model.full_depth)

  state = core.init_state(params, tx, config.seed)
  shardings = sharding.state_shardings(mesh, state)
  rest_sh = sharding.replicated(mesh, rest)
  rest = jax.device_put(rest, rest_sh)

  # No non-trained state to checkpoint: `rest` (the position tables) is rebuilt from init_from.
  ckpts = downstream.Checkpoints(workdir, int(t.keep_checkpoints))
  val = downstream.Validation("dice", "Dice")
  start, state, _ = ckpts.restore(val, state, shardings, {}, {})

  train_step, eval_step = make_steps(config, graphdef, tx, schedule, plan, num_classes, pre.mean, pre.std)
  bsh = sharding.batch_sharding(mesh)
  step_fn = jax.jit(train_step, in_shardings=(shardings, rest_sh, bsh),
                    out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  eval_fn = jax.jit(eval_step, in_shardings=(shardings.params, rest_sh, bsh),
                    out_shardings=sharding.replicated(mesh))

  it = downstream.train_iterator(config, train_src, image_size=image_size, in_chans=in_chans,
                                 start=start, with_mask=True)
  writer = writers.Monitor(workdir, t, steps.total, start, is_main)
  log.info("segment from %s (recipe=%s %s, checkpoint step %d): UperNet on blocks %s, %d channels; "
           "%.2fM params (%.2fM necks + head), %d classes, steps=%d (%d/epoch, warm-up %d), batch=%d, "
           "lr=%.3g, layer decay %g, %dpx", pre.init_from, pcfg.recipe, pcfg.model.variant, pre.step,
           model.blocks, m.channels, n_params / 1e6, n_head / 1e6, num_classes, steps.total,
           steps.per_epoch, steps.warmup, t.batch_size, t.lr, decay, image_size)

  val_src = downstream.Positional(full["validation"])
  test_src = downstream.Positional(full["test"])

  def pred(args, src, split):
    # The pipeline's resized masks are not needed: the host step reads each stored mask.
    return downstream.predict(eval_fn, args, src, split, plan, config=config, image_size=image_size,
                              in_chans=in_chans, mesh=mesh, with_mask=False, unused=UNUSED,
                              host_fn=functools.partial(native_predictions, source=src.source))
  def validate_epoch(step, state):
    if not steps.epoch_ends(step):
      return
    epoch = steps.epoch(step)
    if not downstream.validates(config, epoch):
      return downstream.stops_early(config, val, epoch)
    with writer.timed("validation"):
      p = pred((state.params, rest), val_src, "validation")
    vd = float(np.mean(per_image_dice(p["pred"], p["mask"], num_classes)))
    writer.write_scalars(step, {"val_dice": vd})
    improved = val.record(epoch, step, {"dice": vd}, state.params, {})
    log.info("epoch %d (step %d): validation Dice %.4f%s", epoch, step, vd, " (best)" if improved else "")
    return downstream.stops_early(config, val, epoch)  # train.early_stop_epochs

  out = downstream.run_loop(
      config, preempt, writer, workdir, is_main, steps=steps, start=start, carry=state,
      batch=lambda step: downstream.next_train_batch(it, plan, UNUSED, mesh),
      step=lambda state, batch: step_fn(state, rest, batch), ckpts=ckpts, val=val,
      split=lambda state: (state, {}),
      checkpoint_every_epochs=t.checkpoint_every, evaluate=validate_epoch, lr_field="train.lr")
  step = out.step
  if out.preempted:
    writer.close()
    return {"preempted": True, "step": step}
  p = pred((jax.device_put(val.best_params(workdir), shardings.params), rest), test_src, "test")
  per = per_image_metrics(p["pred"], p["mask"], num_classes)
  ci = aggregate(per, n_boot=int(config.eval.n_boot), alpha=float(config.eval.alpha), seed=config.seed)
  baselines = baseline_dice(p["mask"], num_classes)
  writer.write_scalars(step, {f"test_{k}": v[0] for k, v in ci.items()})
  writer.close()
  best, history = val.best, val.history
  has_fg = np.array([np.any(m > 0) for m in p["mask"]])
  sizes = [m.shape[:2] for m in p["mask"]]
  results = {
      "rows": [downstream.result_row(config, "segment", pre, plan, ci, METRICS)],
      "test": downstream.ci_table(ci, METRICS),
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
      **downstream.provenance(pre, plan, decay),
      "label_strata": stratum, "image_size": image_size,
      "test_image_sizes": dict(collections.Counter(f"{h}x{w}" for h, w in sizes).most_common()),
      "conventions": "per image at its stored size (logits predicted at image_size, resized "
                     "bilinearly, align_corners=False, then argmax; the stored mask unresized), mean "
                     "over foreground classes; both masks empty: Dice = IoU = 1, HD95 = 0; one empty: "
                     "Dice = IoU = 0, HD95 = the image's diagonal; sensitivity NaN (skipped) on images "
                     "without foreground; HD95 in pixels of the stored image",
      "ci": downstream.ci_note(config),
  }
  if is_main:
    downstream.write_results(workdir, results, list(METRICS), full["train"])
    write_per_image(os.path.join(workdir, "metrics_test.csv"), p["index"], per, sizes)
    save_predictions(os.path.join(workdir, "predictions_test.npz"), p["pred"], p["mask"], p["index"],
                     names)
    n_fig = int(config.eval.overlay_images)
    if n_fig > 0:
      sel = pick_overlays(p["mask"], n_fig)
      images = [stored(test_src.source, i, "image") for i in p["index"][sel]]
      try:
        overlay_figure(os.path.join(workdir, "overlays_test.png"), images, p["mask"][sel],
                       p["pred"][sel], per["dice"][sel], names, p["index"][sel])
      except ImportError:
        log.warning("matplotlib is not installed: no overlay figure")
  log.info("test (best epoch %d, validation Dice %.4f): %s; all-background Dice %.4f", best["epoch"],
           best["dice"], ", ".join(f"{k} {ci[k][0]:.4f} [{ci[k][1]:.4f}, {ci[k][2]:.4f}]" for k in METRICS),
           baselines["all_background"])
  return {"test": {k: ci[k][0] for k in METRICS}, "test_ci": ci, "per_image": per,
          "baselines_dice": baselines, "best": best, "history": history, "step": step,
          "num_classes": num_classes, "classes": names}
