"""USFM's pretraining augmentation on device: random rotation and scaling, brightness and contrast,
Gaussian blur, per sample, inside the jitted step.

USFM (Medical Image Analysis 2024) §3.1: "we performed image augmentation on the input data ...
random rotation, scaling, cropping, brightness and contrast adjustment, and Gaussian blur". The
paper gives no parameters, and openmedlab/USFM publishes its masking (usdsgen/data/transforms.py)
and downstream code but no pretraining augmentation, so the ranges are config fields (`config.augment`, docs/methods.md#usfm-augmentation
says what was chosen and why). Cropping is the host's random resized crop (`mae_jax.data.pipeline`),
which every recipe already gets.

Order, per image: one affine warp (rotation by θ about the image centre and isotropic scaling by s,
bilinear, zeros outside: the black background of a sector scan) → brightness + δ → contrast about
the image's own mean by a factor → clip to [0, 1] (as torchvision's ColorJitter clamps) → Gaussian
blur with probability p (σ in model pixels: this augments the model-resolution image).

dm-pix does the pixel work where it is fast enough: `dm_pix.adjust_brightness`,
`dm_pix.adjust_contrast`. The warp has dm-pix's `affine_transform` semantics but its own
four-gather form (`warp`, ~40x faster on CPU; `impl='dm_pix'` gives the same numbers, tested), and
the blur is `blur.gaussian_blur` (the separable kernel, which docs/benchmarks.md measured faster
than dm-pix's on CPU; its `impl='dm_pix'` gives the same numbers).
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


def warp(x01, angle, scale, *, impl: str = "gather"):
  """Each image rotated by angle[i] and scaled by scale[i] about its centre, bilinear, 0 outside,
  with `dm_pix.affine_transform(order=1, mode='constant')`'s exact semantics: a point whose source
  coordinate lies outside [0, size − 1] in either axis is 0, any other is the bilinear mix of its
  floor/ceil neighbours.

  impl='dm_pix' calls dm-pix (vmapped, one `affine_matrix` per image). The default 'gather' computes
  the same numbers with the 2-D source coordinates and four row gathers from the flattened image:
  dm-pix interpolates the (H, W, C) image as a 3-D volume (8 corners, the channel axis included)
  through generic gathers, ~150 ms for 32 × 224² × 1 on 2 CPU cores and ~1 s for 3 channels, which
  was 17 % of a USFM step (docs/benchmarks.md); this form takes 4 and 25 ms.
  """
  n, h, w, c = x01.shape
  if impl == "dm_pix":
    one = lambda im, a, s: dm_pix.affine_transform(im, affine_matrix(a, s, h, w), order=1,  # noqa: E731
                                                    mode="constant", cval=0.0)
    return jax.vmap(one)(x01, angle, scale)
  if impl != "gather":
    raise ValueError(f"warp impl {impl!r}: expected 'gather' or 'dm_pix'")
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  cos = (jnp.cos(angle) / scale)[:, None, None]
  sin = (jnp.sin(angle) / scale)[:, None, None]
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy, jnp.arange(w, dtype=jnp.float32) - cx,
                        indexing="ij")
  sy, sx = cos * yy + sin * xx + cy, -sin * yy + cos * xx + cx  # affine_matrix's pull, per image
  inside = (sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)
  y0, x0 = jnp.floor(sy), jnp.floor(sx)
  fy, fx = sy - y0, sx - x0
  ys = [jnp.clip(y0, 0, h - 1).astype(jnp.int32), jnp.clip(jnp.ceil(sy), 0, h - 1).astype(jnp.int32)]
  xs = [jnp.clip(x0, 0, w - 1).astype(jnp.int32), jnp.clip(jnp.ceil(sx), 0, w - 1).astype(jnp.int32)]
  flat = x01.reshape(n, h * w, c)
  out = jnp.zeros_like(x01)
  for yi, wy in ((ys[0], 1 - fy), (ys[1], fy)):
    for xi, wx in ((xs[0], 1 - fx), (xs[1], fx)):
      rows = jnp.take_along_axis(flat, (yi * w + xi).reshape(n, h * w, 1), axis=1)
      out = out + (wy * wx)[..., None].astype(x01.dtype) * rows.reshape(n, h, w, c)
  return jnp.where(inside[..., None], out, 0.0).astype(x01.dtype)


def apply(x01, p: dict, *, blur_kernel: int, warp_impl: str = "gather"):
  """The augmentation with fixed per-sample parameters `p` (see `draw`)."""
  n = x01.shape[0]
  # The barrier keeps XLA from fusing the warp's gathers into the passes below, which would redo
  # them for every tap of the blur (3.5x the time of the pieces on CPU).
  x = jax.lax.optimization_barrier(warp(x01, p["angle"], p["scale"], impl=warp_impl))
  col = lambda v: v.reshape(n, 1, 1, 1)  # noqa: E731
  x = dm_pix.adjust_brightness(x, col(p["delta"]))
  x = jnp.clip(dm_pix.adjust_contrast(jnp.clip(x, 0.0, 1.0), col(p["factor"])), 0.0, 1.0)
  return blur_lib.gaussian_blur(x, p["sigma"], kernel_size=blur_kernel)


def augment(key, x01, **kw):
  """USFM's augmentation of a batch of [0, 1] images (N, H, W, C), parameters drawn per sample."""
  p = draw(key, x01.shape[0], **kw)
  return apply(x01, p, blur_kernel=blur_lib.gaussian_kernel_size(kw["blur_sigma_max"]))


