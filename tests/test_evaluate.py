"""mae_jax.evaluate against scikit-learn, scipy, closed forms and brute-force numpy."""

import json
import math
import os
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from mae_jax import evaluate as ev

# ----------------------------------------------------------------------------------------------
# Classification vs scikit-learn
# ----------------------------------------------------------------------------------------------


def _sklearn_all(y, probs, num_classes):
  pred = np.argmax(probs, axis=1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # zero-division warnings are part of the cases tested
    out = {
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "macro_f1": skm.f1_score(y, pred, average="macro"),
        "precision": skm.precision_score(y, pred, average="macro"),
        "recall": skm.recall_score(y, pred, average="macro"),
        "mcc": skm.matthews_corrcoef(y, pred),
    }
  if num_classes == 2:
    out["auroc"] = skm.roc_auc_score(y, probs[:, 1])
  else:
    out["auroc"] = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro",
                                     labels=np.arange(num_classes))
  return out


def _check_against_sklearn(y, probs, num_classes):
  ours = ev.classification_metrics(y, probs, num_classes)
  ref = _sklearn_all(y, probs, num_classes)
  assert set(ours) == set(ref)
  for k in ("accuracy", "macro_f1", "precision", "recall", "mcc"):
    assert ours[k] == ref[k], (k, ours[k], ref[k])
  assert ours["balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"], abs=1e-12)
  assert ours["auroc"] == pytest.approx(ref["auroc"], abs=1e-7)


def _tied_probs(rng, n, num_classes, n_distinct):
  """Rows drawn from a few distinct probability vectors: heavy ties in every column and argmax."""
  table = rng.dirichlet(np.ones(num_classes), size=n_distinct)
  table[0] = 1.0 / num_classes  # an all-tied row exercises argmax's first-index rule
  return table[rng.integers(0, n_distinct, size=n)]


@pytest.mark.parametrize("seed", range(5))
def test_binary_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  n = 97
  y = rng.integers(0, 2, size=n)
  s = rng.random(n)
  _check_against_sklearn(y, np.stack([1 - s, s], 1), 2)
  # Ties: scores on a grid of 11 values; informative so AUROC is away from 0.5.
  s = np.clip(np.round(0.5 * y + 0.6 * rng.random(n) - 0.05, 1), 0, 1)
  probs = np.stack([1 - s, s], 1)
  _check_against_sklearn(y, probs, 2)
  # 1-D class-1 scores give the same numbers (prediction = score > 0.5, argmax's tie rule).
  ours1d = ev.classification_metrics(y, s, 2)
  assert ours1d == ev.classification_metrics(y, probs, 2)


@pytest.mark.parametrize("seed", range(5))
def test_four_class_matches_sklearn(seed):
  rng = np.random.default_rng(100 + seed)
  n = 151
  y = rng.integers(0, 4, size=n)
  probs = rng.dirichlet(np.ones(4), size=n)
  _check_against_sklearn(y, probs, 4)
  _check_against_sklearn(y, _tied_probs(rng, n, 4, 7), 4)


def test_degenerate_cases_match_sklearn():
  rng = np.random.default_rng(7)
  y = rng.integers(0, 4, size=60)
  # Every prediction is class 2: zero-division for precision of classes 0, 1, 3; MCC denominator 0.
  probs = np.tile([0.1, 0.2, 0.6, 0.1], (60, 1))
  probs[:, 0] += 1e-3 * rng.random(60)  # keep AUROC defined and non-trivial
  probs /= probs.sum(1, keepdims=True)
  _check_against_sklearn(y, probs, 4)
  assert ev.classification_metrics(y, probs, 4)["mcc"] == 0.0
  # Class 3 appears in neither labels nor predictions: macro averages skip it, as sklearn does.
  y3 = rng.integers(0, 3, size=80)
  p3 = rng.dirichlet(np.ones(4), size=80)
  p3[:, 3] = 0.0
  p3 /= p3.sum(1, keepdims=True)
  ours = ev.classification_metrics(y3, p3, 4)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pred = np.argmax(p3, 1)
    assert ours["macro_f1"] == skm.f1_score(y3, pred, average="macro")
    assert ours["precision"] == skm.precision_score(y3, pred, average="macro")
    assert ours["recall"] == skm.recall_score(y3, pred, average="macro")
    assert ours["mcc"] == skm.matthews_corrcoef(y3, pred)
  # AUROC: class 3 is absent from labels, so it is skipped (sklearn would raise).
  ref = np.mean([skm.roc_auc_score(y3 == c, p3[:, c]) for c in range(3)])
  assert ours["auroc"] == pytest.approx(ref, abs=1e-7)
  # A single class present: AUROC undefined.
  assert math.isnan(ev.classification_metrics(np.ones(10, int), rng.random((10, 2)), 2)["auroc"])


