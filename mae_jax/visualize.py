"""What the model learned, as pictures: reconstructions, USFM spectra, the D²MAE blurriness search.

Three layers, each usable alone:

* arrays (pure, jit-able): `denormalize_patches`, `paste_visible`, `reconstruct_arrays`
  (`reconstruction_columns` is the trainer's TensorBoard preview), `log_amplitude`, `panel`;
* a model and images -> results -> matplotlib figures: `reconstruct` -> `reconstruction_figure`
  (original | corrupted input | reconstruction | reconstruction with the visible patches pasted),
  `spectrum_figure` (USFM: log-amplitude spectra of input, band-stop mask and reconstruction),
  `obs_curve` -> `obs_figure` (D²MAE: loss against σ per image, σ*, deblurred strip);
* a workdir -> PNG files: `write_figures`, also the command line

    python -m mae_jax.visualize --workdir=DIR --out=FIG.png [--images=4 | --images a.png b.png]
        [--split=validation] [--seed=0] [--mask-ratio=R] [--stats=local|image|own]

  which writes FIG.png, plus FIG_obs.png for D²MAE and FIG_spectrum.png for USFM.

Norm-pix models (MAE's `norm_pix_loss`, on in `configs/mae.py`; Deblurring MAE, denoising MAE and
D²MAE train on pixels) predict each patch normalised by its own mean and std, which the masked
patches' pixels would be needed to undo.
The figures use only what is visible: a visible patch gets its own statistics, a masked patch the
average statistics of the visible patches around it (`stats='local'`); `stats='image'` gives every
patch the pooled statistics of all visible pixels, `stats='own'` the true per-patch statistics (an
oracle that shows only the shape of the prediction). The figure title says which.

Figures are `matplotlib.figure.Figure` objects made without pyplot (no global state, Agg when
saved), with a fixed size in inches at `DPI`, so a saved PNG's pixel size is known in advance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import config_files, losses, recon_quality
from mae_jax import patches as patch_lib
from mae_jax import recipes
from mae_jax.corrupt import blur as blur_lib
from mae_jax.corrupt import frequency, masking

STATS = ("local", "image", "own")
DPI = 100
CELL = 2.0  # inches per image in the grids
HEADER = 0.75  # inches above the grid for the title
OBS_SIZE = (10.0, 8.0)  # inches
RECIPE_TITLES = {"mae": "MAE", "deblur": "Deblurring MAE", "denoise": "Denoising MAE",
                 "d2mae": "D²MAE", "usfm": "USFM"}
# configs/<file>.py of each recipe (the notebook trains these).
CONFIG_FILES = {"mae": "mae", "deblur": "deblur_mae", "denoise": "denoise_mae", "d2mae": "d2mae",
                "usfm": "usfm"}


# ----------------------------------------------------------------------------------------- arrays


def _patch_stats(target_patches):
  mean = target_patches.mean(-1, keepdims=True)
  var = target_patches.var(-1, keepdims=True, ddof=1)
  return mean, var


def _visible_pooled_stats(target_patches, mask):
  vis = (1.0 - mask)[..., None]
  count = jnp.maximum(vis.sum((1, 2), keepdims=True) * target_patches.shape[-1], 1.0)
  mean = (target_patches * vis).sum((1, 2), keepdims=True) / count
  var = (((target_patches - mean) ** 2) * vis).sum((1, 2), keepdims=True) / jnp.maximum(count - 1, 1.0)
  return mean, var


def _box_sum(a, r: int):
  """Sum over the (2r+1)² window around each cell of a (N, h, w) grid, zeros outside."""
  h, w = a.shape[1:]
  p = jnp.pad(a, ((0, 0), (r, r), (r, r)))
  return sum(p[:, dy:dy + h, dx:dx + w] for dy in range(2 * r + 1) for dx in range(2 * r + 1))


def denormalize_patches(pred, target_patches, mask=None, *, eps: float = losses.NORM_PIX_EPS,
                        stats: str | None = None, grid: tuple[int, int] | None = None):
  """Undo norm-pix: `pred` (N, L, p²C) is each patch normalised by mean and sqrt(unbiased var + eps).

  stats (the statistics `target_patches`, the clean image's patches, lend to each patch):
    'own'   each patch its own (an oracle: masked patches' pixels are not known at inference);
    'image' every patch the pooled mean/var of all visible pixels of its image (needs `mask`);
    'local' a visible patch its own, a masked patch the average mean/var of the visible patches in
            its 3×3 neighbourhood, else 5×5, else the 'image' statistics (needs `mask` and `grid`).
  Default: 'image' with a mask, 'own' without (the behaviour before `stats` existed).
  """
  stats = stats or ("own" if mask is None else "image")
  if stats not in STATS:
    raise ValueError(f"stats={stats!r}: expected one of {STATS}")
  if stats == "own":
    mean, var = _patch_stats(target_patches)
  elif mask is None:
    raise ValueError(f"stats={stats!r} needs the patch mask")
  elif stats == "image":
    mean, var = _visible_pooled_stats(target_patches, mask)
  else:
    if grid is None:
      raise ValueError("stats='local' needs the patch grid (h, w)")
    n, length = mask.shape
    h, w = grid
    if h * w != length:
      raise ValueError(f"grid {grid} does not hold the mask's {length} patches")
    own_mean, own_var = _patch_stats(target_patches)
    mean, var = _visible_pooled_stats(target_patches, mask)
    mean = jnp.broadcast_to(mean, own_mean.shape)
    var = jnp.broadcast_to(var, own_var.shape)
    vis = (1.0 - mask).reshape(n, h, w)
    for r in (2, 1):  # the nearer neighbourhood, applied last, wins
      cnt = _box_sum(vis, r).reshape(n, length, 1)
      sm = _box_sum(vis * own_mean.reshape(n, h, w), r).reshape(n, length, 1)
      sv = _box_sum(vis * own_var.reshape(n, h, w), r).reshape(n, length, 1)
      safe = jnp.maximum(cnt, 1.0)
      mean = jnp.where(cnt > 0, sm / safe, mean)
      var = jnp.where(cnt > 0, sv / safe, var)
    visible = (mask < 0.5)[..., None]
    mean = jnp.where(visible, own_mean, mean)
    var = jnp.where(visible, own_var, var)
  return pred * jnp.sqrt(var + eps) + mean


def paste_visible(recon_img, orig_img, pixel_mask):
  """Reconstruction where masked (pixel_mask = 1), the original where visible."""
  return recon_img * pixel_mask + orig_img * (1.0 - pixel_mask)


def panel(columns: list[np.ndarray], gap: int = 2) -> np.ndarray:
  """Rows = images, columns = the given stages; (N, H, W, C) arrays in [0, 1] -> one (H', W', C) grid."""
  n, h, w, c = columns[0].shape
  out = np.ones((n * (h + gap) - gap, len(columns) * (w + gap) - gap, c), np.float32)
  for j, col in enumerate(columns):
    col = np.clip(np.asarray(col, np.float32), 0, 1)
    for i in range(n):
      out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = col[i]
  return out


def _run_model(model, x01, inputs01, mean, std, *, key=None, noise=None, mask_ratio=None,
               **model_kwargs):
  target = (x01 - mean) / std
  call = dict(target=target, key=key, noise=noise, **model_kwargs)
  if mask_ratio is not None:
    call["mask_ratio"] = mask_ratio
  _, pred, mask = model((inputs01 - mean) / std, **call)
  return pred.astype(jnp.float32), mask


def _assemble(pred, mask, x01, inputs01, mean, std, *, spec, norm_pix: bool, stats: str,
              pixel_mask=None) -> dict:
  if norm_pix:
    tgt_patches = patch_lib.patchify(((x01 - mean) / std).astype(jnp.float32), spec.patch_size)
    pred = denormalize_patches(pred, tgt_patches, mask, stats=stats, grid=spec.grid)
  recon = patch_lib.unpatchify(pred, spec.patch_size, spec.grid, spec.in_chans) * std + mean
  if pixel_mask is not None:  # SimMIM/USFM: masking happened in pixel space
    pix = pixel_mask.astype(jnp.float32)
    shown_input = inputs01
  else:
    pix = patch_lib.upsample_patch_mask(mask, spec.patch_size, spec.grid).astype(jnp.float32)
    shown_input = inputs01 * (1.0 - pix) + 0.5 * pix
  return {"original": x01, "model_input": shown_input, "reconstruction": recon,
          "pasted": paste_visible(recon, x01, pix), "pixel_mask": pix, "mask": mask}


def reconstruct_arrays(model, x01, inputs01, mean, std, *, key=None, noise=None, mask_ratio=None,
                       stats: str = "local", **model_kwargs) -> dict:
  """Runs a pretraining model (MAE or SimMIM path) on `inputs01` against the clean `x01` (both in
  [0, 1], NHWC) and returns, in [0, 1] pixel space: original, model_input (MAE path: masked patches
  shown grey), reconstruction, pasted (reconstruction inside the mask, original elsewhere), plus
  pixel_mask (N, H, W, 1) and mask (N, L), 1 = masked. Pure and jit-able (mask_ratio, stats static)."""
  pred, mask = _run_model(model, x01, inputs01, mean, std, key=key, noise=noise,
                          mask_ratio=mask_ratio, **model_kwargs)
  return _assemble(pred, mask, x01, inputs01, mean, std, spec=model.spec,
                   norm_pix=bool(getattr(model, "norm_pix_loss", False)), stats=stats,
                   pixel_mask=model_kwargs.get("pixel_mask"))


def reconstruction_columns(model, x01, inputs01, mean, std, *, key=None, noise=None, **model_kwargs):
  """The trainer's TensorBoard preview: [original, input, reconstruction, pasted] in [0, 1]."""
  out = reconstruct_arrays(model, x01, inputs01, mean, std, key=key, noise=noise, **model_kwargs)
  return [out["original"], out["model_input"], out["reconstruction"], out["pasted"]]


def log_amplitude(images) -> np.ndarray:
  """log(1 + |FFT2|) of (N, H, W, C) images, channels averaged, DC at (H//2, W//2): (N, H, W)."""
  x = np.asarray(images, np.float64).mean(-1)
  return np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(x, axes=(1, 2)), axes=(1, 2))))


