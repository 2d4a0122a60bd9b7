"""grain training / evaluation streams: determinism, resume, sharding, crops against torchvision."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from mae_jax.data import pipeline as P

S = 32


def _fake_source(n=23, h=48, w=40, with_mask=False):
  """Records like us_phantom's: each image carries its own index as a random texture seed."""
  out = []
  for i in range(n):
    rng = np.random.default_rng(i)
    rec = {
        "image": rng.integers(0, 256, (h, w, 1), dtype=np.uint8),
        "organ": i % 3,
        "label": i % 2,
        "index": i,
    }
    if with_mask:
      rec["mask"] = (rng.random((h, w, 1)) < 0.3).astype(np.uint8) * 2
    out.append(rec)
  return out


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout():
  src = _fake_source(with_mask=True)
  b = next(P.train_iterator(src, global_batch=4, image_size=S, seed=0))
  assert b["image"].shape == (4, S, S, 1) and b["image"].dtype == np.uint8
  assert b["mask"].shape == (4, S, S, 1) and b["mask"].dtype == np.uint8
  assert set(np.unique(b["mask"])) <= {0, 2}  # nearest-neighbour keeps class ids
  for k in ("organ", "label", "index"):
    assert b[k].shape == (4,) and b[k].dtype == np.int32
  np.testing.assert_array_equal(b["organ"], b["index"] % 3)
  b3 = next(P.train_iterator(src, global_batch=4, image_size=S, seed=0, in_chans=3))
  assert b3["image"].shape == (4, S, S, 3)
  np.testing.assert_array_equal(b3["image"][..., 0], b3["image"][..., 2])
  np.testing.assert_array_equal(b3["image"][..., :1], b["image"])


@pytest.mark.parametrize("sampler", ["shuffle", "balanced"])
def test_deterministic_across_constructions(sampler):
  src = _fake_source()
  kw = dict(global_batch=6, image_size=S, sampler=sampler)
  a = _take(P.train_iterator(src, seed=3, num_threads=2, **kw), 9)
  b = _take(P.train_iterator(src, seed=3, num_threads=1, **kw), 9)
  _assert_batches_equal(a, b)
  c = _take(P.train_iterator(src, seed=4, **kw), 9)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_shuffle_visits_each_record_once_per_epoch():
  src = _fake_source(n=24)
  batches = _take(P.train_iterator(src, global_batch=6, image_size=S, seed=0), 8)
  idx = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(np.sort(idx[:24]), np.arange(24))
  np.testing.assert_array_equal(np.sort(idx[24:]), np.arange(24))
  assert not np.array_equal(idx[:24], idx[24:])


@pytest.mark.parametrize("sampler", ["shuffle", "balanced"])
def test_resume_from_state(sampler):
  src = _fake_source()
  kw = dict(global_batch=4, image_size=S, seed=1, sampler=sampler)
  it = P.train_iterator(src, **kw)
  _take(it, 5)  # crosses an epoch boundary of the 23-record source
  state = it.get_state()
  rest = _take(it, 7)
  it2 = P.train_iterator(src, **kw)
  _take(it2, 2)  # a resumed iterator may be anywhere before restoring
  it2.set_state(state)
  _assert_batches_equal(rest, _take(it2, 7))
  # Resuming by step number gives the same stream too.
  _assert_batches_equal(rest, _take(P.train_iterator(src, start_batch=5, **kw), 7))


def test_processes_concatenate_to_global_batch():
  src = _fake_source()
  for sampler in ("shuffle", "balanced"):
    kw = dict(global_batch=8, image_size=S, seed=2, sampler=sampler)
    whole = _take(P.train_iterator(src, **kw), 4)
    parts = [_take(P.train_iterator(src, process_index=p, process_count=2, **kw), 4) for p in range(2)]
    for b in range(4):
      for k in whole[b]:
        np.testing.assert_array_equal(
            np.concatenate([parts[0][b][k], parts[1][b][k]]), whole[b][k], err_msg=k
        )
    # Resuming one process with a different process count, by step number.
    p1 = _take(P.train_iterator(src, process_index=1, process_count=4, start_batch=2, **kw), 1)[0]
    np.testing.assert_array_equal(p1["image"], whole[2]["image"][2:4])


