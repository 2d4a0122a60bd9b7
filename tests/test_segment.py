"""Segmentation fine-tuning (USFM §4.1.2): losses against numpy, the per-image metric table and its
aggregation against `evaluate` on constructed masks (empty ones included), scoring at each image's
stored size (the logits resize against torch's F.interpolate, a hand-computed case where it changes
the score, two image sizes in one evaluation), the label-efficiency strata, and end to end — smoke
pretraining, then UperNet fine-tuning beats the all-background and the all-lesion predictors on the
built-in dataset's test split, scored against its stored 128-px masks."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mae_jax import evaluate
from mae_jax.data import sources
from mae_jax.train import downstream, segment, sharding
from tests import downstream_runs
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


# ------------------------------------------------------------------------- native resolution


def _torch_resize(logits, size):
  x = torch.from_numpy(np.ascontiguousarray(logits)).permute(2, 0, 1)[None]
  return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("shape_in,size", [((8, 8), (32, 32)), ((32, 32), (128, 128)),
                                           ((224, 224), (97, 131)), ((7, 5), (13, 29)),
                                           ((20, 30), (9, 45)), ((56, 56), (600, 333)),
                                           ((6, 9), (6, 9))])
def test_resize_logits_is_torch_bilinear(shape_in, size):
  x = np.random.default_rng(sum(shape_in + size)).normal(size=shape_in + (3,)).astype(np.float32)
  ours = segment.resize_logits(x, size)
  assert ours.shape == size + (3,) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, _torch_resize(x, size), atol=2e-6, rtol=0)
  # The jax spelling of the same resize (the model's own, `upernet.resize_bilinear`).
  jx = np.asarray(jax.image.resize(jnp.asarray(x), size + (3,), "linear", antialias=False))
  np.testing.assert_allclose(ours, jx, atol=1e-5, rtol=0)
  lab = segment.native_labels(x, size)
  assert lab.dtype == np.uint8 and lab.shape == size
  np.testing.assert_array_equal(lab, np.argmax(_torch_resize(x, size), -1))


def test_native_score_differs_from_model_resolution_score():
  # Model grid 4×4, image 8×8. The model says lesion at model pixel (1, 1) only.
  logits = np.zeros((4, 4, 2), np.float32)
  logits[..., 1] = -1.0
  logits[1, 1, 1] = 1.0
  # The stored lesion: rows 2-3, columns 2-4 of the 8×8 image (6 pixels).
  true = np.zeros((8, 8), np.uint8)
  true[2:4, 2:5] = 1
  # Bilinear ×2 gives model row/column 1 the weights .25, .75, .75, .25 on image rows/columns 1..4,
  # so lesion − background = 2·w_r·w_c − 1 > 0 only where both are .75: rows 2-3, columns 2-3.
  pred = segment.native_labels(logits, (8, 8))
  want = np.zeros((8, 8), np.uint8)
  want[2:4, 2:4] = 1
  np.testing.assert_array_equal(pred, want)
  native = segment.per_image_metrics([pred], [true], 2)
  assert native["dice"][0] == pytest.approx(2 * 4 / (4 + 6))  # 0.8
  assert native["iou"][0] == pytest.approx(4 / 6)
  assert native["sensitivity"][0] == pytest.approx(4 / 6)
  assert native["pixel_accuracy"][0] == pytest.approx(62 / 64)
  # Column 4 of the truth is 1 px from the prediction; 2 of the 10 surface distances are 1, the
  # 95th percentile of [0]*8 + [1, 1] is 1.
  assert native["hd95"][0] == pytest.approx(1.0)
  # The old way: the mask resized nearest-neighbour to the model grid (PIL samples image rows and
  # columns 1, 3, 5, 7) keeps the lesion's pixel (3, 3) only, which the model hits exactly.
  small = np.asarray(Image.fromarray(true).resize((4, 4), Image.NEAREST))
  want_small = np.zeros((4, 4), np.uint8)
  want_small[1, 1] = 1
  np.testing.assert_array_equal(small, want_small)
  model_res = segment.per_image_metrics(np.argmax(logits, -1)[None], small[None], 2)
  assert model_res["dice"][0] == 1.0 and model_res["hd95"][0] == 0.0


class _Sized:
  """A split whose images differ in size; every record's mask is its own."""

  def __init__(self, sizes, seed=0):
    rng = np.random.default_rng(seed)
    self.records = []
    for k, (h, w) in enumerate(sizes):
      mask = np.zeros((h, w, 1), np.uint8)
      if k != 1:  # record 1 has an empty truth
        mask[h // 4: h // 2 + 2, w // 3: w // 3 + 5] = 1
      self.records.append({"image": rng.integers(0, 256, (h, w, 1), dtype=np.uint8), "mask": mask,
                           "label": k})

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


class _NoTransfer:
  def lookup(self, split, index, zoom=None):
    return {}


def test_images_of_two_sizes_scored_at_their_own_size(tmp_path):
  sizes = [(12, 20), (30, 18), (25, 25)]
  src = downstream.Positional(_Sized(sizes))
  # Fixed model-resolution logits per record, leaning to lesion so the empty truth gets a false alarm.
  table = np.random.default_rng(3).normal(size=(3, 8, 8, 2)).astype(np.float32)
  table[..., 1] += 0.3

  @jax.jit
  def eval_fn(batch):
    return {"logits": jnp.asarray(table)[jnp.maximum(batch["index"], 0)], "valid": batch["valid"],
            "index": batch["index"]}

  c = load_config("segment", "smoke")
  c.train.eval_batch_size = 2  # records 0 and 1 (12×20 and 30×18) share a batch; one padding row
  p = downstream.predict(eval_fn, (), src, "test", _NoTransfer(), config=c, image_size=8, in_chans=1,
                         mesh=sharding.make_mesh(1), with_mask=False, unused=segment.UNUSED,
                         host_fn=lambda rows: segment.native_predictions(rows, src.source))
  assert p["index"].tolist() == [0, 1, 2]
  assert [m.shape for m in p["pred"]] == [m.shape for m in p["mask"]] == sizes
  per = segment.per_image_metrics(p["pred"], p["mask"], 2)
  # Independent reference: torch's resize of the same logits to each stored size, `evaluate` on the
  # stored masks.
  for i, (h, w) in enumerate(sizes):
    ref = np.argmax(_torch_resize(table[i], (h, w)), -1)
    true = src.source[i]["mask"][..., 0]
    np.testing.assert_array_equal(p["mask"][i], true)
    np.testing.assert_array_equal(p["pred"][i], ref)
    assert per["dice"][i] == pytest.approx(evaluate.dice(ref, true))
    assert per["pixel_accuracy"][i] == pytest.approx(np.mean(ref == true))
    if i != 1:
      assert per["hd95"][i] == pytest.approx(evaluate.hd95(ref, true))
  # Image 1: empty truth, a false alarm: HD95 is its own diagonal, not the model grid's (≈ 9.9).
  assert p["pred"][1].any() and per["dice"][1] == 0.0
  assert per["hd95"][1] == pytest.approx(np.hypot(29, 17))
  np.testing.assert_allclose(segment.per_image_dice(p["pred"], p["mask"], 2), per["dice"])
  b = segment.baseline_dice(p["mask"], 2)
  assert b["all_background"] == pytest.approx(1 / 3)
  assert b["all_class_1"] == pytest.approx(np.mean([evaluate.dice(np.ones_like(m), m) for m in p["mask"]]))
  # Mixed sizes are saved one array per image, without pickled objects.
  path = str(tmp_path / "p.npz")
  segment.save_predictions(path, p["pred"], p["mask"], p["index"], ["background", "lesion"])
  z = np.load(path)
  assert z["shape"].tolist() == [list(s) for s in sizes] and "pred" not in z.files
  for i in range(3):
    np.testing.assert_array_equal(z[f"pred_{i}"], p["pred"][i])
    np.testing.assert_array_equal(z[f"mask_{i}"], p["mask"][i])
  with pytest.raises(ValueError, match="label maps"):
    segment.per_image_metrics([np.zeros((2, 3, 3))], [np.zeros((2, 3, 3))], 2)


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
  pre = downstream_runs.mae_smoke_pretrain(tmp_path_factory)
  wd = str(tmp_path_factory.mktemp("seg"))
  return wd, segment.run(load_config("segment", f"smoke,init_from={pre}"), wd)


def test_segmentation_beats_label_blind_predictors(segmented):
  wd, res = segmented
  pred = np.load(os.path.join(wd, "predictions_test.npz"))
  true, ours = pred["mask"], pred["pred"]
  # Scored at the stored 128 px (the model sees 32 px), against the stored masks themselves.
  assert true.shape == ours.shape == (64, 128, 128) and set(np.unique(true)) == {0, 1}
  stored = sources.open_source(load_config("segment", "smoke").data, "test", task="segment")
  for i, pos in enumerate(pred["index"]):
    np.testing.assert_array_equal(true[i], np.asarray(stored[int(pos)]["mask"])[..., 0])
  # The baselines, computed here from the stored test masks with `evaluate` directly.
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
  assert out["test_image_sizes"] == {"128x128": 64}
  rows = open(os.path.join(wd, "metrics_test.csv")).read().splitlines()
  assert rows[0] == "position,height,width,dice,iou,hd95,pixel_accuracy,sensitivity" and len(rows) == 65
  assert all(r.split(",")[1:3] == ["128", "128"] for r in rows[1:])
  png = os.path.join(wd, "overlays_test.png")
  assert os.path.getsize(png) > 1000 and open(png, "rb").read(4) == b"\x89PNG"
  assert os.path.isdir(os.path.join(wd, "best", "checkpoints"))
