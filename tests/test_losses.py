"""Losses against hand-written torch references and the official focal-frequency-loss package."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from focal_frequency_loss import FocalFrequencyLoss

from mae_jax import losses
from mae_jax.patches import patchify

torch.set_default_dtype(torch.float32)


def _torch_patchify(imgs_nchw, p):
  # facebookresearch/mae MaskedAutoencoderViT.patchify, written out
  n, c, hh, ww = imgs_nchw.shape
  h, w = hh // p, ww // p
  x = imgs_nchw.reshape(n, c, h, p, w, p)
  x = torch.einsum("nchpwq->nhwpqc", x)
  return x.reshape(n, h * w, p * p * c)


def _torch_forward_loss(imgs_nchw, pred, mask, p, norm_pix):
  # facebookresearch/mae MaskedAutoencoderViT.forward_loss, written out
  target = _torch_patchify(imgs_nchw, p)
  if norm_pix:
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.e-6) ** .5
  loss = (pred - target) ** 2
  loss = loss.mean(dim=-1)
  return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("which", ["masked", "all"])
def test_patch_mse_matches_official_forward_loss(channels, norm_pix, which):
  rng = np.random.default_rng(channels + 10 * norm_pix)
  n, size, p = 2, 32, 8
  imgs = rng.random((n, size, size, channels), dtype=np.float32)
  L = (size // p) ** 2
  pred = rng.normal(size=(n, L, p * p * channels)).astype(np.float32)
  mask = np.zeros((n, L), np.float32)
  for i in range(n):
    mask[i, rng.permutation(L)[: 12]] = 1
  t_imgs = torch.from_numpy(imgs).permute(0, 3, 1, 2)
  t_mask = torch.from_numpy(mask) if which == "masked" else torch.ones(n, L)
  ref = _torch_forward_loss(t_imgs, torch.from_numpy(pred), t_mask, p, norm_pix).item()
  target = patchify(jnp.asarray(imgs), p)
  np.testing.assert_allclose(np.asarray(_torch_patchify(t_imgs, p)), np.asarray(target), atol=0)
  got = jax.jit(lambda a, b, m: losses.reconstruction_loss(a, b, m, which=which,
                                                           norm_pix=norm_pix))(pred, target, mask)
  np.testing.assert_allclose(float(got), ref, rtol=1e-6, atol=1e-6)
  direct = losses.patch_mse(pred, target, mask if which == "masked" else None, norm_pix=norm_pix)
  np.testing.assert_allclose(float(direct), ref, rtol=1e-6, atol=1e-6)


def test_reconstruction_loss_rejects_bad_which():
  x = jnp.zeros((1, 4, 3))
  with pytest.raises(ValueError, match="which"):
    losses.reconstruction_loss(x, x, None, which="visible")
  with pytest.raises(ValueError, match="mask"):
    losses.reconstruction_loss(x, x, None, which="masked")


def test_l1_loss():
  rng = np.random.default_rng(0)
  a, b = rng.random((2, 2, 8, 8, 3), dtype=np.float32)
  ref = torch.nn.functional.l1_loss(torch.from_numpy(a), torch.from_numpy(b)).item()
  np.testing.assert_allclose(float(losses.l1_loss(a, b)), ref, rtol=1e-6)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_focal_frequency_loss_matches_official(channels, alpha):
  rng = np.random.default_rng(channels)
  pred = rng.random((2, 32, 32, channels), dtype=np.float32)
  target = rng.random((2, 32, 32, channels), dtype=np.float32)
  ref = FocalFrequencyLoss(alpha=alpha)(_nchw(pred), _nchw(target)).item()
  got = float(jax.jit(lambda a, b: losses.focal_frequency_loss(a, b, alpha=alpha))(pred, target))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_focal_frequency_loss_gradient_treats_weight_as_constant(channels):
  rng = np.random.default_rng(7 + channels)
  pred = rng.random((2, 16, 16, channels), dtype=np.float32)
  target = rng.random((2, 16, 16, channels), dtype=np.float32)

  # torch: the official loss detaches its weight matrix
  t_pred = _nchw(pred).requires_grad_(True)
  FocalFrequencyLoss()(t_pred, _nchw(target)).backward()
  ref_grad = t_pred.grad.numpy().transpose(0, 2, 3, 1)

  grad = np.asarray(jax.grad(losses.focal_frequency_loss)(pred, target))
  np.testing.assert_allclose(grad, ref_grad, atol=1e-6, rtol=1e-4)

  # the same gradient as with the weight frozen to a constant computed outside the graph
  spec = jnp.fft.fft2(jnp.asarray(pred - target), axes=(1, 2), norm="ortho")
  w_const = np.asarray(losses.focal_frequency_weight(spec))

  def frozen(p):
    s = jnp.fft.fft2(p - target, axes=(1, 2), norm="ortho")
    return jnp.mean(w_const * (jnp.real(s) ** 2 + jnp.imag(s) ** 2))

  np.testing.assert_allclose(grad, np.asarray(jax.grad(frozen)(pred)), atol=1e-7, rtol=1e-5)
  # analytic: d/dp mean(w |F(p − t)|²) = 2 Re(F^H (w ⊙ F(p − t))) / size, F orthonormal
  size = pred.size
  analytic = 2 * np.real(np.fft.ifft2(w_const * np.asarray(spec), axes=(1, 2), norm="ortho")) / size
  np.testing.assert_allclose(grad, analytic, atol=1e-7, rtol=1e-4)


def test_focal_frequency_loss_of_exact_reconstruction_is_zero():
  x = np.random.default_rng(0).random((2, 16, 16, 1), dtype=np.float32)
  assert float(losses.focal_frequency_loss(x, x)) == 0.0
  assert FocalFrequencyLoss()(_nchw(x), _nchw(x)).item() == 0.0
  g = np.asarray(jax.grad(losses.focal_frequency_loss)(x, x))
  assert np.isfinite(g).all() and (g == 0).all()
  # one sample exact, the other not: the exact one gets weight 0 (0/0 → 0), no NaN anywhere
  y = x.copy()
  y[1] += 0.1 * np.random.default_rng(1).random((16, 16, 1), dtype=np.float32)
  ref = FocalFrequencyLoss()(_nchw(y), _nchw(x)).item()
  np.testing.assert_allclose(float(losses.focal_frequency_loss(y, x)), ref, rtol=1e-5, atol=1e-7)
  assert np.isfinite(np.asarray(jax.grad(losses.focal_frequency_loss)(y, x))).all()


def test_usfm_loss_is_l1_plus_lambda_ffl():
  rng = np.random.default_rng(3)
  pred = rng.random((2, 32, 32, 1), dtype=np.float32)
  target = rng.random((2, 32, 32, 1), dtype=np.float32)
  tp, tt = _nchw(pred), _nchw(target)
  ref = (torch.nn.functional.l1_loss(tp, tt) + 0.4 * FocalFrequencyLoss()(tp, tt)).item()
  np.testing.assert_allclose(float(jax.jit(losses.usfm_loss)(pred, target)), ref, rtol=1e-5)
  np.testing.assert_allclose(float(losses.usfm_loss(pred, target, lam=1.0)),
                             float(losses.l1_loss(pred, target)
                                   + losses.focal_frequency_loss(pred, target)), rtol=1e-6)


def test_focal_frequency_loss_against_usfm_eq13():
  """The two documented departures of the package form from USFM Eq. 13–14, pinned numerically:
  (1) with the unnormalised DFT of Eq. 3 and the 1/HW of Eq. 13 (weight as the package normalises
  it), Eq. 13 = H·W × our loss, per image; (2) the paper's min–max weight is a different loss: the
  package's weight has a non-zero minimum (min/max), which min–max sends to 0."""
  rng = np.random.default_rng(5)
  n, h, w = 2, 16, 24
  pred = rng.random((n, h, w, 1), dtype=np.float32)
  target = rng.random((n, h, w, 1), dtype=np.float32)
  ours = np.array([float(losses.focal_frequency_loss(pred[i:i + 1], target[i:i + 1])) for i in range(n)])

  d = np.fft.fft2((pred - target)[..., 0].astype(np.float64), axes=(1, 2))  # Eq. 3, unnormalised
  mag = np.abs(d)
  w_max = mag / mag.max(axis=(1, 2), keepdims=True)
  eq13_max = (w_max * mag**2).sum(axis=(1, 2)) / (h * w)
  np.testing.assert_allclose(eq13_max, h * w * ours, rtol=1e-4)

  w_minmax = (mag - mag.min(axis=(1, 2), keepdims=True)) / np.ptp(mag, axis=(1, 2), keepdims=True)
  eq13_minmax = (w_minmax * mag**2).sum(axis=(1, 2)) / (h * w)
  assert (w_max.min(axis=(1, 2)) > 0).all()
  assert (eq13_minmax < 0.99 * eq13_max).all()