def test_crop_params_match_torchvision_distribution():
  rng = np.random.default_rng(0)
  torch.manual_seed(0)
  h, w = 48, 40
  ours = np.array([P.random_resized_crop_params(rng, h, w) for _ in range(3000)])
  img = torch.zeros(1, h, w)
  ref = np.array([RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)])
  for col in range(4):  # top, left, height, width
    assert stats.ks_2samp(ours[:, col], ref[:, col]).pvalue > 0.01, col
  area = ours[:, 2] * ours[:, 3] / (h * w)
  assert area.min() >= 0.18 and area.max() <= 1.0
  aspect = ours[:, 3] / ours[:, 2]
  assert aspect.min() > 0.7 and aspect.max() < 1.4


def test_crop_fallback_matches_torchvision():
  # No crop with area 1 and aspect in [3/4, 4/3] fits a 2:1 image: centre crop with aspect 4/3.
  for h, w in ((32, 64), (64, 32)):
    ours = P.random_resized_crop_params(np.random.default_rng(0), h, w, (1.0, 1.0))
    ref = RandomResizedCrop.get_params(torch.zeros(1, h, w), [1.0, 1.0], [3 / 4, 4 / 3])
    assert ours == tuple(ref)


def test_crop_resize_matches_torchvision():
  a = np.random.default_rng(0).integers(0, 256, (48, 40, 1), dtype=np.uint8)
  box = (5, 3, 30, 27)
  for mode, interp in (("bicubic", InterpolationMode.BICUBIC), ("bilinear", InterpolationMode.BILINEAR)):
    ours = P._crop_resize(a, box, S, P._RESAMPLE[mode])
    ref = TF.resized_crop(Image.fromarray(a[..., 0]), *box, [S, S], interp)
    np.testing.assert_array_equal(ours[..., 0], np.asarray(ref))


