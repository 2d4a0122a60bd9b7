"""Additive Gaussian noise: the denoising-MAE baseline of the Deblurring MAE paper.

No clipping by default. The model sees the corrupted image only after dataset normalisation,
so values outside [0, 1] are harmless; clipping would (a) make the noise's std smaller than the
configured `std` and its mean non-zero wherever the image is near 0 or 1 — most of an
ultrasound frame is near-black background — and (b) make the corruption depend on intensity.
Unclipped, the `std` config field is exactly the std of what is added. `clip=True` is there for
figures that need a displayable image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gaussian_noise(key, images, std=0.1, *, clip: bool = False):
  """images + std · N(0, 1), i.i.d. per pixel and channel.

  std: Python float or a per-sample (N,) array (may be traced).
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
  images = images.astype(jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  if std.ndim == 1:
    std = std.reshape(-1, 1, 1, 1)
  out = images + std * jax.random.normal(key, images.shape, jnp.float32)
  return jnp.clip(out, 0.0, 1.0) if clip else out
