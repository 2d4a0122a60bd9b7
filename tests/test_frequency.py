"""USFM band-stop masking as the authors' `Frequency_MASK` builds it (openmedlab/USFM
usdsgen/data/transforms.py), and the spatial-frequency dual mask (Eq. 8)."""

import itertools

import jax
import numpy as np
import pytest

from mae_jax.corrupt import frequency as fq

# Two settings with their disk radii worked out by hand from the rule R_0 = CenterProtect,
# R_1 = BaseBW, R_{k+1} = R_k + min(int(R_k·IncreaseFactor), MaxIncrease), used while R ≤ N/2:
# - the project's reading at 224: 5, 8, 8+4, 12+6, 18+9, 27+int(13.5), 40+20, 60+30; next 90+32 > 112.
# - 64 px, (2, 4, 1.0, 6): 2, 4, 4+4, 8+6, 14+6, 20+6, 26+6 = 32 ≤ 32 (the cap binds); next 38 > 32.
SETTINGS = [
    (224, fq.FrequencyParams(5, 8, 0.5, 32, 0.3), (5, 8, 12, 18, 27, 40, 60, 90), 2),
    (64, fq.FrequencyParams(2, 4, 1.0, 6, 0.5), (2, 4, 8, 14, 20, 26, 32), 3),
]


