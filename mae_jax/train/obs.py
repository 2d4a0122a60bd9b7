"""D²MAE optimal blurriness search (OBS), the paper's Algorithm 1 lines 4–10 (d2mae.txt §2.3).

For every image x and every searched level t ∈ {1, 1+s, …, ≤T}: blur x with σ_t, run the
pretrained MAE with mask ratio 0 and blurriness token t, and measure the reconstruction error
against the ORIGINAL x; t* = argmin_t. The paper writes the error as ‖x̂ − x‖₂; we use the
per-image mean squared error over all patches (the same argmin: the square root and the constant
pixel count are monotone). The error is measured where the pretraining loss measured it: inputs
and targets are normalised with the pretraining mean/std, and for `norm_pix_loss` models the
target patches are normalised per patch (mean / unbiased variance + 1e-6) exactly as the loss does,
because that is the space the decoder learned to predict in.

σ_t has the pretraining config's units (`corrupt.sigma_units`): in 'native' units σ* is in the
stored image's pixels, like the σ_t pretraining drew, and the search blurs each image with σ_t·zoom
per axis, zoom = (S / H, S / W) of the stored image (the evaluation stream resizes whole images).

The search runs once per image of every split (train, validation, test) and is cached as JSON in
the workdir (`obs/obs_<split>.json`), never per epoch: fine-tuning reads the cache. The cache is
reused only when its `meta` (pretraining checkpoint, levels, search step, data, normalisation,
image size) equals the current one.

Vectorised: one jitted function evaluates all K searched levels for a batch by folding the levels
into the batch (K·N images through the model at once). Ties go to the smallest t (np.argmin).

Multi-process: OBS is cheap and runs once, so every process searches the whole split on its local
devices (no collectives) and gets the same answer; only process 0 writes files.

Standalone: `python -m mae_jax.main --config=configs/obs.py:init_from=DIR --workdir=OUT`.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import losses, recipes
from mae_jax import patches as patch_lib
from mae_jax.corrupt import blur as blur_lib
from mae_jax.data import pipeline, sources
from mae_jax.train import core, workdir_lock, writers

log = logging.getLogger("mae_jax")

SPLITS = ("train", "validation", "test")
MODES = ("none", "fixed", "search")


# ------------------------------------------------------------------------------------ the search


def levels_of(config) -> np.ndarray:
  """σ_t for t = 1..T of a D²MAE pretraining config."""
  return recipes.sigma_levels(config.corrupt.sigma_levels)


def searched_t(num_levels: int, step: int) -> np.ndarray:
  """t ∈ {1, 1+s, …, ≤T} (1-based), the paper's `for t = 1 to T, step s`."""
  if int(step) < 1:
    raise ValueError(f"obs.step={step!r}: the search step must be a positive integer")
  return np.arange(1, num_levels + 1, int(step), dtype=np.int32)


def kernel_size(levels: np.ndarray, extra_sigma: float = 0.0) -> int:
  """Static Gaussian kernel size: the one pretraining used for its largest σ (or a larger σ)."""
  return blur_lib.gaussian_kernel_size(max(float(np.max(levels)), float(extra_sigma)))


def search_blur(config, sigmas, zoom, n: int):
  """(zoom, kernel size) the search blurs a batch of n images with at levels σ = `sigmas`: in native
  units zoom as given (None: ones) and the kernel for this batch's largest σ·zoom (the zoom is
  concrete here, so the kernel fits it exactly); in model units zoom None and the kernel
  pretraining used for its largest σ."""
  if recipes.native_units(config.corrupt):
    zoom = np.ones((n, 2), np.float32) if zoom is None else np.asarray(zoom, np.float32)
    return zoom, blur_lib.gaussian_kernel_size(float(np.max(sigmas)) * float(np.max(zoom)))
  return None, kernel_size(levels_of(config))


