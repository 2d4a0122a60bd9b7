"""USFM frequency band-stop masking (USFM §3.2.2, Eq. 7) and spatial-frequency dual masking (Eq. 8).

Spectrum layout: FFT2 over H and W in float32 (`jnp.fft` rejects bf16), fftshifted so that DC sits
at index (H//2, W//2). USFM §4.2: "a region of 10×10 in the center of the spectrum ... is first
preserved to retain the critical direct current and low-frequency information. Besides the
preserved low-frequency region, we set 7 band-stop filters from low to high frequency. The
bandwidth of the 7 band-stop filters gradually increases". Our reading (docs/methods.md#usfm):

- centre: the square of side 10 centred on DC, |Δy|, |Δx| ≤ 5 bins at 224 px (its 11×11 bins).
  A block of 10×10 bins cannot be centred on DC, and an off-centre one would make the masked
  spectrum non-Hermitian (a bin kept while its mirror is removed); the square [−5, 5]² has side 10
  and is point-symmetric about DC.
- rings: Eq. 7's circular bands f1 < √(u² + v²) ≤ f2, from the centre's edge (5) out to the
  spectrum's corner (112·√2 ≈ 158.4 at 224), so that every bin outside the centre belongs to exactly
  one ring. Their edges are geometric, r_k = 5·q^k with q = (112√2/5)^(1/7) ≈ 1.64, rounded to whole
  bins at 224 except the corner: 5 | 8 | 13 | 22 | 36 | 59 | 97 | corner, widths 3, 5, 9, 14, 23, 38
  and 61 (along the diagonal) — increasing, as the paper asks, each ring spanning the same ratio
  of frequencies. The paper gives neither the edges nor the rule; this is the project's choice.
- per sample, 2 of the 7 rings, chosen uniformly without replacement, are zeroed; then ifftshift,
  ifft2 and the real part (not abs). The centre and rings are point-symmetric about DC, so the
  filtered spectrum stays Hermitian and the imaginary part is rounding noise; DC is kept, so each
  image's mean is unchanged. Values may leave [0, 1] (ringing); they are not clipped, which would
  move the mean.

Other sizes: distances are measured in 224-px units, d² = (Δy·224/H)² + (Δx·224/W)², and the centre
is |Δy|·224/H ≤ 5 and |Δx|·224/W ≤ 5: a ring covers the same band of cycles per pixel whatever the
image size (a 224-px image resized to 112 px has its content at half the bin index), and the last
ring still ends at the corner. Membership is decided in exact integer arithmetic, so a bin on a
boundary never flips with floating-point rounding. At small test sizes the inner rings shrink to a
few bins (at 32 px the centre is DC alone).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.corrupt.spatial import spatial_mean_mask

REFERENCE_SIZE = 224
CENTRE_HALF_224 = 5  # the preserved centre is |Δy|, |Δx| ≤ 5 bins at 224 (a square of side 10)
# Inner edges of rings 2..7 at 224 px: round(5·q^k), q = (112√2/5)^(1/7). Ring 1 starts at the centre's
# edge; ring 7 runs out to the spectrum's corner.
RING_EDGES_224 = (8, 13, 22, 36, 59, 97)
NUM_RINGS = len(RING_EDGES_224) + 1
CORNER_224 = REFERENCE_SIZE / 2 * 2 ** 0.5


def ring_radii(image_size: int) -> tuple[tuple[float, float], ...]:
  """The 7 rings' (inner, outer] radii in bins for a square image of side `image_size` (ring 1's
  inner radius is the centre's half-side, ring 7's outer radius the corner's distance from DC)."""
  s = image_size / REFERENCE_SIZE
  e = (CENTRE_HALF_224, *RING_EDGES_224, CORNER_224)
  return tuple((e[k] * s, e[k + 1] * s) for k in range(NUM_RINGS))


def centre_half_side(image_size: int) -> float:
  """Half-side in bins of the preserved centre square (5 at 224)."""
  return CENTRE_HALF_224 * image_size / REFERENCE_SIZE


@functools.lru_cache(maxsize=32)
def ring_masks(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """(centre (H, W) bool, rings (7, H, W) bool), in fftshifted coordinates. The rings are pairwise
  disjoint and together cover every bin outside the centre."""
  dy = np.arange(h, dtype=np.int64)[:, None] - h // 2
  dx = np.arange(w, dtype=np.int64)[None, :] - w // 2
  # |Δy|·224/H ≤ 5 and |Δx|·224/W ≤ 5, in integers.
  centre = ((np.abs(dy) * REFERENCE_SIZE <= CENTRE_HALF_224 * h)
            & (np.abs(dx) * REFERENCE_SIZE <= CENTRE_HALF_224 * w))
  # d ≤ r  ⇔  (dy²·W² + dx²·H²)·224² ≤ r²·H²·W²  (all integers: exact)
  lhs = (dy * dy * w * w + dx * dx * h * h) * REFERENCE_SIZE ** 2
  scale = h * h * w * w
  # Ring index of every bin: the number of inner edges it lies beyond (0..6).
  index = sum((lhs > r * r * scale).astype(np.int64) for r in RING_EDGES_224)
  rings = np.stack([(index == k) & ~centre for k in range(NUM_RINGS)])
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
