"""The four pretraining recipes as what they do to pixels before the model sees them.

Each recipe is `corrupt(config, key, x01) -> (inputs01, model_kwargs)`: x01 are the clean images
in [0, 1] (N, H, W, C) at model resolution; inputs01 is what the encoder sees, before normalisation;
model_kwargs go to the model call (D²MAE's blur level t, USFM's pixel mask). The loss always
compares against the clean image (the model receives it as `target`).

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

from mae_jax.corrupt import blur as blur_lib
from mae_jax.corrupt import frequency, noise

RECIPES = ("mae", "deblur", "denoise", "d2mae", "usfm")


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


def d2mae_blur(key, x01, levels: np.ndarray):
  """D²MAE Eq. 1: t ~ U{1..T} per sample, x_b = G_{σ_t}(x). Returns (x_b, t) with t 1-based."""
  t = jax.random.randint(key, (x01.shape[0],), 1, len(levels) + 1)
  sigma = jnp.asarray(levels)[t - 1]
  size = blur_lib.gaussian_kernel_size(float(levels.max()))  # static: the largest σ's size
  return blur_lib.gaussian_blur(x01, sigma, kernel_size=size), t


def corrupt(config, key, x01):
  recipe, ccfg = config.recipe, config.corrupt
  if recipe == "mae":
    return x01, {}
  if recipe == "deblur":
    return blur_lib.apply_blur(ccfg.blur, key, x01, **blur_params(ccfg)), {}
  if recipe == "denoise":
    return noise.gaussian_noise(key, x01, ccfg.noise_std), {}
  if recipe == "d2mae":
    xb, t = d2mae_blur(key, x01, sigma_levels(ccfg.sigma_levels))
    return xb, ({"blur_t": t} if config.model.blur_embed != "none" else {})
  if recipe == "usfm":
    xc, pixel_mask = frequency.dual_mask(key, x01, spatial_ratio=ccfg.spatial_ratio,
                                         unit=ccfg.spatial_unit, use_frequency=ccfg.frequency,
                                         num_rings_dropped=ccfg.rings_dropped)
    return xc, {"pixel_mask": pixel_mask}
  raise ValueError(f"recipe={recipe!r}: expected one of {RECIPES}")


def transfer_blur(config, x01, sigma=None):
  """The blur a downstream job applies to every split so inputs look like pretraining inputs:
  Deblurring MAE's fixed blur; D²MAE's G_σ* with σ* from the optimal blurriness search (per image,
  passed in); nothing for the other recipes."""
  if config.recipe == "deblur":
    return blur_lib.apply_blur(config.corrupt.blur, jax.random.key(0), x01, **blur_params(config.corrupt))
  if config.recipe == "d2mae" and sigma is not None:
    levels = sigma_levels(config.corrupt.sigma_levels)
    size = blur_lib.gaussian_kernel_size(float(levels.max()))
    return blur_lib.gaussian_blur(x01, sigma, kernel_size=size)
  return x01
