"""USFM spatial mean masking (USFM §3.2.1, Eq. 2).

The image is cut into `unit` × `unit` squares (32 px at 224, a multiple of the model's patch);
a fraction of them, chosen per sample at random, is filled with the image's own mean (per image
and per channel, over the whole image, so the grey-level distribution stays continuous instead of
the black holes that zero filling makes).

How many units: int(np.ceil(L · ratio)), as the authors' `BlockwiseMaskGenerator(mask_color='mean')`
(openmedlab/USFM usdsgen/data/transforms.py, SimMIM's count): 20 of 49 at ratio 0.4. Which ones:
the largest entries of per-sample uniform noise (every subset equally likely, as their
`np.random.permutation(L)[:count]`). Every sample masks exactly that many units; the fill is the
image's per-channel mean over the whole image, as theirs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import numpy as np

from mae_jax.corrupt.masking import shuffle_from_noise
from mae_jax.patches import upsample_patch_mask


def unit_grid(h: int, w: int, unit: int) -> tuple[int, int]:
  if not isinstance(unit, int) or unit < 1:
    raise ValueError(f"spatial mask unit must be a positive Python int, got {unit!r}")
  if h % unit or w % unit:
    raise ValueError(f"image size {h}x{w} is not divisible by the spatial mask unit {unit}")
  return h // unit, w // unit


def num_masked_units(num_units: int, mask_ratio: float) -> int:
  """ceil(L · ratio) in float64 as the authors' generator computes it (so 100 units at 0.07 give
  8: 100 · 0.07 is 7.000000000000001)."""
  return int(np.ceil(num_units * mask_ratio))


def spatial_unit_mask(key, batch: int, num_units: int, mask_ratio: float, noise=None):
  """(N, L) float32 mask, 1 = masked, exactly `num_masked_units` ones per row."""
  if not 0.0 <= mask_ratio <= 1.0:
    raise ValueError(f"spatial mask_ratio must lie in [0, 1], got {mask_ratio}")
  if noise is None:
    noise = jax.random.uniform(key, (batch, num_units), jnp.float32)
  elif noise.shape != (batch, num_units):
    raise ValueError(f"spatial mask noise must have shape {(batch, num_units)}, got {noise.shape}")
  _, ids_restore = shuffle_from_noise(noise)
  return (ids_restore >= num_units - num_masked_units(num_units, mask_ratio)).astype(jnp.float32)


def mean_fill(images, pixel_mask):
  """Where pixel_mask (N, H, W, 1) is 1, the image's own per-channel mean; elsewhere the image."""
  mean = jnp.mean(images, axis=(1, 2), keepdims=True)
  return jnp.where(pixel_mask > 0, mean, images)


def spatial_mean_mask(key, images, *, mask_ratio: float = 0.4, unit: int = 32, noise=None):
  """USFM spatial mean masking.

  Returns (masked_images (N, H, W, C), unit_mask (N, h·w) with 1 = masked, units row-major,
  pixel_mask (N, H, W, 1) float32). noise: optional (N, h·w) uniform values that fix the choice.
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
  images = images.astype(jnp.float32)
  n, h, w, _ = images.shape
  grid = unit_grid(h, w, unit)
  unit_mask = spatial_unit_mask(key, n, grid[0] * grid[1], mask_ratio, noise)
  pixel_mask = upsample_patch_mask(unit_mask, unit, grid)
  return mean_fill(images, pixel_mask), unit_mask, pixel_mask
