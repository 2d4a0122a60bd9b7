"""Fine-tuning and linear probing from a pretraining workdir (docs/methods.md#downstream), with recipe-aware transfer.

`run(config, workdir)` for `config.job` in {'finetune', 'linear_probe'}:

  1. Loads `config.init_from` (a pretraining workdir: its `config.json` is the whole truth about the
     encoder, the recipe, the blur and the normalisation).
  2. Transfer corruption, on device, on [0, 1] intensities before normalisation, identical for the
     train, validation and test splits (`transfer.TransferPlan`): Deblurring MAE's pretraining blur;
     D²MAE's optimal blurriness search (σ* and token BLU(t*) per image, cached in `workdir/obs/`),
     or its fixed / none settings; nothing for MAE / denoising MAE / USFM.
  3. Model: `heads.Classifier` (global average pool + fc_norm + head, drop path) or
     `heads.LinearProbe` (frozen encoder, CLS, BatchNorm without affine + Linear).
  4. Optimiser: AdamW (0.9, 0.999), wd 0.05 with MAE's mask, layer-wise lr decay
     (`lr_decay.layerwise_adamw`); or LARS (trust 0.001, momentum 0.9, no weight decay) for the
     probe. lr = base_lr · batch / 256, linear warm-up then half-cosine to `min_lr` (1e-6).
  5. Loss: cross-entropy with label smoothing 0.1 (fine-tuning), optional mixup / cutmix on device.
  6. After every `eval.every_epochs` epochs: `eval.select` (macro-F1, accuracy or balanced accuracy) on
     the validation split, optional early stopping; the best parameters are kept in host
     memory and in `workdir/best/checkpoints` (`checkpoint.restore_params(workdir + '/best')` reads them).
  7. The best model is evaluated on the test split: metrics with bootstrap 95% CIs, written as
     `results.json` / `results.md` (`evaluate.write_results`) and `predictions_test.npz`.

Label efficiency: `config.label_fraction` < 1 trains on a class-stratified subset of the training
split (`evaluate.stratified_subset`, seed = `config.seed`), the same subset for every method.

Resumable (`downstream.Checkpoints`): the latest state is checkpointed every epoch in
`workdir/checkpoints` with the best validation score so far and the history; a rerun in the same
workdir continues where it stopped. SIGTERM saves the same at the next step boundary and exits 0
(`preemption.Preemption`); the rerun then ends with the uninterrupted run's results.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mae_jax import evaluate
from mae_jax.corrupt import augment
from mae_jax.data import sources
from mae_jax.models import heads
from mae_jax.train import core, downstream, lr_decay, obs, optim, preemption, sharding, transfer, writers

log = logging.getLogger("mae_jax")

JOBS = ("finetune", "linear_probe")
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "precision", "recall", "mcc")
# What picks the best epoch (`eval.select`): D²MAE macro-F1; Deblurring MAE accuracy (its official
# code keeps the checkpoint of the best `acc1`); USFM balanced accuracy (usdsgen/trainer/cls_trainer.py).
SELECT = {"macro_f1": "macro-F1", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy"}
F1_MODES = ("macro", "positive")


def metrics_fn(config, num_classes: int):
  """(the metrics a run reports, metric function). `eval.f1='positive'` adds `f1_positive`, the F1 of
  class 1 on a binary task (Deblurring MAE's Table 1 F1, see docs/methods.md#presets)."""
  positive = config.eval.get("f1", "macro") == "positive" and num_classes == 2

  def fn(y, s):
    m = evaluate.classification_metrics(y, s, num_classes)
    if positive:
      pred = np.argmax(np.asarray(s), axis=1) if np.ndim(s) == 2 else (np.asarray(s) > 0.5)
      y = np.asarray(y)
      tp = float(np.sum((pred == 1) & (y == 1)))
      den = float(np.sum(pred == 1) + np.sum(y == 1))
      m["f1_positive"] = 2.0 * tp / den if den else 0.0
    return m

  return (METRICS + ("f1_positive",) if positive else METRICS), fn
# Record fields the classification steps never read.
UNUSED = ("organ", "mask")


# ------------------------------------------------------------------------------------- data


def split_labels(source) -> np.ndarray:
  labels = getattr(source, "labels", None)
  if labels is not None:
    return np.asarray(labels, np.int64)
  return np.array([int(source[i]["label"]) for i in range(len(source))], np.int64)


def class_names(config, source, labels: np.ndarray) -> list[str]:
  meta = getattr(source, "metadata", None)
  if isinstance(meta, dict) and meta.get("classes"):
    names = list(meta["classes"])
  elif config.data.name == "us_phantom":
    from mae_jax.data import phantom
    names = list(phantom.CLASSES)
  else:
    names = [f"class{k}" for k in range(int(labels.max()) + 1)]
  k = int(config.model.get("num_classes") or 0)
  if k:
    if k <= int(labels.max()):
      raise ValueError(f"config.model.num_classes={k} but the training labels go up to {int(labels.max())}")
    names = (names + [f"class{j}" for j in range(len(names), k)])[:k]
  return names


# ---------------------------------------------------------------------------------- mixup


def soft_targets(labels, num_classes: int, smoothing: float):
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)