def _per_image_losses_fn(apply, spec, *, ts, sigmas, ksize, mean, std, norm_pix, use_t):
  """jit(state, x01 (N,H,W,C) in [0,1], zoom (N, 2) or None) -> (N, K) per-image reconstruction MSE
  per searched level; with zoom, level j blurs image i with σ_j·zoom_i per axis."""
  ts = jnp.asarray(ts, jnp.int32)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  k = int(ts.shape[0])

  def fn(state, x01, zoom):
    n = x01.shape[0]
    x01 = x01.astype(jnp.float32)
    xs = jnp.tile(x01, (k, 1, 1, 1))  # level-major: rows [j·N, (j+1)·N) are level j
    sig = jnp.repeat(sigmas, n)
    if zoom is not None:
      sig = blur_lib.per_axis_sigma(sig, jnp.tile(zoom, (k, 1)))
    xb = blur_lib.gaussian_blur(xs, sig, kernel_size=ksize)
    inputs, target = (xb - mean) / std, (xs - mean) / std
    # Mask ratio 0 keeps every patch; an increasing noise keeps them in their own order.
    num_patches = spec.num_patches
    noise = jnp.broadcast_to(jnp.arange(num_patches, dtype=jnp.float32) / num_patches,
                             (k * n, num_patches))
    kwargs = {"blur_t": jnp.repeat(ts, n)} if use_t else {}
    _, pred, _ = apply(state, inputs, target=target, noise=noise, mask_ratio=0.0, **kwargs)
    tgt = patch_lib.patchify(target, spec.patch_size)
    if norm_pix:
      tgt = losses.normalize_patches(tgt)
    per = jnp.mean(jnp.square(pred.astype(jnp.float32) - tgt), axis=(1, 2))
    return per.reshape(k, n).T

  return jax.jit(fn)


_FN_CACHE: dict = {}


def search(model, config, images01, mean: float, std: float, step: int, zoom=None):
  """OBS on a batch of images.

  model: the pretrained `MAE` (or any callable with its signature
    `model(images, *, target, noise, mask_ratio, blur_t) -> (loss, pred, mask)` and a `.spec`).
  config: the pretraining config (σ levels `corrupt.sigma_levels`).
  images01: (N, H, W, C) intensities in [0, 1] at model resolution (uint8 is divided by 255).
  mean, std: the pretraining normalisation. step: the search step s.
  zoom: (N, 2) model pixels per stored pixel of each image (the evaluation batch's `zoom`); used
    when the pretraining config's σ is in stored pixels; None there means 1 (the images are the
    stored pixels).

  Returns (t_star (N,) int 1-based, sigma_star (N,) float, losses (N, K) over the searched levels).
  """
  levels = levels_of(config)
  ts = searched_t(len(levels), step)
  sigmas = levels[ts - 1]
  x = np.asarray(images01)
  if x.dtype == np.uint8:
    x = x.astype(np.float32) / 255.0
  if x.ndim != 4:
    raise ValueError(f"images01 must be (N, H, W, C), got shape {x.shape}")
  use_t = getattr(model, "blur_embed", "none") != "none"
  norm_pix = bool(getattr(model, "norm_pix_loss", False))
  zoom, ksize = search_blur(config, sigmas, zoom, x.shape[0])
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    key = (graphdef, tuple(ts.tolist()), tuple(sigmas.tolist()), ksize, float(mean), float(std),
           norm_pix, use_t)
    fn = _FN_CACHE.get(key)
    if fn is None:
      apply = lambda st, *a, **kw: nnx.merge(graphdef, st)(*a, **kw)  # noqa: E731
      fn = _FN_CACHE[key] = _per_image_losses_fn(apply, model.spec, ts=ts, sigmas=sigmas, ksize=ksize,
                                                 mean=float(mean), std=float(std),
                                                 norm_pix=norm_pix, use_t=use_t)
  else:
    state = None
    apply = lambda st, *a, **kw: model(*a, **kw)  # noqa: E731
    fn = _per_image_losses_fn(apply, model.spec, ts=ts, sigmas=sigmas, ksize=ksize, mean=float(mean),
                              std=float(std), norm_pix=norm_pix, use_t=use_t)
  per = np.asarray(jax.device_get(fn(state, jnp.asarray(x), None if zoom is None else jnp.asarray(zoom))),
                   np.float64)
  j = np.argmin(per, axis=1)
  t_star = ts[j].astype(np.int32)
  return t_star, levels[t_star - 1].astype(np.float32), per


# --------------------------------------------------------------------------- splits and the cache


