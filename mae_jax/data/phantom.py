"""Simulated B-mode ultrasound phantom: anatomy templates -> pulse-echo physics -> 8-bit image.

The pipeline for one image (see docs/phantom.md for the physics and defaults):

1. ``example_meta`` fixes the organ and the class of the image (deterministic, stratified).
2. A probe is drawn (linear for superficial organs, convex for abdominal / obstetric ones) and
   the organ template is drawn as a list of tissue layers in physical units (cm). Each tissue has
   an echogenicity (mean backscattered intensity) and an attenuation coefficient (dB/cm/MHz).
3. The layers are painted on the *beam grid*: one row per depth sample, one column per scan line.
   For a linear probe that is the display grid; for a convex probe it is (radius, angle).
4. ``pulse_echo`` turns echogenicity into a speckle envelope: complex Gaussian scatterers scaled
   by sqrt(echogenicity), round-trip attenuation, convolution with the complex-baseband
   pulse-echo PSF (Gaussian pulse envelope axially, Gaussian beam laterally whose width grows away
   from the focus), receiver noise, envelope detection and time-gain compensation.
5. Log compression to 8 bits over a per-image dynamic range in [50, 60] dB, then scan conversion
   to a fan for convex probes.

Only numpy and scipy are used, and everything is float32, so an image of 256 x 256 costs a few
milliseconds on one core. Randomness comes from ``np.random.default_rng([seed, index])`` only, so
an example does not depend on which examples were simulated before it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

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
# Organ and class of an example: deterministic stratified assignment.
# --------------------------------------------------------------------------------------------

_PERIOD = 1000  # weights are realised exactly over every 1000 consecutive indices


def _quotas(weights: tuple[float, ...], total: int) -> np.ndarray:
  """Integer counts summing to ``total`` proportional to ``weights`` (largest remainder)."""
  w = np.asarray(weights, np.float64)
  w = w / w.sum()
  raw = w * total
  counts = np.floor(raw).astype(np.int64)
  short = total - counts.sum()
  counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
  return counts


@functools.lru_cache(maxsize=None)
def _smooth_sequence(weights: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One period of a smooth weighted round robin over categories.

  Every prefix of the sequence holds each category within about one item of its exact share,
  so any contiguous index range (a split) has the intended proportions up to rounding.
  Returns (category per slot, occurrences of that category before the slot, counts per period).
  """
  counts = _quotas(weights, _PERIOD)
  credit = np.zeros(len(counts), np.int64)
  seq = np.empty(_PERIOD, np.int64)
  rank = np.empty(_PERIOD, np.int64)
  seen = np.zeros(len(counts), np.int64)
  for t in range(_PERIOD):
    credit += counts
    k = int(np.argmax(credit))
    credit[k] -= _PERIOD
    seq[t], rank[t] = k, seen[k]
    seen[k] += 1
  return seq, rank, counts


@functools.lru_cache(maxsize=64)
def _meta_offsets(seed: int) -> tuple[int, tuple[int, ...]]:
  # The seed only rotates the sequences, so proportions hold for every seed.
  rng = np.random.default_rng([seed])
  organ_offset = int(rng.integers(_PERIOD))
  class_offsets = tuple(int(v) for v in rng.integers(_PERIOD, size=len(ORGANS)))
  return organ_offset, class_offsets


def example_meta(seed: int, index: int) -> tuple[int, int]:
  """(organ_id, class_id) of example ``index``; exact proportions over any 1000 consecutive
  indices, within a few items of them over any contiguous range, and classes are stratified
  within each organ."""
  if index < 0:
    raise ValueError(f"index must be >= 0, got {index}")
  organ_seq, organ_rank, organ_counts = _smooth_sequence(ORGAN_WEIGHTS)
  class_seq, _, _ = _smooth_sequence(CLASS_WEIGHTS)
  organ_offset, class_offsets = _meta_offsets(seed)
  cycle, slot = divmod(index + organ_offset, _PERIOD)
  organ = int(organ_seq[slot])
  # The j-th example of this organ takes the j-th class of that organ's own class sequence.
  j = cycle * int(organ_counts[organ]) + int(organ_rank[slot])
  label = int(class_seq[(j + class_offsets[organ]) % _PERIOD])
  return organ, label


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


# --------------------------------------------------------------------------------------------
# Anatomy: tissues painted in order (later layers cover earlier ones).
# --------------------------------------------------------------------------------------------

Shape = Callable[[Coords], np.ndarray]


class Layer(NamedTuple):
  name: str
  shape: Shape | None  # None = everywhere (the background)
  echo: float  # mean backscattered intensity relative to a reference soft tissue
  alpha: float  # attenuation, dB / cm / MHz


# Representative values (intensity relative to liver; attenuation from textbook tables). Each
# template jitters them per image. Fluids barely scatter or attenuate; bone and air do both a lot.
ANECHOIC = 1e-5  # blood, amniotic fluid, cysts: about -50 dB re soft tissue