def mixup_cutmix(key, x, y, *, mixup: float, cutmix: float, prob: float = 1.0, switch_prob: float = 0.5):
  """timm's batch-mode Mixup: with probability `prob`, mix the batch with its reverse, either by
  mixup (λ ~ Beta(α, α)) or cutmix (a box of area 1 − λ, λ then corrected to the exact box area),
  picking cutmix with probability `switch_prob` when both are on. x: (N, H, W, C); y: soft targets."""
  if mixup <= 0 and cutmix <= 0:
    return x, y
  k_apply, k_switch, k_mix, k_cut, k_cy, k_cx = jax.random.split(key, 6)
  apply = jax.random.uniform(k_apply) < prob
  if mixup > 0 and cutmix > 0:
    use_cut = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cut = jnp.asarray(cutmix > 0)
  lam_mix = jax.random.beta(k_mix, mixup, mixup) if mixup > 0 else jnp.ones(())
  lam_cut = jax.random.beta(k_cut, cutmix, cutmix) if cutmix > 0 else jnp.ones(())
  n, h, w = x.shape[:3]
  ratio = jnp.sqrt(1.0 - lam_cut)
  ch, cw = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_cy, (), 0, h)
  cx = jax.random.randint(k_cx, (), 0, w)
  y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
  x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)
  xf, yf = x[::-1], y[::-1]
  x_cut = jnp.where(box[None, :, :, None], xf, x)
  x_mix = lam_mix * x + (1.0 - lam_mix) * xf
  lam = jnp.where(apply, jnp.where(use_cut, lam_cut, lam_mix), 1.0)
  x_out = jnp.where(apply, jnp.where(use_cut, x_cut, x_mix), x)
  return x_out, lam * y + (1.0 - lam) * yf


# ---------------------------------------------------------------------------------- steps


def _normalize(x01, mean, std):
  return (x01 - mean) / std


