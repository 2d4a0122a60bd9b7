"""σ in the stored image's pixels: the on-device blur after crop and resize equals OpenCV's blur at
native resolution before them (openmedlab/DeblurringMIM blurs offline before RandomResizedCrop).

Tolerance (TOL = 0.005 of the [0, 1] range, 1.3 grey levels, on the interior): blurring and
resampling commute exactly only for band-limited content; the residual comes from the resize's
bicubic kernel meeting a sampled (not continuous) Gaussian of σ·zoom, and from the pipeline's
uint8 output (≤ 0.5/255 before the blur averages it down). Measured ≤ 0.004 here for σ·zoom ≥ 0.8
model pixels; σ in model pixels (the old semantics) is off by 0.01–0.1 on the same crops, so the
comparison separates the two. The border band of 3σ·zoom + 2 pixels is left out: the reference
reflects at the stored image's edge, the device at the crop's.
"""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mae_jax import recipes, validate
from mae_jax.corrupt import blur
from mae_jax.data import pipeline
from mae_jax.data.sampling import EpochShuffleSampler
from mae_jax.train import obs, transfer
from tests.conftest import load_config

S = 32
TOL = 0.005
REFLECT_101 = cv2.BORDER_REFLECT_101


def _native_images(n, h, w, seed):
  """Speckle-like uint8 images: noise with a sub-pixel correlation length."""
  rng = np.random.default_rng(seed)
  return [cv2.GaussianBlur((rng.random((h, w)) * 255).astype(np.uint8), (0, 0), 0.7)[..., None]
          for _ in range(n)]


def _crop_resize_float(a, box, size):
  top, left, h, w = box
  im = Image.fromarray(a, mode="F").crop((left, top, left + w, top + h))
  return np.asarray(im.resize((size, size), Image.BICUBIC), np.float32)


def _deblur_config(sigma, units, native, crop_min):
  c = load_config("deblur_mae", f"smoke,sigma={sigma}")
  c.corrupt.sigma_units = units
  c.data.native_size = native
  c.data.crop_scale_min = crop_min
  return c


@pytest.mark.parametrize("h,w,crop_min,sigma", [(24, 20, 0.2, 1.1), (64, 72, 0.5, 2.0)])
def test_native_sigma_equals_opencv_blur_before_the_crop(h, w, crop_min, sigma):
  """Random crops of random stored images, through the real training stream: the device blur of
  the crop (σ·zoom per axis) equals cv2.GaussianBlur at native resolution, then the same crop and
  resize. Upsampled crops (zoom 1.3–3.2) and downsampled ones (zoom ≈ 0.45–0.65)."""
  n, seed = 6, 3
  source = [{"image": im} for im in _native_images(n, h, w, seed=h)]
  batch = next(pipeline.train_iterator(source, global_batch=n, image_size=S, seed=seed,
                                       scale=(crop_min, 1.0), hflip=False, num_threads=1))
  x01 = jnp.asarray(batch["image"], jnp.float32) / 255.0
  k = blur.gaussian_kernel_size(sigma)
  refs, zooms = [], []
  sampler = EpochShuffleSampler(n, seed)
  for g in range(n):  # the stream's own crop for draw g (pipeline: rng [seed, g, 1])
    idx = sampler[g]
    assert batch["index"][g] == idx
    box = pipeline.random_resized_crop_params(np.random.default_rng([seed, g, 1]), h, w, (crop_min, 1.0))
    zooms.append((S / box[2], S / box[3]))
    native = source[idx]["image"][..., 0].astype(np.float32) / 255.0
    refs.append(_crop_resize_float(cv2.GaussianBlur(native, (k, k), sigma, sigmaY=sigma,
                                                    borderType=REFLECT_101), box, S))
  np.testing.assert_allclose(batch["zoom"], np.array(zooms, np.float32), rtol=1e-6)
  assert len({tuple(z) for z in zooms}) > 1 and any(a != b for a, b in zooms)  # non-square boxes too

  def run(units):
    cfg = _deblur_config(sigma, units, min(h, w), crop_min)
    validate.validate_pretrain(cfg, num_devices=jax.device_count())
    fn = jax.jit(lambda x, z: recipes.corrupt(cfg, jax.random.key(0), x, z)[0])
    return np.asarray(fn(x01, jnp.asarray(batch["zoom"])))[..., 0]

  native_out, model_out = run("native"), run("model")
  for i, (zy, zx) in enumerate(zooms):
    m = int(np.ceil(3 * sigma * max(zy, zx))) + 2
    inner = (slice(m, S - m), slice(m, S - m))
    assert S - 2 * m >= 4
    err = np.abs(native_out[i] - refs[i])[inner].max()
    assert err <= TOL, (i, zy, zx, err)
    if max(abs(zy - 1), abs(zx - 1)) > 0.3:  # far from zoom 1 the old semantics is visibly wrong
      assert np.abs(model_out[i] - refs[i])[inner].max() > 2 * TOL


def test_per_axis_sigma_matches_opencv_sigma_x_sigma_y():
  x = np.random.default_rng(0).random((3, 24, 28, 1), dtype=np.float32)
  sig = np.array([[0.7, 1.9], [1.5, 0.4], [1.1, 1.1]], np.float32)  # (σ_y, σ_x)
  y = np.asarray(jax.jit(lambda a, s: blur.gaussian_blur(a, s, kernel_size=13))(x, sig))
  for i in range(3):
    ref = cv2.GaussianBlur(x[i, ..., 0], (13, 13), float(sig[i, 1]), sigmaY=float(sig[i, 0]),
                           borderType=REFLECT_101)
    np.testing.assert_allclose(y[i, ..., 0], ref, atol=1e-5)


