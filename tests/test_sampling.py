"""Organ-balanced sampler (USFM Eq. 1: every image has weight 1/√N_organ, so an organ's share is
∝ √N_organ) and per-epoch shuffling: distributions and exact resume."""

import numpy as np
import pytest
from scipy import stats

from mae_jax.data.sampling import BalancedIndexSampler, EpochShuffleSampler, organ_weights

# 4 organs with very different sizes: 400, 100, 25, 4 images (organ 3 absent, organ 5 present).
SIZES = {0: 400, 1: 100, 2: 25, 4: 4}


def _organ_ids():
  ids = np.concatenate([np.full(n, o) for o, n in SIZES.items()])
  return np.random.default_rng(123).permutation(ids)  # organs interleaved in dataset order


def test_organ_weights_closed_form():
  """Eq. 1 per image (weight 1/√N of its organ), summed over each organ's images: ∝ √N_organ."""
  ids = _organ_ids()
  w = organ_weights(ids)
  per_image = np.array([1 / np.sqrt(SIZES[o]) for o in ids])
  expected = np.array([per_image[ids == o].sum() for o in range(5)]) / per_image.sum()
  np.testing.assert_allclose(w, expected, rtol=1e-12)
  np.testing.assert_allclose(w[[0, 1, 2, 4]], np.array([20, 10, 5, 2]) / 37, rtol=1e-12)  # √N / Σ√N
  assert w[3] == 0.0


# USFM's published organ shares of the 3M-US database (usfm.txt §5.1 and §5.4), in %. The other four
# of its 12 organs are not given; the closed form below is over these eight.
USFM_SHARES = {"breast": 91.74, "thyroid": 3.29, "fetal body": 0.93, "neck": 0.51, "abdomen": 0.43,
               "fetal head": 0.39, "fetal abdomen": 0.19, "muscle": 0.07}


def test_usfm_published_shares_give_breast_64_and_muscle_1_8_percent():
  """A dataset in USFM's proportions (10,000 images per 1 %): per-image weights 1/√N give organ
  shares √N_o/Σ√N — breast ≈ 63.6 %, muscle ≈ 1.76 % — which a chi-square test over 30,000 draws
  accepts; the old reading (organ ∝ 1/√N) is rejected by the same test."""
  counts = np.array([round(100 * s) * 100 for s in USFM_SHARES.values()])  # breast 917,400 … muscle 700
  ids = np.random.default_rng(0).permutation(np.repeat(np.arange(len(counts)), counts))
  closed = np.sqrt(counts) / np.sqrt(counts).sum()
  assert closed[0] == pytest.approx(0.636, abs=0.001) and closed[-1] == pytest.approx(0.0176, abs=0.0001)
  np.testing.assert_allclose(organ_weights(ids), closed, rtol=1e-12)
  n = 30_000
  draws = BalancedIndexSampler(ids, seed=2).draws(0, n)
  observed = np.bincount(ids[draws], minlength=len(counts))
  _, p = stats.chisquare(observed, closed * n)
  assert p > 0.01, (observed, closed * n)
  old = (1 / np.sqrt(counts)) / (1 / np.sqrt(counts)).sum()
  assert stats.chisquare(observed, old * n)[1] < 1e-12
  # Resuming mid-stream (a fresh sampler, as after a restart) continues the same order.
  np.testing.assert_array_equal(BalancedIndexSampler(ids, seed=2).draws(n - 300, n), draws[-300:])


def test_organ_weights_rejects_negative_ids():
  with pytest.raises(ValueError, match="organ_ids"):
    organ_weights([0, 1, -1])


def test_balanced_organ_frequencies_chi_square():
  ids = _organ_ids()
  s = BalancedIndexSampler(ids, seed=7)
  draws = s.draws(0, 20_000)
  organs = ids[draws]
  present = sorted(SIZES)
  observed = np.array([(organs == o).sum() for o in present])
  w = organ_weights(ids)[present]
  _, p = stats.chisquare(observed, w * len(draws))
  assert p > 0.01, (observed, w * len(draws))


def test_uniform_within_organ():
  ids = _organ_ids()
  draws = BalancedIndexSampler(ids, seed=3).draws(0, 20_000)
  members = np.flatnonzero(ids == 1)  # 100 images, expected ~ 20000 * w[1] / 100 each
  counts = np.array([(draws == m).sum() for m in members])
  assert counts.sum() > 1000
  _, p = stats.chisquare(counts)
  assert p > 0.01
  # Every drawn index belongs to the dataset, and small organ 4 is fully covered.
  assert set(np.flatnonzero(ids == 4)) <= set(draws.tolist())


def test_resume_is_exact():
  ids = _organ_ids()
  full = BalancedIndexSampler(ids, seed=11).draws(0, 500)
  k = 237
  resumed = BalancedIndexSampler(ids, seed=11).draws(k, 500)
  np.testing.assert_array_equal(full[k:], resumed)
  # Order of access does not matter either.
  s = BalancedIndexSampler(ids, seed=11)
  assert [s[j] for j in (499, 3, 250)] == [full[499], full[3], full[250]]
  assert not np.array_equal(full, BalancedIndexSampler(ids, seed=12).draws(0, 500))


def test_uniform_mode_is_a_fresh_permutation_per_epoch():
  ids = _organ_ids()
  n = len(ids)
  s = BalancedIndexSampler(ids, seed=5, mode="uniform")
  e0, e1 = s.draws(0, n), s.draws(n, 2 * n)
  np.testing.assert_array_equal(np.sort(e0), np.arange(n))
  np.testing.assert_array_equal(np.sort(e1), np.arange(n))
  assert not np.array_equal(e0, e1)
  # Resume in the middle of epoch 1, with a fresh object.
  np.testing.assert_array_equal(BalancedIndexSampler(ids, seed=5, mode="uniform").draws(n + 17, 2 * n), e1[17:])
  np.testing.assert_array_equal(EpochShuffleSampler(n, 5).permutation(0), e0)


def test_bad_mode():
  with pytest.raises(ValueError, match="mode"):
    BalancedIndexSampler([0, 1], seed=0, mode="nope")
