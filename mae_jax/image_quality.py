"""Full-reference image-quality metrics of image enhancement (USFM §4.1.2, Table 4): SSIM, LNCC and
NMI between an enhanced image and its high-quality target, per image, then their means with
percentile-bootstrap CIs over the test images (`evaluate.bootstrap_ci`).

Images are (N, H, W) or (N, H, W, 1) arrays in [0, 1].

  * SSIM (Wang et al. 2004): 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03, dynamic range 1,
    averaged over the windows that lie inside the image (`dm_pix.ssim`; equal to scikit-image's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1)`, which filters then crops the 5-pixel border).
  * LNCC: the local normalised cross-correlation of VoxelMorph / MONAI: in every `LNCC_WINDOW`²
    window lying inside the image, cc = cov(a, b)² / (var(a)·var(b) + `LNCC_EPS`) with population
    moments of the window, then the mean over windows. Squared, so it lies in [0, 1]; a window
    where either image is constant counts 0.
  * NMI: Studholme's normalised mutual information Y = (H(A) + H(B)) / H(A, B) ∈ [1, 2] from the
    joint histogram of `NMI_BINS`² bins, each axis spanning that image's own [min, max] (as
    scikit-image's `normalized_mutual_information`); and `nmi_sym` = 2·MI / (H(A) + H(B)) =
    2·(1 − 1/Y) ∈ [0, 1] (symmetric uncertainty, scikit-learn's arithmetic normalisation). USFM
    names neither its window nor its bins nor its normalisation; its NMI values (21–25 %) are in the
    range of `nmi_sym`, not of Y.
"""

from __future__ import annotations

import numpy as np

from mae_jax import evaluate

LNCC_WINDOW = 9  # VoxelMorph's default window
LNCC_EPS = 1e-8  # on [0, 1] intensities
NMI_BINS = 64
METRICS = ("ssim", "lncc", "nmi", "nmi_sym")


def _planes(x, name: str) -> np.ndarray:
  a = np.asarray(x, np.float64)
  if a.ndim == 4 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim == 2:
    a = a[None]
  if a.ndim != 3:
    raise ValueError(f"{name}: expected (N, H, W[, 1]) images, got shape {a.shape}")
  return a


def ssim(pred, target) -> np.ndarray:
  """(N,) SSIM per image (see the module docstring)."""
  import dm_pix
  import jax.numpy as jnp
  p, t = _planes(pred, "pred"), _planes(target, "target")
  if min(p.shape[1:]) < 11:
    raise ValueError(f"SSIM needs images of at least 11×11 pixels, got {p.shape[1:]}")
  out = dm_pix.ssim(jnp.asarray(p[..., None], jnp.float32), jnp.asarray(t[..., None], jnp.float32),
                    max_val=1.0, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03)
  return np.asarray(out, np.float64)


def _box_means(a: np.ndarray, w: int) -> np.ndarray:
  """Means of every w×w window inside each (H, W) plane of a: (N, H-w+1, W-w+1), by 2-D prefix sums."""
  c = np.pad(np.cumsum(np.cumsum(a, axis=1), axis=2), ((0, 0), (1, 0), (1, 0)))
  s = c[:, w:, w:] - c[:, :-w, w:] - c[:, w:, :-w] + c[:, :-w, :-w]
  return s / (w * w)


def lncc(pred, target, window: int = LNCC_WINDOW, eps: float = LNCC_EPS) -> np.ndarray:
  """(N,) mean local squared normalised cross-correlation per image (see the module docstring)."""
  p, t = _planes(pred, "pred"), _planes(target, "target")
  mp, mt = _box_means(p, window), _box_means(t, window)
  cross = _box_means(p * t, window) - mp * mt
  vp = np.maximum(_box_means(p * p, window) - mp * mp, 0.0)
  vt = np.maximum(_box_means(t * t, window) - mt * mt, 0.0)
  cc = cross * cross / (vp * vt + eps)
  return cc.reshape(cc.shape[0], -1).mean(axis=1)


def _entropy(counts: np.ndarray) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-np.sum(p * np.log(p)))


def nmi(pred, target, bins: int = NMI_BINS) -> tuple[np.ndarray, np.ndarray]:
  """((N,) Studholme Y, (N,) symmetric uncertainty) per image (see the module docstring)."""
  p, t = _planes(pred, "pred"), _planes(target, "target")
  y, sym = np.empty(len(p)), np.empty(len(p))
  for i in range(len(p)):
    joint, _, _ = np.histogram2d(p[i].ravel(), t[i].ravel(), bins=bins)
    ha, hb, hab = _entropy(joint.sum(1)), _entropy(joint.sum(0)), _entropy(joint.ravel())
    y[i] = (ha + hb) / hab if hab > 0 else 2.0  # two constant images: fully dependent
    sym[i] = 2.0 * (ha + hb - hab) / (ha + hb) if ha + hb > 0 else 1.0
  return y, sym


def per_image(pred, target) -> dict[str, np.ndarray]:
  """{metric: (N,)} for METRICS."""
  p, t = _planes(pred, "pred"), _planes(target, "target")
  if p.shape != t.shape:
    raise ValueError(f"pred {p.shape} and target {t.shape} differ in shape")
  y, sym = nmi(p, t)
  return {"ssim": ssim(p, t), "lncc": lncc(p, t), "nmi": y, "nmi_sym": sym}


def summary(values: dict[str, np.ndarray], *, n_boot: int, alpha: float, seed: int) -> dict:
  """{metric: {'mean', 'std', 'lo', 'hi'}}: mean ± std over images (USFM's Table 4 form) and the
  percentile-bootstrap CI of the mean over images."""
  cols = [np.asarray(values[k], np.float64) for k in METRICS]
  ci = evaluate.bootstrap_ci(lambda *a: {k: float(np.mean(v)) for k, v in zip(METRICS, a)}, *cols,
                             n_boot=n_boot, alpha=alpha, seed=seed)
  return {k: {"mean": ci[k][0], "std": float(np.std(values[k])), "lo": ci[k][1], "hi": ci[k][2]}
          for k in METRICS}
