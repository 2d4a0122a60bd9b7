"""The phantom's (mae_jax.data.phantom) organs, classes and physical constants, and its probe
geometry: probes, beam grids, scan conversion."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

ORGANS: tuple[str, ...] = ("thyroid", "breast", "liver", "kidney", "fetal_head")
# Deliberately unequal, so that organ-balanced sampling (docs/methods.md#usfm) has something to balance.
ORGAN_WEIGHTS: tuple[float, ...] = (0.40, 0.25, 0.18, 0.12, 0.05)
CLASSES: tuple[str, ...] = ("normal", "benign", "malignant")
CLASS_WEIGHTS: tuple[float, ...] = (0.4, 0.3, 0.3)

# Which probe a sonographer would use for each organ.
PROBE_FOR_ORGAN: dict[str, str] = {
  "thyroid": "linear",
  "breast": "linear",
  "liver": "convex",
  "kidney": "convex",
  "fetal_head": "convex",
}

SOUND_SPEED = 0.154  # cm / µs (1540 m/s, the scanner's assumed speed of sound)
DB_PER_NEPER = 20.0 / math.log(10.0)  # 8.686
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.355
# Scanners low-pass the envelope before decimating it to display pixels; without this floor a
# sub-pixel PSF would alias. It keeps every PSF at least ~1.2 px wide at half maximum.
_ANTI_ALIAS_SIGMA_PX = 0.6
_F32 = np.float32

# --------------------------------------------------------------------------------------------
# Probe and grids.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Probe:
  """Acquisition parameters (lengths in cm, frequencies in MHz, angles in radians)."""

  geometry: str  # "linear" or "convex"
  depth: float  # imaged depth along each beam
  width: float = 0.0  # linear: aperture width (field of view)
  radius: float = 0.0  # convex: radius of curvature of the array
  sector: float = 0.0  # convex: opening angle of the fan
  f0: float = 5.0  # centre frequency
  bandwidth: float = 0.7  # fractional -6 dB bandwidth of the pulse-echo spectrum
  focus: float = 2.0  # transmit focal depth
  f_number: float = 2.0  # focal depth / aperture at the focus
  rayleigh: float = 2.0  # depth distance over which the beam widens by sqrt(2)

  def axial_sigma(self) -> float:
    """Std (cm) of the Gaussian pulse-echo envelope along depth.

    A Gaussian spectrum with -6 dB full width B*f0 has std B*f0/2.355 in frequency, hence
    1/(2*pi*that) in time, and depth is c*t/2 because the echo travels both ways."""
    sigma_freq = self.bandwidth * self.f0 / _FWHM_PER_SIGMA
    return SOUND_SPEED / (2.0 * math.pi * sigma_freq) / 2.0

  def lateral_sigma(self, depth: np.ndarray) -> np.ndarray:
    """Std (cm) of the two-way beam across the scan line at each depth.

    At the focus the pulse-echo FWHM is about lambda * F#; away from it the Gaussian beam
    widens as sqrt(1 + ((z - z_f) / z_R)^2). z_R is longer than a single fixed-focus beam's
    because dynamic receive focusing keeps the receive beam narrow at every depth."""
    wavelength = SOUND_SPEED / self.f0
    sigma_focus = wavelength * self.f_number / _FWHM_PER_SIGMA
    return sigma_focus * np.sqrt(1.0 + ((depth - self.focus) / self.rayleigh) ** 2)


def sample_probe(rng: np.random.Generator, geometry: str, depth_range=None) -> Probe:
  """A plausible probe setting; linear = high frequency and shallow, convex = low and deep."""
  if geometry == "linear":
    width = float(rng.uniform(4.0, 5.0))
    depth = width  # square field of view: square pixels on an S x S image
    f0 = float(rng.uniform(7.0, 11.0))
    extra = dict(width=width)
  elif geometry == "convex":
    lo, hi = depth_range or (12.0, 16.0)
    depth = float(rng.uniform(lo, hi))
    f0 = float(rng.uniform(2.5, 4.5))
    extra = dict(radius=float(rng.uniform(4.0, 6.0)), sector=math.radians(rng.uniform(55, 70)))
  else:
    raise ValueError(f"geometry must be 'linear' or 'convex', got {geometry!r}")
  return Probe(
    geometry=geometry,
    depth=depth,
    f0=f0,
    bandwidth=float(rng.uniform(0.6, 0.8)),
    focus=float(rng.uniform(0.35, 0.6)) * depth,
    f_number=float(rng.uniform(2.0, 3.0)),
    rayleigh=float(rng.uniform(0.3, 0.45)) * depth,
    **extra,
  )


class Coords(NamedTuple):
  """Physical positions of grid samples: lateral x, Cartesian depth d below the probe centre,
  and path depth p along the beam from the probe face (p == d for a linear probe)."""

  x: np.ndarray
  d: np.ndarray
  p: np.ndarray


def beam_coords(probe: Probe, n_rows: int, n_lines: int) -> Coords:
  """Sample positions of the beam grid (rows = depth samples, columns = scan lines)."""
  p = ((np.arange(n_rows, dtype=_F32) + 0.5) * (probe.depth / n_rows))[:, None]
  if probe.geometry == "linear":
    x = ((np.arange(n_lines, dtype=_F32) + 0.5) * (probe.width / n_lines) - probe.width / 2)[
      None, :
    ]
    x, p = np.broadcast_arrays(x, p)
    return Coords(x, p, p)
  theta = ((np.arange(n_lines, dtype=_F32) + 0.5) * (probe.sector / n_lines) - probe.sector / 2)[
    None, :
  ]
  rho = probe.radius + p
  x = rho * np.sin(theta)
  d = rho * np.cos(theta) - probe.radius  # the virtual apex sits `radius` above the probe centre
  return Coords(x, d, np.broadcast_to(p, x.shape))


def display_pixel_size(probe: Probe, size: int) -> float:
  """Side (cm) of a square display pixel."""
  if probe.geometry == "linear":
    return probe.width / size
  half = probe.sector / 2
  r1 = probe.radius + probe.depth
  # The square image holds the fan's bounding box; the fan hangs from the top edge.
  return max(2 * r1 * math.sin(half), r1 - probe.radius * math.cos(half)) / size


def _fan_display(probe: Probe, size: int):
  """Display-grid coords of a convex image, the fan mask and fractional beam-grid indices."""
  half = probe.sector / 2
  r0, r1 = probe.radius, probe.radius + probe.depth
  y_top = r0 * math.cos(half)
  pix = display_pixel_size(probe, size)
  side = pix * size
  xs = ((np.arange(size, dtype=_F32) + 0.5) * pix - side / 2)[None, :]
  ys = ((np.arange(size, dtype=_F32) + 0.5) * pix + y_top)[:, None]
  rho = np.sqrt(xs**2 + ys**2)
  theta = np.arctan2(xs, ys)
  fan = (rho >= r0) & (rho <= r1) & (np.abs(theta) <= half)
  row = (rho - r0) * (size / probe.depth) - 0.5
  col = (theta + half) * (size / probe.sector) - 0.5
  x, y = np.broadcast_arrays(xs, ys)
  coords = Coords(x, y - r0, rho - r0)
  return coords, fan, row, col


def _bilinear(img: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
  """Bilinear interpolation of ``img`` at fractional (row, col); 1-D inputs, float32 out."""
  n_rows, n_cols = img.shape
  row = np.clip(row, 0, n_rows - 1.001)
  col = np.clip(col, 0, n_cols - 1.001)
  r0 = row.astype(np.int32)
  c0 = col.astype(np.int32)
  fr = row - r0.astype(_F32)
  fc = col - c0.astype(_F32)
  flat = img.ravel()
  i00 = r0 * n_cols + c0
  top = flat[i00] + (flat[i00 + 1] - flat[i00]) * fc
  bottom = flat[i00 + n_cols] + (flat[i00 + n_cols + 1] - flat[i00 + n_cols]) * fc
  return top + (bottom - top) * fr


def scan_convert(
  beam_image: np.ndarray, probe: Probe, size: int, display=None
) -> tuple[np.ndarray, np.ndarray]:
  """Convex beam-grid image -> (size, size) display image (0 outside the fan) and fan mask.

  ``display``: the output of ``_fan_display(probe, size)`` when the caller already has it."""
  _, fan, row, col = display if display is not None else _fan_display(probe, size)
  inside = np.flatnonzero(fan)
  out = np.zeros(size * size, _F32)
  out[inside] = _bilinear(beam_image, row.ravel()[inside], col.ravel()[inside])
  return out.reshape(size, size), fan