def _rotated(c: Coords, cx: float, cd: float, angle: float):
  cos, sin = math.cos(angle), math.sin(angle)
  dx, dd = c.x - cx, c.d - cd
  return dx * cos + dd * sin, dd * cos - dx * sin


def ellipse(cx: float, cd: float, a: float, b: float, angle: float = 0.0) -> Shape:
  """Semi-axis a along the (rotated) lateral direction, b along depth."""

  def shape(c: Coords) -> np.ndarray:
    u, v = _rotated(c, cx, cd, angle)
    return (u * u) * (1.0 / (a * a)) + (v * v) * (1.0 / (b * b)) <= 1.0

  return shape


def band(top: Callable, bottom: Callable) -> Shape:
  """Tissue between two boundaries given as functions of x, in path depth: superficial layers
  follow the probe face (a pressed convex probe curves them)."""
  return lambda c: (c.p >= top(c.x)) & (c.p < bottom(c.x))


def wavy(rng: np.random.Generator, base: float, amp: float, period=(2.0, 6.0)) -> Callable:
  """A boundary at depth ``base`` undulating by ``amp`` (cm)."""
  k = 2 * math.pi / rng.uniform(*period)
  phase = rng.uniform(0, 2 * math.pi)
  return lambda x: base + amp * np.sin(k * x + phase)


def _body_wall(rng, spec) -> tuple[list[Layer], float]:
  """Superficial layers stacked from the probe face; spec: [(name, (tmin, tmax), echo, alpha)]."""
  layers, top, depth = [], (lambda x: -1.0), 0.0
  for name, (tmin, tmax), echo, alpha in spec:
    depth += rng.uniform(tmin, tmax)
    bottom = wavy(rng, depth, 0.15 * (tmax - tmin))
    layers.append(Layer(name, band(top, bottom), echo, alpha))
    top = bottom
  return layers, depth


def _jitter(rng, value: float, rel: float = 0.15) -> float:
  return float(value * rng.uniform(1 - rel, 1 + rel))


class Anatomy(NamedTuple):
  layers: list[Layer]
  host: tuple[float, float, float]  # lesion centre (x, d) and typical radius (cm)
  host_echo: float
  host_alpha: float
  parenchyma: str  # name of the organ's main homogeneous tissue
  tgc_alpha: float  # attenuation (dB/cm/MHz) the sonographer's TGC curve compensates


def _thyroid(rng, probe: Probe) -> Anatomy:
  """Transverse neck: skin, fat, strap muscles, two lobes joined by the isthmus over the
  trachea (air: bright anterior wall, total shadow below), carotid arteries laterally."""
  thy_echo, thy_alpha = _jitter(rng, 1.5), 0.7
  wall, depth = _body_wall(
    rng,
    [
      ("skin", (0.12, 0.2), _jitter(rng, 3.0), 0.8),
      ("fat", (0.15, 0.35), _jitter(rng, 0.4), 0.6),
      ("muscle", (0.25, 0.4), _jitter(rng, 0.4), 1.0),
    ],
  )
  tx = rng.uniform(-0.25, 0.25)
  rt = rng.uniform(0.75, 0.95)
  dt = depth + rng.uniform(0.3, 0.45)  # anterior tracheal wall, under the isthmus
  layers = [Layer("deep", None, _jitter(rng, 0.6), 0.8), *wall]
  lobes = []
  for side in (-1, 1):
    a, b = rng.uniform(0.65, 0.9), rng.uniform(0.7, 0.95)
    cx = tx + side * (rt + rng.uniform(0.35, 0.55))
    cd = dt + rng.uniform(0.6, 0.9)
    lobes.append((cx, cd, a, b))
    # Longus colli behind the lobe, carotid and jugular lateral to it.
    layers.append(
      Layer("muscle", ellipse(cx - side * 0.2, cd + b + 0.35, 0.7, 0.3), _jitter(rng, 0.45), 1.0)
    )
    layers.append(
      Layer("thyroid", ellipse(cx, cd, a, b, side * rng.uniform(0, 0.25)), thy_echo, thy_alpha)
    )
    rc = rng.uniform(0.28, 0.38)
    ccx, ccd = cx + side * (a + rc + rng.uniform(0.05, 0.2)), cd + rng.uniform(0.0, 0.3)
    layers.append(
      Layer("vessel_wall", ellipse(ccx, ccd, rc + 0.05, rc + 0.05), _jitter(rng, 3.0), 0.8)
    )
    layers.append(Layer("vessel", ellipse(ccx, ccd, rc, rc), ANECHOIC, 0.15))
    layers.append(
      Layer("vessel", ellipse(ccx + side * 0.3, ccd - rc - 0.05, 0.35, 0.15), ANECHOIC, 0.15)
    )
  layers.append(
    Layer("thyroid", ellipse(tx, dt - 0.12, rt + 0.6, rng.uniform(0.14, 0.2)), thy_echo, thy_alpha)
  )
  # Cartilage ring: a strong specular reflector; the air inside reflects and absorbs everything.
  layers.append(
    Layer("trachea_wall", ellipse(tx, dt + rt, rt + 0.08, rt + 0.08), _jitter(rng, 25.0), 3.0)
  )
  layers.append(Layer("trachea", ellipse(tx, dt + rt, rt, rt), 1e-6, 60.0))
  cx, cd, a, b = lobes[rng.integers(2)]
  host = (
    cx + rng.uniform(-0.3, 0.3) * a,
    cd + rng.uniform(-0.2, 0.2) * b,
    rng.uniform(0.3, 0.55),
  )
  return Anatomy(layers, host, thy_echo, thy_alpha, "thyroid", 0.75)


