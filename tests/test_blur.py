"""Blurs against OpenCV / scipy.ndimage with the same kernel and reflect-101 borders."""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from mae_jax.corrupt import blur

TOL = 1e-5
REFLECT_101 = cv2.BORDER_REFLECT_101


def _images(channels, n=2, size=32, seed=0):
  return np.random.default_rng(seed).random((n, size, size, channels), dtype=np.float32)


def _per_sample(fn, x):
  """Apply a 2-D (H, W[, C]) numpy filter sample by sample; keeps NHWC."""
  out = []
  for img in x:
    y = fn(img[..., 0] if img.shape[-1] == 1 else img)
    out.append(y[..., None] if y.ndim == 2 else y)
  return np.stack(out)


def test_gaussian_kernel_size_is_opencv_8bit_rule():
  assert blur.gaussian_kernel_size(1.1) == 9
  assert blur.gaussian_kernel_size(0.1) == 3  # round(1.6) = 2, | 1 = 3
  assert blur.gaussian_kernel_size(0.5) == 5
  assert blur.gaussian_kernel_size(1.6) == 11
  assert blur.gaussian_kernel_size(2.3) == 15


@pytest.mark.parametrize("sigma,size", [(1.1, 9), (0.5, 5), (1.6, 11)])
def test_gaussian_kernel_matches_opencv(sigma, size):
  ref = cv2.getGaussianKernel(size, sigma)[:, 0]
  np.testing.assert_allclose(blur.gaussian_kernel_1d(sigma, size), ref, atol=1e-7)
  np.testing.assert_allclose(blur.gaussian_kernel_1d(jnp.array([sigma]), size)[0], ref, atol=1e-7)


@pytest.mark.parametrize("channels", [1, 3])
def test_gaussian_blur_matches_opencv(channels):
  x = _images(channels)
  y = np.asarray(jax.jit(blur.gaussian_blur)(x))  # σ = 1.1, size 9 by default
  ref = _per_sample(lambda a: cv2.GaussianBlur(a, (9, 9), 1.1, sigmaY=1.1,
                                               borderType=REFLECT_101), x)
  assert y.shape == x.shape and y.dtype == np.float32
  np.testing.assert_allclose(y, ref, atol=TOL)


@pytest.mark.parametrize("channels", [1, 3])
def test_gaussian_blur_per_sample_sigma_traced(channels):
  x = _images(channels, n=3)
  sigma = np.array([0.3, 1.1, 1.6], np.float32)
  y = np.asarray(jax.jit(lambda a, s: blur.gaussian_blur(a, s, kernel_size=11))(x, sigma))
  for n in range(3):
    s = float(sigma[n])
    ref = _per_sample(lambda a: cv2.GaussianBlur(a, (11, 11), s, sigmaY=s,
                                                 borderType=REFLECT_101), x[n:n + 1])
    np.testing.assert_allclose(y[n:n + 1], ref, atol=TOL)


def test_gaussian_blur_matches_scipy_correlate():
  x = _images(1)
  w = cv2.getGaussianKernel(9, 1.1)[:, 0]
  ref = ndi.correlate1d(ndi.correlate1d(x, w, axis=1, mode="mirror"), w, axis=2, mode="mirror")
  np.testing.assert_allclose(np.asarray(blur.gaussian_blur(x, 1.1)), ref, atol=TOL)


def test_gaussian_sigma_zero_is_identity_and_traced_needs_size():
  x = _images(1)
  y = blur.gaussian_blur(x, jnp.zeros((2,)), kernel_size=9)
  np.testing.assert_allclose(np.asarray(y), x, atol=1e-7)
  with pytest.raises(ValueError, match="kernel_size"):
    jax.jit(lambda a, s: blur.gaussian_blur(a, s))(x, jnp.ones((2,)))


@pytest.mark.parametrize("channels", [1, 3])
def test_mean_blur_matches_opencv_and_scipy(channels):
  x = _images(channels)
  y = np.asarray(blur.mean_blur(x, 5))
  ref_cv = _per_sample(lambda a: cv2.blur(a, (5, 5), borderType=REFLECT_101), x)
  ref_sp = ndi.uniform_filter(x, size=(1, 5, 5, 1), mode="mirror")
  np.testing.assert_allclose(y, ref_cv, atol=TOL)
  np.testing.assert_allclose(y, ref_sp, atol=TOL)