def test_classification_bad_input():
  with pytest.raises(ValueError):
    ev.classification_metrics(np.array([0, 1, 2]), np.ones((3, 2)), 2)
  with pytest.raises(ValueError):
    ev.classification_metrics(np.array([0, 1]), np.ones((3, 2)), 2)
  with pytest.raises(ValueError):
    ev.classification_metrics(np.array([0, 1]), np.ones((2, 3)), 2)


# ----------------------------------------------------------------------------------------------
# Segmentation vs brute force
# ----------------------------------------------------------------------------------------------


def _bf_boundary(m):
  """Mask pixels with a 4-neighbour outside the mask (outside the image counts as outside)."""
  pad = np.pad(m, 1, constant_values=False)
  interior = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
  return m & ~interior


def _bf_hd95(a, b):
  pa = np.argwhere(_bf_boundary(a)).astype(float)
  pb = np.argwhere(_bf_boundary(b)).astype(float)
  d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
  return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def _bf_dice_iou(a, b):
  inter = sum(1 for x, y in zip(a.ravel(), b.ravel()) if x and y)
  na, nb = int(a.sum()), int(b.sum())
  return 2 * inter / (na + nb), inter / (na + nb - inter)


def _square(h, w, r0, c0, side):
  m = np.zeros((h, w), bool)
  m[max(r0, 0):max(r0 + side, 0), max(c0, 0):max(c0 + side, 0)] = True
  return m


def _disc(h, w, cy, cx, r):
  yy, xx = np.mgrid[:h, :w]
  return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_shifted_squares_closed_form(k):
  side = 30
  a = _square(64, 64, 10, 10, side)
  b = _square(64, 64, 10, 10 + k, side)
  # Overlap is side x (side - k); half of all surface distances equal k and none exceed it.
  assert ev.dice(a, b) == pytest.approx((side - k) / side, abs=1e-12)
  assert ev.iou(a, b) == pytest.approx((side - k) / (side + k), abs=1e-12)
  assert ev.hd95(a, b) == pytest.approx(k, abs=1e-12)
  assert ev.hd95(b, a) == pytest.approx(k, abs=1e-12)
  assert ev.hd95(a, b) == pytest.approx(_bf_hd95(a, b), abs=1e-12)


def test_concentric_squares_closed_form():
  # Half-sides 15 and 17: 244 of the 256 pooled distances are exactly 2, the 12 corner ones exceed
  # 2 (4.7% < 5%), so the 95th percentile is 2; the plain Hausdorff distance would be 2·sqrt(2).
  a = _square(48, 48, 24 - 15, 24 - 15, 31)
  b = _square(48, 48, 24 - 17, 24 - 17, 35)
  assert ev.hd95(a, b) == pytest.approx(2.0, abs=1e-12)
  assert ev.dice(a, b) == pytest.approx(2 * 31**2 / (31**2 + 35**2), abs=1e-12)
  assert ev.iou(a, b) == pytest.approx(31**2 / 35**2, abs=1e-12)
  assert ev.sensitivity(a, b) == pytest.approx(31**2 / 35**2, abs=1e-12)
  assert ev.sensitivity(b, a) == 1.0