def _breast(rng, probe: Probe) -> Anatomy:
  """Skin, subcutaneous fat crossed by Cooper's ligaments, fibroglandular layer with fat
  lobules, retromammary fat, striated pectoralis muscle, chest wall (maybe a shadowing rib)."""
  gland_echo, gland_alpha = _jitter(rng, 1.5), 0.8
  fat_echo = _jitter(rng, 0.35)
  half = probe.width / 2
  t_skin = rng.uniform(0.15, 0.22)
  t_fat = wavy(rng, t_skin + rng.uniform(0.4, 0.9), rng.uniform(0.05, 0.2))
  gland_thick = rng.uniform(1.2, 1.8)
  t_gland = wavy(rng, t_fat(0.0) + gland_thick, rng.uniform(0.1, 0.3))
  retro = rng.uniform(0.2, 0.4)
  t_retro = lambda x: t_gland(x) + retro  # noqa: E731
  muscle_thick = rng.uniform(0.6, 0.9)
  t_muscle = lambda x: t_retro(x) + muscle_thick  # noqa: E731
  layers = [
    Layer("chest_wall", None, _jitter(rng, 0.5), 0.9),
    Layer("skin", band(lambda x: -1.0, lambda x: t_skin), _jitter(rng, 3.0), 0.8),
    Layer("fat", band(lambda x: t_skin, t_fat), fat_echo, 0.6),
    Layer("gland", band(t_fat, t_gland), gland_echo, gland_alpha),
    Layer("fat", band(t_gland, t_retro), fat_echo, 0.6),
    Layer("muscle", band(t_retro, t_muscle), _jitter(rng, 0.45), 1.0),
  ]
  base_muscle = t_retro(0.0)
  for _ in range(rng.integers(3, 6)):  # fibro-fatty striations of the pectoralis
    z = base_muscle + rng.uniform(0.1, muscle_thick - 0.05)
    layers.append(
      Layer(
        "muscle_fibre",
        ellipse(rng.uniform(-half, half), z, half * 1.5, 0.02, rng.uniform(-0.08, 0.08)),
        1.2,
        1.0,
      )
    )
  for _ in range(rng.integers(3, 7)):  # Cooper's ligaments: thin bright oblique bands in the fat
    layers.append(
      Layer(
        "ligament",
        ellipse(
          rng.uniform(-half, half),
          t_skin + rng.uniform(0.2, 0.6),
          rng.uniform(0.4, 1.0),
          0.025,
          rng.uniform(-0.6, 0.6),
        ),
        2.5,
        0.8,
      )
    )
  for _ in range(rng.integers(2, 6)):  # fat lobules inside the glandular layer
    z = t_fat(0.0) + rng.uniform(0.3, gland_thick - 0.2)
    layers.append(
      Layer(
        "fat",
        ellipse(rng.uniform(-half, half), z, rng.uniform(0.2, 0.45), rng.uniform(0.12, 0.25)),
        fat_echo,
        0.6,
      )
    )
  if rng.random() < 0.5:  # a rib: bright cortex, then the bone absorbs (acoustic shadow)
    z = t_muscle(0.0) + rng.uniform(0.3, 0.6)
    x = rng.uniform(-half, half)
    layers.append(Layer("rib", ellipse(x, z + 0.5, 0.9, 0.5), _jitter(rng, 20.0), 20.0))
  host_d = t_fat(0.0) + gland_thick * rng.uniform(0.4, 0.6)
  host = (rng.uniform(-0.3, 0.3) * half, host_d, rng.uniform(0.35, 0.7))
  return Anatomy(layers, host, gland_echo, gland_alpha, "gland", 0.75)


def _abdominal_wall(rng) -> tuple[list[Layer], float]:
  return _body_wall(
    rng,
    [
      ("skin", (0.2, 0.3), _jitter(rng, 3.0), 0.8),
      ("fat", (0.8, 1.8), _jitter(rng, 0.4), 0.6),
      ("muscle", (0.6, 1.0), _jitter(rng, 0.45), 1.0),
      ("peritoneum", (0.08, 0.12), _jitter(rng, 4.0), 0.8),
    ],
  )