# ------------------------------------------------------------------------------ model and images


def corrupt_for_figure(config, key, x01, *, zoom=None, sigma=None, t=None, noise_std=None,
                       spatial_ratio=None):
  """`recipes.corrupt` with what the figures need besides: returns (inputs01, model_kwargs, info).

  zoom: the batch's (N, 2) model pixels per stored pixel (`load_batch`, the data pipeline's
  `zoom`); with σ in stored pixels (`corrupt.sigma_units='native'`) the Gaussian blurs run with
  σ·zoom per axis, as in training; None means 1. Without overrides the inputs equal
  `recipes.corrupt(config, key, x01, zoom)` (tested). The clean images are taken as given: the
  recipe's augmentation (USFM) is `reconstruct`'s step before this one. info holds D²MAE's
  per-image t and σ_t (in the config's σ units), USFM's (N, H, W) band-stop mask, the fixed blur or
  noise. Overrides (the notebook's sliders): sigma (Deblurring MAE, Gaussian blur), t (D²MAE level,
  1-based), noise_std (Denoising MAE), spatial_ratio (USFM)."""
  recipe, c = config.recipe, config.corrupt
  x01 = jnp.asarray(x01, jnp.float32)
  n, h, w, _ = x01.shape
  if recipe == "d2mae":
    levels = recipes.sigma_levels(c.sigma_levels)
    if t is None:  # the draw recipes.d2mae_blur makes from the same key
      t = jax.random.randint(key, (n,), 1, len(levels) + 1)
    else:
      t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (n,))
      if int(t.min()) < 1 or int(t.max()) > len(levels):
        raise ValueError(f"t must lie in 1..{len(levels)} (corrupt.sigma_levels={c.sigma_levels!r})")
    sig = jnp.asarray(levels)[t - 1]
    # G_{σ_t} with the recipe's σ units and kernel size (recipes.corrupt's D²MAE blur at a given t).
    xb = recipes.transfer_blur(config, x01, sig, zoom=zoom)
    kwargs = {"blur_t": t} if config.model.blur_embed != "none" else {}
    return xb, kwargs, {"t": np.asarray(t), "sigma": np.asarray(sig)}
  if recipe == "usfm":
    ratio = c.spatial_ratio if spatial_ratio is None else float(spatial_ratio)
    spec_mask = None
    if c.frequency:
      _, k_freq = jax.random.split(key)  # the key dual_mask gives its frequency mask
      spec_mask = frequency.band_stop_mask(k_freq, n, h, w, c.rings_dropped)
    xc, pix = frequency.dual_mask(key, x01, spatial_ratio=ratio, unit=c.spatial_unit,
                                  use_frequency=c.frequency, num_rings_dropped=c.rings_dropped,
                                  spectrum_mask=spec_mask)
    full = np.ones((n, h, w), np.float32) if spec_mask is None else np.asarray(spec_mask)
    return xc, {"pixel_mask": pix}, {"spectrum_mask": full, "spatial_ratio": ratio,
                                     "frequency": bool(c.frequency)}
  cfg = config
  if sigma is not None or noise_std is not None:
    cfg = config.copy_and_resolve_references()
    if sigma is not None:
      if recipe != "deblur" or c.blur != "gaussian":
        raise ValueError(f"sigma= overrides the Gaussian blur of a Deblurring MAE config "
                         f"(this one: recipe={recipe!r}, corrupt.blur={c.blur!r})")
      cfg.corrupt.sigma = float(sigma)
    if noise_std is not None:
      if recipe != "denoise":
        raise ValueError(f"noise_std= is for Denoising MAE configs (this one: recipe={recipe!r})")
      cfg.corrupt.noise_std = float(noise_std)
  inputs, kwargs = recipes.corrupt(cfg, key, x01, zoom)
  info = {}
  if recipe == "deblur":
    info = {"blur": cfg.corrupt.blur, **recipes.blur_params(cfg.corrupt)}
  elif recipe == "denoise":
    info = {"noise_std": float(cfg.corrupt.noise_std)}
  return inputs, kwargs, info