def search_source(model, config, source, *, image_size: int, in_chans: int, mean: float, std: float,
                  step: int, batch_size: int = 64) -> dict:
  """OBS over every record of `source`, in record order. Returns numpy arrays t, sigma, losses,
  index (the record's own `index` field), organ, label."""
  out = {k: [] for k in ("t", "sigma", "losses", "index", "organ", "label")}
  it = pipeline.eval_iterator(source, batch_size=batch_size, image_size=image_size, in_chans=in_chans,
                              with_mask=False)
  for batch in it:
    valid = np.asarray(batch["valid"], bool)
    t, s, per = search(model, config, batch["image"], mean, std, step, zoom=batch["zoom"])
    for name, v in (("t", t), ("sigma", s), ("losses", per), ("index", batch["index"]),
                    ("organ", batch["organ"]), ("label", batch["label"])):
      out[name].append(np.asarray(v)[valid])
  return {k: np.concatenate(v) for k, v in out.items()}


def cache_dir(workdir: str) -> str:
  return os.path.join(workdir, "obs")


def _json_path(workdir: str, split: str) -> str:
  return os.path.join(cache_dir(workdir), f"obs_{split}.json")


def _same(a, b) -> bool:
  return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def load_cache(workdir: str, split: str, meta: dict) -> dict | None:
  path = _json_path(workdir, split)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    blob = json.load(f)
  if not _same(blob.get("meta"), meta):
    log.info("OBS cache %s was made for another setting: searching again", path)
    return None
  rows = blob["images"]
  return {"t": np.array([r["t"] for r in rows], np.int32),
          "sigma": np.array([r["sigma"] for r in rows], np.float32),
          "losses": np.array([r["losses"] for r in rows], np.float64).reshape(len(rows), -1),
          "index": np.array([r["index"] for r in rows], np.int64),
          "organ": np.array([r["organ"] for r in rows], np.int64),
          "label": np.array([r["label"] for r in rows], np.int64)}


def write_cache(workdir: str, split: str, meta: dict, res: dict) -> str:
  os.makedirs(cache_dir(workdir), exist_ok=True)
  rows = [{"i": i, "index": int(res["index"][i]), "organ": int(res["organ"][i]),
           "label": int(res["label"][i]), "t": int(res["t"][i]), "sigma": round(float(res["sigma"][i]), 6),
           "losses": [float(v) for v in res["losses"][i]]} for i in range(len(res["t"]))]
  path = _json_path(workdir, split)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"meta": meta, "images": rows}, f)
  os.replace(tmp, path)  # a half-written cache never looks complete
  return path


def organ_names(source) -> list[str] | None:
  meta = getattr(source, "metadata", None)
  if isinstance(meta, dict) and meta.get("organs"):
    return list(meta["organs"])
  if type(source).__name__ == "PhantomSource" or "us_phantom" in type(source).__module__:
    from mae_jax.data import phantom
    return list(phantom.ORGANS)
  return None


