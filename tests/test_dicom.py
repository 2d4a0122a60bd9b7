"""DICOM ultrasound in folder datasets (issue 28): the five public B-mode files of pydicom-data
(GE LOGIQ RGB and its JPEG 2000 copy, a SonoSite YBR-JPEG cine of 120 frames with one region, a
Philips JPEG-lossless frame with one region, an Aloka palette-colour file with two B-mode views)
in two class folders. Expected values come from the files' own tags and from pydicom's decoding
with an independent luminance formula, not from the converter."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import apply_color_lut, pixel_array  # noqa: E402

from mae_jax.data import dicom, folder, groups  # noqa: E402
from tests import train_helpers as H  # noqa: E402

FILES = {  # class folder / name in the dataset: pydicom-data file
    "abdomen/US1_UNCR.dcm": "US1_UNCR.dcm",
    "abdomen/US1_J2KR": "US1_J2KR.dcm",  # no extension: found by its DICM magic
    "abdomen/aloka.dcm": "gdcm-US-ALOKA-16.dcm",
    "cardiac/cine.dcm": "color3d_jpeg_baseline.dcm",
    "cardiac/epiq.dcm": "JPGLosslessP14SV1_1s_1f_8b.dcm",
}


def _marker(i: int) -> dict:
  return {"PatientName": f"Zebedee^Leakcheck{i}", "PatientID": f"PIDLEAK{i:04d}",
          "PatientBirthDate": f"1931041{i}"}


def make_folder(root: pathlib.Path) -> tuple[pathlib.Path, list[str]]:
  """The five files, each with its patient name, ID and birth date replaced by a marker that
  cannot occur by chance; returns the root and every identifying string a scan must not find."""
  secrets = []
  for i, (rel, name) in enumerate(sorted(FILES.items())):
    ds = pydicom.dcmread(get_testdata_file(name))
    for k, v in _marker(i).items():
      setattr(ds, k, v)
      secrets.append(v)
    secrets.append(str(ds.StudyInstanceUID))
    dst = root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
  return root, sorted(set(secrets))


def luminance(rgb: np.ndarray) -> np.ndarray:
  """ITU-R 601 luminance in PIL's fixed-point form (Convert.c: L24 weights, rounded)."""
  r, g, b = (rgb[..., k].astype(np.int64) for k in range(3))
  return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def records(out, split):
  src = folder.folder_source(out, split)
  return src, [src[i] for i in range(len(src))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("dicom")
  root, secrets = make_folder(tmp / "raw")
  out = folder.build_folder_dataset(root, tmp / "ds", task="classify", min_size=32)
  return root, out, secrets


def test_every_file_decodes_and_views_match_the_tags(built):
  root, out, _ = built
  report = json.loads((out / "build_report.json").read_text())
  assert report["skipped"] == []
  by_path: dict[str, list] = {}
  for s in folder.SPLITS:
    src, recs = records(out, s)
    for p, f, r, sp, rec in zip(src.paths, src.frames, src.regions, src.spacings, recs):
      by_path.setdefault(p, []).append((int(f), int(r), sp, rec["image"][..., 0]))
  assert sorted(by_path) == sorted(FILES)
  # The cine: 120 frames, one tissue region each, cropped to the region's box (inclusive bounds).
  cine = pydicom.dcmread(root / "cardiac/cine.dcm")
  reg = cine.SequenceOfUltrasoundRegions[0]
  x0, y0, x1, y1 = (int(reg.RegionLocationMinX0), int(reg.RegionLocationMinY0),
                    int(reg.RegionLocationMaxX1), int(reg.RegionLocationMaxY1))
  views = sorted(by_path["cardiac/cine.dcm"], key=lambda v: v[0])
  assert [v[0] for v in views] == list(range(120))
  for f in (0, 57, 119):
    expect = luminance(pixel_array(cine, index=f))[y0:y1 + 1, x0:x1 + 1]
    got = views[f][3]
    assert got.shape == (y1 - y0 + 1, x1 - x0 + 1)
    np.testing.assert_array_equal(got, expect)
  assert views[0][2] == pytest.approx((10 * float(reg.PhysicalDeltaY), 10 * float(reg.PhysicalDeltaX)))
  # Philips greyscale JPEG-lossless: one region; the file's window (127, 254) maps 0..254 onto
  # 0..255 (PS3.3 C.11.2.1.2 linear window), so compare with that closed form.
  epiq = pydicom.dcmread(root / "cardiac/epiq.dcm")
  reg = epiq.SequenceOfUltrasoundRegions[0]
  box = (int(reg.RegionLocationMinY0), int(reg.RegionLocationMaxY1) + 1,
         int(reg.RegionLocationMinX0), int(reg.RegionLocationMaxX1) + 1)
  [(_, region, _, got)] = by_path["cardiac/epiq.dcm"]
  assert region == 0 and got.shape == (box[1] - box[0], box[3] - box[2])
  raw = epiq.pixel_array[box[0]:box[1], box[2]:box[3]].astype(np.float64)
  c, w = float(epiq.WindowCenter), float(epiq.WindowWidth)
  win = np.clip(((raw - (c - 0.5)) / (w - 1) + 0.5) * 255, 0, 255)
  assert np.abs(got.astype(np.float64) - win).max() <= 1.0
  # Aloka: two B-mode views side by side (regions 0 and 1); its third region (type 13) is dropped.
  aloka = by_path["abdomen/aloka.dcm"]
  assert sorted(v[1] for v in aloka) == [0, 1]
  ds = pydicom.dcmread(root / "abdomen/aloka.dcm")
  rgb = apply_color_lut(ds.pixel_array, ds)
  full = luminance(np.round(rgb / 257.0).astype(np.uint8))
  for _, k, sp, got in aloka:
    r = ds.SequenceOfUltrasoundRegions[k]
    np.testing.assert_array_equal(
        got, full[int(r.RegionLocationMinY0):int(r.RegionLocationMaxY1) + 1,
                  int(r.RegionLocationMinX0):int(r.RegionLocationMaxX1) + 1])
    assert sp == pytest.approx((0.3826530650258064,) * 2)
  # GE: no region tags → the whole 640×480 frame, said in the report; the JPEG 2000 lossless copy
  # (YBR_RCT) decodes to the same pixels as the uncompressed RGB file.
  [(_, r_u, sp_u, unc)] = by_path["abdomen/US1_UNCR.dcm"]
  [(_, r_j, _, j2k)] = by_path["abdomen/US1_J2KR"]
  assert r_u == r_j == -1 and sp_u is None and unc.shape == (480, 640)
  np.testing.assert_array_equal(unc, luminance(pydicom.dcmread(root / "abdomen/US1_UNCR.dcm").pixel_array))
  np.testing.assert_array_equal(unc, j2k)
  notes = {d["path"]: d["conversion"] for d in report["converted"]}
  assert "no ultrasound region tags: whole frame used" in notes["abdomen/US1_UNCR.dcm"]
  assert "PALETTE COLOR" in notes["abdomen/aloka.dcm"] and "1 other region(s) dropped" in notes["abdomen/aloka.dcm"]


def test_no_group_in_two_splits(built):
  root, out, _ = built
  seen: dict[str, str] = {}
  for s in folder.SPLITS:
    src = folder.folder_source(out, s)
    for p, g in zip(src.paths, src.groups):
      assert seen.setdefault(g, s) == s, f"group of {p} in {seen[g]} and {s}"
  # The two GE files are one study (same StudyInstanceUID): one group, one split.
  uid = str(pydicom.dcmread(root / "abdomen/US1_UNCR.dcm").StudyInstanceUID)
  assert seen[groups.hash_group(uid)]
  report = json.loads((out / "build_report.json").read_text())
  listed = [g for s in folder.SPLITS for g in report["groups"][s]]
  assert len(listed) == len(set(listed)) == len(seen) == 4
  summary = groups.split_summary(out)
  assert sum(v["groups"] for v in summary["splits"].values()) == 4
  # Two groups per class cannot fill three splits: said in the warnings and the summary's notes.
  assert any("none in test" in n for n in summary["notes"])
  counts = json.loads((out / "metadata.json").read_text())["counts"]
  lines = groups.split_summary_lines(out)
  row = {ln.split("|")[1].strip(): ln for ln in lines if ln.startswith("| ") and "split" not in ln}
  assert set(row) == set(folder.SPLITS)
  assert f"| {counts['train']} | {summary['splits']['train']['groups']} |" in row["train"]
  assert any(ln.startswith("- note: class") for ln in lines)


def test_group_by_patient_and_every_k_frames(tmp_path, built):
  root, _, _ = built
  out = folder.build_folder_dataset(root, tmp_path / "ds", task="pretrain", dicom_frames="every:50",
                                    group_by="patient")
  src = [folder.folder_source(out, s) for s in folder.SPLITS]
  frames = sorted(int(f) for s in src for p, f in zip(s.paths, s.frames) if p == "cardiac/cine.dcm")
  assert frames == [0, 50, 100]
  # Each file got its own PatientID marker: five groups.
  assert len({g for s in src for g in s.groups}) == 5
  with pytest.raises(ValueError, match="dicom_frames"):
    dicom.parse_frames("every:0")
  with pytest.raises(ValueError, match="group_by"):
    folder.build_folder_dataset(root, tmp_path / "x", group_by="series")


def _scan(top: pathlib.Path, secrets: list[str]) -> list[str]:
  hits = []
  for p in [top] if top.is_file() else top.rglob("*"):
    if p.is_file():
      data = p.read_bytes()
      hits += [f"{p}: {s}" for s in secrets if s.encode() in data or s.replace("^", " ").encode() in data]
  return hits


def test_no_patient_data_in_anything_written(built, tmp_path):
  _, out, secrets = built
  assert _scan(out, secrets) == []
  # The scan itself can fail: a file that holds a marker is found.
  (tmp_path / "x.json").write_text(json.dumps({"name": secrets[0]}))
  assert _scan(tmp_path, secrets)


def test_png_groups_by_csv_and_patient_folders(tmp_path):
  from PIL import Image
  root = tmp_path / "raw"
  rng = np.random.default_rng(0)
  for cls in ("a", "b"):
    for pat in range(5):
      for k in range(3):
        p = root / cls / f"p{pat}" / f"{k}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(p)
  for k in range(4):
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / "a" / f"loose{k}.png")
  # groups.csv puts all loose images of class a into one group.
  (root / "groups.csv").write_text("path,group\n" + "".join(f"a/loose{k}.png,L\n" for k in range(4)))
  out = folder.build_folder_dataset(root, tmp_path / "ds", task="classify")
  where: dict[str, set] = {}
  for s in folder.SPLITS:
    src = folder.folder_source(out, s)
    for p, g in zip(src.paths, src.groups):
      where.setdefault(g, set()).add(s)
  assert all(len(v) == 1 for v in where.values())
  # Patient p0 of class a and of class b is one group (the folder name), and the loose images one.
  assert len(where) == 5 + 1
  meta = json.loads((out / "metadata.json").read_text())
  assert sum(meta["groups_per_split"].values()) == 6
  assert sum(meta["counts"].values()) == 34