@dataclasses.dataclass
class Reconstruction:
  """A batch's figure material, host numpy, pixels in [0, 1] before clipping."""
  recipe: str
  original: np.ndarray  # (N, H, W, C)
  model_input: np.ndarray  # the corrupted input (MAE path: masked patches grey)
  reconstruction: np.ndarray
  pasted: np.ndarray
  pixel_mask: np.ndarray  # (N, H, W, 1), 1 = masked
  mask: np.ndarray  # (N, L) patches (USFM: patches touching the spatial mask)
  norm_pix: bool
  stats: str
  info: dict
  step: int | None = None

  def columns(self) -> list[np.ndarray]:
    return [self.original, self.model_input, self.reconstruction, self.pasted]


# Two compiled pieces: the model pass (one compilation per model, batch shape and mask ratio) and
# the cheap pixel assembly (per de-normalisation choice), so switching `stats` never recompiles the model.
@nnx.jit(static_argnames=("mask_ratio",))
def _forward_model(model, x01, inputs01, noise, mean, std, model_kwargs, mask_ratio):
  return _run_model(model, x01, inputs01, mean, std, noise=noise, mask_ratio=mask_ratio, **model_kwargs)


_assemble_jit = jax.jit(_assemble, static_argnames=("spec", "norm_pix", "stats"))


def _forward(model, x01, inputs01, noise, mean, std, model_kwargs, mask_ratio, stats):
  pred, mask = _forward_model(model, x01, inputs01, noise, mean, std, model_kwargs, mask_ratio)
  return _assemble_jit(pred, mask, x01, inputs01, mean, std, spec=model.spec,
                       norm_pix=bool(getattr(model, "norm_pix_loss", False)), stats=stats,
                       pixel_mask=model_kwargs.get("pixel_mask"))


