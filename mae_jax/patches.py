"""Patchify / unpatchify in the order of facebookresearch/mae.

Tokens run row-major over the patch grid; inside a patch the layout is (row, col, channel) with the
channel fastest. Every part of the package (losses, masks, figures, export) relies on this order.
"""

import jax.numpy as jnp


def patchify(images, patch_size: int):
  """(N, H, W, C) -> (N, h*w, p*p*C)."""
  n, hh, ww, c = images.shape
  p = patch_size
  if hh % p or ww % p:
    raise ValueError(f"image size {hh}x{ww} is not divisible by patch size {p}")
  h, w = hh // p, ww // p
  x = images.reshape(n, h, p, w, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # n, h, w, p(row), p(col), c
  return x.reshape(n, h * w, p * p * c)


def take_tokens(x, ids):
  """x (N, T, D) at per-example token indices ids (N, R) -> (N, R, D): MAE's kept tokens, its
  unshuffle, the masked tokens of the train step's decoder tail."""
  return jnp.take_along_axis(x, ids[:, :, None], axis=1)


def unpatchify(tokens, patch_size: int, grid_hw: tuple[int, int], channels: int):
  """(N, h*w, p*p*C) -> (N, H, W, C); the inverse of `patchify`."""
  n = tokens.shape[0]
  h, w = grid_hw
  p = patch_size
  x = tokens.reshape(n, h, w, p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h * p, w * p, channels)


def upsample_patch_mask(mask, patch_size: int, grid_hw: tuple[int, int]):
  """(N, L) token mask -> (N, H, W, 1) pixel mask (same values, constant inside each patch)."""
  n = mask.shape[0]
  h, w = grid_hw
  m = mask.reshape(n, h, 1, w, 1, 1)
  m = jnp.broadcast_to(m, (n, h, patch_size, w, patch_size, 1))
  return m.reshape(n, h * patch_size, w * patch_size, 1)