def _liver(rng, probe: Probe) -> Anatomy:
  """Abdominal wall over homogeneous liver parenchyma with anechoic vessel cross-sections
  (portal veins with bright walls), bounded deep by the bright curved diaphragm."""
  liv_echo, liv_alpha = _jitter(rng, 1.0, 0.1), 0.5
  wall, depth = _abdominal_wall(rng)
  layers = [Layer("lung", None, _jitter(rng, 0.8), 0.5)]  # mirror image of the liver
  # Diaphragm: a big circle whose deep arc crosses the image; liver inside it.
  dz = rng.uniform(0.65, 0.85) * probe.depth
  dcx, drad = rng.uniform(-3, 3), rng.uniform(9, 14)
  dcd = dz - drad
  layers.append(
    Layer("diaphragm", ellipse(dcx, dcd, drad + 0.2, drad + 0.2), _jitter(rng, 8.0), 1.0)
  )
  layers.append(Layer("liver", ellipse(dcx, dcd, drad, drad), liv_echo, liv_alpha))
  layers.extend(wall)
  half_angle = probe.sector / 2
  for _ in range(rng.integers(4, 9)):
    z = rng.uniform(depth + 1.5, dz - 1.0)
    x = math.tan(half_angle) * (z + probe.radius) * rng.uniform(-0.8, 0.8)
    r = rng.uniform(0.2, 0.6)
    a, ang = r * rng.uniform(1.0, 3.0), rng.uniform(0, math.pi)
    if rng.random() < 0.5:  # portal vein: echogenic fibrous wall
      layers.append(
        Layer("vessel_wall", ellipse(x, z, a + 0.12, r + 0.12, ang), _jitter(rng, 4.0), 0.8)
      )
    layers.append(Layer("vessel", ellipse(x, z, a, r, ang), ANECHOIC, 0.15))
  zh = rng.uniform(depth + 2.0, dz - 2.5)
  host = (
    math.tan(half_angle) * (zh + probe.radius) * rng.uniform(-0.4, 0.4),
    zh,
    rng.uniform(0.8, 1.8),
  )
  return Anatomy(layers, host, liv_echo, liv_alpha, "liver", liv_alpha)


def _kidney(rng, probe: Probe) -> Anatomy:
  """Long-axis kidney seen through the liver: echogenic perirenal fat, bright capsule,
  hypoechoic cortex, darker medullary pyramids and a bright central sinus."""
  cortex_echo, cortex_alpha = _jitter(rng, 0.6), 0.8
  wall, depth = _abdominal_wall(rng)
  cx, cd = rng.uniform(-1.5, 1.5), rng.uniform(0.45, 0.6) * probe.depth
  a, b, ang = rng.uniform(4.0, 5.0), rng.uniform(1.8, 2.3), rng.uniform(-0.35, 0.35)
  layers = [
    Layer("muscle", None, _jitter(rng, 0.45), 1.0),
    Layer(
      "liver",
      band(lambda x: -1.0, wavy(rng, cd - b - rng.uniform(0.5, 1.5), 0.4)),
      _jitter(rng, 1.0, 0.1),
      0.5,
    ),
    *wall,
    Layer("perirenal_fat", ellipse(cx, cd, a + 0.5, b + 0.5, ang), _jitter(rng, 1.6), 0.6),
    Layer("capsule", ellipse(cx, cd, a + 0.08, b + 0.08, ang), _jitter(rng, 3.0), 0.8),
    Layer("cortex", ellipse(cx, cd, a, b, ang), cortex_echo, cortex_alpha),
  ]
  n_pyr = rng.integers(6, 9)
  pyr_echo = _jitter(rng, 0.15)
  cos, sin = math.cos(ang), math.sin(ang)
  for t in np.linspace(0, 2 * math.pi, n_pyr, endpoint=False) + rng.uniform(0, 1):
    u, v = 0.62 * a * math.cos(t), 0.6 * b * math.sin(t)
    px, pd = cx + u * cos - v * sin, cd + u * sin + v * cos
    layers.append(
      Layer(
        "pyramid",
        ellipse(px, pd, rng.uniform(0.4, 0.55), rng.uniform(0.3, 0.4), ang + t + math.pi / 2),
        pyr_echo,
        cortex_alpha,
      )
    )
  layers.append(
    Layer(
      "sinus",
      ellipse(cx, cd, a * rng.uniform(0.45, 0.55), b * rng.uniform(0.3, 0.4), ang),
      _jitter(rng, 3.5),
      0.9,
    )
  )
  if rng.random() < 0.3:  # mildly distended renal pelvis
    layers.append(Layer("pelvis", ellipse(cx, cd, a * 0.2, b * 0.12, ang), ANECHOIC, 0.01))
  t = rng.uniform(0, 2 * math.pi)
  u, v = 0.8 * a * math.cos(t), 0.78 * b * math.sin(t)
  host = (cx + u * cos - v * sin, cd + u * sin + v * cos, rng.uniform(0.7, 1.2))
  return Anatomy(layers, host, cortex_echo, cortex_alpha, "cortex", 0.6)


