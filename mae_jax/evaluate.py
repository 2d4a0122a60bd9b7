"""Downstream evaluation: classification / segmentation metrics, confidence intervals, reporting.

numpy/scipy only, so the package never depends on scikit-learn (which the tests use as reference).

Conventions (see docs/methods.md#downstream):

Classification (`classification_metrics`)
  * Predictions are the argmax of `probs` (first index wins ties). A 1-D `probs` is the
    class-1 score of a binary problem; the prediction is then `score > 0.5`.
  * precision / recall / macro_f1 are macro averages, as scikit-learn's `average="macro"` with
    `labels=None`: the average runs over the classes present in `labels` or in the predictions.
    A class in that set with a zero denominator scores 0 (scikit-learn's default
    `zero_division="warn"` behaves as 0). F1 is `2·TP / (2·TP + FP + FN)`.
  * balanced_accuracy is the mean recall over the classes present in `labels`, as scikit-learn's
    `balanced_accuracy_score` (USFM keeps the fine-tuning epoch with the best one).
  * mcc is the multi-class Matthews coefficient (Gorodkin's R_K, as `matthews_corrcoef`);
    0 when its denominator is 0.
  * auroc uses the rank (Mann–Whitney U) formula with average ranks for tied scores, which equals
    the trapezoidal ROC area. Binary: score of class 1 against labels == 1. Multi-class: macro
    one-vs-rest over the classes present in `labels`; a class absent from `labels` has no AUROC
    and is skipped (scikit-learn raises instead). NaN when fewer than two classes are present.

Segmentation (`dice`, `iou`, `hd95`, `pixel_accuracy`, `sensitivity`, `segmentation_metrics`)
  * Per image, on boolean masks (one class at a time).
  * Empty masks: both empty -> dice = iou = 1, hd95 = 0. Exactly one empty -> dice = iou = 0 and
    hd95 = the image diagonal `sqrt((H-1)^2 + (W-1)^2)`, the largest distance two pixels of the
    image can have, so a missed / hallucinated structure gets the worst attainable score.
  * sensitivity = TP / (TP + FN); with no positive pixel in the truth it is undefined and is NaN,
    and NaNs are excluded from every mean (`np.nanmean`).
  * hd95 follows MedPy: surface = mask XOR its erosion by the 4-connected cross (pixels on the
    image edge count as surface), distances from each surface pixel of one mask to the nearest
    surface pixel of the other via `distance_transform_edt`, both directions pooled, then the
    95th percentile (numpy's linear interpolation). Units are pixels.

Uncertainty
  * `bootstrap_ci`: percentile bootstrap over test items; all arrays share the resampled indices.
  * `seed_ci`: Student-t interval across seeds.
  * `ttest`: Welch's two-sided t-test by default (the seed variances of two methods need not be
    equal); `equal_var=True` gives Student's.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage, stats

# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------


def _as_labels(labels, name: str = "labels") -> np.ndarray:
  y = np.asarray(labels)
  if y.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
  if y.size and not np.all(np.equal(np.mod(y, 1), 0)):
    raise ValueError(f"{name} must hold integer class ids")
  return y.astype(np.int64)


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
  """(num_classes, num_classes) counts, rows = true class, columns = predicted class."""
  y = _as_labels(labels)
  p = _as_labels(preds, "preds")
  if y.shape != p.shape:
    raise ValueError(f"labels {y.shape} and preds {p.shape} differ in shape")
  for name, a in (("labels", y), ("preds", p)):
    if a.size and (a.min() < 0 or a.max() >= num_classes):
      raise ValueError(f"{name} must lie in [0, num_classes={num_classes})")
  return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(
      num_classes, num_classes)


def binary_auroc(labels, scores) -> float:
  """ROC AUC of `scores` for `labels` in {0, 1} (or bool); NaN if one class is missing."""
  y = np.asarray(labels).astype(bool).ravel()
  s = np.asarray(scores, dtype=np.float64).ravel()
  if y.shape != s.shape:
    raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  # Average ranks make each tied (positive, negative) pair count 1/2, as the ROC trapezoid does.
  ranks = stats.rankdata(s, method="average")
  u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def auroc(labels, probs, num_classes: int) -> float:
  """Binary: AUROC of the class-1 score. Multi-class: macro one-vs-rest over present classes."""
  y = _as_labels(labels)
  s = np.asarray(probs, dtype=np.float64)
  if num_classes == 2:
    score = s if s.ndim == 1 else s[:, 1]
    return binary_auroc(y == 1, score)
  if s.ndim != 2 or s.shape[1] != num_classes:
    raise ValueError(f"probs must have shape (N, num_classes={num_classes}), got {s.shape}")
  present = np.unique(y)
  if present.size < 2:
    return float("nan")
  return float(np.mean([binary_auroc(y == c, s[:, c]) for c in present]))


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  num = np.asarray(num, dtype=np.float64)
  den = np.asarray(den, dtype=np.float64)
  out = np.zeros_like(num)
  ok = den != 0
  out[ok] = num[ok] / den[ok]
  return out


def classification_metrics(labels, probs, num_classes: int) -> dict[str, float]:
  """accuracy, balanced_accuracy, macro_f1, auroc, precision, recall, mcc (conventions in the module
  docstring).

  labels: (N,) int class ids. probs: (N, num_classes) scores (softmax probabilities or logits;
  only their order matters), or (N,) class-1 scores when num_classes == 2.
  """
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  y = _as_labels(labels)
  s = np.asarray(probs, dtype=np.float64)
  if s.ndim == 1:
    if num_classes != 2:
      raise ValueError("1-D probs are only allowed for num_classes == 2")
    pred = (s > 0.5).astype(np.int64)
  elif s.ndim == 2 and s.shape[1] == num_classes:
    pred = np.argmax(s, axis=1)
  else:
    raise ValueError(f"probs must have shape (N, num_classes={num_classes}), got {s.shape}")
  if s.shape[0] != y.shape[0]:
    raise ValueError(f"labels has {y.shape[0]} items but probs has {s.shape[0]}")
  if y.size == 0:
    raise ValueError("labels is empty")

  cm = confusion_matrix(y, pred, num_classes)
  tp = np.diag(cm).astype(np.float64)
  true_sum = cm.sum(axis=1).astype(np.float64)
  pred_sum = cm.sum(axis=0).astype(np.float64)
  present = (true_sum > 0) | (pred_sum > 0)

  precision = _safe_div(tp, pred_sum)[present]
  recall = _safe_div(tp, true_sum)[present]
  f1 = _safe_div(2.0 * tp, true_sum + pred_sum)[present]

  # Matthews correlation for K classes, written through the confusion-matrix marginals.
  n = true_sum.sum()
  cov_tp = tp.sum() * n - np.dot(true_sum, pred_sum)
  cov_pp = n * n - np.dot(pred_sum, pred_sum)
  cov_tt = n * n - np.dot(true_sum, true_sum)
  den = cov_pp * cov_tt
  mcc = 0.0 if den == 0 else float(cov_tp / np.sqrt(den))

  return {
      "accuracy": float(np.mean(pred == y)),
      "balanced_accuracy": float(np.mean(tp[true_sum > 0] / true_sum[true_sum > 0])),
      "macro_f1": float(np.mean(f1)),
      "auroc": auroc(y, s, num_classes),
      "precision": float(np.mean(precision)),
      "recall": float(np.mean(recall)),
      "mcc": mcc,
  }


# ----------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------


def _pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(pred).astype(bool)
  b = np.asarray(true).astype(bool)
  if a.shape != b.shape:
    raise ValueError(f"pred mask {a.shape} and true mask {b.shape} differ in shape")
  return a, b


def dice(pred, true) -> float:
  """2|A∩B| / (|A| + |B|) of two boolean masks; 1 when both are empty."""
  a, b = _pair(pred, true)
  den = int(a.sum()) + int(b.sum())
  if den == 0:
    return 1.0
  return 2.0 * int(np.logical_and(a, b).sum()) / den


def iou(pred, true) -> float:
  """|A∩B| / |A∪B| of two boolean masks; 1 when both are empty."""
  a, b = _pair(pred, true)
  union = int(np.logical_or(a, b).sum())
  if union == 0:
    return 1.0
  return int(np.logical_and(a, b).sum()) / union


def sensitivity(pred, true) -> float:
  """TP / (TP + FN); NaN when `true` has no positive pixel."""
  a, b = _pair(pred, true)
  pos = int(b.sum())
  if pos == 0:
    return float("nan")
  return int(np.logical_and(a, b).sum()) / pos


def pixel_accuracy(pred, true) -> float:
  """Fraction of pixels whose value (class id, or boolean) agrees."""
  a = np.asarray(pred)
  b = np.asarray(true)
  if a.shape != b.shape:
    raise ValueError(f"pred mask {a.shape} and true mask {b.shape} differ in shape")
  return float(np.mean(a == b))


def surface(mask) -> np.ndarray:
  """Boundary pixels: the mask minus its erosion by the 4-connected cross (edges count)."""
  m = np.asarray(mask).astype(bool)
  structure = ndimage.generate_binary_structure(m.ndim, 1)
  return m & ~ndimage.binary_erosion(m, structure=structure, iterations=1, border_value=0)


def _surface_distances(src_surface: np.ndarray, ref_surface: np.ndarray) -> np.ndarray:
  # The EDT of the complement holds, at every pixel, the distance to the nearest reference-surface
  # pixel.
  dt = ndimage.distance_transform_edt(~ref_surface)
  return dt[src_surface]


def hd95(pred, true) -> float:
  """Symmetric 95th-percentile Hausdorff distance in pixels (MedPy's definition).

  Both empty -> 0; exactly one empty -> image diagonal sqrt((H-1)^2 + (W-1)^2).
  """
  a, b = _pair(pred, true)
  ea, eb = not a.any(), not b.any()
  if ea and eb:
    return 0.0
  if ea or eb:
    return float(math.sqrt(sum((d - 1) ** 2 for d in a.shape)))
  sa, sb = surface(a), surface(b)
  d = np.concatenate([_surface_distances(sa, sb), _surface_distances(sb, sa)])
  return float(np.percentile(d, 95))


def _label_maps(masks, num_classes: int, name: str) -> np.ndarray:
  m = np.asarray(masks)
  if m.ndim == 4 and m.shape[-1] == 1:
    m = m[..., 0]
  elif m.ndim == 4 and m.shape[-1] == num_classes:
    m = np.argmax(m, axis=-1)  # per-class scores / one-hot -> label map
  if m.ndim == 2:
    m = m[None]
  if m.ndim != 3:
    raise ValueError(f"{name} must be (N, H, W) label maps, (N, H, W, 1) or "
                     f"(N, H, W, num_classes), got shape {np.asarray(masks).shape}")
  if m.dtype == bool:
    m = m.astype(np.int64)
  return m


def segmentation_metrics(pred_masks, true_masks, num_classes: int,
                         include_background: bool = False) -> dict[str, Any]:
  """Per-image DSC, IoU, HD95, pixel accuracy and sensitivity, and their means.

  pred_masks, true_masks: (N, H, W) integer label maps in [0, num_classes) (also accepted:
  (N, H, W, 1), or (N, H, W, num_classes) scores that are argmax-ed, or a single (H, W) map).
  Class-wise metrics run over the foreground classes 1..num_classes-1 (class 0 too when
  `include_background`); num_classes == 2 is the binary case (class 1 only).

  Returns, for m in dice/iou/hd95/sensitivity: `m_per_class` (N, K), `m` (N,) = per-image mean
  over classes (NaN-skipping), `m_mean` = mean over images (NaN-skipping); `pixel_accuracy` (N,)
  over all classes and `pixel_accuracy_mean`; `classes` = the K class ids evaluated.
  """
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  p = _label_maps(pred_masks, num_classes, "pred_masks")
  t = _label_maps(true_masks, num_classes, "true_masks")
  if p.shape != t.shape:
    raise ValueError(f"pred_masks {p.shape} and true_masks {t.shape} differ in shape")
  classes = list(range(0 if include_background else 1, num_classes))
  fns = {"dice": dice, "iou": iou, "hd95": hd95, "sensitivity": sensitivity}
  out: dict[str, Any] = {"classes": classes}
  per = {k: np.empty((p.shape[0], len(classes))) for k in fns}
  for i in range(p.shape[0]):
    for j, c in enumerate(classes):
      pc, tc = p[i] == c, t[i] == c
      for k, fn in fns.items():
        per[k][i, j] = fn(pc, tc)
  for k in fns:
    out[f"{k}_per_class"] = per[k]
    out[k] = nanmean(per[k], axis=1)
    out[f"{k}_mean"] = float(nanmean(out[k]))
  out["pixel_accuracy"] = np.array([pixel_accuracy(p[i], t[i]) for i in range(p.shape[0])])
  out["pixel_accuracy_mean"] = float(np.mean(out["pixel_accuracy"]))
  return out


def nanmean(x, axis=None):
  """np.nanmean without the all-NaN RuntimeWarning (all-NaN slices give NaN)."""
  x = np.asarray(x, dtype=np.float64)
  ok = ~np.isnan(x)
  cnt = ok.sum(axis=axis)
  tot = np.where(ok, x, 0.0).sum(axis=axis)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


# ----------------------------------------------------------------------------------------------
# Uncertainty
# ----------------------------------------------------------------------------------------------


def bootstrap_ci(metric_fn: Callable[..., Any], *arrays, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0):
  """Percentile bootstrap CI of `metric_fn(*arrays)` over test items.

  All arrays share their leading axis (the test items) and are resampled with the same indices.
  Returns (point, lo, hi), point being the metric on the full data. If `metric_fn` returns a dict
  of scalars, returns {name: (point, lo, hi)}. Resamples where the metric is NaN (e.g. AUROC on a
  resample with a single class) are dropped; if all are, lo = hi = NaN.
  """
  if not arrays:
    raise ValueError("bootstrap_ci needs at least one array")
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
  if n_boot < 1:
    raise ValueError(f"n_boot must be >= 1, got {n_boot}")
  arrs = [np.asarray(a) for a in arrays]
  n = arrs[0].shape[0]
  if any(a.shape[0] != n for a in arrs):
    raise ValueError(f"arrays differ in length: {[a.shape[0] for a in arrs]}")
  point = metric_fn(*arrs)
  is_dict = isinstance(point, dict)
  keys = list(point) if is_dict else [None]
  rng = np.random.default_rng(seed)
  samples = np.empty((n_boot, len(keys)))
  for b in range(n_boot):
    idx = rng.integers(0, n, size=n)
    v = metric_fn(*(a[idx] for a in arrs))
    samples[b] = [v[k] for k in keys] if is_dict else [v]
  q = [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)]
  res = {}
  for j, k in enumerate(keys):
    s = samples[:, j]
    s = s[~np.isnan(s)]
    lo, hi = np.percentile(s, q) if s.size else (np.nan, np.nan)
    res[k] = (float(point[k] if is_dict else point), float(lo), float(hi))
  return res if is_dict else res[None]


def seed_ci(values, alpha: float = 0.05) -> tuple[float, float, float]:
  """(mean, lo, hi): mean ± t_{1-alpha/2, n-1} · s / sqrt(n) across seeds (s with ddof=1).

  With a single value the interval is undefined: (value, NaN, NaN).
  """
  v = np.asarray(values, dtype=np.float64).ravel()
  if v.size == 0:
    raise ValueError("seed_ci needs at least one value")
  m = float(np.mean(v))
  if v.size < 2:
    return m, float("nan"), float("nan")
  half = stats.t.ppf(1.0 - alpha / 2.0, v.size - 1) * np.std(v, ddof=1) / math.sqrt(v.size)
  return m, float(m - half), float(m + half)


def ttest(a, b, equal_var: bool = False) -> tuple[float, float]:
  """Two-sided t-test between two methods' per-seed results: Welch's unless equal_var. (t, p)."""
  r = stats.ttest_ind(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                      equal_var=equal_var)
  return float(r.statistic), float(r.pvalue)


# ----------------------------------------------------------------------------------------------
# Label efficiency
# ----------------------------------------------------------------------------------------------


def stratified_subset(labels, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of a class-stratified `fraction` of the items.

  Each class c gets its own permutation, drawn from `default_rng([seed, c])`, so the subset depends
  on (labels, seed) only, never on which method asks. A class of n_c items contributes the first
  round(fraction · n_c) items of its permutation (at least 1 when fraction > 0): subsets for the
  same seed are nested, e.g. the 20% subset ⊂ the 40% subset.
  """
  y = _as_labels(labels)
  if y.size and y.min() < 0:
    raise ValueError("labels must be non-negative class ids")
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
  if fraction == 0.0:
    return np.zeros(0, dtype=np.int64)
  parts = []
  for c in np.unique(y):
    idx = np.flatnonzero(y == c)
    perm = np.random.default_rng([int(seed), int(c)]).permutation(idx)
    # Round half up with a small slack so fractions like 0.6 * 5 = 3.0000000000000004 stay exact.
    k = int(math.floor(fraction * idx.size + 0.5 + 1e-9))
    parts.append(perm[:min(idx.size, max(1, k))])
  return np.sort(np.concatenate(parts)).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def _fmt_metric(v, digits: int) -> str:
  """Seeds (list/array) -> 'mean ± std [lo, hi]' (sample std, 95% t-interval of the mean);
  (point, lo, hi) or dict -> 'point [lo, hi]' (e.g. a bootstrap CI); a scalar -> itself."""
  f = lambda x: "nan" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"  # noqa: E731
  if v is None:
    return "—"
  if isinstance(v, dict):
    if "mean" in v and "lo" in v and "hi" in v:
      return f"{f(v['mean'])} [{f(v['lo'])}, {f(v['hi'])}]"
    raise ValueError(f"metric dict needs keys mean/lo/hi, got {sorted(v)}")
  if isinstance(v, tuple) and len(v) == 3:
    return f"{f(v[0])} [{f(v[1])}, {f(v[2])}]"
  if isinstance(v, (list, np.ndarray)):
    # Seeds: mean ± sample std (ddof 1; USFM's tables) and the 95% Student-t interval of the mean.
    arr = np.asarray(v, dtype=np.float64).ravel()
    m, lo, hi = seed_ci(arr)
    if arr.size < 2:
      return f(m)
    return f"{f(m)} ± {f(float(np.std(arr, ddof=1)))} [{f(lo)}, {f(hi)}]"
  return f(float(v))


def results_table(rows: list[dict], metrics: list[str], digits: int = 4) -> str:
  """Markdown table: label columns (the rows' other keys, in first-seen order), then `metrics`.

  A metric value is a list/array of per-seed results (shown as mean ± sample std [95% t-interval],
  see `seed_ci`), a (point, lo, hi) tuple or {'mean', 'lo', 'hi'} dict (shown as point [lo, hi],
  e.g. a bootstrap CI), or a scalar. Missing values show as '—'.
  """
  label_cols: list[str] = []
  for r in rows:
    for k in r:
      if k not in metrics and k not in label_cols:
        label_cols.append(k)
  cols = label_cols + list(metrics)
  lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
  for r in rows:
    cells = [str(r.get(k, "—")) for k in label_cols]
    cells += [_fmt_metric(r.get(m), digits) for m in metrics]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, np.generic):
    return _jsonable(x.item())
  if isinstance(x, float) and not math.isfinite(x):
    return None  # strict JSON has no NaN / inf
  return x


def write_results(workdir: str, name: str, results, metrics: Sequence[str] | None = None,
                  digits: int = 4) -> tuple[str, str]:
  """Write `<workdir>/<name>.json` and `<workdir>/<name>.md`; returns both paths.

  results: a list of row dicts (as for `results_table`) or a dict with a 'rows' list (other keys are
  kept in the JSON). metrics: the metric columns; by default every key whose value is not a string
  in some row. NaN / inf are written as null.
  """
  if isinstance(results, dict):
    if "rows" not in results:
      raise ValueError("results dict must have a 'rows' list")
    rows = list(results["rows"])
  else:
    rows = list(results)
  if metrics is None:
    metrics = []
    for r in rows:
      for k, v in r.items():
        if not isinstance(v, str) and k not in metrics:
          metrics.append(k)
  os.makedirs(workdir, exist_ok=True)
  json_path = os.path.join(workdir, f"{name}.json")
  md_path = os.path.join(workdir, f"{name}.md")
  with open(json_path, "w") as fh:
    json.dump(_jsonable(results), fh, indent=2, allow_nan=False)
  with open(md_path, "w") as fh:
    fh.write(f"# {name}\n\n")
    fh.write(results_table(rows, list(metrics), digits=digits))
  return json_path, md_path
