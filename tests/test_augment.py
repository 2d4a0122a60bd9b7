"""USFM's on-device augmentation (mae_jax/corrupt/augment.py) against independent references:
OpenCV's warpAffine for rotation + scaling, closed forms for brightness and contrast, OpenCV's
GaussianBlur for the blur; and the wiring into the USFM step (target = augmented image)."""

import math

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import recipes, validate
from mae_jax.corrupt import augment
from tests.conftest import load_config

H, W = 40, 36


def _smooth(n=1, seed=0):
  rng = np.random.default_rng(seed)
  out = [cv2.GaussianBlur(rng.random((H, W), dtype=np.float32), (0, 0), 2.0) for _ in range(n)]
  out = [(a - a.min()) / (a.max() - a.min()) for a in out]
  return np.stack(out)[..., None].astype(np.float32)


def _identity(n):
  return {"angle": jnp.zeros(n), "scale": jnp.ones(n), "delta": jnp.zeros(n), "factor": jnp.ones(n),
          "sigma": jnp.zeros(n)}


@pytest.mark.parametrize("degrees,scale", [(20.0, 1.0), (-35.0, 1.2), (0.0, 0.85), (90.0, 1.0)])
def test_rotation_and_scaling_match_opencv_warp_affine(degrees, scale):
  x = _smooth()
  p = _identity(1) | {"angle": jnp.array([math.radians(degrees)]), "scale": jnp.array([scale])}
  y = np.asarray(jax.jit(lambda a: augment.apply(a, p, blur_kernel=3))(x))[0, ..., 0]
  m = cv2.getRotationMatrix2D(((W - 1) / 2, (H - 1) / 2), degrees, scale)  # + = counter-clockwise
  ref = cv2.warpAffine(x[0, ..., 0], m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                       borderValue=0)
  # Compare where the source point lies a pixel inside the image: at the very edge OpenCV blends
  # with the border value while dm-pix returns the fill value.
  inv = cv2.invertAffineTransform(m)
  yy, xx = np.mgrid[0:H, 0:W]
  sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
  sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
  inside = (sx >= 1) & (sx <= W - 2) & (sy >= 1) & (sy <= H - 2)
  assert inside.mean() > 0.4
  np.testing.assert_allclose(y[inside], ref[inside], atol=1e-5)
  far = (sx < -1) | (sx > W) | (sy < -1) | (sy > H)
  np.testing.assert_array_equal(y[far], 0.0)  # zeros outside: the black background


@pytest.mark.parametrize("channels", [1, 3])
def test_gather_warp_equals_dm_pix_affine_transform_everywhere(channels):
  """The four-gather warp is dm-pix's order-1, constant-mode affine_transform, edges included."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.random((5, H, W, channels), dtype=np.float32))
  angle = jnp.asarray(rng.uniform(-0.6, 0.6, 5), jnp.float32).at[0].set(0.0)
  scale = jnp.asarray(rng.uniform(0.8, 1.25, 5), jnp.float32).at[0].set(1.0)
  fast = augment.warp(x, angle, scale)
  ref = augment.warp(x, angle, scale, impl="dm_pix")
  np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), atol=1e-5)  # coordinate rounding
  np.testing.assert_allclose(np.asarray(fast[0]), np.asarray(x[0]), atol=1e-6)  # identity


def test_brightness_and_contrast_closed_forms():
  x = _smooth(2) * 0.6 + 0.2
  p = _identity(2) | {"delta": jnp.array([0.1, -0.05]), "factor": jnp.array([1.1, 0.9])}
  y = np.asarray(jax.jit(lambda a: augment.apply(a, p, blur_kernel=3))(x))
  for i, (d, f) in enumerate([(0.1, 1.1), (-0.05, 0.9)]):
    b = np.clip(x[i] + d, 0, 1)
    want = np.clip(f * (b - b.mean()) + b.mean(), 0, 1)
    np.testing.assert_allclose(y[i], want, atol=1e-6)


def test_blur_matches_opencv_and_sigma_zero_is_identity():
  x = _smooth(2)
  p = _identity(2) | {"sigma": jnp.array([1.3, 0.0])}
  y = np.asarray(jax.jit(lambda a: augment.apply(a, p, blur_kernel=9))(x))
  ref = cv2.GaussianBlur(x[0, ..., 0], (9, 9), 1.3, borderType=cv2.BORDER_REFLECT_101)
  np.testing.assert_allclose(y[0, ..., 0], ref, atol=1e-5)
  np.testing.assert_allclose(y[1], x[1], atol=1e-6)


def test_parameters_differ_per_sample_and_follow_the_config():
  c = load_config("usfm", "smoke")
  kw = augment.params(c.augment)
  p = jax.device_get(augment.draw(jax.random.key(0), 2000, **kw))
  assert len(np.unique(p["angle"])) == 2000 and len(np.unique(p["scale"])) == 2000
  assert np.abs(p["angle"]).max() <= math.radians(kw["rotate_deg"]) + 1e-6
  assert kw["scale_min"] <= p["scale"].min() and p["scale"].max() <= kw["scale_max"]
  assert np.abs(p["delta"]).max() <= kw["brightness"] + 1e-7
  assert np.abs(p["factor"] - 1).max() <= kw["contrast"] + 1e-6
  on = p["sigma"] > 0
  assert abs(on.mean() - kw["blur_prob"]) < 0.05  # 2000 draws: 4.5 standard errors
  assert p["sigma"][on].min() >= kw["blur_sigma_min"] and p["sigma"].max() <= kw["blur_sigma_max"]
  x = jnp.asarray(np.repeat(_smooth(1), 3, axis=0))
  y = np.asarray(jax.jit(lambda k, a: augment.augment(k, a, **kw))(jax.random.key(1), x))
  assert not np.allclose(y[0], y[1]) and not np.allclose(y[1], y[2])  # same image, three results


def test_usfm_step_targets_the_augmented_image():
  c = load_config("usfm", "smoke")
  assert c.augment.enabled
  validate.validate_pretrain(c, num_devices=1)
  x = jnp.asarray(np.repeat(_smooth(1), 2, axis=0)[:, :32, :32])
  key = jax.random.key(4)
  clean, inputs, kw = jax.jit(lambda k, a: recipes.augment_and_corrupt(c, k, a))(key, x)
  want_clean = jax.jit(lambda k, a: augment.augment(k, a, **augment.params(c.augment)))(
      jax.random.fold_in(key, 7), x)
  np.testing.assert_allclose(np.asarray(clean), np.asarray(want_clean), atol=1e-6)
  want_inputs, want_kw = jax.jit(lambda k, a: recipes.corrupt(c, k, a))(key, want_clean)
  np.testing.assert_allclose(np.asarray(inputs), np.asarray(want_inputs), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(kw["pixel_mask"]), np.asarray(want_kw["pixel_mask"]))
  # Off for the other recipes: their step is unchanged.
  for name in ("mae", "deblur_mae", "d2mae", "denoise_mae"):
    assert not load_config(name, "smoke").augment.enabled
  off = load_config("usfm", "smoke,noaug")
  assert not off.augment.enabled
  clean, _, _ = jax.jit(lambda k, a: recipes.augment_and_corrupt(off, k, a))(key, x)
  np.testing.assert_array_equal(np.asarray(clean), np.asarray(x))


def test_augment_fields_are_validated():
  c = load_config("usfm", "smoke")
  c.augment.scale_min = 1.2
  with pytest.raises(ValueError, match="augment.scale_min"):
    validate.validate_pretrain(c, num_devices=1)
