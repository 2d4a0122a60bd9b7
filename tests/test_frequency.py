"""USFM band-stop masking and the spatial-frequency dual mask (Eq. 8)."""

import itertools

import jax
import numpy as np
import pytest

from mae_jax.corrupt import frequency as fq

# USFM §4.2: a preserved 10×10 centre, then 7 rings of increasing width. Restated here from the rule
# in the module docstring (geometric edges from the centre's edge 5 to the corner 112√2, rounded to
# whole bins at 224) rather than imported.
Q = (112 * np.sqrt(2) / 5) ** (1 / 7)
EDGES_224 = [5] + [round(5 * Q**k) for k in range(1, 7)] + [112 * np.sqrt(2)]


def _reference_rings(h, w):
  """Centre square and rings from a float64 distance map in 224-px units (per-axis scaling)."""
  yy, xx = np.mgrid[0:h, 0:w]
  uy, ux = (yy - h // 2) * 224 / h, (xx - w // 2) * 224 / w
  dist = np.hypot(uy, ux)
  centre = (np.abs(uy) <= 5 + 1e-9) & (np.abs(ux) <= 5 + 1e-9)
  r = np.array(EDGES_224, dtype=np.float64)
  r[0], r[-1] = 0.0, np.inf  # ring 1 starts at the centre's edge, ring 7 ends at the corner
  rings = np.stack([(dist > r[k] + 1e-9) & (dist <= r[k + 1] + 1e-9) & ~centre for k in range(7)])
  return centre, rings


def test_ring_radii_follow_the_rule_and_widen():
  assert fq.RING_EDGES_224 == tuple(EDGES_224[1:-1]) == (8, 13, 22, 36, 59, 97)
  radii = fq.ring_radii(224)
  np.testing.assert_allclose(radii, list(zip(EDGES_224[:-1], EDGES_224[1:])), rtol=1e-12)
  assert radii[0][0] == 5 and radii[-1][1] == pytest.approx(np.hypot(112, 112))  # centre edge → corner
  widths = [o - i for i, o in radii]
  assert all(b > a for a, b in zip(widths, widths[1:])), widths  # "gradually increases"
  np.testing.assert_allclose(fq.ring_radii(112), np.array(radii) / 2)
  assert fq.centre_half_side(224) == 5 and fq.centre_half_side(448) == 10


@pytest.mark.parametrize("h,w", [(32, 32), (64, 64), (224, 224), (32, 48)])
def test_rings_cover_every_bin_outside_the_centre(h, w):
  """Pairwise disjoint, their union exactly the complement of the centre (no bin can never be
  masked), every ring non-empty, and equal to a float distance map."""
  centre, rings = fq.ring_masks(h, w)
  ref_centre, ref_rings = _reference_rings(h, w)
  np.testing.assert_array_equal(centre, ref_centre)
  np.testing.assert_array_equal(rings, ref_rings)
  assert (rings.sum(0) <= 1).all()  # disjoint
  np.testing.assert_array_equal(rings.any(0), ~centre)  # union = complement of the centre
  assert all(r.any() for r in rings)  # every ring holds bins even at 32 px
  assert centre[h // 2, w // 2]  # DC preserved
  # the centre and every ring are point-symmetric about DC (mirror of index i is (−i) mod n after
  # the shift), so the filtered spectrum stays Hermitian
  def mirror(m):
    return np.roll(np.flip(m, axis=(-2, -1)), shift=(1 - h % 2, 1 - w % 2), axis=(-2, -1))
  np.testing.assert_array_equal(mirror(centre), centre)
  np.testing.assert_array_equal(mirror(rings), rings)


def test_centre_is_the_papers_10_by_10_region_at_224():
  centre, rings = fq.ring_masks(224, 224)
  ys, xs = np.nonzero(centre)
  assert (ys.min(), ys.max(), xs.min(), xs.max()) == (107, 117, 107, 117)  # DC ± 5: side 10
  assert centre.sum() == 121
  assert rings[6, 0, 0] and rings[:, 0, 0].sum() == 1  # the corner is in the last ring
  assert rings[0, 112, 118] and rings[0, 112, 120] and rings[1, 112, 121]  # 6..8 → ring 1, 9 → ring 2


@pytest.mark.parametrize("size", [32, 64])
def test_band_stop_mask_drops_exactly_two_rings(size):
  n = 16
  m = np.asarray(jax.jit(lambda k: fq.band_stop_mask(k, n, size, size))(jax.random.key(0)))
  centre, rings = _reference_rings(size, size)
  assert m.shape == (n, size, size) and m.dtype == np.float32
  assert set(np.unique(m)) <= {0.0, 1.0}
  for i in range(n):
    assert (m[i][centre] == 1).all()  # protected centre untouched
    zero_rings = [k for k in range(7) if (m[i][rings[k]] == 0).all()]
    assert len(zero_rings) == 2
    for k in set(range(7)) - set(zero_rings):
      assert (m[i][rings[k]] == 1).all()
    assert (m[i][~rings.any(0)] == 1).all()  # outside all rings (the centre): kept
    assert (m[i][centre] == 1).all() and m[i][size // 2, size // 2] == 1  # DC and centre kept
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
