"""Mean / median / motion / defocus sizes in stored pixels (`corrupt.kernel_units='native'`): the
kernel of the stored image seen through each crop's resize, against closed forms and against the
model-pixel kernels at zoom 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from mae_jax import recipes
from mae_jax.corrupt import blur
from tests.conftest import load_config


def _images(n=2, s=24, seed=0):
  return np.random.default_rng(seed).random((n, s, s, 1)).astype(np.float32)


def test_zoom_one_is_the_model_pixel_kernel():
  x = _images()
  one = jnp.ones((2, 2))
  angle = jnp.array([0.3, 2.0])
  pairs = [
      (blur.native_mean_blur(x, 5, one, 9), blur.mean_blur(x, 5)),
      (blur.native_median_blur(x, 3, one, 7), blur.median_blur(x, 3)),
      (blur.native_defocus_blur(x, 2, one, 7), blur.defocus_blur(x, 2)),
      (blur.native_motion_blur(None, x, 5, one, 9, angle=angle), blur.motion_blur(None, x, 5, angle=angle)),
  ]
  for got, want in pairs:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_mean_box_spans_size_times_zoom_model_pixels():
  """size 3 at zoom (2, 1): 6 model pixels along H — taps ½, 1, 1, 1, 1, 1, ½ over 6 — and the plain
  3-tap box along W."""
  x = _images()
  got = np.asarray(blur.native_mean_blur(x, 3, jnp.array([[2.0, 1.0]] * 2), 9))
  wy = np.array([0.5, 1, 1, 1, 1, 1, 0.5]) / 6
  want = ndimage.correlate1d(ndimage.correlate1d(x.astype(np.float64), wy, axis=1, mode="mirror"),
                             np.ones(3) / 3, axis=2, mode="mirror")
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_defocus_and_median_windows_worked_by_hand():
  x = _images(seed=1)
  two = jnp.full((2, 2), 2.0)
  # radius 1 stored pixel at zoom 2: model cells with dy² + dx² ≤ 4, 13 of them
  offs = np.arange(-2, 3)
  disk = (offs[:, None] ** 2 + offs[None, :] ** 2 <= 4).astype(np.float64)
  assert disk.sum() == 13
  want = ndimage.correlate(x[..., 0].astype(np.float64), (disk / 13)[None], mode="mirror")
  np.testing.assert_allclose(np.asarray(blur.native_defocus_blur(x, 1, two, 7))[..., 0], want, atol=1e-6)
  # median 3 at zoom 2: round((6 − 1) / 2) = 2 (half to even), a 5 × 5 window
  np.testing.assert_allclose(np.asarray(blur.native_median_blur(x, 3, two, 9)),
                             np.asarray(blur.median_blur(x, 5)), atol=1e-6)


@pytest.mark.parametrize("method", ["mean", "median", "defocus", "motion"])
def test_recipe_blurs_in_stored_pixels_by_default(method):
  c = load_config("deblur_mae", f"smoke,blur={method}")
  assert c.corrupt.kernel_units == "native"
  x = jnp.asarray(_images(s=32))
  zoom = jnp.full((2, 2), 2.0)
  key = jax.random.key(0)
  native, _ = recipes.corrupt(c, key, x, zoom)
  c.corrupt.kernel_units = "model"
  model, _ = recipes.corrupt(c, key, x, zoom)
  params = recipes.blur_params(c.corrupt)
  np.testing.assert_allclose(np.asarray(model), np.asarray(blur.apply_blur(method, key, x, **params)),
                             atol=1e-6)
  assert np.abs(np.asarray(native) - np.asarray(model)).max() > 1e-3  # the zoom widened the kernel