@pytest.mark.parametrize("case", range(8))
def test_segmentation_vs_brute_force(case):
  rng = np.random.default_rng(case)
  h, w = 48, 56
  cases = [
      (_disc(h, w, 20, 25, 10), _disc(h, w, 22, 29, 13)),
      (_disc(h, w, 24, 28, 8), _square(h, w, 14, 20, 18)),
      (_square(h, w, 0, 0, 20), _square(h, w, 3, 5, 20)),  # touching the image edge
      (_disc(h, w, 10, 10, 5) | _disc(h, w, 35, 45, 6), _disc(h, w, 12, 12, 6)),  # 2 components
      (_square(h, w, 5, 5, 1), _square(h, w, 30, 40, 1)),  # single pixels
      (_disc(h, w, 24, 28, 12) & ~_disc(h, w, 24, 28, 5), _disc(h, w, 24, 28, 12)),  # ring / hole
  ]
  if case < len(cases):
    a, b = cases[case]
  else:
    a = _blobs(rng.random((h, w)) < 0.5)
    b = _blobs(rng.random((h, w)) < 0.5)
  assert a.any() and b.any()
  assert ev.hd95(a, b) == pytest.approx(_bf_hd95(a, b), abs=1e-9)
  d, j = _bf_dice_iou(a, b)
  assert ev.dice(a, b) == pytest.approx(d, abs=1e-12)
  assert ev.iou(a, b) == pytest.approx(j, abs=1e-12)
  assert ev.pixel_accuracy(a, b) == pytest.approx(np.count_nonzero(a == b) / a.size, abs=1e-12)
  assert np.array_equal(ev.surface(a), _bf_boundary(a))


def _blobs(m):
  """Blobby random masks: majority vote over 5x5 windows, in numpy."""
  pad = np.pad(m.astype(int), 2)
  acc = sum(pad[i:i + m.shape[0], j:j + m.shape[1]] for i in range(5) for j in range(5))
  return acc >= 13


def test_empty_mask_conventions():
  h, w = 20, 30
  empty = np.zeros((h, w), bool)
  sq = _square(h, w, 4, 4, 6)
  assert ev.dice(empty, empty) == 1.0 and ev.iou(empty, empty) == 1.0
  assert ev.hd95(empty, empty) == 0.0
  assert math.isnan(ev.sensitivity(empty, empty))
  diag = math.hypot(h - 1, w - 1)
  for a, b in [(empty, sq), (sq, empty)]:
    assert ev.dice(a, b) == 0.0 and ev.iou(a, b) == 0.0
    assert ev.hd95(a, b) == pytest.approx(diag)
  assert ev.sensitivity(empty, sq) == 0.0
  assert math.isnan(ev.sensitivity(sq, empty))


def test_segmentation_metrics_multiclass():
  n, h, w, c = 4, 32, 40, 3
  true = np.zeros((n, h, w), np.int64)
  pred = np.zeros((n, h, w), np.int64)
  for i in range(n):
    true[i][_disc(h, w, 10, 12, 6 + i)] = 1
    true[i][_square(h, w, 18, 22, 8)] = 2
    pred[i][_disc(h, w, 11 + i, 13, 6)] = 1
    if i != 2:  # image 2: class 2 missed entirely
      pred[i][_square(h, w, 19, 22 + i, 8)] = 2
  true[3][true[3] == 1] = 0  # image 3: class 1 absent from the truth, predicted anyway
  out = ev.segmentation_metrics(pred, true, c)
  assert out["classes"] == [1, 2]
  for i in range(n):
    for j, k in enumerate(out["classes"]):
      a, b = pred[i] == k, true[i] == k
      if a.any() and b.any():
        ref_d, ref_j = _bf_dice_iou(a, b)
        ref_h = _bf_hd95(a, b)
      else:
        ref_d = ref_j = float(not a.any() and not b.any())
        ref_h = 0.0 if ref_d else math.hypot(h - 1, w - 1)
      assert out["dice_per_class"][i, j] == pytest.approx(ref_d, abs=1e-12)
      assert out["iou_per_class"][i, j] == pytest.approx(ref_j, abs=1e-12)
      assert out["hd95_per_class"][i, j] == pytest.approx(ref_h, abs=1e-9)
      tp, pos = np.count_nonzero(a & b), np.count_nonzero(b)
      if pos:
        assert out["sensitivity_per_class"][i, j] == pytest.approx(tp / pos, abs=1e-12)
      else:
        assert math.isnan(out["sensitivity_per_class"][i, j])
  assert out["dice_per_class"][2, 1] == 0.0
  # NaN sensitivity (image 3, class 1) is left out of the per-image and overall means.
  assert out["sensitivity"][3] == out["sensitivity_per_class"][3, 1]
  assert out["sensitivity_mean"] == pytest.approx(np.mean(out["sensitivity"]))
  assert out["dice"] == pytest.approx(out["dice_per_class"].mean(1))
  assert out["dice_mean"] == pytest.approx(out["dice_per_class"].mean())
  assert out["pixel_accuracy"] == pytest.approx((pred == true).mean((1, 2)))
  # Channel-last inputs: (N, H, W, 1) label maps and (N, H, W, C) one-hot give the same numbers.
  out2 = ev.segmentation_metrics(pred[..., None], np.eye(c)[true], c)
  assert np.array_equal(out2["hd95_per_class"], out["hd95_per_class"])