def reconstruct(model, config, x01, mean: float, std: float, *, zoom=None, seed: int = 0,
                mask_ratio=None, stats: str = "local", step: int | None = None, augment: bool = True,
                **overrides) -> Reconstruction:
  """Augments and corrupts `x01` (N, H, W, C) in [0, 1] as the training step does
  (`recipes.augment_and_corrupt`, key from `seed`, split like the training step's), runs the model
  and returns the figure material; the original column is then the augmented image, the one the
  loss compares with. zoom: the batch's (N, 2) model pixels per stored pixel (see
  `corrupt_for_figure`). augment=False skips the recipe's augmentation (USFM) to show the images as
  loaded. mask_ratio overrides the model's (MAE path); overrides go to `corrupt_for_figure` (sigma,
  t, noise_std, spatial_ratio)."""
  if stats not in STATS:
    raise ValueError(f"stats={stats!r}: expected one of {STATS}")
  x01 = jnp.asarray(np.asarray(x01, np.float32))
  k_corrupt, k_mask = jax.random.split(jax.random.key(seed))
  x01 = jnp.asarray(x01, jnp.float32)
  if augment:  # augment_and_corrupt's first half, same key
    x01 = recipes.augment(config, k_corrupt, x01)
  inputs01, kwargs, info = corrupt_for_figure(config, k_corrupt, x01, zoom=zoom, **overrides)
  noise = masking.random_mask_from_key(k_mask, x01.shape[0], model.spec.num_patches)
  if mask_ratio is not None:
    mask_ratio = round(float(mask_ratio), 4)  # static: one compilation per distinct ratio
    if not 0.0 <= mask_ratio < 1.0:
      raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
  out = jax.device_get(_forward(model, x01, inputs01, noise, jnp.float32(mean), jnp.float32(std),
                                kwargs, mask_ratio, stats))
  out = {k: np.asarray(v, np.float32) for k, v in out.items()}
  return Reconstruction(recipe=config.recipe, norm_pix=bool(getattr(model, "norm_pix_loss", False)),
                        stats=stats, info=info, step=step, **out)


@dataclasses.dataclass
class ObsCurve:
  """D²MAE optimal blurriness search on a batch, every level evaluated for the curve."""
  sigmas: np.ndarray  # (T,) σ_t, t = 1..T
  losses: np.ndarray  # (N, T) per-image OBS loss at every level
  searched_t: np.ndarray  # (K,) the levels the search with step s visits (1-based)
  t_star: np.ndarray  # (N,) what mae_jax.train.obs.search picks with step s
  sigma_star: np.ndarray  # (N,)
  step: int
  norm_pix: bool
  original: np.ndarray  # (H, W, C): image 0
  blurred: np.ndarray  # (K, H, W, C): image 0 blurred with each searched σ
  deblurred: np.ndarray  # (K, H, W, C): the model's output for each (mask ratio 0, token t)


def obs_curve(model, config, x01, mean: float, std: float, *, zoom=None,
              step: int | None = None) -> ObsCurve:
  """The OBS loss against σ for every level (the curve) and σ* as `mae_jax.train.obs.search` picks
  it with search step `step` (default: the pretraining config's `obs.step`, else 2). zoom: the
  batch's (N, 2) model pixels per stored pixel, passed to the search (σ in stored pixels: σ·zoom
  per axis; None means 1)."""
  from mae_jax.train import obs  # lazy: visualize is imported by the trainer

  if config.recipe != "d2mae":
    raise ValueError(f"the optimal blurriness search needs a D²MAE model (recipe={config.recipe!r})")
  if step is None:
    step = int((config.get("obs") or {}).get("step") or 2)
  x = np.asarray(x01, np.float32)
  levels = obs.levels_of(config)
  _, _, all_losses = obs.search(model, config, x, mean, std, 1, zoom=zoom)
  # σ* as the search with step s picks it: argmin over its levels, ties to the smallest t (the same
  # numbers as obs.search(..., step), checked in the tests; one model pass instead of two).
  ts = obs.searched_t(len(levels), step)
  t_star = ts[np.argmin(all_losses[:, ts - 1], axis=1)]
  sigma_star = levels[t_star - 1]
  # Image 0 at every searched level, exactly as obs.search(..., step, zoom) feeds it (σ_t·zoom_0
  # per axis in native units, the search's kernel for this batch; mask ratio 0, token t).
  sigmas = levels[ts - 1]
  zoom, ksize = obs.search_blur(config, sigmas, zoom, x.shape[0])
  sig = jnp.asarray(sigmas)
  if zoom is not None:
    sig = blur_lib.per_axis_sigma(sig, jnp.broadcast_to(jnp.asarray(zoom[:1]), (len(ts), 2)))
  x0 = jnp.broadcast_to(jnp.asarray(x[:1]), (len(ts),) + x.shape[1:])
  xb = blur_lib.gaussian_blur(x0, sig, kernel_size=ksize)
  kwargs = {"blur_t": jnp.asarray(ts)} if getattr(model, "blur_embed", "none") != "none" else {}
  noise = jnp.zeros((len(ts), model.spec.num_patches), jnp.float32)
  out = jax.device_get(_forward(model, x0, xb, noise, jnp.float32(mean), jnp.float32(std), kwargs,
                                0.0, "own"))
  return ObsCurve(sigmas=np.asarray(levels), losses=np.asarray(all_losses), searched_t=ts,
                  t_star=np.asarray(t_star), sigma_star=np.asarray(sigma_star), step=int(step),
                  norm_pix=bool(getattr(model, "norm_pix_loss", False)), original=x[0],
                  blurred=np.asarray(xb), deblurred=np.asarray(out["reconstruction"]))


# ----------------------------------------------------------------------------------------- figures


def _figure(width_in: float, height_in: float):
  from matplotlib.figure import Figure
  return Figure(figsize=(width_in, height_in), dpi=DPI)


def _show(ax, img, title=None, **kw):
  img = np.asarray(img, np.float32)
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  if img.ndim == 2:
    kw.setdefault("cmap", "gray")
  if "vmin" not in kw and img.ndim == 2 and kw.get("cmap") == "gray":
    kw.update(vmin=0.0, vmax=1.0)
  ax.imshow(np.clip(img, 0.0, 1.0) if img.ndim == 3 else img, interpolation="nearest", **kw)
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=7, pad=2)


