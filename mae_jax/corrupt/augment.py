"""USFM's pretraining augmentation on device: random rotation and scaling, brightness and contrast,
Gaussian blur, per sample, inside the jitted step.

USFM (Medical Image Analysis 2024) §3.1: "we performed image augmentation on the input data ...
random rotation, scaling, cropping, brightness and contrast adjustment, and Gaussian blur". The
paper gives no parameters and its pretraining code was never published (openmedlab/USFM holds the
downstream code only), so the ranges are config fields (`config.augment`, docs/methods.md#usfm-augmentation
says what was chosen and why). Cropping is the host's random resized crop (`mae_jax.data.pipeline`),
which every recipe already gets.

Order, per image: one affine warp (rotation by θ about the image centre and isotropic scaling by s,
bilinear, zeros outside: the black background of a sector scan) → brightness + δ → contrast about
the image's own mean by a factor → clip to [0, 1] (as torchvision's ColorJitter clamps) → Gaussian
blur with probability p (σ in model pixels: this augments the model-resolution image).

dm-pix does the pixel work where it has the operation: `dm_pix.affine_transform` (vmapped, one
matrix per image), `dm_pix.adjust_brightness`, `dm_pix.adjust_contrast`. The blur is
`blur.gaussian_blur` (the hand-written separable kernel, which docs/benchmarks.md measured faster
than dm-pix's on CPU; `impl='dm_pix'` gives the same numbers).
"""

from __future__ import annotations

import math

import dm_pix
import jax
import jax.numpy as jnp

from mae_jax.corrupt import blur as blur_lib

PARAMS = ("rotate_deg", "scale_min", "scale_max", "brightness", "contrast", "blur_prob",
          "blur_sigma_min", "blur_sigma_max")


def params(acfg) -> dict:
  """The keyword arguments of `augment` from a config's `augment` section."""
  return {k: float(acfg[k]) for k in PARAMS}


def draw(key, n: int, *, rotate_deg, scale_min, scale_max, brightness, contrast, blur_prob,
         blur_sigma_min, blur_sigma_max) -> dict:
  """Per-sample parameters: angle (radians, counter-clockwise as displayed), scale, delta, factor,
  sigma (0 = no blur). Each from its own stream of `key`."""
  ka, ks, kb, kc, kp, kg = jax.random.split(key, 6)
  u = lambda k, lo, hi: jax.random.uniform(k, (n,), jnp.float32, lo, hi)  # noqa: E731
  on = jax.random.uniform(kp, (n,)) < blur_prob
  return {"angle": u(ka, -rotate_deg, rotate_deg) * (math.pi / 180.0),
          "scale": u(ks, scale_min, scale_max),
          "delta": u(kb, -brightness, brightness),
          "factor": u(kc, 1.0 - contrast, 1.0 + contrast),
          "sigma": jnp.where(on, u(kg, blur_sigma_min, blur_sigma_max), 0.0)}


def affine_matrix(angle, scale, height: int, width: int):
  """The (4, 4) pull matrix dm_pix.affine_transform takes for one HWC image: output index
  (y, x, c) → input index. The output is the input rotated by `angle` (counter-clockwise as
  displayed, y pointing down) and scaled by `scale` about the pixel centre ((H-1)/2, (W-1)/2),
  i.e. cv2.warpAffine with cv2.getRotationMatrix2D(centre, degrees(angle), scale)."""
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
  # Pull (the inverse of cv2's forward matrix): input = A (out − c) + c in (y, x) index order.
  a = jnp.array([[cos, sin], [-sin, cos]])
  c = jnp.array([cy, cx])
  t = c - a @ c
  m = jnp.eye(4, dtype=jnp.float32)
  return m.at[:2, :2].set(a).at[:2, 3].set(t)


def apply(x01, p: dict, *, blur_kernel: int):
  """The augmentation with fixed per-sample parameters `p` (see `draw`)."""
  n, h, w, _ = x01.shape
  warp = lambda im, a, s: dm_pix.affine_transform(im, affine_matrix(a, s, h, w), order=1,  # noqa: E731
                                                   mode="constant", cval=0.0)
  x = jax.vmap(warp)(x01, p["angle"], p["scale"])
  col = lambda v: v.reshape(n, 1, 1, 1)  # noqa: E731
  x = dm_pix.adjust_brightness(x, col(p["delta"]))
  x = jnp.clip(dm_pix.adjust_contrast(jnp.clip(x, 0.0, 1.0), col(p["factor"])), 0.0, 1.0)
  return blur_lib.gaussian_blur(x, p["sigma"], kernel_size=blur_kernel)


def augment(key, x01, **kw):
  """USFM's augmentation of a batch of [0, 1] images (N, H, W, C), parameters drawn per sample."""
  p = draw(key, x01.shape[0], **kw)
  return apply(x01, p, blur_kernel=blur_lib.gaussian_kernel_size(kw["blur_sigma_max"]))