def test_check_layout_names_the_folder_mistake(tmp_path):
  from PIL import Image
  flat = tmp_path / "flat"
  flat.mkdir()
  Image.new("L", (40, 40)).save(flat / "x.png")
  with pytest.raises(ValueError, match="not inside a class folder"):
    folder.check_layout(flat, "classify")
  folder.check_layout(flat, "pretrain")
  (flat / "cls").mkdir()
  (flat / "cls" / "y.png").write_bytes((flat / "x.png").read_bytes())
  (flat / "empty").mkdir()
  with pytest.raises(ValueError, match="empty/ holds no image"):
    folder.check_layout(flat, "classify")


def test_smoke_pretraining_on_dicom_writes_no_patient_data(tmp_path):
  root, secrets = make_folder(tmp_path / "raw")
  work = tmp_path / "run"
  rc, out = H.run(H.cli(work, *H.FAST, "--config.train.total_steps=4", "--config.data.name=folder",
                        f"--config.data.folder={root}", "--config.data.dicom_frames=every:20",
                        f"--config.data.data_dir={tmp_path / 'cache'}"), tmp_path / "run.log")
  assert rc == 0, out
  assert _scan(work, secrets) == [] and _scan(tmp_path / "cache", secrets) == []
  assert _scan(tmp_path / "run.log", secrets) == [] and not any(s in out for s in secrets)


def test_read_gray_gives_the_first_b_mode_view(built):
  root, out, _ = built
  a = folder.read_gray(root / "abdomen/aloka.dcm")
  ds = pydicom.dcmread(root / "abdomen/aloka.dcm")
  r = ds.SequenceOfUltrasoundRegions[0]
  assert a.shape == (int(r.RegionLocationMaxY1) - int(r.RegionLocationMinY0) + 1,
                     int(r.RegionLocationMaxX1) - int(r.RegionLocationMinX0) + 1)
  assert folder.read_gray(root / "abdomen/US1_J2KR").shape == (480, 640)
