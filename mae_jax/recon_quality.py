"""Has the model learned anything? Its error on the masked patches against the simplest guess.

The guess: fill every masked patch with the mean of the image's visible pixels (what a model that
learned nothing about structure, only brightness, would do). A model that reconstructs shapes beats
it clearly; an untrained or collapsed one does not. Both errors are the mean squared error over the
masked pixels of the clean image in [0, 1] (the reconstruction clipped to [0, 1], the range it is
shown in), averaged over images, so they compare across recipes and normalisations. For USFM the
"masked patches" are its spatial mean mask.

A leaf module (numpy only): the figures (`mae_jax.visualize`) and the end of a pretraining run use
it on a `reconstruct.Reconstruction`'s arrays.
"""

from __future__ import annotations

import numpy as np


def masked_errors(original, reconstruction, pixel_mask) -> dict:
  """original, reconstruction: (N, H, W, C) in [0, 1]; pixel_mask: (N, H, W, 1), 1 = masked.
  Returns {'model': MSE of the clipped reconstruction, 'mean_fill': MSE of the visible-mean fill,
  'reduction': 1 - model / mean_fill, 'images': N}, MSEs over the masked pixels of each image,
  averaged over the images that have both masked and visible pixels."""
  x = np.asarray(original, np.float64)
  r = np.clip(np.asarray(reconstruction, np.float64), 0.0, 1.0)
  if x.shape != r.shape or x.ndim != 4:
    raise ValueError(f"original {x.shape} and reconstruction {r.shape} must be the same (N, H, W, C)")
  m = np.broadcast_to(np.asarray(pixel_mask, np.float64), x.shape)
  v = 1.0 - m
  masked, visible = m.sum(axis=(1, 2, 3)), v.sum(axis=(1, 2, 3))
  ok = (masked > 0) & (visible > 0)
  if not ok.any():
    raise ValueError("no image has both masked and visible pixels: nothing to compare")
  fill = (x * v).sum(axis=(1, 2, 3)) / np.maximum(visible, 1.0)
  model = (((r - x) ** 2) * m).sum(axis=(1, 2, 3)) / np.maximum(masked, 1.0)
  base = (((fill[:, None, None, None] - x) ** 2) * m).sum(axis=(1, 2, 3)) / np.maximum(masked, 1.0)
  model, base = float(model[ok].mean()), float(base[ok].mean())
  return {"model": model, "mean_fill": base, "reduction": 1.0 - model / base if base > 0 else 0.0,
          "images": int(ok.sum())}


def of(rec) -> dict:
  """`masked_errors` of a `reconstruct.Reconstruction` (original, reconstruction, pixel_mask)."""
  return masked_errors(rec.original, rec.reconstruction, rec.pixel_mask)


def describe(q: dict, where: str = "") -> str:
  """One line: both errors and how far the model is below the mean fill."""
  where = f" ({where})" if where else ""
  verdict = "below" if q["reduction"] >= 0 else "ABOVE"
  return (f"masked-patch MSE{where}: model {q['model']:.4f} vs visible-mean fill {q['mean_fill']:.4f} "
          f"({100 * abs(q['reduction']):.0f}% {verdict}, {q['images']} images)")


def caption(rec) -> str:
  """The figure caption's line for the images shown ('' when nothing is masked, e.g. mask ratio 0)."""
  try:
    return describe(of(rec), "these images")
  except ValueError:
    return ""