def _fetal_head(rng, probe: Probe) -> Anatomy:
  """Obstetric view: uterine wall, anechoic amniotic fluid, an elliptical fetal head with a
  bright (partly shadowing) skull ring, midline falx, cavum septi pellucidi and thalami."""
  brain_echo, brain_alpha = _jitter(rng, 0.6), 0.6
  wall, depth = _body_wall(
    rng,
    [
      ("skin", (0.2, 0.3), _jitter(rng, 3.0), 0.8),
      ("fat", (0.5, 1.2), _jitter(rng, 0.4), 0.6),
      ("myometrium", (0.8, 1.5), _jitter(rng, 0.8), 0.7),
    ],
  )
  cx, cd = rng.uniform(-1.5, 1.5), depth + rng.uniform(4.0, 5.0)
  a = rng.uniform(3.6, 4.4)
  b, ang = a * rng.uniform(0.75, 0.85), rng.uniform(-0.5, 0.5)
  t_skull = rng.uniform(0.25, 0.35)
  placenta_top = wavy(rng, cd + b + rng.uniform(1.0, 2.0), 0.4)
  layers = [
    Layer("fluid", None, ANECHOIC, 0.01),
    Layer("placenta", band(placenta_top, lambda x: 1e3), _jitter(rng, 1.2), 0.7),
    *wall,
    Layer("scalp", ellipse(cx, cd, a + 0.25, b + 0.25, ang), _jitter(rng, 0.9), 0.7),
    Layer("skull", ellipse(cx, cd, a, b, ang), _jitter(rng, 30.0, 0.3), 2.0),
    Layer("brain", ellipse(cx, cd, a - t_skull, b - t_skull, ang), brain_echo, brain_alpha),
  ]
  cos, sin = math.cos(ang), math.sin(ang)

  def at(u, v):  # head frame -> image frame
    return cx + u * cos - v * sin, cd + u * sin + v * cos

  for side in (-1, 1):
    layers.append(
      Layer(
        "thalamus",
        ellipse(*at(0.1 * a, side * 0.35), 0.6, 0.35, ang),
        _jitter(rng, 0.2),
        brain_alpha,
      )
    )
  layers.append(
    Layer("falx", ellipse(cx, cd, 0.85 * (a - t_skull), 0.04, ang), _jitter(rng, 3.0), 0.8)
  )
  layers.append(Layer("cavum", ellipse(*at(-0.45 * a, 0.0), 0.45, 0.18, ang), ANECHOIC, 0.01))
  u, v = (
    rng.uniform(0.1, 0.5) * a * rng.choice([-1, 1]),
    rng.uniform(0.35, 0.55) * b * rng.choice([-1, 1]),
  )
  host = (*at(u, v), rng.uniform(0.7, 1.1))
  return Anatomy(layers, host, brain_echo, brain_alpha, "brain", 0.4)


_TEMPLATES = {
  "thyroid": _thyroid,
  "breast": _breast,
  "liver": _liver,
  "kidney": _kidney,
  "fetal_head": _fetal_head,
}


# --------------------------------------------------------------------------------------------
# Lesions.
# --------------------------------------------------------------------------------------------


class Lesion(NamedTuple):
  layer: Layer | None
  calcifications: list[tuple[float, float, float]]  # (x, d, brightness dB over host tissue)


def _benign_shape(rng, cx, cd, r0) -> Shape:
  """Oval, circumscribed, wider than tall, parallel to the skin."""
  a = r0 * rng.uniform(1.0, 1.2)
  return ellipse(cx, cd, a, a * rng.uniform(0.5, 0.72), rng.uniform(-0.17, 0.17))


def _malignant_shape(rng, cx, cd, r0) -> Shape:
  """Taller than wide, with a lobulated, spiculated margin: the boundary radius (in units of a
  tall base ellipse) is 1 + low-order lobulation + narrow triangular spicules."""
  a, b = r0 * rng.uniform(0.6, 0.75), r0 * rng.uniform(1.0, 1.25)
  angle = rng.uniform(-0.17, 0.17)
  orders = np.arange(3, 8)
  lob_amp = rng.uniform(0.0, 0.06, size=orders.size)
  lob_phase = rng.uniform(0, 2 * np.pi, size=orders.size)
  n_spic = rng.integers(6, 12)
  spic_at = rng.uniform(-np.pi, np.pi, size=n_spic)
  spic_len = rng.uniform(0.3, 0.7, size=n_spic)
  spic_width = rng.uniform(0.05, 0.12, size=n_spic)
  reach = 1.0 + lob_amp.sum() + spic_len.max()

  def shape(c: Coords) -> np.ndarray:
    u, v = _rotated(c, cx, cd, angle)
    u, v = u * (1.0 / a), v * (1.0 / b)
    r2 = u * u + v * v
    out = r2 <= reach * reach  # only points that can be inside need the angle
    idx = np.flatnonzero(out)
    uu, vv = u.ravel()[idx], v.ravel()[idx]
    theta = np.arctan2(vv, uu)
    boundary = np.ones_like(theta)
    for k, amp, ph in zip(orders, lob_amp, lob_phase, strict=True):
      boundary += amp * np.cos(k * theta + ph)
    for at, length, width in zip(spic_at, spic_len, spic_width, strict=True):
      gap = np.abs((theta - at + np.pi) % (2 * np.pi) - np.pi)  # angular distance
      boundary += length * np.clip(1.0 - gap / width, 0.0, None)
    res = np.zeros(out.size, bool)
    res[idx] = np.sqrt(uu * uu + vv * vv) <= boundary
    return res.reshape(out.shape)

  return shape