def plot_histograms(workdir: str, results: dict, meta: dict, names: list[str] | None) -> list[str]:
  """One PNG per organ (all splits stacked) plus one over every image: the paper's Fig. 3(b)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  levels = np.asarray(meta["searched_sigmas"], np.float64)
  width = float(np.min(np.diff(levels))) if len(levels) > 1 else 0.1
  edges = np.concatenate([levels - width / 2, [levels[-1] + width / 2]])
  organs = np.concatenate([r["organ"] for r in results.values()])
  groups = [("all", None)] + [
      (names[o] if names and 0 <= o < len(names) else f"organ{o}", o)
      for o in sorted(set(int(v) for v in organs)) if o >= 0]
  paths = []
  for name, organ in groups:
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    data, labels = [], []
    for split, r in results.items():
      sel = np.ones(len(r["sigma"]), bool) if organ is None else r["organ"] == organ
      data.append(r["sigma"][sel])
      labels.append(f"{split} ({int(sel.sum())})")
    ax.hist(data, bins=edges, stacked=True, label=labels)
    ax.set_xticks(levels)
    ax.set_xlabel("σ* (optimal blurriness)")
    ax.set_ylabel("images")
    ax.set_title(f"OBS σ* — {name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(cache_dir(workdir), f"sigma_hist_{name}.png")
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
  return paths


def cache_meta(pretrain_config, *, init_from: str, ckpt_step: int, step: int, data_cfg,
               image_size: int, mean: float, std: float) -> dict:
  levels = levels_of(pretrain_config)
  ts = searched_t(len(levels), step)
  data = {k: data_cfg.get(k) for k in ("name", "folder", "num_train", "num_validation", "num_test",
                                       "native_size", "seed")}
  return {"init_from": os.path.abspath(init_from), "checkpoint_step": int(ckpt_step),
          "sigma_levels": [round(float(v), 6) for v in levels], "search_step": int(step),
          "searched_t": [int(v) for v in ts],
          "searched_sigmas": [round(float(v), 6) for v in levels[ts - 1]],
          "sigma_units": "native" if recipes.native_units(pretrain_config.corrupt) else "model",
          "blur_embed": pretrain_config.model.blur_embed, "norm_pix_loss": bool(pretrain_config.model.norm_pix_loss),
          "image_size": int(image_size), "mean": float(mean), "std": float(std), "data": data}


def ensure(model, pretrain_config, split_sources: dict, *, workdir: str, meta: dict, step: int,
           image_size: int, in_chans: int, mean: float, std: float, batch_size: int = 64) -> dict:
  """OBS results per split, from the cache when it matches `meta`, else searched (and cached)."""
  results, searched = {}, False
  for split, src in split_sources.items():
    res = load_cache(workdir, split, meta)
    if res is not None and len(res["t"]) == len(src):
      log.info("OBS %s: %d images from the cache %s", split, len(src), _json_path(workdir, split))
    else:
      t0 = time.perf_counter()
      res = search_source(model, pretrain_config, src, image_size=image_size, in_chans=in_chans,
                          mean=mean, std=std, step=step, batch_size=batch_size)
      dt = time.perf_counter() - t0
      searched = True
      if jax.process_index() == 0:
        write_cache(workdir, split, meta, res)
      counts = np.bincount(res["t"], minlength=int(max(meta["searched_t"])) + 1)[meta["searched_t"]]
      log.info("OBS %s: %d images in %s; σ* counts %s", split, len(src), writers.format_eta(dt),
               dict(zip(meta["searched_sigmas"], counts.tolist())))
    results[split] = res
  if searched and jax.process_index() == 0:
    names = organ_names(next(iter(split_sources.values())))
    try:
      plot_histograms(workdir, results, meta, names)
    except ImportError:  # matplotlib is a runtime dependency; a stripped install still gets the JSON
      log.warning("matplotlib is not installed: no σ* histogram figures")
  return results


# ------------------------------------------------------------------------------------ the job


def resolve_settings(config, pretrain_config) -> dict:
  """OBS mode / step / fixed σ: the job's `config.obs` fields where set, else the pretraining
  config's `obs` dict (written by configs/d2mae.py), else the paper's defaults (search, s = 2, 0.5)."""
  pre = pretrain_config.get("obs") or {}
  own = config.get("obs") or {}

  def pick(name, default):
    v = own.get(name)
    if v is None or v == "" or (name == "step" and v == 0):
      v = pre.get(name)
    return default if v is None else v

  mode = pick("mode", "search")
  if mode not in MODES:
    raise ValueError(f"config.obs.mode={mode!r}: expected one of {MODES}")
  step = int(pick("step", 2))
  if step < 1:
    raise ValueError(f"config.obs.step={step!r}: must be >= 1")
  fixed_sigma = float(pick("fixed_sigma", 0.5))
  if mode == "fixed" and fixed_sigma <= 0:
    raise ValueError(f"config.obs.fixed_sigma={fixed_sigma!r}: must be > 0 with obs.mode='fixed'")
  return {"mode": mode, "step": step, "fixed_sigma": fixed_sigma}


def pretrained_for_transfer(config):
  """(pretraining config, model, checkpoint step, mean, std) of `config.init_from`; errors name the
  field."""
  init_from = config.get("init_from") or ""
  if config.get("scratch"):
    return _from_scratch(config)
  if not init_from:
    raise ValueError("config.init_from is empty: set it to a pretraining workdir "
                     "(e.g. --config.init_from=/path/to/pretrain_workdir)")
  init_from = os.path.abspath(os.path.expanduser(init_from))
  if not os.path.isdir(init_from):
    raise ValueError(f"config.init_from={init_from!r} is not a directory")
  if not os.path.isdir(os.path.join(init_from, "checkpoints")):
    raise ValueError(f"config.init_from={init_from!r} holds no checkpoint (no 'checkpoints' folder): "
                     "is it a finished pretraining workdir?")
  try:
    pcfg, model, step = core.load_pretrained(init_from, config.get("init_step"))
  except ValueError as e:
    raise ValueError(f"config.init_from={init_from!r}: {e}") from None
  mean, std = normalisation(config, pcfg, init_from)
  return pcfg, model, step, mean, std


def _from_scratch(config):
  """The baselines without pretraining (`scratch=NAME`): the encoder of configs/NAME.py (with the
  job's `scratch_args`) at its random initialisation, seeded by the job's seed; the normalisation
  is the job's data.mean/std or measured on its training split."""
  from mae_jax import config_files, models
  from mae_jax.data import pipeline, sources
  try:
    pcfg = config_files.load(config.scratch, config.get("scratch_args") or "")
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"config.scratch={config.scratch!r}: {e}") from None
  model = models.build_pretrain_model(pcfg.model, seed=int(config.seed))
  d = config.data
  if d.get("mean") is not None and d.get("std") is not None:
    mean, std = float(d.mean), float(d.std)
  else:
    mean, std = pipeline.dataset_stats(sources.open_source(d, "train", task="pretrain"))
  log.info("no pretraining: the %s encoder of configs/%s.py at its random initialisation (seed %d)",
           pcfg.model.get("backbone", "vit"), config.scratch, int(config.seed))
  return pcfg, model, 0, float(mean), float(std)


