"""USFM frequency band-stop masking (USFM §3.2.2, Eq. 7) and spatial-frequency dual masking (Eq. 8).

Spectrum layout: FFT2 over H and W in float32 (`jnp.fft` rejects bf16), fftshifted so that DC sits
at index (H//2, W//2). Around it a protected disk of radius 5 bins (the paper's "10 × 10 centre",
which keeps DC and the lowest frequencies); then 7 band-stop rings, at 224 px
(5,10], (10,15], (15,22], (22,33], (33,49], (49,73], (73,109] bins. Bins beyond 109 (the corners)
belong to no ring and are always kept. Per sample, 2 of the 7 rings, chosen uniformly without
replacement, are zeroed; then ifftshift, ifft2 and the real part (not abs). The rings are
point-symmetric about DC, so the filtered spectrum stays Hermitian and the imaginary part is
rounding noise; DC is kept, so each image's mean is unchanged. Values may leave [0, 1] (ringing);
they are not clipped, which would move the mean.

Other sizes: a bin's radius is measured in 224-px units, d² = (Δy·224/H)² + (Δx·224/W)², i.e. the
radii scale with the image size (and, for non-square images, per axis). Membership is decided in
exact integer arithmetic, so a bin on a boundary never flips with floating-point rounding. At
small test sizes the inner rings shrink to a few bins (at 32 px the centre is DC alone).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.corrupt.spatial import spatial_mean_mask

REFERENCE_SIZE = 224
CENTRE_RADIUS_224 = 5
RING_EDGES_224 = (5, 10, 15, 22, 33, 49, 73, 109)  # ring k is (edges[k], edges[k+1]]
NUM_RINGS = len(RING_EDGES_224) - 1


def ring_radii(image_size: int) -> tuple[tuple[float, float], ...]:
  """The 7 rings' (inner, outer] radii in bins for a square image of side `image_size`."""
  s = image_size / REFERENCE_SIZE
  e = RING_EDGES_224
  return tuple((e[k] * s, e[k + 1] * s) for k in range(NUM_RINGS))


def centre_radius(image_size: int) -> float:
  """Radius in bins of the protected centre disk (5 at 224)."""
  return CENTRE_RADIUS_224 * image_size / REFERENCE_SIZE


@functools.lru_cache(maxsize=32)
def ring_masks(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """(centre (H, W) bool, rings (7, H, W) bool), in fftshifted coordinates."""
  dy = np.arange(h, dtype=np.int64)[:, None] - h // 2
  dx = np.arange(w, dtype=np.int64)[None, :] - w // 2
  # d² ≤ r²  ⇔  dy²·224²·W² + dx²·224²·H² ≤ r²·H²·W²  (all integers: exact)
  lhs = (dy * dy * w * w + dx * dx * h * h) * REFERENCE_SIZE ** 2
  scale = h * h * w * w

  def within(r):
    return lhs <= r * r * scale

  centre = within(CENTRE_RADIUS_224)
  e = RING_EDGES_224
  rings = np.stack([within(e[k + 1]) & ~within(e[k]) for k in range(NUM_RINGS)])
  centre.setflags(write=False)
  rings.setflags(write=False)
  return centre, rings


def choose_rings(key, batch: int, num_rings_dropped: int = 2, noise=None):
  """(N, 7) float32, 1 on the rings to zero: `num_rings_dropped` distinct rings per sample,
  every subset equally likely (the smallest entries of i.i.d. uniform noise)."""
  if not isinstance(num_rings_dropped, int) or not 0 <= num_rings_dropped <= NUM_RINGS:
    raise ValueError(f"num_rings_dropped must be an int in [0, {NUM_RINGS}], "
                     f"got {num_rings_dropped!r}")
  if noise is None:
    noise = jax.random.uniform(key, (batch, NUM_RINGS), jnp.float32)
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return (ranks < num_rings_dropped).astype(jnp.float32)


def band_stop_mask(key, batch: int, h: int, w: int, num_rings_dropped: int = 2, *, noise=None):
  """(N, H, W) float32 0/1 spectrum mask in fftshifted coordinates (0 = frequency removed)."""
  _, rings = ring_masks(int(h), int(w))
  drop = choose_rings(key, batch, num_rings_dropped, noise)
  rings = jnp.asarray(rings, jnp.float32)
  # Rings are disjoint, so the sum of the dropped ones is itself 0/1; elementwise, no matmul.
  removed = jnp.sum(drop[:, :, None, None] * rings[None], axis=1)
  return 1.0 - removed


def apply_spectrum_mask(images, mask):
  """Filter NHWC images with an (N, H, W) mask given in fftshifted coordinates.

  Equivalent to fftshift → multiply → ifftshift, done by ifftshifting the mask instead
  (the shifts are permutations, so the result is the same bit for bit, with less data moved).
  """
  x = jnp.asarray(images).astype(jnp.float32)
  m = jnp.fft.ifftshift(mask.astype(jnp.float32), axes=(1, 2))[..., None]
  spec = jnp.fft.fft2(x, axes=(1, 2))
  return jnp.real(jnp.fft.ifft2(spec * m, axes=(1, 2))).astype(jnp.float32)


def frequency_mask(key, images, *, num_rings_dropped: int = 2, mask=None):
  """USFM band-stop masking of NHWC images; the same mask for every channel of a sample.

  mask: optional (N, H, W) spectrum mask (fftshifted) to use instead of drawing one from key.
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
  n, h, w, _ = images.shape
  if mask is None:
    mask = band_stop_mask(key, n, h, w, num_rings_dropped)
  return apply_spectrum_mask(images, mask)


def dual_mask(key, images, *, spatial_ratio: float = 0.4, unit: int = 32,
              use_frequency: bool = True, num_rings_dropped: int = 2,
              spatial_noise=None, spectrum_mask=None):
  """USFM spatial-frequency dual masking, Eq. 8.

  Inside the spatially masked units: the original image's mean (Eq. 2); elsewhere: the
  band-stop-filtered image (or the image itself when use_frequency=False, USFM-woF).
  Returns (corrupted (N, H, W, C) float32, pixel_mask (N, H, W, 1) float32, 1 = mean-filled).
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
  images = images.astype(jnp.float32)
  k_spatial, k_freq = (None, None) if key is None else jax.random.split(key)
  _, _, pixel_mask = spatial_mean_mask(k_spatial, images, mask_ratio=spatial_ratio, unit=unit,
                                       noise=spatial_noise)
  base = images
  if use_frequency:
    base = frequency_mask(k_freq, images, num_rings_dropped=num_rings_dropped, mask=spectrum_mask)
  mean = jnp.mean(images, axis=(1, 2), keepdims=True)
  return jnp.where(pixel_mask > 0, mean, base), pixel_mask