def _input_label(rec: Reconstruction, i: int) -> str:
  info = rec.info
  masked = f"{100 * float(rec.mask[i].mean()):.0f}% masked"
  if rec.recipe == "d2mae":
    return f"σ={float(info['sigma'][i]):.2f} (t={int(info['t'][i])}), {masked}"
  if rec.recipe == "deblur":
    extra = ", ".join(f"{'σ' if k == 'sigma' else k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in info.items() if k != "blur")
    return f"{info['blur']} blur{' ' + extra if extra else ''}, {masked}"
  if rec.recipe == "denoise":
    return f"noise std={info['noise_std']:g}, {masked}"
  if rec.recipe == "usfm":
    freq = "band-stop + " if info.get("frequency") else ""
    area = float(rec.pixel_mask[i].mean())
    return f"{freq}mean mask {100 * area:.0f}%"
  return f"input, {masked}"


def denorm_note(rec: Reconstruction) -> str:
  if not rec.norm_pix:
    return "pixel-space prediction (no norm-pix)"
  return {"local": "norm-pix: de-normalised with the visible patches' mean/std "
                   "(masked patch: its visible neighbours')",
          "image": "norm-pix: de-normalised with the visible pixels' pooled mean/std",
          "own": "norm-pix: de-normalised with each patch's TRUE mean/std (oracle)"}[rec.stats]


def reconstruction_figure(rec: Reconstruction, *, title: str | None = None):
  """N rows × 4 columns: original | corrupted input | reconstruction | reconstruction + visible.
  Size: (4·CELL) × (N·CELL + HEADER) inches at DPI."""
  n = rec.original.shape[0]
  fig = _figure(4 * CELL, n * CELL + HEADER)
  top = 1.0 - HEADER / (n * CELL + HEADER)
  axes = fig.subplots(n, 4, squeeze=False)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.04, hspace=0.18)
  names = ["original", None, "reconstruction", "reconstruction + visible"]
  for i in range(n):
    for j, col in enumerate(rec.columns()):
      label = _input_label(rec, i) if j == 1 else (names[j] if i == 0 else None)
      _show(axes[i, j], col[i], label)
  head = title or f"{RECIPE_TITLES.get(rec.recipe, rec.recipe)}" + (
      f" — step {rec.step}" if rec.step is not None else "")
  note = "\n".join(filter(None, [denorm_note(rec), recon_quality.caption(rec)]))
  fig.suptitle(f"{head}\n{note}", fontsize=9, y=1.0 - 0.08 / (n * CELL + HEADER))
  return fig


def spectrum_figure(rec: Reconstruction, *, title: str | None = None):
  """USFM: per image, log-amplitude spectra (DC centred) of the original, the model input and the
  reconstruction, and the band-stop mask between them. Size as `reconstruction_figure`."""
  if "spectrum_mask" not in rec.info:
    raise ValueError(f"spectrum figures are for USFM reconstructions (recipe={rec.recipe!r})")
  n = rec.original.shape[0]
  fig = _figure(4 * CELL, n * CELL + HEADER)
  axes = fig.subplots(n, 4, squeeze=False)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1.0 - HEADER / (n * CELL + HEADER),
                      wspace=0.04, hspace=0.18)
  spectra = [log_amplitude(rec.original), log_amplitude(rec.model_input),
             log_amplitude(rec.reconstruction)]
  smask = rec.info["spectrum_mask"]
  for i in range(n):
    lo = min(float(s[i].min()) for s in spectra)
    hi = max(float(s[i].max()) for s in spectra)
    kw = dict(cmap="magma", vmin=lo, vmax=hi)
    first = i == 0
    _show(axes[i, 0], spectra[0][i], "original |F|" if first else None, **kw)
    _show(axes[i, 1], spectra[1][i], "input |F|" if first else None, **kw)
    removed = int(round(float((1 - smask[i]).sum())))
    _show(axes[i, 2], smask[i], f"frequency mask ({removed} bins removed)", cmap="gray", vmin=0, vmax=1)
    _show(axes[i, 3], spectra[2][i], "reconstruction |F|" if first else None, **kw)
  head = title or "USFM: log(1 + |FFT|), DC centred" + (f" — step {rec.step}" if rec.step is not None else "")
  fig.suptitle(f"{head}\nmask: black = removed band-stop rings; spectra share one scale per row",
               fontsize=9, y=1.0 - 0.08 / (n * CELL + HEADER))
  return fig