def test_crop_and_flip_on_gradient_image():
  h, w = 64, 64
  x = np.round(np.arange(w) * 255 / (w - 1)).astype(np.uint8)
  grad = np.broadcast_to(x[None, :, None], (h, w, 1)).copy()
  mask = np.broadcast_to((np.arange(w) < w // 2)[None, :, None], (h, w, 1)).astype(np.uint8)
  src = [{"image": grad, "mask": mask, "organ": 0, "label": 0, "index": i} for i in range(8)]
  batches = _take(P.train_iterator(src, global_batch=8, image_size=S, seed=0), 25)
  imgs = np.concatenate([b["image"] for b in batches]).astype(np.float64)[..., 0]
  masks = np.concatenate([b["mask"] for b in batches])[..., 0]
  row = imgs.mean(axis=1)  # (N, S) column profile
  increasing = row[:, -1] > row[:, 0]
  assert 0.35 < increasing.mean() < 0.65  # flips happen about half of the time
  # The crop width shows as the span of the gradient: 255 * (w_crop - 1) / (w - 1) roughly.
  span = np.abs(row[:, -1] - row[:, 0]) / 255
  assert span.min() > 0.3  # width >= sqrt(0.2 * 3/4) of the image
  assert span.max() > 0.9 and np.quantile(span, 0.25) < 0.75  # widths vary over the range
  # The mask follows the image: mask 1 (left half of the original) sits on the darker pixels.
  for img, m in zip(imgs, masks):
    if 0 < m.mean() < 1:
      assert img[m == 1].mean() < img[m == 0].mean()


def test_eval_covers_every_example_once():
  src = _fake_source(n=23, with_mask=True)
  n_batches = P.num_eval_batches(23, 8)
  assert n_batches == 3
  seen = []
  for p in range(2):
    batches = list(P.eval_iterator(src, batch_size=8, image_size=S, process_index=p, process_count=2))
    assert len(batches) == n_batches
    for b in batches:
      assert b["image"].shape == (4, S, S, 1) and b["mask"].shape == (4, S, S, 1)
      assert b["valid"].dtype == np.bool_
      seen += b["index"][b["valid"]].tolist()
      assert np.all(b["index"][~b["valid"]] == -1)
      assert np.all(b["image"][~b["valid"]] == 0)
  assert sorted(seen) == list(range(23))
  # Single process: order is dataset order, resize without crop matches PIL directly.
  batches = list(P.eval_iterator(src, batch_size=8, image_size=S))
  first = batches[0]
  np.testing.assert_array_equal(first["index"], np.arange(8))
  ref = np.asarray(Image.fromarray(src[3]["image"][..., 0]).resize((S, S), Image.BICUBIC))
  np.testing.assert_array_equal(first["image"][3, ..., 0], ref)
  ref_m = np.asarray(Image.fromarray(src[3]["mask"][..., 0]).resize((S, S), Image.NEAREST))
  np.testing.assert_array_equal(first["mask"][3, ..., 0], ref_m)
  assert batches[-1]["valid"].sum() == 23 - 16


def test_dataset_stats():
  src = _fake_source(n=10)
  m, s = P.dataset_stats(src)
  allpix = np.concatenate([r["image"].ravel() for r in src]) / 255.0
  assert m == pytest.approx(allpix.mean(), abs=1e-12)
  assert s == pytest.approx(allpix.std(), abs=1e-9)
  m4, _ = P.dataset_stats(src, n=4)
  sub = np.concatenate([src[i]["image"].ravel() for i in (0, 3, 6, 9)]) / 255.0
  assert m4 == pytest.approx(sub.mean(), abs=1e-12)


def test_bad_arguments():
  src = _fake_source(n=4)
  with pytest.raises(ValueError, match="global_batch"):
    P.train_iterator(src, global_batch=6, image_size=S, seed=0, process_count=4)
  with pytest.raises(ValueError, match="sampler"):
    P.train_iterator(src, global_batch=4, image_size=S, seed=0, sampler="x")
  with pytest.raises(ValueError, match="empty"):
    P.eval_iterator([], batch_size=4, image_size=S)


def test_worker_processes_give_the_same_stream():
  src = _fake_source()
  kw = dict(global_batch=4, image_size=S, seed=0)
  ref = _take(P.train_iterator(src, **kw), 6)
  it = P.train_iterator(src, worker_count=2, **kw)
  # Copies: worker batches live in shared memory that grain frees with the iterator.
  got = [{k: np.array(v) for k, v in b.items()} for b in _take(it, 4)]
  state = it.get_state()
  got += [{k: np.array(v) for k, v in b.items()} for b in _take(it, 2)]
  it.close()
  _assert_batches_equal(ref, got)
  it2 = P.train_iterator(src, worker_count=2, **kw)
  it2.set_state(state)
  resumed = [{k: np.array(v) for k, v in b.items()} for b in _take(it2, 2)]
  it2.close()
  _assert_batches_equal(ref[4:], resumed)


def test_us_phantom_source(tmp_path):
  from mae_jax.data import us_phantom
  kw = dict(num_train=12, num_validation=4, num_test=4, image_size=64, seed=0)
  train = us_phantom.data_source(str(tmp_path), "train", **kw)
  it = P.train_iterator(train, global_batch=4, image_size=S, seed=0, sampler="balanced")
  b = _take(it, 2)
  assert b[0]["image"].shape == (4, S, S, 1) and b[0]["mask"].shape == (4, S, S, 1)
  assert set(np.unique(np.concatenate([x["mask"] for x in b]))) <= {0, 1}
  for x in b:  # organ and label are the records' own
    for r in range(4):
      rec = train[int(x["index"][r])]
      assert (x["organ"][r], x["label"][r]) == (rec["organ"], rec["label"])
  val = us_phantom.data_source(str(tmp_path), "validation", **kw)
  batches = list(P.eval_iterator(val, batch_size=3, image_size=S))
  idx = np.concatenate([x["index"][x["valid"]] for x in batches])
  np.testing.assert_array_equal(idx, [int(val[i]["index"]) for i in range(len(val))])
  mean, std = P.dataset_stats(train)
  assert 0 < mean < 1 and 0 < std < 1
