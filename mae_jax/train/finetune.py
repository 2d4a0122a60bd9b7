"""Fine-tuning and linear probing from a pretraining workdir (SPEC §5), with recipe-aware transfer.

`run(config, workdir)` for `config.job` in {'finetune', 'linear_probe'}:

  1. Loads `config.init_from` (a pretraining workdir: its `config.json` is the whole truth about the
     encoder, the recipe, the blur and the normalisation).
  2. Transfer corruption, on device, on [0, 1] intensities before normalisation, identical for the
     train, validation and test splits:
       * Deblurring MAE: the pretraining blur (`recipes.transfer_blur`).
       * D²MAE: `obs.mode` = 'search' runs the optimal blurriness search first (once per image and
         split, cached in `workdir/obs/`), then every image is blurred with its own σ* and the
         encoder keeps the token BLU(t*); 'fixed' uses σ = `obs.fixed_sigma` and t = the level
         nearest to it; 'none' does not blur and feeds t = 0 (σ_0 = 0 on the default grid).
       * MAE / denoising MAE / USFM: nothing.
  3. Model: `heads.Classifier` (global average pool + fc_norm + head, drop path) or
     `heads.LinearProbe` (frozen encoder, CLS, BatchNorm without affine + Linear).
  4. Optimiser: AdamW (0.9, 0.999), wd 0.05 with MAE's mask, layer-wise lr decay
     (`lr_decay.layerwise_adamw`); or LARS (trust 0.001, momentum 0.9, no weight decay) for the
     probe. lr = base_lr · batch / 256, linear warm-up then half-cosine to `min_lr` (1e-6).
  5. Loss: cross-entropy with label smoothing 0.1 (fine-tuning), optional mixup / cutmix on device.
  6. After every epoch: macro-F1 on the validation split; the best parameters are kept in host
     memory and in `workdir/best/checkpoints` (`core.restore_params(workdir + '/best')` reads them).
  7. The best model is evaluated on the test split: metrics with bootstrap 95% CIs, written as
     `results.json` / `results.md` (`evaluate.write_results`) and `predictions_test.npz`.

Label efficiency: `config.label_fraction` < 1 trains on a class-stratified subset of the training
split (`evaluate.stratified_subset`, seed = `config.seed`), the same subset for every method.

Resumable: the latest state is checkpointed every epoch in `workdir/checkpoints` with the best
validation score so far; a rerun in the same workdir continues where it stopped.
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

from mae_jax import evaluate, recipes
from mae_jax.corrupt import blur as blur_lib
from mae_jax.data import pipeline, sources
from mae_jax.models import heads
from mae_jax.train import core, lr_decay, obs, writers

log = logging.getLogger("mae_jax")

JOBS = ("finetune", "linear_probe")
METRICS = ("accuracy", "macro_f1", "auroc", "precision", "recall", "mcc")


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


# ---------------------------------------------------------------------------- transfer blur


class TransferPlan:
  """What the step does to [0, 1] pixels before normalisation, and which token t it feeds."""

  def __init__(self, pretrain_config, settings: dict | None, tables: dict | None):
    self.pcfg = pretrain_config
    self.recipe = pretrain_config.recipe
    self.settings = settings or {}
    self.tables = tables or {}  # split -> {'t': (n,), 'sigma': (n,)}
    self.use_t = pretrain_config.model.get("blur_embed", "none") != "none"
    mode = self.settings.get("mode", "none")
    self.per_image_blur = self.recipe == "d2mae" and mode in ("search", "fixed")
    if self.per_image_blur:
      levels = obs.levels_of(pretrain_config)
      self.ksize = obs.kernel_size(levels, self.settings.get("fixed_sigma", 0.0) if mode == "fixed" else 0.0)

  def describe(self) -> str:
    if self.recipe == "deblur":
      return f"pretraining blur {self.pcfg.corrupt.blur} {recipes.blur_params(self.pcfg.corrupt)} on every split"
    if self.recipe == "d2mae":
      s = self.settings
      return (f"D²MAE obs.mode={s['mode']}" + (f" step={s['step']}" if s["mode"] == "search" else "")
              + (f" σ={s['fixed_sigma']}" if s["mode"] == "fixed" else "")
              + (" with token BLU(t)" if self.use_t else " (no blurriness embedding)"))
    return "none"

  def lookup(self, split: str, index: np.ndarray) -> dict:
    """Per-row `blur_t` and `sigma` for batch rows with positions `index` (-1 = padding)."""
    idx = np.maximum(np.asarray(index, np.int64), 0)
    tab = self.tables.get(split)
    if tab is None:
      return {"blur_t": np.zeros(idx.shape, np.int32), "sigma": np.zeros(idx.shape, np.float32)}
    return {"blur_t": tab["t"][idx].astype(np.int32), "sigma": tab["sigma"][idx].astype(np.float32)}

  def apply(self, x01, sigma):
    if self.recipe == "deblur":
      return recipes.transfer_blur(self.pcfg, x01)
    if self.per_image_blur:
      return blur_lib.gaussian_blur(x01, sigma, kernel_size=self.ksize)
    return x01


def d2mae_tables(pcfg, settings, split_sources, *, model, workdir, init_from, ckpt_step, config,
                 mean, std) -> dict:
  levels = obs.levels_of(pcfg)
  mode = settings["mode"]
  if mode == "search":
    meta = obs.cache_meta(pcfg, init_from=init_from, ckpt_step=ckpt_step, step=settings["step"],
                          data_cfg=config.data, image_size=pcfg.model.image_size, mean=mean, std=std)
    res = obs.ensure(model, pcfg, split_sources, workdir=workdir, meta=meta, step=settings["step"],
                     image_size=pcfg.model.image_size, in_chans=pcfg.model.in_chans, mean=mean, std=std,
                     batch_size=int(config.obs.get("batch_size") or 64))
    return {s: {"t": r["t"], "sigma": r["sigma"]} for s, r in res.items()}
  if mode == "fixed":
    sigma = settings["fixed_sigma"]
    t = int(np.argmin(np.abs(levels - sigma))) + 1
    if not math.isclose(float(levels[t - 1]), sigma, abs_tol=1e-6):
      log.warning("obs.fixed_sigma=%g is not a pretraining level; blurring with σ=%g and token t=%d "
                  "(σ_t=%g)", sigma, sigma, t, levels[t - 1])
    return {s: {"t": np.full(len(src), t, np.int32), "sigma": np.full(len(src), sigma, np.float32)}
            for s, src in split_sources.items()}
  # 'none': no blur; σ_0 = 0 under σ_t = start + (t − 1)·step on the default grid, so t = 0.
  return {s: {"t": np.zeros(len(src), np.int32), "sigma": np.zeros(len(src), np.float32)}
          for s, src in split_sources.items()}


# ---------------------------------------------------------------------------------- mixup


def soft_targets(labels, num_classes: int, smoothing: float):
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


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


def make_steps(config, graphdef, tx, schedule, plan: TransferPlan, num_classes: int, mean, std, probe):
  t = config.train
  smoothing = float(t.label_smoothing)

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
    if probe:
      logits = model(x, blur_t=blur_t, train=True)
    else:
      logits = model(x, blur_t=blur_t, key=k_dp if config.model.drop_path > 0 else None)
    loss = -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))
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


def predict(eval_fn, params, stats, frozen, source, split, plan, *, config, image_size, in_chans, mesh):
  """Probabilities for every record of `source` (in order): dict probs, label, index."""
  bs = int(config.train.eval_batch_size or config.train.batch_size)
  it = pipeline.eval_iterator(source, batch_size=bs, image_size=image_size, in_chans=in_chans,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              with_mask=False)
  outs = []
  for local in it:
    local = dict(local)
    local.update(plan.lookup(split, local["index"]))
    local.pop("mask", None)
    local.pop("organ", None)
    out = eval_fn(params, stats, frozen, core.global_batch(local, mesh))
    outs.append(out)
  outs = core.host_gather(outs)
  cat = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  valid = cat.pop("valid").astype(bool)
  res = {k: v[valid] for k, v in cat.items()}
  order = np.argsort(res["index"], kind="stable")
  return {k: v[order] for k, v in res.items()}


# ---------------------------------------------------------------------------------- checks


def validate_config(config, num_devices: int) -> None:
  def fail(field, value, why):
    raise ValueError(f"config.{field}={value!r}: {why}")

  if config.job not in JOBS:
    fail("job", config.job, f"expected one of {JOBS}")
  if not config.get("init_from"):
    fail("init_from", config.get("init_from"), "set it to a pretraining workdir")
  if not 0.0 < config.label_fraction <= 1.0:
    fail("label_fraction", config.label_fraction, "must lie in (0, 1]")
  if config.model.global_pool not in heads.GLOBAL_POOLS:
    fail("model.global_pool", config.model.global_pool, f"expected one of {heads.GLOBAL_POOLS}")
  if not 0.0 <= config.model.drop_path < 1.0:
    fail("model.drop_path", config.model.drop_path, "must lie in [0, 1)")
  t = config.train
  for name in ("batch_size", "eval_batch_size"):
    v = t[name] or t.batch_size
    if v <= 0 or v % num_devices:
      fail(f"train.{name}", t[name], f"must be a positive multiple of the device count ({num_devices})")
  if t.total_steps < 0 or (t.total_steps == 0 and t.epochs <= 0):
    fail("train.epochs", t.epochs, "set train.epochs > 0 or train.total_steps > 0")
  if t.base_lr <= 0:
    fail("train.base_lr", t.base_lr, "must be > 0")
  if t.layer_decay is not None and not 0.0 < t.layer_decay <= 1.0:
    fail("train.layer_decay", t.layer_decay, "must lie in (0, 1]")
  if not 0.0 <= t.label_smoothing < 1.0:
    fail("train.label_smoothing", t.label_smoothing, "must lie in [0, 1)")
  if t.mixup < 0 or t.cutmix < 0:
    fail("train.mixup", (t.mixup, t.cutmix), "mixup / cutmix α must be >= 0")
  if config.data.name not in ("us_phantom", "folder"):
    fail("data.name", config.data.name, "expected 'us_phantom' or 'folder'")


# ---------------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict:
  """Fine-tunes (or linear-probes) `config.init_from` in `workdir`; returns the test results."""
  validate_config(config, jax.device_count())
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    core.save_config(config, workdir)
  probe = config.job == "linear_probe"
  mesh = core.make_mesh(config.mesh.fsdp)

  pcfg, pmodel, ckpt_step, mean, std = obs.pretrained_for_transfer(config)
  init_from = os.path.abspath(os.path.expanduser(config.init_from))
  if is_main:
    with open(os.path.join(workdir, "data_stats.json"), "w") as f:
      json.dump({"mean": mean, "std": std, "from": init_from}, f)
  image_size, in_chans = pcfg.model.image_size, pcfg.model.in_chans

  full = {s: sources.open_source(config.data, s, task="classify") for s in obs.SPLITS}
  labels = split_labels(full["train"])
  names = class_names(config, full["train"], labels)
  num_classes = len(names)
  rows = None
  if config.label_fraction < 1.0:
    rows = evaluate.stratified_subset(labels, config.label_fraction, config.seed)
  train_src = Positional(full["train"], rows)
  n_train = len(train_src)
  log.info("classes %s; train %d%s, validation %d, test %d", names, n_train,
           f" ({config.label_fraction:.0%} of {len(labels)}, stratified, seed {config.seed})"
           if rows is not None else "", len(full["validation"]), len(full["test"]))

  settings, tables = None, None
  if pcfg.recipe == "d2mae":
    settings = obs.resolve_settings(config, pcfg)
    tables = d2mae_tables(pcfg, settings, full, model=pmodel, workdir=workdir, init_from=init_from,
                          ckpt_step=ckpt_step, config=config, mean=mean, std=std)
  plan = TransferPlan(pcfg, settings, tables)
  log.info("transfer corruption: %s", plan.describe())

  model = heads.from_pretrained(pmodel, num_classes, kind=config.job, global_pool=config.model.global_pool,
                                drop_path=config.model.drop_path, seed=config.seed)
  del pmodel
  trainable = nnx.All(nnx.Param, nnx.PathContains("head")) if probe else nnx.Param
  graphdef, params, stats, frozen = nnx.split(model, trainable, nnx.BatchStat, ...)
  params, stats, frozen = (nnx.to_pure_dict(s) for s in (params, stats, frozen))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  t = config.train
  steps_per_epoch = max(1, n_train // t.batch_size)
  total = t.total_steps or int(math.ceil(t.epochs * steps_per_epoch))
  warmup = min(int(round(t.warmup_epochs * steps_per_epoch)), total)
  peak_lr = t.base_lr * t.batch_size / 256
  schedule = core.warmup_cosine(peak_lr, warmup, total, t.min_lr)
  if probe:
    tx = lr_decay.lars(schedule, params, momentum=0.9, trust_coefficient=0.001, weight_decay=t.weight_decay)
    decay = None
  else:
    decay = lr_decay.layer_decay_for(config, pcfg)
    tx = lr_decay.layerwise_adamw(schedule, params, depth=model.encoder.spec.depth, layer_decay=decay,
                                  b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, grad_clip=t.grad_clip)

  state = core.init_state(params, tx, config.seed)
  shardings = core.state_shardings(mesh, state)
  rep = lambda tree: jax.tree.map(lambda _: core.replicated(mesh), tree)  # noqa: E731
  stats_sh, frozen_sh = rep(stats), rep(frozen)
  frozen = jax.device_put(frozen, frozen_sh)

  mngr = core.checkpoint_manager(workdir, keep=int(t.keep_checkpoints), async_save=False)
  best_mngr = core.checkpoint_manager(workdir, keep=1, async_save=False, subdir="best/checkpoints")
  restored = core.restore_checkpoint(mngr, core.abstract_like(state, shardings),
                                     abstract_stats=core.abstract_like(stats, stats_sh))
  best = {"macro_f1": -1.0, "epoch": 0, "step": 0, "metrics": None}
  best_params = best_stats = None
  history = []
  if restored is not None:
    start, state, stats, data = restored.step, restored.state, restored.stats, restored.data
    best.update({k: data[k] for k in ("macro_f1", "epoch", "step", "metrics") if k in data})
    history = list(data.get("history") or [])
    b = core.restore_checkpoint(best_mngr,
                                core.abstract_like({"params": params}, {"params": shardings.params}),
                                abstract_stats=core.abstract_like(stats, stats_sh))
    if b is not None:
      best_params, best_stats = jax.device_get(b.state["params"]), jax.device_get(b.stats)
    log.info("resumed at step %d (best validation macro-F1 so far %.4f, epoch %d)", start,
             best["macro_f1"], best["epoch"])
  else:
    start = 0
    state = jax.device_put(state, shardings)
    stats = jax.device_put(stats, stats_sh)
  start = int(start)

  train_step, eval_step = make_steps(config, graphdef, tx, schedule, plan, num_classes, mean, std, probe)
  bsh = core.batch_sharding(mesh)
  step_fn = jax.jit(train_step, in_shardings=(shardings, stats_sh, frozen_sh, bsh),
                    out_shardings=(shardings, stats_sh, core.replicated(mesh)), donate_argnums=(0, 1))
  eval_fn = jax.jit(eval_step, in_shardings=(shardings.params, stats_sh, frozen_sh, bsh),
                    out_shardings=core.replicated(mesh))

  it = pipeline.train_iterator(
      train_src, global_batch=t.batch_size, image_size=image_size, seed=config.data.seed + config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      scale=(config.data.crop_scale_min, 1.0), hflip=config.data.hflip, in_chans=in_chans,
      start_batch=start, with_mask=False)
  writer = writers.TensorBoardWriter(workdir) if is_main else writers.NullWriter()
  log.info("%s from %s (recipe=%s %s, checkpoint step %d): %.2fM trainable params, %d classes, "
           "steps=%d (%d/epoch, warm-up %d), batch=%d, peak lr=%.3g%s, %dpx", config.job, init_from,
           pcfg.recipe, pcfg.model.variant, ckpt_step, n_params / 1e6, num_classes, total,
           steps_per_epoch, warmup, t.batch_size, peak_lr,
           f", layer decay {decay}" if decay is not None else ", LARS", image_size)

  val_src = Positional(full["validation"])
  test_src = Positional(full["test"])
  pred = functools.partial(predict, eval_fn, plan=plan, config=config, image_size=image_size,
                           in_chans=in_chans, mesh=mesh)
  tp = core.Throughput(total, t.batch_size, start)
  t0 = time.perf_counter()
  step = start
  try:
    while step < total:
      local = dict(next(it))
      local.update(plan.lookup("train", local["index"]))
      for k in ("organ", "mask"):
        local.pop(k, None)
      state, stats, metrics = step_fn(state, stats, frozen, core.global_batch(local, mesh))
      step += 1
      if step == start + 1:
        log.info("first step compiled and ran in %.1fs", time.perf_counter() - t0)
        tp.mark(step)
      if step % t.log_every == 0 or step == total:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        m.update(tp.mark(step))
        writer.write_scalars(step, m)
        log.info("step %d/%d loss %.4f acc %.3f lr %.3g%s%s", step, total, m["loss"], m["train_acc"],
                 m["lr"], f" {m['images_per_sec']:.1f} img/s ETA {writers.format_eta(m['eta_seconds'])}"
                 if "images_per_sec" in m else "",
                 f" skipped {int(m['skipped_total'])}" if m["skipped_total"] else "")
        if int(m["bad_streak"]) >= t.max_bad_steps:
          raise RuntimeError(f"{int(m['bad_streak'])} consecutive non-finite steps at step {step} "
                             f"(train.max_bad_steps={t.max_bad_steps}): lower train.base_lr")
      if step % steps_per_epoch == 0 or step == total:
        epoch = int(math.ceil(step / steps_per_epoch))
        p = pred(state.params, stats, frozen, val_src, "validation")
        vm = evaluate.classification_metrics(p["label"], p["probs"], num_classes)
        writer.write_scalars(step, {f"val_{k}": v for k, v in vm.items()})
        improved = vm["macro_f1"] > best["macro_f1"]
        history.append({"epoch": epoch, "step": step, **vm})
        log.info("epoch %d (step %d): validation macro-F1 %.4f acc %.4f AUROC %.4f%s", epoch, step,
                 vm["macro_f1"], vm["accuracy"], vm["auroc"], " (best)" if improved else "")
        if improved:
          best = {"macro_f1": vm["macro_f1"], "epoch": epoch, "step": step, "metrics": vm}
          best_params, best_stats = jax.device_get(state.params), jax.device_get(stats)
          core.save_checkpoint(best_mngr, step, {"params": state.params}, best, stats=stats, force=True)
        core.save_checkpoint(mngr, step, state, {"next_batch": step, **best, "history": history}, stats=stats,
                             force=True)
  finally:
    mngr.wait_until_finished()
    best_mngr.wait_until_finished()
    mngr.close()
    best_mngr.close()
    writer.flush()

  if best_params is None:  # resumed after the last step: the best checkpoint is all there is
    raise RuntimeError(f"no best checkpoint in {workdir}/best: delete the workdir and run again")
  bp = jax.device_put(best_params, shardings.params)
  bs = jax.device_put(best_stats, stats_sh)
  p = pred(bp, bs, frozen, test_src, "test")
  test = evaluate.classification_metrics(p["label"], p["probs"], num_classes)
  ci = evaluate.bootstrap_ci(lambda y, s: evaluate.classification_metrics(y, s, num_classes),
                             p["label"], p["probs"], n_boot=int(config.eval.n_boot),
                             alpha=float(config.eval.alpha), seed=config.seed)
  writer.write_scalars(step, {f"test_{k}": v for k, v in test.items()})
  writer.close()
  method = f"{pcfg.recipe}" + (f" (obs={settings['mode']})" if settings else "")
  row = {"method": method, "job": config.job, "label_fraction": f"{config.label_fraction:g}",
         "seed": str(config.seed), **{m: ci[m] for m in METRICS}}
  results = {
      "rows": [row],
      "test": {m: {"value": ci[m][0], "lo": ci[m][1], "hi": ci[m][2]} for m in METRICS},
      "test_n": int(len(p["label"])),
      "validation_best": best,
      "validation_history": history,
      "classes": names,
      "chance_macro_f1": chance_macro_f1(p["label"], num_classes),
      "init_from": init_from, "pretrain_recipe": pcfg.recipe, "checkpoint_step": int(ckpt_step),
      "transfer": plan.describe(), "obs": settings, "layer_decay": decay,
      "ci": f"percentile bootstrap over test images, {int(config.eval.n_boot)} resamples, "
            f"{1 - float(config.eval.alpha):.0%}",
  }
  if is_main:
    evaluate.write_results(workdir, "results", results, metrics=list(METRICS))
    np.savez(os.path.join(workdir, "predictions_test.npz"), probs=p["probs"], label=p["label"],
             index=p["index"], classes=np.array(names))
  log.info("test (best epoch %d, validation macro-F1 %.4f): %s", best["epoch"], best["macro_f1"],
           ", ".join(f"{m} {ci[m][0]:.4f} [{ci[m][1]:.4f}, {ci[m][2]:.4f}]" for m in METRICS))
  return {"test": test, "test_ci": ci, "best": best, "history": history, "step": step,
          "num_classes": num_classes, "chance_macro_f1": results["chance_macro_f1"]}


def chance_macro_f1(labels, num_classes: int) -> float:
  """Best expected macro-F1 of a label-blind predictor on these labels: the larger of 'always the
  majority class' and 'uniformly random class' (whose class-c F1 is 2·p_c·(1/K)/(p_c + 1/K))."""
  p = np.bincount(np.asarray(labels, np.int64), minlength=num_classes) / max(len(labels), 1)
  majority = 2 * p.max() / (1 + p.max()) / np.count_nonzero(p)
  uniform = float(np.mean(2 * p * (1 / num_classes) / (p + 1 / num_classes)))
  return float(max(majority, uniform))
