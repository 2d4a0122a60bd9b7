"""USFM frequency band-stop masking (USFM §3.2.2, Eq. 7) and spatial-frequency dual masking (Eq. 8),
built as the authors' `Frequency_MASK` builds it (openmedlab/USFM `usdsgen/data/transforms.py`).

The construction, in fftshifted coordinates (DC at (H//2, W//2)), distances in bins:
- radii R_0 = CenterProtect, R_1 = BaseBW, then R_{k+1} = R_k + min(int(R_k · IncreaseFactor),
  MaxIncrease); a radius is used while R_k ≤ N/2 (the authors' `start_x >= 0`), so the spectrum's
  corners, and everything beyond the last radius, are never masked;
- ring k is the difference of the nested disks of radii R_k and R_{k+1}: R_k < d ≤ R_{k+1}. The
  disk d ≤ CenterProtect is never masked (the preserved low frequencies);
- per sample, int(Ratio · number_of_rings) distinct rings, every subset equally likely, are zeroed;
  the image comes back as abs(ifft2(...)), not its real part.
The radii are in bins whatever the image size, as in the authors' code (it takes `image_size` and
nothing rescales them): at 32 px the same fields give fewer rings than at 224.

The released configs do not give the five values; `DEFAULT` is the project's reading of USFM §4.2
(docs/methods.md#usfm): "a region of 10×10 in the center" → CenterProtect 5 (a disk of diameter 10),
"7 band-stop filters ... bandwidth gradually increases" → BaseBW 8, IncreaseFactor 0.5,
MaxIncrease 32: radii 5 | 8 | 12 | 18 | 27 | 40 | 60 | 90 at 224 (widths 3, 4, 6, 9, 13, 20, 30;
the next radius, 122, passes 112), and "2 of these 7" → Ratio 0.3 (int(0.3 · 7) = 2).

Membership is decided in integer arithmetic (d ≤ R ⇔ dy² + dx² ≤ R², R a whole number of bins in
the authors' construction), so a bin on an edge never flips with rounding. Disks are point-symmetric
about DC, so the filtered spectrum stays Hermitian up to the Nyquist row/column; DC is kept.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.corrupt.spatial import spatial_mean_mask


class FrequencyParams(NamedTuple):
  """`Frequency_MASK`'s FMASK_config fields (CenterProtect, BaseBW, IncreaseFactor, MaxIncrease,
  Ratio); config fields corrupt.freq_center_protect, freq_base_bw, freq_increase_factor,
  freq_max_increase, freq_ratio."""
  center_protect: int = 5
  base_bw: int = 8
  increase_factor: float = 0.5
  max_increase: int = 32
  ratio: float = 0.3


DEFAULT = FrequencyParams()
CONFIG_FIELDS = ("freq_center_protect", "freq_base_bw", "freq_increase_factor", "freq_max_increase",
                 "freq_ratio")


def params_from_config(ccfg) -> FrequencyParams:
  """The corrupt config's five fields (a config saved before they existed reads the defaults)."""
  return FrequencyParams(*(type(d)(ccfg.get(f, d)) for f, d in zip(CONFIG_FIELDS, DEFAULT)))


def check_params(p: FrequencyParams) -> None:
  """ValueError naming the config field when the construction would not give nested rings or would
  never stop (the authors' loop runs forever when a radius stops growing)."""
  if not (isinstance(p.center_protect, (int, np.integer)) and p.center_protect >= 0):
    raise ValueError(f"corrupt.freq_center_protect={p.center_protect!r}: must be an int >= 0")
  if not (isinstance(p.base_bw, (int, np.integer)) and p.base_bw > p.center_protect):
    raise ValueError(f"corrupt.freq_base_bw={p.base_bw!r}: must be an int above "
                     f"freq_center_protect={p.center_protect} (else the first two disks do not nest)")
  if int(p.base_bw * p.increase_factor) < 1:
    raise ValueError(f"corrupt.freq_increase_factor={p.increase_factor!r}: int(freq_base_bw · factor) "
                     f"must be >= 1, else the radii stop growing")
  if p.max_increase < 1:
    raise ValueError(f"corrupt.freq_max_increase={p.max_increase!r}: must be >= 1, else the radii "
                     f"stop growing")
  if not 0.0 <= p.ratio <= 1.0:
    raise ValueError(f"corrupt.freq_ratio={p.ratio!r}: must lie in [0, 1]")


