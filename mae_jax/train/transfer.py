"""Recipe-aware transfer corruption: what a downstream step does to [0, 1] pixels before
normalisation, and which blurriness token t it feeds, decided by the pretraining recipe (Deblurring
MAE and D²MAE blur the downstream images as they blurred pretraining's; docs/methods.md#blur-strength).

Identical for the train, validation and test splits, and for classification and segmentation:
  * Deblurring MAE: the pretraining blur (`recipes.transfer_blur`).
  * D²MAE: `obs.mode` = 'search' runs the optimal blurriness search first (once per image and
    split, cached in `workdir/obs/`), then every image is blurred with its own σ* and the encoder
    keeps the token BLU(t*); 'fixed' uses σ = `obs.fixed_sigma` and t = the level nearest to it;
    'none' does not blur and feeds t = 0 (σ_0 = 0 on the default grid).
  * MAE / denoising MAE / USFM: nothing.

σ has the pretraining config's units (`corrupt.sigma_units`). In 'native' units (σ in the stored
image's pixels) `lookup` turns each row's σ into per-axis model-pixel σ with the batch's `zoom`
(model pixels per stored pixel of the row's crop, or of the whole image in evaluation), and the
static kernel is sized for the largest zoom the job's own crops allow (`recipes.zoom_bound` of the
job's `data` fields).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from mae_jax import recipes
from mae_jax.corrupt import blur as blur_lib
from mae_jax.train import obs

log = logging.getLogger("mae_jax")


class TransferPlan:
  """What the step does to [0, 1] pixels before normalisation, and which token t it feeds."""

  def __init__(self, pretrain_config, settings: dict | None, tables: dict | None, data_cfg=None):
    """data_cfg: the downstream job's `data` fields (its crops bound the zoom); default the
    pretraining config's."""
    self.pcfg = pretrain_config
    self.recipe = pretrain_config.recipe
    self.settings = settings or {}
    self.tables = tables or {}  # split -> {'t': (n,), 'sigma': (n,)}
    self.use_t = pretrain_config.model.get("blur_embed", "none") != "none"
    self.native = recipes.native_units(pretrain_config.corrupt)
    bound = recipes.zoom_bound(pretrain_config.corrupt, pretrain_config.data if data_cfg is None else data_cfg,
                               pretrain_config.model.image_size)
    mode = self.settings.get("mode", "none")
    self.per_image_blur = self.recipe == "d2mae" and mode in ("search", "fixed")
    self.fixed_gaussian = self.recipe == "deblur" and pretrain_config.corrupt.blur == "gaussian"
    self.ksize = None
    if self.per_image_blur:
      levels = obs.levels_of(pretrain_config)
      extra = self.settings.get("fixed_sigma", 0.0) if mode == "fixed" else 0.0
      self.ksize = recipes.gaussian_size(max(float(levels.max()), float(extra)), bound)
    elif self.fixed_gaussian:
      self.ksize = recipes.gaussian_size(pretrain_config.corrupt.sigma, bound)

  def describe(self) -> str:
    if self.recipe == "deblur":
      return f"pretraining blur {self.pcfg.corrupt.blur} {recipes.blur_params(self.pcfg.corrupt)} on every split"
    if self.recipe == "d2mae":
      s = self.settings
      return (f"D²MAE obs.mode={s['mode']}" + (f" step={s['step']}" if s["mode"] == "search" else "")
              + (f" σ={s['fixed_sigma']}" if s["mode"] == "fixed" else "")
              + (" with token BLU(t)" if self.use_t else " (no blurriness embedding)"))
    return "none"

  def lookup(self, split: str, index: np.ndarray, zoom: np.ndarray | None = None) -> dict:
    """Per-row `blur_t` and `sigma` for batch rows with positions `index` (-1 = padding). `sigma`
    is in model pixels, as `apply` takes it: (n,), or (n, 2) per axis (σ·zoom) when σ is in stored
    pixels and the batch's `zoom` (n, 2) is given."""
    idx = np.maximum(np.asarray(index, np.int64), 0)
    tab = self.tables.get(split)
    t = np.zeros(idx.shape, np.int32) if tab is None else tab["t"][idx].astype(np.int32)
    if tab is not None:
      sigma = tab["sigma"][idx].astype(np.float32)
    elif self.fixed_gaussian:
      sigma = np.full(idx.shape, self.pcfg.corrupt.sigma, np.float32)
    else:
      sigma = np.zeros(idx.shape, np.float32)
    if self.native and zoom is not None and (self.per_image_blur or self.fixed_gaussian):
      sigma = sigma[:, None] * np.asarray(zoom, np.float32)
    return {"blur_t": t, "sigma": sigma}

  def apply(self, x01, sigma):
    """sigma: the rows' σ in model pixels from `lookup` ((n,) or per axis (n, 2)); None for
    Deblurring MAE means the pretraining σ at zoom 1."""
    if self.fixed_gaussian:
      if sigma is None:
        return recipes.transfer_blur(self.pcfg, x01, kernel_size=self.ksize)
      return blur_lib.gaussian_blur(x01, sigma, kernel_size=self.ksize)
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


def plan_for(config, pre, split_sources, workdir: str) -> TransferPlan:
  """The plan for `pre` (a `downstream.Pretrained`); for D²MAE the σ*/t tables of every split,
  searched (or read from the cache in `workdir/obs/`) here."""
  settings, tables = None, None
  if pre.config.recipe == "d2mae":
    settings = obs.resolve_settings(config, pre.config)
    tables = d2mae_tables(pre.config, settings, split_sources, model=pre.model, workdir=workdir,
                          init_from=pre.init_from, ckpt_step=pre.step, config=config, mean=pre.mean,
                          std=pre.std)
  plan = TransferPlan(pre.config, settings, tables, data_cfg=config.data)
  log.info("transfer corruption: %s", plan.describe())
  return plan