def obs_figure(curve: ObsCurve, *, title: str | None = None):
  """D²MAE Fig. 3-style: OBS loss against σ per image with its σ* (top left), σ* counts (top right),
  image 0 blurred / deblurred / |deblurred − original| at each searched σ (bottom). OBS_SIZE inches."""
  from matplotlib.ticker import MaxNLocator
  fig = _figure(*OBS_SIZE)
  gs = fig.add_gridspec(2, 1, height_ratios=[1.0, 1.25], hspace=0.28, left=0.07, right=0.98,
                        top=0.9, bottom=0.02)
  top = gs[0].subgridspec(1, 2, width_ratios=[2.0, 1.0], wspace=0.28)
  ax = fig.add_subplot(top[0])
  searched = np.isin(np.arange(1, len(curve.sigmas) + 1), curve.searched_t)
  n = curve.losses.shape[0]
  for i in range(n):
    color = f"C{i % 10}"
    ax.plot(curve.sigmas, curve.losses[i], color=color, lw=2.0 if i == 0 else 0.8,
            alpha=1.0 if i == 0 else 0.6, label="image 0" if i == 0 else None)
    ax.plot(curve.sigmas[searched], curve.losses[i][searched], "o", color=color, ms=3)
    j = int(curve.t_star[i]) - 1
    ax.plot([curve.sigmas[j]], [curve.losses[i][j]], "*", color=color, ms=12 if i == 0 else 8,
            markeredgecolor="k", label="σ* (search)" if i == 0 else None)
  ax.set_xlabel("σ_t")
  ax.set_ylabel("OBS loss: MSE to the original" + (" (norm-pix space)" if curve.norm_pix else ""))
  ax.set_xticks(curve.sigmas)
  ax.tick_params(labelsize=7)
  ax.legend(fontsize=7)
  ax.set_title(f"loss vs σ ({n} image{'s' * (n > 1)}); dots: searched levels (step {curve.step})",
               fontsize=8)
  hx = fig.add_subplot(top[1])
  ss = curve.sigmas[curve.searched_t - 1]
  counts = [int(np.sum(np.isclose(curve.sigma_star, s))) for s in ss]
  width = 0.8 * (float(np.min(np.diff(ss))) if len(ss) > 1 else 0.1)
  hx.bar(ss, counts, width=width, color="C1")
  hx.set_xticks(ss)
  hx.yaxis.set_major_locator(MaxNLocator(integer=True))
  hx.tick_params(labelsize=7)
  hx.set_xlabel("σ*")
  hx.set_ylabel("images")
  hx.set_title("σ* distribution", fontsize=8)

  k = len(curve.searched_t)
  strip = gs[1].subgridspec(3, k, wspace=0.04, hspace=0.12)
  diff = np.abs(curve.deblurred - curve.original[None])
  dmax = max(float(diff.max()), 1e-6)
  star = int(curve.t_star[0])
  for c, t in enumerate(curve.searched_t):
    hit = int(t) == star
    head = f"{'σ*=' if hit else 'σ='}{curve.sigmas[t - 1]:.2f}"
    a0 = fig.add_subplot(strip[0, c])
    _show(a0, curve.blurred[c], head)
    if hit:
      a0.title.set_color("red")
      a0.title.set_fontweight("bold")
    _show(fig.add_subplot(strip[1, c]), curve.deblurred[c])
    _show(fig.add_subplot(strip[2, c]), diff[c].mean(-1), cmap="inferno", vmin=0.0, vmax=dmax)
    if c == 0:
      for r, name in enumerate(("blurred", "deblurred", "|difference|")):
        fig.axes[-3 + r].set_ylabel(name, fontsize=7)
  fig.suptitle(title or "D²MAE optimal blurriness search — image 0: blurred input, model output "
               "(mask ratio 0, token t), |output − original|", fontsize=9)
  return fig


def save(fig, path: str) -> str:
  """Writes a figure as PNG at DPI, size unchanged (no tight bbox), through the Agg canvas."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  FigureCanvasAgg(fig)
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  fig.savefig(path, dpi=DPI, format="png")
  return path


def figure_pixels(n_images: int) -> tuple[int, int]:
  """(width, height) in pixels of a saved reconstruction / spectrum figure of n images."""
  return round(4 * CELL * DPI), round((n_images * CELL + HEADER) * DPI)


# ---------------------------------------------------------------------------------------- workdirs


@dataclasses.dataclass
class Pretrained:
  config: object
  model: object
  step: int
  mean: float
  std: float
  workdir: str


def load(workdir: str, step: int | None = None) -> Pretrained:
  """The model, config, checkpoint step and normalisation of a pretraining workdir."""
  from mae_jax.train import core
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config, model, ckpt = core.load_pretrained(workdir, step)
  path = os.path.join(workdir, "data_stats.json")
  if os.path.exists(path):
    with open(path) as f:
      s = json.load(f)
    mean, std = float(s["mean"]), float(s["std"])
  elif config.data.get("mean") is not None and config.data.get("std") is not None:
    mean, std = float(config.data.mean), float(config.data.std)
  else:
    raise ValueError(f"{workdir!r} has no data_stats.json and its config sets no data.mean/std")
  return Pretrained(config, model, int(ckpt), mean, std, workdir)


def load_batch(config, images=4, *, split: str = "validation") -> tuple[np.ndarray, np.ndarray]:
  """(x01, zoom): x01 (N, S, S, C) float32 in [0, 1] at the model's resolution, the first `images`
  records of `split` of the config's dataset (the evaluation stream, whole images resized), or the
  image files given as a list of paths (resized the same way); zoom (N, 2) float32, model pixels
  per stored pixel along (H, W), (S / H, S / W) of each stored image, which σ in stored pixels
  needs (`corrupt_for_figure`, `obs_curve`)."""
  size, chans = int(config.model.image_size), int(config.model.in_chans)
  if isinstance(images, (list, tuple)):
    from PIL import Image
    out, zoom = [], []
    for p in images:
      if not os.path.isfile(p):
        raise ValueError(f"--images: {p!r} is not a file")
      try:
        with Image.open(p) as im:
          zoom.append((size / im.height, size / im.width))
          im = im.convert("L" if chans == 1 else "RGB").resize((size, size), Image.BICUBIC)
          a = np.asarray(im, np.float32) / 255.0
      except OSError as e:
        raise ValueError(f"--images: cannot read {p!r} as an image ({e})") from None
      out.append(a.reshape(size, size, chans))
    return np.stack(out), np.asarray(zoom, np.float32)
  from mae_jax.data import pipeline, sources
  n = int(images)
  if n < 1:
    raise ValueError(f"--images={images!r}: ask for at least one image")
  src = sources.open_source(config.data, split)
  n = min(n, len(src))
  batch = next(iter(pipeline.eval_iterator(src, batch_size=n, image_size=size, in_chans=chans,
                                           with_mask=False)))
  return (np.asarray(batch["image"][:n], np.float32) / 255.0,
          np.asarray(batch["zoom"][:n], np.float32))


def load_images(config, images=4, *, split: str = "validation") -> np.ndarray:
  """`load_batch` without the zoom (figures from these treat the images as stored pixels)."""
  return load_batch(config, images, split=split)[0]


def suffixed(out: str, suffix: str) -> str:
  root, ext = os.path.splitext(out)
  return f"{root}_{suffix}{ext or '.png'}"


def figures(pre: Pretrained, x01, *, zoom=None, seed: int = 0, mask_ratio=None,
            stats: str = "local", obs_step: int | None = None) -> dict:
  """Every figure for one model: {'reconstruction': Figure, 'spectrum'?: ..., 'obs'?: ...}.
  zoom: the batch's (N, 2) model pixels per stored pixel (`load_batch`)."""
  rec = reconstruct(pre.model, pre.config, x01, pre.mean, pre.std, zoom=zoom, seed=seed,
                    mask_ratio=mask_ratio, stats=stats, step=pre.step)
  figs = {"reconstruction": reconstruction_figure(rec)}
  if pre.config.recipe == "usfm":
    figs["spectrum"] = spectrum_figure(rec)
  if pre.config.recipe == "d2mae":
    figs["obs"] = obs_figure(obs_curve(pre.model, pre.config, x01, pre.mean, pre.std, zoom=zoom,
                                       step=obs_step))
  return figs


