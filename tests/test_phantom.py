"""Tests of the simulated ultrasound phantom and its stored dataset (us_phantom).

Physics is checked against closed forms (Rayleigh statistics of fully developed speckle, the
exponential depth attenuation exp(-2 alpha f0 z)) and against image measurements that do not
reuse the simulator's own geometry code (lesion darkness, posterior enhancement / shadowing,
aspect ratios, areas).
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from scipy import ndimage, stats
from scipy.spatial import ConvexHull

from mae_jax.data import phantom as P

RAYLEIGH_SNR = math.sqrt(math.pi / (4 - math.pi))  # mean / std of a Rayleigh variable = 1.9131


def _find(seed, want, count, start=0):
  """First ``count`` indices whose (organ name, class name) satisfies ``want``."""
  out, i = [], start
  while len(out) < count:
    organ, label = P.example_meta(seed, i)
    if want(P.ORGANS[organ], P.CLASSES[label]):
      out.append(i)
    i += 1
  return out


# ------------------------------------------------------------------------------ determinism


def test_simulate_is_deterministic_and_order_independent():
  a = P.simulate(5, 17, 64)
  P.simulate(5, 3, 64)  # another example in between must not matter
  b = P.simulate(5, 17, 64)
  assert a["image"].dtype == np.uint8 and a["image"].shape == (64, 64)
  assert a["mask"].dtype == np.uint8 and a["mask"].shape == (64, 64)
  assert a["image"].tobytes() == b["image"].tobytes()
  assert a["mask"].tobytes() == b["mask"].tobytes()
  assert (a["organ"], a["label"]) == (b["organ"], b["label"]) == P.example_meta(5, 17)
  assert a["image"].tobytes() != P.simulate(5, 18, 64)["image"].tobytes()
  assert a["image"].tobytes() != P.simulate(6, 17, 64)["image"].tobytes()


# ------------------------------------------------------------------------------ proportions


def test_constants():
  assert len(P.ORGANS) >= 5 and len(P.ORGAN_WEIGHTS) == len(P.ORGANS)
  assert P.CLASSES == ("normal", "benign", "malignant")
  assert math.isclose(sum(P.ORGAN_WEIGHTS), 1.0) and math.isclose(sum(P.CLASS_WEIGHTS), 1.0)
  assert len(set(P.ORGAN_WEIGHTS)) > 1  # deliberately unequal


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("start,stop", [(0, 500), (1234, 1734), (2000, 2200)])
def test_example_meta_proportions(seed, start, stop):
  metas = np.array([P.example_meta(seed, i) for i in range(start, stop)])
  n = stop - start
  organ_counts = np.bincount(metas[:, 0], minlength=len(P.ORGANS))
  class_counts = np.bincount(metas[:, 1], minlength=len(P.CLASSES))
  # Stratified assignment: each organ's count within one item of its share of any index range
  # (at most 1 off at each end of the range -> 2), classes within 2 per organ -> a few overall.
  assert np.all(np.abs(organ_counts - n * np.array(P.ORGAN_WEIGHTS)) <= 2), organ_counts
  assert np.all(np.abs(class_counts - n * np.array(P.CLASS_WEIGHTS)) <= 4), class_counts


def test_example_meta_joint_table_exact_over_a_period():
  metas = np.array([P.example_meta(1, i) for i in range(1000)])
  joint = np.zeros((len(P.ORGANS), len(P.CLASSES)), int)
  np.add.at(joint, (metas[:, 0], metas[:, 1]), 1)
  expected = 1000 * np.outer(P.ORGAN_WEIGHTS, P.CLASS_WEIGHTS)
  assert np.all(np.abs(joint - expected) <= 1), joint  # classes are balanced inside each organ


# ------------------------------------------------------------------------------ physics


def _uniform_envelopes(geometry, tgc, n=128, realisations=8):
  """Envelopes of a homogeneous medium (echogenicity 1, 0.5 dB/cm/MHz), one probe each."""
  out = []
  for r in range(realisations):
    rng = np.random.default_rng([123, r])
    probe = P.sample_probe(rng, geometry)
    echo = np.ones((n, n), np.float32)
    alpha = np.full((n, n), 0.5, np.float32)
    env = P.pulse_echo(echo, alpha, probe, rng, tgc=0.5 if tgc else None)
    out.append((probe, env))
  return out


@pytest.mark.parametrize("geometry", ["linear", "convex"])
def test_speckle_envelope_is_rayleigh(geometry):
  envs = _uniform_envelopes(geometry, tgc=True)
  snr = np.array([env.mean() / env.std() for _, env in envs])
  # The tolerance is the spread of independent realisations (3 standard errors of the mean)
  # plus 0.02 for the O(1/N) bias of a ratio estimator; each image holds ~1000 speckle cells.
  se = snr.std(ddof=1) / math.sqrt(len(snr))
  assert abs(snr.mean() - RAYLEIGH_SNR) < 3 * se + 0.02, (snr.mean(), se)
  for _, env in envs[:3]:
    # Subsampled every 6 px (beyond the PSF correlation length) the samples are about
    # independent, so a KS test against a Rayleigh with the ML scale is meaningful.
    sub = env[::6, ::6].ravel()
    scale = math.sqrt(np.mean(sub.astype(np.float64) ** 2) / 2)
    assert stats.kstest(sub, "rayleigh", args=(0, scale)).pvalue > 1e-3
    # An exponential (intensity-like) law must be rejected: the test has power.
    assert stats.kstest(sub, "expon", args=(0, sub.mean())).pvalue < 1e-3


def test_speckle_in_simulated_liver_is_rayleigh():
  """Same SNR inside the homogeneous parenchyma of full simulated images (local patches, so
  the slow depth trends and vessels' posterior enhancement do not mix scales)."""
  values = []
  for index in _find(0, lambda o, c: o == "liver" and c == "normal", 3):
    r = P.simulate(0, index, 128, return_intermediates=True)
    inside = ndimage.binary_erosion(r["region"]["parenchyma"], iterations=3)  # PSF margin
    env, b = r["envelope"], 16
    for i in range(0, 128 - b + 1, b):
      for j in range(0, 128 - b + 1, b):
        if inside[i : i + b, j : j + b].all():
          patch = env[i : i + b, j : j + b]
          values.append(patch.mean() / patch.std())
  values = np.array(values)
  assert len(values) >= 20
  se = values.std(ddof=1) / math.sqrt(len(values))
  assert abs(values.mean() - RAYLEIGH_SNR) < 3 * se + 0.03, (values.mean(), se)


@pytest.mark.parametrize("geometry", ["linear", "convex"])
def test_attenuation_matches_closed_form_and_tgc_flattens(geometry):
  """Mean intensity falls as exp(-4 alpha f0 z / 8.686), i.e. -2 alpha f0 dB per cm of depth;
  the TGC removes the slope."""
  for tgc in (False, True):
    for probe, env in _uniform_envelopes(geometry, tgc=tgc, realisations=3):
      n = env.shape[0]
      depth = (np.arange(n) + 0.5) * probe.depth / n
      level_db = 10 * np.log10(np.mean(env.astype(np.float64) ** 2, axis=1))
      keep = slice(8, n - 8)  # away from the axial-filter edges
      slope = np.polyfit(depth[keep], level_db[keep], 1)[0]
      expected = 0.0 if tgc else -2 * 0.5 * probe.f0
      assert abs(slope - expected) < 0.03 * 2 * 0.5 * probe.f0, (tgc, slope, expected)


def test_brightness_falls_with_depth_without_tgc():
  indices = _find(0, lambda o, c: o in ("thyroid", "breast", "liver") and c == "normal", 4)
  for index in indices:
    off = P.simulate(0, index, 96, tgc=False, return_intermediates=True)
    on = P.simulate(0, index, 96, tgc=True, return_intermediates=True)
    fan = off["fan"]
    rows = np.array([off["image"][k][fan[k]].mean() for k in range(96) if fan[k].any()])
    thirds = [t.mean() for t in np.array_split(rows, 3)]
    assert thirds[0] > thirds[1] > thirds[2], thirds

    def half_levels(r):  # parenchyma intensity / echogenicity, deep half vs shallow half (dB)
      region, env, echo = r["region"]["parenchyma"], r["envelope"], r["echogenicity"]
      rows_in = np.flatnonzero(region.any(axis=1))
      mid = (rows_in.min() + rows_in.max()) // 2
      deep = region.copy()
      deep[:mid] = False
      shallow = region & ~deep
      level = lambda m: np.mean(env[m].astype(np.float64) ** 2 / echo[m])  # noqa: E731
      return 10 * np.log10(level(deep) / level(shallow))

    assert half_levels(off) < -5.0
    assert abs(half_levels(on)) < 3.0


# ------------------------------------------------------------------------------ lesions


def _lesion_examples(cls, count, size=128):
  return [
    P.simulate(0, i, size, return_intermediates=True)
    for i in _find(0, lambda o, c: c == cls, count)
  ]


def test_normal_images_have_empty_masks():
  for r in _lesion_examples("normal", 4, size=64):
    assert r["mask"].sum() == 0 and not r["region"]["lesion"].any()


@pytest.mark.parametrize("cls", ["benign", "malignant"])
def test_mask_is_the_lesion_region(cls):
  for r in _lesion_examples(cls, 6):
    mask = r["mask"].astype(bool)
    assert set(np.unique(r["mask"])) <= {0, 1} and mask.any()
    region = r["region"]["lesion"]
    if r["geometry"] == "linear":  # the beam grid is the display grid
      np.testing.assert_array_equal(mask, region)
    else:
      # Scan conversion preserves physical area: beam samples cover rho*drho*dtheta each.
      p = r["probe"]
      rho = p["radius"] + r["depth"]
      drho, dtheta = p["depth"] / region.shape[0], p["sector"] / region.shape[1]
      beam_area = np.sum(region * (rho * drho * dtheta)[:, None])
      display_area = mask.sum() * r["pixel_size_cm"] ** 2
      # Pixels on the mask's edge are only partly inside the lesion: allow half of them.
      edge = mask & ~ndimage.binary_erosion(mask)
      tolerance = 0.5 * edge.sum() / mask.sum()
      assert abs(display_area / beam_area - 1) < tolerance, (
        display_area,
        beam_area,
        tolerance,
      )
      assert not (mask & ~r["fan"]).any()
    # The lesion is the hypoechoic object under the mask: darker than a ring around it
    # (lower quartile for malignant lesions, whose bright microcalcifications are outliers).
    ring = ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_dilation(
      mask, iterations=1
    )
    ring &= r["fan"]
    inside = np.percentile(r["image"][mask], 50 if cls == "benign" else 25)
    assert inside < np.median(r["image"][ring])
    # Echogenicity is uniform inside the lesion region (homogeneous), and lower than outside.
    echo_in = r["echogenicity"][region]
    assert np.ptp(echo_in) == 0 and echo_in[0] < np.median(
      r["echogenicity"][r["region"]["parenchyma"]]
    )


def _posterior_contrast_db(r):
  """Intensity/echogenicity behind the lesion vs beside it at the same depths (beam grid)."""
  m, env, echo = r["region"]["lesion"], r["envelope"], r["echogenicity"]
  n = m.shape[0]
  rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
  h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
  top, bottom = rows.max() + 2, min(n, rows.max() + 2 + h)
  c0, c1 = cols.min() + w // 4, cols.max() - w // 4 + 1
  behind = np.zeros_like(m)
  behind[top:bottom, c0:c1] = True
  beside = np.zeros_like(m)
  for shift in (-w, w):
    beside[top:bottom, max(0, c0 + shift) : min(n, c1 + shift)] = True
  scatters = (echo > 0.01) & ~m  # skip fluids and air, where echogenicity ~ 0

  def level(where):
    where = where & scatters
    return np.mean(env[where].astype(np.float64) ** 2 / echo[where])

  return 10 * np.log10(level(behind) / level(beside))


def _solidity(mask):
  """Area / convex-hull area: ~1 for a smooth convex oval, lower for a spiculated margin."""
  ys, xs = np.nonzero(mask)
  corners = np.concatenate(
    [np.stack([ys + dy, xs + dx], 1) for dy in (-0.5, 0.5) for dx in (-0.5, 0.5)]
  )
  return mask.sum() / ConvexHull(corners).volume


def test_benign_morphology_and_posterior_enhancement():
  examples = _lesion_examples("benign", 8)
  for r in examples:
    ys, xs = np.nonzero(r["mask"])
    assert ys.std() < 0.85 * xs.std()  # wider than tall (display pixels are square)
    assert _solidity(r["mask"]) > 0.85  # circumscribed
  contrast = np.array([_posterior_contrast_db(r) for r in examples])
  assert np.mean(contrast) > 1.5 and np.mean(contrast > 0) >= 0.75, contrast


def test_malignant_morphology_shadowing_and_microcalcifications():
  examples = _lesion_examples("malignant", 8)
  solidity = []
  for r in examples:
    mask = r["mask"].astype(bool)
    ys, xs = np.nonzero(mask)
    assert ys.std() > 1.15 * xs.std()  # taller than wide
    solidity.append(_solidity(mask))
    # Microcalcifications: a few pixels inside the lesion far brighter than its median.
    inside = r["image"][mask].astype(int)
    assert inside.max() - np.median(inside) > 60
  assert np.mean(solidity) < 0.8 and max(solidity) < 0.9, solidity  # spiculated, irregular
  contrast = np.array([_posterior_contrast_db(r) for r in examples])
  assert np.mean(contrast) < -4.0 and np.all(contrast < 0), contrast


# ------------------------------------------------------------------------------ geometry


def test_probe_geometries():
  seen = {}
  for index in range(40):
    r = P.simulate(2, index, 64, return_intermediates=True)
    seen.setdefault(r["geometry"], r)
    assert r["geometry"] == P.PROBE_FOR_ORGAN[P.ORGANS[r["organ"]]]
  assert set(seen) == {"linear", "convex"}
  assert seen["linear"]["fan"].all()
  convex = seen["convex"]
  assert not convex["fan"].all() and not convex["image"][~convex["fan"]].any()  # black outside
  assert not convex["fan"][0, 0] and not convex["fan"][0, -1]  # top corners lie outside the fan
  assert 50 <= convex["dynamic_range_db"] <= 60


# ------------------------------------------------------------------------- stored dataset

SMALL = dict(num_train=30, num_validation=6, num_test=6, image_size=64, seed=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  from mae_jax.data import us_phantom

  data_dir = tmp_path_factory.mktemp("data_a")
  return data_dir, us_phantom.build(data_dir, num_workers=1, **SMALL)


def test_builder_round_trip(built):
  from mae_jax.data import us_phantom

  data_dir, builder = built
  assert builder.name == "us_phantom" and builder.is_prepared()
  meta = builder.metadata
  assert meta["counts"] == {"train": 30, "validation": 6, "test": 6}
  assert meta["organs"] == list(P.ORGANS) and meta["classes"] == list(P.CLASSES)
  assert sorted(p.name for p in builder.data_path.iterdir()) == [
    "metadata.json", "test.array_record", "train.array_record", "validation.array_record"]
  ranges = {}
  for split, size in (("train", 30), ("validation", 6), ("test", 6)):
    source = us_phantom.data_source(data_dir, split, **SMALL)
    assert len(source) == size
    indices = []
    for i in range(size):
      rec = source[i]
      assert rec["image"].dtype == np.uint8 and rec["image"].shape == (64, 64, 1)
      assert rec["mask"].dtype == np.uint8 and rec["mask"].shape == (64, 64, 1)
      assert set(np.unique(rec["mask"])) <= {0, 1}
      for key in ("organ", "label", "index"):
        assert (
          isinstance(rec[key], np.ndarray) and rec[key].shape == () and rec[key].dtype == np.int64
        )
      indices.append(int(rec["index"]))
      if i < 3:  # stored bytes decode to exactly what the simulator produces
        direct = P.simulate(SMALL["seed"], int(rec["index"]), 64, **us_phantom.DISPLAY)
        np.testing.assert_array_equal(rec["image"][..., 0], direct["image"])
        np.testing.assert_array_equal(rec["mask"][..., 0], direct["mask"])
        assert (int(rec["organ"]), int(rec["label"])) == (direct["organ"], direct["label"])
    assert indices == list(range(indices[0], indices[0] + size))  # stored in index order
    ranges[split] = set(indices)
  assert not (ranges["train"] & ranges["validation"]) and not (
    ranges["validation"] & ranges["test"]
  )
  assert not (ranges["train"] & ranges["test"])
  # A source can be pickled (grain workers) and re-opens its reader.
  clone = pickle.loads(pickle.dumps(us_phantom.data_source(data_dir, "test", **SMALL)))
  assert int(clone[0]["index"]) == 36
  # Organ and class of every record without decoding, as the organ-balanced sampler wants them.
  source = us_phantom.data_source(data_dir, "validation", **SMALL)
  np.testing.assert_array_equal(source.organ_ids, [int(source[i]["organ"]) for i in range(6)])
  np.testing.assert_array_equal(source.labels, [int(source[i]["label"]) for i in range(6)])


def test_built_split_has_intended_proportions(built):
  from mae_jax.data import us_phantom

  data_dir, _ = built
  source = us_phantom.data_source(data_dir, "train", **SMALL)
  organs = np.bincount(
    [int(source[i]["organ"]) for i in range(len(source))], minlength=len(P.ORGANS)
  )
  labels = np.bincount(
    [int(source[i]["label"]) for i in range(len(source))], minlength=len(P.CLASSES)
  )
  assert np.all(np.abs(organs - 30 * np.array(P.ORGAN_WEIGHTS)) <= 1), organs
  assert np.all(np.abs(labels - 30 * np.array(P.CLASS_WEIGHTS)) <= 2), labels


def test_build_twice_gives_identical_records(built, tmp_path, monkeypatch):
  """A second build, in another directory and through the worker pool, is byte-identical (the
  record files hold no time stamp)."""
  from mae_jax.data import us_phantom

  data_dir, first = built
  monkeypatch.setattr(us_phantom, "_MIN_EXAMPLES_FOR_POOL", 1)  # force the process pool
  second = us_phantom.build(tmp_path, num_workers=2, **SMALL)
  for split in ("train", "validation", "test"):
    a = us_phantom.data_source(data_dir, split, **SMALL)
    b = us_phantom.data_source(tmp_path, split, **SMALL)
    for i in range(len(a)):
      ra, rb = a[i], b[i]
      assert all(np.array_equal(ra[k], rb[k]) for k in ra)
  files_a = sorted(first.data_path.glob("*.array_record*"))
  files_b = sorted(second.data_path.glob("*.array_record*"))
  assert [f.name for f in files_a] == [f.name for f in files_b] and files_a
  for fa, fb in zip(files_a, files_b, strict=True):
    assert fa.read_bytes() == fb.read_bytes()


def test_configs_do_not_collide(built, tmp_path):
  from mae_jax.data import us_phantom

  a = us_phantom.builder(tmp_path, **SMALL)
  b = us_phantom.builder(tmp_path, **{**SMALL, "num_train": 31})
  assert a.data_dir != b.data_dir
  with pytest.raises(ValueError, match="split"):
    us_phantom.data_source(built[0], "holdout", **SMALL)


TINY = dict(num_train=4, num_validation=2, num_test=0, image_size=32, seed=3)


def test_killed_build_is_never_read_and_is_rebuilt(tmp_path, monkeypatch):
  """A build that dies half-way leaves only its hidden partial folder; the next one builds afresh."""
  from mae_jax.data import us_phantom

  real, done = us_phantom._encoded_example, []

  def dies_half_way(job):
    if len(done) == 2:
      raise KeyboardInterrupt("killed")  # not an Exception: nothing may catch it and carry on
    done.append(job)
    return real(job)

  monkeypatch.setattr(us_phantom, "_encoded_example", dies_half_way)
  with pytest.raises(KeyboardInterrupt):
    us_phantom.data_source(tmp_path, "train", num_workers=1, **TINY)
  b = us_phantom.builder(tmp_path, **TINY)
  assert not b.data_path.exists() and not b.is_prepared()
  assert (b.data_path.parent / f".{b.data_path.name}.partial" / "train.array_record").exists()
  monkeypatch.setattr(us_phantom, "_encoded_example", real)
  src = us_phantom.data_source(tmp_path, "validation", num_workers=1, **TINY)
  assert [int(src[i]["index"]) for i in range(2)] == [4, 5]
  np.testing.assert_array_equal(src[1]["image"][..., 0], P.simulate(3, 5, 32, **us_phantom.DISPLAY)["image"])
  assert not (b.data_path.parent / f".{b.data_path.name}.partial").exists()
  assert not (b.data_path / "test.array_record").exists()  # an empty split has no file
  with pytest.raises(ValueError, match="num_test is 0"):
    us_phantom.data_source(tmp_path, "test", **TINY)


def test_two_processes_building_one_dataset_build_it_once(tmp_path):
  """Two processes asking for one missing dataset at once (pytest -n 2, the hosts of a pod): one
  simulates it, the other waits and reads the same records."""
  import os
  import subprocess
  import sys

  code = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
    "from mae_jax.data import us_phantom\n"
    "if __name__ == '__main__':\n"
    f"  src = us_phantom.data_source(sys.argv[1], 'train', num_workers=1, **{TINY!r})\n"
    "  print('indices', [int(src[i]['index']) for i in range(len(src))])\n"
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert sum("simulating the built-in dataset" in o for o in outs) == 1, outs
  assert all("indices [0, 1, 2, 3]" in o for o in outs), outs
  # A build in this process writes the same bytes as the other processes' build.
  from mae_jax.data import us_phantom
  here = us_phantom.build(tmp_path / "here", num_workers=1, **TINY)
  there = us_phantom.builder(tmp_path, **TINY)
  for name in ("train.array_record", "validation.array_record"):
    assert (here.data_path / name).read_bytes() == (there.data_path / name).read_bytes()


def test_enhance_pairs_are_stored_as_simulated(tmp_path):
  from mae_jax.data import phantom_pairs, us_phantom

  kw = dict(TINY, task="enhance")
  src = us_phantom.data_source(tmp_path, "validation", num_workers=1, **kw)
  assert us_phantom.builder(tmp_path, **kw).data_path.parent.name.endswith("_enhance")
  assert sorted(src[0]) == ["high", "index", "label", "low", "mask", "organ"]
  for i in range(2):
    rec, direct = src[i], phantom_pairs.simulate_pair(3, 4 + i, 32)
    for key in ("low", "high", "mask"):
      assert rec[key].dtype == np.uint8 and rec[key].shape == (32, 32, 1)
      np.testing.assert_array_equal(rec[key][..., 0], direct[key])
    assert (int(rec["organ"]), int(rec["label"]), int(rec["index"])) == (direct["organ"], direct["label"], 4 + i)
  np.testing.assert_array_equal(src.organ_ids, [int(src[i]["organ"]) for i in range(2)])


def test_phantom_compare_statistics_closed_forms():
  """The comparison's statistics against closed forms: the FWHM of a sampled Gaussian is
  2√(2 ln 2)·σ; white noise low-passed by a Gaussian of σ_y, σ_x has an autocorrelation of
  width √2·σ per axis; gCNR is 1 for disjoint grey levels and 0 for identical ones."""
  from scipy import ndimage

  from mae_jax.data import phantom_compare as C
  x = np.arange(41)
  assert C.fwhm_1d(np.exp(-0.5 * ((x - 20) / 3.0) ** 2), 20) == pytest.approx(2.3548 * 3.0, rel=0.01)
  rng = np.random.default_rng(0)
  img = ndimage.gaussian_filter(rng.normal(size=(256, 256)), (0.7, 1.2), mode="wrap")
  img = np.clip(128 + img / img.std() * 30, 0, 255)
  ax, lat = C.speckle_fwhm(img, np.ones(img.shape, bool))
  assert ax == pytest.approx(2.3548 * np.sqrt(2) * 0.7, rel=0.1)
  assert lat == pytest.approx(2.3548 * np.sqrt(2) * 1.2, rel=0.1)
  a, b = np.full(100, 10), np.full(100, 200)
  assert C.gcnr(a, b) == 1.0 and C.gcnr(a, a) == 0.0
  assert C.gcnr(np.r_[a, b], b) == pytest.approx(0.5)


def test_display_options_default_off_and_closed_form_gain():
  """Defaults leave the image unchanged; display_gain_db = g lowers every unclipped grey level by
  g / dynamic range × 255 (log_compress is linear in dB); smoothing widens the speckle."""
  from mae_jax.data import phantom_compare as C
  base = P.simulate(0, 1, 96, return_intermediates=True)
  np.testing.assert_array_equal(P.simulate(0, 1, 96, display_gain_db=0.0, display_smoothing=0.0)["image"],
                                base["image"])
  dark = P.simulate(0, 1, 96, display_gain_db=6.0)["image"].astype(np.float64)
  shift = 6.0 / base["dynamic_range_db"] * 255.0
  ok = (base["image"] > shift + 2) & (base["image"] < 254) & (dark > 1)
  assert ok.sum() > 1000
  assert np.abs(base["image"][ok] - dark[ok] - shift).max() <= 1.0
  smooth = P.simulate(0, 1, 96, display_smoothing=2.0)["image"]
  valid = np.asarray(base["fan"], bool)
  assert C.speckle_fwhm(smooth, valid)[0] > 1.5 * C.speckle_fwhm(base["image"], valid)[0]


def test_builtin_display_within_2x_of_real_frames():
  """The display the built-in dataset stores (us_phantom.DISPLAY) against the real B-mode views of
  pydicom-data at 0.4 mm per pixel: grey mean, spread, median, 95th percentile, speckle size and
  dark-region contrast each within 2x of the real frames' median (docs/phantom.md). The raw
  display is not: 4-7x brighter, speckle under half the real size."""
  from mae_jax.data import phantom_compare as C
  adjusted, raw = C.compare(n=8), C.compare(n=8, display_gain_db=0.0, display_smoothing=0.0)
  keys = ("mean", "std", "p50", "p95", "fwhm_axial", "fwhm_lateral", "gcnr")
  ratio = {k: adjusted["phantom"]["median"][k] / adjusted["real"]["median"][k] for k in keys}
  assert all(0.5 <= r <= 2.0 for r in ratio.values()), ratio
  raw_ratio = {k: raw["phantom"]["median"][k] / raw["real"]["median"][k] for k in keys}
  assert raw_ratio["p50"] > 3 and raw_ratio["fwhm_axial"] < 0.5, raw_ratio