def _lesion(rng, anatomy: Anatomy, label: int) -> Lesion:
  if CLASSES[label] == "normal":
    return Lesion(None, [])
  cx, cd, r0 = anatomy.host
  if CLASSES[label] == "benign":
    # Homogeneous, hypoechoic, and attenuating less than the host: posterior enhancement.
    layer = Layer(
      "lesion",
      _benign_shape(rng, cx, cd, r0),
      anatomy.host_echo * rng.uniform(0.08, 0.25),
      anatomy.host_alpha * rng.uniform(0.3, 0.6),
    )
    return Lesion(layer, [])
  # Markedly hypoechoic and strongly attenuating (posterior shadowing), with microcalcifications.
  layer = Layer(
    "lesion",
    _malignant_shape(rng, cx, cd, r0),
    anatomy.host_echo * rng.uniform(0.03, 0.08),
    rng.uniform(1.3, 2.0),
  )
  n = rng.integers(4, 13)
  rr = 0.55 * r0 * np.sqrt(rng.uniform(0, 1, n))
  tt = rng.uniform(0, 2 * np.pi, n)
  calcs = [
    (cx + 0.65 * r * math.cos(t), cd + r * math.sin(t), rng.uniform(18.0, 26.0))
    for r, t in zip(rr, tt, strict=True)
  ]
  return Lesion(layer, calcs)


def render(layers: list[Layer], coords: Coords):
  """Echogenicity, attenuation (dB/cm/MHz) and an integer tissue label per sample."""
  echo = np.empty(coords.x.shape, _F32)
  alpha = np.empty(coords.x.shape, _F32)
  label = np.zeros(coords.x.shape, np.int16)
  for k, layer in enumerate(layers):
    if layer.shape is None:
      echo.fill(layer.echo)
      alpha.fill(layer.alpha)
      label.fill(k)
      continue
    m = layer.shape(coords)
    echo[m] = layer.echo
    alpha[m] = layer.alpha
    label[m] = k
  return echo, alpha, label


# --------------------------------------------------------------------------------------------
# Pulse-echo physics on the beam grid.
# --------------------------------------------------------------------------------------------


def psf_sigmas(probe: Probe, n_rows: int, n_lines: int) -> tuple[float, np.ndarray]:
  """PSF std in beam-grid pixels: axial (one number) and lateral (one per depth row)."""
  dz = probe.depth / n_rows
  depth = (np.arange(n_rows) + 0.5) * dz
  sig_z = math.hypot(probe.axial_sigma() / dz, _ANTI_ALIAS_SIGMA_PX)
  if probe.geometry == "linear":
    line_pitch = probe.width / n_lines
  else:  # scan lines diverge: their spacing is arc length at that radius
    line_pitch = (probe.radius + depth) * probe.sector / n_lines
  sig_x = np.hypot(probe.lateral_sigma(depth) / line_pitch, _ANTI_ALIAS_SIGMA_PX)
  return sig_z, sig_x


def _unit_energy_gaussian(sigma: float) -> np.ndarray:
  half = max(1, int(math.ceil(4 * sigma)))
  t = np.arange(-half, half + 1)
  h = np.exp(-0.5 * (t / sigma) ** 2)
  return (h / np.sqrt(np.sum(h * h))).astype(_F32)


def _lateral_blend(
  spectrum: np.ndarray, sig_rows: np.ndarray, n_lines: int, pad: int
) -> np.ndarray:
  """Per-row lateral Gaussian filtering with a depth-varying width.

  Filtering with a few fixed widths and blending the two nearest per row costs a handful of
  FFTs instead of one convolution per row. Kernels have unit energy, and the blend is
  renormalised by its exact variance, so speckle power stays equal to echogenicity."""
  n_fft = spectrum.shape[1]
  freq = sfft.fftfreq(n_fft).astype(_F32)
  lo, hi = float(sig_rows.min()), float(sig_rows.max())
  n_widths = 1 if hi / lo < 1.02 else min(8, int(math.ceil(math.log(hi / lo) / math.log(1.35))) + 1)
  widths = np.geomspace(lo, hi, n_widths) if n_widths > 1 else np.array([lo])
  gains = np.exp(-2.0 * np.pi**2 * widths[:, None] ** 2 * freq[None, :] ** 2).astype(_F32)
  gains /= np.sqrt(np.mean(gains**2, axis=1, keepdims=True))  # Parseval: unit-energy kernels
  out = np.empty((spectrum.shape[0], n_lines), np.complex64)
  if n_widths == 1:
    out[:] = sfft.ifft(spectrum * gains[0], axis=1, workers=1)[:, pad : pad + n_lines]
    return out
  pos = np.log(sig_rows / lo) / np.log(hi / lo) * (n_widths - 1)
  band_of_row = np.minimum(pos.astype(np.int64), n_widths - 2)
  for k in range(n_widths - 1):
    rows = np.flatnonzero(band_of_row == k)
    if rows.size == 0:
      continue
    w = (pos[rows] - k).astype(_F32)[:, None]
    rho = float(np.mean(gains[k] * gains[k + 1]))  # correlation of the two filtered fields
    norm = np.sqrt((1 - w) ** 2 + w**2 + 2 * w * (1 - w) * rho)
    # Blending is linear, so blend the transfer functions: one inverse FFT per band.
    gain = ((1 - w) * gains[k] + w * gains[k + 1]) / norm
    out[rows] = sfft.ifft(spectrum[rows] * gain, axis=1, workers=1)[:, pad : pad + n_lines]
  return out


