"""Speckle reducing anisotropic diffusion (Yu & Acton, IEEE TIP 11(11), 2002), batched in jnp.

Discretisation (Yu & Acton §IV, spatial step h = 1), per pixel (i, j) and iteration n, with the
four one-sided differences d_N, d_S, d_W, d_E to the neighbours (replicated borders, so a
difference across the image edge is 0):

  |∇I|² / I² = (d_N² + d_S² + d_W² + d_E²) / I²           ∇²I / I = (d_N + d_S + d_W + d_E) / I
  q² = [½ |∇I|²/I² − (1/16)(∇²I/I)²] / [1 + ¼ ∇²I/I]²
  c  = 1 / (1 + (q² − q0²) / (q0² (1 + q0²)))  clipped to [0, 1]
  div = c_S d_S + c_E d_E + c_ij (d_N + d_W)    (c at the south / east neighbour, own c otherwise)
  I ← I + (Δt / 4) · div

The 1/4 is Yu & Acton's (their update for h = 1; also what the Rodinia SRAD benchmark uses);
the Deblurring MAE paper's Eq. 3 writes Δt·div with the discretisation left implicit.

Choices the papers leave open, documented here:
- q0 (speckle scale): Yu & Acton estimate it from a user-chosen homogeneous region; with no
  region to choose, q0² = var(I) / mean(I)² over the whole image (per image and channel,
  population variance), re-estimated at every iteration.
- Division by zero on [0, 1] images (black ultrasound background): multiplying numerator and
  denominator of q² by I² gives the same quantity without dividing by I,
      q² = [½ Σd² − (1/16)(Σd)²] / m²,  m = I + ¼ Σd = mean of the four neighbours,
  so only m² and the q0² terms need a guard: both are floored at EPS = 1e-12. A pixel whose four
  neighbours are 0 then gets c = 0 if it is bright (an isolated spike is an edge) and c = 1 if it
  is 0 too (flat black region). q² ≥ 0 always (Cauchy–Schwarz), so c > 0 before clipping.
- Colour images: each channel diffuses on its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_ITERATIONS = 40
DEFAULT_DT = 0.1
EPS = 1e-12


def _neighbour_differences(x):
  """(d_N, d_S, d_W, d_E) with replicated (edge) borders, for NHWC x."""
  p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  c = p[:, 1:-1, 1:-1]
  return p[:, :-2, 1:-1] - c, p[:, 2:, 1:-1] - c, p[:, 1:-1, :-2] - c, p[:, 1:-1, 2:] - c


def _shift_from_south(c):
  """c at (i+1, j), replicating the last row."""
  return jnp.concatenate([c[:, 1:], c[:, -1:]], axis=1)


def _shift_from_east(c):
  """c at (i, j+1), replicating the last column."""
  return jnp.concatenate([c[:, :, 1:], c[:, :, -1:]], axis=2)


def srad_step(x, dt):
  """One SRAD iteration on NHWC x; dt scalar or broadcastable to x."""
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  var = jnp.var(x, axis=(1, 2), keepdims=True)
  q0sq = jnp.maximum(var / jnp.maximum(mean * mean, EPS), EPS)

  d_n, d_s, d_w, d_e = _neighbour_differences(x)
  sum_d = d_n + d_s + d_w + d_e
  sum_d2 = d_n * d_n + d_s * d_s + d_w * d_w + d_e * d_e
  m = x + 0.25 * sum_d
  qsq = (0.5 * sum_d2 - sum_d * sum_d / 16.0) / jnp.maximum(m * m, EPS)
  c = 1.0 / (1.0 + (qsq - q0sq) / (q0sq * (1.0 + q0sq)))
  c = jnp.clip(c, 0.0, 1.0)

  div = _shift_from_south(c) * d_s + _shift_from_east(c) * d_e + c * (d_n + d_w)
  return x + 0.25 * dt * div


def srad(images, *, iterations: int = DEFAULT_ITERATIONS, dt=DEFAULT_DT):
  """SRAD of NHWC float32 images in [0, 1]: `iterations` (static) steps of size dt.

  dt: Python float, or a per-sample (N,) array (may be traced).
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
  if not isinstance(iterations, int) or iterations < 0:
    raise ValueError(f"srad iterations must be a non-negative Python int, got {iterations!r}")
  x = images.astype(jnp.float32)
  dt = jnp.asarray(dt, jnp.float32)
  if dt.ndim == 1:
    dt = dt.reshape(-1, 1, 1, 1)
  return jax.lax.fori_loop(0, iterations, lambda _, v: srad_step(v, dt), x)