def flip_rot90(key, images, masks=None, *, vflip: bool = True, rot90: bool = True):
  """USFM's segmentation augmentation past the resize (usdsgen/data/datasets.py: albumentations
  RandomRotate90(p=0.5), then horizontal and vertical flips, p = 0.5 each), per sample, image and mask
  alike; the horizontal flip is the host pipeline's (`data.hflip`). With probability 1/2 a rotation by
  k·90°, k ~ U{0..3} (albumentations draws k in 0..3 inclusive); then a vertical flip with
  probability 1/2. NHWC, square images. Returns (images, masks)."""
  n, h, w = images.shape[:3]
  if rot90 and h != w:
    raise ValueError(f"rot90 needs square images, got {h}x{w}")
  k_apply, k_k, k_flip = jax.random.split(key, 3)
  k = jnp.where(jax.random.bernoulli(k_apply, 0.5, (n,)) if rot90 else jnp.zeros((n,), bool),
                jax.random.randint(k_k, (n,), 0, 4), 0)
  flip = jax.random.bernoulli(k_flip, 0.5, (n,)) if vflip else jnp.zeros((n,), bool)

  def one(x):
    if x is None:
      return None
    out = x
    for r in (1, 2, 3):
      out = jnp.where((k == r)[:, None, None, None], jnp.rot90(x, r, axes=(1, 2)), out)
    return jnp.where(flip[:, None, None, None], out[:, ::-1], out)

  return one(images), one(masks)


def flip_rot90_batch(key, batch: dict, *, vflip: bool, rot90: bool) -> dict:
  """`flip_rot90` on a segmentation batch's `image` and `mask`."""
  image, mask = flip_rot90(key, batch["image"], batch["mask"], vflip=vflip, rot90=rot90)
  return {**batch, "image": image, "mask": mask}


def random_erasing(key, x, prob: float, *, min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3, attempts: int = 10):
  """timm's RandomErasing(probability=prob, mode='pixel', max_count=1) on a batch of normalised NHWC
  images, per sample, on device: with probability `prob`, up to `attempts` draws of an area fraction
  ~ U(min_area, max_area) and a log aspect ratio ~ U(log min_aspect, −log min_aspect); the first whose
  box h = round(√(area·aspect)), w = round(√(area/aspect)) fits strictly inside (h < H, w < W) is
  placed at top ~ U{0..H−h}, left ~ U{0..W−w} and filled with N(0, 1) noise per pixel and channel."""
  n, h, w, _ = x.shape
  k_p, k_a, k_r, k_t, k_l, k_n = jax.random.split(key, 6)
  area = jax.random.uniform(k_a, (n, attempts), minval=min_area, maxval=max_area) * h * w
  log_r = jax.random.uniform(k_r, (n, attempts), minval=math.log(min_aspect),
                             maxval=-math.log(min_aspect))
  bh = jnp.round(jnp.sqrt(area * jnp.exp(log_r))).astype(jnp.int32)
  bw = jnp.round(jnp.sqrt(area / jnp.exp(log_r))).astype(jnp.int32)
  fits = (bh < h) & (bw < w)
  first = jnp.argmax(fits, axis=1)
  bh = jnp.take_along_axis(bh, first[:, None], 1)[:, 0]
  bw = jnp.take_along_axis(bw, first[:, None], 1)[:, 0]
  erase = (jax.random.uniform(k_p, (n,)) < prob) & jnp.any(fits, axis=1)
  top = jnp.floor(jax.random.uniform(k_t, (n,)) * (h - bh + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_l, (n,)) * (w - bw + 1)).astype(jnp.int32)
  rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  box = ((rows >= top[:, None, None]) & (rows < (top + bh)[:, None, None])
         & (cols >= left[:, None, None]) & (cols < (left + bw)[:, None, None]) & erase[:, None, None])
  noise = jax.random.normal(k_n, x.shape, x.dtype)
  return jnp.where(box[..., None], noise, x)