def pulse_echo(
  echo: np.ndarray,
  alpha_db: np.ndarray,
  probe: Probe,
  rng: np.random.Generator,
  *,
  tgc: float | None,
  points: list[tuple[int, int, float]] = (),
  noise_db: float | None = None,
) -> np.ndarray:
  """Speckle envelope on the beam grid (rows = depth, columns = scan lines).

  echo: mean scattered intensity per sample; alpha_db: attenuation (dB/cm/MHz); points: extra
  point reflectors (row, col, amplitude) such as microcalcifications; tgc: time-gain
  compensation, None (off) or the uniform attenuation (dB/cm/MHz) it undoes: like the TGC
  sliders, it is set for the typical tissue, so shadows and enhancement survive; noise_db:
  receiver noise power relative to a unit-echogenicity tissue at the probe face (None: off).

  Under fully developed speckle every resolution cell holds many sub-wavelength scatterers
  whose phases are uniform, so the demodulated (complex baseband) signal of a pixel is a
  complex Gaussian with variance = echogenicity, and its magnitude is Rayleigh distributed.
  """
  n_rows, n_lines = echo.shape
  sig_z, sig_x = psf_sigmas(probe, n_rows, n_lines)
  pad_z = int(math.ceil(4 * sig_z))
  pad_x = int(math.ceil(3 * sig_x.max()))
  n_fft = sfft.next_fast_len(n_lines + 2 * pad_x)
  pad_right = n_fft - n_lines - pad_x

  # Round-trip amplitude attenuation reaching each sample: exp(-2 f0 * integral alpha dz).
  step = (2.0 * probe.f0 * probe.depth / n_rows / DB_PER_NEPER) * alpha_db
  loss = np.cumsum(step, axis=0) - 0.5 * step
  amplitude = np.sqrt(echo) * np.exp(-loss)

  # Tissue continues beyond the field of view (edge-extended), there is gel above the skin.
  amplitude = np.pad(amplitude, ((0, pad_z), (pad_x, pad_right)), mode="edge")
  field = rng.standard_normal((amplitude.shape[0], 2 * n_fft), dtype=_F32).view(np.complex64)
  field *= amplitude * _F32(math.sqrt(0.5))
  for row, col, amp in points:  # strong point reflectors, attenuated like their surroundings
    field[row, col + pad_x] += (
      amp * math.exp(-loss[row, col]) * np.exp(1j * rng.uniform(0, 2 * np.pi))
    )

  # Axial PSF: the baseband of a Gaussian-modulated cosine demodulated at f0 is its Gaussian
  # envelope; filter re/im columns of the float view in one pass.
  field = ndimage.correlate1d(
    field.view(_F32), _unit_energy_gaussian(sig_z), axis=0, mode="constant"
  ).view(np.complex64)
  spectrum = sfft.fft(field[:n_rows], axis=1, workers=1)
  rf = _lateral_blend(spectrum, sig_x, n_lines, pad_x)

  if noise_db is not None:  # thermal noise enters after the attenuation, before the TGC
    sigma_n = _F32(10 ** (noise_db / 20) * math.sqrt(0.5))
    rf += rng.standard_normal((n_rows, 2 * n_lines), dtype=_F32).view(np.complex64) * sigma_n
  envelope = np.abs(rf)
  if tgc is not None:
    depth = (np.arange(n_rows, dtype=_F32) + 0.5) * (probe.depth / n_rows)
    envelope *= np.exp(2.0 * probe.f0 * float(tgc) / DB_PER_NEPER * depth)[:, None].astype(_F32)
  return envelope


def log_compress(envelope: np.ndarray, dynamic_range_db: float, gain_db: float) -> np.ndarray:
  """Map the envelope to [0, 1]: 0 dB (white) sits ``gain_db`` above the RMS echo of a
  unit-echogenicity tissue, black is ``dynamic_range_db`` below white."""
  db = 20.0 * np.log10(np.maximum(envelope, _F32(1e-12)))
  return np.clip((db - gain_db) * (1.0 / dynamic_range_db) + 1.0, 0.0, 1.0)


