"""Folder → dataset conversion: layouts, splits, conversions of odd files, skip reasons, errors."""

import json
import logging
import os
import pathlib
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mae_jax.data import folder, pipeline, sources
from mae_jax.data.folder import build_folder_dataset, folder_source


def _noise(seed, h=40, w=36):
  return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _save(path, array_or_image, **kw):
  path.parent.mkdir(parents=True, exist_ok=True)
  im = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
  im.save(path, **kw)


def _report(out):
  r = json.loads((out / "build_report.json").read_text())
  return {d["path"]: d["reason"] for d in r["skipped"]}, {d["path"]: d["conversion"] for d in r["converted"]}


def _records(out, split):
  src = folder_source(out, split)
  return src, [src[i] for i in range(len(src))]


def test_pretrain_with_broken_files(tmp_path):
  root = tmp_path / "raw"
  for i in range(5):
    _save(root / "liver" / f"l{i}.png", _noise(i))
  for i in range(3):
    _save(root / "thyroid" / f"t{i}.jpg", _noise(10 + i), quality=95)
  # 16-bit PNG with a narrow range: min-max scaled to the full 8-bit range.
  a16 = (1000 + np.arange(40 * 36).reshape(40, 36) * 3).astype(np.uint16)
  _save(root / "liver" / "deep" / "sixteen.png", a16)
  # RGBA: alpha dropped, ITU-R 601 luminance.
  rgba = np.random.default_rng(5).integers(0, 256, (40, 36, 4), dtype=np.uint8)
  _save(root / "thyroid" / "rgba.png", rgba)
  # Multi-frame TIFF: the first frame.
  frames = [Image.fromarray(np.full((40, 36), v, np.uint8)) for v in (17, 99, 200)]
  _save(root / "thyroid" / "stack.tif", frames[0], save_all=True, append_images=frames[1:])
  # Broken: truncated PNG, empty JPEG, text named .png, too small image, a hidden file, a note.
  _save(root / "liver" / "good_then_cut.png", _noise(99))
  data = (root / "liver" / "good_then_cut.png").read_bytes()
  (root / "liver" / "truncated.png").write_bytes(data[: len(data) // 2])
  (root / "liver" / "good_then_cut.png").unlink()
  (root / "thyroid" / "empty.jpg").write_bytes(b"")
  (root / "thyroid" / "notes.png").write_text("this is not an image")
  _save(root / "liver" / "tiny.png", _noise(7, 20, 50))
  (root / "liver" / ".DS_Store").write_bytes(b"\0\1")
  (root / "README.txt").write_text("hello")

  out = build_folder_dataset(root, tmp_path / "ds", task="pretrain", split_ratio=(3, 1, 1))
  skipped, converted = _report(out)
  assert skipped["liver/truncated.png"].startswith("truncated or corrupt image")
  assert skipped["thyroid/empty.jpg"] == "empty file (0 bytes)"
  assert skipped["thyroid/notes.png"].startswith("not a readable image")
  assert skipped["liver/tiny.png"] == "too small (50x20; min_size=32)"
  assert skipped["liver/.DS_Store"] == "hidden file"
  assert "not an image file extension" in skipped["README.txt"]
  assert "16-bit (I;16)" in converted["liver/deep/sixteen.png"]
  assert "RGBA: alpha channel dropped" in converted["thyroid/rgba.png"]
  assert "multi-frame (3 frames): first frame used" in converted["thyroid/stack.tif"]
  assert "liver/l0.png" not in converted  # already 8-bit grayscale

  meta = json.loads((out / "metadata.json").read_text())
  assert meta["organs"] == ["liver", "thyroid"]
  assert sum(meta["counts"].values()) == 6 + 5  # liver 5 + sixteen, thyroid 3 + rgba + stack
  by_path = {}
  for split in ("train", "validation", "test"):
    src, recs = _records(out, split)
    for path, rec in zip(src.paths, recs):
      assert rec["image"].dtype == np.uint8 and rec["image"].shape == (40, 36, 1)
      assert rec["label"] == -1 and rec["organ"] == (0 if path.startswith("liver") else 1)
      by_path[path] = rec["image"][..., 0]
  expected16 = np.round((a16 - 1000.0) / (a16.max() - 1000.0) * 255).astype(np.uint8)
  np.testing.assert_array_equal(by_path["liver/deep/sixteen.png"], expected16)
  rgb = rgba[..., :3].astype(np.float64)
  lum = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
  assert np.abs(by_path["thyroid/rgba.png"].astype(np.float64) - lum).max() <= 1.0
  assert np.all(by_path["thyroid/stack.tif"] == 17)
  np.testing.assert_array_equal(by_path["liver/l3.png"], _noise(3))

  # Mean/std over the train split, in [0, 1].
  train, recs = _records(out, "train")
  pix = np.concatenate([r["image"].ravel() for r in recs]) / 255.0
  assert meta["mean"] == pytest.approx(pix.mean(), abs=1e-9)
  assert meta["std"] == pytest.approx(pix.std(), abs=1e-9)
  np.testing.assert_array_equal(train.organ_ids, [r["organ"] for r in recs])
  # The pipeline reads it like any source, organ-balanced sampling included.
  b = next(pipeline.train_iterator(train, global_batch=4, image_size=32, seed=0, sampler="balanced"))
  assert b["image"].shape == (4, 32, 32, 1)


def test_stratified_split_counts_and_seed(tmp_path):
  root = tmp_path / "raw"
  for k, (c, n) in enumerate((("benign", 10), ("malignant", 5), ("normal", 7))):
    for i in range(n):
      _save(root / c / f"{c}{i}.png", _noise(100 * k + i))
  out = build_folder_dataset(root, tmp_path / "a", task="classify", split_seed=0)
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["classes"] == ["benign", "malignant", "normal"]
  assert meta["split_source"] == "stratified"
  # Largest remainder of 3:1:1 per class: 10 → 6/2/2, 5 → 3/1/1, 7 → 4.2/1.4/1.4 → 4/2/1
  # (the leftover image goes to the largest remainder, ties to the earlier split).
  assert meta["counts_per_group"]["train"] == {"benign": 6, "malignant": 3, "normal": 4}
  assert meta["counts_per_group"]["validation"] == {"benign": 2, "malignant": 1, "normal": 2}
  assert meta["counts_per_group"]["test"] == {"benign": 2, "malignant": 1, "normal": 1}
  assert meta["counts"] == {"train": 13, "validation": 5, "test": 4}
  src, recs = _records(out, "validation")
  assert [r["label"] for r in recs] == [0, 0, 1, 2, 2] and all(r["organ"] == -1 for r in recs)
  assert [r["index"] for r in recs] == [13, 14, 15, 16, 17]  # unique across splits, train first
  every = sum((folder_source(out, s).paths for s in ("train", "val", "test")), [])
  assert sorted(every) == sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
  # Rebuilding with the same options reuses the dataset; same seed → same split elsewhere too.
  stamp = (out / "train.array_record").stat().st_mtime_ns
  assert build_folder_dataset(root, out, task="classify", split_seed=0) == out
  assert (out / "train.array_record").stat().st_mtime_ns == stamp
  again = build_folder_dataset(root, tmp_path / "b", task="classify", split_seed=0)
  assert folder_source(again, "test").paths == folder_source(out, "test").paths
  other = build_folder_dataset(root, tmp_path / "c", task="classify", split_seed=1)
  assert folder_source(other, "test").paths != folder_source(out, "test").paths


def test_split_folders_are_used(tmp_path):
  root = tmp_path / "raw"
  for split, n in (("train", 5), ("val", 2), ("test", 3)):
    for c in ("a", "b"):
      for i in range(n):
        _save(root / split / c / f"{i}.png", _noise(i))
  _save(root / "stray.png", _noise(0))
  out = build_folder_dataset(root, tmp_path / "ds", task="classify")
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["split_source"] == "folders"
  assert meta["counts"] == {"train": 10, "validation": 4, "test": 6}
  assert all(p.startswith("val/") for p in folder_source(out, "validation").paths)
  skipped, _ = _report(out)
  assert skipped["stray.png"] == "outside the split folders"

  # Without a validation folder it is carved from train (3:1 per class), test stays as given.
  root2 = tmp_path / "raw2"
  for split, n in (("train", 8), ("test", 2)):
    for c in ("a", "b"):
      for i in range(n):
        _save(root2 / split / c / f"{i}.png", _noise(i))
  out2 = build_folder_dataset(root2, tmp_path / "ds2", task="classify")
  meta2 = json.loads((out2 / "metadata.json").read_text())
  assert meta2["counts"] == {"train": 12, "validation": 4, "test": 4}
  report = json.loads((out2 / "build_report.json").read_text())
  assert any("validation carved from train" in w for w in report["warnings"])


def test_segmentation_busi_layout(tmp_path):
  root = tmp_path / "busi"
  for c in ("benign", "malignant"):
    for i in range(5):
      img = _noise(i)
      m = np.zeros_like(img)
      m[5:15, 5:20] = 255
      _save(root / c / f"{c} ({i}).png", np.stack([img] * 3, -1))  # RGB like BUSI
      _save(root / c / f"{c} ({i})_mask.png", m)
  extra = np.zeros((40, 36), np.uint8)
  extra[30:35, 0:10] = 255
  _save(root / "benign" / "benign (0)_mask_1.png", extra)  # second lesion of image 0
  _save(root / "benign" / "lonely.png", _noise(3))  # no mask
  _save(root / "malignant" / "orphan_mask.png", extra)  # no image
  _save(root / "malignant" / "malignant (4)_mask.png", np.zeros((20, 20), np.uint8))  # overrides size

  out = build_folder_dataset(root, tmp_path / "ds", task="segment", image_size=32)
  skipped, converted = _report(out)
  assert skipped["benign/lonely.png"] == "no mask found"
  assert skipped["malignant/orphan_mask.png"] == "mask without a matching image"
  assert "is 20x20, image is 36x40" in skipped["malignant/malignant (4).png"]
  assert "2 masks merged" in converted["benign/benign (0).png"]
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["mask_values"] == [0, 255] and meta["num_mask_classes"] == 2
  assert meta["classes"] == ["benign", "malignant"]
  assert sum(meta["counts"].values()) == 9
  recs = {}
  for split in ("train", "validation", "test"):
    src, rs = _records(out, split)
    recs.update(zip(src.paths, rs))
  r0 = recs["benign/benign (0).png"]
  assert r0["image"].shape == (32, 32, 1) and r0["mask"].shape == (32, 32, 1)
  assert r0["label"] == 0 and set(np.unique(r0["mask"])) == {0, 1}
  m = np.zeros((40, 36), np.uint8)
  m[5:15, 5:20] = 1
  m[30:35, 0:10] = 1
  ref = np.asarray(Image.fromarray(m).resize((32, 32), Image.NEAREST))
  np.testing.assert_array_equal(r0["mask"][..., 0], ref)
  assert recs["malignant/malignant (1).png"]["label"] == 1


def test_segmentation_parallel_folders_multiclass(tmp_path):
  root = tmp_path / "seg"
  for i in range(6):
    img = _noise(i)
    m = np.zeros_like(img)
    m[:, :10] = 40  # class values are arbitrary grey levels
    m[:, 30:] = 200 if i % 2 else 40
    _save(root / "images" / f"case{i}.png", img)
    _save(root / "masks" / (f"case{i}_mask.png" if i == 0 else f"case{i}.png"), m)
  out = build_folder_dataset(root, tmp_path / "ds", task="segment", split_ratio=(4, 1, 1))
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["mask_values"] == [0, 40, 200]
  assert meta["counts"] == {"train": 4, "validation": 1, "test": 1}
  assert meta["classes"] == []
  src, recs = _records(out, "train")
  for path, r in zip(src.paths, recs):
    i = int(path.split("case")[1][0])
    m = r["mask"][..., 0]
    assert r["label"] == -1
    assert np.all(m[:, :10] == 1) and np.all(m[:, 10:30] == 0)
    assert np.all(m[:, 30:] == (2 if i % 2 else 1))
    np.testing.assert_array_equal(r["image"][..., 0], _noise(i))
  batch = next(pipeline.eval_iterator(src, batch_size=4, image_size=32))
  assert batch["mask"].shape == (4, 32, 32, 1) and batch["valid"].all()


def test_missing_or_empty_folder_errors(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(ValueError, match=str(missing)):
    build_folder_dataset(missing, tmp_path / "o1")
  empty = tmp_path / "empty"
  (empty / "sub").mkdir(parents=True)
  with pytest.raises(ValueError, match=f"{empty}.*empty"):
    build_folder_dataset(empty, tmp_path / "o2")
  junk = tmp_path / "junk"
  (junk / "a").mkdir(parents=True)
  (junk / "a" / "x.png").write_text("not a png")
  (junk / "a" / "y.jpg").write_bytes(b"")
  with pytest.raises(ValueError, match=f"{junk}.*no usable image"):
    build_folder_dataset(junk, tmp_path / "o3")
  assert json.loads((tmp_path / "o3" / "build_report.json").read_text())["skipped"]
  with pytest.raises(ValueError, match="task"):
    build_folder_dataset(junk, tmp_path / "o4", task="detect")
  with pytest.raises(ValueError, match="metadata"):
    folder_source(tmp_path / "o4", "train")


# ------------------------------------------------------------------ freshness of a converted folder


def _folder_cfg(root, data_dir):
  return SimpleNamespace(name="folder", folder=str(root), data_dir=str(data_dir), seed=0)


def _all_records(dcfg):
  """path → record over the three splits, as the training code opens them."""
  out = {}
  for split in folder.SPLITS:
    src = sources.open_source(dcfg, split)
    out.update(zip(src.paths, (src[i] for i in range(len(src)))))
  return out


@pytest.fixture
def counted_builds(monkeypatch):
  """The output directory of every call of the folder conversion, in call order."""
  calls = []
  real = folder.build_folder_dataset

  def build(root, out_dir, **kw):
    calls.append(pathlib.Path(out_dir))
    return real(root, out_dir, **kw)

  monkeypatch.setattr(folder, "build_folder_dataset", build)
  return calls


def test_open_source_rebuilds_when_the_folder_changes(tmp_path, counted_builds, caplog):
  root = tmp_path / "raw"
  for i in range(3):
    _save(root / "liver" / f"l{i}.png", _noise(i))
    _save(root / "kidney" / f"k{i}.png", _noise(10 + i))
  dcfg = _folder_cfg(root, tmp_path / "data")
  first = _all_records(dcfg)
  assert len(first) == 6 and len(counted_builds) == 1
  np.testing.assert_array_equal(first["liver/l1.png"]["image"][..., 0], _noise(1))

  # Untouched (a hidden file and a text file never become records): the conversion is reused.
  (root / "liver" / ".DS_Store").write_bytes(b"\0")
  (root / "notes.txt").write_text("scanner settings")
  assert _all_records(dcfg).keys() == first.keys()
  assert len(counted_builds) == 1

  # One image more: a new conversion, in its own directory, with the new count.
  _save(root / "kidney" / "k3.png", _noise(13))
  caplog.set_level(logging.INFO, logger="mae_jax")
  second = _all_records(dcfg)
  assert len(counted_builds) == 2 and counted_builds[1] != counted_builds[0]
  assert len(second) == 7
  np.testing.assert_array_equal(second["kidney/k3.png"]["image"][..., 0], _noise(13))
  assert "changed since its conversion" in caplog.text
  assert "1 added, 0 removed, 0 modified" in caplog.text and "added kidney/k3.png" in caplog.text
  assert (counted_builds[0] / "metadata.json").is_file()  # the old one is left for its readers

  # Same name, other content (another size): converted again, the new pixels are served.
  caplog.clear()
  _save(root / "liver" / "l0.png", _noise(50, 48, 40))
  third = _all_records(dcfg)
  assert len(counted_builds) == 3 and len(third) == 7
  np.testing.assert_array_equal(third["liver/l0.png"]["image"][..., 0], _noise(50, 48, 40))
  assert "0 added, 0 removed, 1 modified (e.g. modified liver/l0.png)" in caplog.text

  # Removing an image is a change too.
  caplog.clear()
  (root / "kidney" / "k0.png").unlink()
  assert len(_all_records(dcfg)) == 6 and len(counted_builds) == 4
  assert "0 added, 1 removed, 0 modified" in caplog.text


def test_same_size_replacement_is_caught_by_mtime(tmp_path, counted_builds):
  # BMP files of one shape all have the same size: only the mtime tells the new file apart.
  root = tmp_path / "raw"
  for i in range(4):
    _save(root / "breast" / f"b{i}.bmp", _noise(i))
  dcfg = _folder_cfg(root, tmp_path / "data")
  before = _all_records(dcfg)
  path = root / "breast" / "b2.bmp"
  size, mtime = path.stat().st_size, path.stat().st_mtime_ns
  _save(path, _noise(77))
  os.utime(path, ns=(mtime + 2_000_000_000, mtime + 2_000_000_000))  # coarse-clock file systems
  assert path.stat().st_size == size
  after = _all_records(dcfg)
  assert len(counted_builds) == 2
  np.testing.assert_array_equal(before["breast/b2.bmp"]["image"][..., 0], _noise(2))
  np.testing.assert_array_equal(after["breast/b2.bmp"]["image"][..., 0], _noise(77))


def test_interrupted_build_is_not_served(tmp_path, counted_builds, monkeypatch):
  root = tmp_path / "raw"
  for i in range(5):
    _save(root / "thyroid" / f"t{i}.png", _noise(i))
  dcfg = _folder_cfg(root, tmp_path / "data")
  real = folder.serialize_record
  written = []

  def dies_half_way(rec):
    if len(written) == 2:
      raise KeyboardInterrupt("killed")  # not an Exception: nothing may catch and carry on
    written.append(rec["index"])
    return real(rec)

  monkeypatch.setattr(folder, "serialize_record", dies_half_way)
  with pytest.raises(KeyboardInterrupt):
    sources.open_source(dcfg, "train")
  out = counted_builds[0]
  assert not out.exists()  # only the hidden partial folder was written to
  assert (out.parent / f".{out.name}.partial" / "train.array_record").exists()

  monkeypatch.setattr(folder, "serialize_record", real)
  recs = _all_records(dcfg)
  assert counted_builds == [out, out]  # built again, not read half-written
  assert sorted(recs) == [f"thyroid/t{i}.png" for i in range(5)]
  for i in range(5):
    np.testing.assert_array_equal(recs[f"thyroid/t{i}.png"]["image"][..., 0], _noise(i))
  assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # the leftover is gone


def test_build_folder_dataset_rebuilds_in_place_when_stale(tmp_path):
  root = tmp_path / "raw"
  for i in range(5):
    _save(root / "a" / f"{i}.png", _noise(i))
  out = build_folder_dataset(root, tmp_path / "ds")
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["source_entries"] == 5 + 1  # five images and the folder a/
  listing = json.loads((out / "source_files.json").read_text())
  st = (root / "a" / "3.png").stat()
  assert listing["a/3.png"] == [st.st_size, st.st_mtime_ns] and listing["a/"] == []
  _save(root / "b" / "0.png", _noise(9))
  build_folder_dataset(root, out)
  meta2 = json.loads((out / "metadata.json").read_text())
  assert sum(meta2["counts"].values()) == 6 and meta2["source_digest"] != meta["source_digest"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "raw"]  # no partial/stale left


def test_concurrent_opens_build_once(tmp_path, monkeypatch):
  """Two openers (threads here; processes or hosts hold the same file lock) convert once."""
  root = tmp_path / "raw"
  for i in range(4):
    _save(root / "a" / f"{i}.png", _noise(i))
  dcfg = _folder_cfg(root, tmp_path / "data")
  calls = []
  real = folder.build_folder_dataset

  def slow_build(*args, **kw):
    calls.append(1)
    time.sleep(0.5)  # long enough for the other opener to arrive while this one builds
    return real(*args, **kw)

  monkeypatch.setattr(folder, "build_folder_dataset", slow_build)
  with ThreadPoolExecutor(2) as pool:
    lengths = list(pool.map(lambda _: len(sources.open_source(dcfg, "train")), range(2)))
  assert calls == [1] and lengths == [2, 2]  # 4 images at 3:1:1 → 2/1/1


def test_group_split_counts_hand_computed():
  """3:1:1 over groups: 5 groups → 3/1/1, 3 → 1/1/1 (no split left empty), 2 → 1/1/0, and every
  image of a group lands where its group does."""
  from types import SimpleNamespace as NS
  from mae_jax.data import groups
  items = []
  for cls, n_groups in (("a", 5), ("b", 3), ("c", 2)):
    for g in range(n_groups):
      items += [NS(rel=f"{cls}/{g}/{k}.png", group=cls, key=f"{cls}{g}") for k in range(g + 1)]
  splits = groups.stratified_groups(items, (3, 1, 1), 0, ["a", "b", "c"])
  per = [{c: len({it.key for it in s if it.group == c}) for c in "abc"} for s in splits]
  assert per == [{"a": 3, "b": 1, "c": 1}, {"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 1, "c": 0}]
  where = {}
  for k, s in enumerate(splits):
    for it in s:
      assert where.setdefault(it.key, k) == k
  assert sum(len(s) for s in splits) == len(items)


def test_unreadable_folder_is_listed_and_counted(tmp_path, monkeypatch, caplog):
  """A folder that cannot be listed (injected: the tests run as root) is in the report's skipped
  list and counted in the log line; the rest converts."""
  root = tmp_path / "raw"
  for cls in ("a", "b"):
    for k in range(5):
      _save(root / cls / f"{k}.png", np.full((40, 40), 10 * k, np.uint8))
  locked = root / "b" / "locked"
  locked.mkdir()
  real = os.scandir

  def scandir(path="."):
    if os.fspath(path) == str(locked):
      raise PermissionError(13, "Permission denied", str(locked))
    return real(path)

  monkeypatch.setattr(os, "scandir", scandir)
  with caplog.at_level("INFO", logger="mae_jax"):
    out = build_folder_dataset(root, tmp_path / "ds", task="classify")
  report = json.loads((out / "build_report.json").read_text())
  assert {"path": "b/locked/", "reason": "cannot list folder: PermissionError: Permission denied"} in report["skipped"]
  assert "1 unreadable folder(s)" in caplog.text


def test_describe_change_escapes_non_utf8_names(tmp_path):
  (tmp_path / "source_files.json").write_text("{}")
  text = folder.describe_change(tmp_path, {"a/caf\udce9.png": [1, 2]})
  assert "caf\\xe9.png" in text
  text.encode("utf-8")  # printable by any log stream