def _reference_rings(size, radii):
  """Differences of nested disks from a float distance map (bin centre to DC at size // 2), as the
  description reads: ring k = disk(R_{k+1}) minus disk(R_k)."""
  yy, xx = np.mgrid[0:size, 0:size]
  dist = np.sqrt((yy - size // 2) ** 2.0 + (xx - size // 2) ** 2.0)
  disks = [dist <= r for r in radii]
  return np.stack([disks[k + 1] & ~disks[k] for k in range(len(radii) - 1)])


@pytest.mark.parametrize("size,params,radii,dropped", SETTINGS)
def test_radii_and_ring_edges_worked_by_hand(size, params, radii, dropped):
  assert fq.radii(size, size, params) == radii
  assert fq.num_rings(size, size, params) == len(radii) - 1
  assert fq.num_dropped(size, size, params) == dropped
  rings = fq.ring_masks(size, size, params)
  np.testing.assert_array_equal(rings, _reference_rings(size, radii))
  c = size // 2
  # Along an axis (towards index 0, where the Nyquist bin at −N/2 lies), the outer edge of each
  # ring belongs to it, the bin past its inner edge too, the inner edge itself does not.
  for k, (a, b) in enumerate(zip(radii[:-1], radii[1:])):
    assert rings[k, c, c - b] and rings[k, c, c - a - 1] and not rings[k, c, c - a]
  assert not rings[:, c, c - radii[0]].any()  # the protected disk's edge is kept
  assert not rings[:, c, : c - radii[-1]].any()  # beyond the last radius: never masked
  assert not rings[:, 0, 0].any()  # the spectrum's corner is never masked
  assert (rings.sum(0) <= 1).all()


def test_default_is_the_papers_reading_at_224():
  assert fq.DEFAULT == fq.FrequencyParams(5, 8, 0.5, 32, 0.3)
  r = fq.radii(224, 224)
  widths = np.diff(r)
  assert len(r) - 1 == 7 and (np.diff(widths) > 0).all()  # 7 rings, widths increase
  assert fq.num_dropped(224, 224) == 2  # "2 of these 7"
  rings = fq.ring_masks(224, 224)
  # the protected centre is a disk of radius 5: (5, 5) off DC (distance 7.07) lies in ring 1
  assert rings[0, 117, 117] and not rings[:, 112, 117].any() and not rings[:, 115, 116].any()


def test_small_images_have_fewer_rings():
  """The radii are in bins whatever the size (the authors' code does not rescale them)."""
  assert fq.radii(32, 32) == (5, 8, 12)
  assert fq.num_dropped(32, 32) == 0  # int(0.3 · 2)
  assert fq.radii(8, 8) == ()
  np.testing.assert_array_equal(fq.band_stop_mask(jax.random.key(0), 2, 8, 8), np.ones((2, 8, 8)))


@pytest.mark.parametrize("bad,field", [
    (fq.FrequencyParams(5, 5, 0.5, 32, 0.3), "freq_base_bw"),
    (fq.FrequencyParams(5, 8, 0.1, 32, 0.3), "freq_increase_factor"),
    (fq.FrequencyParams(5, 8, 0.5, 0, 0.3), "freq_max_increase"),
    (fq.FrequencyParams(5, 8, 0.5, 32, 1.5), "freq_ratio"),
])
def test_bad_params_name_the_field(bad, field):
  with pytest.raises(ValueError, match=field):
    fq.radii(224, 224, bad)


@pytest.mark.parametrize("size,params,radii,dropped", SETTINGS)
def test_band_stop_mask_drops_int_ratio_rings(size, params, radii, dropped):
  n = 12
  m = np.asarray(jax.jit(lambda k: fq.band_stop_mask(k, n, size, size, params))(jax.random.key(0)))
  rings = _reference_rings(size, radii)
  assert m.shape == (n, size, size) and m.dtype == np.float32
  assert set(np.unique(m)) <= {0.0, 1.0}
  for i in range(n):
    zero = [k for k in range(len(rings)) if (m[i][rings[k]] == 0).all()]
    assert len(zero) == dropped
    np.testing.assert_array_equal(m[i] == 0, rings[zero].any(0))  # nothing else removed
  assert len({tuple(m[i].ravel()) for i in range(n)}) > 1


def test_rings_are_chosen_uniformly():
  n = 21000
  drop = np.asarray(fq.choose_rings(jax.random.key(1), n, 7, 2))
  assert (drop.sum(1) == 2).all()
  # each ring: p = 2/7, sd of the count ≈ 65; each of the 21 pairs: p = 1/21, sd ≈ 31
  np.testing.assert_allclose(drop.sum(0), n * 2 / 7, atol=5 * 65)
  pairs = {p: 0 for p in itertools.combinations(range(7), 2)}
  for row in drop:
    pairs[tuple(np.flatnonzero(row))] += 1
  np.testing.assert_allclose(list(pairs.values()), n / 21, atol=5 * 31)


@pytest.mark.parametrize("channels", [1, 3])
def test_frequency_mask_is_abs_of_ifft2_as_numpy(channels):
  """fftshift → multiply → ifftshift → ifft2 → abs, float64 numpy; on images with negative values
  abs differs from the real part, which the result must not be."""
  n, size = 3, 64
  params = SETTINGS[1][1]
  x = np.random.default_rng(channels).uniform(-1, 1, (n, size, size, channels)).astype(np.float32)
  key = jax.random.key(2)
  y = np.asarray(jax.jit(lambda k, a: fq.frequency_mask(k, a, params=params))(key, x))
  mask = np.asarray(fq.band_stop_mask(key, n, size, size, params))
  spec = np.fft.fftshift(np.fft.fft2(x.astype(np.float64), axes=(1, 2)), axes=(1, 2))
  back = np.fft.ifft2(np.fft.ifftshift(spec * mask[..., None], axes=(1, 2)), axes=(1, 2))
  assert y.shape == x.shape and y.dtype == np.float32
  np.testing.assert_allclose(y, np.abs(back), atol=1e-5)
  assert np.abs(y - back.real).max() > 0.1  # abs, not the real part
  assert (y >= 0).all()


def test_frequency_mask_non_square_and_zero_ratio():
  x = np.random.default_rng(0).random((2, 32, 48, 1), dtype=np.float32)
  p = fq.FrequencyParams(1, 2, 1.0, 4, 0.5)
  assert fq.radii(32, 48, p) == (1, 2, 4, 8, 12, 16)  # stops at min(H, W) / 2
  y = np.asarray(fq.frequency_mask(jax.random.key(0), x, params=p))
  assert np.abs(y - x).max() > 1e-2
  none = fq.FrequencyParams(1, 2, 1.0, 4, 0.0)
  np.testing.assert_allclose(np.asarray(fq.frequency_mask(jax.random.key(0), x, params=none)), x,
                             atol=1e-6)


def test_params_from_config():
  import ml_collections
  c = ml_collections.ConfigDict(dict(freq_center_protect=2, freq_base_bw=4, freq_increase_factor=1.0,
                                     freq_max_increase=6, freq_ratio=0.5))
  assert fq.params_from_config(c) == SETTINGS[1][1]
  assert fq.params_from_config(ml_collections.ConfigDict()) == fq.DEFAULT


@pytest.mark.parametrize("use_frequency", [True, False])
def test_dual_mask_composition(use_frequency):
  n, size, unit = 3, 64, 16
  params = SETTINGS[1][1]
  x = np.random.default_rng(4).random((n, size, size, 1), dtype=np.float32)
  noise = np.random.default_rng(5).random((n, 16)).astype(np.float32)
  spec_mask = fq.band_stop_mask(jax.random.key(6), n, size, size, params)
  y, pm = jax.jit(lambda k, a: fq.dual_mask(k, a, spatial_ratio=0.4, unit=unit, params=params,
                                            use_frequency=use_frequency, spatial_noise=noise,
                                            spectrum_mask=spec_mask))(jax.random.key(7), x)
  y, pm = np.asarray(y), np.asarray(pm)
  assert pm.shape == (n, size, size, 1)
  np.testing.assert_array_equal(pm.reshape(n, -1).sum(1), 7 * unit * unit)  # ceil(16 · 0.4)
  base = np.asarray(fq.frequency_mask(None, x, mask=spec_mask)) if use_frequency else x
  mean = x.mean(axis=(1, 2), keepdims=True)  # the ORIGINAL image's mean (Eq. 2)
  np.testing.assert_allclose(y, np.where(pm > 0, mean, base), atol=1e-6)


def test_dual_mask_from_key_only():
  x = np.random.default_rng(8).random((2, 64, 64, 3), dtype=np.float32)
  y, pm = fq.dual_mask(jax.random.key(0), x, spatial_ratio=0.4, unit=16)
  assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()
  np.testing.assert_array_equal(np.asarray(pm).reshape(2, -1).sum(1), 7 * 256)  # ceil(6.4)