def _to_beam_index(probe: Probe, n: int, x: float, d: float) -> tuple[int, int]:
  if probe.geometry == "linear":
    row, col = d / probe.depth * n, (x + probe.width / 2) / probe.width * n
  else:
    y = d + probe.radius
    row = (math.hypot(x, y) - probe.radius) / probe.depth * n
    col = (math.atan2(x, y) + probe.sector / 2) / probe.sector * n
  return int(np.clip(row, 0, n - 1)), int(np.clip(col, 0, n - 1))


# --------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------


def _calcification_points(
  lesion: Lesion, host_echo: float, probe: Probe, n: int
) -> list[tuple[int, int, float]]:
  """(row, col, amplitude) of the microcalcifications on the beam grid.

  The peak of a unit-energy 2-D Gaussian PSF is 1/sqrt(pi * sx * sz), so dividing by it makes
  a focus show its brightness (dB) above the host tissue's RMS speckle, before attenuation."""
  sig_z, sig_x = psf_sigmas(probe, n, n)
  points = []
  for x, d, bright_db in lesion.calcifications:
    row, col = _to_beam_index(probe, n, x, d)
    peak = 1.0 / math.sqrt(math.pi * sig_z * sig_x[row])
    points.append((row, col, math.sqrt(host_echo) * 10 ** (bright_db / 20) / peak))
  return points


def simulate(
  seed: int,
  index: int,
  image_size: int = 256,
  *,
  tgc: bool = True,
  return_intermediates: bool = False,
) -> dict:
  """One B-mode image with its organ, class and lesion mask; deterministic in (seed, index).

  Returns {'image': uint8 (S, S), 'organ': int, 'label': int, 'mask': uint8 (S, S) 0/1}.
  With ``return_intermediates`` also, on the beam grid (rows = depth, columns = scan lines;
  identical to the image grid for a linear probe): 'envelope' (after attenuation, TGC and
  noise, before log compression), 'echogenicity', 'attenuation' (dB/cm/MHz), 'region' (dict of
  boolean tissue masks, including 'lesion' and 'parenchyma'), 'depth' (cm per row); and
  'geometry', 'probe', 'fan' (display pixels inside the field of view), 'pixel_size_cm' (side
  of a square display pixel), 'dynamic_range_db', 'gain_db'.
  """
  if image_size < 16:
    raise ValueError(f"image_size must be >= 16, got {image_size}")
  organ, label = example_meta(seed, index)
  rng = np.random.default_rng([seed, index])
  name = ORGANS[organ]
  depth_range = (10.0, 14.0) if name == "fetal_head" else None
  probe = sample_probe(rng, PROBE_FOR_ORGAN[name], depth_range)
  anatomy = _TEMPLATES[name](rng, probe)
  lesion = _lesion(rng, anatomy, label)
  layers = anatomy.layers + ([lesion.layer] if lesion.layer is not None else [])
  dynamic_range = float(rng.uniform(50.0, 60.0))
  gain = float(rng.uniform(20.0, 27.0))
  noise_db = float(rng.uniform(-80.0, -70.0))

  n = image_size
  beam = beam_coords(probe, n, n)
  echo, alpha, tissue = render(layers, beam)
  points = _calcification_points(lesion, anatomy.host_echo, probe, n)
  envelope = pulse_echo(
    echo,
    alpha,
    probe,
    rng,
    tgc=anatomy.tgc_alpha if tgc else None,
    points=points,
    noise_db=noise_db,
  )
  img01 = log_compress(envelope, dynamic_range, gain)

  lesion_index = len(anatomy.layers)
  if probe.geometry == "linear":
    image01 = img01
    mask = tissue == lesion_index
    fan = np.ones((n, n), bool)
  else:
    display = _fan_display(probe, n)
    image01, fan = scan_convert(img01, probe, n, display)
    disp = display[0]
    # The lesion is drawn analytically on the display grid, so the mask is exact there.
    mask = fan & lesion.layer.shape(disp) if lesion.layer is not None else np.zeros((n, n), bool)
  out = {
    "image": np.round(image01 * 255.0).astype(np.uint8),
    "organ": organ,
    "label": label,
    "mask": mask.astype(np.uint8),
  }
  if return_intermediates:
    names = [layer.name for layer in layers]
    region = {
      nm: np.isin(tissue, [k for k, other in enumerate(names) if other == nm])
      for nm in dict.fromkeys(names)
    }
    region.setdefault("lesion", np.zeros((n, n), bool))
    region["parenchyma"] = region[anatomy.parenchyma]
    out.update(
      envelope=envelope,
      echogenicity=echo,
      attenuation=alpha,
      region=region,
      depth=(np.arange(n) + 0.5) * (probe.depth / n),
      geometry=probe.geometry,
      probe=dataclasses.asdict(probe),
      fan=fan,
      pixel_size_cm=display_pixel_size(probe, n),
      dynamic_range_db=dynamic_range,
      gain_db=gain,
    )
  return out