@pytest.mark.parametrize("channels", [1, 3])
def test_median_blur_matches_scipy_mirror(channels):
  x = _images(channels)
  y = np.asarray(jax.jit(blur.median_blur)(x))
  ref = ndi.median_filter(x, size=(1, 5, 5, 1), mode="mirror")
  np.testing.assert_allclose(y, ref, atol=TOL)


def test_median_blur_equals_opencv_away_from_border():
  # OpenCV's medianBlur replicates borders; the two agree wherever the window stays inside.
  x = (_images(1) * 255).round().astype(np.uint8)
  y = np.asarray(blur.median_blur(x.astype(np.float32) / 255))
  ref = _per_sample(lambda a: cv2.medianBlur(a, 5), x).astype(np.float32) / 255
  np.testing.assert_allclose(y[:, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=TOL)


@pytest.mark.parametrize("angle", [0.0, 0.3, np.pi / 4, 1.2, np.pi / 2, 2.5])
def test_motion_kernel_is_a_normalised_centred_line(angle):
  k = np.asarray(blur.motion_kernel(angle, 5))
  assert k.shape == (5, 5)
  np.testing.assert_allclose(k.sum(), 1.0, atol=1e-6)
  assert (k >= 0).all()
  np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-7)  # symmetric about the centre: no shift
  assert k[2, 2] == k.max()
  # every cell with weight lies within one pixel of the line through the centre at `angle`
  dy, dx = np.mgrid[-2:3, -2:3]
  dist = np.abs(dx * np.sin(angle) + dy * np.cos(angle))
  assert (dist[k > 1e-6] < 1).all()  # (float32 cos(π/2) ≠ 0 leaves ~1e-7 next to the line)
  # and the cells on the line itself (within 0.25 px and within the length) carry weight
  along = dx * np.cos(angle) - dy * np.sin(angle)
  assert (k[(dist < 0.25) & (np.abs(along) <= 2)] > 0).all()


def test_motion_kernel_axis_aligned_is_a_box():
  np.testing.assert_allclose(blur.motion_kernel(0.0, 5),
                             np.pad(np.full((1, 5), 0.2), ((2, 2), (0, 0))), atol=1e-7)
  np.testing.assert_allclose(blur.motion_kernel(np.pi / 2, 5),
                             np.pad(np.full((5, 1), 0.2), ((0, 0), (2, 2))), atol=1e-7)


@pytest.mark.parametrize("channels", [1, 3])
def test_motion_blur_per_sample_kernels(channels):
  x = _images(channels, n=3)
  key = jax.random.key(3)
  y = np.asarray(jax.jit(blur.motion_blur)(key, x))
  angles = np.asarray(jax.random.uniform(key, (3,), jnp.float32, 0.0, np.pi))
  assert len(np.unique(angles)) == 3
  for n in range(3):
    k = np.asarray(blur.motion_kernel(angles[n], 5))
    ref = ndi.correlate(x[n], k[:, :, None], mode="mirror")
    np.testing.assert_allclose(y[n], ref, atol=TOL)
  # explicit angles reproduce it
  np.testing.assert_allclose(np.asarray(blur.motion_blur(None, x, angle=angles)), y, atol=1e-6)


