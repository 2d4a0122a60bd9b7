"""SRAD against a plain per-pixel numpy loop of Yu & Acton's equations.

Tolerance 1e-5: the reference runs in float64, the jnp code in float32 (unit rounding ≈ 6e-8 per
operation); the explicit scheme with Δt/4 = 0.025 and c ∈ [0, 1] is contractive, so 40 iterations
do not amplify rounding (the observed gap is ≈ 3e-7).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.corrupt import blur
from mae_jax.corrupt.srad import srad


def srad_reference(img, iterations=40, dt=0.1):
  """Yu & Acton 2002 on one 2-D image, written out pixel by pixel in float64.

  Replicated borders (clamped neighbour indices); q0² = var / mean² of the whole image, every
  iteration; I ← I + Δt/4 · [c(i+1,j) d_S + c(i,j) d_N + c(i,j+1) d_E + c(i,j) d_W].
  """
  img = img.astype(np.float64).copy()
  h, w = img.shape
  for _ in range(iterations):
    q0sq = img.var() / img.mean() ** 2
    c = np.zeros_like(img)
    for i in range(h):
      for j in range(w):
        v = img[i, j]
        d_n = img[max(i - 1, 0), j] - v
        d_s = img[min(i + 1, h - 1), j] - v
        d_w = img[i, max(j - 1, 0)] - v
        d_e = img[i, min(j + 1, w - 1)] - v
        grad2 = (d_n**2 + d_s**2 + d_w**2 + d_e**2) / v**2
        lap = (d_n + d_s + d_w + d_e) / v
        qsq = (0.5 * grad2 - lap**2 / 16) / (1 + 0.25 * lap) ** 2
        c[i, j] = min(max(1 / (1 + (qsq - q0sq) / (q0sq * (1 + q0sq))), 0.0), 1.0)
    new = img.copy()
    for i in range(h):
      for j in range(w):
        v = img[i, j]
        s, e = min(i + 1, h - 1), min(j + 1, w - 1)
        div = (c[s, j] * (img[s, j] - v) + c[i, j] * (img[max(i - 1, 0), j] - v)
               + c[i, e] * (img[i, e] - v) + c[i, j] * (img[i, max(j - 1, 0)] - v))
        new[i, j] = v + dt / 4 * div
    img = new
  return img


def _reference_nhwc(x, **kw):
  return np.stack([np.stack([srad_reference(x[n, :, :, ch], **kw) for ch in range(x.shape[-1])],
                            axis=-1) for n in range(x.shape[0])])


def _speckled(n, size, channels, seed):
  # multiplicative gamma speckle on a smooth ramp with an edge, kept away from 0 (the reference
  # divides by I directly)
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  base = 0.3 + 0.4 * (xx > 0.5) + 0.2 * yy
  speckle = rng.gamma(4.0, 0.25, (n, size, size, channels))
  return np.clip(base[None, :, :, None] * speckle, 0.02, 1.0).astype(np.float32)


@pytest.mark.parametrize("channels,size", [(1, 32), (3, 20)])
def test_srad_matches_numpy_loop(channels, size):
  x = _speckled(2, size, channels, seed=channels)
  y = np.asarray(jax.jit(srad)(x))
  ref = _reference_nhwc(x)
  assert y.shape == x.shape and y.dtype == np.float32
  np.testing.assert_allclose(y, ref, atol=1e-5)
  assert np.abs(y - x).max() > 0.05  # it did smooth


def test_srad_uniform_noise_and_other_params():
  x = np.random.default_rng(0).uniform(0.05, 1.0, (1, 24, 24, 1)).astype(np.float32)
  y = np.asarray(srad(x, iterations=10, dt=0.2))
  np.testing.assert_allclose(y, _reference_nhwc(x, iterations=10, dt=0.2), atol=1e-5)


def test_srad_per_sample_dt():
  x = _speckled(2, 16, 1, seed=5)
  y = np.asarray(jax.jit(lambda a, d: srad(a, dt=d))(x, jnp.array([0.05, 0.1])))
  for n, dt in enumerate([0.05, 0.1]):
    np.testing.assert_allclose(y[n], _reference_nhwc(x[n:n + 1], dt=dt)[0], atol=1e-5)


def test_srad_guards_black_pixels_and_keeps_constants():
  x = _speckled(1, 16, 1, seed=7)
  x[:, :6, :6] = 0.0  # flat black background
  x[:, 10, 10] = 0.0  # a black pixel among bright ones
  y = np.asarray(srad(x))
  assert np.isfinite(y).all()
  # Δt ≤ 1 and c ∈ [0, 1] make each update a convex combination of neighbours: no overshoot
  assert y.min() >= x.min() - 1e-7 and y.max() <= x.max() + 1e-7
  const = np.full((2, 8, 8, 1), 0.4, np.float32)
  np.testing.assert_allclose(np.asarray(srad(const)), const, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(srad(np.zeros((1, 8, 8, 1), np.float32))), 0.0)


def test_srad_through_registry():
  x = _speckled(1, 16, 1, seed=9)
  np.testing.assert_allclose(np.asarray(blur.apply_blur("srad", None, x)),
                             np.asarray(srad(x)), atol=0)