def make_steps(config, graphdef, tx, schedule, plan: transfer.TransferPlan, num_classes: int, mean, std,
               probe):
  t = config.train
  smoothing = float(t.label_smoothing)
  erasing = 0.0 if probe else float(t.get("random_erasing", 0.0) or 0.0)

  def forward(params, stats, frozen, batch):
    model = nnx.merge(graphdef, params, stats, frozen)
    x01 = plan.apply(batch["image"].astype(jnp.float32) / 255.0, batch["sigma"])
    return model, x01

  def loss_fn(params, stats, frozen, batch, key):
    k_mix, k_dp = jax.random.split(key)
    model, x01 = forward(params, stats, frozen, batch)
    y = soft_targets(batch["label"], num_classes, smoothing)
    x01, y = mixup_cutmix(k_mix, x01, y, mixup=float(t.mixup), cutmix=float(t.cutmix),
                          prob=float(t.mixup_prob), switch_prob=float(t.mixup_switch_prob))
    blur_t = batch["blur_t"] if plan.use_t else None
    x = _normalize(x01, mean, std)
    if erasing > 0:  # timm RandomErasing after Normalize, as DeblurringMIM's transform
      x = augment.random_erasing(jax.random.fold_in(key, 3), x, erasing)
    if probe:
      logits = model(x, blur_t=blur_t, train=True)
    else:
      logits = model(x, blur_t=blur_t, key=k_dp if config.model.drop_path > 0 else None)
    loss = jnp.mean(optax.softmax_cross_entropy(logits, y))
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    return loss, (acc, new_stats)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: core.TrainState, stats, frozen, batch):
    key = core.step_key(state)
    (loss, (acc, new_stats)), grads = grad_fn(state.params, stats, frozen, batch, key)
    new_state, grad_norm, ok = core.apply_if_finite(state, grads, loss, tx)
    new_stats = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_stats, stats)
    metrics = {"loss": loss, "train_acc": acc, "grad_norm": grad_norm, "lr": schedule(state.step),
               "finite": ok.astype(jnp.float32), "skipped_total": new_state.skipped,
               "bad_streak": new_state.bad_steps}
    return new_state, new_stats, metrics

  def eval_step(params, stats, frozen, batch):
    model, x01 = forward(params, stats, frozen, batch)
    blur_t = batch["blur_t"] if plan.use_t else None
    logits = model(_normalize(x01, mean, std), blur_t=blur_t)
    return {"probs": jax.nn.softmax(logits, axis=-1), "label": batch["label"], "valid": batch["valid"],
            "index": batch["index"]}

  return train_step, eval_step


# ---------------------------------------------------------------------------------- checks


def validate_config(config, num_devices: int) -> None:
  if config.job not in JOBS:
    downstream.fail("job", config.job, f"expected one of {JOBS}")
  downstream.validate_common(config, num_devices, lr_field="base_lr")
  if config.model.global_pool not in heads.GLOBAL_POOLS:
    downstream.fail("model.global_pool", config.model.global_pool, f"expected one of {heads.GLOBAL_POOLS}")
  t = config.train
  if not 0.0 <= t.label_smoothing < 1.0:
    downstream.fail("train.label_smoothing", t.label_smoothing, "must lie in [0, 1)")
  if t.mixup < 0 or t.cutmix < 0:
    downstream.fail("train.mixup", (t.mixup, t.cutmix), "mixup / cutmix α must be >= 0")
  if config.eval.get("select", "macro_f1") not in SELECT:
    downstream.fail("eval.select", config.eval.select, f"expected one of {sorted(SELECT)}")
  if config.eval.get("f1", "macro") not in F1_MODES:
    downstream.fail("eval.f1", config.eval.f1, f"expected one of {F1_MODES}")
  if t.get("lr_batch_base", 256) <= 0:
    downstream.fail("train.lr_batch_base", t.lr_batch_base, "must be > 0")


# ---------------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict:
  """Fine-tunes (or linear-probes) `config.init_from` in `workdir`; returns the test results, or
  {'preempted': True, 'step': ...} when SIGTERM stopped it (a rerun continues)."""
  return preemption.guarded(_run, config, workdir)