def test_segmentation_binary_and_bad_shapes():
  a = _square(32, 32, 4, 4, 10)[None]
  b = _square(32, 32, 5, 4, 10)[None]
  out = ev.segmentation_metrics(a, b, 2)
  assert out["classes"] == [1]
  assert out["dice"][0] == pytest.approx(0.9)
  assert out["hd95_mean"] == pytest.approx(1.0)
  with pytest.raises(ValueError):
    ev.segmentation_metrics(a, b[:, :16], 2)
  with pytest.raises(ValueError):
    ev.dice(a[0], b[0, :16])


# ----------------------------------------------------------------------------------------------
# Uncertainty
# ----------------------------------------------------------------------------------------------


def test_bootstrap_coverage():
  # 200 datasets of 150 Bernoulli(0.8) correctness flags; the 95% percentile CI of the accuracy
  # should cover 0.8 in ~95% of them. 3-sigma binomial band: sd = sqrt(.95 * .05 / 200) = 0.0154.
  p, n_data, n_sets = 0.8, 150, 200
  rng = np.random.default_rng(0)
  covered = 0
  for i in range(n_sets):
    correct = (rng.random(n_data) < p).astype(float)
    _, lo, hi = ev.bootstrap_ci(np.mean, correct, n_boot=1000, seed=i)
    covered += lo <= p <= hi
  rate = covered / n_sets
  sd = math.sqrt(0.95 * 0.05 / n_sets)
  assert abs(rate - 0.95) <= 3 * sd, rate


def test_bootstrap_joint_resampling_and_dict():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 2, size=200)
  s = np.clip(0.3 * y + 0.7 * rng.random(200), 0, 1)
  probs = np.stack([1 - s, s], 1)
  # Joint resampling keeps (label, score) pairs: accuracy of labels vs themselves stays 1.
  pt, lo, hi = ev.bootstrap_ci(lambda a, b: np.mean(a == b), y, y.copy(), n_boot=200)
  assert (pt, lo, hi) == (1.0, 1.0, 1.0)
  res = ev.bootstrap_ci(lambda a, b: ev.classification_metrics(a, b, 2), y, probs, n_boot=200,
                        seed=5)
  assert set(res) == {"accuracy", "balanced_accuracy", "macro_f1", "auroc", "precision", "recall", "mcc"}
  for k, (pt, lo, hi) in res.items():
    assert lo <= pt <= hi, k
  assert res == ev.bootstrap_ci(lambda a, b: ev.classification_metrics(a, b, 2), y, probs,
                                n_boot=200, seed=5)
  # Manual reimplementation for one metric, same rng stream.
  r = np.random.default_rng(5)
  boots = []
  for _ in range(200):
    idx = r.integers(0, 200, size=200)
    boots.append(skm.roc_auc_score(y[idx], s[idx]))
  assert res["auroc"][1] == pytest.approx(np.percentile(boots, 2.5), abs=1e-7)
  assert res["auroc"][2] == pytest.approx(np.percentile(boots, 97.5), abs=1e-7)
  # Resamples without a positive have NaN AUROC and are dropped from the percentiles.
  y_small, s_small = np.array([1, 0, 0, 0, 0, 0]), np.linspace(0.9, 0.1, 6)
  pt, lo, hi = ev.bootstrap_ci(ev.binary_auroc, y_small, s_small, n_boot=100)
  assert (pt, lo, hi) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("values", [[0.81, 0.83, 0.80], [0.5, 0.9, 0.7, 0.65, 0.72], [1.0, 3.0]])
def test_seed_ci_matches_scipy(values):
  v = np.asarray(values)
  m, lo, hi = ev.seed_ci(v)
  ref_lo, ref_hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
  assert m == pytest.approx(v.mean(), abs=1e-12)
  assert lo == pytest.approx(ref_lo, abs=1e-12) and hi == pytest.approx(ref_hi, abs=1e-12)
  m90, lo90, hi90 = ev.seed_ci(v, alpha=0.1)
  assert (lo90, hi90) == pytest.approx(
      stats.t.interval(0.9, len(v) - 1, loc=v.mean(), scale=stats.sem(v)), abs=1e-12)
  assert ev.seed_ci([0.7])[0] == 0.7 and math.isnan(ev.seed_ci([0.7])[1])