def test_defocus_kernel_is_a_normalised_disk():
  k = blur.defocus_kernel(5)
  assert k.shape == (11, 11)
  np.testing.assert_allclose(k.sum(), 1.0, atol=1e-6)
  dy, dx = np.mgrid[-5:6, -5:6]
  inside = dx**2 + dy**2 <= 25
  np.testing.assert_array_equal(k > 0, inside)
  np.testing.assert_allclose(k[inside], 1.0 / inside.sum(), rtol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_defocus_blur_matches_opencv_filter2d(channels):
  x = _images(channels)
  k = blur.defocus_kernel(5)
  ref = _per_sample(lambda a: cv2.filter2D(a, -1, k, borderType=REFLECT_101), x)
  np.testing.assert_allclose(np.asarray(blur.defocus_blur(x, 5)), ref, atol=TOL)


@pytest.mark.parametrize("method", sorted(blur.BLURS))
def test_registry_every_method_jits(method):
  x = _images(1, n=2, size=16)
  y = jax.jit(lambda k, a: blur.apply_blur(method, k, a))(jax.random.key(0), x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert np.isfinite(np.asarray(y)).all()


def test_registry_passes_params_and_rejects_bad_ones():
  x = _images(1)
  np.testing.assert_allclose(np.asarray(blur.apply_blur("gaussian", None, x, sigma=0.8)),
                             np.asarray(blur.gaussian_blur(x, 0.8)), atol=0)
  with pytest.raises(ValueError, match="unknown blur method"):
    blur.apply_blur("bilateral", None, x)
  with pytest.raises(ValueError, match="bad parameters"):
    blur.apply_blur("mean", None, x, sigma=1.0)
  with pytest.raises(ValueError, match="odd"):
    blur.mean_blur(x, 4)


# ----------------------------------------------------------------------------------------------
# The denoising-MAE baseline (mae_jax/corrupt/noise.py) lives with the blurs it is compared to.


def test_gaussian_noise_has_requested_std():
  from mae_jax.corrupt.noise import gaussian_noise
  x = _images(1, n=4, size=64)
  std = np.array([0.05, 0.1, 0.2, 0.0], np.float32)
  y = np.asarray(jax.jit(gaussian_noise)(jax.random.key(0), x, std))
  d = (y - x).reshape(4, -1)  # 4096 draws per sample: relative std error ≈ 1.1%
  np.testing.assert_allclose(d[:3].std(axis=1), std[:3], rtol=0.05)
  assert (np.abs(d[:3].mean(axis=1)) < 5 * std[:3] / 64).all()  # 5 standard errors
  np.testing.assert_array_equal(d[3], 0.0)
  assert y.min() < 0 or y.max() > 1  # unclipped by default
  y = np.asarray(gaussian_noise(jax.random.key(1), x, 0.1))
  np.testing.assert_allclose((y - x).std(), 0.1, rtol=0.03)
  yc = np.asarray(gaussian_noise(jax.random.key(1), x, 0.1, clip=True))
  np.testing.assert_allclose(yc, np.clip(y, 0, 1), atol=0)


# ----------------------------------------------------------------------------------------------
# dm-pix: the same blur through dm_pix.gaussian_blur (reflect-pad, VALID, vmapped per-sample σ).


@pytest.mark.parametrize("channels", [1, 3])
def test_dm_pix_gaussian_matches_opencv_and_the_separable_kernel(channels):
  x = _images(channels, n=3)
  sigma = np.array([0.0, 0.8, 1.6], np.float32)
  y = np.asarray(jax.jit(lambda a, s: blur.gaussian_blur(a, s, kernel_size=11, impl="dm_pix"))(x, sigma))
  np.testing.assert_allclose(y[0], x[0], atol=1e-6)  # σ = 0: identity, as the separable kernel
  for n in (1, 2):
    s = float(sigma[n])
    ref = _per_sample(lambda a: cv2.GaussianBlur(a, (11, 11), s, sigmaY=s, borderType=REFLECT_101),
                      x[n:n + 1])
    np.testing.assert_allclose(y[n:n + 1], ref, atol=TOL)
  np.testing.assert_allclose(y, np.asarray(blur.gaussian_blur(x, sigma, kernel_size=11)), atol=TOL)
  shared = np.asarray(blur.gaussian_blur(x, 1.1, impl="dm_pix"))
  np.testing.assert_allclose(shared, np.asarray(blur.gaussian_blur(x, 1.1)), atol=TOL)
  with pytest.raises(ValueError, match="one σ for both"):
    blur.gaussian_blur(x, np.ones((3, 2), np.float32), kernel_size=9, impl="dm_pix")


def test_blur_benchmark_cli_runs(capsys):
  from benchmarks import blur as bench
  bench.main(["--batch=2", "--size=16", "--kernels=5", "--repeats=1"])
  out = capsys.readouterr().out
  assert out.count("e-") >= 5 and "dm_pix (vmap), per-sample σ" in out
