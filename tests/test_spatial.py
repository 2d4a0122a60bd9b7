"""USFM spatial mean masking: mean fill, untouched elsewhere, exact unit counts."""

import jax
import numpy as np
import pytest

from mae_jax.corrupt.spatial import spatial_mean_mask


@pytest.mark.parametrize("channels,size,unit,ratio,expected", [
    (1, 32, 8, 0.4, 16 - int(16 * 0.6)),  # 7 of 16
    (3, 32, 16, 0.4, 2),                  # 4 units: 4 − int(2.4) = 2
    (1, 224, 32, 0.4, 20),                # USFM: 20 of 49 (= ceil(49 · 0.4), SimMIM's count)
    (3, 48, 16, 0.75, 7),                 # ceil(6.75)
    (1, 80, 8, 0.07, 8),                  # ceil(100 · 0.07) = ceil(7.000000000000001), as USFM's code
])
def test_spatial_mean_mask(channels, size, unit, ratio, expected):
  n = 3
  rng = np.random.default_rng(channels + size)
  x = rng.random((n, size, size, channels), dtype=np.float32)
  y, unit_mask, pixel_mask = jax.jit(
      lambda k, a: spatial_mean_mask(k, a, mask_ratio=ratio, unit=unit))(jax.random.key(0), x)
  y, unit_mask, pixel_mask = map(np.asarray, (y, unit_mask, pixel_mask))
  g = size // unit
  assert y.shape == x.shape and y.dtype == np.float32
  assert unit_mask.shape == (n, g * g) and pixel_mask.shape == (n, size, size, 1)
  np.testing.assert_array_equal(unit_mask.sum(axis=1), expected)
  mean = x.mean(axis=(1, 2))  # per image, per channel, whole image
  for i in range(n):
    for u in range(g * g):
      r, c = divmod(u, g)  # units row-major
      sl = (i, slice(r * unit, (r + 1) * unit), slice(c * unit, (c + 1) * unit))
      np.testing.assert_array_equal(pixel_mask[sl], unit_mask[i, u])
      if unit_mask[i, u]:
        np.testing.assert_allclose(y[sl], np.broadcast_to(mean[i], y[sl].shape), atol=1e-6)
      else:
        np.testing.assert_array_equal(y[sl], x[sl])
  # different samples get different choices
  assert len({tuple(m) for m in unit_mask}) > 1


def test_spatial_mask_follows_noise_argsort():
  x = np.random.default_rng(0).random((1, 32, 32, 1), dtype=np.float32)
  noise = np.array([[0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.05, 0.95, 0.15, 0.25, 0.35,
                     0.45, 0.55]], np.float32)
  _, unit_mask, _ = spatial_mean_mask(None, x, mask_ratio=0.4, unit=8, noise=noise)
  # ceil(16 · 0.4) = 7 largest noise values masked
  expected = np.zeros(16)
  expected[np.argsort(noise[0])[9:]] = 1
  np.testing.assert_array_equal(np.asarray(unit_mask)[0], expected)


def test_spatial_mask_rejects_bad_unit():
  x = np.zeros((1, 30, 30, 1), np.float32)
  with pytest.raises(ValueError, match="unit"):
    spatial_mean_mask(jax.random.key(0), x, unit=8)


def _blockwise_mean_reference(img_chw, mask_idx, input_size, mask_patch_size):
  """USFM's BlockwiseMaskGenerator(mask_color='mean') from its description: a grid of
  mask_patch_size blocks, the listed blocks set to 1, upsampled to pixels, and every masked pixel of
  channel c set to channel c's mean over the whole image."""
  g = input_size // mask_patch_size
  grid = np.zeros(g * g, int)
  grid[mask_idx] = 1
  pix = np.kron(grid.reshape(g, g), np.ones((mask_patch_size, mask_patch_size), int))
  out = img_chw.copy()
  for c in range(out.shape[0]):
    out[c][pix == 1] = img_chw[c].mean()
  return out, pix


@pytest.mark.parametrize("size,unit,ratio,channels", [(64, 16, 0.4, 3), (96, 32, 0.4, 1),
                                                      (80, 8, 0.07, 1)])
def test_matches_usfm_blockwise_mask_generator(size, unit, ratio, channels):
  n, g2 = 2, (size // unit) ** 2
  rng = np.random.default_rng(size)
  x = rng.random((n, size, size, channels), dtype=np.float32)
  noise = rng.random((n, g2)).astype(np.float32)
  y, unit_mask, pixel_mask = spatial_mean_mask(None, x, mask_ratio=ratio, unit=unit, noise=noise)
  count = int(np.ceil(g2 * ratio))  # the generator's mask_count
  for i in range(n):
    mask_idx = np.argsort(-noise[i])[:count]  # a permutation's first `count` entries
    ref, pix = _blockwise_mean_reference(x[i].transpose(2, 0, 1), mask_idx, size, unit)
    np.testing.assert_array_equal(np.asarray(pixel_mask)[i, ..., 0], pix)
    np.testing.assert_allclose(np.asarray(y)[i], ref.transpose(1, 2, 0), atol=1e-6)