def write_figures(workdir: str, out: str, *, images=4, split: str = "validation", seed: int = 0,
                  mask_ratio=None, stats: str = "local", step: int | None = None) -> list[str]:
  """The CLI: loads `workdir`, draws its figures, writes OUT (reconstruction), OUT_spectrum (USFM)
  and OUT_obs (D²MAE). Returns the paths written."""
  pre = load(workdir, step)
  x01, zoom = load_batch(pre.config, images, split=split)
  paths = []
  for name, fig in figures(pre, x01, zoom=zoom, seed=seed, mask_ratio=mask_ratio,
                           stats=stats).items():
    paths.append(save(fig, out if name == "reconstruction" else suffixed(out, name)))
  return paths


# --------------------------------------------------------------------------------- notebook helpers


def get_config(recipe: str, arg: str = "smoke", overrides: dict | None = None):
  """configs/<recipe's file>.py:ARG as `--config` would load it, with dotted-key overrides applied."""
  return config_files.load(CONFIG_FILES.get(recipe, recipe), arg, overrides)


def pretrain_demo(recipe: str, workdir: str, *, steps: int = 40, arg: str = "smoke",
                  overrides: dict | None = None, quiet: bool = False) -> str:
  """Trains configs/<recipe>.py:ARG for `steps` steps into `workdir`, unless a finished run of at
  least that many steps is already there (then it is only loaded later). Returns the workdir."""
  from mae_jax import validate
  from mae_jax.train import pretrain
  workdir = os.path.abspath(os.path.expanduser(workdir))
  done = os.path.join(workdir, "train_done.json")
  if os.path.exists(done):
    with open(done) as f:
      finished = int(json.load(f).get("step") or 0)
    # Both: the run said it finished, and its last checkpoint was committed (not left half-written).
    if finished >= steps and max(validate.checkpoint_steps(workdir), default=0) >= steps:
      return workdir
  over = {"train.total_steps": int(steps), "train.log_every": max(1, int(steps)),
          "train.checkpoint_every": max(1, int(steps))}
  over.update(overrides or {})
  config = get_config(recipe, arg, over)
  t0 = time.perf_counter()
  res = pretrain.train(config, workdir)
  if not quiet:
    loss = res.get("loss")
    print(f"{recipe}: {res['step']} steps in {time.perf_counter() - t0:.0f}s"
          + (f", loss {loss:.4f}" if loss is not None else "") + f" -> {workdir}")
  return workdir