def test_zoom_beyond_the_bound_is_opencvs_truncated_kernel():
  """A σ·zoom wider than the static kernel keeps the kernel's size: cv2.GaussianBlur with that
  explicit ksize (truncated, renormalised) — the documented rule for stored images smaller than
  `data.native_size`."""
  x = np.random.default_rng(1).random((1, 20, 20, 1), dtype=np.float32)
  y = np.asarray(blur.gaussian_blur(x, jnp.array([[3.0, 2.5]]), kernel_size=5))
  ref = cv2.GaussianBlur(x[0, ..., 0], (5, 5), 2.5, sigmaY=3.0, borderType=REFLECT_101)
  np.testing.assert_allclose(y[0, ..., 0], ref, atol=1e-5)


@pytest.mark.parametrize("h,w,crop_min", [(64, 64, 0.2), (90, 70, 0.35), (40, 56, 1.0)])
def test_max_zoom_bounds_every_crop(h, w, crop_min):
  bound = pipeline.max_zoom(min(h, w), S, crop_min)
  rng = np.random.default_rng(0)
  worst = 0.0
  for _ in range(3000):
    _, _, bh, bw = pipeline.random_resized_crop_params(rng, h, w, (crop_min, 1.0))
    worst = max(worst, S / bh, S / bw)
  assert worst <= bound + 1e-9
  assert worst >= 0.85 * bound  # tight: not a loose over-estimate that wastes kernel taps
  assert S / min(h, w) <= bound  # evaluation (whole image resized) stays inside too


def test_eval_zoom_is_model_side_over_stored_side():
  source = [{"image": np.zeros((40, 50, 1), np.uint8)}, {"image": np.zeros((64, 32, 1), np.uint8)}]
  batch = next(pipeline.eval_iterator(source, batch_size=4, image_size=S, num_threads=1))
  np.testing.assert_allclose(batch["zoom"][:2], [[S / 40, S / 50], [S / 64, S / 32]], rtol=1e-6)
  np.testing.assert_allclose(batch["zoom"][2:], 1.0)  # padding rows


def test_d2mae_native_levels_scale_per_sample():
  cfg = load_config("d2mae", "smoke")
  assert cfg.corrupt.sigma_units == "native"
  x = jax.random.uniform(jax.random.key(0), (4, S, S, 1))
  zoom = jnp.array([[0.5, 0.75], [1.0, 1.0], [2.0, 1.5], [1.2, 1.2]])
  xb, kw = recipes.corrupt(cfg, jax.random.key(1), x, zoom)
  levels = recipes.sigma_levels(cfg.corrupt.sigma_levels)
  size = recipes.gaussian_size(levels.max(), recipes.zoom_bound(cfg.corrupt, cfg.data, S))
  for i in range(4):
    s = float(levels[int(kw["blur_t"][i]) - 1])
    ref = cv2.GaussianBlur(np.asarray(x[i, ..., 0]), (size, size), s * float(zoom[i, 1]),
                           sigmaY=s * float(zoom[i, 0]), borderType=REFLECT_101)
    np.testing.assert_allclose(np.asarray(xb[i, ..., 0]), ref, atol=1e-5)


def test_transfer_and_obs_use_the_same_native_sigma():
  d2 = load_config("d2mae", "smoke")
  ft = load_config("finetune", "smoke")
  tables = {"train": {"t": np.array([5, 11], np.int32), "sigma": np.array([0.5, 1.1], np.float32)}}
  plan = transfer.TransferPlan(d2, {"mode": "search", "step": 2}, tables, data_cfg=ft.data)
  zoom = np.array([[0.5, 0.4], [2.0, 1.0]], np.float32)
  rows = plan.lookup("train", np.array([0, 1]), zoom)
  np.testing.assert_allclose(rows["sigma"], [[0.25, 0.2], [2.2, 1.1]], rtol=1e-6)
  x = np.random.default_rng(2).random((2, S, S, 1), dtype=np.float32)
  y = np.asarray(plan.apply(jnp.asarray(x), rows["sigma"]))
  for i in range(2):
    ref = cv2.GaussianBlur(x[i, ..., 0], (plan.ksize, plan.ksize), float(rows["sigma"][i, 1]),
                           sigmaY=float(rows["sigma"][i, 0]), borderType=REFLECT_101)
    np.testing.assert_allclose(y[i, ..., 0], ref, atol=1e-5)
  # Model units (and configs saved before the field existed) keep σ in model pixels.
  d2.corrupt.sigma_units = "model"
  plan = transfer.TransferPlan(d2, {"mode": "search", "step": 2}, tables, data_cfg=ft.data)
  np.testing.assert_allclose(plan.lookup("train", np.array([0, 1]), zoom)["sigma"], [0.5, 1.1])
  del d2.corrupt["sigma_units"]
  assert not recipes.native_units(d2.corrupt)
  # The OBS cache remembers the units, so a cache searched in other units is not reused.
  meta = obs.cache_meta(d2, init_from="/x", ckpt_step=1, step=2, data_cfg=ft.data, image_size=S,
                        mean=0.0, std=1.0)
  assert meta["sigma_units"] == "model"


def test_sigma_units_is_validated():
  cfg = load_config("deblur_mae", "smoke")
  cfg.corrupt.sigma_units = "pixels"
  with pytest.raises(ValueError, match="corrupt.sigma_units"):
    validate.validate_pretrain(cfg, num_devices=1)
  cfg = load_config("d2mae", "smoke")
  cfg.data.name, cfg.data.native_size = "folder", 0
  with pytest.raises(ValueError, match="data.native_size"):
    validate.validate_pretrain(cfg, num_devices=1)
