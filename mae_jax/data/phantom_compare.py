"""The phantom against real B-mode frames at a matched pixel size (docs/phantom.md, "Phantom vs
real frames"): grey-level statistics, speckle size and dark-region contrast.

    python -m mae_jax.data.phantom_compare [--n=24] [--mm=0.4] [--figure=docs/phantom_vs_real.png]
        [--display_gain_db=0 --display_smoothing=0]   # the raw display instead of us_phantom.DISPLAY

Real frames: the B-mode regions of the public DICOM files of ``pydicom-data`` that carry a pixel
spacing (SonoSite cine, every 30th frame; Philips EPIQ; both Aloka views), converted as folder
datasets convert them (``dicom.read_dicom``). Phantom: ``phantom.simulate`` images whose size is
chosen so that a display pixel is ``mm`` wide (each example is drawn once to find its field of
view, then simulated at that size, so speckle is generated at the matched pixel size, not
resampled). Real crops are resampled (bilinear) to ``mm``.

Statistics per image, over the pixels inside the field of view (non-zero pixels, eroded by 3 px,
for real frames; the fan for the phantom):
  * grey levels: mean, standard deviation, 5th/50th/95th percentiles (0..255);
  * speckle size: full width at half maximum of the normalised autocorrelation of the
    mean-removed image, along rows (axial) and columns (lateral), in pixels; the median over
    32 × 32 patches (13 mm at 0.4 mm per pixel: larger patches take in anatomy, not speckle)
    lying wholly inside the field of view and of homogeneous local mean. A finite, mean-removed
    patch reads low: by about 5 % at a FWHM of 4 px and 15–18 % at 7–10 px (tests/test_phantom.py);
  * gCNR (Rodriguez-Molares et al., IEEE TUFFC 2020: 1 − the overlap of the two grey-level
    histograms) between the darkest tenth (by local mean, Gaussian σ = 6 px) of the field of view
    and the middle fifth (40th–60th percentile of local mean): one rule for both image kinds.
"""

from __future__ import annotations

import math

import numpy as np
from absl import flags
from scipy import ndimage

from mae_jax import tool_flags
from mae_jax.data import us_phantom

__all__ = ["fwhm_1d", "speckle_fwhm", "gcnr", "dark_tissue_gcnr", "image_stats", "real_frames",
           "phantom_frames", "compare"]

