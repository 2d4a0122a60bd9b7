"""Reconstructions as arrays: what a pretrained model makes of masked or corrupted images.

Pure and jit-able, used by the trainer's TensorBoard preview (`reconstruction_columns`, `panel`) and
by the figures of `visualize.py`. Norm-pix models predict each patch normalised by its own mean and
std, which the masked patches' pixels would be needed to undo: `denormalize_patches` uses only what
is visible (`stats='local'`: a masked patch gets the average statistics of the visible patches
around it; 'image': the pooled statistics of all visible pixels; 'own': the true per-patch statistics,
an oracle that shows only the shape of the prediction).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import losses
from mae_jax import patches as patch_lib
from mae_jax import recipes
from mae_jax.corrupt import frequency, masking

STATS = ("local", "image", "own")


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
      spec_mask = frequency.band_stop_mask(k_freq, n, h, w, frequency.params_from_config(c))
    xc, pix = frequency.dual_mask(key, x01, spatial_ratio=ratio, unit=c.spatial_unit,
                                  use_frequency=c.frequency, params=frequency.params_from_config(c),
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


def forward_pixels(model, x01, inputs01, noise, mean, std, model_kwargs, mask_ratio, stats):
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
  out = jax.device_get(forward_pixels(model, x01, inputs01, noise, jnp.float32(mean), jnp.float32(std),
                                kwargs, mask_ratio, stats))
  out = {k: np.asarray(v, np.float32) for k, v in out.items()}
  return Reconstruction(recipe=config.recipe, norm_pix=bool(getattr(model, "norm_pix_loss", False)),
                        stats=stats, info=info, step=step, **out)
