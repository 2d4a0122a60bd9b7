"""The four pretraining recipes as what they do to pixels before the model sees them.

Each recipe is `corrupt(config, key, x01, zoom) -> (inputs01, model_kwargs)`: x01 are the clean
images in [0, 1] (N, H, W, C) at model resolution; inputs01 is what the encoder sees, before
normalisation; model_kwargs go to the model call (D²MAE's blur level t, USFM's pixel mask). The loss
always compares against the clean image (the model receives it as `target`). `augment_and_corrupt`
first applies the recipe's on-device augmentation (USFM, `mae_jax/corrupt/augment.py`): the clean
target is then the augmented image and the corruption derives from it, as in SimMIM
(microsoft/SimMIM `data/data_simmim.py`: the image transform runs first, the mask is applied to its
output, the loss compares with that output).

σ units (`corrupt.sigma_units`): 'native' (default) means σ is in the stored image's pixels, as
openmedlab/DeblurringMIM, which blurs the stored images offline before `RandomResizedCrop`; the
blur then runs with σ·zoom per axis, zoom = model pixels per stored pixel of each sample's crop,
passed with the batch (`mae_jax.data.pipeline`). 'model' is σ in model pixels after crop and
resize (the project's behaviour before). `corrupt.kernel_units` does the same for the mean, median,
motion and defocus sizes ('native', the default: stored pixels, the kernel seen through each crop's
resize, `blur.apply_blur_native`; 'model': the size in model pixels, as before). SRAD's iteration
count is not a size and runs on the model grid (docs/methods.md#blur-strength).

| recipe  | paper                       | corruption                                  | model path |
|---------|-----------------------------|---------------------------------------------|------------|
| mae     | He et al. 2022              | none                                        | mae        |
| deblur  | Kang et al. 2023 (§2)       | fixed blur: gaussian σ / srad / mean / ...  | mae        |
| denoise | Kang et al. 2023, baseline  | additive Gaussian noise                     | mae        |
| d2mae   | D²MAE 2025 (§2.1, Eq. 1)    | Gaussian blur σ_t, t ~ U{1..T}; token BLU(t)| mae        |
| usfm    | USFM 2024 (§3.2, Eq. 2-8)   | spatial mean mask + frequency band-stop     | simmim     |
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.corrupt import augment as augment_lib
from mae_jax.corrupt import blur as blur_lib
from mae_jax.corrupt import frequency, noise
from mae_jax.data import pipeline

RECIPES = ("mae", "deblur", "denoise", "d2mae", "usfm")
SIGMA_UNITS = ("native", "model")


def sigma_levels(spec: str) -> np.ndarray:
  """'0.1:1.1:0.1' -> [0.1, 0.2, ..., 1.1] (σ_t = start + (t-1)·step, t = 1..T, stop included)."""
  try:
    start, stop, step = (float(v) for v in spec.split(":"))
  except ValueError:
    raise ValueError(f"corrupt.sigma_levels={spec!r}: expected 'start:stop:step', e.g. '0.1:1.1:0.1'") from None
  if step <= 0 or start <= 0 or stop < start:
    raise ValueError(f"corrupt.sigma_levels={spec!r}: needs 0 < start <= stop and step > 0 (empty range)")
  count = int(np.floor((stop - start) / step + 1e-6)) + 1
  return (start + step * np.arange(count)).round(6).astype(np.float32)


def blur_params(ccfg) -> dict:
  """The keyword arguments of `blur.apply_blur` for a fixed-blur config."""
  method = ccfg.blur
  if method == "gaussian":
    return {"sigma": float(ccfg.sigma)}
  if method == "srad":
    return {"iterations": int(ccfg.srad_iters), "dt": float(ccfg.srad_dt)}
  if method in ("mean", "median"):
    return {"size": int(ccfg.kernel)}
  if method == "motion":
    return {"length": int(ccfg.kernel)}
  if method == "defocus":
    return {"radius": int(ccfg.defocus_radius)}
  return {}


def native_units(ccfg) -> bool:
  """Whether σ is in stored pixels. A config saved before the field existed (an older workdir)
  was trained with σ in model pixels, so a missing field reads as 'model'."""
  return ccfg.get("sigma_units", "model") == "native"


def zoom_bound(ccfg, data_cfg, image_size: int) -> float:
  """The largest zoom (model pixels per stored pixel) a sample can get: 1 in model units, else
  `pipeline.max_zoom` of the data fields (`native_size` as the smallest stored side,
  `crop_scale_min`). It sizes the static Gaussian kernel; a larger zoom (a stored image smaller than
  `data.native_size`) keeps that kernel, truncated (cv2.GaussianBlur with an explicit ksize)."""
  if not native_units(ccfg):
    return 1.0
  return pipeline.max_zoom(int(data_cfg.native_size), int(image_size), float(data_cfg.crop_scale_min))


def gaussian_size(sigma_max: float, bound: float) -> int:
  """Static kernel size for σ up to `sigma_max` (in the config's units) and zoom up to `bound`."""
  return blur_lib.gaussian_kernel_size(float(sigma_max) * float(bound))


def _model_sigma(ccfg, sigma, zoom, n: int):
  """σ as the blur takes it: unchanged in model units; per-axis σ·zoom (N, 2) in native units,
  with zoom 1 (the images are the stored pixels) when the caller has none."""
  if not native_units(ccfg):
    return sigma
  if zoom is None:
    zoom = jnp.ones((n, 2), jnp.float32)
  return blur_lib.per_axis_sigma(sigma, zoom)


def d2mae_blur(key, x01, levels: np.ndarray, *, zoom=None, kernel_size: int | None = None):
  """D²MAE Eq. 1: t ~ U{1..T} per sample, x_b = G_{σ_t}(x). Returns (x_b, t) with t 1-based.

  zoom: (N, 2) per-axis factors for σ in stored pixels (None: σ_t in model pixels).
  kernel_size: static; default the largest σ's size (enough without zoom)."""
  t = jax.random.randint(key, (x01.shape[0],), 1, len(levels) + 1)
  sigma = jnp.asarray(levels)[t - 1]
  if zoom is not None:
    sigma = blur_lib.per_axis_sigma(sigma, zoom)
  size = kernel_size or blur_lib.gaussian_kernel_size(float(levels.max()))
  return blur_lib.gaussian_blur(x01, sigma, kernel_size=size), t


def native_kernels(ccfg) -> bool:
  """Whether mean / median / motion / defocus sizes are in stored pixels (`corrupt.kernel_units`);
  a config saved before the field existed trained them in model pixels."""
  return ccfg.get("kernel_units", "model") == "native"


def _fixed_blur(config, key, x01, zoom, data_cfg):
  """Deblurring MAE's fixed blur; the Gaussian with σ, and the kernel blurs with their sizes, in the
  configured units (SRAD's iteration count is not a size: it stays on the model grid)."""
  ccfg = config.corrupt
  if ccfg.blur in blur_lib.NATIVE and native_kernels(ccfg):
    if zoom is None:
      zoom = jnp.ones((x01.shape[0], 2), jnp.float32)
    bound = pipeline.max_zoom(int(data_cfg.native_size), int(config.model.image_size),
                              float(data_cfg.crop_scale_min))
    return blur_lib.apply_blur_native(ccfg.blur, key, x01, zoom, bound, **blur_params(ccfg))
  if ccfg.blur != "gaussian":
    return blur_lib.apply_blur(ccfg.blur, key, x01, **blur_params(ccfg))
  bound = zoom_bound(ccfg, data_cfg, config.model.image_size)
  return blur_lib.gaussian_blur(x01, _model_sigma(ccfg, float(ccfg.sigma), zoom, x01.shape[0]),
                                kernel_size=gaussian_size(ccfg.sigma, bound))


def corrupt(config, key, x01, zoom=None):
  """zoom: (N, 2) model pixels per stored pixel of each sample (the batch's `zoom`); None means
  the images are at stored resolution (zoom 1). Only read for a Gaussian blur in native units."""
  recipe, ccfg = config.recipe, config.corrupt
  if recipe == "mae":
    return x01, {}
  if recipe == "deblur":
    return _fixed_blur(config, key, x01, zoom, config.data), {}
  if recipe == "denoise":
    return noise.gaussian_noise(key, x01, ccfg.noise_std), {}
  if recipe == "d2mae":
    levels = sigma_levels(ccfg.sigma_levels)
    size = gaussian_size(levels.max(), zoom_bound(ccfg, config.data, config.model.image_size))
    if native_units(ccfg) and zoom is None:
      zoom = jnp.ones((x01.shape[0], 2), jnp.float32)
    xb, t = d2mae_blur(key, x01, levels, zoom=zoom if native_units(ccfg) else None, kernel_size=size)
    return xb, ({"blur_t": t} if config.model.blur_embed != "none" else {})
  if recipe == "usfm":
    xc, pixel_mask = frequency.dual_mask(key, x01, spatial_ratio=ccfg.spatial_ratio,
                                         unit=ccfg.spatial_unit, use_frequency=ccfg.frequency,
                                         params=frequency.params_from_config(ccfg))
    return xc, {"pixel_mask": pixel_mask}
  raise ValueError(f"recipe={recipe!r}: expected one of {RECIPES}")


def augment_and_corrupt(config, key, x01, zoom=None):
  """(clean01, inputs01, model_kwargs): the recipe's augmentation (`config.augment`, on for USFM),
  then its corruption of the augmented image. The loss target is clean01. Without augmentation the
  key and the result equal `corrupt(config, key, x01, zoom)`'s (runs without it are unchanged)."""
  x01 = augment(config, key, x01)
  inputs01, kwargs = corrupt(config, key, x01, zoom)
  return x01, inputs01, kwargs


def augment(config, key, x01):
  """The augmentation `augment_and_corrupt` applies with the same `key` (the corruption's key; the
  augmentation draws from fold_in(key, 7)); x01 unchanged when `config.augment` is off or absent."""
  acfg = config.get("augment")
  if acfg is not None and acfg.enabled:
    x01 = augment_lib.augment(jax.random.fold_in(key, 7), x01, **augment_lib.params(acfg))
  return x01


def transfer_blur(config, x01, sigma=None, *, zoom=None, data_cfg=None, kernel_size=None):
  """The blur a downstream job applies to every split so inputs look like pretraining inputs:
  Deblurring MAE's fixed blur; D²MAE's G_σ* with σ* from the optimal blurriness search (per image,
  passed in); nothing for the other recipes. σ has the pretraining config's units: in native units
  it is multiplied by `zoom` (N, 2) (None: 1). data_cfg: the job's data fields, which bound the
  zoom of its crops (default: the pretraining config's); kernel_size overrides the bound."""
  ccfg = config.corrupt
  data_cfg = config.data if data_cfg is None else data_cfg
  if config.recipe == "deblur":
    if ccfg.blur != "gaussian" or kernel_size is None:
      return _fixed_blur(config, jax.random.key(0), x01, zoom, data_cfg)
    return blur_lib.gaussian_blur(x01, _model_sigma(ccfg, float(ccfg.sigma), zoom, x01.shape[0]),
                                  kernel_size=kernel_size)
  if config.recipe == "d2mae" and sigma is not None:
    if kernel_size is None:
      levels = sigma_levels(ccfg.sigma_levels)
      kernel_size = gaussian_size(levels.max(), zoom_bound(ccfg, data_cfg, config.model.image_size))
    n = x01.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (n,))
    return blur_lib.gaussian_blur(x01, _model_sigma(ccfg, sigma, zoom, n), kernel_size=kernel_size)
  return x01
