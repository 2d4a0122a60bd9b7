"""Enhancement metrics against independent references: scikit-image's SSIM and NMI, scikit-learn's
normalised mutual information, and LNCC written from its definition window by window."""

import numpy as np
import pytest
from skimage.metrics import normalized_mutual_information, structural_similarity
from sklearn.metrics import normalized_mutual_info_score

from mae_jax import image_quality as iq


def _pairs(n=3, size=24, seed=0):
  rng = np.random.default_rng(seed)
  t = rng.random((n, size, size))
  p = np.clip(0.6 * t + 0.4 * rng.random((n, size, size)), 0, 1)
  return p, t


def test_ssim_matches_scikit_image():
  p, t = _pairs()
  ours = iq.ssim(p[..., None], t[..., None])
  ref = [structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=False) for a, b in zip(p, t)]
  np.testing.assert_allclose(ours, ref, atol=2e-5)
  np.testing.assert_allclose(iq.ssim(t, t), 1.0, atol=1e-5)


def lncc_reference(a, b, w, eps):
  vals = []
  for i in range(a.shape[0] - w + 1):
    for j in range(a.shape[1] - w + 1):
      x, y = a[i:i + w, j:j + w].ravel(), b[i:i + w, j:j + w].ravel()
      cov = np.mean((x - x.mean()) * (y - y.mean()))
      vals.append(cov * cov / (x.var() * y.var() + eps))
  return np.mean(vals)


def test_lncc_matches_definition():
  p, t = _pairs(n=2, size=16)
  t[1, :8] = 0.5  # a constant region: windows inside it count 0
  ours = iq.lncc(p, t, window=5, eps=1e-8)
  ref = [lncc_reference(a, b, 5, 1e-8) for a, b in zip(p, t)]
  np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(iq.lncc(t[:1], 0.3 * t[:1] + 0.1), 1.0, atol=1e-4)  # affine → 1 (up to eps)


def test_nmi_matches_scikit_image_and_learn():
  p, t = _pairs()
  y, sym = iq.nmi(p, t, bins=32)
  ref = [normalized_mutual_information(a, b, bins=32) for a, b in zip(p, t)]
  np.testing.assert_allclose(y, ref, rtol=1e-10)

  def labels(a):  # the bin of every pixel, each axis over its own [min, max] as histogram2d
    edges = np.linspace(a.min(), a.max(), 33)
    return np.clip(np.searchsorted(edges, a.ravel(), side="right") - 1, 0, 31)

  ref_sym = [normalized_mutual_info_score(labels(a), labels(b), average_method="arithmetic")
             for a, b in zip(p, t)]
  np.testing.assert_allclose(sym, ref_sym, rtol=1e-8)


def test_summary_and_shape_errors():
  p, t = _pairs(n=6)
  s = iq.summary(iq.per_image(p, t), n_boot=50, alpha=0.05, seed=0)
  for k in iq.METRICS:
    assert s[k]["lo"] <= s[k]["mean"] <= s[k]["hi"]
  with pytest.raises(ValueError, match="differ in shape"):
    iq.per_image(p, t[:, :20])
