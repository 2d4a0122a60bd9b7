"""Paired low- / high-quality acquisitions of one simulated scene, for image enhancement (USFM
§4.1.2, Table 4; USEnhance2023 pairs images of one anatomy from a low-end and a high-end scanner).

`simulate_pair(seed, index, size)` draws the scene exactly as `phantom.simulate` does (same organ,
class, probe, anatomy, lesion, dynamic range and gain for the same (seed, index)), then images the
*same scatterers* twice through the pulse-echo model of `phantom.pulse_echo`:

  * high quality: the drawn probe, as in `phantom.simulate`;
  * low quality (`LowQuality`): a cheaper acquisition of the same tissue — a lower centre frequency
    and a narrower band (a longer pulse: wider axial PSF, and a wider beam since the wavelength
    grows), fewer active elements (a larger F-number: wider beam), stronger receiver noise, reverberation
    clutter near the probe (an incoherent haze that fades with depth, imaged through the same PSF),
    and a wider dynamic range at display (flatter greys: lower contrast).

Sharing the scatterer field is what makes the pair a pair: the two images show the same speckle
sources blurred by different PSFs, as two scanners imaging one patient would (their speckle differs
only through the PSF). The high-quality image is not bit-identical to `phantom.simulate`'s image of
the same (seed, index): the scatterer field here is padded for the wider of the two PSFs, so its
random draws fall on other pixels. Nothing in `phantom` changes: the other datasets are untouched.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from mae_jax.data import phantom

_F32 = np.float32


@dataclasses.dataclass(frozen=True)
class LowQuality:
  """How the low-quality acquisition differs from the high-quality one (factors on the drawn probe)."""

  f0_factor: float = 0.55  # centre frequency (a low-end probe / harmonic imaging off)
  bandwidth_factor: float = 0.7  # fractional bandwidth: a longer pulse
  f_number_factor: float = 2.0  # half the active aperture (fewer elements)
  noise_db: float = 12.0  # receiver noise above the high-quality acquisition's
  clutter_db: float = -12.0  # reverberation haze at the probe face, re the host tissue's echo
  clutter_depth: float = 0.15  # its e-folding depth, as a fraction of the imaged depth
  dynamic_range_factor: float = 1.3  # wider display dynamic range: lower contrast


def low_quality_probe(probe: phantom.Probe, lq: LowQuality) -> phantom.Probe:
  return dataclasses.replace(probe, f0=probe.f0 * lq.f0_factor,
                             bandwidth=probe.bandwidth * lq.bandwidth_factor,
                             f_number=probe.f_number * lq.f_number_factor)


def _image_field(white, echo, alpha_db, probe, *, pad_z, pad_x, points, phases, clutter=None,
                 clutter_white=None):
  """Complex baseband RF of one acquisition from a shared white scatterer field (see
  `phantom.pulse_echo`, whose steps this follows with the padding fixed by the caller)."""
  n_rows, n_lines = echo.shape
  n_fft = white.shape[1]
  sig_z, sig_x = phantom.psf_sigmas(probe, n_rows, n_lines)
  step = (2.0 * probe.f0 * probe.depth / n_rows / phantom.DB_PER_NEPER) * alpha_db
  loss = np.cumsum(step, axis=0) - 0.5 * step  # attenuation depends on the frequency
  amplitude = np.sqrt(echo) * np.exp(-loss)
  amplitude = np.pad(amplitude, ((0, pad_z), (pad_x, n_fft - n_lines - pad_x)), mode="edge")
  field = white * amplitude
  if clutter is not None:  # reverberation: not attenuated like the tissue, independent scatterers
    cl = np.pad(clutter, ((0, pad_z), (pad_x, n_fft - n_lines - pad_x)), mode="edge")
    field = field + clutter_white * cl
  for (row, col, amp), ph in zip(points, phases):
    field[row, col + pad_x] += amp * math.exp(-loss[row, col]) * np.exp(1j * ph)
  field = ndimage.correlate1d(field.astype(np.complex64).view(_F32),
                              phantom._unit_energy_gaussian(sig_z), axis=0,
                              mode="constant").view(np.complex64)
  spectrum = sfft.fft(field[:n_rows], axis=1, workers=1)
  return phantom._lateral_blend(spectrum, sig_x, n_lines, pad_x)


def _envelope(rf, probe, tgc, noise):
  env = np.abs(rf + noise) if noise is not None else np.abs(rf)
  if tgc is not None:
    n_rows = rf.shape[0]
    depth = (np.arange(n_rows, dtype=_F32) + 0.5) * (probe.depth / n_rows)
    env *= np.exp(2.0 * probe.f0 * float(tgc) / phantom.DB_PER_NEPER * depth)[:, None].astype(_F32)
  return env


def simulate_pair(seed: int, index: int, image_size: int = 256, *, lq: LowQuality = LowQuality()) -> dict:
  """{'low', 'high': uint8 (S, S); 'organ', 'label': int; 'mask': uint8 (S, S) 0/1}, deterministic
  in (seed, index)."""
  if image_size < 16:
    raise ValueError(f"image_size must be >= 16, got {image_size}")
  # The scene: the same draws, in the same order, as phantom.simulate.
  organ, label = phantom.example_meta(seed, index)
  rng = np.random.default_rng([seed, index])
  name = phantom.ORGANS[organ]
  depth_range = (10.0, 14.0) if name == "fetal_head" else None
  probe = phantom.sample_probe(rng, phantom.PROBE_FOR_ORGAN[name], depth_range)
  anatomy = phantom._TEMPLATES[name](rng, probe)
  lesion = phantom._lesion(rng, anatomy, label)
  layers = anatomy.layers + ([lesion.layer] if lesion.layer is not None else [])
  dynamic_range = float(rng.uniform(50.0, 60.0))
  gain = float(rng.uniform(20.0, 27.0))
  noise_db = float(rng.uniform(-80.0, -70.0))

  n = image_size
  beam = phantom.beam_coords(probe, n, n)
  echo, alpha, tissue = phantom.render(layers, beam)
  points = phantom._calcification_points(lesion, anatomy.host_echo, probe, n)
  low_probe = low_quality_probe(probe, lq)

  # One scatterer field, padded for the wider (low-quality) PSF, shared by both acquisitions.
  sig = [phantom.psf_sigmas(p, n, n) for p in (probe, low_probe)]
  pad_z = int(math.ceil(4 * max(s[0] for s in sig)))
  pad_x = int(math.ceil(3 * max(float(s[1].max()) for s in sig)))
  n_fft = sfft.next_fast_len(n + 2 * pad_x)
  shape = (n + pad_z, n_fft)
  white = rng.standard_normal((shape[0], 2 * shape[1]), dtype=_F32).view(np.complex64) * _F32(math.sqrt(0.5))
  phases = rng.uniform(0, 2 * np.pi, size=len(points))
  clutter_white = rng.standard_normal((shape[0], 2 * shape[1]), dtype=_F32).view(np.complex64) * _F32(math.sqrt(0.5))
  depth = ((np.arange(n, dtype=_F32) + 0.5) / n)[:, None]
  clutter = np.broadcast_to(
      math.sqrt(anatomy.host_echo * 10 ** (lq.clutter_db / 10)) * np.exp(-depth / (2 * lq.clutter_depth)),
      (n, n)).astype(_F32)

  def noise(level_db):
    sigma_n = _F32(10 ** (level_db / 20) * math.sqrt(0.5))
    return rng.standard_normal((n, 2 * n), dtype=_F32).view(np.complex64) * sigma_n

  common = dict(pad_z=pad_z, pad_x=pad_x, points=points, phases=phases)
  rf_hi = _image_field(white, echo, alpha, probe, **common)
  rf_lo = _image_field(white, echo, alpha, low_probe, clutter=clutter, clutter_white=clutter_white, **common)
  env_hi = _envelope(rf_hi, probe, anatomy.tgc_alpha, noise(noise_db))
  env_lo = _envelope(rf_lo, low_probe, anatomy.tgc_alpha, noise(noise_db + lq.noise_db))
  hi01 = phantom.log_compress(env_hi, dynamic_range, gain)
  lo01 = phantom.log_compress(env_lo, dynamic_range * lq.dynamic_range_factor, gain)

  lesion_index = len(anatomy.layers)
  if probe.geometry == "linear":
    mask = tissue == lesion_index
  else:
    display = phantom._fan_display(probe, n)
    hi01, fan = phantom.scan_convert(hi01, probe, n, display)
    lo01, _ = phantom.scan_convert(lo01, probe, n, display)
    mask = fan & lesion.layer.shape(display[0]) if lesion.layer is not None else np.zeros((n, n), bool)
  to8 = lambda a: np.round(a * 255.0).astype(np.uint8)
  return {"low": to8(lo01), "high": to8(hi01), "organ": organ, "label": label,
          "mask": mask.astype(np.uint8)}