def normalisation(config, pretrain_config, init_from: str) -> tuple[float, float]:
  """The pretraining mean/std (what the encoder learned on) unless the job's config sets both."""
  d = config.data
  if d.get("mean") is not None and d.get("std") is not None:
    return float(d.mean), float(d.std)
  path = os.path.join(init_from, "data_stats.json")
  if os.path.exists(path):
    with open(path) as f:
      s = json.load(f)
    return float(s["mean"]), float(s["std"])
  pd = pretrain_config.data
  if pd.get("mean") is not None and pd.get("std") is not None:
    return float(pd.mean), float(pd.std)
  raise ValueError(f"config.init_from={init_from!r} has no data_stats.json and its config sets no "
                   "data.mean/std: set config.data.mean and config.data.std")


def run(config, workdir: str) -> dict:
  """Job 'obs': search σ* for every image of train / validation / test and write the JSON and the
  histogram figures to `workdir/obs/`."""
  with workdir_lock.hold(workdir):
    return _run(config, os.path.abspath(workdir))


def _run(config, workdir: str) -> dict:
  if jax.process_index() == 0:
    core.save_config(config, workdir)
  if config.get("init_from") and os.path.exists(os.path.join(config.init_from, "config.json")):
    recipe = core.load_config(os.path.expanduser(config.init_from)).recipe
    if recipe != "d2mae":
      raise ValueError(f"config.init_from={config.init_from!r} was pretrained with recipe={recipe!r}: "
                       "the optimal blurriness search needs a D²MAE checkpoint")
  pcfg, model, ckpt_step, mean, std = pretrained_for_transfer(config)
  settings = resolve_settings(config, pcfg)
  image_size = pcfg.model.image_size
  split_sources = {s: sources.open_source(config.data, s, task="classify") for s in SPLITS}
  meta = cache_meta(pcfg, init_from=config.init_from, ckpt_step=ckpt_step, step=settings["step"],
                    data_cfg=config.data, image_size=image_size, mean=mean, std=std)
  log.info("OBS: %s (checkpoint step %d), levels σ=%s, searching t=%s", config.init_from, ckpt_step,
           meta["sigma_levels"], meta["searched_t"])
  res = ensure(model, pcfg, split_sources, workdir=workdir, meta=meta, step=settings["step"],
               image_size=image_size, in_chans=pcfg.model.in_chans, mean=mean, std=std,
               batch_size=int(config.obs.get("batch_size") or 64))
  summary = {split: {"n": int(len(r["t"])), "mean_sigma": float(np.mean(r["sigma"])),
                     "counts": {str(s): int(np.sum(np.isclose(r["sigma"], s, atol=1e-6)))
                                for s in meta["searched_sigmas"]}}
             for split, r in res.items()}
  if jax.process_index() == 0:
    with open(os.path.join(cache_dir(workdir), "summary.json"), "w") as f:
      json.dump({"meta": meta, "splits": summary}, f, indent=2)
    # results.md / results.json like every job's: per split, how many images got each σ*.
    rows = [{"split": split, "images": str(v["n"]),
             **{f"σ*={k} (images)": str(c) for k, c in v["counts"].items()}, "mean σ*": v["mean_sigma"]}
            for split, v in summary.items()]
    from mae_jax import evaluate
    evaluate.write_results(workdir, "results", {"rows": rows, "meta": meta}, metrics=["mean σ*"])
  return {"meta": meta, "splits": summary, "results": res}