def radii(h: int, w: int, p: FrequencyParams = DEFAULT) -> tuple[int, ...]:
  """The disk radii R_0 < R_1 < ... (bins) used at an H×W image; ring k is R_k < d ≤ R_{k+1}."""
  check_params(p)
  half = min(int(h / 2), int(w / 2))
  out, r, bw = [], int(p.center_protect), int(p.base_bw)
  while r <= half:
    out.append(r)
    r, bw = bw, bw + min(int(bw * p.increase_factor), int(p.max_increase))
  return tuple(out)


def num_rings(h: int, w: int, p: FrequencyParams = DEFAULT) -> int:
  return max(len(radii(h, w, p)) - 1, 0)


def num_dropped(h: int, w: int, p: FrequencyParams = DEFAULT) -> int:
  """int(Ratio · number of rings), as `Frequency_MASK.num_mask`."""
  return int(p.ratio * num_rings(h, w, p))


@functools.lru_cache(maxsize=32)
def ring_masks(h: int, w: int, p: FrequencyParams = DEFAULT) -> np.ndarray:
  """(K, H, W) bool, in fftshifted coordinates: ring k is R_k < d ≤ R_{k+1}. Pairwise disjoint."""
  dy = np.arange(h, dtype=np.int64)[:, None] - h // 2
  dx = np.arange(w, dtype=np.int64)[None, :] - w // 2
  d2 = dy * dy + dx * dx
  r = radii(h, w, p)
  rings = np.stack([(d2 > a * a) & (d2 <= b * b) for a, b in zip(r[:-1], r[1:])]) if len(r) > 1 \
      else np.zeros((0, h, w), bool)
  rings.setflags(write=False)
  return rings


def choose_rings(key, batch: int, num_rings_total: int, num_rings_dropped: int, noise=None):
  """(N, K) float32, 1 on the rings to zero: `num_rings_dropped` distinct rings per sample, every
  subset equally likely (the smallest entries of i.i.d. uniform noise)."""
  if not 0 <= num_rings_dropped <= num_rings_total:
    raise ValueError(f"rings dropped must lie in [0, {num_rings_total}], got {num_rings_dropped!r}")
  if noise is None:
    noise = jax.random.uniform(key, (batch, num_rings_total), jnp.float32)
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return (ranks < num_rings_dropped).astype(jnp.float32)


def band_stop_mask(key, batch: int, h: int, w: int, p: FrequencyParams = DEFAULT, *, noise=None):
  """(N, H, W) float32 0/1 spectrum mask in fftshifted coordinates (0 = frequency removed)."""
  rings = ring_masks(int(h), int(w), p)
  k = rings.shape[0]
  if k == 0:
    return jnp.ones((batch, h, w), jnp.float32)
  drop = choose_rings(key, batch, k, num_dropped(h, w, p), noise)
  # Rings are disjoint, so the sum of the dropped ones is itself 0/1 (the authors' product of
  # 0/1 ring masks); elementwise, no matmul.
  removed = jnp.sum(drop[:, :, None, None] * jnp.asarray(rings, jnp.float32)[None], axis=1)
  return 1.0 - removed


def apply_spectrum_mask(images, mask):
  """Filter NHWC images with an (N, H, W) mask given in fftshifted coordinates; abs(ifft2), as
  `Frequency_MASK.forward`. Done by ifftshifting the mask instead of shifting the spectrum twice
  (the shifts are permutations: the same result with less data moved)."""
  x = jnp.asarray(images).astype(jnp.float32)
  m = jnp.fft.ifftshift(mask.astype(jnp.float32), axes=(1, 2))[..., None]
  spec = jnp.fft.fft2(x, axes=(1, 2))
  return jnp.abs(jnp.fft.ifft2(spec * m, axes=(1, 2))).astype(jnp.float32)


def frequency_mask(key, images, *, params: FrequencyParams = DEFAULT, mask=None):
  """USFM band-stop masking of NHWC images; the same mask for every channel of a sample.

  mask: optional (N, H, W) spectrum mask (fftshifted) to use instead of drawing one from key.
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
  n, h, w, _ = images.shape
  if mask is None:
    mask = band_stop_mask(key, n, h, w, params)
  return apply_spectrum_mask(images, mask)


def dual_mask(key, images, *, spatial_ratio: float = 0.4, unit: int = 32,
              use_frequency: bool = True, params: FrequencyParams = DEFAULT,
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
    base = frequency_mask(k_freq, images, params=params, mask=spectrum_mask)
  mean = jnp.mean(images, axis=(1, 2), keepdims=True)
  return jnp.where(pixel_mask > 0, mean, base), pixel_mask
