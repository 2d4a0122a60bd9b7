"""Segmentation fine-tuning (USFM §4.1.2): losses against numpy, the per-image metric table and its
aggregation against `evaluate` on constructed masks (empty ones included), the label-efficiency
strata, and end to end — smoke pretraining, then UperNet fine-tuning beats the all-background and
the all-lesion predictors on the built-in dataset's test split."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import evaluate
from mae_jax.train import pretrain, segment
from tests.conftest import load_config

# ------------------------------------------------------------------------------------ losses


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("batch", [False, True])
def test_dice_and_cross_entropy_losses_match_numpy(batch):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 6, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (3, 5, 6))
  labels[1] = 0  # an image without foreground
  p = _softmax(logits.astype(np.float64))
  g = np.eye(3)[labels]
  if batch:
    d = [(2 * (p[..., c] * g[..., c]).sum() + 1) / (p[..., c].sum() + g[..., c].sum() + 1) for c in (1, 2)]
  else:
    d = [(2 * (p[i, ..., c] * g[i, ..., c]).sum() + 1) / (p[i, ..., c].sum() + g[i, ..., c].sum() + 1)
         for i in range(3) for c in (1, 2)]
  ours = segment.dice_loss(jnp.asarray(logits), jnp.asarray(labels), 3, 1.0, batch)
  assert float(ours) == pytest.approx(1 - np.mean(d), rel=1e-5)
  ce = -np.mean(np.log(np.take_along_axis(p, labels[..., None], -1)))
  assert float(segment.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))) == pytest.approx(ce, rel=1e-5)


# ----------------------------------------------------------------------------------- metrics


def _masks():
  """Binary (N, 16, 16) pairs covering every empty-mask case and partial overlaps."""
  n, s = 6, 16
  pred = np.zeros((n, s, s), np.uint8)
  true = np.zeros((n, s, s), np.uint8)
  # 0: both empty. 1: truth only (a miss). 2: prediction only (a false alarm).
  true[1, 4:8, 4:8] = 1
  pred[2, 2:5, 9:12] = 1
  # 3: partial overlap. 4: exact. 5: disjoint blobs.
  true[3, 3:10, 3:10] = 1
  pred[3, 5:12, 4:9] = 1
  true[4, 0:6, 10:16] = 1
  pred[4] = true[4]
  true[5, 1:4, 1:4] = 1
  pred[5, 11:15, 12:15] = 1
  return pred, true


def test_per_image_metrics_and_aggregation_equal_evaluate():
  pred, true = _masks()
  per = segment.per_image_metrics(pred, true, 2)
  fns = {"dice": evaluate.dice, "iou": evaluate.iou, "hd95": evaluate.hd95,
         "sensitivity": evaluate.sensitivity, "pixel_accuracy": evaluate.pixel_accuracy}
  for k, fn in fns.items():
    ref = np.array([fn(pred[i], true[i]) for i in range(len(pred))])
    np.testing.assert_allclose(per[k], ref, equal_nan=True, err_msg=k)
  # The documented conventions on the empty cases.
  diag = np.hypot(15, 15)
  assert per["dice"][:3].tolist() == [1.0, 0.0, 0.0] and per["iou"][:3].tolist() == [1.0, 0.0, 0.0]
  assert per["hd95"][0] == 0.0
  assert per["hd95"][1] == pytest.approx(diag) and per["hd95"][2] == pytest.approx(diag)
  assert np.isnan(per["sensitivity"][0]) and np.isnan(per["sensitivity"][2])
  # Means: NaN-skipping (sensitivity over the 4 images with foreground), with bootstrap intervals.
  agg = segment.aggregate(per, n_boot=200, alpha=0.05, seed=0)
  for k in segment.METRICS:
    point, lo, hi = agg[k]
    assert point == pytest.approx(float(np.nanmean(per[k])))
    assert lo <= point <= hi
  assert agg["sensitivity"][0] == pytest.approx(np.mean(per["sensitivity"][[1, 3, 4, 5]]))
  m = evaluate.segmentation_metrics(pred, true, 2)
  assert agg["dice"][0] == pytest.approx(m["dice_mean"]) and agg["hd95"][0] == pytest.approx(m["hd95_mean"])
  # The validation score is the same Dice.
  np.testing.assert_allclose(segment.per_image_dice(pred, true, 2), per["dice"])


def test_multiclass_metrics_average_foreground_classes():
  rng = np.random.default_rng(1)
  true = rng.integers(0, 3, (4, 12, 12)).astype(np.uint8)
  pred = np.where(rng.random((4, 12, 12)) < 0.7, true, rng.integers(0, 3, (4, 12, 12))).astype(np.uint8)
  true[0][true[0] == 2] = 0  # class 2 absent in image 0's truth
  per = segment.per_image_metrics(pred, true, 3)
  ref = np.array([[evaluate.dice(pred[i] == c, true[i] == c) for c in (1, 2)] for i in range(4)])
  np.testing.assert_allclose(per["dice_per_class"], ref)
  np.testing.assert_allclose(per["dice"], ref.mean(1))
  np.testing.assert_allclose(segment.per_image_dice(pred, true, 3), ref.mean(1))


def test_baselines_and_overlay_choice():
  _, true = _masks()
  b = segment.baseline_dice(true, 2)
  # All background: Dice 1 on the two empty truths (images 0 and 2), 0 elsewhere.
  assert b["all_background"] == pytest.approx(2 / 6)
  ref = np.mean([evaluate.dice(np.ones_like(t), t) for t in true])
  assert b["all_class_1"] == pytest.approx(ref)
  sel = segment.pick_overlays(true, 4)
  assert len(sel) == 4 and len(set(sel)) == 4 and {0, 2} & set(sel.tolist())  # some empty truths too


class _Records:
  def __init__(self, labels, masks):
    self.labels = None if labels is None else np.asarray(labels)
    self.masks = masks

  def __len__(self):
    return len(self.masks)

  def __getitem__(self, i):
    return {"mask": self.masks[i], "label": -1 if self.labels is None else int(self.labels[i])}


def test_label_efficiency_strata():
  masks = [np.zeros((4, 4, 1), np.uint8) for _ in range(10)]
  for i in (1, 4, 7, 8):
    masks[i][1, 1] = 1
  labels, what = segment.strata(_Records([0, 1, 2] * 3 + [0], masks))
  assert what == "class label" and labels.tolist() == [0, 1, 2] * 3 + [0]
  labels, what = segment.strata(_Records(None, masks))
  assert what == "lesion present" and labels.tolist() == [0, 1, 0, 0, 1, 0, 0, 1, 1, 0]
  rows = evaluate.stratified_subset(labels, 0.5, 0)
  assert int(labels[rows].sum()) == 2 and len(rows) == 5


def test_config_errors_name_the_field(tmp_path):
  c = load_config("segment", "smoke")
  with pytest.raises(ValueError, match="config.init_from"):
    segment.run(c, str(tmp_path / "a"))
  c.init_from = str(tmp_path)
  c.model.channels = 0
  with pytest.raises(ValueError, match="config.model.channels"):
    segment.run(c, str(tmp_path / "b"))
  with pytest.raises(ValueError, match="config.model.pool_scales"):
    segment.parse_ints("1,x", "model.pool_scales")


# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
  pre = str(tmp_path_factory.mktemp("mae_smoke_pretrain"))
  c = load_config("mae", "smoke")
  c.train.image_every = 0  # no preview images: they compile a second function
  pretrain.train(c, pre)
  wd = str(tmp_path_factory.mktemp("seg"))
  return wd, segment.run(load_config("segment", f"smoke,init_from={pre}"), wd)


def test_segmentation_beats_label_blind_predictors(segmented):
  wd, res = segmented
  pred = np.load(os.path.join(wd, "predictions_test.npz"))
  true, ours = pred["mask"], pred["pred"]
  assert true.shape == ours.shape == (64, 32, 32) and set(np.unique(true)) == {0, 1}
  # The baselines, computed here from the test masks with `evaluate` directly.
  all_bg = np.mean([evaluate.dice(np.zeros_like(t), t) for t in true])
  all_lesion = np.mean([evaluate.dice(np.ones_like(t), t) for t in true])
  dice = np.mean([evaluate.dice(p, t) for p, t in zip(ours, true)])
  assert res["test"]["dice"] == pytest.approx(dice)
  assert dice > all_bg + 0.08 and dice > all_lesion + 0.3, (dice, all_bg, all_lesion)
  # It finds lesions, not just empty images: Dice on the images that have one.
  has = true.reshape(64, -1).max(1) > 0
  assert np.mean([evaluate.dice(p, t) for p, t in zip(ours[has], true[has])]) > 0.15
  # Paired bootstrap over test images: the gain over all-background is above 0.
  gain = np.array([evaluate.dice(p, t) - evaluate.dice(np.zeros_like(t), t) for p, t in zip(ours, true)])
  _, lo, _ = evaluate.bootstrap_ci(np.mean, gain, n_boot=500, seed=0)
  assert lo > 0, gain


def test_segmentation_outputs(segmented):
  wd, res = segmented
  with open(os.path.join(wd, "results.json")) as f:
    out = json.load(f)
  for k in segment.METRICS:
    t = out["test"][k]
    assert t["lo"] <= t["value"] <= t["hi"], k
  assert out["classes"] == ["background", "lesion"] and out["feature_blocks"] == [1, 1, 1, 2]
  assert out["baselines_dice"]["all_background"] == pytest.approx(res["baselines_dice"]["all_background"])
  assert out["validation_best"]["dice"] == max(h["dice"] for h in out["validation_history"])
  assert len(out["validation_history"]) == 40 and out["layer_decay"] == 0.75
  md = open(os.path.join(wd, "results.md")).read()
  assert "hd95" in md and "sensitivity" in md and "[" in md
  rows = open(os.path.join(wd, "metrics_test.csv")).read().splitlines()
  assert rows[0] == "position,dice,iou,hd95,pixel_accuracy,sensitivity" and len(rows) == 65
  png = os.path.join(wd, "overlays_test.png")
  assert os.path.getsize(png) > 1000 and open(png, "rb").read(4) == b"\x89PNG"
  assert os.path.isdir(os.path.join(wd, "best", "checkpoints"))