def _run(config, workdir: str, preempt: preemption.Preemption) -> dict:
  validate_config(config, jax.device_count())
  workdir, is_main, mesh, pre = downstream.set_up(config, workdir)
  probe = config.job == "linear_probe"
  pcfg = pre.config
  image_size, in_chans = pcfg.model.image_size, pcfg.model.in_chans

  full = {s: sources.open_source(config.data, s, task="classify") for s in obs.SPLITS}
  labels = split_labels(full["train"])
  names = class_names(config, full["train"], labels)
  num_classes = len(names)
  rows = None
  if config.label_fraction < 1.0:
    rows = evaluate.stratified_subset(labels, config.label_fraction, config.seed)
  train_src = downstream.Positional(full["train"], rows)
  n_train = len(train_src)
  log.info("classes %s; train %d%s, validation %d, test %d", names, n_train,
           f" ({config.label_fraction:.0%} of {len(labels)}, stratified, seed {config.seed})"
           if rows is not None else "", len(full["validation"]), len(full["test"]))
  plan = transfer.plan_for(config, pre, full, workdir)

  model = heads.from_pretrained(pre.model, num_classes, kind=config.job,
                                global_pool=config.model.global_pool, drop_path=config.model.drop_path,
                                seed=config.seed, run=downstream.run_options(config))
  pre.model = None  # the head model holds copies of its weights: free the pretraining model's
  trainable = nnx.All(nnx.Param, nnx.PathContains("head")) if probe else nnx.Param
  graphdef, params, stats, frozen = nnx.split(model, trainable, nnx.BatchStat, ...)
  params, stats, frozen = (nnx.to_pure_dict(s) for s in (params, stats, frozen))
  n_params = sum(x.size for x in jax.tree.leaves(params))

  t = config.train
  steps = optim.Steps.of(t, n_train)
  # base_lr · batch / 256 (MAE); USFM's code divides by 512 (train.lr_batch_base).
  peak_lr = t.base_lr * t.batch_size / t.get("lr_batch_base", 256)
  schedule = downstream.schedule_for(t, peak_lr, steps)
  if probe:
    tx = lr_decay.lars(schedule, params, momentum=0.9, trust_coefficient=0.001, weight_decay=t.weight_decay)
    decay = None
  else:
    tx, decay = downstream.layerwise_adamw(config, pcfg, schedule, params, model.encoder.spec.depth)

  state = core.init_state(params, tx, config.seed)
  shardings = sharding.state_shardings(mesh, state)
  stats_sh, frozen_sh = sharding.replicated(mesh, stats), sharding.replicated(mesh, frozen)
  frozen = jax.device_put(frozen, frozen_sh)

  ckpts = downstream.Checkpoints(workdir, int(t.keep_checkpoints))
  select = config.eval.get("select", "macro_f1")
  val = downstream.Validation(select, SELECT[select])
  reported, metric_fn = metrics_fn(config, num_classes)
  start, state, stats = ckpts.restore(val, state, shardings, stats, stats_sh)

  train_step, eval_step = make_steps(config, graphdef, tx, schedule, plan, num_classes, pre.mean, pre.std,
                                     probe)
  bsh = sharding.batch_sharding(mesh)
  step_fn = jax.jit(train_step, in_shardings=(shardings, stats_sh, frozen_sh, bsh),
                    out_shardings=(shardings, stats_sh, sharding.replicated(mesh)), donate_argnums=(0, 1))
  eval_fn = jax.jit(eval_step, in_shardings=(shardings.params, stats_sh, frozen_sh, bsh),
                    out_shardings=sharding.replicated(mesh))

  it = downstream.train_iterator(config, train_src, image_size=image_size, in_chans=in_chans,
                                 start=start, with_mask=False)
  writer = writers.Monitor(workdir, t, steps.total, start, is_main)
  log.info("%s from %s (recipe=%s %s, checkpoint step %d): %s trainable params, %d classes, "
           "steps=%d (%d/epoch, warm-up %d), batch=%d, peak lr=%.3g%s, %dpx", config.job, pre.init_from,
           pcfg.recipe, pcfg.model.variant, pre.step, f"{n_params:,}", num_classes, steps.total,
           steps.per_epoch, steps.warmup, t.batch_size, peak_lr,
           f", layer decay {decay}" if decay is not None else ", LARS", image_size)

  val_src = downstream.Positional(full["validation"])
  test_src = downstream.Positional(full["test"])
  pred = functools.partial(downstream.predict, eval_fn, plan=plan, config=config, image_size=image_size,
                           in_chans=in_chans, mesh=mesh, with_mask=False, unused=UNUSED)
  def validate_epoch(step, carry) -> bool:
    """Validates after the epochs `downstream.validates` picks; True ends the run (early stopping)."""
    if not steps.epoch_ends(step):
      return False
    state, stats = carry
    epoch = steps.epoch(step)
    if downstream.validates(config, epoch):
      with writer.timed("validation"):
        p = pred((state.params, stats, frozen), val_src, "validation")
      vm = metric_fn(p["label"], p["probs"])
      writer.write_scalars(step, {f"val_{k}": v for k, v in vm.items()})
      improved = val.record(epoch, step, vm, state.params, stats)
      log.info("epoch %d (step %d): validation %s %.4f, macro-F1 %.4f acc %.4f AUROC %.4f%s", epoch,
               step, val.name, vm[select], vm["macro_f1"], vm["accuracy"], vm["auroc"],
               " (best)" if improved else "")
    return downstream.stops_early(config, val, epoch)

  def train_one(carry, batch):
    state, stats, metrics = step_fn(*carry, frozen, batch)
    return (state, stats), metrics

  out = downstream.run_loop(
      config, preempt, writer, workdir, is_main, steps=steps, start=start, carry=(state, stats),
      batch=lambda step: downstream.next_train_batch(it, plan, UNUSED, mesh), step=train_one,
      ckpts=ckpts, val=val, split=lambda carry: carry, evaluate=validate_epoch,
      lr_field="train.base_lr")
  step, (state, stats) = out.step, out.carry
  if out.preempted:
    writer.close()
    return {"preempted": True, "step": step}
  bp = jax.device_put(val.best_params(workdir), shardings.params)
  bs = jax.device_put(val.stats, stats_sh)
  p = pred((bp, bs, frozen), test_src, "test")
  test = metric_fn(p["label"], p["probs"])
  ci = evaluate.bootstrap_ci(metric_fn,
                             p["label"], p["probs"], n_boot=int(config.eval.n_boot),
                             alpha=float(config.eval.alpha), seed=config.seed)
  writer.write_scalars(step, {f"test_{k}": v for k, v in test.items()})
  writer.close()
  best, history = val.best, val.history
  results = {
      "rows": [downstream.result_row(config, config.job, pre, plan, ci, reported)],
      "test": downstream.ci_table(ci, reported),
      "test_n": int(len(p["label"])),
      "validation_best": best,
      "validation_history": history,
      "classes": names,
      "chance_macro_f1": chance_macro_f1(p["label"], num_classes),
      **downstream.provenance(pre, plan, decay),
      "ci": downstream.ci_note(config),
  }
  if is_main:
    downstream.write_results(workdir, results, list(reported), full["train"])
    np.savez(os.path.join(workdir, "predictions_test.npz"), probs=p["probs"], label=p["label"],
             index=p["index"], classes=np.array(names))
  log.info("test (best epoch %d, validation %s %.4f): %s", best["epoch"], val.name, best[select],
           ", ".join(f"{m} {ci[m][0]:.4f} [{ci[m][1]:.4f}, {ci[m][2]:.4f}]" for m in reported))
  return {"test": test, "test_ci": ci, "best": best, "history": history, "step": step,
          "num_classes": num_classes, "chance_macro_f1": results["chance_macro_f1"]}


def chance_macro_f1(labels, num_classes: int) -> float:
  """Best expected macro-F1 of a label-blind predictor on these labels: the larger of 'always the
  majority class' and 'uniformly random class' (whose class-c F1 is 2·p_c·(1/K)/(p_c + 1/K))."""
  p = np.bincount(np.asarray(labels, np.int64), minlength=num_classes) / max(len(labels), 1)
  majority = 2 * p.max() / (1 + p.max()) / np.count_nonzero(p)
  uniform = float(np.mean(2 * p * (1 / num_classes) / (p + 1 / num_classes)))
  return float(max(majority, uniform))
