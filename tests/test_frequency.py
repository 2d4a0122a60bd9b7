"""USFM band-stop masking and the spatial-frequency dual mask (Eq. 8)."""

import itertools

import jax
import numpy as np
import pytest

from mae_jax.corrupt import frequency as fq

# The paper's radii at 224 px, restated here rather than imported.
EDGES_224 = [5, 10, 15, 22, 33, 49, 73, 109]


def _reference_rings(size):
  """Rings from a float64 distance map with radii scaled by size / 224 (square images)."""
  c = size // 2
  yy, xx = np.mgrid[0:size, 0:size]
  dist = np.hypot(yy - c, xx - c)
  r = np.array(EDGES_224) * size / 224
  centre = dist <= r[0] + 1e-9
  rings = np.stack([(dist > r[k] + 1e-9) & (dist <= r[k + 1] + 1e-9) for k in range(7)])
  return centre, rings


def test_ring_radii_scale_with_size():
  assert fq.ring_radii(224) == tuple(zip(EDGES_224[:-1], EDGES_224[1:]))
  np.testing.assert_allclose(fq.ring_radii(112), np.array(list(zip(EDGES_224[:-1],
                                                                   EDGES_224[1:]))) / 2)
  assert fq.centre_radius(224) == 5 and fq.centre_radius(448) == 10


@pytest.mark.parametrize("size", [32, 64, 224])
def test_ring_masks_match_distance_map(size):
  centre, rings = fq.ring_masks(size, size)
  ref_centre, ref_rings = _reference_rings(size)
  np.testing.assert_array_equal(centre, ref_centre)
  np.testing.assert_array_equal(rings, ref_rings)
  assert all(r.any() for r in rings)  # every ring holds bins even at 32 px
  assert not (rings.sum(0) > 1).any() and not (rings.any(0) & centre).any()  # disjoint
  assert centre[size // 2, size // 2]  # DC protected


@pytest.mark.parametrize("size", [32, 64])
def test_band_stop_mask_drops_exactly_two_rings(size):
  n = 16
  m = np.asarray(jax.jit(lambda k: fq.band_stop_mask(k, n, size, size))(jax.random.key(0)))
  centre, rings = _reference_rings(size)
  assert m.shape == (n, size, size) and m.dtype == np.float32
  assert set(np.unique(m)) <= {0.0, 1.0}
  for i in range(n):
    assert (m[i][centre] == 1).all()  # protected centre untouched
    zero_rings = [k for k in range(7) if (m[i][rings[k]] == 0).all()]
    assert len(zero_rings) == 2
    for k in set(range(7)) - set(zero_rings):
      assert (m[i][rings[k]] == 1).all()
    assert (m[i][~rings.any(0)] == 1).all()  # outside all rings: kept
  assert len({tuple(m[i].ravel()) for i in range(n)}) > 1


def test_rings_are_chosen_uniformly():
  n = 21000
  drop = np.asarray(fq.choose_rings(jax.random.key(1), n, 2))
  assert (drop.sum(1) == 2).all()
  # each ring: p = 2/7, sd of the count ≈ 65; each of the 21 pairs: p = 1/21, sd ≈ 31
  np.testing.assert_allclose(drop.sum(0), n * 2 / 7, atol=5 * 65)
  pairs = {p: 0 for p in itertools.combinations(range(7), 2)}
  for row in drop:
    pairs[tuple(np.flatnonzero(row))] += 1
  np.testing.assert_allclose(list(pairs.values()), n / 21, atol=5 * 31)


@pytest.mark.parametrize("channels", [1, 3])
def test_frequency_mask_matches_numpy_and_keeps_mean(channels):
  n, size = 4, 32
  x = np.random.default_rng(channels).random((n, size, size, channels), dtype=np.float32)
  key = jax.random.key(2)
  y = np.asarray(jax.jit(fq.frequency_mask)(key, x))
  mask = np.asarray(fq.band_stop_mask(key, n, size, size))
  # reference: fftshift → multiply → ifftshift → ifft2, float64, per channel
  spec = np.fft.fftshift(np.fft.fft2(x.astype(np.float64), axes=(1, 2)), axes=(1, 2))
  back = np.fft.ifft2(np.fft.ifftshift(spec * mask[..., None], axes=(1, 2)), axes=(1, 2))
  assert np.abs(back.imag).max() < 1e-12  # the masked spectrum stays Hermitian: result is real
  assert y.shape == x.shape and y.dtype == np.float32
  np.testing.assert_allclose(y, back.real, atol=1e-5)
  np.testing.assert_allclose(y.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-6)  # DC kept
  assert np.abs(y - x).max() > 1e-2  # it did filter
  # x − y has no spectrum outside the two dropped rings
  removed = np.fft.fft2(x - y, axes=(1, 2))
  assert np.abs(np.fft.fftshift(removed, axes=(1, 2)) * mask[..., None]).max() < 1e-3


def test_frequency_mask_non_square_and_zero_rings():
  x = np.random.default_rng(0).random((2, 32, 48, 1), dtype=np.float32)
  y = np.asarray(fq.frequency_mask(jax.random.key(0), x))
  np.testing.assert_allclose(y.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-6)
  np.testing.assert_allclose(np.asarray(fq.frequency_mask(jax.random.key(0), x,
                                                          num_rings_dropped=0)), x, atol=1e-6)


@pytest.mark.parametrize("use_frequency", [True, False])
def test_dual_mask_composition(use_frequency):
  n, size, unit = 3, 32, 8
  x = np.random.default_rng(4).random((n, size, size, 1), dtype=np.float32)
  noise = np.random.default_rng(5).random((n, 16)).astype(np.float32)
  spec_mask = fq.band_stop_mask(jax.random.key(6), n, size, size)
  y, pm = jax.jit(lambda k, a: fq.dual_mask(k, a, spatial_ratio=0.4, unit=unit,
                                            use_frequency=use_frequency, spatial_noise=noise,
                                            spectrum_mask=spec_mask))(jax.random.key(7), x)
  y, pm = np.asarray(y), np.asarray(pm)
  assert pm.shape == (n, size, size, 1)
  np.testing.assert_array_equal(pm.reshape(n, -1).sum(1), 7 * unit * unit)  # 16 − int(9.6)
  base = np.asarray(fq.frequency_mask(None, x, mask=spec_mask)) if use_frequency else x
  mean = x.mean(axis=(1, 2), keepdims=True)  # the ORIGINAL image's mean (Eq. 2)
  expected = np.where(pm > 0, mean, base)
  np.testing.assert_allclose(y, expected, atol=1e-6)


def test_dual_mask_from_key_only():
  x = np.random.default_rng(8).random((2, 64, 64, 3), dtype=np.float32)
  y, pm = fq.dual_mask(jax.random.key(0), x, spatial_ratio=0.4, unit=16)
  assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()
  np.testing.assert_array_equal(np.asarray(pm).reshape(2, -1).sum(1), 7 * 256)  # 16 − int(9.6)