def test_ttest():
  a = np.array([0.81, 0.83, 0.80, 0.84, 0.82])
  b = np.array([0.78, 0.80, 0.74])
  t, p = ev.ttest(a, b)
  # Welch by hand: Satterthwaite degrees of freedom, two-sided p.
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  t_ref = (a.mean() - b.mean()) / math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
  assert t == pytest.approx(t_ref, rel=1e-12)
  assert p == pytest.approx(2 * stats.t.sf(abs(t_ref), df), rel=1e-10)
  r = stats.ttest_ind(a, b, equal_var=False)
  assert (t, p) == pytest.approx((r.statistic, r.pvalue), rel=1e-12)
  r = stats.ttest_ind(a, b, equal_var=True)
  assert ev.ttest(a, b, equal_var=True) == pytest.approx((r.statistic, r.pvalue), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Label efficiency
# ----------------------------------------------------------------------------------------------


def test_stratified_subset():
  rng = np.random.default_rng(0)
  labels = np.repeat([0, 1, 2, 3], [50, 23, 7, 2])
  labels = labels[rng.permutation(labels.size)]
  fracs = [0.2, 0.4, 0.6, 0.8, 1.0]
  for seed in range(3):
    subsets = [ev.stratified_subset(labels, f, seed) for f in fracs]
    for small, big in zip(subsets, subsets[1:]):
      assert set(small) <= set(big)  # nested
    assert np.array_equal(subsets[-1], np.arange(labels.size))
    for f, sub in zip(fracs, subsets):
      assert len(np.unique(sub)) == len(sub) and np.all(np.diff(sub) > 0)
      for c in range(4):
        n_c = np.count_nonzero(labels == c)
        got = np.count_nonzero(labels[sub] == c)
        assert got >= 1 and abs(got - f * n_c) <= max(0.5, 1 - f * n_c) + 1e-9, (f, c, got)
      assert np.array_equal(sub, ev.stratified_subset(labels, f, seed))  # deterministic
  assert not np.array_equal(ev.stratified_subset(labels, 0.4, 0),
                            ev.stratified_subset(labels, 0.4, 1))
  assert ev.stratified_subset(labels, 0.0, 0).size == 0
  # Exact counts where fraction·n_c is an integer (0.6·5 is 3.0000000000000004 in floating point).
  five = np.repeat([0, 1], 5)
  assert ev.stratified_subset(five, 0.6, 0).size == 6
  assert ev.stratified_subset(five, 0.2, 0).size == 2
  with pytest.raises(ValueError):
    ev.stratified_subset(labels, 1.5, 0)
  with pytest.raises(ValueError):
    ev.stratified_subset(np.array([-1, 0, 1]), 0.5, 0)


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def test_results_table_and_write(tmp_path):
  seeds = [0.81, 0.83, 0.80]
  m, lo, hi = ev.seed_ci(seeds)
  rows = [
      {"method": "mae", "fraction": 0.2, "accuracy": seeds, "auroc": (0.9, 0.85, 0.93)},
      {"method": "d2mae", "fraction": 0.2, "accuracy": np.array([0.85, 0.86]),
       "auroc": {"mean": 0.91, "lo": 0.88, "hi": float("nan")}},
  ]
  table = ev.results_table(rows, ["accuracy", "auroc"], digits=3)
  lines = table.strip().split("\n")
  assert lines[0] == "| method | fraction | accuracy | auroc |"
  assert len(lines) == 4
  assert f"{m:.3f} ± {np.std(seeds, ddof=1):.3f} [{lo:.3f}, {hi:.3f}]" in lines[2]
  assert "0.900 [0.850, 0.930]" in lines[2]
  assert "0.910 [0.880, nan]" in lines[3]
  jpath, mpath = ev.write_results(str(tmp_path / "out"), "probe", rows,
                                  metrics=["accuracy", "auroc"])
  assert os.path.exists(jpath) and os.path.exists(mpath)
  with open(jpath) as fh:
    back = json.load(fh)
  assert back[0]["accuracy"] == seeds and back[1]["auroc"]["hi"] is None
  with open(mpath) as fh:
    assert ev.results_table(rows, ["accuracy", "auroc"]) in fh.read()