_REAL = ("color3d_jpeg_baseline.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "gdcm-US-ALOKA-16.dcm")


def fwhm_1d(profile: np.ndarray, centre: int) -> float:
  """Full width at half maximum of a symmetric peak at ``centre`` (linear interpolation)."""
  p = np.asarray(profile, np.float64) / profile[centre]
  widths = []
  for step in (1, -1):
    k = centre
    while 0 <= k + step < p.size and p[k + step] > 0.5:
      k += step
    if not 0 <= k + step < p.size:
      return float("nan")
    a, b = p[k], p[k + step]
    widths.append(abs(k - centre) + (a - 0.5) / (a - b))
  return float(sum(widths))


def _autocorr(patch: np.ndarray) -> np.ndarray:
  x = patch - patch.mean()
  f = np.fft.fft2(x, s=(2 * x.shape[0], 2 * x.shape[1]))
  ac = np.fft.fftshift(np.real(np.fft.ifft2(f * np.conj(f))))
  return ac / ac.max()


def speckle_fwhm(img: np.ndarray, valid: np.ndarray, patch: int = 32) -> tuple[float, float]:
  """Median (axial, lateral) autocorrelation FWHM in pixels over homogeneous patches."""
  img = img.astype(np.float64)
  h, w = img.shape
  found = []
  for y in range(0, h - patch + 1, patch // 2):
    for x in range(0, w - patch + 1, patch // 2):
      if valid[y:y + patch, x:x + patch].all():
        p = img[y:y + patch, x:x + patch]
        found.append((p, abs(p[: patch // 2].mean() - p[patch // 2:].mean())
                      + abs(p[:, : patch // 2].mean() - p[:, patch // 2:].mean())))
  if not found:
    return float("nan"), float("nan")
  # Homogeneous: the half of the patches whose halves differ least in mean (no edges inside).
  found.sort(key=lambda t: t[1])
  ax, lat = [], []
  for p, _ in found[: max(1, len(found) // 2)]:
    if p.std() < 1e-6:
      continue
    ac = _autocorr(p)
    c = ac.shape[0] // 2
    ax.append(fwhm_1d(ac[:, c], c))
    lat.append(fwhm_1d(ac[c, :], c))
  return float(np.nanmedian(ax)), float(np.nanmedian(lat))


def gcnr(a: np.ndarray, b: np.ndarray) -> float:
  """1 − overlap of the 256-bin grey-level histograms of two pixel sets."""
  ha = np.bincount(a.astype(np.int64).ravel(), minlength=256) / max(a.size, 1)
  hb = np.bincount(b.astype(np.int64).ravel(), minlength=256) / max(b.size, 1)
  return float(1.0 - np.minimum(ha, hb).sum())


def dark_tissue_gcnr(img: np.ndarray, valid: np.ndarray, sigma: float = 6.0) -> float:
  v = valid.astype(np.float64)
  local = ndimage.gaussian_filter(img.astype(np.float64) * v, sigma) / np.maximum(
      ndimage.gaussian_filter(v, sigma), 1e-6)
  lm = local[valid]
  lo, q4, q6 = np.percentile(lm, [10, 40, 60])
  dark = img[valid & (local <= lo)]
  tissue = img[valid & (local >= q4) & (local <= q6)]
  return gcnr(dark, tissue)


def image_stats(img: np.ndarray, valid: np.ndarray) -> dict:
  px = img[valid].astype(np.float64)
  ax, lat = speckle_fwhm(img, valid)
  p5, p50, p95 = np.percentile(px, [5, 50, 95])
  return {"mean": px.mean(), "std": px.std(), "p5": p5, "p50": p50, "p95": p95,
          "fwhm_axial": ax, "fwhm_lateral": lat, "gcnr": dark_tissue_gcnr(img, valid)}


def _resample(img: np.ndarray, from_mm: tuple[float, float], to_mm: float) -> np.ndarray:
  zoom = (from_mm[0] / to_mm, from_mm[1] / to_mm)
  return np.clip(ndimage.zoom(img.astype(np.float64), zoom, order=1), 0, 255).round().astype(np.uint8)


def real_frames(mm: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """(name, image at ``mm`` per pixel, field-of-view mask) of each real B-mode view."""
  from pydicom.data import get_testdata_file

  from mae_jax.data import dicom

  out = []
  for name in _REAL:
    views, _, _ = dicom.read_dicom(get_testdata_file(name), frames=30)
    for v in views:
      img = _resample(v.image, v.spacing_mm, mm)
      valid = ndimage.binary_erosion(ndimage.binary_opening(img > 0, iterations=2), iterations=3)
      out.append((f"{name} frame {v.frame} region {v.region}", img, valid))
  return out


def phantom_frames(mm: float, n: int, seed: int = 0, **display) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """``display``: ``phantom.simulate``'s display options (``display_gain_db``, ``display_smoothing``);
  none given: the built-in dataset's, ``us_phantom.DISPLAY``."""
  from mae_jax.data import phantom

  display = display or us_phantom.DISPLAY
  out = []
  for i in range(n):
    probe_px = phantom.simulate(seed, i, 64, return_intermediates=True)["pixel_size_cm"] * 64 * 10
    size = int(min(512, max(64, round(probe_px / mm))))
    ex = phantom.simulate(seed, i, size, return_intermediates=True, **display)
    fan = np.asarray(ex["fan"], bool) if ex.get("fan") is not None else np.ones((size, size), bool)
    valid = ndimage.binary_erosion(fan, iterations=3)
    out.append((f"phantom {phantom.ORGANS[ex['organ']]} #{i}", ex["image"], valid))
  return out


def compare(n: int = 24, mm: float = 0.4, **display) -> dict:
  """Per-image statistics and their medians for the real frames and the phantom, displayed as the
  built-in dataset stores it unless ``display`` names ``phantom.simulate``'s display options."""
  res = {}
  for kind, frames in (("real", real_frames(mm)), ("phantom", phantom_frames(mm, n, **display))):
    rows = {name: image_stats(img, valid) for name, img, valid in frames}
    keys = next(iter(rows.values())).keys()
    res[kind] = {"images": rows, "median": {k: float(np.nanmedian([r[k] for r in rows.values()])) for k in keys},
                 "frames": frames}
  return res


def table(res: dict) -> str:
  keys = ["mean", "std", "p5", "p50", "p95", "fwhm_axial", "fwhm_lateral", "gcnr"]
  lines = ["| statistic (median over images) | real | phantom | phantom / real |", "|---|---|---|---|"]
  for k in keys:
    r, p = res["real"]["median"][k], res["phantom"]["median"][k]
    ratio = p / r if r else math.nan
    lines.append(f"| {k} | {r:.2f} | {p:.2f} | {ratio:.2f}{' **(> 2×)**' if not 0.5 <= ratio <= 2 else ''} |")
  return "\n".join(lines)


def figure(res: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  real = res["real"]["frames"]
  sim = res["phantom"]["frames"]
  picks = [real[0], real[-3], real[-1]] + [sim[k] for k in (0, 2, 3)]
  fig, axes = plt.subplots(2, 4, figsize=(13, 6.5), gridspec_kw={"width_ratios": [1, 1, 1, 1.2]})
  for ax, (name, img, _) in zip(axes[:, :3].T.ravel()[[0, 2, 4, 1, 3, 5]], picks):
    ax.imshow(img, cmap="gray", vmin=0, vmax=255)
    ax.set_title(name.replace(".dcm", ""), fontsize=7)
    ax.axis("off")
  for row, kind in enumerate(("real", "phantom")):
    h = np.concatenate([img[valid] for _, img, valid in res[kind]["frames"]])
    for r2, kind2 in enumerate(("real", "phantom")):
      h2 = np.concatenate([img[valid] for _, img, valid in res[kind2]["frames"]])
      axes[row, 3].hist(h2, bins=64, range=(0, 255), density=True, histtype="step", label=kind2)
    axes[row, 3].set_title(f"grey levels (field of view), {len(h)} {kind} px", fontsize=8)
    axes[row, 3].legend(fontsize=7)
  fig.suptitle("real B-mode frames (top, pydicom-data) vs us_phantom (bottom), "
               f"{res.get('mm', 0.4)} mm per pixel", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  from PIL import Image

  with Image.open(path) as im:  # 64 colours: a third of the bytes, no visible change
    im.convert("RGB").quantize(64).save(path, optimize=True)


PROG = "python -m mae_jax.data.phantom_compare"
FLAGS = flags.FlagValues()  # this tool's own (tool_flags)
_N = flags.DEFINE_integer("n", 24, "Phantom images.", flag_values=FLAGS)
_MM = flags.DEFINE_float("mm", 0.4, "Matched pixel size (mm).", flag_values=FLAGS)
_FIGURE = flags.DEFINE_string("figure", "", "PNG path for the side-by-side figure.", flag_values=FLAGS)
_GAIN = flags.DEFINE_float("display_gain_db", us_phantom.DISPLAY["display_gain_db"],
                           "phantom.simulate display_gain_db (default: the built-in dataset's; 0 = raw).",
                           flag_values=FLAGS)
_SMOOTHING = flags.DEFINE_float("display_smoothing", us_phantom.DISPLAY["display_smoothing"],
                                "phantom.simulate display_smoothing (default: the built-in dataset's; 0 = raw).",
                                flag_values=FLAGS)


def main(argv: list[str]) -> None:
  """The command line in-process: `argv` are the flags (no program name)."""
  tool_flags.parse(FLAGS, argv, PROG)
  _compare()


def _compare() -> None:
  res = compare(_N.value, _MM.value, display_gain_db=_GAIN.value, display_smoothing=_SMOOTHING.value)
  res["mm"] = _MM.value
  print(f"{len(res['real']['frames'])} real views, {len(res['phantom']['frames'])} phantom images, "
        f"{_MM.value} mm per pixel")
  print(table(res))
  if _FIGURE.value:
    figure(res, _FIGURE.value)
    print("figure:", _FIGURE.value)


if __name__ == "__main__":
  tool_flags.run(FLAGS, _compare)
