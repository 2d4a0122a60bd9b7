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

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from mae_jax.data.phantom_anatomy import (ANECHOIC, _TEMPLATES, Anatomy, Layer, Lesion, Shape,  # noqa: F401
                                         _lesion, band, ellipse, render, wavy)
from mae_jax.data.phantom_geometry import (CLASS_WEIGHTS, CLASSES, DB_PER_NEPER,  # noqa: F401
                                           ORGAN_WEIGHTS, ORGANS, PROBE_FOR_ORGAN, SOUND_SPEED,
                                           _ANTI_ALIAS_SIGMA_PX, _F32, _FWHM_PER_SIGMA, Coords,
                                           Probe, _bilinear, _fan_display, beam_coords,
                                           display_pixel_size, sample_probe, scan_convert)

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
  display_gain_db: float = 0.0,
  display_smoothing: float = 0.0,
) -> dict:
  """One B-mode image with its organ, class and lesion mask; deterministic in (seed, index).

  Returns {'image': uint8 (S, S), 'organ': int, 'label': int, 'mask': uint8 (S, S) 0/1}.
  With ``return_intermediates`` also, on the beam grid (rows = depth, columns = scan lines;
  identical to the image grid for a linear probe): 'envelope' (after attenuation, TGC and
  noise, before log compression), 'echogenicity', 'attenuation' (dB/cm/MHz), 'region' (dict of
  boolean tissue masks, including 'lesion' and 'parenchyma'), 'depth' (cm per row); and
  'geometry', 'probe', 'fan' (display pixels inside the field of view), 'pixel_size_cm' (side
  of a square display pixel), 'dynamic_range_db', 'gain_db'.

  Display post-processing, off by default (the raw display; the built-in dataset stores every image
  with ``us_phantom.DISPLAY``): ``display_gain_db`` moves white
  that much further above tissue (a darker display); ``display_smoothing`` = k low-passes the
  envelope with a Gaussian of k times the PSF's axial and (median) lateral σ before log
  compression, as scanners' speckle-reduction filters do (docs/phantom.md, "Phantom vs real").
  Neither changes the random draws.
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
  if display_smoothing > 0:
    sig_z, sig_x = psf_sigmas(probe, n, n)
    envelope = ndimage.gaussian_filter(
      envelope, (display_smoothing * sig_z, display_smoothing * float(np.median(sig_x)))).astype(_F32)
  img01 = log_compress(envelope, dynamic_range, gain + display_gain_db)

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
