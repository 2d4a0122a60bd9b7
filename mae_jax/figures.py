"""Figure primitives without pyplot (no global state; Agg when saved), at a fixed size in inches and
`DPI`, so a saved PNG's pixel size is known in advance: used by `visualize.py` and the enhancement job."""

from __future__ import annotations

import os

import numpy as np

DPI = 100
CELL = 2.0  # inches per image in the grids
HEADER = 0.75  # inches above the grid for the title


def new_figure(width_in: float, height_in: float):
  from matplotlib.figure import Figure
  return Figure(figsize=(width_in, height_in), dpi=DPI)


def show(ax, img, title=None, **kw):
  img = np.asarray(img, np.float32)
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  if img.ndim == 2:
    kw.setdefault("cmap", "gray")
  if "vmin" not in kw and img.ndim == 2 and kw.get("cmap") == "gray":
    kw.update(vmin=0.0, vmax=1.0)
  ax.imshow(np.clip(img, 0.0, 1.0) if img.ndim == 3 else img, interpolation="nearest", **kw)
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=7, pad=2)


def save(fig, path: str) -> str:
  """Writes a figure as PNG at DPI, size unchanged (no tight bbox), through the Agg canvas."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  FigureCanvasAgg(fig)
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  fig.savefig(path, dpi=DPI, format="png")
  return path


def enhancement_figure(low, methods, high, *, title: str | None = None):
  """USFM Fig. 9's layout: one row per test image, columns low | each method's output | high, the
  SSIM against high under every image. low, high: (N, H, W) uint8; methods: [(name, (N, H, W) uint8)]."""
  from mae_jax import image_quality
  low, high = np.asarray(low), np.asarray(high)
  cols = [("low quality", low)] + [(n, np.asarray(a)) for n, a in methods] + [("high quality", high)]
  n, k = len(low), len(cols)
  fig = new_figure(k * CELL, n * CELL + HEADER)
  fig.suptitle(title or "Image enhancement (test pairs)", fontsize=9)
  top = 1.0 - HEADER / (n * CELL + HEADER)
  for i in range(n):
    for j, (name, imgs) in enumerate(cols):
      ax = fig.add_axes([j / k, top - (i + 1) * (top / n), 1.0 / k, top / n * 0.86])
      img = imgs[i].astype(np.float32) / 255.0
      label = name if i == 0 else None
      if j < k - 1:
        ssim = float(image_quality.ssim(img[None], high[i:i + 1] / 255.0)[0])
        label = f"{name}\nSSIM {ssim:.3f}" if i == 0 else f"SSIM {ssim:.3f}"
      show(ax, img, label)
  return fig
