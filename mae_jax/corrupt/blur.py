"""Blurs for Deblurring MAE and D²MAE: gaussian, mean, median, motion, defocus (+ SRAD via srad.py).

Every function takes NHWC float32 images in [0, 1] and returns the same shape and dtype. Kernel
sizes are static Python ints; per-sample parameters (Gaussian σ, motion angle) may be traced (N,)
arrays, and the Gaussian also takes per-sample, per-axis σ, (N, 2) = (σ_y, σ_x). All filters pad
with reflect-101 (OpenCV's BORDER_DEFAULT, scipy's 'mirror', jnp's 'reflect') and then convolve
VALID, so borders are not darkened the way zero padding (dm-pix's default 'SAME') does.

Filtering is written as a sum of shifted slices of the padded image rather than `lax.conv`: the
kernels are small, XLA fuses the sum into one elementwise kernel, per-sample (and per-axis)
kernels cost nothing extra, and there is no TF32 rounding that `lax.conv` gets on GPUs at default
precision, so the result is float32-exact against OpenCV. `dm_pix.gaussian_blur` (reflect-pad, then
padding='VALID', vmapped for a per-sample σ) is available as `gaussian_blur(..., impl='dm_pix')`
and agrees with OpenCV as closely, but it cannot take a different σ per axis (one kernel for both
axes), which σ in stored pixels needs after a non-square crop, and on CPU it is 16-55x slower
(docs/benchmarks.md, "Gaussian blur: hand-written vs dm-pix"); so the hand-written kernel is the
default everywhere.

σ in stored pixels: openmedlab/DeblurringMIM blurs the stored images offline (at native
resolution) before `RandomResizedCrop`. The blur here runs on device after crop and resize; with
`corrupt.sigma_units='native'` the recipes multiply σ by each sample's zoom (model pixels per
stored pixel, per axis, passed with the batch by `mae_jax.data.pipeline`), which gives the blur
the same strength in the stored image (see `mae_jax/recipes.py` and docs/methods.md#blur-strength).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import jax
import jax.numpy as jnp
import dm_pix
import numpy as np

from mae_jax.corrupt import srad as _srad


def _check_odd(size: int, name: str) -> int:
  if not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
    raise ValueError(f"{name} must be a positive odd Python int, got {size!r}")
  return int(size)


def _reflect_pad(images, pad_h: int, pad_w: int):
  # jnp's 'reflect' excludes the edge pixel: d c b | a b c d | c b a, i.e. reflect-101.
  return jnp.pad(images, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)), mode="reflect")


def _sample_weight(w, ndim: int):
  """A tap weight: a scalar, or a per-sample (N,) vector broadcast over the other axes."""
  w = jnp.asarray(w, jnp.float32)
  if w.ndim == 0:
    return w
  return w.reshape((-1,) + (1,) * (ndim - 1))


def _correlate_1d(images, weights, axis: int):
  """Correlate along H (axis=1) or W (axis=2) with K taps, reflect-101 borders.

  weights: (K,) shared or (N, K) per sample. K odd.
  """
  k = weights.shape[-1]
  r = k // 2
  padded = _reflect_pad(images, r if axis == 1 else 0, r if axis == 2 else 0)
  size = images.shape[axis]
  out = None
  for t in range(k):
    part = jax.lax.slice_in_dim(padded, t, t + size, axis=axis)
    term = part * _sample_weight(weights[..., t], images.ndim)
    out = term if out is None else out + term
  return out


def _correlate_2d(images, kernel):
  """Correlate with a (K, K) shared or (N, K, K) per-sample kernel, reflect-101 borders.

  A concrete (numpy) kernel skips its zero taps (the disk's corners).
  """
  k = kernel.shape[-1]
  r = k // 2
  _, h, w, _ = images.shape
  padded = _reflect_pad(images, r, r)
  concrete = isinstance(kernel, np.ndarray)
  out = None
  for i in range(k):
    for j in range(k):
      if concrete and kernel.ndim == 2 and kernel[i, j] == 0:
        continue
      part = padded[:, i:i + h, j:j + w, :]
      term = part * _sample_weight(kernel[..., i, j], images.ndim)
      out = term if out is None else out + term
  return out


def _as_float_images(images):
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
  return images.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Gaussian


def gaussian_kernel_size(sigma: float) -> int:
  """OpenCV's kernel size for 8-bit images: round(6σ + 1) | 1 (9 at σ = 1.1).

  OpenCV uses cvRound (round half to even), as Python's round does.
  """
  return int(round(float(sigma) * 6 + 1)) | 1


def gaussian_kernel_1d(sigma, kernel_size: int):
  """Normalised 1-D Gaussian weights as cv2.getGaussianKernel(kernel_size, σ) computes them.

  σ: Python float -> (K,) numpy float32 (computed in float64, like OpenCV); (N,) array -> (N, K)
  jnp float32. σ ≤ 0 gives the identity kernel (OpenCV would instead derive σ from the size);
  that makes "σ_0 = no blur" expressible in a per-sample batch.
  """
  k = _check_odd(kernel_size, "kernel_size")
  if isinstance(sigma, (int, float, np.floating)):
    x = np.arange(k, dtype=np.float64) - (k - 1) / 2
    s = max(float(sigma), 1e-6)
    w = np.exp(-(x * x) / (2 * s * s))
    return (w / w.sum()).astype(np.float32)
  x = jnp.arange(k, dtype=jnp.float32) - (k - 1) / 2
  s = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-6)[..., None]
  w = jnp.exp(-(x * x) / (2 * s * s))
  return w / jnp.sum(w, axis=-1, keepdims=True)


def _as_sigma(sigma, n: int):
  """A Python float stays one; anything else becomes a float32 (N,) or (N, 2) array."""
  if isinstance(sigma, (int, float, np.floating)):
    return float(sigma)
  sigma = jnp.asarray(sigma, jnp.float32)
  if sigma.ndim == 0:
    return jnp.broadcast_to(sigma, (n,))
  if sigma.shape in ((n,), (n, 2)):
    return sigma
  raise ValueError(f"gaussian_blur: sigma must be a scalar, shape ({n},) or ({n}, 2) (σ_y, σ_x), "
                   f"got {sigma.shape}")


def gaussian_blur(images, sigma=1.1, *, kernel_size: int | None = None, impl: str = "separable"):
  """Separable Gaussian blur with reflect-101 borders (cv2.GaussianBlur with BORDER_DEFAULT).

  sigma: a Python float; a per-sample (N,) array; or per-sample, per-axis (N, 2) = (σ_y, σ_x)
  (cv2.GaussianBlur's sigmaY, sigmaX): the Gaussian is separable, so a different σ per axis is
  exact. Any array may be traced. kernel_size: static odd int, the same for both axes; defaults to
  `gaussian_kernel_size(max σ)` for a Python float or a concrete array; required when σ is traced
  (pass the size for the largest σ it can take). A σ whose ±3σ exceeds the kernel is truncated to
  it and renormalised, as cv2.GaussianBlur does with an explicit ksize.
  impl: 'separable' (default, hand-written) or 'dm_pix' (`dm_pix.gaussian_blur` after reflect
  padding, padding='VALID', vmapped over a per-sample σ; one σ for both axes only).
  """
  images = _as_float_images(images)
  if kernel_size is None:
    if isinstance(sigma, jax.core.Tracer):
      raise ValueError("gaussian_blur: kernel_size must be given when sigma is a traced array")
    kernel_size = gaussian_kernel_size(float(np.max(np.asarray(sigma))))
  k = _check_odd(kernel_size, "kernel_size")
  sigma = _as_sigma(sigma, images.shape[0])
  per_axis = not isinstance(sigma, float) and sigma.ndim == 2
  if impl == "dm_pix":
    if per_axis:
      raise ValueError("gaussian_blur(impl='dm_pix'): dm_pix.gaussian_blur takes one σ for both "
                       "axes; use impl='separable' for per-axis σ")
    return _gaussian_blur_dm_pix(images, sigma, k)
  if impl != "separable":
    raise ValueError(f"gaussian_blur: impl={impl!r}, expected 'separable' or 'dm_pix'")
  if per_axis:
    wy, wx = gaussian_kernel_1d(sigma[:, 0], k), gaussian_kernel_1d(sigma[:, 1], k)
  else:
    wy = wx = gaussian_kernel_1d(sigma, k)
  return _correlate_1d(_correlate_1d(images, wy, axis=1), wx, axis=2)


def _gaussian_blur_dm_pix(images, sigma, k: int):
  r = k // 2
  padded = _reflect_pad(images, r, r)
  # dm-pix divides by σ²: a tiny floor makes σ = 0 the identity, as gaussian_kernel_1d does.
  blur_one = lambda im, s: dm_pix.gaussian_blur(im, jnp.maximum(s, 1e-6), k, padding="VALID")  # noqa: E731
  # 'highest': lax.conv would otherwise round float32 through TF32 on recent GPUs.
  with jax.default_matmul_precision("highest"):
    if isinstance(sigma, float):
      return dm_pix.gaussian_blur(padded, max(sigma, 1e-6), k, padding="VALID")
    return jax.vmap(blur_one)(padded, sigma)


def per_axis_sigma(sigma, zoom):
  """σ in stored pixels → per-axis σ in model pixels: σ·zoom, (N, 2) = (σ_y, σ_x).

  sigma: a float or a per-sample (N,) array (may be traced); zoom: (N, 2) model pixels per stored
  pixel along (H, W) of each sample's crop (`mae_jax.data.pipeline` passes it as `zoom`).
  Blurring the stored image with G_σ and then resampling it by zoom is, up to the resampling's own
  interpolation, blurring the resampled image with G_{σ·zoom} per axis.
  """
  zoom = jnp.asarray(zoom, jnp.float32)
  s = jnp.asarray(sigma, jnp.float32)
  return (s[:, None] if s.ndim == 1 else s) * zoom


# ----------------------------------------------------------------------------------------------
# Mean, median


def mean_blur(images, size: int = 5):
  """Box filter (cv2.blur with BORDER_DEFAULT), separable, reflect-101 borders."""
  images = _as_float_images(images)
  k = _check_odd(size, "size")
  weights = np.full((k,), 1.0 / k, np.float32)
  return _correlate_1d(_correlate_1d(images, weights, axis=1), weights, axis=2)


def median_blur(images, size: int = 5):
  """Exact median over the size × size window, reflect-101 borders.

  Border choice: reflect-101, like every other filter here (== scipy.ndimage.median_filter with
  mode='mirror'). OpenCV's medianBlur replicates the edge pixel instead (for ksize 5 its 8-bit path
  uses BORDER_REPLICATE), so results differ from cv2 on the outer size//2 rows and columns only.
  The median is computed by sorting the size² shifted copies; that holds size² copies of the
  batch in memory (25× at size 5), fine for the ablation this serves.
  """
  images = _as_float_images(images)
  k = _check_odd(size, "size")
  r = k // 2
  _, h, w, _ = images.shape
  padded = _reflect_pad(images, r, r)
  stack = jnp.stack([padded[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], axis=-1)
  return jnp.sort(stack, axis=-1)[..., (k * k) // 2]


# ----------------------------------------------------------------------------------------------
# Motion, defocus


def motion_kernel(angle, length: int = 5):
  """Line kernel(s) of `length` pixels through the centre at `angle` radians.

  angle: scalar or (N,) array (counter-clockwise from the +x axis as the image is displayed, y
  down); returns (length, length) or (N, length, length) float32 summing to 1.
  Each cell weighs (1 − its distance to the line)₊, times a factor tapering from 1 to 0 between
  along-line offsets r and r + 1 (r = (length − 1) / 2), so at 0 / 90 degrees the kernel is exactly
  the horizontal / vertical box of `length`, and at any angle the support lies within one pixel
  of the line through the centre and is symmetric about the centre (blur without shift).
  """
  k = _check_odd(length, "length")
  r = (k - 1) / 2
  offs = jnp.arange(k, dtype=jnp.float32) - r
  dy, dx = offs[:, None], offs[None, :]
  a = jnp.asarray(angle, jnp.float32)[..., None, None]
  cos, sin = jnp.cos(a), jnp.sin(a)
  along = dx * cos - dy * sin
  across = jnp.abs(dx * sin + dy * cos)
  w = jnp.maximum(1.0 - across, 0.0) * jnp.clip(r + 1.0 - jnp.abs(along), 0.0, 1.0)
  return w / jnp.sum(w, axis=(-2, -1), keepdims=True)


def motion_blur(key, images, length: int = 5, *, angle=None):
  """Motion blur along a random direction per sample (angle ~ U[0, π); a line is symmetric).

  angle: optional (N,) radians to fix the directions (tests, figures); otherwise drawn from key.
  """
  images = _as_float_images(images)
  n = images.shape[0]
  if angle is None:
    if key is None:
      raise ValueError("motion_blur needs a PRNG key (or explicit angles)")
    angle = jax.random.uniform(key, (n,), jnp.float32, 0.0, math.pi)
  angle = jnp.broadcast_to(jnp.asarray(angle, jnp.float32), (n,))
  return _correlate_2d(images, motion_kernel(angle, length))


def defocus_kernel(radius: int = 5) -> np.ndarray:
  """Normalised disk: the cells with dx² + dy² ≤ radius², in a (2r+1)² grid."""
  if not isinstance(radius, (int, np.integer)) or radius < 0:
    raise ValueError(f"radius must be a non-negative Python int, got {radius!r}")
  offs = np.arange(-radius, radius + 1)
  disk = (offs[:, None] ** 2 + offs[None, :] ** 2 <= radius ** 2).astype(np.float64)
  return (disk / disk.sum()).astype(np.float32)


def defocus_blur(images, radius: int = 5):
  """Defocus (disk) blur of the given radius, reflect-101 borders."""
  images = _as_float_images(images)
  return _correlate_2d(images, defocus_kernel(radius))


# ----------------------------------------------------------------------------------------------
# Kernels in stored pixels (`corrupt.kernel_units='native'`)
#
# DeblurringMIM blurs the stored image before RandomResizedCrop, so a "mean 5×5" spans 5 stored
# pixels, 5·zoom model pixels along each axis of a crop resized by zoom. Each kernel below is the
# stored-pixel kernel seen through that resize: its geometry evaluated at model-pixel offsets divided
# by the per-sample, per-axis zoom, on a static support `support` (odd, large enough for the largest
# zoom); at zoom 1 each equals its model-pixel counterpart above exactly.


def native_support(extent: float, zoom_bound: float) -> int:
  """Odd static kernel width for a kernel of `extent` stored pixels at zoom up to `zoom_bound`."""
  return 2 * int(math.ceil((extent * max(zoom_bound, 1.0) + 1) / 2)) + 1


def _offsets(support: int):
  return jnp.arange(support, dtype=jnp.float32) - support // 2


def native_mean_blur(images, size: int, zoom, support: int):
  """Box of `size` stored pixels: per axis, each model pixel weighs the fraction of it inside
  [−size·zoom/2, size·zoom/2] (so zoom 1 is the size-tap box), normalised; separable."""
  images = _as_float_images(images)
  k, z = _check_odd(size, "size"), jnp.asarray(zoom, jnp.float32)
  d = jnp.abs(_offsets(_check_odd(support, "support")))
  w = jnp.clip(k * z[:, :, None] / 2 + 0.5 - d, 0.0, 1.0)  # (N, 2, K)
  w = w / jnp.sum(w, axis=-1, keepdims=True)
  return _correlate_1d(_correlate_1d(images, w[:, 0], axis=1), w[:, 1], axis=2)


def native_median_blur(images, size: int, zoom, support: int):
  """Median over a window of round(size·zoom) model pixels per axis (odd), per sample."""
  images = _as_float_images(images)
  k, big = _check_odd(size, "size"), _check_odd(support, "support")
  z = jnp.asarray(zoom, jnp.float32)
  half = jnp.clip(jnp.round((k * z - 1) / 2), 0, big // 2)  # (N, 2) window half-widths
  r = big // 2
  _, h, w, _ = images.shape
  padded = _reflect_pad(images, r, r)
  stack, valid = [], []
  for i in range(big):
    for j in range(big):
      stack.append(padded[:, i:i + h, j:j + w, :])
      valid.append((abs(i - r) <= half[:, 0]) & (abs(j - r) <= half[:, 1]))
  stack = jnp.stack(stack, axis=-1)
  valid = jnp.stack(valid, axis=-1)[:, None, None, None, :]  # (N, 1, 1, 1, K²)
  ordered = jnp.sort(jnp.where(valid, stack, jnp.inf), axis=-1)
  count = ((2 * half[:, 0] + 1) * (2 * half[:, 1] + 1)).astype(jnp.int32)
  idx = ((count - 1) // 2)[:, None, None, None, None]
  return jnp.take_along_axis(ordered, jnp.broadcast_to(idx, ordered.shape[:-1] + (1,)), axis=-1)[..., 0]


def _stored_offsets(support: int, zoom):
  offs = _offsets(support)
  z = jnp.asarray(zoom, jnp.float32)
  return offs[None, :, None] / z[:, 0, None, None], offs[None, None, :] / z[:, 1, None, None]


def native_defocus_blur(images, radius: int, zoom, support: int):
  """Disk of `radius` stored pixels: model cells with (dy/zoom_y)² + (dx/zoom_x)² ≤ radius²."""
  images = _as_float_images(images)
  dy, dx = _stored_offsets(_check_odd(support, "support"), zoom)
  disk = (dy * dy + dx * dx <= float(radius) ** 2 + 1e-6).astype(jnp.float32)
  return _correlate_2d(images, disk / jnp.sum(disk, axis=(-2, -1), keepdims=True))


def native_motion_blur(key, images, length: int, zoom, support: int, *, angle=None):
  """`motion_kernel`'s line (length and width in stored pixels) at model-pixel offsets / zoom."""
  images = _as_float_images(images)
  n, k = images.shape[0], _check_odd(length, "length")
  if angle is None:
    if key is None:
      raise ValueError("motion_blur needs a PRNG key (or explicit angles)")
    angle = jax.random.uniform(key, (n,), jnp.float32, 0.0, math.pi)
  a = jnp.broadcast_to(jnp.asarray(angle, jnp.float32), (n,))[:, None, None]
  dy, dx = _stored_offsets(_check_odd(support, "support"), zoom)
  along = dx * jnp.cos(a) - dy * jnp.sin(a)
  across = jnp.abs(dx * jnp.sin(a) + dy * jnp.cos(a))
  wgt = jnp.maximum(1.0 - across, 0.0) * jnp.clip((k - 1) / 2 + 1.0 - jnp.abs(along), 0.0, 1.0)
  # within the length × length stored-pixel grid `motion_kernel` is drawn on
  inside = (jnp.abs(dy) <= (k - 1) / 2 + 1e-6) & (jnp.abs(dx) <= (k - 1) / 2 + 1e-6)
  wgt = jnp.where(inside, wgt, 0.0)
  return _correlate_2d(images, wgt / jnp.sum(wgt, axis=(-2, -1), keepdims=True))


NATIVE = ("mean", "median", "motion", "defocus")


def apply_blur_native(method: str, key, images, zoom, zoom_bound: float, **params):
  """A blur of `NATIVE` with its size parameter in stored pixels (zoom: (N, 2) model pixels per
  stored pixel; zoom_bound: the largest zoom, sizing the static support)."""
  if method == "mean":
    return native_mean_blur(images, params["size"], zoom, native_support(params["size"], zoom_bound))
  if method == "median":
    return native_median_blur(images, params["size"], zoom, native_support(params["size"], zoom_bound))
  if method == "motion":
    return native_motion_blur(key, images, params["length"], zoom,
                              native_support(params["length"], zoom_bound), angle=params.get("angle"))
  if method == "defocus":
    return native_defocus_blur(images, params["radius"], zoom,
                               native_support(2 * params["radius"] + 1, zoom_bound))
  raise ValueError(f"blur {method!r} has no stored-pixel kernel; expected one of {NATIVE}")


# ----------------------------------------------------------------------------------------------
# Registry: configs name a blur by string; every entry has the signature (key, images, **params).


def _gaussian(key, images, sigma=1.1, kernel_size=None):
  del key
  return gaussian_blur(images, sigma, kernel_size=kernel_size)


def _srad_entry(key, images, iterations=_srad.DEFAULT_ITERATIONS, dt=_srad.DEFAULT_DT):
  del key
  return _srad.srad(images, iterations=iterations, dt=dt)


def _mean(key, images, size=5):
  del key
  return mean_blur(images, size)


def _median(key, images, size=5):
  del key
  return median_blur(images, size)


def _motion(key, images, length=5, angle=None):
  return motion_blur(key, images, length, angle=angle)


def _defocus(key, images, radius=5):
  del key
  return defocus_blur(images, radius)


def _none(key, images):
  del key
  return _as_float_images(images)


BLURS: dict[str, Callable] = {
    "gaussian": _gaussian,
    "srad": _srad_entry,
    "mean": _mean,
    "median": _median,
    "motion": _motion,
    "defocus": _defocus,
    "none": _none,  # vanilla MAE through the same code path
}


def apply_blur(method: str, key, images, **params):
  """Blur `images` with the registered `method` (see BLURS) and its keyword parameters."""
  try:
    fn = BLURS[method]
  except KeyError:
    raise ValueError(f"unknown blur method {method!r}; expected one of {sorted(BLURS)}") from None
  try:
    inspect.signature(fn).bind(key, images, **params)
  except TypeError as e:
    raise ValueError(f"bad parameters {sorted(params)} for blur method {method!r}: {e}") from None
  return fn(key, images, **params)