def explorer(pre: Pretrained, x01, *, zoom=None, seed: int = 0, stats: str = "local"):
  """An ipywidgets slider panel: mask ratio (MAE path), and σ (Deblurring MAE, Gaussian), the level t
  (D²MAE), the noise std (Denoising MAE) or the spatial mask ratio (USFM). zoom: the batch's (see
  `reconstruct`). Returns the widget, or None (with a note) when ipywidgets is not installed."""
  try:
    import ipywidgets as widgets
    from IPython.display import display
  except ImportError:
    print("ipywidgets is not installed: no interactive sliders (pip install ipywidgets)")
    return None
  config, c = pre.config, pre.config.corrupt
  controls = {}
  if config.model.path == "mae":
    controls["mask_ratio"] = widgets.FloatSlider(value=float(config.model.mask_ratio), min=0.0,
                                                 max=0.95, step=0.05, description="mask ratio")
  if config.recipe == "deblur" and c.blur == "gaussian":
    controls["sigma"] = widgets.FloatSlider(value=float(c.sigma), min=0.1, max=3.0, step=0.1,
                                            description="blur σ")
  elif config.recipe == "d2mae":
    levels = recipes.sigma_levels(c.sigma_levels)
    controls["t"] = widgets.SelectionSlider(options=[(f"{s:.2f}", i + 1) for i, s in enumerate(levels)],
                                            value=len(levels) // 2 + 1, description="σ_t")
  elif config.recipe == "denoise":
    controls["noise_std"] = widgets.FloatSlider(value=float(c.noise_std), min=0.0, max=0.5, step=0.02,
                                                description="noise std")
  elif config.recipe == "usfm":
    controls["spatial_ratio"] = widgets.FloatSlider(value=float(c.spatial_ratio), min=0.0, max=0.9,
                                                    step=0.1, description="mask ratio")
  out = widgets.Output()

  def redraw(**values):
    rec = reconstruct(pre.model, config, x01, pre.mean, pre.std, zoom=zoom, seed=seed,
                      stats=stats, step=pre.step, **values)
    out.clear_output(wait=True)
    with out:
      display(reconstruction_figure(rec))

  ui = widgets.interactive(redraw, **controls)
  box = widgets.VBox([widgets.HBox(list(controls.values())), out])
  ui.update()
  display(box)
  return box


# -------------------------------------------------------------------------------------------- CLI


# ------------------------------------------------------------------------------ enhancement


def enhancement_figure(low, methods, high, *, title: str | None = None):
  """USFM Fig. 9's layout: one row per test image, columns low | each method's output | high, the
  SSIM against high under every image. low, high: (N, H, W) uint8; methods: [(name, (N, H, W) uint8)]."""
  from mae_jax import image_quality
  low, high = np.asarray(low), np.asarray(high)
  cols = [("low quality", low)] + [(n, np.asarray(a)) for n, a in methods] + [("high quality", high)]
  n, k = len(low), len(cols)
  fig = _figure(k * CELL, n * CELL + HEADER)
  fig.suptitle(title or "Image enhancement (test pairs)", fontsize=9)
  top = 1.0 - HEADER / (n * CELL + HEADER)
  for i in range(n):
    for j, (name, imgs) in enumerate(cols):
      ax = fig.add_axes([j / k, top - (i + 1) * (top / n), 1.0 / k, top / n * 0.86])
      img = imgs[i].astype(np.float32) / 255.0
      label = name if i == 0 else None
      if j < k - 1:
        ssim = float(image_quality.ssim(img[None], high[i:i + 1] / 255.0)[0])
        label = f"{name}\nSSIM {ssim:.3f}" if i == 0 else f"SSIM {ssim:.3f}"
      _show(ax, img, label)
  return fig


def write_enhancement_figure(workdirs, out: str, *, images: int = 4, labels=None) -> str:
  """low | each enhancement workdir's output (e.g. CycleGAN, + features) | high, from the
  `predictions_test.npz` of enhancement workdirs run on the same test split; `labels` name the
  columns (default: each run's method)."""
  preds = []
  for w in workdirs:
    path = os.path.join(w, "predictions_test.npz")
    if not os.path.exists(path):
      raise ValueError(f"{w!r} holds no predictions_test.npz: is it a finished enhancement workdir?")
    preds.append(np.load(path))
  low, high = preds[0]["low"], preds[0]["high"]
  for w, p in zip(workdirs, preds):
    if p["high"].shape != high.shape or not np.array_equal(p["high"], high):
      raise ValueError(f"{w!r} was tested on other images than {workdirs[0]!r}")
  n = min(int(images), len(low))
  names = labels or [str(p["method"]) for p in preds]
  methods = [(name, p["enhanced"][:n]) for name, p in zip(names, preds, strict=True)]
  return save(enhancement_figure(low[:n], methods, high[:n]), out)


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m mae_jax.visualize", description=(
      "Reconstruction figures of a pretraining workdir: OUT (original | input | reconstruction | "
      "reconstruction + visible patches), plus OUT_obs (D²MAE) and OUT_spectrum (USFM)."))
  p.add_argument("--workdir", help="a pretraining workdir (config.json, checkpoints/)")
  p.add_argument("--enhance", nargs="+", metavar="DIR",
                 help="instead of --workdir: enhancement workdirs (e.g. CycleGAN, + features); OUT is "
                      "then low | each one's output | high on their test pairs")
  p.add_argument("--out", required=True, help="the PNG to write, e.g. figs/recon.png")
  p.add_argument("--images", nargs="+", default=["4"],
                 help="how many images of --split (default 4), or image files (comma or space separated)")
  p.add_argument("--split", default="validation", choices=("train", "validation", "test"))
  p.add_argument("--seed", type=int, default=0, help="seeds the corruption and the mask")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--mask-ratio", type=float, default=None, help="override the model's (MAE path)")
  p.add_argument("--stats", default="local", choices=STATS,
                 help="norm-pix de-normalisation statistics (see the module docstring)")
  args = p.parse_args(argv)
  if not args.workdir and not args.enhance:
    p.error("one of --workdir or --enhance is required")
  items = [s for a in args.images for s in a.split(",") if s]
  if len(items) == 1 and items[0].isdigit():
    args.images = int(items[0])
  else:
    args.images = items
  return args


def main(argv=None) -> list[str]:
  args = _parse(sys.argv[1:] if argv is None else argv)
  if args.enhance:
    n = args.images if isinstance(args.images, int) else 4
    try:
      paths = [write_enhancement_figure(args.enhance, args.out, images=n)]
    except ValueError as e:
      raise SystemExit(f"error: {e}") from None
    for p in paths:
      print(p)
    return paths
  try:
    paths = write_figures(args.workdir, args.out, images=args.images, split=args.split, seed=args.seed,
                          mask_ratio=args.mask_ratio, stats=args.stats, step=args.step)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  for p in paths:
    print(p)
  return paths


if __name__ == "__main__":
  main()
