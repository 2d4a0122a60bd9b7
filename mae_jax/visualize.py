"""Reconstruction figures: original | model input | reconstruction | reconstruction with the visible
patches pasted back.

Everything here works on arrays; the plotting CLI and notebook build on these functions.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mae_jax import patches as patch_lib


def denormalize_patches(pred, target_patches, mask=None, *, eps: float = 1e-6):
  """Undo norm-pix: a norm-pix model predicts each patch normalised by its own mean and std.

  With `mask` given, every patch gets the mean/std of the *visible* patches of its image (the
  statistics a user really has at inference); without it, each patch's own statistics (an oracle
  view, useful only to judge the shape of the prediction)."""
  if mask is None:
    mean = target_patches.mean(-1, keepdims=True)
    var = target_patches.var(-1, keepdims=True, ddof=1)
    return pred * jnp.sqrt(var + eps) + mean
  vis = (1.0 - mask)[..., None]
  count = jnp.maximum(vis.sum((1, 2), keepdims=True) * target_patches.shape[-1], 1.0)
  mean = (target_patches * vis).sum((1, 2), keepdims=True) / count
  var = (((target_patches - mean) ** 2) * vis).sum((1, 2), keepdims=True) / jnp.maximum(count - 1, 1.0)
  return pred * jnp.sqrt(var + eps) + mean


def paste_visible(recon_img, orig_img, pixel_mask):
  """Reconstruction where masked (pixel_mask = 1), the original where visible."""
  return recon_img * pixel_mask + orig_img * (1.0 - pixel_mask)


def panel(columns: list[np.ndarray], gap: int = 2) -> np.ndarray:
  """Rows = images, columns = the given stages; (N, H, W, C) arrays in [0, 1] -> one (H', W', C) grid."""
  n, h, w, c = columns[0].shape
  out = np.ones((n * (h + gap) - gap, len(columns) * (w + gap) - gap, c), np.float32)
  for j, col in enumerate(columns):
    col = np.clip(np.asarray(col, np.float32), 0, 1)
    for i in range(n):
      out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = col[i]
  return out


def reconstruction_columns(model, x01, inputs01, mean, std, *, key=None, noise=None, **model_kwargs):
  """Runs a pretraining model and returns the four columns, all in [0, 1] pixel space."""
  spec = model.spec
  target = (x01 - mean) / std
  inp = (inputs01 - mean) / std
  _, pred, mask = model(inp, target=target, key=key, noise=noise, **model_kwargs)
  tgt_patches = patch_lib.patchify(target, spec.patch_size)
  if getattr(model, "norm_pix_loss", False):
    pred = denormalize_patches(pred, tgt_patches, mask)
  recon = patch_lib.unpatchify(pred, spec.patch_size, spec.grid, spec.in_chans) * std + mean
  if "pixel_mask" in model_kwargs:  # SimMIM/USFM: masking happened in pixel space
    pix = model_kwargs["pixel_mask"]
    shown_input = inputs01
  else:
    pix = patch_lib.upsample_patch_mask(mask, spec.patch_size, spec.grid)
    shown_input = inputs01 * (1.0 - pix) + 0.5 * pix  # masked patches shown gray
  pasted = paste_visible(recon, x01, pix)
  return [x01, shown_input, recon, pasted]
